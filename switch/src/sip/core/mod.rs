//! The sans-IO B2BUA core.
//!
//! Inputs: [`SipCore::handle_datagram`], [`SipCore::handle_command`],
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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parley_codecs::sdp::MediaDescription;
use parley_core::directory::{Directory, UserIdentity};
use parley_core::ids::{CallHandle, Sequence};
use parley_core::sip::SipEvent;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sipx_sip::transaction::Dispatch;
use sipx_sip::{
    Limits, Message, Method, Reliability, Request, Timers, TransactionKey, TransactionLayer,
    TuEvent,
};

use self::state::{Call, Purpose, Side};
use self::timers::{TimerKind, TimerTable};
use super::error::SipError;
use super::{msg, validate};
use crate::metrics as m;

/// Something the driver must do.
#[derive(Debug)]
pub enum Output {
    /// Send these bytes.
    Transmit {
        /// Destination.
        dest: SocketAddr,
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
    /// Our SIP address (Via, Contact).
    pub local: SocketAddr,
    /// The trunks toward the PSTN, by [`parley_core::numberplan::TrunkId`].
    pub trunks: Vec<TrunkTarget>,
    /// Region for numbers without `+`.
    pub region: String,
    /// Transaction timers.
    pub timers: Timers,
    /// Seed of the generator behind tags, branches and Call-IDs (the node seeds it from
    /// the OS; a test fixes it).
    pub rng_seed: [u8; 32],
    /// Whether requests inside a gateway's dialog (and its CANCEL) must come from the
    /// address the dialog was set up from. Off only for gateways behind load balancers
    /// that spread one dialog over several addresses.
    pub dialog_source_check: bool,
}

/// Where one trunk is, and how to answer its challenges.
#[derive(Debug, Clone)]
pub struct TrunkTarget {
    /// Its SIP address.
    pub addr: SocketAddr,
    /// Digest credentials, answered when it challenges our INVITE (401/407).
    pub auth: Option<sipx_sip::auth::Credentials>,
}

/// The B2BUA core.
pub struct SipCore {
    cfg: CoreConfig,
    directory: Arc<dyn Directory>,
    handles: Arc<Sequence>,
    rng: StdRng,
    layer: TransactionLayer,
    limits: Limits,
    timers: TimerTable,
    dests: HashMap<TransactionKey, SocketAddr>,
    purposes: HashMap<TransactionKey, (CallHandle, Purpose)>,
    calls: HashMap<CallHandle, Call>,
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
        Self {
            layer: TransactionLayer::new(cfg.timers),
            rng: StdRng::from_seed(cfg.rng_seed),
            cfg,
            directory,
            handles,
            limits: Limits::datagram(),
            timers: TimerTable::default(),
            dests: HashMap::new(),
            purposes: HashMap::new(),
            calls: HashMap::new(),
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
        self.calls.values().filter(|c| !c.done).count()
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

    fn contact(&self) -> String {
        format!("sip:parley@{}", self.cfg.local)
    }

    fn via(&mut self) -> String {
        let branch = self.branch();
        format!("SIP/2.0/UDP {};branch={branch};rport", self.cfg.local)
    }

    /// A random token for tags, from the core's generator.
    fn token(&mut self, len: usize) -> String {
        msg::token(&mut self.rng, len)
    }

    /// A new RFC 3261 branch.
    fn branch(&mut self) -> String {
        format!("z9hG4bK{}", self.token(16))
    }

    fn transmit(&mut self, dest: SocketAddr, msg: &Message) {
        if let Message::Response(r) = msg {
            let code = r.status.code();
            metrics::counter!(m::SIP_RESPONSES_TOTAL, "code" => code.to_string(), "direction" => "sent").increment(1);
        }
        self.out.push_back(Output::Transmit {
            dest,
            data: msg.to_bytes(),
        });
    }

    /// Sends a response built outside the transaction layer (a stateless refusal).
    fn transmit_raw(&mut self, dest: SocketAddr, code: u16, data: Bytes) {
        metrics::counter!(m::SIP_RESPONSES_TOTAL, "code" => code.to_string(), "direction" => "sent").increment(1);
        self.out.push_back(Output::Transmit { dest, data });
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
                    self.transmit_raw(src, 400, answer);
                }
                return;
            }
        };
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
                match self
                    .layer
                    .receive(Message::Request(req), Reliability::Unreliable)
                {
                    Dispatch::Created { key, outputs } => {
                        self.dests.insert(key.clone(), src);
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
                match self
                    .layer
                    .receive(Message::Response(resp), Reliability::Unreliable)
                {
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
        let contact = self.contact();
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
                self.layer.abandon(key);
                self.dests.remove(key);
                self.purposes.remove(key);
                self.timers.clear_transaction(key);
            }
        }
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
