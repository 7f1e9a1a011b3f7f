//! One relay worker: a mio poll loop over the sockets of its port shard.

use std::collections::HashMap;
use std::io::{ErrorKind, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use metrics::Counter;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use parley_actors::messages::{FlowStats, SessionId};
use parley_codecs::{
    roq,
    rtp::{Continuity, Kind, RtpView},
};
use quinn::udp::{RecvMeta, Transmit};

use super::kernel::{KernelFlows, Mapping};
use super::socket::PortSocket;
use super::{Command, DeviceConn, RoqDatagram, UdpLeg, WorkerHandle};
use crate::metrics as m;

pub(super) const WAKER: Token = Token(usize::MAX);
/// Datagrams read from one socket per `recvmmsg`, and per socket per loop turn: bounds
/// the time one busy flow can hold the loop, so every ready socket is served each turn.
/// A socket that filled a whole batch is read again next turn (it may have more queued
/// and, with edge-triggered epoll, would get no new event for it).
const BATCH: usize = quinn::udp::BATCH_SIZE;
/// Largest RTP/RTCP packet relayed.
const MAX_PACKET: usize = 2048;
/// Receive buffer per batch entry: with GRO the kernel may hand over up to 64 datagrams
/// of one sender coalesced into one buffer (`RecvMeta::stride` apart).
const SLOT: usize = 64 * 1024;
/// Datagrams coalesced into one GSO send (Linux allows 64).
const MAX_GSO: usize = 32;
/// One batch in this many has its forwarding time recorded.
const LATENCY_SAMPLE: u64 = 64;

/// Batches at most read and dropped from a port as it is parked (a socket's default
/// receive buffer holds far fewer).
const PARK_DRAIN_BATCHES: usize = 64;

/// The worker that owns `port`: an RTP port and its RTCP port (+ 1) share one.
pub(super) fn owner(port: u16, workers: usize) -> usize {
    usize::from(port / 2) % workers.max(1)
}

/// Where packets arriving on a port go.
enum Target {
    /// Not bridged yet: drop.
    None,
    /// Out of the bridged port `partner`'s socket, to its peer (latched, else signalled).
    Udp {
        partner: u16,
        out: Arc<PortSocket>,
        dest: SocketAddr,
    },
    /// Into a RoQ flow on a device connection.
    Roq { conn: DeviceConn, flow: u64 },
}

/// Where a RoQ datagram from a device flow goes.
enum RoqRoute {
    /// Out of a relay port of this worker, to its peer; the stream toward it kept
    /// continuous across changes of the device's source.
    Udp { port: u16, cont: Continuity },
    /// To another device's flow.
    Roq {
        conn: DeviceConn,
        flow: u64,
        stats: Arc<FlowStats>,
        caller_side: bool,
    },
}

struct Port {
    sock: Arc<PortSocket>,
    /// Where signalling says the peer receives.
    peer: Option<SocketAddr>,
    /// The first source seen; later packets from other sources are dropped.
    latched: Option<SocketAddr>,
    /// The source latched before the last signalled change: never latched again (its
    /// packets still in flight must not win the new latch).
    stale: Option<SocketAddr>,
    /// Latch the first source whatever its address (peers behind NAT), rather than only
    /// one with the signalled IP address.
    latch_any: bool,
    /// Keeps the stream relayed out of this port's packets continuous (SSRC, sequence,
    /// timestamp) when their source changes.
    cont: Continuity,
    target: Target,
    stats: Option<Arc<FlowStats>>,
    /// True for the caller-side port (counts into `caller_to_callee`).
    caller_side: bool,
    /// The flow last handed to the kernel fast path, and whether it took it.
    kernel: Option<(KernelFlow, bool)>,
}

/// What the kernel fast path needs to forward a port's packets: the latched source, the
/// bridged port and the address it sends to, the stream's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KernelFlow {
    src: SocketAddrV4,
    partner: u16,
    dest: SocketAddrV4,
    map: Mapping,
}

