//! The sans-IO B2BUA core.
//!
//! Inputs: [`SipCore::handle_datagram`], [`SipCore::handle_command`],
//! [`SipCore::handle_timeout`], each with the current time. Outputs: drain
//! [`SipCore::poll_output`] after every input; ask [`SipCore::poll_timeout`] when to call
//! `handle_timeout` next. No socket, no clock, no actor: the same code runs under the
//! [`super::driver::SipDriver`] actor and under unit tests on a virtual clock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_actors::messages::{CallHandle, SipEvent, SipLegCmd};
use parley_actors::registry::{Registry, UserRef};
use parley_codecs::sdp::{self, MediaDescription};
use sipx_sip::transaction::{Dispatch, Output as TxOut};
use sipx_sip::{
    HeaderName, Limits, Message, Method, Reliability, Request, RequestBuilder, Response, Timer,
    Timers, TransactionKey, TransactionLayer, TuEvent, Uri,
};

use super::msg;
use crate::metrics as m;
use crate::numbers;

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
        /// The id [`SipCore::send_probe`] returned.
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
    pub user: UserRef,
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
    /// The trunk toward the PSTN, if any.
    pub trunk: Option<SocketAddr>,
    /// Region for numbers without `+`.
    pub region: String,
    /// Transaction timers.
    pub timers: Timers,
    /// Digest credentials for the trunk, answered when it challenges our INVITE (401/407).
    pub trunk_auth: Option<sipx_sip::auth::Credentials>,
}

#[derive(Debug)]
enum TimerKind {
    Txn(TransactionKey, Timer),
    /// Retransmit the caller leg's 200 (of this generation: a re-INVITE's 200 replaces it).
    Retx200(CallHandle, u32),
    Reap(CallHandle),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Caller,
    Trunk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    TrunkInvite,
    TrunkCancel,
    Bye,
    /// An OPTIONS health probe, by probe id.
    Probe(u64),
}

/// The media of an established dialog, as re-offers (re-INVITE) see it.
#[derive(Debug, Clone)]
struct MediaState {
    /// Our current description (answer or offer); its `o=` line carries the version.
    local_sdp: String,
    /// Where the peer last said it receives audio.
    remote: Option<SocketAddr>,
    /// Where the peer last said it receives video.
    remote_video: Option<SocketAddr>,
}

impl MediaState {
    fn new(local_sdp: &str, remote_sdp: &[u8]) -> Self {
        let remote = sdp::parse_offer(&String::from_utf8_lossy(remote_sdp)).ok();
        Self {
            local_sdp: local_sdp.to_owned(),
            remote: remote
                .as_ref()
                .map(|(a, _)| SocketAddr::new(a.addr, a.port)),
            remote_video: remote
                .and_then(|(_, v)| v)
                .map(|v| SocketAddr::new(v.addr, v.port)),
        }
    }

    /// Whether our description relays a video stream (an accepted `m=video`).
    fn has_video(&self) -> bool {
        self.local_sdp
            .lines()
            .any(|l| l.starts_with("m=video ") && !l.starts_with("m=video 0 "))
    }
}

/// Our UAS side of the caller's dialog.
#[derive(Debug)]
struct CallerLeg {
    invite: Request,
    key: TransactionKey,
    src: SocketAddr,
    local_tag: String,
    final_sent: bool,
    ok: Option<Bytes>,
    acked: bool,
    retx_interval: Duration,
    retx_deadline: Option<Instant>,
    local_cseq: u32,
    remote_target: Option<Uri>,
    /// Set once we answered 200 with SDP.
    media: Option<MediaState>,
    /// Which 200 is being retransmitted (bumped by each re-INVITE's 200).
    retx_gen: u32,
    /// CSeq of the INVITE whose 200 awaits its ACK (a late ACK of an earlier one does
    /// not stop a re-INVITE's 200).
    ack_cseq: u32,
}

/// Our UAC side toward the trunk.
#[derive(Debug)]
struct TrunkLeg {
    call_id: String,
    invite: Request,
    dest: SocketAddr,
    to_value: Option<String>,
    remote_target: Option<Uri>,
    answered: bool,
    cancelled: bool,
    /// Whether we already answered a digest challenge (one try per leg, no 401 loops).
    auth_tried: bool,
    /// Set once the trunk answered 200 with SDP.
    media: Option<MediaState>,
}

#[derive(Debug)]
struct Call {
    /// `None` for calls dialled from an IM device (only the trunk leg is SIP).
    caller: Option<CallerLeg>,
    trunk: Option<TrunkLeg>,
    done: bool,
}

