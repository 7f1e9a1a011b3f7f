//! The sans-IO B2BUA core.
//!
//! Inputs: [`SipCore::handle_datagram`] (UDP), [`SipCore::handle_stream_message`]
//! (a message framed off a TCP or TLS connection), [`SipCore::handle_command`],
//! [`SipCore::handle_timeout`], each with the current time. Outputs: drain
//! [`SipCore::poll_output`] after every input; ask [`SipCore::poll_timeout`] when to call
//! `handle_timeout` next. No socket, no clock, no actor, no hidden random source (tags and
//! branches come from a generator seeded through [`CoreConfig::rng_seed`], call handles
//! from the node's [`Sequence`]): the same code runs under the
//! [`super::driver::SipDriver`] actor and under unit tests on a virtual clock.
//!
//! One file per concern: `transactions` (glue to `sipx-sip`), `caller` (the caller's
//! dialog), `trunk` and `auth` (the trunk leg), `b2bua` (pairing the two, commands,
//! reaping), `reinvite`, `cancel`, `probe` (OPTIONS), `timers`.

mod auth;
mod b2bua;
mod caller;
mod cancel;
mod dialogs;
mod probe;
mod reinvite;
mod state;
mod timers;
mod transactions;
mod trunk;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parley_codecs::sdp::MediaDescription;
use parley_core::directory::{Directory, UserIdentity};
use parley_core::ids::{CallHandle, Sequence};
use parley_core::overload::{Admission, OverloadLimits, RecentlyRefused, Shed};
use parley_core::sip::SipEvent;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sipx_sip::transaction::Dispatch;
use sipx_sip::{
    Limits, Message, Method, Request, Timers, TransactionKey, TransactionLayer, TuEvent,
};

pub use super::transport::{Peer, Transport};

use self::state::{Call, Purpose, Side};
use self::timers::{TimerKind, TimerTable};
use super::error::SipError;
use super::{msg, validate};
use crate::metrics as m;

/// Server transactions in flight per source address.
#[derive(Debug, Default)]
struct SourceCounts {
    cap: usize,
    by_key: HashMap<TransactionKey, std::net::IpAddr>,
    by_ip: HashMap<std::net::IpAddr, usize>,
}

impl SourceCounts {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    /// Whether `ip` holds its share of transactions already.
    fn over(&self, ip: std::net::IpAddr) -> bool {
        self.cap > 0 && self.by_ip.get(&ip).is_some_and(|n| *n >= self.cap)
    }

    fn add(&mut self, key: &TransactionKey, ip: std::net::IpAddr) {
        if self.by_key.insert(key.clone(), ip).is_none() {
            *self.by_ip.entry(ip).or_insert(0) += 1;
        }
    }

    fn remove(&mut self, key: &TransactionKey) {
        if let Some(ip) = self.by_key.remove(key)
            && let Some(n) = self.by_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }
}

/// Something the driver must do.
#[derive(Debug)]
pub enum Output {
    /// Send these bytes.
    Transmit {
        /// Destination (on a connection: the remote end of the one to use, or to open).
        dest: SocketAddr,
        /// How to reach it.
        transport: Transport,
        /// The SIP message.
        data: Bytes,
    },
    /// Deliver an event to a call's actor.
    Event(CallHandle, SipEvent),
    /// A new inbound call was accepted (100 Trying already sent): start its actor.
    NewCall(Box<NewCall>),
    /// An OPTIONS probe ended: the final status, or `None` when nothing answered.
    ProbeResult {
        /// The id [`SipCore::handle_probe`] returned.
        id: u64,
        /// Final status code, if any.
        code: Option<u16>,
    },
}

