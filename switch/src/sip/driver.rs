//! The SIP driver actor: owns the UDP socket and the clock, feeds [`SipCore`], performs its
//! outputs (send, start call actors, deliver events).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use bytes::Bytes;
use parley_actors::messages::{CallHandle, CdrSink, MediaPlane, SipCommand, SipLegCmd, ToCall};
use parley_actors::registry::Registry;
use parley_actors::trunk::{ProbeOutcome, ProbeResult, SendProbe, TrunkSet};
use parley_actors::{CallActor, CallEnv, CallSetup};
use parley_core::call::{CallSpec, Origin};
use parley_core::ids::{Sequence, call_id};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::core::{Output, SipCore};
use super::shard::{self, Shards};
use super::stream::{
    self, ConnectionCount, StreamClosed, StreamMessage, StreamOpened, StreamSettings,
};
use super::transport::Transport;

/// What the driver needs besides the core.
pub struct DriverDeps {
    /// Live users.
    pub registry: Arc<Registry>,
    /// The relay.
    pub media: Arc<dyn MediaPlane>,
    /// The CDR writer.
    pub cdr: Arc<dyn CdrSink>,
    /// The trunks toward the PSTN.
    pub trunks: Arc<TrunkSet>,
    /// Ring timeout.
    pub ring_timeout: Duration,
    /// Media timeout of answered calls.
    pub media_timeout: Option<Duration>,
    /// How long a device has to acknowledge an offer.
    pub offer_ack_timeout: Option<Duration>,
    /// Calls ringing one user beyond which new ones get 486.
    pub max_ringing: Option<usize>,
    /// The node's call handles (shared with the SIP core and IM-dialled calls).
    pub handles: Arc<Sequence>,
    /// Legs to devices on other nodes (cluster mode).
    pub remote: Option<Arc<dyn parley_actors::remote::RemoteLegs>>,
    /// The SIP over TCP listener, when on.
    pub tcp: Option<tokio::net::TcpListener>,
    /// Limits and timeouts of SIP connections.
    pub stream: StreamSettings,
    /// The SIP over TLS listener and its server configuration, when on.
    pub tls: Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>,
    /// How to open TLS connections, by peer (trunks with `transport = "tls"`).
    pub tls_clients: HashMap<SocketAddr, stream::TlsClient>,
    /// Which shard this driver is (`[sip] control_threads`; 0 of 1 by default).
    pub shard: usize,
    /// What the node's shards share.
    pub shards: Arc<Shards>,
}

/// The actor.
pub struct SipDriver {
    socket: Arc<UdpSocket>,
    core: SipCore,
    deps: DriverDeps,
    /// What calls started here need, with this driver as their SIP side (made once the
    /// driver has an address).
    env: Option<Arc<CallEnv>>,
    calls: HashMap<CallHandle, Recipient<ToCall>>,
    probes: HashMap<u64, (u64, Recipient<ProbeResult>)>,
    timer: Option<(Instant, SpawnHandle)>,
    /// Live SIP connections by transport and remote end: (id, outgoing queue).
    conns: HashMap<(Transport, SocketAddr), (u64, mpsc::Sender<Bytes>)>,
    conn_count: Arc<ConnectionCount>,
    /// Whether this shard was last counted behind.
    behind: bool,
    /// Every shard of the node, this one included, by index (empty until [`Peers`]
    /// arrives, and with one shard).
    peers: Vec<Recipient<Forwarded>>,
    /// `parley_sip_shard_calls_total` and `_handoffs_total` of this shard.
    counters: (metrics::Counter, metrics::Counter),
}

impl SipDriver {
    /// A driver for a bound socket.
    pub fn new(socket: Arc<UdpSocket>, core: SipCore, deps: DriverDeps) -> Self {
        Self {
            socket,
            core,
            deps,
            env: None,
            calls: HashMap::new(),
            probes: HashMap::new(),
            timer: None,
            conns: HashMap::new(),
            conn_count: Arc::new(ConnectionCount::default()),
            behind: false,
            peers: Vec::new(),
            counters: (metrics::Counter::noop(), metrics::Counter::noop()),
        }
    }

