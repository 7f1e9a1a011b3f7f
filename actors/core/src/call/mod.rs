//! The call state machine: one caller leg, one or more outbound legs.
//!
//! Sans-IO in the str0m/quinn-proto manner: `handle_*` feed events in (time as an
//! argument), [`CallCore::poll_output`] drains what the driver must do, and
//! [`CallCore::poll_timeout`] says when to call [`CallCore::handle_timeout`] next. The core
//! makes every decision of a call — where it rings (through [`crate::rules`]), re-routing,
//! how leg failures are classified and when the PSTN line is the fallback, how the
//! answered call's media is wired ([`media::plan_media`]), the media watchdog, the CDR —
//! and the driver (the call actor) only performs I/O: SIP commands, device messages, relay
//! calls, the CDR sink.
//!
//! Drain order: after any `handle_*`, drain [`CallCore::poll_output`] until `None`, then
//! re-arm the timer from [`CallCore::poll_timeout`].

mod io;
mod legs;
pub mod media;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use parley_codecs::sdp::MediaDescription;

use crate::cdr::{CallRoute, CdrRecord, Direction, Disposition};

use crate::ids::{SessionId, call_id};
use crate::numberplan::{TrunkId, TrunkSnapshot, fails_over};
use crate::plan::{LegId, Plan};
use crate::presence::CalleeView;
use crate::rules::{self, CallContext, Media};
use crate::sip::SipEvent;
use crate::trunk::{ProbeOutcome, call_outcome};
pub use io::{Action, CallSpec, DeviceLegEvent, EndReason, MediaSide, Observation, TrunkOffer};
pub use legs::LegFailure;
use legs::Legs;
pub use legs::MAX_REROUTES;
pub use media::{MediaPlan, Origin, VideoPlan};

/// How often an answered call's media is sampled (at most; less when the timeout is
/// shorter).
const MEDIA_CHECK: Duration = Duration::from_secs(1);
/// More time for an offer's acknowledgement when its deadline was noticed late.
const OFFER_ACK_GRACE: Duration = Duration::from_secs(1);

/// One call.
#[derive(Debug)]
pub struct CallCore {
    spec: CallSpec,
    legs: Legs,
    /// The trunk's answer, once it answered.
    trunk_media: Option<MediaDescription>,
    /// Device names by session (for the answer history and the CDR).
    device_names: HashMap<SessionId, String>,
    /// Sessions in predicted order at routing time (to measure prediction quality).
    predicted: Vec<SessionId>,
    /// Sessions of the callee's devices that take video.
    video_devices: Vec<SessionId>,
    /// Sessions of the callee's devices that take Opus.
    opus_devices: Vec<SessionId>,
    pstn_fallback: bool,
    /// A presence change waits for its lookup: when it happened.
    reroute_pending: Option<Instant>,
    /// The last re-route's presence change, until one of its new legs rings.
    reroute_at: Option<Instant>,
    answered_at: Option<Instant>,
    answered_by: Option<String>,
    counts_swapped: bool,
    media_check: Option<Instant>,
    /// Offers not acknowledged yet, and when each counts as lost.
    unacked: HashMap<SessionId, Instant>,
    /// Offers whose deadline was extended once because the node was behind.
    ack_grace: HashSet<SessionId>,
    /// The last time the node was behind (its SIP queue late), as the driver last said.
    node_behind: Option<Instant>,
    ended_at: Option<Instant>,
    /// The trunks as the last lookup saw them.
    trunks: TrunkSnapshot,
    /// The trunk leg's current INVITE (which trunk, which number).
    trunk_offer: Option<TrunkOffer>,
    /// Trunks to fail over to, in order.
    trunk_next: VecDeque<TrunkId>,
    actions: VecDeque<Action>,
}