/// The B2BUA core.
pub struct SipCore {
    cfg: CoreConfig,
    registry: Arc<Registry>,
    layer: TransactionLayer,
    limits: Limits,
    timers: BTreeMap<(Instant, u64), TimerKind>,
    timer_index: HashMap<(TransactionKey, Timer), (Instant, u64)>,
    timer_seq: u64,
    dests: HashMap<TransactionKey, SocketAddr>,
    purposes: HashMap<TransactionKey, (CallHandle, Purpose)>,
    calls: HashMap<CallHandle, Call>,
    by_call_id: HashMap<String, (CallHandle, Side)>,

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
    /// A core with no calls.
    pub fn new(cfg: CoreConfig, registry: Arc<Registry>) -> Self {
        Self {
            layer: TransactionLayer::new(cfg.timers),
            cfg,
            registry,
            limits: Limits::datagram(),
            timers: BTreeMap::new(),
            timer_index: HashMap::new(),
            timer_seq: 0,
            dests: HashMap::new(),
            purposes: HashMap::new(),
            calls: HashMap::new(),
            by_call_id: HashMap::new(),

            next_probe: 0,
            draining: false,
            out: VecDeque::new(),
        }
    }

    /// Stop accepting new calls (they get 503 with Retry-After).
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Calls whose dialogs are still tracked.
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
        self.timers.keys().next().map(|(t, _)| *t)
    }

    fn contact(&self) -> String {
        format!("sip:parley@{}", self.cfg.local)
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

    fn set_timer(&mut self, at: Instant, kind: TimerKind) {
        self.timer_seq += 1;
        if let TimerKind::Txn(k, t) = &kind
            && let Some(old) = self
                .timer_index
                .insert((k.clone(), *t), (at, self.timer_seq))
        {
            self.timers.remove(&old);
        }
        self.timers.insert((at, self.timer_seq), kind);
    }

    fn run_tx(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        outputs: Vec<TxOut>,
        retransmit: bool,
    ) {
        for o in outputs {
            match o {
                TxOut::Send(msg) => {
                    if retransmit {
                        metrics::counter!(m::SIP_RETRANSMISSIONS_TOTAL).increment(1);
                    }
                    if let Some(dest) = self.dests.get(key).copied() {
                        self.transmit(dest, &msg);
                    }
                }
                TxOut::SetTimer { timer, after } => {
                    self.set_timer(now + after, TimerKind::Txn(key.clone(), timer))
                }
                TxOut::ClearTimer(timer) => {
                    if let Some(at) = self.timer_index.remove(&(key.clone(), timer)) {
                        self.timers.remove(&at);
                    }
                }
                TxOut::ToTu(ev) => self.handle_tu(now, key, *ev),
                TxOut::Terminated(_) => {
                    self.dests.remove(key);
                    self.purposes.remove(key);
                    // Drop this transaction's timers: a bounded set of lookups, never a
                    // scan of every transaction's timers.
                    let stale = Timer::ALL.map(|t| (key.clone(), t));
                    for s in stale {
                        if let Some(at) = self.timer_index.remove(&s) {
                            self.timers.remove(&at);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// A datagram arrived.
    pub fn handle_datagram(&mut self, now: Instant, src: SocketAddr, data: Bytes) {
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return; // RFC 5626 keep-alive
        }
        let message = match sipx_sip::parse_datagram(data, &self.limits) {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => "unparseable")
                    .increment(1);
                tracing::debug!(%src, error = %e, "dropped unparseable SIP datagram");
                return;
            }
        };
        match message {
            Message::Request(req) => {
                metrics::counter!(m::SIP_REQUESTS_TOTAL, "method" => method_label(&req.method))
                    .increment(1);
                if let Err(why) = msg::validate_request(&req) {
                    metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => "bad_header")
                        .increment(1);
                    tracing::info!(%src, why, "malformed SIP request");
                    if req.method != Method::Ack
                        && let Some(r) = msg::response(&req, 400, None, None, None)
                    {
                        self.transmit(src, &Message::Response(r));
                    }
                    return;
                }
                if let Some(Ok(mf)) = req.headers.typed::<sipx_sip::headers::MaxForwards>()
                    && mf.0 == 0
                    && req.method != Method::Ack
                {
                    if let Some(r) = msg::response(&req, 483, None, None, None) {
                        self.transmit(src, &Message::Response(r));
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
                                self.on_ack(&r);
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

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let kind = entry.remove();
            match kind {
                TimerKind::Txn(key, timer) => {
                    self.timer_index.remove(&(key.clone(), timer));
                    let outputs = self.layer.on_timer(&key, timer);
                    self.run_tx(now, &key, outputs, true);
                }
                TimerKind::Retx200(h, generation) => self.retransmit_200(now, h, generation),
                TimerKind::Reap(h) => self.reap(h),
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
            TuEvent::Ack(req) => self.on_ack(&req),
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
        if let Some(r) = msg::response(
            req,
            code,
            tag.or(Some(&msg::token(10))),
            Some(&contact),
            None,
        ) {
            let outputs = self.layer.send_response(key, r);
            self.run_tx(now, key, outputs, false);
        }
    }

    fn on_invite(&mut self, now: Instant, key: &TransactionKey, req: Request) {
        if msg::to_tag(&req.headers).is_some() {
            self.on_reinvite(now, key, &req);
            return;
        }
        if self.draining {
            metrics::counter!(m::SIP_REJECTED_OVERLOAD_TOTAL).increment(1);
            if let Some(r) = msg::response(&req, 503, Some(&msg::token(10)), None, None) {
                let mut r = r;
                if let Ok(h) = sipx_sip::Header::build(HeaderName::RetryAfter, "30") {
                    r.headers.push(h);
                }
                let outputs = self.layer.send_response(key, r);
                self.run_tx(now, key, outputs, false);
            }
            return;
        }
        let Some(src) = self.dests.get(key).copied() else {
            return;
        };
        // 100 Trying at once: stops the gateway's INVITE retransmissions while we route.
        if let Some(r) = msg::response(&req, 100, None, None, None) {
            let outputs = self.layer.send_response(key, r);
            self.run_tx(now, key, outputs, false);
        }
        let dialled = req
            .uri
            .user()
            .map(|u| String::from_utf8_lossy(u).into_owned())
            .unwrap_or_default();
        let Some(called) = numbers::to_e164(&dialled, &self.cfg.region) else {
            self.respond(now, key, &req, 404, None);
            return;
        };
        let Some(user) = self.registry.by_number(&called) else {
            self.respond(now, key, &req, 404, None);
            return;
        };
        let body = String::from_utf8_lossy(req.body()).into_owned();
        let (offer, video) = match sdp::parse_offer(&body) {
            Ok((o, v)) if o.first_g711().is_some() && o.port != 0 => (o, v),
            Ok(_) | Err(_) => {
                metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => "bad_sdp").increment(1);
                self.respond(now, key, &req, 488, None);
                return;
            }
        };
        let Some(from) = msg::from_addr(&req.headers) else {
            return;
        };
        let caller_name = from
            .display_name
            .as_ref()
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .filter(|s| !s.is_empty());
        let from_user = from
            .uri
            .user()
            .map(|u| String::from_utf8_lossy(u).into_owned())
            .unwrap_or_default();
        let caller = numbers::to_e164(&from_user, &self.cfg.region).unwrap_or_else(|| {
            let host = from.uri.host().map(|h| h.to_string()).unwrap_or_default();
            if from_user.is_empty() {
                format!("sip:{host}")
            } else {
                format!("sip:{from_user}@{host}")
            }
        });
        let Some(sip_call_id) = msg::call_id(&req.headers) else {
            return;
        };
        let handle = parley_actors::messages::next_call_handle();
        let ack_cseq = msg::cseq(&req.headers).map_or(0, |c| c.sequence);
        let caller_leg = CallerLeg {
            remote_target: msg::contact_uri(&req.headers),
            invite: req,
            key: key.clone(),
            src,
            local_tag: msg::token(12),
            final_sent: false,
            ok: None,
            acked: false,
            retx_interval: self.cfg.timers.t1,
            retx_deadline: None,
            local_cseq: 1,
            media: None,
            retx_gen: 0,
            ack_cseq,
        };
        self.calls.insert(
            handle,
            Call {
                caller: Some(caller_leg),
                trunk: None,
                done: false,
            },
        );
        self.by_call_id
            .insert(sip_call_id.clone(), (handle, Side::Caller));
        self.out.push_back(Output::NewCall(Box::new(NewCall {
            handle,
            sip_call_id,
            user,
            caller,
            caller_name,
            called,
            offer,
            video,
        })));
    }

    /// A re-INVITE in an established dialog (RFC 3261 §14.2): hold/resume, a session
    /// refresh, or the peer moving its media. Parley's own media address never changes, so
    /// the answer is our description again (direction mirrored, `o=` version bumped when it
    /// changes); if the peer's address moved, the call is told so the relay re-latches and
    /// keeps the stream continuous. A re-offer without the negotiated codec gets 488 and
    /// the call goes on unchanged.
    fn on_reinvite(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        let found = msg::call_id(&req.headers).and_then(|cid| self.by_call_id.get(&cid).copied());
        let Some((h, side)) = found else {
            self.respond(now, key, req, 481, None);
            return;
        };
        let Some(call) = self.calls.get_mut(&h).filter(|c| !c.done) else {
            self.respond(now, key, req, 481, None);
            return;
        };
        let state = match side {
            Side::Caller => call.caller.as_mut().and_then(|l| l.media.as_mut()),
            Side::Trunk => call.trunk.as_mut().and_then(|l| l.media.as_mut()),
        };
        let Some(state) = state else {
            // Not answered yet: our own INVITE transaction is still open (RFC 3261 §14.2).
            metrics::counter!(m::SIP_REINVITES_TOTAL, "result" => "rejected").increment(1);
            self.respond(now, key, req, 491, None);
            return;
        };
        let body = String::from_utf8_lossy(req.body()).into_owned();
        let (mut moved, mut video_moved) = (None, None);
        if !body.trim().is_empty() {
            // The relay does not transcode: the re-offer must keep a codec of ours.
            let ours: Vec<u8> = sdp::parse_audio(&state.local_sdp)
                .map(|m| m.g711_formats())
                .unwrap_or_default();
            let offer = sdp::parse_audio(&body)
                .ok()
                .filter(|o| o.port != 0 && o.g711_formats().iter().any(|pt| ours.contains(pt)));
            let (Some(offer), Ok(dir)) = (offer, sdp::direction(&body)) else {
                metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => "bad_sdp").increment(1);
                metrics::counter!(m::SIP_REINVITES_TOTAL, "result" => "rejected").increment(1);
                tracing::info!(
                    call = h,
                    "re-INVITE refused: no usable audio with the negotiated codec"
                );
                self.respond(now, key, req, 488, None);
                return;
            };
            let dir = dir.answer();
            let version = sdp::version(&state.local_sdp).unwrap_or(0);
            if sdp::redescribe(&state.local_sdp, dir, version) != state.local_sdp {
                state.local_sdp = sdp::redescribe(&state.local_sdp, dir, version + 1);
            }
            let addr = SocketAddr::new(offer.addr, offer.port);
            if !offer.addr.is_unspecified() && state.remote != Some(addr) {
                state.remote = Some(addr);
                moved = Some(addr);
            }
            // The video stream we relay, if any, follows its own address.
            if state.has_video()
                && let Ok((_, Some(v))) = sdp::parse_offer(&body)
                && !v.addr.is_unspecified()
            {
                let addr = SocketAddr::new(v.addr, v.port);
                if state.remote_video != Some(addr) {
                    state.remote_video = Some(addr);
                    video_moved = Some(addr);
                }
            }
        }
        // Without SDP the re-INVITE asks for our offer: the current description.
        let answer = state.local_sdp.clone();
        let result = if moved.is_some() || video_moved.is_some() {
            "moved"
        } else {
            "accepted"
        };
        metrics::counter!(m::SIP_REINVITES_TOTAL, "result" => result).increment(1);
        if let Some(addr) = moved {
            tracing::info!(call = h, side = ?side, media = %addr, "re-INVITE moved the peer's media");
            let ev = match side {
                Side::Caller => SipEvent::CallerMediaMoved(addr),
                Side::Trunk => SipEvent::TrunkMediaMoved(addr),
            };
            self.out.push_back(Output::Event(h, ev));
        }
        if let Some(addr) = video_moved
            && side == Side::Caller
        {
            tracing::info!(call = h, media = %addr, "re-INVITE moved the peer's video");
            self.out
                .push_back(Output::Event(h, SipEvent::CallerVideoMoved(addr)));
        }
        let contact = self.contact();
        let Some(resp) = msg::response(req, 200, None, Some(&contact), Some(&answer)) else {
            return;
        };
        // On the caller's dialog the 200 is retransmitted until its ACK, like the first.
        if side == Side::Caller
            && let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.caller.as_mut())
        {
            leg.ok = Some(Message::Response(resp.clone()).to_bytes());
            leg.acked = false;
            leg.retx_gen += 1;
            leg.ack_cseq = msg::cseq(&req.headers).map_or(0, |c| c.sequence);
            leg.retx_interval = self.cfg.timers.t1;
            leg.retx_deadline = Some(now + self.cfg.timers.timeout());
            let generation = leg.retx_gen;
            self.set_timer(now + self.cfg.timers.t1, TimerKind::Retx200(h, generation));
        }
        let outputs = self.layer.send_response(key, resp);
        self.run_tx(now, key, outputs, false);
    }

    fn on_ack(&mut self, req: &Request) {
        let Some(cid) = msg::call_id(&req.headers) else {
            return;
        };
        if let Some((h, Side::Caller)) = self.by_call_id.get(&cid).copied()
            && let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.caller.as_mut())
            && msg::cseq(&req.headers).is_none_or(|c| c.sequence == leg.ack_cseq)
        {
            leg.acked = true;
        }
    }

    fn on_bye(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        let found = msg::call_id(&req.headers).and_then(|cid| self.by_call_id.get(&cid).copied());
        match found {
            Some((h, side)) => {
                self.respond(now, key, req, 200, None);
                if let Some(call) = self.calls.get_mut(&h)
                    && !call.done
                {
                    let ev = match side {
                        Side::Caller => {
                            if let Some(leg) = call.caller.as_mut() {
                                leg.acked = true;
                            }
                            SipEvent::CallerBye
                        }
                        Side::Trunk => SipEvent::TrunkBye,
                    };
                    self.out.push_back(Output::Event(h, ev));
                }
            }
            None => self.respond(now, key, req, 481, None),
        }
    }

    fn on_cancel(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        let found = msg::call_id(&req.headers).and_then(|cid| self.by_call_id.get(&cid).copied());
        match found {
            Some((h, Side::Caller)) => {
                self.respond(now, key, req, 200, None);
                if let Some(call) = self.calls.get(&h)
                    && call.caller.as_ref().is_some_and(|c| !c.final_sent)
                    && !call.done
                {
                    self.out.push_back(Output::Event(h, SipEvent::CallerCancel));
                }
            }
            _ => self.respond(now, key, req, 481, None),
        }
    }

    fn on_response(&mut self, now: Instant, key: &TransactionKey, resp: &Response) {
        let Some((h, purpose)) = self.purposes.get(key).copied() else {
            return;
        };
        let code = resp.status.code();
        if let Purpose::Probe(id) = purpose {
            if code >= 200 {
                self.out.push_back(Output::ProbeResult {
                    id,
                    code: Some(code),
                });
            }
            return;
        }
        if purpose != Purpose::TrunkInvite {
            return;
        }
        let Some(call) = self.calls.get_mut(&h) else {
            return;
        };
        let done = call.done;
        let Some(leg) = call.trunk.as_mut() else {
            return;
        };
        match code {
            100 => {}
            101..=199 => {
                if !done {
                    self.out.push_back(Output::Event(h, SipEvent::TrunkRinging));
                }
            }
            200..=299 => {
                let first = !leg.answered;
                leg.answered = true;
                leg.to_value = msg::header_str(&resp.headers, &HeaderName::To);
                leg.remote_target =
                    msg::contact_uri(&resp.headers).or_else(|| leg.remote_target.clone());
                self.send_trunk_ack(h);
                if !first {
                    return;
                }
                let cancelled = self
                    .calls
                    .get(&h)
                    .and_then(|c| c.trunk.as_ref())
                    .is_some_and(|t| t.cancelled);
                if done || cancelled {
                    self.send_trunk_bye(now, h);
                    return;
                }
                match sdp::parse_audio(&String::from_utf8_lossy(resp.body())) {
                    Ok(md) if md.first_g711().is_some() => {
                        if let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.trunk.as_mut()) {
                            let local = String::from_utf8_lossy(leg.invite.body()).into_owned();
                            leg.media = Some(MediaState::new(&local, resp.body()));
                        }
                        self.out
                            .push_back(Output::Event(h, SipEvent::TrunkAnswered(md)));
                    }
                    _ => {
                        self.send_trunk_bye(now, h);
                        self.out
                            .push_back(Output::Event(h, SipEvent::TrunkFailed(488)));
                    }
                }
            }
            401 | 407
                if !done && !leg.cancelled && !leg.auth_tried && self.cfg.trunk_auth.is_some() =>
            {
                leg.auth_tried = true;
                if !self.retry_with_credentials(now, h, resp) {
                    self.out
                        .push_back(Output::Event(h, SipEvent::TrunkFailed(code)));
                }
            }
            _ => {
                // A 487 to our own CANCEL (re-route, caller cancel) is not a trunk failure.
                if !done && !leg.cancelled {
                    self.out
                        .push_back(Output::Event(h, SipEvent::TrunkFailed(code)));
                }
            }
        }
    }

    /// Answers the trunk's digest challenge: the same INVITE (same dialog identifiers, next
    /// CSeq, new branch) with credentials. Returns false when the challenge is unusable.
    fn retry_with_credentials(&mut self, now: Instant, h: CallHandle, resp: &Response) -> bool {
        let Some(creds) = self.cfg.trunk_auth.clone() else {
            return false;
        };
        let mut challenges = Vec::new();
        for (name, proxy) in [
            (HeaderName::WwwAuthenticate, false),
            (HeaderName::ProxyAuthenticate, true),
        ] {
            for hdr in resp.headers.get_all(&name) {
                if let Some(c) = sipx_sip::auth::Challenge::parse(&hdr.value(), proxy) {
                    challenges.push(c);
                }
            }
        }
        let Some(challenge) = sipx_sip::auth::strongest(challenges) else {
            tracing::warn!("trunk challenge without a usable Digest offer");
            return false;
        };
        let via = self.via();
        let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.trunk.as_mut()) else {
            return false;
        };
        let inv = &leg.invite;
        let uri = inv.uri.to_string();
        let answer =
            sipx_sip::auth::respond(&challenge, &creds, "INVITE", &uri, 1, &msg::token(16));
        let seq = msg::cseq(&inv.headers).map_or(1, |c| c.sequence) + 1;
        let mut b = RequestBuilder::new(Method::Invite, inv.uri.clone());
        let Ok(nb) = b.header(HeaderName::Via, via) else {
            return false;
        };
        b = nb.max_forwards(70);
        for name in [
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::Contact,
            HeaderName::UserAgent,
            HeaderName::ContentType,
        ] {
            if let Some(v) = inv.headers.value(&name) {
                let Ok(nb) = b.header(name, Bytes::from(v.into_owned())) else {
                    return false;
                };
                b = nb;
            }
        }
        let Ok(nb) = b
            .cseq(seq, &Method::Invite)
            .and_then(|b| b.header(challenge.response_header(), answer))
        else {
            return false;
        };
        let req = nb.body(inv.body().clone()).build();
        leg.invite = req.clone();
        let dest = leg.dest;
        tracing::info!(realm = %challenge.realm, "answering the trunk's digest challenge");
        self.send_request(now, h, req, dest, Purpose::TrunkInvite);
        true
    }

    fn trunk_leg_abandoned(&self, h: CallHandle) -> bool {
        self.calls
            .get(&h)
            .is_none_or(|c| c.done || c.trunk.as_ref().is_none_or(|t| t.cancelled))
    }

    /// Sends an OPTIONS probe to `dest` (a trunk health check); the outcome comes out as
    /// [`Output::ProbeResult`] with the returned id.
    pub fn send_probe(&mut self, now: Instant, dest: SocketAddr) -> u64 {
        self.next_probe += 1;
        let id = self.next_probe;
        let via = self.via();
        let contact = self.contact();
        let from = format!("<sip:parley@{}>;tag={}", self.cfg.local, msg::token(10));
        let to = format!("<sip:{dest}>");
        let cid = format!("{}@parley", msg::token(20));
        let req = Uri::parse(Bytes::from(format!("sip:{dest}")))
            .ok()
            .and_then(|uri| {
                build_request(
                    Method::Options,
                    uri,
                    &via,
                    &from,
                    &to,
                    &cid,
                    1,
                    &contact,
                    &[],
                    None,
                )
            });
        match req {
            Some(req) => self.send_request(now, 0, req, dest, Purpose::Probe(id)),
            None => self.out.push_back(Output::ProbeResult { id, code: None }),
        }
        id
    }

    fn on_stray_response(&mut self, resp: &Response) {
        // A 2xx retransmitted after our INVITE transaction ended: our ACK was lost.
        let is_invite_2xx = resp.status.is_success()
            && msg::cseq(&resp.headers).is_some_and(|c| c.method == Method::Invite);
        if !is_invite_2xx {
            return;
        }
        if let Some((h, Side::Trunk)) =
            msg::call_id(&resp.headers).and_then(|c| self.by_call_id.get(&c).copied())
        {
            self.send_trunk_ack(h);
        }
    }

    /// A command from a call actor.
    pub fn handle_command(&mut self, now: Instant, handle: CallHandle, cmd: SipLegCmd) {
        match cmd {
            SipLegCmd::CallerRinging => self.caller_response(now, handle, 180, None),
            SipLegCmd::CallerAnswer { sdp } => self.caller_response(now, handle, 200, Some(&sdp)),
            SipLegCmd::CallerReject(code) => self.caller_response(now, handle, code, None),
            SipLegCmd::CallerBye => self.send_caller_bye(now, handle),
            SipLegCmd::TrunkInvite {
                to,
                from,
                from_name,
                sdp,
                ..
            } => self.send_trunk_invite(now, handle, &to, &from, from_name.as_deref(), &sdp),
            SipLegCmd::TrunkCancel => self.send_trunk_cancel(now, handle),
            SipLegCmd::TrunkBye => self.send_trunk_bye(now, handle),
            SipLegCmd::Done => {
                if let Some(c) = self.calls.get_mut(&handle) {
                    c.done = true;
                    if let Some(leg) = c.caller.as_mut() {
                        leg.retx_deadline = None;
                    }
                }
                // Keep the dialog a while to absorb retransmissions, then forget it.
                self.set_timer(now + self.cfg.timers.timeout(), TimerKind::Reap(handle));
            }
        }
    }

    fn caller_response(&mut self, now: Instant, h: CallHandle, code: u16, sdp: Option<&str>) {
        let contact = self.contact();
        let Some(call) = self.calls.get_mut(&h) else {
            return;
        };
        let Some(leg) = call.caller.as_mut() else {
            return;
        };
        if leg.final_sent {
            return;
        }
        let Some(resp) =
            msg::response(&leg.invite, code, Some(&leg.local_tag), Some(&contact), sdp)
        else {
            return;
        };
        let key = leg.key.clone();
        if code >= 200 {
            leg.final_sent = true;
        }
        if code == 200 {
            if let Some(local) = sdp {
                leg.media = Some(MediaState::new(local, leg.invite.body()));
            }
            leg.ok = Some(Message::Response(resp.clone()).to_bytes());
            leg.retx_interval = self.cfg.timers.t1;
            leg.retx_deadline = Some(now + self.cfg.timers.timeout());
            let generation = leg.retx_gen;
            self.set_timer(now + self.cfg.timers.t1, TimerKind::Retx200(h, generation));
        }
        let outputs = self.layer.send_response(&key, resp);
        self.run_tx(now, &key, outputs, false);
    }

    fn retransmit_200(&mut self, now: Instant, h: CallHandle, generation: u32) {
        let t2 = self.cfg.timers.t2;
        let Some(call) = self.calls.get_mut(&h) else {
            return;
        };
        let Some(leg) = call.caller.as_mut() else {
            return;
        };
        let (Some(deadline), Some(ok), false) = (leg.retx_deadline, leg.ok.clone(), leg.acked)
        else {
            return;
        };
        if generation != leg.retx_gen {
            return; // superseded by a re-INVITE's 200
        }
        if now >= deadline {
            leg.retx_deadline = None;
            if !call.done {
                self.out
                    .push_back(Output::Event(h, SipEvent::CallerAckTimeout));
            }
            return;
        }
        leg.retx_interval = (leg.retx_interval * 2).min(t2);
        let (src, next) = (leg.src, now + leg.retx_interval);
        metrics::counter!(m::SIP_RETRANSMISSIONS_TOTAL).increment(1);
        self.out.push_back(Output::Transmit {
            dest: src,
            data: ok,
        });
        self.set_timer(next, TimerKind::Retx200(h, generation));
    }

    fn via(&self) -> String {
        format!(
            "SIP/2.0/UDP {};branch={};rport",
            self.cfg.local,
            msg::branch()
        )
    }

    fn send_request(
        &mut self,
        now: Instant,
        h: CallHandle,
        req: Request,
        dest: SocketAddr,
        purpose: Purpose,
    ) {
        let Some((key, outputs)) = self.layer.send_request(req, Reliability::Unreliable) else {
            tracing::error!("could not create a client transaction");
            return;
        };
        self.dests.insert(key.clone(), dest);
        self.purposes.insert(key.clone(), (h, purpose));
        self.run_tx(now, &key, outputs, false);
    }

    fn send_caller_bye(&mut self, now: Instant, h: CallHandle) {
        let via = self.via();
        let contact = self.contact();
        let Some(call) = self.calls.get_mut(&h) else {
            return;
        };
        let Some(leg) = call.caller.as_mut() else {
            return;
        };
        leg.local_cseq += 1;
        leg.retx_deadline = None;
        let inv = &leg.invite;
        let Some(target) = leg
            .remote_target
            .clone()
            .or_else(|| msg::from_addr(&inv.headers).map(|a| a.uri))
        else {
            return;
        };
        let (Some(from), Some(to), Some(cid)) = (
            msg::header_str(&inv.headers, &HeaderName::To),
            msg::header_str(&inv.headers, &HeaderName::From),
            msg::call_id(&inv.headers),
        ) else {
            return;
        };
        let from = if msg::to_tag(&inv.headers).is_some() {
            from
        } else {
            format!("{from};tag={}", leg.local_tag)
        };
        let route: Vec<String> = inv
            .headers
            .get_all(&HeaderName::RecordRoute)
            .map(|h| String::from_utf8_lossy(&h.value()).into_owned())
            .collect();
        let (cseq, dest) = (leg.local_cseq, leg.src);
        let Some(req) = build_request(
            Method::Bye,
            target,
            &via,
            &from,
            &to,
            &cid,
            cseq,
            &contact,
            &route,
            None,
        ) else {
            return;
        };
        self.send_request(now, h, req, dest, Purpose::Bye);
    }

    fn send_trunk_invite(
        &mut self,
        now: Instant,
        h: CallHandle,
        to: &str,
        from: &str,
        from_name: Option<&str>,
        body: &str,
    ) {
        let Some(trunk) = self.cfg.trunk else {
            self.out
                .push_back(Output::Event(h, SipEvent::TrunkFailed(503)));
            return;
        };
        let via = self.via();
        let contact = self.contact();
        let Ok(uri) = Uri::parse(Bytes::from(format!("sip:{to}@{trunk}"))) else {
            self.out
                .push_back(Output::Event(h, SipEvent::TrunkFailed(484)));
            return;
        };
        let from_user = from
            .strip_prefix("sip:")
            .map(|s| s.split('@').next().unwrap_or("anonymous"))
            .unwrap_or(from);
        let display = from_name
            .map(|n| format!("\"{}\" ", n.replace(['"', '\\', '\r', '\n'], "")))
            .unwrap_or_default();
        let from_hdr = format!(
            "{display}<sip:{from_user}@{}>;tag={}",
            self.cfg.local.ip(),
            msg::token(12)
        );
        let to_hdr = format!("<sip:{to}@{trunk}>");
        let cid = format!("{}@parley", msg::token(20));
        let Some(req) = build_request(
            Method::Invite,
            uri,
            &via,
            &from_hdr,
            &to_hdr,
            &cid,
            1,
            &contact,
            &[],
            Some(body),
        ) else {
            self.out
                .push_back(Output::Event(h, SipEvent::TrunkFailed(500)));
            return;
        };
        let call = self.calls.entry(h).or_insert_with(|| Call {
            caller: None,
            trunk: None,
            done: false,
        });
        {
            call.trunk = Some(TrunkLeg {
                call_id: cid.clone(),
                invite: req.clone(),
                dest: trunk,
                to_value: None,
                remote_target: None,
                answered: false,
                cancelled: false,
                auth_tried: false,
                media: None,
            });
        }
        self.by_call_id.insert(cid, (h, Side::Trunk));
        self.send_request(now, h, req, trunk, Purpose::TrunkInvite);
    }

    fn send_trunk_cancel(&mut self, now: Instant, h: CallHandle) {
        let Some(leg) = self.calls.get_mut(&h).and_then(|c| c.trunk.as_mut()) else {
            return;
        };
        if leg.answered || leg.cancelled {
            return;
        }
        leg.cancelled = true;
        let inv = leg.invite.clone();
        let dest = leg.dest;
        // CANCEL copies Request-URI, Via (same branch), From, To, Call-ID and the CSeq number.
        let mut b = RequestBuilder::new(Method::Cancel, inv.uri.clone());
        for name in [
            HeaderName::Via,
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
        ] {
            if let Some(v) = inv.headers.value(&name) {
                let Ok(nb) = b.header(name, Bytes::from(v.into_owned())) else {
                    return;
                };
                b = nb;
            }
        }
        let seq = msg::cseq(&inv.headers).map(|c| c.sequence).unwrap_or(1);
        let Ok(b) = b.max_forwards(70).cseq(seq, &Method::Cancel) else {
            return;
        };
        self.send_request(now, h, b.build(), dest, Purpose::TrunkCancel);
    }

    /// A request inside the trunk dialog (ACK for the 2xx: the INVITE's CSeq; BYE: the
    /// next one), addressed to the trunk's Contact, with where to send it.
    fn trunk_dialog_request(&self, h: CallHandle, method: Method) -> Option<(Request, SocketAddr)> {
        let leg = self.calls.get(&h)?.trunk.as_ref()?;
        let inv = &leg.invite;
        let target = leg.remote_target.clone().unwrap_or_else(|| inv.uri.clone());
        let from = msg::header_str(&inv.headers, &HeaderName::From)?;
        let to = leg.to_value.clone()?;
        let invite_seq = msg::cseq(&inv.headers).map_or(1, |c| c.sequence);
        let seq = if method == Method::Ack {
            invite_seq
        } else {
            invite_seq + 1
        };
        let req = build_request(
            method,
            target,
            &self.via(),
            &from,
            &to,
            &leg.call_id,
            seq,
            &self.contact(),
            &[],
            None,
        )?;
        Some((req, leg.dest))
    }

    fn send_trunk_ack(&mut self, h: CallHandle) {
        if let Some((ack, dest)) = self.trunk_dialog_request(h, Method::Ack) {
            self.transmit(dest, &Message::Request(ack));
        }
    }

    fn send_trunk_bye(&mut self, now: Instant, h: CallHandle) {
        let answered = self
            .calls
            .get(&h)
            .and_then(|c| c.trunk.as_ref())
            .is_some_and(|t| t.answered);
        if let (true, Some((bye, dest))) = (answered, self.trunk_dialog_request(h, Method::Bye)) {
            self.send_request(now, h, bye, dest, Purpose::Bye);
        }
    }

    fn reap(&mut self, h: CallHandle) {
        if let Some(call) = self.calls.remove(&h) {
            if let Some(cid) = call
                .caller
                .as_ref()
                .and_then(|c| msg::call_id(&c.invite.headers))
            {
                self.by_call_id.remove(&cid);
            }
            if let Some(t) = call.trunk {
                self.by_call_id.remove(&t.call_id);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn build_request(
    method: Method,
    uri: Uri,
    via: &str,
    from: &str,
    to: &str,
    call_id: &str,
    cseq: u32,
    contact: &str,
    route: &[String],
    sdp: Option<&str>,
) -> Option<Request> {
    let mut b = RequestBuilder::new(method.clone(), uri)
        .header(HeaderName::Via, via.to_owned())
        .ok()?
        .max_forwards(70)
        .header(HeaderName::From, from.to_owned())
        .ok()?
        .header(HeaderName::To, to.to_owned())
        .ok()?
        .header(HeaderName::CallId, call_id.to_owned())
        .ok()?
        .cseq(cseq, &method)
        .ok()?;
    for r in route {
        b = b.header(HeaderName::Route, r.clone()).ok()?;
    }
    if method != Method::Ack || sdp.is_some() {
        b = b.header(HeaderName::Contact, format!("<{contact}>")).ok()?;
    }
    b = b.header(HeaderName::UserAgent, "Parley/0.1").ok()?;
    if let Some(body) = sdp {
        b = b
            .header(HeaderName::ContentType, "application/sdp")
            .ok()?
            .body(Bytes::from(body.to_owned()));
    }
    Some(b.build())
}