    /// Where this driver's connections report to.
    fn sink(&self, ctx: &Context<Self>) -> stream::Sink {
        let me = ctx.address();
        stream::Sink {
            msg: me.clone().recipient(),
            opened: me.clone().recipient(),
            closed: me.recipient(),
        }
    }

    /// Queues `data` on the connection to `dest`, opening one when there is none.
    fn send_stream(
        &mut self,
        transport: Transport,
        dest: SocketAddr,
        data: Bytes,
        ctx: &mut Context<Self>,
    ) {
        let key = (transport, dest);
        if !self.conns.contains_key(&key) {
            let tls = match transport {
                Transport::Tls => match self.deps.tls_clients.get(&dest) {
                    Some(c) => Some(c.clone()),
                    None => {
                        // Not a trunk of ours: a TLS peer is only reached over its own
                        // connection.
                        tracing::warn!(%dest, "no TLS connection to send on");
                        metrics::counter!(crate::metrics::SIP_SEND_ERRORS_TOTAL).increment(1);
                        return;
                    }
                },
                _ => None,
            };
            let Some(slot) = self.conn_count.try_take(self.deps.stream.max_connections) else {
                metrics::counter!(crate::metrics::SIP_CONNECTIONS_REFUSED_TOTAL, "transport" => transport.as_str())
                    .increment(1);
                metrics::counter!(crate::metrics::SIP_SEND_ERRORS_TOTAL).increment(1);
                tracing::warn!(%dest, "SIP connection not opened: too many connections");
                return;
            };
            let id = stream::next_id();
            let (tx, rx) = mpsc::channel(self.deps.stream.queue);
            self.conns.insert(key, (id, tx));
            match tls {
                Some(client) => actix_rt::spawn(stream::connect_tls(
                    dest,
                    client,
                    id,
                    rx,
                    self.sink(ctx),
                    self.deps.stream,
                    slot,
                )),
                None => actix_rt::spawn(stream::connect_tcp(
                    dest,
                    id,
                    rx,
                    self.sink(ctx),
                    self.deps.stream,
                    slot,
                )),
            };
        }
        if let Some((_, tx)) = self.conns.get(&key)
            && tx.try_send(data).is_err()
        {
            metrics::counter!(crate::metrics::SIP_SEND_ERRORS_TOTAL).increment(1);
            tracing::warn!(%dest, transport = transport.as_str(), "SIP connection queue full or closed: message dropped");
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        let (client, server) = self.core.transactions();
        let (client, server) = self
            .deps
            .shards
            .transactions(self.deps.shard, client, server);
        metrics::gauge!(crate::metrics::SIP_TRANSACTIONS, "kind" => "client").set(client as f64);
        metrics::gauge!(crate::metrics::SIP_TRANSACTIONS, "kind" => "server").set(server as f64);
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit {
                    dest,
                    transport: transport @ (Transport::Tcp | Transport::Tls),
                    data,
                } => self.send_stream(transport, dest, data, ctx),
                Output::Transmit { dest, data, .. } => {
                    // A direct non-blocking sendto: tokio's try_send_to reports WouldBlock
                    // until the socket has been seen writable once, which would drop the
                    // first messages (a UDP send only blocks when the buffer is full).
                    let sent = socket2::SockRef::from(&*self.socket).send_to(&data, &dest.into());
                    if let Err(e) = sent {
                        metrics::counter!(crate::metrics::SIP_SEND_ERRORS_TOTAL).increment(1);
                        tracing::warn!(%dest, error = %e, "SIP send failed");
                    }
                }
                Output::Event(h, ev) => {
                    if let Some(a) = self.calls.get(&h) {
                        a.do_send(ToCall(ev));
                    }
                }
                Output::ProbeResult { id, code } => {
                    if let Some((seq, reply)) = self.probes.remove(&id) {
                        let outcome = code.map_or(ProbeOutcome::Timeout, ProbeOutcome::Answered);
                        reply.do_send(ProbeResult { seq, outcome });
                    }
                }
                Output::NewCall(nc) => {
                    let (Some(env), Some(callee)) =
                        (self.env.clone(), self.deps.registry.actor(&nc.user))
                    else {
                        // No actor to run the call: refuse it and let the core forget it,
                        // rather than leave the INVITE ringing forever.
                        tracing::error!(user = %nc.user.user, "no user actor for a new call: 500");
                        let now = Instant::now();
                        self.core
                            .handle_command(now, nc.handle, SipLegCmd::CallerReject(500));
                        self.core.handle_command(now, nc.handle, SipLegCmd::Done);
                        continue;
                    };
                    let spec = CallSpec {
                        handle: nc.handle,
                        sip_call_id: nc.sip_call_id,
                        user: nc.user,
                        origin: Origin::Sip,
                        dialled_by: None,
                        caller: nc.caller,
                        caller_name: nc.caller_name,
                        called: nc.called,
                        pstn_destination: None,
                        offer: nc.offer,
                        video_offer: nc.video,
                        ring_timeout: self.deps.ring_timeout,
                        media_timeout: self.deps.media_timeout,
                        offer_ack_timeout: self.deps.offer_ack_timeout,
                        max_ringing: self.deps.max_ringing,
                        started: Instant::now(),
                        started_wall: SystemTime::now(),
                    };
                    tracing::debug!(call = %call_id(nc.handle), shard = self.deps.shard, "new call from a gateway");
                    self.counters.0.increment(1);
                    let call = CallActor::new(CallSetup {
                        spec,
                        callee,
                        caller_device: None,
                        env,
                    });
                    self.calls.insert(nc.handle, call.start().recipient());
                }
            }
        }
        self.arm_timer(ctx);
    }

    fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        let Some(next) = self.core.poll_timeout() else {
            return;
        };
        if let Some((at, h)) = self.timer {
            if at <= next {
                return;
            }
            ctx.cancel_future(h);
        }
        let after = next.saturating_duration_since(Instant::now());
        let h = ctx.run_later(after, |act, ctx| {
            act.timer = None;
            act.core.handle_timeout(Instant::now());
            act.flush(ctx);
        });
        self.timer = Some((next, h));
    }
}

