//! A sans-IO SIP user agent client for many concurrent calls: the PSTN-gateway side of a
//! call storm.
//!
//! [`Uac`] owns the state of every call it places. It opens no socket and reads no clock:
//! the driver feeds it datagrams ([`Uac::handle_datagram`]) and time
//! ([`Uac::handle_timeout`]), starts calls ([`Uac::start_call`]), and drains
//! [`Uac::poll_output`] (datagrams to send, then what happened to the
//! calls) until both are empty; [`Uac::poll_timeout`] says when to call again.
//!
//! Per call: INVITE with a PCMU offer, retransmitted on RFC 3261 Timer A (T1 doubling)
//! until a provisional or final response; ACK on a 2xx (in a new transaction) or on a
//! non-2xx final (same branch); after the hold time a BYE, retransmitted on Timer E until
//! a final response or Timer F (64·T1). A BYE from the far end is answered 200. A call
//! with no final response within the answer timeout is CANCELled once a provisional
//! response allows it, and counted as [`Outcome::Timeout`].
//!
//! Outgoing messages are written with `format!`-style writes into one growing buffer
//! (`BytesMut`), so building a message costs no allocation beyond the buffer's amortised
//! growth. Incoming ones are parsed by `sipx-sip`; anything malformed is counted in
//! [`UacCounters`] and otherwise ignored.
//!
//! Timers live in one binary heap with lazy deletion: each call records the instant its
//! retransmission, deadline and hold timers are due, and a popped entry whose instant no
//! longer matches is stale and skipped.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use sipx_sip::headers::{CallId, Contact, To};
use sipx_sip::{CSeq, HeaderName, Headers, Message, Method, Request, Response};

/// RFC 3261 T1, the round-trip estimate that scales every retransmission timer.
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 T2, the cap of non-INVITE retransmission intervals.
pub const T2: Duration = Duration::from_secs(4);
/// The RTP port offered when the storm sends no media (the "discard" port).
pub const DISCARD_PORT: u16 = 9;

/// Longest hold and answer timeout honoured (a year): keeps every timer instant
/// representable.
pub const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Growth step of the outgoing-message buffer.
const WRITE_CHUNK: usize = 64 * 1024;

/// A call's number within one [`Uac`], in start order from 0.
pub type CallNo = u64;

/// How the UAC identifies itself and where it sends.
#[derive(Debug, Clone)]
pub struct UacConfig {
    /// Our address as written in Via, Contact, From and the SDP (a concrete IP, not
    /// `0.0.0.0`).
    pub local: SocketAddr,
    /// The next hop: every request goes here, and the Request-URI of each INVITE is
    /// `sip:<number>@<target>`.
    pub target: SocketAddr,
    /// The calling number (From user part).
    pub from: String,
    /// RFC 3261 T1.
    pub t1: Duration,
    /// RFC 3261 T2.
    pub t2: Duration,
    /// A call with no final INVITE response this long after the INVITE fails as
    /// [`Outcome::Timeout`].
    pub answer_timeout: Duration,
    /// Parse the SDP answer of each 2xx and report its media address in
    /// [`Event::Answered`].
    pub parse_sdp: bool,
}

impl UacConfig {
    /// A configuration with RFC 3261 default timers, a 32 s answer timeout and no SDP
    /// parsing.
    pub fn new(local: SocketAddr, target: SocketAddr, from: impl Into<String>) -> Self {
        UacConfig {
            local,
            target,
            from: from.into(),
            t1: T1,
            t2: T2,
            answer_timeout: T1 * 64,
            parse_sdp: false,
        }
    }
}

/// How a call ended. Every started call ends exactly once, in an [`Event::Ended`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Answered; our BYE got a 2xx.
    Completed,
    /// Answered; the far end hung up (its BYE was answered 200).
    RemoteBye,
    /// The INVITE got this non-2xx final response.
    Rejected(u16),
    /// No final INVITE response within the answer timeout (the call was CANCELled when a
    /// provisional response allowed it).
    Timeout,
    /// Answered, but our BYE got no final response within 64·T1.
    ByeTimeout,
    /// Answered, but our BYE got this non-2xx final response.
    ByeRejected(u16),
}

