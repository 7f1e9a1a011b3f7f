//! The media relay: the data plane.
//!
//! A worker thread owns every relay socket and the flow table by `&mut`; the control
//! plane talks to it only through a command queue plus a `mio::Waker`. Packets never pass
//! through an actor mailbox. The worker polls its sockets with `mio` (epoll), drains each
//! ready socket up to a bounded batch per turn, and flushes metric counters once per turn.
//!
//! This first version uses one worker and plain `recv_from`/`send_to`; the per-core,
//! recvmmsg/GSO version is the media relay issue.

mod worker;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use parley_actors::messages::{FlowStats, MediaError, MediaPlane, SessionId};

use crate::metrics as m;

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Bind and advertise address.
    pub ip: IpAddr,
    /// First port.
    pub port_min: u16,
    /// Last port.
    pub port_max: u16,
}

pub(crate) enum Command {
    AddSocket {
        port: u16,
        socket: std::net::UdpSocket,
    },
    BridgeUdp {
        a: (u16, SocketAddr),
        b: (u16, SocketAddr),
        stats: Arc<FlowStats>,
    },
    BridgeRoq {
        udp: (u16, SocketAddr),
        session: SessionId,
        flow: u64,
        conn: quinn::Connection,
        stats: Arc<FlowStats>,
    },
    BridgeRoqRoq {
        a: (SessionId, u64, quinn::Connection),
        b: (SessionId, u64, quinn::Connection),
        stats: Arc<FlowStats>,
    },
    Release {
        ports: Vec<u16>,
        roq: Vec<(SessionId, u64)>,
    },
    RoqIn {
        session: SessionId,
        flow: u64,
        packet: Bytes,
    },
    Stop,
}

/// Handle to the relay, shared by the control plane.
pub struct Relay {
    settings: RelaySettings,
    free: Arc<Mutex<VecDeque<u16>>>,
    tx: Mutex<mpsc::Sender<Command>>,
    waker: Arc<mio::Waker>,
    next_flow: AtomicU64,
    conns: dashmap::DashMap<SessionId, quinn::Connection>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Starts the worker thread.
    pub fn start(settings: RelaySettings) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel();
        let free: Arc<Mutex<VecDeque<u16>>> = Arc::new(Mutex::new(
            (settings.port_min..=settings.port_max).collect(),
        ));
        let (worker, waker) = worker::Worker::new(rx, free.clone())?;
        let thread = std::thread::Builder::new()
            .name("parley-relay".into())
            .spawn(move || worker.run())?;

        Ok(Arc::new(Self {
            settings,
            free,
            tx: Mutex::new(tx),
            waker,
            next_flow: AtomicU64::new(1),
            conns: dashmap::DashMap::new(),
            thread: Mutex::new(Some(thread)),
        }))
    }

    fn send(&self, cmd: Command) -> Result<(), MediaError> {
        // The lock only guards the Sender (not Sync before use on all platforms); never held long.
        let tx = self.tx.lock().map_err(|_| MediaError::Unavailable)?;
        tx.send(cmd).map_err(|_| MediaError::Unavailable)?;
        drop(tx);
        self.waker.wake().map_err(|_| MediaError::Unavailable)
    }

    /// A device connection logged in: its datagrams may now carry media.
    pub fn register_session(&self, session: SessionId, conn: quinn::Connection) {
        self.conns.insert(session, conn);
    }

    /// A device connection ended.
    pub fn unregister_session(&self, session: SessionId) {
        self.conns.remove(&session);
    }

    /// A RoQ datagram arrived from a device.
    pub fn roq_in(&self, session: SessionId, flow: u64, packet: Bytes) {
        let _ = self.send(Command::RoqIn {
            session,
            flow,
            packet,
        });
    }

    /// Stops the worker and waits for it.
    pub fn stop(&self) {
        let _ = self.send(Command::Stop);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

impl MediaPlane for Relay {
    fn local_ip(&self) -> IpAddr {
        self.settings.ip
    }

    fn allocate_port(&self) -> Result<u16, MediaError> {
        let mut free = self.free.lock().map_err(|_| MediaError::Unavailable)?;
        // Ports taken by other programs are skipped (and put back at the end for later).
        for _ in 0..free.len() {
            let Some(port) = free.pop_front() else { break };
            match std::net::UdpSocket::bind((self.settings.ip, port)) {
                Ok(socket) => {
                    drop(free);
                    if socket.set_nonblocking(true).is_err() {
                        return Err(MediaError::Unavailable);
                    }
                    metrics::gauge!(m::RELAY_PORTS_ACTIVE).increment(1.0);
                    self.send(Command::AddSocket { port, socket })?;
                    return Ok(port);
                }
                Err(_) => free.push_back(port),
            }
        }
        Err(MediaError::PortsExhausted)
    }

    fn next_flow_id(&self) -> u64 {
        self.next_flow.fetch_add(1, Ordering::Relaxed)
    }

    fn bridge_udp(
        &self,
        caller: (u16, SocketAddr),
        callee: (u16, SocketAddr),
        stats: Arc<FlowStats>,
    ) -> Result<(), MediaError> {
        self.send(Command::BridgeUdp {
            a: caller,
            b: callee,
            stats,
        })
    }

    fn bridge_roq(
        &self,
        caller: (u16, SocketAddr),
        session: SessionId,
        flow_id: u64,
        stats: Arc<FlowStats>,
    ) -> Result<(), MediaError> {
        let conn = self
            .conns
            .get(&session)
            .map(|c| c.clone())
            .ok_or(MediaError::Unavailable)?;
        self.send(Command::BridgeRoq {
            udp: caller,
            session,
            flow: flow_id,
            conn,
            stats,
        })
    }

    fn bridge_roq_roq(
        &self,
        caller: (SessionId, u64),
        callee: (SessionId, u64),
        stats: Arc<FlowStats>,
    ) -> Result<(), MediaError> {
        let conn = |s: SessionId| {
            self.conns
                .get(&s)
                .map(|c| c.clone())
                .ok_or(MediaError::Unavailable)
        };
        let (a, b) = (conn(caller.0)?, conn(callee.0)?);
        self.send(Command::BridgeRoqRoq {
            a: (caller.0, caller.1, a),
            b: (callee.0, callee.1, b),
            stats,
        })
    }

    fn release(&self, ports: &[u16], roq: &[(SessionId, u64)]) {
        if ports.is_empty() && roq.is_empty() {
            return;
        }
        // The worker returns the ports to the pool once their sockets are closed, so a port
        // is never handed out while the old socket still holds it.
        metrics::gauge!(m::RELAY_PORTS_ACTIVE).decrement(ports.len() as f64);
        let _ = self.send(Command::Release {
            ports: ports.to_vec(),
            roq: roq.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests;