impl Actor for SipDriver {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let label = self.deps.shard.to_string();
        self.counters = (
            metrics::counter!(crate::metrics::SIP_SHARD_CALLS_TOTAL, "shard" => label),
            metrics::counter!(crate::metrics::SIP_SHARD_HANDOFFS_TOTAL),
        );
        self.counters.0.increment(0);
        self.env = Some(Arc::new(CallEnv {
            sip: ctx.address().recipient(),
            media: self.deps.media.clone(),
            cdr: self.deps.cdr.clone(),
            trunks: self.deps.trunks.clone(),
            ring_timeout: self.deps.ring_timeout,
            media_timeout: self.deps.media_timeout,
            offer_ack_timeout: self.deps.offer_ack_timeout,
            max_ringing: self.deps.max_ringing,
            handles: self.deps.handles.clone(),
            remote: self.deps.remote.clone(),
        }));
        if let Some(listener) = self.deps.tcp.take() {
            actix_rt::spawn(stream::accept_tcp(
                listener,
                self.sink(ctx),
                self.deps.stream,
                self.conn_count.clone(),
            ));
        }
        if let Some((listener, config)) = self.deps.tls.take() {
            actix_rt::spawn(stream::accept_tls(
                listener,
                tokio_rustls::TlsAcceptor::from(config),
                self.sink(ctx),
                self.deps.stream,
                self.conn_count.clone(),
            ));
        }
        // Overload control's windows close on time too (a storm that stops while the
        // node sheds must not leave it shedding until the next datagram).
        ctx.run_interval(parley_core::overload::DELAY_WINDOW, |act, _| {
            let was = act.core.queue_delay();
            act.core.handle_overload_timeout(Instant::now());
            if act.deps.shards.count() > 1 {
                act.core.handle_loop_lag(act.deps.shards.loop_lag());
            }
            act.publish_queue_delay(was);
        });
        let socket = self.socket.clone();
        let stamped = stamp_arrivals(&socket);
        let state = (socket, Receiver::new());
        let stream = futures_util::stream::unfold(state, move |(s, mut r)| async move {
            loop {
                match r.recv(&s, stamped).await {
                    Ok(d) => return Some((d, (s, r))),
                    // ICMP port unreachable surfaces as an error on Linux; keep serving.
                    Err(e) => tracing::debug!(error = %e, "SIP recv error"),
                }
            }
        });
        ctx.add_stream(stream);
    }
}