impl CallCore {
    /// A new call; its first action is [`Action::Lookup`].
    pub fn new(spec: CallSpec) -> Self {
        let mut actions = VecDeque::new();
        actions.push_back(Action::Lookup);
        Self {
            legs: Legs::new(spec.ring_timeout),
            spec,
            trunk_media: None,
            device_names: HashMap::new(),
            predicted: Vec::new(),
            video_devices: Vec::new(),
            opus_devices: Vec::new(),
            pstn_fallback: true,
            reroute_pending: None,
            reroute_at: None,
            answered_at: None,
            answered_by: None,
            counts_swapped: false,
            media_check: None,
            unacked: HashMap::new(),
            ack_grace: HashSet::new(),
            node_behind: None,
            ended_at: None,
            trunks: TrunkSnapshot::none(),
            trunk_offer: None,
            trunk_next: VecDeque::new(),
            actions,
        }
    }

    /// What the call was born with.
    pub fn spec(&self) -> &CallSpec {
        &self.spec
    }

    /// The Parley call id.
    pub fn call_id(&self) -> String {
        call_id(self.spec.handle)
    }

    /// Where the legs started last went.
    pub fn route(&self) -> CallRoute {
        self.legs.route()
    }

    /// The leg that answered, once answered.
    pub fn answered_leg(&self) -> Option<LegId> {
        self.legs.answered_leg()
    }

    /// Whether the call has finished.
    pub fn is_ended(&self) -> bool {
        self.legs.is_ended()
    }

    /// Whether the call is still ringing (re-routing applies).
    pub fn is_ringing(&self) -> bool {
        self.legs.is_ringing()
    }

    /// Re-routes so far.
    pub fn reroutes(&self) -> u32 {
        self.legs.reroutes()
    }

    /// The callee's view and the trunks' state arrived (for the first routing, or for a
    /// re-route after a presence change). `now_unix` is the wall clock in seconds, for the
    /// rules' time windows. The voice network counts as up when a trunk that can reach
    /// the callee's line (or the dialled number) is up.
    pub fn handle_lookup(
        &mut self,
        now: Instant,
        view: CalleeView,
        trunks: TrunkSnapshot,
        now_unix: u64,
    ) {
        let line = self
            .spec
            .pstn_destination
            .as_deref()
            .unwrap_or(&self.spec.called);
        let trunk_up = trunks.reachable(line);
        self.trunks = trunks;
        if let Some(number) = self.spec.pstn_destination.clone() {
            // A device dials a PSTN number: straight to the trunk, if the voice network is up.
            if self.legs.is_routing() {
                let plan = if trunk_up {
                    Plan::Dial(number)
                } else {
                    Plan::Unavailable
                };
                self.legs.handle_plan(now, plan, false);
                self.pump(now);
            }
            return;
        }
        if self.legs.is_routing() {
            if let Some(max) = self.spec.max_ringing
                && view.ringing >= max
            {
                self.actions
                    .push_back(Action::Observe(Observation::TooManyRinging {
                        ringing: view.ringing,
                    }));
                self.legs.handle_plan(now, Plan::Reject(486), false);
                self.pump(now);
                return;
            }
            let (plan, rule) = self.decide(&view, trunk_up, now_unix);
            self.actions.push_back(Action::Observe(Observation::Routed {
                plan: plan.label(),
                rule,
            }));
            let fallback = self.pstn_fallback && trunk_up;
            self.legs.handle_plan(now, plan, fallback);
            self.pump(now);
            if self.legs.is_ringing() {
                // While it rings, every presence change of the callee re-evaluates the route.
                self.actions.push_back(Action::WatchPresence);
            }
            return;
        }
        let Some(changed_at) = self.reroute_pending.take() else {
            return;
        };
        if !self.legs.is_ringing() || self.legs.has_more_steps() {
            return;
        }
        let (plan, _) = self.decide(&view, trunk_up, now_unix);
        let legs = match plan {
            Plan::Ring(steps) if steps.len() == 1 => {
                steps.into_iter().flat_map(|s| s.legs).collect()
            }
            Plan::Unavailable => Vec::new(),
            // Several steps, forwarding, rejection: not a re-route; keep ringing.
            _ => return,
        };
        if self.legs.handle_reroute(legs) {
            self.reroute_at = Some(changed_at);
            self.actions
                .push_back(Action::Observe(Observation::Rerouted {
                    route: self.legs.route(),
                    reroutes: self.legs.reroutes(),
                }));
            self.pump(now);
        }
    }

