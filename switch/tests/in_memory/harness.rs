//! A whole node in memory, on a virtual clock: the SIP core, one call core per call,
//! each user's presence core and the trunk's health, wired together the way the actors
//! wire them, with a scripted gateway, a scripted trunk and scripted devices at the ends.
//! No socket, no actor, no sleeping: a test feeds datagrams and device events, moves the
//! clock, and reads what each peer received, the CDRs and the address books.
//!
//! The wiring mirrors the shells (`SipDriver`, `CallActor`, `UserActor`, `PresenceSession`,
//! `TrunkActor`) action for action; the real shells are proven against SIPp and
//! `parley-load` devices in the other test files.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use parley_codecs::control::Status;
use parley_codecs::sdp;
use parley_core::call::{
    Action, CallCore, CallSpec, DeviceLegEvent, MediaPlan, Observation, Origin,
};
use parley_core::cdr::CdrRecord;
use parley_core::directory::{StaticDirectory, UserIdentity};
use parley_core::ids::{CallHandle, Sequence, SessionId, call_id};
use parley_core::plan::LegId;
use parley_core::presence::{PresenceOutput, UserPresence};
use parley_core::rules::Preferences;
use parley_core::sip::SipLegCmd;
use parley_core::trunk::{HealthPolicy, ProbeOutcome, TrunkHealth};
use parley_switch::sip::core::{CoreConfig, Output, SipCore};
use sipx_sip::Timers;

pub const NODE: &str = "127.0.0.1:5060";
pub const GW: &str = "127.0.0.1:5070";
pub const TRUNK: &str = "127.0.0.1:5080";
pub const ALICE: &str = "+15550100001";
pub const CALLER: &str = "+15557770001";

/// What a scripted device was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMsg {
    /// `incoming_call`.
    Offer { call: String, video: bool },
    /// `call_connected`.
    Connected { call: String },
    /// `call_ended`.
    Ended { call: String, reason: String },
}

/// A scripted IM device: what it received, which calls it was offered.
#[derive(Debug, Default)]
pub struct Device {
    pub user: String,
    pub inbox: Vec<DeviceMsg>,
    offered: Vec<CallHandle>,
    /// A device that lost its network: nothing reaches it, it acknowledges nothing.
    pub lost: bool,
}

/// An address-book entry, as the CDR writer upserts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub name: Option<String>,
    pub calls: u32,
}

/// The node and its peers.
pub struct World {
    pub now: Instant,
    wall0: SystemTime,
    t0: Instant,
    pub sip: SipCore,
    pub users: HashMap<String, UserPresence>,
    calls: BTreeMap<CallHandle, CallCore>,
    /// Which user's presence each live call watches or looks up.
    call_user: HashMap<CallHandle, String>,
    pub trunk: TrunkHealth,
    probes: HashMap<u64, ()>,
    sessions: Sequence,
    pub devices: BTreeMap<SessionId, Device>,
    /// SIP messages the gateway received, as text, oldest first.
    pub gateway: VecDeque<String>,
    /// SIP messages the trunk received.
    pub trunk_peer: VecDeque<String>,
    pub cdrs: Vec<CdrRecord>,
    pub books: HashMap<String, BTreeMap<String, Contact>>,
    pub observations: Vec<Observation>,
    /// Media plans the relay was asked to wire.
    pub wired: Vec<MediaPlan>,
    /// How long the media has been idle, as the relay would report it.
    pub media_idle: Duration,
    next_port: u16,
    pending_drops: Vec<SessionId>,
    /// Devices the node closed as lost.
    pub dropped: Vec<SessionId>,
}

