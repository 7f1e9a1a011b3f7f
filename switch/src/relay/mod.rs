//! The media relay: the data plane.
//!
//! `workers` threads (`parley-relay-0`, `parley-relay-1`, …) each own a shard of the relay
//! sockets (the RTP/RTCP pair `p`, `p + 1` belongs to worker `(p / 2) % workers`) and
//! their flow table by `&mut`; the
//! control plane talks to a worker only through its command queue plus a `mio::Waker`.
//! Packets never pass through an actor mailbox. A worker polls its sockets with `mio`
//! (epoll), reads each ready socket in batches with `recvmmsg` (quinn-udp, GRO-aware),
//! sends a batch that goes to one destination with one GSO `sendmsg`, and flushes metric
//! counters once per loop turn.
//!
//! A UDP↔UDP bridge may join ports of two workers: each worker receives on its own port
//! and sends out of the other port's socket, which it holds by `Arc`. A worker that
//! latches its port's source tells the other port's worker, which then sends there. RoQ
//! flows live on the worker that owns their UDP port; RoQ↔RoQ flows on worker 0.

pub mod kernel;
mod socket;
mod worker;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use parley_actors::messages::{FlowStats, MediaError, MediaPlane, SessionId};

use crate::metrics as m;
use socket::{FreePorts, PortSocket};

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Bind and advertise address.
    pub ip: IpAddr,
    /// First port.
    pub port_min: u16,
    /// Last port.
    pub port_max: u16,
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Minimum time between two reads of a worker's sockets while packets are flowing
    /// (interrupt moderation): packets that arrive meanwhile wait in the socket queues
    /// and are read in one turn, so a worker is woken once per turn instead of once per
    /// packet. Adds at most this much latency. Zero reads as soon as a packet arrives.
    pub coalesce: std::time::Duration,
    /// Bind and relay an RTCP port (RTP + 1) per leg. RTP ports are even and their + 1 is
    /// reserved either way.
    pub rtcp_ports: bool,
    /// `SO_RCVBUF`/`SO_SNDBUF` of each relay socket; 0 keeps the kernel default.
    pub socket_buffer: usize,
    /// Most RTP ports one worker holds; 0 for no cap but the range.
    pub max_ports_per_worker: usize,
    /// Free RTP ports (with their RTCP ports) kept bound and registered with their
    /// worker after a call, so the next call takes one without a system call, instead of
    /// closing each socket and binding a new one (socket, bind, options, epoll add and
    /// delete, close: a dozen system calls per port). 0 closes every released port.
    pub warm_ports: usize,
    /// Latch a port's first source whatever its IP address (peers behind NAT); by
    /// default only a source with the signalled IP address may latch.
    pub latch_any_source: bool,
    /// Forward latched UDP↔UDP flows in the kernel ([`kernel`]).
    pub kernel: KernelMode,
    /// Interfaces the kernel fast path attaches to; empty: `lo` and the one holding `ip`.
    pub kernel_interfaces: Vec<String>,
}

/// Whether the relay forwards latched UDP↔UDP flows with its eBPF program ([`kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelMode {
    /// Userspace only.
    #[default]
    Off,
    /// The kernel where the program loads; userspace (saying why in the log) where not.
    Auto,
    /// The kernel, or the node does not start.
    Required,
}

/// How often the kernel's per-flow counters are folded into calls' stats and the
/// metrics: the media timeout and `/metrics` lag the kernel by at most this much (a
/// call's CDR does not: its flows are folded as it releases them).
const KERNEL_SWEEP: std::time::Duration = std::time::Duration::from_millis(250);