/// A new inbound call.
#[derive(Debug, Clone)]
pub struct NewCall {
    /// Handle for commands and events.
    pub handle: CallHandle,
    /// The gateway's Call-ID.
    pub sip_call_id: String,
    /// Called user.
    pub user: UserIdentity,
    /// Caller number (E.164) or URI.
    pub caller: String,
    /// Caller display name.
    pub caller_name: Option<String>,
    /// Dialled number (E.164).
    pub called: String,
    /// The caller's audio offer.
    pub offer: MediaDescription,
    /// The caller's video offer, if any.
    pub video: Option<MediaDescription>,
}

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Our SIP address (Via, Contact) on UDP.
    pub local: SocketAddr,
    /// Our TCP listener's address, when SIP over TCP is on.
    pub local_tcp: Option<SocketAddr>,
    /// Our TLS listener's address, when SIP over TLS is on.
    pub local_tls: Option<SocketAddr>,
    /// The trunks toward the PSTN, by [`parley_core::numberplan::TrunkId`].
    pub trunks: Vec<TrunkTarget>,
    /// Region for numbers without `+`.
    pub region: String,
    /// Transaction timers.
    pub timers: Timers,
    /// Seed of the generator behind tags, branches and Call-IDs (the node seeds it from
    /// the OS; a test fixes it).
    pub rng_seed: [u8; 32],
    /// Server transactions in flight beyond which a new request is refused statelessly
    /// (503, Retry-After) and forgotten at once.
    pub max_server_transactions: usize,
    /// Server transactions in flight from one source address beyond which its new
    /// requests are refused like those over `max_server_transactions` (0: unbounded).
    pub max_transactions_per_source: usize,
    /// Live calls from one source address beyond which its new INVITEs get 503 with
    /// Retry-After (0: unbounded).
    pub max_calls_per_source: usize,
    /// Overload control of new calls: call rate, live calls, queue delay
    /// ([`parley_core::overload`]).
    pub overload: OverloadLimits,
    /// Whether requests inside a gateway's dialog (and its CANCEL) must come from the
    /// address the dialog was set up from. Off only for gateways behind load balancers
    /// that spread one dialog over several addresses.
    pub dialog_source_check: bool,
    /// The host part of the Call-IDs this core makes (`parley`; `s<k>.parley` for shard
    /// `k` of several, so that what comes back reaches it: [`super::shard`]).
    pub call_id_host: String,
}

/// Where one trunk is, and how to answer its challenges.
#[derive(Debug, Clone)]
pub struct TrunkTarget {
    /// Its SIP address.
    pub addr: SocketAddr,
    /// How to reach it.
    pub transport: Transport,
    /// Digest credentials, answered when it challenges our INVITE (401/407).
    pub auth: Option<sipx_sip::auth::Credentials>,
}

/// Refused INVITEs remembered for their retransmissions ([`RecentlyRefused`]): at 4,000
/// refusals a second, a second's worth of INVITEs that crossed their 503 in the queue;
/// some 20 MiB at most.
const REFUSED_REMEMBERED: usize = 65_536;

/// The B2BUA core.
pub struct SipCore {
    cfg: CoreConfig,
    directory: Arc<dyn Directory>,
    handles: Arc<Sequence>,
    rng: StdRng,
    layer: TransactionLayer,
    limits: Limits,
    timers: TimerTable,
    dests: HashMap<TransactionKey, Peer>,
    /// Server transactions in flight per source address.
    sources: SourceCounts,
    purposes: HashMap<TransactionKey, (CallHandle, Purpose)>,
    /// Boxed, and the table sized up front: a call is a kilobyte or two, and growing a
    /// table of them in place stalled the node for a quarter second (the doubled table's
    /// fresh pages faulted in at once) just as the call rate rose.
    calls: HashMap<CallHandle, Box<Call>>,
    /// Calls in `calls` whose call actor is not done with them.
    live: usize,
    /// Of those, the calls each source address placed (`max_calls_per_source`); an
    /// address is in the map only while it has one.
    live_by_source: HashMap<IpAddr, usize>,
    admission: Admission,
    /// INVITEs refused by overload control, whose retransmissions get 503 again.
    refused: RecentlyRefused<TransactionKey>,
    dialogs: HashMap<dialogs::DialogKey, (CallHandle, Side)>,

    next_probe: u64,
    draining: bool,
    out: VecDeque<Output>,
}

impl std::fmt::Debug for SipCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SipCore")
            .field("calls", &self.calls.len())
            .finish_non_exhaustive()
    }
}

fn method_label(m: &Method) -> &'static str {
    match m {
        Method::Invite => "INVITE",
        Method::Ack => "ACK",
        Method::Bye => "BYE",
        Method::Cancel => "CANCEL",
        Method::Options => "OPTIONS",
        Method::Register => "REGISTER",
        _ => "OTHER",
    }
}