/// A datagram, its source, and how long it waited in the kernel's receive queue (when
/// the kernel stamps arrivals).
struct Datagram(Bytes, SocketAddr, Option<Duration>);

/// A datagram another shard read off the socket for this one, and when it read it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forwarded(Datagram, Instant);

/// Every shard of the node, by index: sent to each once all are started.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Peers(pub Vec<Recipient<Forwarded>>);

impl Handler<Peers> for SipDriver {
    type Result = ();
    fn handle(&mut self, p: Peers, _: &mut Context<Self>) {
        self.peers = p.0;
    }
}

impl Handler<Forwarded> for SipDriver {
    type Result = ();
    fn handle(&mut self, f: Forwarded, ctx: &mut Context<Self>) {
        // Its wait is the kernel's queue and this shard's mailbox: a shard that falls
        // behind on handed-over datagrams sheds like one behind on its own socket.
        self.deps.shards.taken_up(self.deps.shard);
        let Forwarded(mut d, read) = f;
        d.2 = d.2.map(|w| w + read.elapsed());
        self.datagram(d, ctx);
    }
}

impl StreamHandler<Datagram> for SipDriver {
    fn handle(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        if self.peers.len() > 1
            && let Some(k) = shard::owner(&d.0, self.peers.len())
            && k != self.deps.shard
        {
            if self.deps.shards.hand_over(k) {
                self.counters.1.increment(1);
                self.peers[k].do_send(Forwarded(d, Instant::now()));
            } else {
                metrics::counter!(crate::metrics::SIP_SHARD_HANDOFFS_DROPPED_TOTAL).increment(1);
            }
            return;
        }
        self.datagram(d, ctx);
    }
}

impl SipDriver {
    fn datagram(&mut self, d: Datagram, ctx: &mut Context<Self>) {
        let now = Instant::now();
        if let Some(waited) = d.2 {
            let was = self.core.queue_delay();
            self.core.handle_queue_delay(now, waited);
            self.publish_queue_delay(was);
        }
        self.core.handle_datagram(now, d.1, d.0);
        self.flush(ctx);
    }
}

impl SipDriver {
    /// The queue-delay gauges, when they changed from `was`.
    /// The trunks hear when the node falls behind and when it catches up, so that their
    /// health does not count the node's own lateness against them.
    fn publish_queue_delay(&mut self, was: (Duration, bool)) {
        let (delay, shedding) = self.core.queue_delay();
        if (delay, shedding) != was {
            let (delay, shedding) = self
                .deps
                .shards
                .queue_delay(self.deps.shard, delay, shedding);
            metrics::gauge!(crate::metrics::SIP_QUEUE_DELAY_SECONDS).set(delay.as_secs_f64());
            metrics::gauge!(crate::metrics::SIP_SHEDDING).set(f64::from(u8::from(shedding)));
        }
        let behind = self.core.behind();
        if behind != self.behind {
            self.behind = behind;
            if let Some(node) = self.deps.shards.behind(behind) {
                self.deps.trunks.node_load(node);
            }
        }
    }
}

/// Asks the kernel to stamp each datagram's arrival (`SO_TIMESTAMPNS`), which is how the
/// driver measures the receive queue's delay for overload control; false (and a warning)
/// where it cannot.
fn stamp_arrivals(socket: &UdpSocket) -> bool {
    use std::os::fd::AsRawFd;
    match nix::sys::socket::setsockopt(
        socket.as_raw_fd(),
        nix::sys::socket::sockopt::ReceiveTimestampns,
        &true,
    ) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "SO_TIMESTAMPNS refused: no queue-delay overload control");
            false
        }
    }
}