/// Loads the kernel fast path as `s.kernel` asks: `None` when off, or (`auto`) when it
/// cannot load, said in the log; an error when required and it cannot.
fn load_kernel(s: &RelaySettings) -> std::io::Result<Option<Arc<kernel::KernelFlows>>> {
    if s.kernel == KernelMode::Off {
        return Ok(None);
    }
    let attempt = || -> Result<kernel::KernelFlows, String> {
        let IpAddr::V4(ip) = s.ip else {
            return Err(format!(
                "the relay address {} is IPv6; the program forwards IPv4",
                s.ip
            ));
        };
        if ip.is_unspecified() {
            return Err(
                "the relay address is 0.0.0.0; the program finds a flow by the relay's own \
                 address: set [relay] ip"
                    .into(),
            );
        }
        let interfaces = if s.kernel_interfaces.is_empty() {
            let mut v = vec!["lo".to_owned()];
            let own = kernel::interface_of(ip).map_err(|e| e.to_string())?;
            if !v.contains(&own) {
                v.push(own);
            }
            v
        } else {
            s.kernel_interfaces.clone()
        };
        let names: Vec<&str> = interfaces.iter().map(String::as_str).collect();
        let path = kernel::KernelPath::load(&names).map_err(|e| e.to_string())?;
        tracing::info!(
            interfaces = ?interfaces,
            "relay kernel fast path loaded: latched UDP flows are forwarded by eBPF"
        );
        Ok(kernel::KernelFlows::new(path, ip))
    };
    match attempt() {
        Ok(k) => Ok(Some(Arc::new(k))),
        Err(why) if s.kernel == KernelMode::Auto => {
            tracing::warn!(reason = %why, "relay kernel fast path unavailable; relaying in userspace");
            Ok(None)
        }
        Err(why) => Err(std::io::Error::other(format!(
            "[relay] kernel = \"required\", but the fast path cannot load: {why}"
        ))),
    }
}

impl RelaySettings {
    /// Loopback, the given range, `workers` workers, RTCP ports, kernel buffers, no cap,
    /// no interrupt moderation.
    pub fn loopback(port_min: u16, port_max: u16, workers: usize) -> Self {
        Self {
            ip: [127, 0, 0, 1].into(),
            port_min,
            port_max,
            workers,
            coalesce: std::time::Duration::ZERO,
            rtcp_ports: true,
            socket_buffer: 0,
            max_ports_per_worker: 0,
            warm_ports: 1024,
            latch_any_source: false,
            kernel: KernelMode::Off,
            kernel_interfaces: Vec::new(),
        }
    }
}

/// The RTCP address that goes with an RTP address (RFC 3550 §11: RTP port + 1).
fn rtcp_of(rtp: SocketAddr) -> Option<SocketAddr> {
    rtp.port()
        .checked_add(1)
        .map(|p| SocketAddr::new(rtp.ip(), p))
}

/// One side of a UDP↔UDP bridge, as installed on the worker that owns `port`.
pub(crate) struct UdpLeg {
    port: u16,
    /// Where signalling says this port's peer receives.
    peer: SocketAddr,
    /// The bridged port: packets arriving on `port` leave from it.
    out: Arc<PortSocket>,
    /// Where signalling says the bridged port's peer receives (until it latches).
    out_peer: SocketAddr,
    stats: Arc<FlowStats>,
    caller_side: bool,
    /// An RTCP port: not counted in the call's media stats.
    rtcp: bool,
}

pub(crate) enum Command {
    AddSocket(Arc<PortSocket>),
    BridgeUdp(UdpLeg),
    /// Signalling moved `port`'s peer to `peer` (re-INVITE): re-latch, and the bridged
    /// side sends there.
    Repoint {
        port: u16,
        peer: SocketAddr,
    },
    /// The bridged port `of` latched `src`: packets arriving on `port` now go there.
    Latched {
        port: u16,
        of: u16,
        src: SocketAddr,
    },
    BridgeRoq {
        udp: (u16, SocketAddr),
        session: SessionId,
        flow: u64,
        conn: DeviceConn,
        stats: Arc<FlowStats>,
    },
    BridgeRoqRoq {
        a: (SessionId, u64, DeviceConn),
        b: (SessionId, u64, DeviceConn),
        stats: Arc<FlowStats>,
    },
    /// A call's end: `ports` are closed, `park` kept bound for a later call (reset and
    /// drained by the worker first).
    Release {
        ports: Vec<u16>,
        park: Vec<u16>,
        roq: Vec<(SessionId, u64)>,
    },
    Stop,
}

/// A device's RTP/RTCP datagram, on its way to the worker that owns its flow.
pub(crate) struct RoqDatagram {
    session: SessionId,
    flow: u64,
    packet: Bytes,
}

/// Device datagrams queued per worker before new ones are dropped (`queue_full`): about
/// 160 ms of 1,000 device calls at 50 packets per second.
const ROQ_QUEUE: usize = 8192;

/// What a bridge is known by: its caller-side port or RoQ flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FlowKey {
    Port(u16),
    Roq(SessionId, u64),
}