impl SipCore {
    /// A core with no calls: users are found in `directory`, call handles drawn from
    /// `handles` (shared with calls dialled from IM devices, so call ids never collide).
    pub fn new(cfg: CoreConfig, directory: Arc<dyn Directory>, handles: Arc<Sequence>) -> Self {
        let (share, overload) = (cfg.max_transactions_per_source, cfg.overload);
        // Each call holds two server transactions (INVITE, BYE) while it is remembered.
        let calls = cfg.max_server_transactions / 2;
        // As long as a gateway retransmits an INVITE that has no answer (Timer B).
        let refused_ttl = cfg.timers.t1 * 64;
        Self {
            layer: TransactionLayer::new(cfg.timers),
            rng: StdRng::from_seed(cfg.rng_seed),
            cfg,
            directory,
            handles,
            limits: Limits::datagram(),
            timers: TimerTable::default(),
            dests: HashMap::new(),
            sources: SourceCounts::new(share),
            purposes: HashMap::new(),
            calls: HashMap::with_capacity(calls),
            live: 0,
            live_by_source: HashMap::new(),
            admission: Admission::new(overload),
            refused: RecentlyRefused::new(refused_ttl, REFUSED_REMEMBERED),
            dialogs: HashMap::new(),

            next_probe: 0,
            draining: false,
            out: VecDeque::new(),
        }
    }

    /// Stop accepting new calls (they get 503 with Retry-After).
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Transactions in flight, as (client, server): every one must end, whatever arrives.
    pub fn transactions(&self) -> (usize, usize) {
        self.layer.len()
    }

    /// Calls whose dialogs are still tracked.
    pub fn live_calls_tracked(&self) -> usize {
        self.calls.len()
    }

    /// Calls whose call actor is not done with them.
    pub fn live_calls(&self) -> usize {
        self.live
    }

    /// A datagram waited `delay` in the kernel before the driver read it (overload
    /// control sheds new calls on a standing queue).
    pub fn handle_queue_delay(&mut self, now: Instant, delay: std::time::Duration) {
        let was = self.admission.shedding();
        self.admission.handle_delay(now, delay);
        self.log_shedding(was);
    }

    /// The main loop (user actors, device connections) fires its timers `lag` late: with
    /// SIP on several control threads, new calls are shed while it is behind.
    pub fn handle_loop_lag(&mut self, lag: std::time::Duration) {
        let was = self.admission.shedding();
        self.admission.handle_lag(lag);
        if was != self.admission.shedding() {
            tracing::info!(loop_lag_ms = lag.as_millis() as u64, "main loop lag");
        }
        self.log_shedding(was);
    }

    /// Time passed for overload control (a window with no datagram since closes); the
    /// driver calls it every [`parley_core::overload::DELAY_WINDOW`].
    pub fn handle_overload_timeout(&mut self, now: Instant) {
        let was = self.admission.shedding();
        self.admission.handle_timeout(now);
        self.log_shedding(was);
    }

    /// Logs the start and the end of shedding for queue delay (once each: an operator
    /// greps `overload`).
    fn log_shedding(&self, was: bool) {
        match (was, self.admission.shedding()) {
            (false, true) => tracing::warn!(
                queue_delay_ms = self.admission.queue_delay().as_millis() as u64,
                limit_ms = self.cfg.overload.max_delay.as_millis() as u64,
                live_calls = self.live,
                "overload: requests wait in the receive queue or the main loop is behind; new calls are refused (503)"
            ),
            (true, false) => tracing::info!(
                queue_delay_ms = self.admission.queue_delay().as_millis() as u64,
                "overload over: new calls admitted again"
            ),
            _ => {}
        }
    }

    /// The least queue delay of the last 100 ms window, and whether new calls are shed
    /// for it.
    pub fn queue_delay(&self) -> (std::time::Duration, bool) {
        (self.admission.queue_delay(), self.admission.shedding())
    }

    /// A call starts counting as live; `caller` is its gateway's address (none for a
    /// call a device dialled).
    fn live_started(&mut self, caller: Option<IpAddr>) {
        self.live += 1;
        if let Some(ip) = caller {
            *self.live_by_source.entry(ip).or_default() += 1;
        }
    }