impl Outcome {
    /// Whether the call was answered and ended cleanly.
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Completed | Outcome::RemoteBye)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Completed => f.write_str("completed"),
            Outcome::RemoteBye => f.write_str("remote_bye"),
            Outcome::Rejected(code) => write!(f, "{code}"),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::ByeTimeout => f.write_str("bye_timeout"),
            Outcome::ByeRejected(code) => write!(f, "bye_{code}"),
        }
    }
}

/// What happened to a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The first 18x (not 100) arrived; `pdd` is the post-dial delay since the INVITE.
    Ringing {
        /// The call.
        call: CallNo,
        /// INVITE sent → first 18x received.
        pdd: Duration,
    },
    /// The first 2xx to the INVITE arrived and was ACKed.
    Answered {
        /// The call.
        call: CallNo,
        /// INVITE sent → 2xx received.
        setup: Duration,
        /// Where the far end receives RTP, from the SDP answer (only with
        /// [`UacConfig::parse_sdp`]; `None` when absent or unparseable).
        media: Option<SocketAddr>,
    },
    /// The call is over and forgotten.
    Ended {
        /// The call.
        call: CallNo,
        /// How it ended.
        outcome: Outcome,
    },
}

/// What the UAC asks its driver to do.
#[derive(Debug)]
pub enum Output {
    /// Send a datagram.
    Transmit(Transmit),
    /// Something happened to a call.
    Event(Event),
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dest: SocketAddr,
    /// The whole SIP message.
    pub data: Bytes,
}

/// Counters of things that are not call outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UacCounters {
    /// Requests we sent again on a retransmission timer (INVITE, BYE, CANCEL).
    pub retransmissions: u64,
    /// 2xx INVITE responses received again after our ACK (each is ACKed again).
    pub duplicate_2xx: u64,
    /// Datagrams that did not parse as SIP or lacked a usable Call-ID, CSeq, Via, From or
    /// To.
    pub bad_messages: u64,
    /// Well-formed messages for no live call, or out of place in their call.
    pub stray_messages: u64,
    /// Requests from the far end we answered with an error (re-INVITE, INFO, …: 501).
    pub unsupported_requests: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// INVITE sent, nothing heard.
    Inviting,
    /// A provisional response arrived.
    Proceeding,
    /// The answer timeout passed; waiting for the INVITE transaction to end.
    Cancelling { cancel_sent: bool },
    /// ACKed; holding.
    Confirmed,
    /// BYE sent.
    Terminating,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Retransmit,
    Deadline,
    Hold,
}

struct Call {
    call_id: Box<str>,
    /// Where this call's requests go (the UAC's target, or one of several).
    target: SocketAddr,
    to: Box<str>,
    started: Instant,
    phase: Phase,
    ringing: bool,
    /// Decided before the call is over (timeout while cancelling).
    outcome: Option<Outcome>,
    /// Kept for Timer A only: emptied once a response stops the retransmissions, so that
    /// a held call does not pin the write buffer it was built in.
    invite: Bytes,
    /// The BYE or CANCEL being retransmitted.
    request: Option<Bytes>,
    /// The 2xx was ACKed (a retransmitted 2xx is ACKed again: the ACK is rebuilt, same
    /// bytes, rather than kept for the whole hold).
    acked: bool,
    retx_interval: Duration,
    retx_at: Option<Instant>,
    deadline_at: Option<Instant>,
    hold_at: Option<Instant>,
    hold: Duration,
    /// The dialog, from the 2xx: To with the remote tag, remote target, route set.
    remote_to: Box<str>,
    remote_target: Box<str>,
    route: Vec<Box<str>>,
}

/// The UAC: every call's state, the timer heap and the output queues.
pub struct Uac {
    cfg: UacConfig,
    /// Random per `Uac`, in every Call-ID, tag and branch.
    run: String,
    limits: sipx_sip::Limits,
    calls: HashMap<CallNo, Call>,
    timers: BinaryHeap<Reverse<(Instant, CallNo, TimerKind)>>,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    wbuf: BytesMut,
    /// Scratch for SDP bodies (written before the headers that give their length).
    sdp: String,
    next_call: CallNo,
    stray_acks: u64,
    counters: UacCounters,
    stopping: bool,
}

impl fmt::Debug for Uac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uac")
            .field("target", &self.cfg.target)
            .field("active", &self.calls.len())
            .field("started", &self.next_call)
            .finish_non_exhaustive()
    }
}

/// An IP address as a URI host (IPv6 in brackets).
struct UriHost(IpAddr);