/// A worker's inbox: control commands (never dropped) and device datagrams (bounded).
pub(crate) struct WorkerHandle {
    tx: mpsc::Sender<Command>,
    media: mpsc::SyncSender<RoqDatagram>,
    waker: Arc<mio::Waker>,
    /// A wake-up is on its way and the worker has not yet started draining: senders skip
    /// the `eventfd` write (one system call per device datagram otherwise).
    pending: std::sync::atomic::AtomicBool,
}

impl WorkerHandle {
    fn send(&self, cmd: Command) -> Result<(), MediaError> {
        self.tx.send(cmd).map_err(|_| MediaError::Unavailable)?;
        self.wake()
    }

    fn wake(&self) -> Result<(), MediaError> {
        // AcqRel pairs with the worker's swap: whatever was queued before this is seen by
        // the drain that follows the worker's reset.
        if self.pending.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.waker.wake().map_err(|_| MediaError::Unavailable)
    }
}

/// How the relay reaches a device session's media: RoQ datagrams (flow id + RTP packet)
/// either way.
#[derive(Clone)]
pub enum DeviceConn {
    /// The device's QUIC connection.
    Quic(quinn::Connection),
    /// Another carrier of the session's flows: a browser's WebRTC peer connection, on
    /// the WebRTC thread (`crate::webrtc::MediaSink`).
    Sink(Arc<dyn DatagramSink>),
}

/// Takes a device session's RoQ datagrams somewhere other than a QUIC connection.
pub trait DatagramSink: Send + Sync + 'static {
    /// Bytes it takes now without dropping older datagrams.
    fn space(&self) -> usize;
    /// Queues one datagram; `Err` once the carrier is gone.
    fn send(&self, datagram: Bytes) -> Result<(), SinkClosed>;
}

/// A [`DatagramSink`] whose carrier is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkClosed;

impl std::fmt::Debug for DeviceConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Quic(_) => "DeviceConn::Quic",
            Self::Sink(_) => "DeviceConn::Sink",
        })
    }
}

impl DeviceConn {
    /// Bytes of datagrams the connection takes now without dropping older ones.
    fn datagram_send_buffer_space(&self) -> usize {
        match self {
            Self::Quic(c) => c.datagram_send_buffer_space(),
            Self::Sink(s) => s.space(),
        }
    }

    /// Queues one RoQ datagram.
    fn send_datagram(&self, datagram: Bytes) -> Result<(), ()> {
        match self {
            Self::Quic(c) => c.send_datagram(datagram).map_err(|_| ()),
            Self::Sink(s) => s.send(datagram).map_err(|_| ()),
        }
    }
}