    /// The callee's presence changed at `at`. A ringing call that follows a single-step
    /// plan asks for a fresh view ([`Action::Lookup`]); a sequential plan follows its own
    /// steps, and an answered call stays put.
    pub fn handle_presence_changed(&mut self, at: Instant) {
        if self.legs.is_ringing() && !self.legs.has_more_steps() && self.reroute_pending.is_none() {
            self.reroute_pending = Some(at);
            self.actions.push_back(Action::Lookup);
        }
    }

    /// A device (the dialling device, or one the call was offered to) did something.
    pub fn handle_device(&mut self, now: Instant, session: SessionId, event: DeviceLegEvent) {
        if self.spec.origin == Origin::Device(session) {
            // The dialling device hung up (or went away).
            if matches!(event, DeviceLegEvent::Hangup | DeviceLegEvent::Gone) {
                if self.legs.answered_leg().is_some() {
                    self.legs.handle_caller_gone(Disposition::Answered, 200);
                } else {
                    self.legs.handle_caller_cancel();
                }
            }
            return self.pump(now);
        }
        let leg = LegId::Device(session);
        // Whatever the device says, it is alive: its offer is acknowledged.
        self.unacked.remove(&session);
        let answered = self.legs.answered_leg() == Some(leg);
        match event {
            DeviceLegEvent::Delivered => self.leg_ringing(leg),
            DeviceLegEvent::Answer => self.legs.handle_leg_answered(leg),
            // Rejecting, or hanging up an offer that rings, is the user's "no".
            DeviceLegEvent::Reject => {
                self.legs
                    .handle_leg_failed(now, leg, LegFailure::Declined(603))
            }
            DeviceLegEvent::Hangup | DeviceLegEvent::Gone if answered => {
                self.legs.handle_leg_hangup(now, leg)
            }
            DeviceLegEvent::Hangup => {
                self.legs
                    .handle_leg_failed(now, leg, LegFailure::Declined(603))
            }
            DeviceLegEvent::Gone => self
                .legs
                .handle_leg_failed(now, leg, LegFailure::Failed(480)),
        }
        self.pump(now);
    }

    /// The SIP core reported something about the caller's dialog or the trunk leg.
    pub fn handle_sip(&mut self, now: Instant, event: SipEvent) {
        match event {
            SipEvent::CallerCancel => self.legs.handle_caller_cancel(),
            SipEvent::CallerBye => self.legs.handle_caller_gone(Disposition::Answered, 200),
            // RFC 3261 §13.3.1.4: a UAS whose 2xx is never acknowledged ends the dialog
            // with a BYE; the caller may still think the call is up.
            SipEvent::CallerAckTimeout => self.legs.handle_ack_timeout(),
            SipEvent::TrunkRinging => self.leg_ringing(LegId::Trunk),
            SipEvent::TrunkAnswered(md) => {
                if let Some(trunk) = self.trunk_offer.as_ref().map(|o| o.trunk) {
                    self.actions
                        .push_back(Action::TrunkHealth(trunk, ProbeOutcome::Answered(200)));
                    self.actions
                        .push_back(Action::Observe(Observation::TrunkAttempt {
                            trunk,
                            code: 200,
                        }));
                }
                self.trunk_media = Some(md);
                self.legs.handle_leg_answered(LegId::Trunk);
            }
            SipEvent::TrunkFailed(code) => {
                if !self.trunk_failover(code) {
                    self.legs
                        .handle_leg_failed(now, LegId::Trunk, LegFailure::of_trunk(code));
                }
            }
            SipEvent::TrunkBye => self.legs.handle_leg_hangup(now, LegId::Trunk),
            SipEvent::CallerMediaMoved(a) => self.repoint(MediaSide::Caller, a),
            SipEvent::TrunkMediaMoved(a) => self.repoint(MediaSide::Trunk, a),
            SipEvent::CallerVideoMoved(a) => self.repoint(MediaSide::CallerVideo, a),
        }
        self.pump(now);
    }