impl fmt::Display for UriHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}"),
            IpAddr::V6(ip) => write!(f, "[{ip}]"),
        }
    }
}

/// `BytesMut` grows instead of failing, so writing into it cannot return an error.
fn put_fmt(buf: &mut BytesMut, args: fmt::Arguments<'_>) {
    let _ = buf.write_fmt(args);
}

impl Uac {
    /// A UAC with no calls. `run` goes into every Call-ID, tag and branch; give each run a
    /// different one (e.g. random) so that two runs never share a Call-ID.
    pub fn new(cfg: UacConfig, run: impl Into<String>) -> Self {
        Uac {
            cfg,
            run: run.into(),
            limits: sipx_sip::Limits::datagram(),
            calls: HashMap::new(),
            timers: BinaryHeap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            wbuf: BytesMut::new(),
            sdp: String::with_capacity(256),
            next_call: 0,
            stray_acks: 0,
            counters: UacCounters::default(),
            stopping: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &UacConfig {
        &self.cfg
    }

    /// Calls started and not yet ended.
    pub fn active(&self) -> usize {
        self.calls.len()
    }

    /// Calls started so far.
    pub fn started(&self) -> u64 {
        self.next_call
    }

    /// The counters.
    pub fn counters(&self) -> UacCounters {
        self.counters
    }

    /// The next thing to do: datagrams to send come before call events, so that a
    /// driver which stops draining at an event has already sent what the event follows.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(t) = self.out.pop_front() {
            return Some(Output::Transmit(t));
        }
        self.events.pop_front().map(Output::Event)
    }

    /// When [`Self::handle_timeout`] should next be called (possibly early: stale timers
    /// are only dropped when due).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Places a call to `to` (a number: the Request-URI and To user part), offering PCMU
    /// on `media_port`; the call hangs up `hold` after it is answered.
    pub fn start_call(
        &mut self,
        now: Instant,
        to: &str,
        hold: Duration,
        media_port: u16,
    ) -> CallNo {
        self.start_call_via(now, self.cfg.target, to, hold, media_port)
    }

    /// As [`Uac::start_call`], toward `target` instead of the configured one (a storm
    /// spread over several switches): the call's requests all go there.
    pub fn start_call_via(
        &mut self,
        now: Instant,
        target: SocketAddr,
        to: &str,
        hold: Duration,
        media_port: u16,
    ) -> CallNo {
        let no = self.next_call;
        self.next_call += 1;
        let call_id: Box<str> = format!("{no}-{}@parley-load", self.run).into();
        let invite = self.write_invite(no, &call_id, target, to, media_port);
        self.send(target, invite.clone());
        let t1 = self.cfg.t1;
        let deadline = now + self.cfg.answer_timeout.min(t1 * 64);
        let hold = if self.stopping {
            Duration::ZERO
        } else {
            hold.min(MAX_TIMER)
        };
        self.calls.insert(
            no,
            Call {
                call_id,
                target,
                to: to.into(),
                started: now,
                phase: Phase::Inviting,
                ringing: false,
                outcome: None,
                invite,
                request: None,
                acked: false,
                retx_interval: t1,
                retx_at: Some(now + t1),
                deadline_at: Some(deadline),
                hold_at: None,
                hold,
                remote_to: Box::default(),
                remote_target: Box::default(),
                route: Vec::new(),
            },
        );
        self.timers
            .push(Reverse((now + t1, no, TimerKind::Retransmit)));
        self.timers
            .push(Reverse((deadline, no, TimerKind::Deadline)));
        no
    }