impl World {
    /// A node with alice (+15550100001) and bob (+15550100002) in tenant `demo`, a trunk,
    /// and the trunk health policy given.
    pub fn new() -> Self {
        let ids = vec![
            UserIdentity {
                tenant: "demo".into(),
                user: "alice".into(),
                number: ALICE.into(),
            },
            UserIdentity {
                tenant: "demo".into(),
                user: "bob".into(),
                number: "+15550100002".into(),
            },
        ];
        let directory = StaticDirectory(ids.clone());
        let handles = Arc::new(Sequence::new());
        let sip = SipCore::new(
            CoreConfig {
                local: NODE.parse().unwrap(),
                local_tcp: None,
                local_tls: None,
                trunks: vec![parley_switch::sip::core::TrunkTarget {
                    addr: TRUNK.parse().unwrap(),
                    transport: parley_switch::sip::core::Transport::Udp,
                    auth: None,
                }],
                region: "US".into(),
                timers: Timers::default(),
                rng_seed: [3; 32],
                dialog_source_check: true,
                max_server_transactions: 10_000,
                max_calls_per_source: 0,
                overload: parley_core::overload::OverloadLimits::OFF,
                max_transactions_per_source: 0,
                call_id_host: "parley".into(),
            },
            Arc::new(directory),
            handles,
        );
        let now = Instant::now();
        Self {
            now,
            t0: now,
            wall0: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_031_000),
            sip,
            users: ids
                .iter()
                .map(|u| {
                    (
                        u.user.clone(),
                        UserPresence::new(u.user.clone(), Preferences::default()),
                    )
                })
                .collect(),
            calls: BTreeMap::new(),
            call_user: HashMap::new(),
            trunk: TrunkHealth::new(HealthPolicy::default()),
            probes: HashMap::new(),
            sessions: Sequence::new(),
            devices: BTreeMap::new(),
            gateway: VecDeque::new(),
            trunk_peer: VecDeque::new(),
            cdrs: Vec::new(),
            books: HashMap::new(),
            observations: Vec::new(),
            wired: Vec::new(),
            media_idle: Duration::ZERO,
            next_port: 20_000,
            pending_drops: Vec::new(),
            dropped: Vec::new(),
        }
    }

    fn wall(&self) -> SystemTime {
        self.wall0 + self.now.duration_since(self.t0)
    }

    /// Sets a user's routing preferences (JSON, as the IM client sends them).
    pub fn prefer(&mut self, user: &str, json: &str) {
        let prefs = Preferences::from_json(json).expect("valid preferences");
        self.users.get_mut(user).unwrap().handle_preferences(prefs);
    }

    /// A device logs in as `user`; it starts available.
    pub fn login(&mut self, user: &str, device: &str) -> SessionId {
        let s = self.sessions.next();
        self.devices.insert(
            s,
            Device {
                user: user.into(),
                ..Device::default()
            },
        );
        self.users
            .get_mut(user)
            .unwrap()
            .handle_attach(s, device.into(), None);
        self.settle();
        s
    }

    /// A device reports presence.
    pub fn presence(&mut self, session: SessionId, status: Status) {
        let user = self.devices[&session].user.clone();
        self.users
            .get_mut(&user)
            .unwrap()
            .handle_presence(session, status, 0, None);
        self.settle();
    }

    /// A device answers the call it was offered.
    pub fn answer(&mut self, session: SessionId, call: &str) {
        self.device_event(session, call, DeviceLegEvent::Answer);
    }

    /// A device hangs up (or rejects) a call.
    pub fn hangup(&mut self, session: SessionId, call: &str) {
        self.device_event(session, call, DeviceLegEvent::Hangup);
    }

    fn device_event(&mut self, session: SessionId, call: &str, ev: DeviceLegEvent) {
        let h = handle_of(call);
        if let Some(c) = self.calls.get_mut(&h) {
            c.handle_device(self.now, session, ev);
        }
        self.settle();
    }

    /// The device loses its network (a phone in a tunnel, `kill -9`): no close reaches
    /// the node, and it acknowledges nothing from now on.
    pub fn lose(&mut self, session: SessionId) {
        self.devices.get_mut(&session).unwrap().lost = true;
    }

    /// The device's connection is gone: presence forgets it and every call it was part of
    /// hears `Gone`, as when its session actor stops.
    pub fn disconnect(&mut self, session: SessionId) {
        self.disconnect_now(session);
        self.settle();
    }

    fn disconnect_now(&mut self, session: SessionId) {
        let dev = self.devices.remove(&session).expect("known device");
        self.users
            .get_mut(&dev.user)
            .unwrap()
            .handle_detach(session);
        for h in dev.offered {
            if let Some(c) = self.calls.get_mut(&h) {
                c.handle_device(self.now, session, DeviceLegEvent::Gone);
            }
        }
    }

    /// A datagram from the gateway.
    pub fn gateway_sends(&mut self, msg: impl Into<String>) {
        let now = self.now;
        self.sip
            .handle_datagram(now, GW.parse().unwrap(), Bytes::from(msg.into()));
        self.settle();
    }

    /// A datagram from the trunk.
    pub fn trunk_sends(&mut self, msg: impl Into<String>) {
        let now = self.now;
        self.sip
            .handle_datagram(now, TRUNK.parse().unwrap(), Bytes::from(msg.into()));
        self.settle();
    }

    /// Sends an OPTIONS probe to the trunk, as the trunk actor does every interval.
    pub fn probe_trunk(&mut self) {
        let id = self.sip.handle_probe(self.now, TRUNK.parse().unwrap());
        self.probes.insert(id, ());
        self.settle();
    }

    /// Moves the clock forward by `d`, firing every timer due on the way.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next = [self.sip.poll_timeout()]
                .into_iter()
                .chain(self.calls.values().map(CallCore::poll_timeout))
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    let now = self.now;
                    self.sip.handle_timeout(now);
                    for c in self.calls.values_mut() {
                        if c.poll_timeout().is_some_and(|t| t <= now) {
                            c.handle_timeout(now);
                        }
                    }
                    self.settle();
                }
                _ => break,
            }
        }
        self.now = end;
    }

    /// Live calls.
    pub fn live_calls(&self) -> usize {
        self.calls.len()
    }

    /// Drains every core until nothing moves.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(out) = self.sip.poll_output() {
                moved = true;
                self.sip_output(out);
            }
            let users: Vec<String> = self.users.keys().cloned().collect();
            for u in users {
                while let Some(out) = self.users.get_mut(&u).unwrap().poll_output() {
                    moved = true;
                    if let PresenceOutput::NotifyCalls(calls) = out {
                        for h in calls {
                            match self.calls.get_mut(&h) {
                                Some(c) => c.handle_presence_changed(self.now),
                                None => self.users.get_mut(&u).unwrap().handle_unwatch(h),
                            }
                        }
                    }
                }
            }
            let handles: Vec<CallHandle> = self.calls.keys().copied().collect();
            for h in handles {
                while let Some(a) = self.calls.get_mut(&h).and_then(CallCore::poll_output) {
                    moved = true;
                    self.perform(h, a);
                }
            }
            for s in std::mem::take(&mut self.pending_drops) {
                moved = true;
                if self.devices.contains_key(&s) {
                    self.disconnect_now(s);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the cores never settled");
    }

    fn sip_output(&mut self, out: Output) {
        match out {
            Output::Transmit { dest, data, .. } => {
                let text = String::from_utf8_lossy(&data).into_owned();
                if dest == GW.parse::<SocketAddr>().unwrap() {
                    self.gateway.push_back(text);
                } else if dest == TRUNK.parse::<SocketAddr>().unwrap() {
                    self.trunk_peer.push_back(text);
                } else {
                    panic!("SIP sent to {dest}, a peer this world does not have");
                }
            }
            Output::Event(h, ev) => {
                if let Some(c) = self.calls.get_mut(&h) {
                    c.handle_sip(self.now, ev);
                }
            }
            Output::NewCall(nc) => {
                let spec = CallSpec {
                    handle: nc.handle,
                    sip_call_id: nc.sip_call_id,
                    user: nc.user.clone(),
                    origin: Origin::Sip,
                    dialled_by: None,
                    caller: nc.caller,
                    caller_name: nc.caller_name,
                    called: nc.called,
                    pstn_destination: None,
                    offer: nc.offer,
                    video_offer: nc.video,
                    ring_timeout: Duration::from_secs(30),
                    media_timeout: Some(Duration::from_secs(10)),
                    offer_ack_timeout: Some(Duration::from_secs(3)),
                    max_ringing: None,
                    started: self.now,
                    started_wall: self.wall(),
                };
                self.call_user.insert(nc.handle, nc.user.user);
                self.calls.insert(nc.handle, CallCore::new(spec));
            }
            Output::ProbeResult { id, code } => {
                if self.probes.remove(&id).is_some() {
                    let outcome = code.map_or(ProbeOutcome::Timeout, ProbeOutcome::Answered);
                    self.trunk.handle_outcome(outcome);
                }
            }
        }
    }

    fn command(&mut self, h: CallHandle, cmd: SipLegCmd) {
        let now = self.now;
        self.sip.handle_command(now, h, cmd);
    }

    fn tell_device(&mut self, session: SessionId, msg: DeviceMsg) {
        if let Some(d) = self.devices.get_mut(&session) {
            d.inbox.push(msg);
        }
    }

    fn port(&mut self) -> u16 {
        self.next_port += 2;
        self.next_port
    }

    /// What the call actor does with each action.
    fn perform(&mut self, h: CallHandle, action: Action) {
        let now = self.now;
        let cid = call_id(h);
        let user = self.call_user[&h].clone();
        match action {
            Action::Lookup => {
                let caller = self.calls[&h].spec().caller.clone();
                let view = self.users[&user].callee_view(&caller, self.wall());
                let mut trunks = parley_core::numberplan::TrunkSnapshot::single();
                trunks.up = vec![self.trunk.is_up()];
                let unix = self
                    .wall()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                self.calls
                    .get_mut(&h)
                    .unwrap()
                    .handle_lookup(now, view, trunks, unix);
            }
            Action::WatchPresence => self.users.get_mut(&user).unwrap().handle_watch(h),
            Action::OfferDevice { session, .. }
                if self.devices.get(&session).is_some_and(|d| d.lost) => {}
            Action::OfferDevice { session, video } => match self.devices.get_mut(&session) {
                Some(d) => {
                    d.inbox.push(DeviceMsg::Offer { call: cid, video });
                    d.offered.push(h);
                    // The device acknowledges the offer at once (`ringing`).
                    self.calls.get_mut(&h).unwrap().handle_device(
                        now,
                        session,
                        DeviceLegEvent::Delivered,
                    );
                }
                None => self.calls.get_mut(&h).unwrap().handle_device(
                    now,
                    session,
                    DeviceLegEvent::Gone,
                ),
            },
            Action::StartTrunk(offer) => {
                let port = self.port();
                let body = sdp::write(
                    "127.0.0.1".parse().unwrap(),
                    port,
                    &offer.formats,
                    offer.telephone_event,
                    h,
                );
                let spec = self.calls[&h].spec();
                let cmd = SipLegCmd::TrunkInvite {
                    trunk: offer.trunk,
                    to: offer.to,
                    from: spec.caller.clone(),
                    from_name: spec.caller_name.clone(),
                    sdp: body,
                };
                self.command(h, cmd);
            }
            Action::CallerRinging => self.command(h, SipLegCmd::CallerRinging),
            Action::Connect(plan) => {
                self.wired.push(plan.clone());
                let port = self.port();
                let (session, pt, te) = match &plan {
                    MediaPlan::SipToDevice {
                        session,
                        pt,
                        telephone_event,
                        ..
                    } => (Some(*session), *pt, *telephone_event),
                    MediaPlan::SipToTrunk {
                        pt,
                        telephone_event,
                        ..
                    } => (None, *pt, *telephone_event),
                    other => panic!("a gateway call wired as {other:?}"),
                };
                if let Some(s) = session {
                    self.tell_device(s, DeviceMsg::Connected { call: cid });
                }
                let body = sdp::write("127.0.0.1".parse().unwrap(), port, &[pt], te, h);
                self.command(h, SipLegCmd::CallerAnswer { sdp: body });
            }
            Action::RejectCaller(code) => self.command(h, SipLegCmd::CallerReject(code)),
            Action::ByeCaller => self.command(h, SipLegCmd::CallerBye),
            Action::Withdraw(LegId::Device(s), reason)
            | Action::Hangup(LegId::Device(s), reason) => self.tell_device(
                s,
                DeviceMsg::Ended {
                    call: cid,
                    reason: reason.as_str().into(),
                },
            ),
            Action::Withdraw(LegId::Trunk, _) => self.command(h, SipLegCmd::TrunkCancel),
            Action::Hangup(LegId::Trunk, _) => self.command(h, SipLegCmd::TrunkBye),
            Action::TrunkHealth(_, o) => {
                self.trunk.handle_outcome(o);
            }
            Action::Answered { device, .. } => {
                let wall = self.wall();
                self.users
                    .get_mut(&user)
                    .unwrap()
                    .handle_answer(device, wall);
            }
            Action::Repoint(..) => {}
            Action::DropDevice(session) => {
                // The session closes the connection; presence and its calls follow.
                self.dropped.push(session);
                self.pending_drops.push(session);
            }
            Action::SampleMedia => {
                let idle = self.media_idle;
                self.calls.get_mut(&h).unwrap().handle_media_idle(now, idle);
            }
            Action::Observe(o) => self.observations.push(o),
            Action::Finish { .. } => {
                let core = self.calls.remove(&h).unwrap();
                let cdr = core.cdr(0, 0);
                let (party, name) = cdr.other_party();
                let book = self.books.entry(cdr.user.clone()).or_default();
                let e = book.entry(party.to_owned()).or_insert(Contact {
                    name: None,
                    calls: 0,
                });
                e.calls += 1;
                if let Some(n) = name {
                    e.name = Some(n.to_owned());
                }
                self.cdrs.push(cdr);
                self.call_user.remove(&h);
                self.command(h, SipLegCmd::Done);
            }
        }
    }

    /// The gateway's received messages' first lines, drained.
    pub fn gateway_lines(&mut self) -> Vec<String> {
        self.gateway
            .drain(..)
            .map(|m| m.lines().next().unwrap_or("").to_owned())
            .collect()
    }

    /// The trunk's received messages, drained.
    pub fn trunk_messages(&mut self) -> Vec<String> {
        self.trunk_peer.drain(..).collect()
    }

    /// What a device received, drained.
    pub fn device_inbox(&mut self, session: SessionId) -> Vec<DeviceMsg> {
        std::mem::take(&mut self.devices.get_mut(&session).unwrap().inbox)
    }
}

