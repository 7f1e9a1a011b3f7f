//! The relay worker loop.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use metrics::Counter;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use parley_actors::messages::{FlowStats, SessionId};
use parley_codecs::{roq, rtp::RtpView};

use super::Command;
use crate::metrics as m;

const WAKER: Token = Token(usize::MAX);
/// Packets read from one socket per wake-up: bounds the time one busy flow can hold the
/// loop, so every ready socket gets served each turn.
const BATCH: usize = 32;
const MAX_PACKET: usize = 2048;

/// Where packets arriving on a port go.
enum Target {
    /// Not bridged yet: drop.
    None,
    /// Out of another relay port, to that port's peer.
    Udp(u16),
    /// Into a RoQ flow on a device connection.
    Roq { conn: quinn::Connection, flow: u64 },
}

/// Where a RoQ datagram from a device flow goes.
enum RoqRoute {
    /// Out of a relay port, to its peer.
    Udp(u16),
    /// To another device's flow.
    Roq {
        conn: quinn::Connection,
        flow: u64,
        stats: Arc<FlowStats>,
        caller_side: bool,
    },
}

struct Port {
    socket: UdpSocket,
    /// Where signalling says the peer receives.
    peer: Option<SocketAddr>,
    /// The first source seen; later packets from other sources are dropped.
    latched: Option<SocketAddr>,
    target: Target,
    stats: Option<Arc<FlowStats>>,
    /// True for the caller-side port (counts into `caller_to_callee`).
    caller_side: bool,
}

impl Port {
    fn dest(&self) -> Option<SocketAddr> {
        self.latched.or(self.peer)
    }
}

struct Counters {
    udp_udp: (Counter, Counter),
    udp_roq: (Counter, Counter),
    roq_udp: (Counter, Counter),
    roq_roq: (Counter, Counter),
    no_flow: Counter,
    wrong_source: Counter,
    malformed: Counter,
    send_error: Counter,
}

#[derive(Default)]
struct Tally {
    udp_udp: (u64, u64),
    udp_roq: (u64, u64),
    roq_udp: (u64, u64),
    roq_roq: (u64, u64),
    no_flow: u64,
    wrong_source: u64,
    malformed: u64,
    send_error: u64,
}

pub(super) struct Worker {
    poll: Poll,
    rx: mpsc::Receiver<Command>,
    free: Arc<Mutex<VecDeque<u16>>>,
    ports: HashMap<u16, Port>,
    roq: HashMap<(SessionId, u64), RoqRoute>,
    buf: Vec<u8>,
    out: BytesMut,
    counters: Counters,
    tally: Tally,
}