    /// Stops holding: every answered call hangs up now, and calls answered from now on
    /// hang up at once.
    pub fn hang_up_all(&mut self, now: Instant) {
        self.stopping = true;
        for (no, call) in &mut self.calls {
            call.hold = Duration::ZERO;
            if call.phase == Phase::Confirmed {
                call.hold_at = Some(now);
                self.timers.push(Reverse((now, *no, TimerKind::Hold)));
            }
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, no, kind))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.fire(now, at, no, kind);
        }
    }

    /// A datagram arrived from `src`.
    pub fn handle_datagram(&mut self, now: Instant, src: SocketAddr, data: Bytes) {
        if data.iter().all(u8::is_ascii_whitespace) {
            return; // RFC 5626 keep-alive
        }
        match sipx_sip::parse_datagram(data, &self.limits) {
            Ok(Message::Response(resp)) => self.on_response(now, src, &resp),
            Ok(Message::Request(req)) => self.on_request(src, &req),
            Err(_) => self.counters.bad_messages += 1,
        }
    }

    fn send(&mut self, dest: SocketAddr, data: Bytes) {
        self.out.push_back(Transmit { dest, data });
    }

    fn emit(&mut self, ev: Event) {
        self.events.push_back(ev);
    }

    fn finish(&mut self, no: CallNo, outcome: Outcome) {
        if self.calls.remove(&no).is_some() {
            self.emit(Event::Ended { call: no, outcome });
        }
    }

    /// The live call a Call-ID names (ours are `<number>-<run>@parley-load`).
    fn find(&self, headers: &Headers) -> Result<Option<CallNo>, ()> {
        let Some(Ok(cid)) = headers.typed::<CallId>() else {
            return Err(());
        };
        let digits = cid.0.iter().take_while(|b| b.is_ascii_digit()).count();
        let no = std::str::from_utf8(&cid.0[..digits])
            .ok()
            .and_then(|s| s.parse::<CallNo>().ok());
        Ok(no.filter(|no| {
            self.calls
                .get(no)
                .is_some_and(|c| c.call_id.as_bytes() == cid.0.as_slice())
        }))
    }

    fn fire(&mut self, now: Instant, at: Instant, no: CallNo, kind: TimerKind) {
        let t2 = self.cfg.t2;
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        match kind {
            TimerKind::Retransmit => {
                if call.retx_at != Some(at) {
                    return;
                }
                let (data, next) = match (&call.request, call.phase) {
                    // Timer E: doubling, capped at T2.
                    (Some(req), _) => (req.clone(), (call.retx_interval * 2).min(t2)),
                    // Timer A: doubling, uncapped; Timer B (the deadline) ends it.
                    (None, Phase::Inviting | Phase::Cancelling { cancel_sent: false }) => {
                        (call.invite.clone(), call.retx_interval * 2)
                    }
                    (None, _) => {
                        call.retx_at = None;
                        return;
                    }
                };
                call.retx_interval = next;
                call.retx_at = Some(now + next);
                self.timers
                    .push(Reverse((now + next, no, TimerKind::Retransmit)));
                self.counters.retransmissions += 1;
                let target = call.target;
                self.send(target, data);
            }
            TimerKind::Deadline => {
                if call.deadline_at != Some(at) {
                    return;
                }
                call.deadline_at = None;
                match call.phase {
                    Phase::Inviting | Phase::Proceeding => self.answer_timeout(now, no),
                    Phase::Cancelling { .. } => self.finish(no, Outcome::Timeout),
                    Phase::Terminating => {
                        let outcome = call.outcome.unwrap_or(Outcome::ByeTimeout);
                        self.finish(no, outcome);
                    }
                    Phase::Confirmed => {}
                }
            }
            TimerKind::Hold => {
                if call.hold_at != Some(at) {
                    return;
                }
                call.hold_at = None;
                if call.phase == Phase::Confirmed {
                    self.send_bye(now, no);
                }
            }
        }
    }

    /// No final response in time: CANCEL if a provisional allows it, else wait out the
    /// INVITE transaction (Timer B) so that a late 2xx can still be ACKed and hung up.
    fn answer_timeout(&mut self, now: Instant, no: CallNo) {
        let t1 = self.cfg.t1;
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        call.outcome = Some(Outcome::Timeout);
        match call.phase {
            Phase::Proceeding => self.send_cancel(now, no),
            _ => {
                let end = call.started + t1 * 64;
                if now >= end {
                    self.finish(no, Outcome::Timeout);
                } else {
                    call.phase = Phase::Cancelling { cancel_sent: false };
                    call.deadline_at = Some(end);
                    self.timers.push(Reverse((end, no, TimerKind::Deadline)));
                }
            }
        }
    }

    fn send_cancel(&mut self, now: Instant, no: CallNo) {
        let t1 = self.cfg.t1;
        let Some(cancel) = self.write_cancel(no) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        call.phase = Phase::Cancelling { cancel_sent: true };
        call.invite = Bytes::new();
        call.request = Some(cancel.clone());
        call.retx_interval = t1;
        call.retx_at = Some(now + t1);
        call.deadline_at = Some(now + t1 * 64);
        self.timers
            .push(Reverse((now + t1, no, TimerKind::Retransmit)));
        self.timers
            .push(Reverse((now + t1 * 64, no, TimerKind::Deadline)));
        let target = call.target;
        self.send(target, cancel);
    }

    fn send_bye(&mut self, now: Instant, no: CallNo) {
        let t1 = self.cfg.t1;
        let Some(bye) = self.write_in_dialog(no, "BYE", 2, 'b') else {
            return;
        };
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        call.phase = Phase::Terminating;
        call.request = Some(bye.clone());
        call.hold_at = None;
        call.retx_interval = t1;
        call.retx_at = Some(now + t1);
        call.deadline_at = Some(now + t1 * 64);
        self.timers
            .push(Reverse((now + t1, no, TimerKind::Retransmit)));
        self.timers
            .push(Reverse((now + t1 * 64, no, TimerKind::Deadline)));
        let target = call.target;
        self.send(target, bye);
    }

    fn on_response(&mut self, now: Instant, src: SocketAddr, resp: &Response) {
        let Some(Ok(cseq)) = resp.headers.typed::<CSeq>() else {
            self.counters.bad_messages += 1;
            return;
        };
        let found = match self.find(&resp.headers) {
            Ok(found) => found,
            Err(()) => {
                self.counters.bad_messages += 1;
                return;
            }
        };
        let code = resp.status.code();
        let Some(no) = found else {
            self.stray_response(src, resp, &cseq, code);
            return;
        };
        match (&cseq.method, cseq.sequence) {
            (Method::Invite, 1) => self.invite_response(now, no, resp, code),
            (Method::Bye, 2) => self.bye_response(no, code),
            (Method::Cancel, 1) => self.cancel_response(no, code),
            _ => self.counters.stray_messages += 1,
        }
    }

    fn invite_response(&mut self, now: Instant, no: CallNo, resp: &Response, code: u16) {
        let answer_timeout = self.cfg.answer_timeout;
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        if code < 200 {
            if call.phase == Phase::Inviting {
                call.phase = Phase::Proceeding;
                call.retx_at = None;
                call.invite = Bytes::new();
                let deadline = call.started + answer_timeout.min(MAX_TIMER);
                call.deadline_at = Some(deadline);
                self.timers
                    .push(Reverse((deadline, no, TimerKind::Deadline)));
            }
            let first_ringing = code > 100 && !call.ringing;
            if first_ringing {
                call.ringing = true;
            }
            let pdd = now.saturating_duration_since(call.started);
            let cancel_now = call.phase == Phase::Cancelling { cancel_sent: false };
            if first_ringing {
                self.emit(Event::Ringing { call: no, pdd });
            }
            if cancel_now {
                self.send_cancel(now, no);
            }
            return;
        }
        if code < 300 {
            self.invite_2xx(now, no, resp);
            return;
        }
        if call.acked {
            // A non-2xx after a 2xx (forking): nothing to do for this dialog.
            self.counters.stray_messages += 1;
            return;
        }
        let outcome = call.outcome.unwrap_or(Outcome::Rejected(code));
        let target = call.target;
        if let Some(ack) = self.write_ack_non_2xx(no, resp) {
            self.send(target, ack);
        }
        self.finish(no, outcome);
    }

    fn invite_2xx(&mut self, now: Instant, no: CallNo, resp: &Response) {
        let parse_sdp = self.cfg.parse_sdp;
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        let target = call.target;
        if call.acked {
            self.counters.duplicate_2xx += 1;
            if let Some(ack) = self.write_in_dialog(no, "ACK", 1, 'a') {
                self.send(target, ack);
            }
            return;
        }
        let Some(to) = resp.headers.value(&HeaderName::To) else {
            self.counters.bad_messages += 1;
            return;
        };
        call.remote_to = String::from_utf8_lossy(&to).into();
        call.remote_target = match resp.headers.typed::<Contact>() {
            Some(Ok(c)) => String::from_utf8_lossy(&c.0.uri.to_bytes()).into(),
            _ => format!("sip:{}@{target}", call.to).into(),
        };
        call.route = route_set(&resp.headers);
        let Some(ack) = self.write_in_dialog(no, "ACK", 1, 'a') else {
            return;
        };
        self.send(target, ack);
        let stopping = self.stopping;
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        call.acked = true;
        call.invite = Bytes::new();
        call.request = None;
        call.retx_at = None;
        call.deadline_at = None;
        if call.outcome.is_some() {
            // Answered after we gave up: hang up at once; the outcome stays a timeout.
            self.send_bye(now, no);
            return;
        }
        call.phase = Phase::Confirmed;
        let hold_at = now + if stopping { Duration::ZERO } else { call.hold };
        call.hold_at = Some(hold_at);
        let setup = now.saturating_duration_since(call.started);
        self.timers.push(Reverse((hold_at, no, TimerKind::Hold)));
        let media = if parse_sdp { sdp_media(resp) } else { None };
        self.emit(Event::Answered {
            call: no,
            setup,
            media,
        });
    }

    fn bye_response(&mut self, no: CallNo, code: u16) {
        let t2 = self.cfg.t2;
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        if call.phase != Phase::Terminating {
            self.counters.stray_messages += 1;
            return;
        }
        if code < 200 {
            call.retx_interval = t2;
            return;
        }
        let outcome = call.outcome.unwrap_or(if code < 300 {
            Outcome::Completed
        } else {
            Outcome::ByeRejected(code)
        });
        self.finish(no, outcome);
    }

    fn cancel_response(&mut self, no: CallNo, code: u16) {
        let t2 = self.cfg.t2;
        let Some(call) = self.calls.get_mut(&no) else {
            return;
        };
        if call.phase != (Phase::Cancelling { cancel_sent: true }) {
            self.counters.stray_messages += 1;
            return;
        }
        if code < 200 {
            call.retx_interval = t2;
        } else {
            // The CANCEL is done; the 487 (or a 2xx) to the INVITE ends the call.
            call.retx_at = None;
            call.request = None;
        }
    }

    /// A response for no live call: a retransmitted final after the call ended. ACK a final
    /// INVITE response so the far end stops retransmitting.
    /// The ACK goes back to where the response came from (a storm may target several).
    fn stray_response(&mut self, src: SocketAddr, resp: &Response, cseq: &CSeq, code: u16) {
        self.counters.stray_messages += 1;
        if cseq.method != Method::Invite || code < 200 {
            return;
        }
        if let Some(ack) = self.write_stray_ack(resp, cseq.sequence, code < 300) {
            self.send(src, ack);
        }
    }

    fn on_request(&mut self, src: SocketAddr, req: &Request) {
        let found = match self.find(&req.headers) {
            Ok(found) => found,
            Err(()) => {
                self.counters.bad_messages += 1;
                return;
            }
        };
        let (code, reason) = match req.method {
            Method::Ack => return,
            Method::Bye => match found {
                Some(no) if self.calls.get(&no).is_some_and(|c| c.acked) => (200, "OK"),
                _ => {
                    self.counters.stray_messages += 1;
                    (481, "Call/Transaction Does Not Exist")
                }
            },
            Method::Options => (200, "OK"),
            _ => {
                self.counters.unsupported_requests += 1;
                (501, "Not Implemented")
            }
        };
        let Some(resp) = self.write_response(req, code, reason) else {
            self.counters.bad_messages += 1;
            return;
        };
        self.send(src, resp);
        if code == 200
            && req.method == Method::Bye
            && let Some(no) = found
        {
            let outcome = self
                .calls
                .get(&no)
                .and_then(|c| c.outcome)
                .unwrap_or(Outcome::RemoteBye);
            self.finish(no, outcome);
        }
    }

    // ---- message writers -------------------------------------------------------------

    /// Makes room for the next message: one allocation per `WRITE_CHUNK` bytes written
    /// (or none, when every message split off the buffer before has been dropped).
    fn reserve(&mut self) {
        if self.wbuf.capacity() < 4096 {
            self.wbuf.reserve(WRITE_CHUNK);
        }
    }

    fn write_invite(
        &mut self,
        no: CallNo,
        call_id: &str,
        target: SocketAddr,
        to: &str,
        media_port: u16,
    ) -> Bytes {
        self.reserve();
        let Uac {
            cfg,
            run,
            wbuf,
            sdp,
            ..
        } = self;
        let ip = cfg.local.ip();
        let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
        let local = cfg.local;
        sdp.clear();
        // Writing into a String cannot fail.
        let _ = write!(
            sdp,
            "v=0\r\no=parley-load {no} 1 IN {family} {ip}\r\ns=-\r\nc=IN {family} {ip}\r\n\
             t=0 0\r\nm=audio {media_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
             a=ptime:20\r\na=sendrecv\r\n"
        );
        put_fmt(wbuf, format_args!("INVITE sip:{to}@{target} SIP/2.0\r\n"));
        write_via(wbuf, local, run, no, 'i');
        write_from(wbuf, cfg, run, no);
        put_fmt(
            wbuf,
            format_args!(
                "To: <sip:{to}@{target}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n\
                 Contact: <sip:parley-load@{local}>\r\nUser-Agent: parley-load\r\n\
                 Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n",
                sdp.len()
            ),
        );
        wbuf.put_slice(sdp.as_bytes());
        wbuf.split().freeze()
    }

    fn write_cancel(&mut self, no: CallNo) -> Option<Bytes> {
        self.reserve();
        let Uac {
            cfg,
            run,
            wbuf,
            calls,
            ..
        } = self;
        let call = calls.get(&no)?;
        let (to, call_id, target) = (&call.to, &call.call_id, call.target);
        put_fmt(wbuf, format_args!("CANCEL sip:{to}@{target} SIP/2.0\r\n"));
        write_via(wbuf, cfg.local, run, no, 'i');
        write_from(wbuf, cfg, run, no);
        put_fmt(
            wbuf,
            format_args!(
                "To: <sip:{to}@{target}>\r\nCall-ID: {call_id}\r\nCSeq: 1 CANCEL\r\n\
                 Content-Length: 0\r\n\r\n"
            ),
        );
        Some(wbuf.split().freeze())
    }

    /// ACK to a non-2xx final: same branch as the INVITE, To from the response.
    fn write_ack_non_2xx(&mut self, no: CallNo, resp: &Response) -> Option<Bytes> {
        self.reserve();
        let Uac {
            cfg,
            run,
            wbuf,
            calls,
            ..
        } = self;
        let to_hdr = resp.headers.value(&HeaderName::To)?;
        let call = calls.get(&no)?;
        let (to, call_id, target) = (&call.to, &call.call_id, call.target);
        put_fmt(wbuf, format_args!("ACK sip:{to}@{target} SIP/2.0\r\n"));
        write_via(wbuf, cfg.local, run, no, 'i');
        write_from(wbuf, cfg, run, no);
        wbuf.put_slice(b"To: ");
        wbuf.put_slice(&to_hdr);
        put_fmt(
            wbuf,
            format_args!("\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"),
        );
        Some(wbuf.split().freeze())
    }

    /// ACK (to a 2xx) or BYE within the dialog: new branch, remote target, route set.
    fn write_in_dialog(
        &mut self,
        no: CallNo,
        method: &str,
        cseq: u32,
        kind: char,
    ) -> Option<Bytes> {
        self.reserve();
        let Uac {
            cfg,
            run,
            wbuf,
            calls,
            ..
        } = self;
        let call = calls.get(&no)?;
        put_fmt(
            wbuf,
            format_args!("{method} {} SIP/2.0\r\n", call.remote_target),
        );
        write_via(wbuf, cfg.local, run, no, kind);
        for r in &call.route {
            put_fmt(wbuf, format_args!("Route: {r}\r\n"));
        }
        write_from(wbuf, cfg, run, no);
        put_fmt(
            wbuf,
            format_args!(
                "To: {}\r\nCall-ID: {}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n",
                call.remote_to, call.call_id
            ),
        );
        Some(wbuf.split().freeze())
    }

    /// ACK to a final INVITE response of a call we no longer know, built from the response
    /// alone. A non-2xx ACK reuses the response's Via (same transaction); a 2xx ACK is a
    /// new transaction toward the Contact.
    fn write_stray_ack(&mut self, resp: &Response, seq: u32, is_2xx: bool) -> Option<Bytes> {
        let h = &resp.headers;
        let (from, to, call_id) = (
            h.value(&HeaderName::From)?,
            h.value(&HeaderName::To)?,
            h.value(&HeaderName::CallId)?,
        );
        let ruri = match (is_2xx, h.typed::<Contact>()) {
            (true, Some(Ok(c))) => c.0.uri.to_bytes(),
            _ => h.typed::<To>()?.ok()?.0.uri.to_bytes(),
        };
        let via = if is_2xx {
            None
        } else {
            Some(h.value(&HeaderName::Via)?)
        };
        self.reserve();
        self.stray_acks += 1;
        let Uac {
            cfg,
            run,
            wbuf,
            stray_acks,
            ..
        } = self;
        wbuf.put_slice(b"ACK ");
        wbuf.put_slice(&ruri);
        wbuf.put_slice(b" SIP/2.0\r\n");
        match via {
            Some(via) => {
                wbuf.put_slice(b"Via: ");
                wbuf.put_slice(&via);
                wbuf.put_slice(b"\r\nMax-Forwards: 70\r\n");
            }
            None => write_via(wbuf, cfg.local, run, *stray_acks, 's'),
        }
        wbuf.put_slice(b"From: ");
        wbuf.put_slice(&from);
        wbuf.put_slice(b"\r\nTo: ");
        wbuf.put_slice(&to);
        wbuf.put_slice(b"\r\nCall-ID: ");
        wbuf.put_slice(&call_id);
        put_fmt(
            wbuf,
            format_args!("\r\nCSeq: {seq} ACK\r\nContent-Length: 0\r\n\r\n"),
        );
        Some(wbuf.split().freeze())
    }

    /// A response to a request from the far end; `None` when the request lacks a header a
    /// response must copy.
    fn write_response(&mut self, req: &Request, code: u16, reason: &str) -> Option<Bytes> {
        let h = &req.headers;
        let (from, to, call_id, cseq) = (
            h.value(&HeaderName::From)?,
            h.value(&HeaderName::To)?,
            h.value(&HeaderName::CallId)?,
            h.value(&HeaderName::CSeq)?,
        );
        h.get(&HeaderName::Via)?;
        let has_tag = matches!(h.typed::<To>(), Some(Ok(t)) if t.tag().is_some());
        self.reserve();
        let Uac { run, wbuf, .. } = self;
        put_fmt(wbuf, format_args!("SIP/2.0 {code} {reason}\r\n"));
        for via in h.get_all(&HeaderName::Via) {
            wbuf.put_slice(b"Via: ");
            wbuf.put_slice(&via.value());
            wbuf.put_slice(b"\r\n");
        }
        wbuf.put_slice(b"From: ");
        wbuf.put_slice(&from);
        wbuf.put_slice(b"\r\nTo: ");
        wbuf.put_slice(&to);
        if !has_tag {
            put_fmt(wbuf, format_args!(";tag={run}x"));
        }
        wbuf.put_slice(b"\r\nCall-ID: ");
        wbuf.put_slice(&call_id);
        wbuf.put_slice(b"\r\nCSeq: ");
        wbuf.put_slice(&cseq);
        wbuf.put_slice(b"\r\nContent-Length: 0\r\n\r\n");
        Some(wbuf.split().freeze())
    }
}