    /// The trunk leg's INVITE failed with `code`: counts it against the trunk and, when
    /// the failure is the trunk's (408, 5xx) and another trunk can take the call, sends
    /// it there. Returns whether the leg goes on.
    fn trunk_failover(&mut self, code: u16) -> bool {
        let Some(mut offer) = self.trunk_offer.clone() else {
            return false;
        };
        let from = offer.trunk;
        if let Some(outcome) = call_outcome(code) {
            self.actions.push_back(Action::TrunkHealth(from, outcome));
        }
        self.actions
            .push_back(Action::Observe(Observation::TrunkAttempt {
                trunk: from,
                code,
            }));
        if !fails_over(code) || !self.legs.is_leg_ringing(LegId::Trunk) {
            return false;
        }
        let Some(to) = self.trunk_next.pop_front() else {
            return false;
        };
        offer.trunk = to;
        self.actions
            .push_back(Action::Observe(Observation::TrunkFailover {
                from,
                to,
                code,
            }));
        self.actions.push_back(Action::StartTrunk(offer.clone()));
        self.trunk_offer = Some(offer);
        true
    }

    /// The trunk leg could not start: no relay port for it.
    pub fn handle_trunk_unavailable(&mut self, now: Instant) {
        self.legs
            .handle_leg_failed(now, LegId::Trunk, LegFailure::Failed(503));
        self.pump(now);
    }

    /// The answered leg's media could not be wired: end that leg and fail the call.
    pub fn handle_connect_failed(&mut self, now: Instant, code: u16) {
        self.media_check = None;
        self.legs.handle_connect_failed(code);
        self.pump(now);
    }

    /// The answered call's media has been idle for `idle` (answer to
    /// [`Action::SampleMedia`]).
    pub fn handle_media_idle(&mut self, now: Instant, idle: Duration) {
        let Some(limit) = self.spec.media_timeout else {
            return;
        };
        if self.legs.answered_leg().is_none() {
            return;
        }
        if idle >= limit {
            self.actions
                .push_back(Action::Observe(Observation::MediaTimedOut { idle }));
            self.legs.handle_media_timeout();
        } else {
            self.media_check = Some(now + MEDIA_CHECK.min(limit));
        }
        self.pump(now);
    }

    /// The node was behind at `at` (now, while it still is): offers out since then get
    /// one more second for their acknowledgement if their deadline passes.
    pub fn handle_node_behind(&mut self, at: Instant) {
        self.node_behind = self.node_behind.max(Some(at));
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.legs.poll_timeout(),
            self.media_check,
            self.unacked.values().min().copied(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.media_check
            && now >= at
        {
            self.media_check = None;
            self.actions.push_back(Action::SampleMedia);
        }
        let mut lost: Vec<SessionId> = self
            .unacked
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| *s)
            .collect();
        lost.sort_unstable();
        for session in lost {
            let at = self.unacked.remove(&session).unwrap_or(now);
            // The node was behind while the device had to answer (the deadline noticed
            // late, or the driver said so at some point since the offer went out): the
            // acknowledgement may be queued behind the backlog. The device gets one more
            // second, once.
            let late = now.saturating_duration_since(at) >= crate::overload::LATE;
            let sent = self.spec.offer_ack_timeout.and_then(|t| at.checked_sub(t));
            let behind = matches!((self.node_behind, sent), (Some(b), Some(s)) if b >= s);
            if (late || behind) && self.ack_grace.insert(session) {
                self.unacked.insert(session, now + OFFER_ACK_GRACE);
                continue;
            }
            self.actions
                .push_back(Action::Observe(Observation::OfferUnacknowledged {
                    session,
                }));
            self.actions.push_back(Action::DropDevice(session));
            self.legs
                .handle_leg_failed(now, LegId::Device(session), LegFailure::Failed(480));
        }
        self.legs.handle_timeout(now);
        self.pump(now);
    }