impl Port {
    fn dest(&self) -> Option<SocketAddr> {
        self.latched.or(self.peer)
    }

    /// The flow the kernel may forward for this port: an RTP port (RTCP on its own port
    /// stays in userspace) bridged to a UDP port, its IPv4 peer latched, its stream seen.
    fn kernel_flow(&self) -> Option<KernelFlow> {
        self.stats.as_ref()?;
        let Target::Udp {
            partner,
            dest: SocketAddr::V4(dest),
            ..
        } = self.target
        else {
            return None;
        };
        let Some(SocketAddr::V4(src)) = self.latched else {
            return None;
        };
        Some(KernelFlow {
            src,
            partner,
            dest,
            map: self.cont.mapping()?,
        })
    }

    /// Whether the kernel forwards this port's flow now.
    fn in_kernel(&self) -> bool {
        matches!(self.kernel, Some((_, true)))
    }

    /// Whether a packet from `src` may fix this port's source: the signalled IP address
    /// (any port: the peer may send from another port than it receives on), unless the
    /// port latches any source or signalling gave no usable address.
    fn may_latch(&self, src: SocketAddr) -> bool {
        if self.stale == Some(src) {
            return false;
        }
        match self.peer {
            Some(peer) if !self.latch_any && !peer.ip().is_unspecified() => peer.ip() == src.ip(),
            _ => true,
        }
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
    queue_full: Counter,
    batch_size: metrics::Histogram,
    forward_seconds: metrics::Histogram,
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
    queue_full: u64,
}

/// Receive-side scratch, reused for every batch (no allocation per packet).
struct RecvScratch {
    buf: Vec<u8>,
    meta: [RecvMeta; BATCH],
    /// Accepted datagrams of the current batch: (offset in `buf`, length).
    segs: Vec<(usize, usize)>,
    /// Contiguous copy of equal-sized datagrams for one GSO send.
    gso: Vec<u8>,
    /// A device datagram's RTP packet, copied to be rewritten.
    roq_pkt: Vec<u8>,
}

/// What a worker is started with.
pub(super) struct WorkerSetup {
    /// Its index among the workers (port pairs with `(p / 2) % workers == index`).
    pub index: usize,
    /// Its poll, whose registry the waker was made with.
    pub poll: Poll,
    /// Control commands.
    pub rx: mpsc::Receiver<Command>,
    /// Device datagrams (bounded).
    pub media_rx: mpsc::Receiver<RoqDatagram>,
    /// All workers' inboxes (for latching across workers), its own included.
    pub peers: Arc<[WorkerHandle]>,
    /// Interrupt moderation (`RelaySettings::coalesce`).
    pub coalesce: Duration,
    /// `RelaySettings::latch_any_source`.
    pub latch_any: bool,
    /// The kernel fast path, when loaded.
    pub kernel: Option<Arc<KernelFlows>>,
}

pub(super) struct Worker {
    index: usize,
    poll: Poll,
    rx: mpsc::Receiver<Command>,
    media_rx: mpsc::Receiver<RoqDatagram>,
    peers: Arc<[WorkerHandle]>,
    ports: HashMap<u16, Port>,
    roq: HashMap<(SessionId, u64), RoqRoute>,
    scratch: RecvScratch,
    /// Sockets that filled a whole batch: read again next turn.
    again: Vec<u16>,
    /// Reads this turn per batch size (index: datagrams returned).
    batches: [u64; BATCH + 1],
    out: BytesMut,
    counters: Counters,
    tally: Tally,
    coalesce: Duration,
    /// See `Port::latch_any`.
    latch_any: bool,
    /// Batches read so far (for latency sampling).
    batches_read: u64,
    kernel: Option<Arc<KernelFlows>>,
}

impl Worker {
    pub(super) fn new(setup: WorkerSetup) -> Self {
        let WorkerSetup {
            index,
            poll,
            rx,
            media_rx,
            peers,
            coalesce,
            latch_any,
            kernel,
        } = setup;
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
            queue_full: drop("queue_full"),
            batch_size: metrics::histogram!(m::RELAY_BATCH_SIZE),
            forward_seconds: metrics::histogram!(m::RELAY_FORWARD_SECONDS),
        };
        Self {
            index,
            poll,
            rx,
            media_rx,
            peers,
            ports: HashMap::new(),
            roq: HashMap::new(),
            scratch: RecvScratch {
                buf: vec![0; BATCH * SLOT],
                meta: [RecvMeta::default(); BATCH],
                segs: Vec::with_capacity(BATCH * 64),
                gso: vec![0; MAX_GSO * MAX_PACKET],
                roq_pkt: Vec::with_capacity(MAX_PACKET),
            },
            again: Vec::new(),
            batches: [0; BATCH + 1],
            out: BytesMut::with_capacity(64 * 1024),
            counters,
            tally: Tally::default(),
            coalesce,
            latch_any,
            batches_read: 0,
            kernel,
        }
    }

    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut turn_start = Instant::now();
        let mut busy = false;
        loop {
            // Interrupt moderation: while packets flow, read at most once per `coalesce`.
            // A worker asleep here is not woken by each arriving packet (epoll only queues
            // the event), which saves a context switch per packet on both sides; the next
            // poll returns everything that arrived meanwhile. An idle worker blocks in
            // `poll` and serves the first packet at once.
            if busy && !self.coalesce.is_zero() {
                let since = turn_start.elapsed();
                if since < self.coalesce {
                    std::thread::sleep(self.coalesce - since);
                }
            }
            turn_start = Instant::now();
            let timeout = if self.again.is_empty() {
                Duration::from_millis(200)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(worker = self.index, error = %e, "relay poll failed; worker stopping");
                return;
            }
            busy = !events.is_empty();
            // Commands first: a bridge queued before a packet arrived (the 200 OK goes out
            // after the bridge command) must be in place before that packet is read, or the
            // call's first packets would be dropped as `no_flow`.
            if !self.handle_commands() {
                return;
            }
            let again = std::mem::take(&mut self.again);
            for port in again {
                self.drain_socket(port);
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                // Tokens are ports (registered in `add_socket`), so this never truncates.
                self.drain_socket(ev.token().0 as u16);
            }
            self.flush_counters();
        }
    }

    fn handle_commands(&mut self) -> bool {
        // From here on a sender wakes us again (see `WorkerHandle::wake`).
        self.peers[self.index]
            .pending
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        if !self.handle_control() {
            return false;
        }
        // Device datagrams after the commands queued before them (a bridge first).
        while let Ok(d) = self.media_rx.try_recv() {
            self.forward_roq(d.session, d.flow, &d.packet);
        }
        true
    }

    fn handle_control(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::AddSocket(sock) => self.add_socket(sock),
                Command::BridgeUdp(leg) => self.bridge_udp(leg),
                Command::Repoint { port, peer } => self.repoint(port, peer),
                Command::Latched { port, of, src } => {
                    if let Some(Port {
                        target: Target::Udp { partner, dest, .. },
                        ..
                    }) = self.ports.get_mut(&port)
                        && *partner == of
                    {
                        *dest = src;
                        self.sync_kernel(port);
                    }
                }
                Command::BridgeRoq {
                    udp: (port, peer),
                    session,
                    flow,
                    conn,
                    stats,
                } => {
                    if let Some(p) = self.ports.get_mut(&port) {
                        p.peer = Some(peer);
                        p.target = Target::Roq {
                            conn: conn.clone(),
                            flow,
                        };
                        p.stats = Some(stats);
                        p.caller_side = true;
                    }
                    // RTCP from the port above joins the device's flow (multiplexed there).
                    if let (Some(p), Some(rtcp_peer)) =
                        (self.ports.get_mut(&(port + 1)), super::rtcp_of(peer))
                    {
                        p.peer = Some(rtcp_peer);
                        p.target = Target::Roq { conn, flow };
                    }
                    self.roq.insert(
                        (session, flow),
                        RoqRoute::Udp {
                            port,
                            cont: Continuity::default(),
                        },
                    );
                    self.sync_kernel(port);
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
                Command::Release { ports, park, roq } => {
                    for p in ports.iter().chain(&park) {
                        // The control plane took the flow out already; one a batch
                        // installed since is taken out here.
                        if let Some(k) = &self.kernel {
                            k.remove(*p);
                        }
                    }
                    for p in &ports {
                        if let Some(port) = self.ports.remove(p) {
                            let fd = port.sock.socket().as_raw_fd();
                            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                        }
                    }
                    // The sockets close (and their ports return to the pool) as the last
                    // holder drops them: here, or on the bridged port's worker.
                    // Reset and drained (an RTP port with its RTCP port), a port is
                    // offered to new calls: none of its new call's packets can arrive
                    // before that and be taken for the last call's.
                    for &p in &park {
                        self.park(p);
                    }
                    for p in park {
                        if let Some(pool) = self.ports.get(&p).and_then(|p| p.sock.pool()) {
                            pool.give_back_warm(p);
                        }
                    }
                    for k in roq {
                        self.roq.remove(&k);
                    }
                }
                Command::Stop => return false,
            }
        }
        true
    }

    /// `port`'s call ended but its socket stays bound and registered for a later call
    /// (`RelaySettings::warm_ports`): its flow state is reset as if just added, and what
    /// is queued on it is read and dropped (`no_flow`), so the next call neither gets
    /// the last call's packets nor latches their source. Until the next bridge, what
    /// arrives is dropped the same way (no target).
    fn park(&mut self, port: u16) {
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        p.peer = None;
        p.latched = None;
        p.stale = None;
        p.latch_any = self.latch_any;
        p.cont = Continuity::default();
        p.target = Target::None;
        p.stats = None;
        p.caller_side = true;
        p.kernel = None;
        // Commands queued after this one (the port's next call) are handled before the
        // `again` list: read to the end here, not a batch per turn.
        for _ in 0..PARK_DRAIN_BATCHES {
            let queued = self.again.len();
            self.drain_socket(port);
            if self.again.len() == queued {
                return;
            }
            self.again.truncate(queued);
        }
    }

    fn add_socket(&mut self, sock: Arc<PortSocket>) {
        let port = sock.port();
        let fd = sock.socket().as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(usize::from(port)),
            Interest::READABLE,
        ) {
            tracing::error!(port, error = %e, "cannot register relay socket");
            return;
        }
        self.ports.insert(
            port,
            Port {
                sock,
                peer: None,
                latched: None,
                stale: None,
                latch_any: self.latch_any,
                cont: Continuity::default(),
                target: Target::None,
                stats: None,
                caller_side: true,
                kernel: None,
            },
        );
    }

    fn bridge_udp(&mut self, leg: UdpLeg) {
        if let Some(p) = self.ports.get_mut(&leg.port) {
            p.peer = Some(leg.peer);
            p.target = Target::Udp {
                partner: leg.out.port(),
                out: leg.out,
                dest: leg.out_peer,
            };
            p.stats = (!leg.rtcp).then_some(leg.stats);
            p.caller_side = leg.caller_side;
        }
        self.sync_kernel(leg.port);
    }

    /// Hands `port`'s flow to the kernel fast path, changes it there, or takes it back, as
    /// the port's state now asks ([`Port::kernel_flow`]). Taken back, the stream goes on
    /// from where the kernel left it.
    fn sync_kernel(&mut self, port: u16) {
        let Some(k) = &self.kernel else { return };
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        let want = p.kernel_flow();
        if want == p.kernel.map(|(f, _)| f) {
            return; // as installed, or as refused (not retried until it changes)
        }
        let was_in = p.in_kernel();
        p.kernel = None;
        match want {
            Some(f) => {
                let taken = k.install(
                    port,
                    f.src,
                    (f.partner, f.dest),
                    f.map,
                    p.stats.clone(),
                    p.caller_side,
                );
                if let Err(e) = &taken {
                    // (An old flow of the port is out of the kernel too.)
                    tracing::warn!(port, error = %e, "the kernel fast path did not take a flow; it is relayed in userspace");
                }
                p.kernel = Some((f, taken.is_ok()));
            }
            None if was_in => {
                if let Some(pos) = k.remove(port) {
                    p.cont.caught_up(pos.ssrc, pos.seq, pos.ts, Instant::now());
                }
            }
            None => {}
        }
    }

    /// Signalling moved `port`'s peer (re-INVITE): latch afresh (never onto the old source
    /// again), and send toward the new address from the bridged side until it latches.
    fn repoint(&mut self, port: u16, peer: SocketAddr) {
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        if p.peer == Some(peer) {
            return; // a session refresh or hold/resume: same media address, same latch
        }
        p.peer = Some(peer);
        if let Some(old) = p.latched.take() {
            p.stale = Some(old);
        }
        // Unlatched: the kernel hands the port back until it latches the new peer.
        self.sync_kernel(port);
        self.tell_partner(port, peer);
    }

    /// Reads one batch from `port`'s socket and forwards it.
    fn drain_socket(&mut self, port: u16) {
        // A pending ICMP error is reported by the next read: retry a few times.
        for _ in 0..4 {
            // RTCP on the port above an RTP port follows that stream's SSRC mapping.
            let rtcp_map = (port % 2 == 1)
                .then(|| self.ports.get(&(port - 1)))
                .flatten()
                .and_then(|rtp| rtp.cont.ssrc_map());
            let Some(p) = self.ports.get_mut(&port) else {
                return;
            };
            // The kernel forwarded this stream meanwhile: a new source in this batch
            // follows on from where it left the stream.
            if let Some(k) = self.kernel.as_ref().filter(|_| p.in_kernel())
                && let Some(pos) = k.position(port)
            {
                p.cont.caught_up(pos.ssrc, pos.seq, pos.ts, Instant::now());
            }
            let s = &mut self.scratch;
            let n = {
                let mut slots = s.buf.chunks_mut(SLOT);
                let mut iovs: [IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                    // Cannot fail: `buf` holds exactly BATCH slots.
                    IoSliceMut::new(slots.next().expect("BATCH slots"))
                });
                match p
                    .sock
                    .state()
                    .recv(p.sock.socket().into(), &mut iovs, &mut s.meta)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(_) => continue,
                }
            };
            self.batches[n.min(BATCH)] += 1;
            self.batches_read += 1;
            let read_at = Instant::now();
            let latched_now = forward_batch(p, s, n, (read_at, rtcp_map), &mut self.tally);
            if self.batches_read.is_multiple_of(LATENCY_SAMPLE) {
                self.counters
                    .forward_seconds
                    .record(read_at.elapsed().as_secs_f64());
            }
            if let Some(src) = latched_now {
                self.tell_partner(port, src);
            }
            // Latched, or a new source mapped: the kernel may take (or follow) the flow.
            self.sync_kernel(port);
            if n == BATCH {
                self.again.push(port);
            }
            // Fewer than a batch means the queue was empty when read; a datagram arriving
            // after that raises a new edge-triggered event.
            return;
        }
        self.again.push(port);
    }

    /// `port` latched `src`: the bridged port now sends there.
    fn tell_partner(&mut self, port: u16, src: SocketAddr) {
        let Some(Port {
            target: Target::Udp { partner, .. },
            ..
        }) = self.ports.get(&port)
        else {
            return;
        };
        let partner = *partner;
        let w = owner(partner, self.peers.len());
        if w == self.index {
            if let Some(Port {
                target: Target::Udp {
                    partner: of, dest, ..
                },
                ..
            }) = self.ports.get_mut(&partner)
                && *of == port
            {
                *dest = src;
                self.sync_kernel(partner);
            }
        } else {
            let _ = self.peers[w].send(Command::Latched {
                port: partner,
                of: port,
                src,
            });
        }
    }

    fn forward_roq(&mut self, session: SessionId, flow: u64, packet: &[u8]) {
        let Some(route) = self.roq.get_mut(&(session, flow)) else {
            self.tally.no_flow += 1;
            return;
        };
        let Ok(view) = RtpView::parse(packet) else {
            self.tally.malformed += 1;
            return;
        };
        let is_rtcp = view.kind() == Kind::Rtcp;
        match route {
            RoqRoute::Udp { port, cont } => {
                let Some(p) = self.ports.get(port) else {
                    self.tally.no_flow += 1;
                    return;
                };
                if let Some(s) = &p.stats
                    && !s.count(false, 1)
                {
                    // The call is over (its CDR has its counts).
                    self.tally.no_flow += 1;
                    return;
                }
                // RTCP leaves from the RTCP port when the leg has one (the peer does not
                // multiplex), else multiplexed on the RTP port.
                let p = match is_rtcp.then(|| port.checked_add(1)).flatten() {
                    Some(rtcp) => self.ports.get(&rtcp).unwrap_or(p),
                    None => p,
                };
                let pkt = &mut self.scratch.roq_pkt;
                pkt.clear();
                pkt.extend_from_slice(packet);
                // Validated above; this only maps the packet onto the stream.
                let _ = cont.apply(pkt, Instant::now());
                match p.dest().map(|d| p.sock.socket().send_to(pkt, d)) {
                    Some(Ok(_)) => {
                        self.tally.roq_udp.0 += 1;
                        self.tally.roq_udp.1 += packet.len() as u64;
                    }
                    Some(Err(e)) if is_queue_full(&e) => self.tally.queue_full += 1,
                    _ => self.tally.send_error += 1,
                }
            }
            RoqRoute::Roq {
                conn,
                flow,
                stats,
                caller_side,
            } => {
                if !stats.count(*caller_side, 1) {
                    self.tally.no_flow += 1;
                    return;
                }
                roq::encode(*flow, packet, &mut self.out);
                let datagram = self.out.split().freeze();
                if datagram.len() > conn.datagram_send_buffer_space() {
                    // quinn would make room by dropping older datagrams, unseen: drop
                    // this one instead, and count it.
                    self.tally.queue_full += 1;
                } else if conn.send_datagram(datagram).is_ok() {
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
        for (size, n) in self.batches.iter_mut().enumerate().skip(1) {
            if *n > 0 {
                c.batch_size.record_many(size as f64, *n as usize);
                *n = 0;
            }
        }
        for (ctr, n) in [
            (&c.no_flow, t.no_flow),
            (&c.wrong_source, t.wrong_source),
            (&c.malformed, t.malformed),
            (&c.send_error, t.send_error),
            (&c.queue_full, t.queue_full),
        ] {
            if n > 0 {
                ctr.increment(n);
            }
        }
    }
}

/// Checks and forwards the `n` buffers just read on `p`. Returns the source if this batch
/// latched the port.
fn forward_batch(
    p: &mut Port,
    s: &mut RecvScratch,
    n: usize,
    (now, rtcp_map): (Instant, Option<(u32, u32)>),
    tally: &mut Tally,
) -> Option<SocketAddr> {
    if matches!(p.target, Target::None) {
        tally.no_flow += s.meta[..n]
            .iter()
            .map(|m| m.len.div_ceil(m.stride.max(1)) as u64)
            .sum::<u64>();
        return None;
    }
    let mut latched_now = None;
    s.segs.clear();
    for (i, meta) in s.meta[..n].iter().enumerate() {
        let stride = meta.stride.max(1);
        let count = meta.len.div_ceil(stride) as u64;
        match p.latched {
            None if !p.may_latch(meta.addr) => {
                tally.wrong_source += count;
                continue;
            }
            None => {
                p.latched = Some(meta.addr);
                latched_now = Some(meta.addr);
            }
            Some(l) if l != meta.addr => {
                tally.wrong_source += count;
                continue;
            }
            Some(_) => {}
        }
        let base = i * SLOT;
        let mut off = 0;
        while off < meta.len {
            let len = stride.min(meta.len - off);
            let start = base + off;
            off += len;
            let pkt = &mut s.buf[start..start + len];
            // One pass: validated as RTP/RTCP and mapped onto the outgoing stream.
            if len > MAX_PACKET || p.cont.apply(pkt, now).is_err() {
                tally.malformed += 1;
                continue;
            }
            if let Some(map) = rtcp_map {
                parley_codecs::rtp::rewrite_rtcp_ssrc(pkt, map);
            }
            s.segs.push((start, len));
        }
    }
    if s.segs.is_empty() {
        return latched_now;
    }
    if let Some(st) = &p.stats
        && !st.count(p.caller_side, s.segs.len() as u64)
    {
        // The call is over (its CDR has its counts): nothing more of it is relayed.
        tally.no_flow += s.segs.len() as u64;
        s.segs.clear();
        return latched_now;
    }
    match &p.target {
        Target::None => {}
        Target::Udp { out, dest, .. } => send_udp(out, *dest, s, tally),
        Target::Roq { conn, flow } => {
            // quinn takes each datagram as `Bytes`: one small allocation per packet here is
            // inherent to `send_datagram`.
            let mut buf = BytesMut::with_capacity(s.segs.len() * (MAX_PACKET / 8));
            // The device connection's datagram queue (quinn would drop older datagrams to
            // make room, unseen): what does not fit is dropped here and counted.
            let mut space = conn.datagram_send_buffer_space();
            for &(start, len) in &s.segs {
                roq::encode(*flow, &s.buf[start..start + len], &mut buf);
                let datagram = buf.split().freeze();
                if datagram.len() > space {
                    tally.queue_full += 1;
                    continue;
                }
                space -= datagram.len();
                if conn.send_datagram(datagram).is_ok() {
                    tally.udp_roq.0 += 1;
                    tally.udp_roq.1 += len as u64;
                } else {
                    tally.send_error += 1;
                }
            }
        }
    }
    latched_now
}

/// The socket's send queue is full (`EAGAIN`/`ENOBUFS`): the packet is dropped.
fn is_queue_full(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32)
}

/// Sends the accepted datagrams of a batch out of `out` to `dest`: runs of equal-sized
/// datagrams as one GSO `sendmsg`, a lone datagram with `sendto` straight from the
/// receive buffer.
fn send_udp(out: &PortSocket, dest: SocketAddr, s: &mut RecvScratch, tally: &mut Tally) {
    let max_gso = out.state().max_gso_segments().min(MAX_GSO);
    let mut i = 0;
    while i < s.segs.len() {
        let (start, len) = s.segs[i];
        let mut run = 1;
        while run < max_gso && i + run < s.segs.len() && s.segs[i + run].1 == len {
            run += 1;
        }
        let sent = if run == 1 {
            out.socket()
                .send_to(&s.buf[start..start + len], dest)
                .map(drop)
        } else {
            let mut at = 0;
            for &(st, l) in &s.segs[i..i + run] {
                s.gso[at..at + l].copy_from_slice(&s.buf[st..st + l]);
                at += l;
            }
            out.state().try_send(
                out.socket().into(),
                &Transmit {
                    destination: dest,
                    ecn: None,
                    contents: &s.gso[..at],
                    segment_size: Some(len),
                    src_ip: None,
                },
            )
        };
        match sent {
            Ok(()) => {
                tally.udp_udp.0 += run as u64;
                tally.udp_udp.1 += (run * len) as u64;
            }
            Err(e) if is_queue_full(&e) => tally.queue_full += run as u64,
            Err(_) => tally.send_error += run as u64,
        }
        i += run;
    }
}