/// The handle in a call id `c-N`.
pub fn handle_of(call: &str) -> CallHandle {
    call.strip_prefix("c-")
        .and_then(|n| n.parse().ok())
        .expect("a call id")
}

/// SIP text a scripted gateway sends.
pub mod gw {
    use super::{ALICE, CALLER, GW};

    /// An INVITE for `to` with a PCMU offer.
    pub fn invite(call_id: &str, to: &str) -> String {
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n";
        format!(
            "INVITE sip:{to}@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {GW};branch=z9hG4bK-{call_id}\r\nFrom: \"Gw\" <sip:{CALLER}@127.0.0.1>;tag=gw1\r\nTo: <sip:{to}@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:gw@{GW}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        )
    }

    /// An INVITE for alice.
    pub fn invite_alice(call_id: &str) -> String {
        invite(call_id, ALICE)
    }

    /// A request in the caller's dialog (ACK, BYE) or CANCEL (no To tag, the INVITE's
    /// branch).
    pub fn request(
        method: &str,
        call_id: &str,
        branch: &str,
        to_tag: Option<&str>,
        cseq: u32,
    ) -> String {
        let tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
        let cseq_method = method;
        format!(
            "{method} sip:{ALICE}@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {GW};branch={branch}\r\nFrom: \"Gw\" <sip:{CALLER}@127.0.0.1>;tag=gw1\r\nTo: <sip:{ALICE}@127.0.0.1>{tag}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {cseq_method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    }

    /// CANCEL of the INVITE `call_id` (same branch, RFC 3261 §9.1).
    pub fn cancel(call_id: &str) -> String {
        request("CANCEL", call_id, &format!("z9hG4bK-{call_id}"), None, 1)
    }

    /// ACK of a 2xx (a new transaction).
    pub fn ack(call_id: &str, to_tag: &str) -> String {
        request(
            "ACK",
            call_id,
            &format!("z9hG4bK-ack-{call_id}"),
            Some(to_tag),
            1,
        )
    }

    /// ACK of a non-2xx final response (the INVITE's branch, RFC 3261 §17.1.1.3).
    pub fn ack_error(call_id: &str, to_tag: &str) -> String {
        request(
            "ACK",
            call_id,
            &format!("z9hG4bK-{call_id}"),
            Some(to_tag),
            1,
        )
    }

    /// BYE from the gateway.
    pub fn bye(call_id: &str, to_tag: &str) -> String {
        request(
            "BYE",
            call_id,
            &format!("z9hG4bK-bye-{call_id}"),
            Some(to_tag),
            2,
        )
    }

    /// A response to a request the node sent (copying its Via, From, To, Call-ID, CSeq).
    pub fn answer(request: &str, status: &str, to_tag: Option<&str>) -> String {
        let mut out = format!("SIP/2.0 {status}\r\n");
        for l in request.lines() {
            let copy = ["Via:", "From:", "Call-ID:", "CSeq:"]
                .iter()
                .any(|h| l.starts_with(h));
            if copy {
                out.push_str(l);
                out.push_str("\r\n");
            } else if l.starts_with("To:") {
                out.push_str(l);
                if let Some(t) = to_tag
                    && !l.contains("tag=")
                {
                    out.push_str(&format!(";tag={t}"));
                }
                out.push_str("\r\n");
            }
        }
        out.push_str("Content-Length: 0\r\n\r\n");
        out
    }

    /// The To tag of a message.
    pub fn to_tag(msg: &str) -> String {
        let to = msg
            .lines()
            .find(|l| l.starts_with("To:"))
            .expect("a To header");
        to.split("tag=").nth(1).expect("a To tag").trim().to_owned()
    }
}