impl Worker {
    pub(super) fn new(
        rx: mpsc::Receiver<Command>,
        free: Arc<Mutex<VecDeque<u16>>>,
    ) -> std::io::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let path = |p: &'static str| {
            (
                metrics::counter!(m::RELAY_PACKETS_TOTAL, "path" => p),
                metrics::counter!(m::RELAY_BYTES_TOTAL, "path" => p),
            )
        };
        let drop = |r: &'static str| metrics::counter!(m::RELAY_DROPS_TOTAL, "reason" => r);
        let counters = Counters {
            udp_udp: path("udp_udp"),
            udp_roq: path("udp_roq"),
            roq_udp: path("roq_udp"),
            roq_roq: path("roq_roq"),
            no_flow: drop("no_flow"),
            wrong_source: drop("wrong_source"),
            malformed: drop("malformed"),
            send_error: drop("send_error"),
        };
        let worker = Self {
            poll,
            rx,
            free,
            ports: HashMap::new(),
            roq: HashMap::new(),
            buf: vec![0; MAX_PACKET],
            out: BytesMut::with_capacity(64 * 1024),
            counters,
            tally: Tally::default(),
        };
        Ok((worker, waker))
    }

    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(200)))
            {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "relay poll failed; relay stopping");
                return;
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                self.drain_socket(ev.token().0 as u16);
            }
            // Commands after sockets: a Release that raced with queued packets wins anyway,
            // because released ports are gone from the table before the next poll.
            if !self.handle_commands() {
                return;
            }
            self.flush_counters();
        }
    }

    fn handle_commands(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::AddSocket { port, socket } => {
                    let mut socket = UdpSocket::from_std(socket);
                    if let Err(e) = self.poll.registry().register(
                        &mut socket,
                        Token(usize::from(port)),
                        Interest::READABLE,
                    ) {
                        tracing::error!(port, error = %e, "cannot register relay socket");
                        continue;
                    }
                    self.ports.insert(
                        port,
                        Port {
                            socket,
                            peer: None,
                            latched: None,
                            target: Target::None,
                            stats: None,
                            caller_side: true,
                        },
                    );
                }
                Command::BridgeUdp { a, b, stats } => {
                    self.bridge(a, Target::Udp(b.0), &stats, true);
                    self.bridge(b, Target::Udp(a.0), &stats, false);
                }
                Command::BridgeRoq {
                    udp,
                    session,
                    flow,
                    conn,
                    stats,
                } => {
                    self.bridge(udp, Target::Roq { conn, flow }, &stats, true);
                    self.roq.insert((session, flow), RoqRoute::Udp(udp.0));
                }
                Command::BridgeRoqRoq { a, b, stats } => {
                    self.roq.insert(
                        (a.0, a.1),
                        RoqRoute::Roq {
                            conn: b.2,
                            flow: b.1,
                            stats: stats.clone(),
                            caller_side: true,
                        },
                    );
                    self.roq.insert(
                        (b.0, b.1),
                        RoqRoute::Roq {
                            conn: a.2,
                            flow: a.1,
                            stats,
                            caller_side: false,
                        },
                    );
                }
                Command::Release { ports, roq } => {
                    for p in &ports {
                        if let Some(mut port) = self.ports.remove(p) {
                            let _ = self.poll.registry().deregister(&mut port.socket);
                        }
                    }
                    // Sockets are closed (dropped) now: the ports may be bound again.
                    if let Ok(mut free) = self.free.lock() {
                        free.extend(ports);
                    }
                    for k in roq {
                        self.roq.remove(&k);
                    }
                }
                Command::RoqIn {
                    session,
                    flow,
                    packet,
                } => self.forward_roq(session, flow, &packet),
                Command::Stop => return false,
            }
        }
        true
    }

    fn bridge(
        &mut self,
        (port, peer): (u16, SocketAddr),
        target: Target,
        stats: &Arc<FlowStats>,
        caller_side: bool,
    ) {
        if let Some(p) = self.ports.get_mut(&port) {
            p.peer = Some(peer);
            p.target = target;
            p.stats = Some(stats.clone());
            p.caller_side = caller_side;
        }
    }

    fn drain_socket(&mut self, port: u16) {
        for _ in 0..BATCH {
            let Some(p) = self.ports.get_mut(&port) else {
                return;
            };
            let (len, src) = match p.socket.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => continue,
            };
            if matches!(p.target, Target::None) {
                self.tally.no_flow += 1;
                continue;
            }
            match p.latched {
                None => p.latched = Some(src),
                Some(l) if l != src => {
                    self.tally.wrong_source += 1;
                    continue;
                }
                Some(_) => {}
            }
            let pkt = &self.buf[..len];
            if RtpView::parse(pkt).is_err() {
                self.tally.malformed += 1;
                continue;
            }
            if let Some(s) = &p.stats {
                let c = if p.caller_side {
                    &s.caller_to_callee
                } else {
                    &s.callee_to_caller
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
            match &p.target {
                Target::None => {}
                Target::Roq { conn, flow } => {
                    roq::encode(*flow, pkt, &mut self.out);
                    let datagram = self.out.split().freeze();
                    if conn.send_datagram(datagram).is_ok() {
                        self.tally.udp_roq.0 += 1;
                        self.tally.udp_roq.1 += len as u64;
                    } else {
                        self.tally.send_error += 1;
                    }
                    if self.out.capacity() < MAX_PACKET {
                        self.out.reserve(64 * 1024);
                    }
                }
                Target::Udp(other) => {
                    let other = *other;
                    let Some(o) = self.ports.get(&other) else {
                        self.tally.no_flow += 1;
                        continue;
                    };
                    let sent = o.dest().map(|d| o.socket.send_to(&self.buf[..len], d));
                    match sent {
                        Some(Ok(_)) => {
                            self.tally.udp_udp.0 += 1;
                            self.tally.udp_udp.1 += len as u64;
                        }
                        _ => self.tally.send_error += 1,
                    }
                }
            }
        }
    }

    fn forward_roq(&mut self, session: SessionId, flow: u64, packet: &[u8]) {
        let Some(route) = self.roq.get(&(session, flow)) else {
            self.tally.no_flow += 1;
            return;
        };
        if RtpView::parse(packet).is_err() {
            self.tally.malformed += 1;
            return;
        }
        match route {
            RoqRoute::Udp(port) => {
                let Some(p) = self.ports.get(port) else {
                    self.tally.no_flow += 1;
                    return;
                };
                if let Some(s) = &p.stats {
                    s.callee_to_caller.fetch_add(1, Ordering::Relaxed);
                }
                match p.dest().map(|d| p.socket.send_to(packet, d)) {
                    Some(Ok(_)) => {
                        self.tally.roq_udp.0 += 1;
                        self.tally.roq_udp.1 += packet.len() as u64;
                    }
                    _ => self.tally.send_error += 1,
                }
            }
            RoqRoute::Roq {
                conn,
                flow,
                stats,
                caller_side,
            } => {
                let c = if *caller_side {
                    &stats.caller_to_callee
                } else {
                    &stats.callee_to_caller
                };
                c.fetch_add(1, Ordering::Relaxed);
                roq::encode(*flow, packet, &mut self.out);
                let datagram = self.out.split().freeze();
                if conn.send_datagram(datagram).is_ok() {
                    self.tally.roq_roq.0 += 1;
                    self.tally.roq_roq.1 += packet.len() as u64;
                } else {
                    self.tally.send_error += 1;
                }
                if self.out.capacity() < MAX_PACKET {
                    self.out.reserve(64 * 1024);
                }
            }
        }
    }

    fn flush_counters(&mut self) {
        let t = std::mem::take(&mut self.tally);
        let c = &self.counters;
        for ((pk, by), (n, b)) in [
            (&c.udp_udp, t.udp_udp),
            (&c.udp_roq, t.udp_roq),
            (&c.roq_udp, t.roq_udp),
            (&c.roq_roq, t.roq_roq),
        ] {
            if n > 0 {
                pk.increment(n);
                by.increment(b);
            }
        }
        for (ctr, n) in [
            (&c.no_flow, t.no_flow),
            (&c.wrong_source, t.wrong_source),
            (&c.malformed, t.malformed),
            (&c.send_error, t.send_error),
        ] {
            if n > 0 {
                ctr.increment(n);
            }
        }
    }
}