/// Reads datagrams with their arrival stamps: one buffer of the largest datagram, the
/// message copied out of it (a few hundred bytes).
struct Receiver {
    buf: Vec<u8>,
    cmsg: Vec<u8>,
}

impl Receiver {
    fn new() -> Self {
        Self {
            buf: vec![0; 65_535],
            cmsg: nix::cmsg_space!(nix::sys::time::TimeSpec),
        }
    }

    async fn recv(&mut self, socket: &UdpSocket, stamped: bool) -> std::io::Result<Datagram> {
        use std::os::fd::AsRawFd;
        loop {
            socket.readable().await?;
            match socket.try_io(tokio::io::Interest::READABLE, || {
                self.recv_now(socket.as_raw_fd(), stamped)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    fn recv_now(&mut self, fd: std::os::fd::RawFd, stamped: bool) -> std::io::Result<Datagram> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage};
        let mut iov = [std::io::IoSliceMut::new(&mut self.buf)];
        let cmsg = stamped.then_some(&mut self.cmsg);
        let msg =
            nix::sys::socket::recvmsg::<SockaddrStorage>(fd, &mut iov, cmsg, MsgFlags::empty())
                .map_err(std::io::Error::from)?;
        let mut waited = None;
        for c in msg.cmsgs() {
            if let ControlMessageOwned::ScmTimestampns(ts) = c {
                let at = SystemTime::UNIX_EPOCH + Duration::from(ts);
                waited = Some(SystemTime::now().duration_since(at).unwrap_or_default());
            }
        }
        let src = msg.address.and_then(|a| match a.family() {
            Some(nix::sys::socket::AddressFamily::Inet) => {
                a.as_sockaddr_in().map(|v4| SocketAddr::V4((*v4).into()))
            }
            Some(nix::sys::socket::AddressFamily::Inet6) => {
                a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
            }
            _ => None,
        });
        let n = msg.bytes;
        let src =
            src.ok_or_else(|| std::io::Error::other("a datagram without a source address"))?;
        Ok(Datagram(
            Bytes::copy_from_slice(&self.buf[..n]),
            src,
            waited,
        ))
    }
}

impl Handler<SipCommand> for SipDriver {
    type Result = ();
    fn handle(&mut self, c: SipCommand, ctx: &mut Context<Self>) {
        if let Some(events) = &c.events {
            self.calls.entry(c.call).or_insert_with(|| events.clone());
        }
        if matches!(c.cmd, SipLegCmd::Done) {
            self.calls.remove(&c.call);
        }
        self.core.handle_command(Instant::now(), c.call, c.cmd);
        self.flush(ctx);
    }
}

impl Handler<StreamMessage> for SipDriver {
    type Result = ();
    fn handle(&mut self, m: StreamMessage, ctx: &mut Context<Self>) {
        self.core
            .handle_stream_message(Instant::now(), m.peer, m.transport, m.msg);
        self.flush(ctx);
    }
}

impl Handler<StreamOpened> for SipDriver {
    type Result = ();
    fn handle(&mut self, m: StreamOpened, _: &mut Context<Self>) {
        self.conns.insert((m.transport, m.peer), (m.id, m.tx));
    }
}

impl Handler<StreamClosed> for SipDriver {
    type Result = ();
    fn handle(&mut self, m: StreamClosed, _: &mut Context<Self>) {
        let key = (m.transport, m.peer);
        if self.conns.get(&key).is_some_and(|(id, _)| *id == m.id) {
            self.conns.remove(&key);
        }
    }
}

/// Stop accepting calls; replies with the number of calls still up.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Drain;

impl Handler<Drain> for SipDriver {
    type Result = usize;
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> usize {
        self.core.set_draining(true);
        self.calls.len()
    }
}

impl Handler<SendProbe> for SipDriver {
    type Result = ();
    fn handle(&mut self, p: SendProbe, ctx: &mut Context<Self>) {
        let id = self.core.handle_probe(Instant::now(), p.dest);
        self.probes.insert(id, (p.seq, p.reply));
        self.flush(ctx);
    }
}