/// How long an allocation on a full range waits for released ports still closing
/// (their workers drop the sockets within microseconds unless busy).
const RETURN_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Handle to the relay, shared by the control plane.
pub struct Relay {
    settings: RelaySettings,
    free: FreePorts,
    workers: Arc<[WorkerHandle]>,
    /// Allocated ports' sockets, kept until release so a bridge can hand each worker the
    /// other side's socket.
    sockets: dashmap::DashMap<u16, Arc<PortSocket>>,
    /// Sockets of released ports kept bound (RTCP ports included), from their release
    /// until a call takes them again (offered once their worker parked them:
    /// `PortPool::warm`).
    parked: dashmap::DashMap<u16, Arc<PortSocket>>,
    /// Most RTP ports kept warm (`RelaySettings::warm_ports`, within the descriptors).
    warm_cap: usize,
    /// RTP ports held per worker (for `max_ports_per_worker`).
    legs: Box<[AtomicUsize]>,
    /// Which worker holds each RoQ flow (device datagrams are routed by it).
    roq_owner: dashmap::DashMap<(SessionId, u64), usize>,
    /// Installed bridges, by the caller-side port or RoQ flow (for the flows gauge).
    bridges: dashmap::DashSet<FlowKey>,
    next_flow: AtomicU64,
    conns: dashmap::DashMap<SessionId, DeviceConn>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The kernel fast path, when loaded.
    kernel: Option<Arc<kernel::KernelFlows>>,
    /// Dropped to stop the kernel counters' sweeper.
    sweeper: Mutex<Option<mpsc::Sender<()>>>,
    _gro: socket::GroKeeper,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Starts the worker threads.
    pub fn start(settings: RelaySettings) -> std::io::Result<Arc<Self>> {
        let n = settings.workers.max(1);
        // Even RTP ports, each with room for its RTCP port above it.
        let first = settings.port_min.saturating_add(settings.port_min % 2);
        let free: FreePorts = socket::PortPool::new((first..settings.port_max).step_by(2));
        let mut polls = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        let mut rxs = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = mio::Poll::new()?;
            let waker = Arc::new(mio::Waker::new(poll.registry(), worker::WAKER)?);
            let (tx, rx) = mpsc::channel();
            let (media, media_rx) = mpsc::sync_channel(ROQ_QUEUE);
            polls.push(poll);
            rxs.push((rx, media_rx));
            handles.push(WorkerHandle {
                tx,
                media,
                waker,
                pending: std::sync::atomic::AtomicBool::new(false),
            });
        }
        let workers: Arc<[WorkerHandle]> = handles.into();
        let kernel = load_kernel(&settings)?;
        let mut threads = Vec::with_capacity(n + 1);
        let mut sweeper = None;
        if let Some(k) = &kernel {
            let (k, (tx, rx)) = (k.clone(), mpsc::channel::<()>());
            threads.push(
                std::thread::Builder::new()
                    .name("parley-relay-kernel".into())
                    .spawn(move || {
                        while let Err(mpsc::RecvTimeoutError::Timeout) =
                            rx.recv_timeout(KERNEL_SWEEP)
                        {
                            k.sweep();
                        }
                    })?,
            );
            sweeper = Some(tx);
        }
        for (i, (poll, (rx, media_rx))) in polls.into_iter().zip(rxs).enumerate() {
            let w = worker::Worker::new(worker::WorkerSetup {
                index: i,
                poll,
                rx,
                media_rx,
                peers: workers.clone(),
                coalesce: settings.coalesce,
                latch_any: settings.latch_any_source,
                kernel: kernel.clone(),
            });
            threads.push(
                std::thread::Builder::new()
                    .name(format!("parley-relay-{i}"))
                    .spawn(move || w.run())?,
            );
        }