    /// A call counted by [`Self::live_started`] is over.
    fn live_ended(&mut self, caller: Option<IpAddr>) {
        debug_assert!(self.live > 0, "a call counted live was not counted");
        self.live = self.live.saturating_sub(1);
        if let Some(ip) = caller
            && let std::collections::hash_map::Entry::Occupied(mut e) =
                self.live_by_source.entry(ip)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Live calls `ip` placed.
    fn live_from(&self, ip: IpAddr) -> usize {
        self.live_by_source.get(&ip).copied().unwrap_or(0)
    }

    /// Whether the node is behind reading its socket ([`Admission::behind`]).
    pub fn behind(&self) -> bool {
        self.admission.behind()
    }

    /// Whether a new call may start now ([`Admission::admit`]): `Ok(None)` yes,
    /// `Ok(Some(shed))` no (a new refusal), `Err(())` no (a retransmission of one).
    fn admit(&mut self, now: Instant, key: &TransactionKey) -> Result<Option<Shed>, ()> {
        if self.refused.contains(now, key) {
            return Err(());
        }
        let was = self.admission.shedding();
        let admitted = self.admission.admit(now, self.live);
        self.log_shedding(was);
        match admitted {
            Ok(()) => Ok(None),
            Err(shed) => {
                self.refused.insert(now, key.clone());
                Ok(Some(shed))
            }
        }
    }

    /// Next output.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When to call [`Self::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Our address on `transport` (the UDP one when that listener is off).
    fn local(&self, transport: Transport) -> SocketAddr {
        match transport {
            Transport::Udp => self.cfg.local,
            Transport::Tcp => self.cfg.local_tcp.unwrap_or(self.cfg.local),
            Transport::Tls => self.cfg.local_tls.unwrap_or(self.cfg.local),
        }
    }

    fn contact(&self, transport: Transport) -> String {
        let local = self.local(transport);
        match transport {
            Transport::Udp => format!("sip:parley@{local}"),
            t => format!("sip:parley@{local};transport={}", t.as_str()),
        }
    }

    fn via(&mut self, transport: Transport) -> String {
        let branch = self.branch();
        format!(
            "SIP/2.0/{} {};branch={branch};rport",
            transport.via_token(),
            self.local(transport)
        )
    }

    /// A random token for tags, from the core's generator.
    fn token(&mut self, len: usize) -> String {
        msg::token(&mut self.rng, len)
    }

    /// A new RFC 3261 branch.
    fn branch(&mut self) -> String {
        format!("z9hG4bK{}", self.token(16))
    }

    fn transmit(&mut self, dest: Peer, msg: &Message) {
        if let Message::Response(r) = msg {
            let code = r.status.code();
            metrics::counter!(m::SIP_RESPONSES_TOTAL, "code" => code.to_string(), "direction" => "sent").increment(1);
        }
        self.out.push_back(Output::Transmit {
            dest: dest.addr,
            transport: dest.transport,
            data: msg.to_bytes(),
        });
    }

    /// Sends a response built outside the transaction layer (a stateless refusal).
    fn transmit_raw(&mut self, dest: Peer, code: u16, data: Bytes) {
        metrics::counter!(m::SIP_RESPONSES_TOTAL, "code" => code.to_string(), "direction" => "sent").increment(1);
        self.out.push_back(Output::Transmit {
            dest: dest.addr,
            transport: dest.transport,
            data,
        });
    }

    /// A message framed off a TCP or TLS connection from `src` (the connection's remote
    /// end). Framing errors are the connection's: the driver closes it.
    pub fn handle_stream_message(
        &mut self,
        now: Instant,
        src: SocketAddr,
        transport: Transport,
        message: Message,
    ) {
        self.handle_message(
            now,
            Peer {
                addr: src,
                transport,
            },
            message,
        );
    }

    /// A datagram arrived.
    pub fn handle_datagram(&mut self, now: Instant, src: SocketAddr, data: Bytes) {
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return; // RFC 5626 keep-alive
        }
        let message = match sipx_sip::parse_datagram(data.clone(), &self.limits) {
            Ok(m) => m,
            Err(e) => {
                let e = SipError::Unparseable(e.to_string());
                metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => e.metric_reason())
                    .increment(1);
                tracing::debug!(%src, error = %e, "unparseable SIP datagram");
                // A request whose Via can still be read gets its 400 (RFC 4475 §3.1.2);
                // anything else is dropped.
                let tag = self.token(10);
                if let Some(answer) = msg::unparseable_response(&data, &tag) {
                    self.transmit_raw(Peer::udp(src), 400, answer);
                }
                return;
            }
        };
        self.handle_message(now, Peer::udp(src), message);
    }

    fn handle_message(&mut self, now: Instant, src: Peer, message: Message) {
        let reliability = src.transport.reliability();
        match message {
            Message::Request(req) => {
                metrics::counter!(m::SIP_REQUESTS_TOTAL, "method" => method_label(&req.method))
                    .increment(1);
                let check =
                    validate::check_request(&req).and_then(|()| match req
                        .headers
                        .typed::<sipx_sip::headers::MaxForwards>(
                    ) {
                        Some(Ok(mf)) if mf.0 == 0 => Err(SipError::TooManyHops),
                        _ => Ok(()),
                    });
                if let Err(e) = check {
                    metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => e.metric_reason())
                        .increment(1);
                    tracing::info!(%src, method = method_label(&req.method), error = %e, status = e.status(), "SIP request refused");
                    if req.method != Method::Ack {
                        let tag = self.token(10);
                        let answer = msg::error_response(&req, &e, &tag);
                        self.transmit_raw(src, e.status(), answer);
                    }
                    return;
                }
                // Overload control first, before any state: a new call shed here costs a
                // parse and a send, no transaction (its retransmissions, matching none,
                // come back here and get the same 503). A retransmission of an INVITE
                // admitted earlier matches its transaction and passes.
                if req.method == Method::Invite
                    && !self.draining
                    && msg::to_tag(&req.headers).is_none()
                    && let Some(key) = TransactionKey::from_request(&req)
                    && !self.dests.contains_key(&key)
                {
                    let refused = match self.admit(now, &key) {
                        Ok(None) => false,
                        Ok(Some(shed)) => {
                            metrics::counter!(m::SIP_REJECTED_OVERLOAD_TOTAL, "reason" => shed.as_str())
                                .increment(1);
                            tracing::debug!(%src, reason = shed.as_str(), "INVITE refused: overload control");
                            true
                        }
                        // The same answer to a retransmission, not counted again.
                        Err(()) => true,
                    };
                    if refused {
                        let tag = self.token(10);
                        let answer = msg::error_response(&req, &SipError::Overloaded, &tag);
                        self.transmit_raw(src, 503, answer);
                        return;
                    }
                }
                // Over a transaction cap, a new request is answered without a
                // transaction, so a flood holds no state (a retransmission is answered
                // afresh); one source cannot take the whole table: it has its own share.
                // Requests inside a call already admitted (its BYE, re-INVITE) are not
                // refused: they end or keep state the node already holds.
                let full = self.layer.len().1 >= self.cfg.max_server_transactions;
                let over = (full || self.sources.over(src.addr.ip()))
                    && self.match_dialog(&req, Some(src)).is_none();
                match self.layer.receive(Message::Request(req), reliability) {
                    Dispatch::Created { key, outputs } if over => {
                        let reason = if full {
                            "transactions"
                        } else {
                            "transactions_per_source"
                        };
                        metrics::counter!(m::SIP_REJECTED_OVERLOAD_TOTAL, "reason" => reason)
                            .increment(1);
                        self.layer.abandon(&key);
                        for o in outputs {
                            if let sipx_sip::transaction::Output::ToTu(ev) = o
                                && let TuEvent::Request(r) = *ev
                                && r.method != Method::Ack
                            {
                                let tag = self.token(10);
                                let answer = msg::error_response(&r, &SipError::Overloaded, &tag);
                                self.transmit_raw(src, 503, answer);
                            }
                        }
                    }
                    Dispatch::Created { key, outputs } => {
                        self.dests.insert(key.clone(), src);
                        self.sources.add(&key, src.addr.ip());
                        self.run_tx(now, &key, outputs, false);
                    }
                    Dispatch::Matched { key, outputs } => self.run_tx(now, &key, outputs, true),
                    Dispatch::Unmatched(m) => {
                        if let Message::Request(r) = *m {
                            if r.method == Method::Ack {
                                self.on_ack(&r, Some(src));
                            } else if let Some(resp) = msg::response(&r, 400, None, None, None) {
                                self.transmit(src, &Message::Response(resp));
                            }
                        }
                    }
                }
            }
            Message::Response(resp) => {
                metrics::counter!(m::SIP_RESPONSES_TOTAL, "code" => resp.status.code().to_string(), "direction" => "received").increment(1);
                match self.layer.receive(Message::Response(resp), reliability) {
                    Dispatch::Matched { key, outputs } | Dispatch::Created { key, outputs } => {
                        self.run_tx(now, &key, outputs, false)
                    }
                    Dispatch::Unmatched(m) => {
                        if let Message::Response(r) = *m {
                            self.on_stray_response(&r);
                        }
                    }
                }
            }
        }
    }

    fn handle_tu(&mut self, now: Instant, key: &TransactionKey, ev: TuEvent) {
        match ev {
            TuEvent::Request(req) => match req.method {
                Method::Invite => self.on_invite(now, key, *req),
                Method::Bye => self.on_bye(now, key, &req),
                Method::Cancel => self.on_cancel(now, key, &req),
                // A draining node tells a gateway's health check to send calls elsewhere.
                Method::Options if self.draining => self.respond_overloaded(now, key, &req, 30),
                Method::Options => self.respond(now, key, &req, 200, None),
                Method::Register | Method::Subscribe | Method::Publish => {
                    self.respond(now, key, &req, 405, None)
                }
                _ => self.respond(now, key, &req, 501, None),
            },
            TuEvent::Ack(req) => {
                let src = self.dests.get(key).copied();
                self.on_ack(&req, src)
            }
            TuEvent::Response(resp) => self.on_response(now, key, &resp),
            TuEvent::Timeout | TuEvent::TransportError => match self.purposes.get(key).copied() {
                Some((h, Purpose::TrunkInvite)) if !self.trunk_leg_abandoned(h) => {
                    self.out
                        .push_back(Output::Event(h, SipEvent::TrunkFailed(408)));
                }
                Some((_, Purpose::Probe(id))) => {
                    self.out.push_back(Output::ProbeResult { id, code: None })
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn respond(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        req: &Request,
        code: u16,
        tag: Option<&str>,
    ) {
        let contact = self.contact(self.dests.get(key).map_or(Transport::Udp, |p| p.transport));
        let fresh = self.token(10);
        let tag = tag.unwrap_or(&fresh);
        match msg::response(req, code, Some(tag), Some(&contact), None) {
            Some(r) => {
                let outputs = self.layer.send_response(key, r);
                self.run_tx(now, key, outputs, false);
            }
            // Headers too odd for the builder (RFC 4475 `intmeth`): answered from their
            // values as they are, outside the transaction.
            None => {
                if let Some(dest) = self.dests.get(key).copied() {
                    let data = msg::plain_response(req, code, tag);
                    self.transmit_raw(dest, code, data);
                }
                // The transaction got no response it can hold, so it would wait forever:
                // drop it (a retransmission is answered afresh).
                self.forget_transaction(key);
            }
        }
    }

    /// Answers `req` with `err` outside its transaction and forgets the transaction: no
    /// state is kept for it (a retransmission is answered afresh).
    fn refuse_statelessly(&mut self, key: &TransactionKey, req: &Request, err: &SipError) {
        if let Some(dest) = self.dests.get(key).copied() {
            let tag = self.token(10);
            let answer = msg::error_response(req, err, &tag);
            self.transmit_raw(dest, err.status(), answer);
        }
        self.forget_transaction(key);
    }

    fn forget_transaction(&mut self, key: &TransactionKey) {
        self.layer.abandon(key);
        self.dests.remove(key);
        self.sources.remove(key);
        self.purposes.remove(key);
        self.timers.clear_transaction(key);
    }

    /// Time passed: fires every timer due.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(kind) = self.timers.pop_due(now) {
            match kind {
                TimerKind::Txn(key, timer) => {
                    let outputs = self.layer.on_timer(&key, timer);
                    self.run_tx(now, &key, outputs, true);
                }
                TimerKind::Retx200(h, generation) => self.retransmit_200(now, h, generation),
                TimerKind::Reap(h) => self.reap(h),
            }
        }
    }
}