/// `Via` with a branch unique per run, call and transaction kind, then `Max-Forwards`.
fn write_via(buf: &mut BytesMut, local: SocketAddr, run: &str, no: u64, kind: char) {
    put_fmt(
        buf,
        format_args!(
            "Via: SIP/2.0/UDP {local};branch=z9hG4bK{run}{kind}{no};rport\r\nMax-Forwards: 70\r\n"
        ),
    );
}

/// Our `From`, with the call's tag.
fn write_from(buf: &mut BytesMut, cfg: &UacConfig, run: &str, no: CallNo) {
    let host = UriHost(cfg.local.ip());
    put_fmt(
        buf,
        format_args!(
            "From: \"parley-load\" <sip:{}@{host}>;tag={run}{no}\r\n",
            cfg.from
        ),
    );
}

/// The media address of a 2xx's SDP answer.
fn sdp_media(resp: &Response) -> Option<SocketAddr> {
    let body = std::str::from_utf8(resp.body()).ok()?;
    let md = parley_codecs::sdp::parse_audio(body).ok()?;
    (md.port != 0).then(|| SocketAddr::new(md.addr, md.port))
}

/// The route set of a 2xx: its Record-Route values, in reverse order (RFC 3261 §12.1.2).
fn route_set(headers: &Headers) -> Vec<Box<str>> {
    let mut route: Vec<Box<str>> = Vec::new();
    for row in headers.get_all(&HeaderName::RecordRoute) {
        let value = row.value();
        for v in split_top_level(&String::from_utf8_lossy(&value)) {
            route.push(v.into());
        }
    }
    route.reverse();
    route
}

/// Splits a header value at commas outside `<…>` and quotes.
fn split_top_level(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut start) = (0u32, false, 0);
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '<' => depth += 1,
            '>' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(value[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

#[cfg(test)]
#[path = "sip_uac_tests.rs"]
mod tests;