        let warm_cap = warm_cap(&settings);
        Ok(Arc::new(Self {
            settings,
            free,
            workers,
            sockets: dashmap::DashMap::new(),
            parked: dashmap::DashMap::new(),
            warm_cap,
            legs: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            roq_owner: dashmap::DashMap::new(),
            bridges: dashmap::DashSet::new(),
            next_flow: AtomicU64::new(1),
            conns: dashmap::DashMap::new(),
            threads: Mutex::new(threads),
            kernel,
            sweeper: Mutex::new(sweeper),
            _gro: socket::GroKeeper::new(),
        }))
    }

    /// The worker that owns `port`.
    fn owner(&self, port: u16) -> &WorkerHandle {
        &self.workers[worker::owner(port, self.workers.len())]
    }

    /// Worker thread count.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The kernel fast path's flows, when it is loaded.
    pub fn kernel(&self) -> Option<&kernel::KernelFlows> {
        self.kernel.as_deref()
    }

    /// A device connection logged in (QUIC), or a browser's WebRTC media connected: the
    /// session's flows may now carry media.
    pub fn register_session(&self, session: SessionId, conn: DeviceConn) {
        self.conns.insert(session, conn);
    }

    /// A device connection ended.
    pub fn unregister_session(&self, session: SessionId) {
        self.conns.remove(&session);
    }

    /// A RoQ datagram arrived from a device.
    pub fn roq_in(&self, session: SessionId, flow: u64, packet: Bytes) {
        // Unknown flows go to worker 0, which counts them as `no_flow`.
        let w = self.roq_owner.get(&(session, flow)).map_or(0, |w| *w);
        let worker = &self.workers[w];
        match worker.media.try_send(RoqDatagram {
            session,
            flow,
            packet,
        }) {
            Ok(()) => {
                let _ = worker.wake();
            }
            Err(mpsc::TrySendError::Full(_)) => {
                metrics::counter!(m::RELAY_DROPS_TOTAL, "reason" => "queue_full").increment(1);
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {}
        }
    }

    /// Stops the workers and waits for them.
    pub fn stop(&self) {
        for w in self.workers.iter() {
            let _ = w.send(Command::Stop);
        }
        if let Ok(mut s) = self.sweeper.lock() {
            s.take();
        }
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
        self.sockets.clear();
        self.parked.clear();
        if let Ok(mut warm) = self.free.warm.lock() {
            warm.clear();
        }
        self.free.warm_len.store(0, Ordering::Relaxed);
    }

    /// Free RTP ports kept bound and ready for the next call.
    pub fn warm_ports(&self) -> usize {
        self.free.warm_len.load(Ordering::Relaxed)
    }

    /// A warm port (bound, registered, reset by its worker) for a new call, of worker
    /// `want` if given: no system call.
    fn take_warm(&self, want: Option<usize>) -> Option<u16> {
        if self.free.warm_len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let n = self.workers.len();
        let cap = self.settings.max_ports_per_worker;
        let port = {
            let mut warm = self.free.warm.lock().ok()?;
            let i = warm.iter().position(|&p| {
                let w = worker::owner(p, n);
                want.is_none_or(|want| want == w)
                    && !(cap > 0 && self.legs[w].load(Ordering::Relaxed) >= cap)
            })?;
            let port = warm.remove(i)?;
            self.free.warm_len.store(warm.len(), Ordering::Relaxed);
            port
        };
        self.legs[worker::owner(port, n)].fetch_add(1, Ordering::Relaxed);
        let mut bound = 0.0;
        for p in [Some(port), port.checked_add(1)].into_iter().flatten() {
            if let Some((_, sock)) = self.parked.remove(&p) {
                self.sockets.insert(p, sock);
                bound += 1.0;
            }
        }
        metrics::gauge!(m::RELAY_PORTS_ACTIVE).increment(bound);
        metrics::gauge!(m::RELAY_PORTS_WARM).decrement(bound);
        Some(port)
    }

    fn bridged(&self, key: FlowKey) {
        if self.bridges.insert(key) {
            metrics::gauge!(m::RELAY_FLOWS_ACTIVE).increment(1.0);
        }
    }

    /// Takes a free RTP port (and binds its RTCP port), of worker `want` if given.
    fn allocate_on(&self, want: Option<usize>) -> Result<u16, MediaError> {
        // Released ports still closing or parking are worth a short wait (on the
        // signalling thread, only when the range is otherwise full).
        let deadline = std::time::Instant::now() + RETURN_WAIT;
        let (port, w, mut rtp, rtcp, free) = loop {
            if let Some(port) = self.take_warm(want) {
                return Ok(port);
            }
            let mut free = self.free.free.lock().map_err(|_| MediaError::Unavailable)?;
            if let Some((port, w, rtp, rtcp)) = self.take_free(&mut free, want)? {
                break (port, w, rtp, rtcp, free);
            }
            let (guard, waited) = self.free.wait_returned(free, deadline);
            drop(guard);
            if !waited {
                // A port parked just before the wait was decided on.
                return self.take_warm(want).ok_or(MediaError::PortsExhausted);
            }
        };
        rtp.return_to(self.free.clone());
        drop(free);
        self.legs[w].fetch_add(1, Ordering::Relaxed);
        let rtp = Arc::new(rtp);
        self.sockets.insert(port, rtp.clone());
        self.workers[w].send(Command::AddSocket(rtp))?;
        let mut bound = 1.0;
        if let Some(rtcp) = rtcp {
            let rtcp = Arc::new(rtcp);
            self.sockets.insert(port + 1, rtcp.clone());
            self.workers[w].send(Command::AddSocket(rtcp))?;
            bound += 1.0;
        }
        metrics::gauge!(m::RELAY_PORTS_ACTIVE).increment(bound);
        Ok(port)
    }

    /// One pass over the free ports: the first one that fits, bound (with its RTCP
    /// port), and its worker; `None` if none does.
    #[allow(clippy::type_complexity)]
    fn take_free(
        &self,
        free: &mut std::collections::VecDeque<u16>,
        want: Option<usize>,
    ) -> Result<Option<(u16, usize, PortSocket, Option<PortSocket>)>, MediaError> {
        let s = &self.settings;
        let cap = s.max_ports_per_worker;
        // Ports taken by other programs, ports of workers at their cap and ports of other
        // workers than the one wanted are skipped (and put back at the end for later).
        for _ in 0..free.len() {
            let Some(port) = free.pop_front() else { break };
            let w = worker::owner(port, self.workers.len());
            if want.is_some_and(|want| want != w)
                || (cap > 0 && self.legs[w].load(Ordering::Relaxed) >= cap)
            {
                free.push_back(port);
                continue;
            }
            // Bound without a pool first: a socket dropped here must not take the lock
            // this function holds.
            let pair = PortSocket::bind(s.ip, port, s.socket_buffer, None).and_then(|rtp| {
                let rtcp = s
                    .rtcp_ports
                    .then(|| PortSocket::bind(s.ip, port + 1, s.socket_buffer, None))
                    .transpose()?;
                Ok((rtp, rtcp))
            });
            match pair {
                Ok((rtp, rtcp)) => return Ok(Some((port, w, rtp, rtcp))),
                Err(e) if is_fd_limit(&e) => {
                    // Out of descriptors, not of ports: say so rather than "exhausted".
                    free.push_front(port);
                    tracing::warn!(error = %e, "relay cannot open a socket: raise the open-file limit");
                    return Err(MediaError::Unavailable);
                }
                Err(_) => free.push_back(port),
            }
        }
        Ok(None)
    }

    /// Installs both directions of a UDP↔UDP bridge between two ports.
    fn bridge_pair(
        &self,
        caller: (u16, SocketAddr),
        callee: (u16, SocketAddr),
        stats: &Arc<FlowStats>,
        rtcp: bool,
    ) -> Result<(), MediaError> {
        let (sa, sb) = (self.socket(caller.0)?, self.socket(callee.0)?);
        self.owner(caller.0).send(Command::BridgeUdp(UdpLeg {
            port: caller.0,
            peer: caller.1,
            out: sb,
            out_peer: callee.1,
            stats: stats.clone(),
            caller_side: true,
            rtcp,
        }))?;
        self.owner(callee.0).send(Command::BridgeUdp(UdpLeg {
            port: callee.0,
            peer: callee.1,
            out: sa,
            out_peer: caller.1,
            stats: stats.clone(),
            caller_side: false,
            rtcp,
        }))
    }

    fn socket(&self, port: u16) -> Result<Arc<PortSocket>, MediaError> {
        self.sockets
            .get(&port)
            .map(|s| s.clone())
            .ok_or(MediaError::Unavailable)
    }
}