    /// Next thing to do.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The CDR of the finished call, with the relay's packet counts of its audio stream
    /// (`relay_caller_side`: packets from the relay's first side, `relay_callee_side`: the
    /// other way).
    pub fn cdr(&self, relay_caller_side: u64, relay_callee_side: u64) -> CdrRecord {
        let (packets_in, packets_out) = if self.counts_swapped {
            (relay_callee_side, relay_caller_side)
        } else {
            (relay_caller_side, relay_callee_side)
        };
        let wall =
            |at: Instant| self.spec.started_wall + at.saturating_duration_since(self.spec.started);
        CdrRecord {
            call_id: self.call_id(),
            sip_call_id: self.spec.sip_call_id.clone(),
            tenant: self.spec.user.tenant.clone(),
            user: self.spec.user.user.clone(),
            caller: self.spec.caller.clone(),
            caller_name: self.spec.caller_name.clone(),
            called: self.spec.called.clone(),
            route: self.legs.route(),
            start: self.spec.started_wall,
            answer: self.answered_at.map(wall),
            end: self.ended_at.map_or(self.spec.started_wall, wall),
            disposition: self.legs.disposition().unwrap_or(Disposition::Failed),
            cause: self.legs.cause(),
            packets_in,
            packets_out,
            answered_by: self.answered_by.clone(),
            direction: if self.spec.pstn_destination.is_some() {
                Direction::Out
            } else {
                Direction::In
            },
            dialled_by: self.spec.dialled_by.clone(),
        }
    }

    /// The row written when the call starts (`IN_PROGRESS`), so that a call cut by a crash
    /// still leaves a CDR; [`Self::cdr`] completes it.
    pub fn cdr_opening(&self) -> CdrRecord {
        CdrRecord {
            disposition: Disposition::InProgress,
            cause: 0,
            answer: None,
            end: self.spec.started_wall,
            ..self.cdr(0, 0)
        }
    }

    fn leg_ringing(&mut self, leg: LegId) {
        if let Some(since) = self.reroute_at.take() {
            self.actions
                .push_back(Action::Observe(Observation::RerouteRinging { since }));
        }
        self.legs.handle_leg_ringing(leg);
    }

    fn repoint(&mut self, side: MediaSide, addr: std::net::SocketAddr) {
        // Not bridged yet: nothing to move (the answer's SDP is read when it is).
        if self.legs.answered_leg().is_some() {
            self.actions.push_back(Action::Repoint(side, addr));
        }
    }

    /// Evaluates the callee's rules on `view`; remembers its devices for offers, the
    /// answer history and prediction quality.
    fn decide(
        &mut self,
        view: &CalleeView,
        trunk_up: bool,
        now_unix: u64,
    ) -> (Plan, Option<String>) {
        for d in &view.devices {
            if d.video && !self.video_devices.contains(&d.session) {
                self.video_devices.push(d.session);
            }
            if d.opus && !self.opus_devices.contains(&d.session) {
                self.opus_devices.push(d.session);
            }
            self.device_names.insert(d.session, d.device.clone());
        }
        if view.caller_blocked {
            // The user blocked this caller: refused before any rule, still recorded.
            return (Plan::Reject(603), Some("blocked".into()));
        }
        self.predicted = rules::predict(&view.devices, &view.history)
            .iter()
            .map(|d| d.session)
            .collect();
        let ctx = CallContext {
            devices: &view.devices,
            history: &view.history,
            caller: &self.spec.caller,
            caller_known: view.caller_known,
            media: if self.spec.video_offer.is_some() {
                Media::Video
            } else {
                Media::Audio
            },
            voice_network_up: trunk_up,
            now_unix,
        };
        self.pstn_fallback = view.prefs.pstn_fallback;
        rules::plan(&view.prefs, &ctx)
    }