impl MediaPlane for Relay {
    fn local_ip(&self) -> IpAddr {
        self.settings.ip
    }

    fn allocate_port(&self) -> Result<u16, MediaError> {
        self.allocate_on(None)
    }

    fn allocate_port_near(&self, near: u16) -> Result<u16, MediaError> {
        match self.allocate_on(Some(worker::owner(near, self.workers.len()))) {
            Err(MediaError::PortsExhausted) => self.allocate_on(None),
            other => other,
        }
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
        self.bridge_pair(caller, callee, &stats, false)?;
        // RTCP between the ports above, when both legs have them.
        if let (Some(a), Some(b)) = (rtcp_of(caller.1), rtcp_of(callee.1))
            && self.sockets.contains_key(&(caller.0 + 1))
            && self.sockets.contains_key(&(callee.0 + 1))
        {
            self.bridge_pair((caller.0 + 1, a), (callee.0 + 1, b), &stats, true)?;
        }
        self.bridged(FlowKey::Port(caller.0));
        Ok(())
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
        let w = worker::owner(caller.0, self.workers.len());
        self.roq_owner.insert((session, flow_id), w);
        self.workers[w].send(Command::BridgeRoq {
            udp: caller,
            session,
            flow: flow_id,
            conn,
            stats,
        })?;
        self.bridged(FlowKey::Port(caller.0));
        Ok(())
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
        self.roq_owner.insert(caller, 0);
        self.roq_owner.insert(callee, 0);
        self.workers[0].send(Command::BridgeRoqRoq {
            a: (caller.0, caller.1, a),
            b: (callee.0, callee.1, b),
            stats,
        })?;
        self.bridged(FlowKey::Roq(caller.0, caller.1));
        Ok(())
    }

    fn repoint(&self, port: u16, peer: SocketAddr) -> Result<(), MediaError> {
        if !self.sockets.contains_key(&port) {
            return Err(MediaError::Unavailable);
        }
        self.owner(port).send(Command::Repoint { port, peer })?;
        if let Some(rtcp) = rtcp_of(peer)
            && self.sockets.contains_key(&(port + 1))
        {
            self.owner(port).send(Command::Repoint {
                port: port + 1,
                peer: rtcp,
            })?;
        }
        Ok(())
    }