    /// Turns the leg machine's decisions into the driver's actions, with what the call
    /// knows added (offers with video, trunk INVITEs with formats, media plans).
    fn pump(&mut self, now: Instant) {
        while let Some(step) = self.legs.poll_output() {
            let action = match step {
                legs::Out::Offer(session) => {
                    if let Some(t) = self.spec.offer_ack_timeout {
                        self.unacked.insert(session, now + t);
                    }
                    Action::OfferDevice {
                        session,
                        video: self.spec.video_offer.is_some()
                            && self.video_devices.contains(&session),
                    }
                }
                legs::Out::StartTrunk(target) => {
                    let to = target.unwrap_or_else(|| self.spec.called.clone());
                    let mut candidates: VecDeque<TrunkId> = self.trunks.candidates(&to).into();
                    let Some(trunk) = candidates.pop_front() else {
                        // No trunk that reaches this number is up (or none serves it).
                        self.legs
                            .handle_leg_failed(now, LegId::Trunk, LegFailure::Failed(503));
                        continue;
                    };
                    self.trunk_next = candidates;
                    let offer = TrunkOffer {
                        trunk,
                        to,
                        formats: media::trunk_formats(&self.spec.offer),
                        telephone_event: self.spec.offer.telephone_event(),
                    };
                    self.trunk_offer = Some(offer.clone());
                    Action::StartTrunk(offer)
                }
                legs::Out::CallerRinging => {
                    self.actions
                        .push_back(Action::Observe(Observation::CallerRinging {
                            after: now.saturating_duration_since(self.spec.started),
                        }));
                    Action::CallerRinging
                }
                legs::Out::Connect(leg) => match self.connect(now, leg) {
                    Ok(plan) => Action::Connect(plan),
                    Err(_) => {
                        self.legs.handle_connect_failed(503);
                        continue;
                    }
                },
                legs::Out::RejectCaller(code) => Action::RejectCaller(code),
                legs::Out::ByeCaller => Action::ByeCaller,
                legs::Out::Withdraw(leg, why) => {
                    if let LegId::Device(s) = leg {
                        self.unacked.remove(&s);
                    }
                    Action::Withdraw(leg, why)
                }
                legs::Out::Hangup(leg, why) => Action::Hangup(leg, why),
                legs::Out::Finish { disposition, cause } => {
                    self.ended_at = Some(now);
                    self.media_check = None;
                    self.unacked.clear();
                    Action::Finish { disposition, cause }
                }
            };
            self.actions.push_back(action);
        }
    }

    /// The answered leg: who answered (history, prediction), and the media plan.
    fn connect(&mut self, now: Instant, leg: LegId) -> Result<MediaPlan, media::MediaPlanError> {
        let takes_video = matches!(leg, LegId::Device(s) if self.video_devices.contains(&s));
        let takes_opus = matches!(leg, LegId::Device(s) if self.opus_devices.contains(&s));
        let plan = media::plan_media(
            self.spec.origin,
            leg,
            &self.spec.offer,
            self.spec.video_offer.as_ref(),
            self.trunk_media.as_ref(),
            media::Takes {
                video: takes_video,
                opus: takes_opus,
            },
        )?;
        self.answered_at = Some(now);
        self.counts_swapped = plan.counts_swapped();
        self.actions
            .push_back(Action::Observe(Observation::Connected {
                after: now.saturating_duration_since(self.spec.started),
            }));
        match leg {
            LegId::Trunk => {
                // The trunk that carried the call, by name.
                let trunk = self.trunk_offer.as_ref().map(|o| o.trunk);
                self.answered_by = Some(trunk.map_or("pstn", |t| self.trunks.plan.name(t)).into());
            }
            LegId::Device(session) => {
                if let Some(name) = self.device_names.get(&session).cloned() {
                    let rank = match self.predicted.iter().position(|s| *s == session) {
                        Some(0) => "1",
                        Some(1) => "2",
                        Some(_) => "3+",
                        None => "unranked",
                    };
                    // Calls between users answer on the callee's device: the callee's
                    // history learns; a device caller's own session is never ranked.
                    self.actions.push_back(Action::Answered {
                        device: name.clone(),
                        rank,
                    });
                    self.answered_by = Some(name);
                }
            }
        }
        if let Some(limit) = self.spec.media_timeout {
            self.media_check = Some(now + MEDIA_CHECK.min(limit));
        }
        Ok(plan)
    }
}