    fn release(&self, ports: &[u16], roq: &[(SessionId, u64)]) {
        if ports.is_empty() && roq.is_empty() {
            return;
        }
        // Up to the warm cap, a call's ports stay bound for a later call; the others'
        // sockets go back to the pool when their last holder (a worker) drops them. An
        // RTCP port goes with its RTP port.
        let n = self.workers.len();
        let per_port = if self.settings.rtcp_ports { 2 } else { 1 };
        let mut room = self.warm_cap.saturating_sub(self.parked.len() / per_port);
        let mut closing = 0;
        let mut parked_rtp = Vec::new();
        for &p in ports {
            if self.sockets.contains_key(&p) {
                self.legs[worker::owner(p, n)].fetch_sub(1, Ordering::Relaxed);
                // Parked or closed, it comes back a moment later.
                closing += 1;
                if room > 0 {
                    room -= 1;
                    parked_rtp.push(p);
                }
            }
            // Here rather than on the worker: the kernel's last counts are in the call's
            // stats before it writes its CDR.
            if let Some(k) = &self.kernel {
                k.remove(p);
            }
        }
        self.free.closing(closing);
        let with_rtcp = |p: u16| [Some(p), p.checked_add(1)].into_iter().flatten();
        let all: Vec<u16> = ports
            .iter()
            .flat_map(|&p| with_rtcp(p))
            .filter(|p| self.sockets.contains_key(p))
            .collect();
        metrics::gauge!(m::RELAY_PORTS_ACTIVE).decrement(all.len() as f64);
        let unbridged = all
            .iter()
            .map(|&p| FlowKey::Port(p))
            .chain(roq.iter().map(|&(s, f)| FlowKey::Roq(s, f)))
            .filter(|k| self.bridges.remove(k).is_some())
            .count();
        if unbridged > 0 {
            metrics::gauge!(m::RELAY_FLOWS_ACTIVE).decrement(unbridged as f64);
        }
        let mut per_close: Vec<Vec<u16>> = vec![Vec::new(); n];
        let mut per_park: Vec<Vec<u16>> = vec![Vec::new(); n];
        let mut per_roq: Vec<Vec<(SessionId, u64)>> = vec![Vec::new(); n];
        let mut warmed = 0.0;
        for &p in &all {
            let Some((_, sock)) = self.sockets.remove(&p) else {
                continue;
            };
            let rtp = p - p % 2;
            let w = worker::owner(p, n);
            if parked_rtp.contains(&rtp) {
                self.parked.insert(p, sock);
                per_park[w].push(p);
                warmed += 1.0;
            } else {
                per_close[w].push(p);
            }
        }
        for &k in roq {
            let w = self.roq_owner.remove(&k).map_or(0, |(_, w)| w);
            per_roq[w].push(k);
        }
        for (w, ((ports, park), roq)) in
            per_close.into_iter().zip(per_park).zip(per_roq).enumerate()
        {
            if !ports.is_empty() || !park.is_empty() || !roq.is_empty() {
                let _ = self.workers[w].send(Command::Release { ports, park, roq });
            }
        }
        // The workers offer parked ports to new calls once they have reset and drained
        // them (`PortPool::give_back_warm`).
        if warmed > 0.0 {
            metrics::gauge!(m::RELAY_PORTS_WARM).increment(warmed);
        }
    }
}

/// The most RTP ports kept warm: `warm_ports`, within a quarter of the descriptors the
/// process may open (the rest are for calls' ports in use, devices, SIP connections and
/// the store), logged when that lowers it.
fn warm_cap(s: &RelaySettings) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let per_port = if s.rtcp_ports { 2 } else { 1 };
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return s.warm_ports;
    };
    let budget = usize::try_from(soft / 4).unwrap_or(usize::MAX) / per_port;
    if budget < s.warm_ports {
        tracing::info!(
            warm_ports = s.warm_ports,
            kept = budget,
            open_file_limit = soft,
            "relay keeps fewer free ports bound than [relay] warm_ports: the open-file limit is low"
        );
    }
    s.warm_ports.min(budget)
}

/// The process (EMFILE) or system (ENFILE) is out of file descriptors.
fn is_fd_limit(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(e.raw_os_error(), Some(c) if c == Errno::EMFILE as i32 || c == Errno::ENFILE as i32)
}

#[cfg(test)]
mod tests;
