//! The call state machine: one inbound caller leg, one or more outbound legs.
//!
//! Sans-IO in the str0m/quinn-proto manner: `handle_*` feed events in (time as an
//! argument), [`CallCore::poll_action`] drains what the driver must do, and
//! [`CallCore::poll_timeout`] says when to call [`CallCore::handle_timeout`] next. The
//! driver ([`crate::CallActor`]) owns all I/O: SIP, device sessions, the relay, the CDR.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::router::Route;
use crate::rules::{Plan, Step};

#[derive(Clone, Copy)]
enum PlanKind {
    Dial,
    Other,
}

/// Most re-routes one call may go through.
pub const MAX_REROUTES: u32 = 8;

/// An outbound leg of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegId {
    /// An IM device, by session id.
    Device(u64),
    /// The PSTN line through the trunk.
    Trunk,
}

/// How a call ended, as recorded in the CDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Answered, then hung up by either side.
    Answered,
    /// The caller cancelled while it rang.
    Cancelled,
    /// Nobody answered within the ring timeout.
    NoAnswer,
    /// The callee declined.
    Rejected,
    /// Nowhere to ring, or every leg failed.
    Unavailable,
    /// Signalling failed (e.g. the caller never acknowledged the answer).
    Failed,
}

impl Disposition {
    /// The CDR/metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Answered => "ANSWERED",
            Disposition::Cancelled => "CANCELLED",
            Disposition::NoAnswer => "NO_ANSWER",
            Disposition::Rejected => "REJECTED",
            Disposition::Unavailable => "UNAVAILABLE",
            Disposition::Failed => "FAILED",
        }
    }
}

/// Why a ringing leg stopped ringing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegFailure {
    /// The callee declined on that device / the trunk answered 486, 603.
    Declined(u16),
    /// The device disconnected, or the trunk failed (timeout, 4xx/5xx other than busy).
    Failed(u16),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Offer the call to a device.
    OfferDevice(u64),
    /// Send an INVITE to the trunk: to the user's own PSTN line (`None`) or to a number the
    /// user forwards to.
    StartTrunk(Option<String>),
    /// Send 180 Ringing to the caller.
    CallerRinging,
    /// This leg answered: set up media, answer the caller (200 OK), tell the leg.
    Connect(LegId),
    /// Send a final error response to the caller.
    RejectCaller(u16),
    /// Send BYE to the caller.
    ByeCaller,
    /// Stop a ringing leg (device: withdraw the offer; trunk: CANCEL).
    Withdraw(LegId, &'static str),
    /// End an answered leg (device: call ended; trunk: BYE).
    Hangup(LegId, &'static str),
    /// The call is over: release media, write the CDR, stop.
    Finish {
        /// CDR disposition.
        disposition: Disposition,
        /// SIP cause code sent to or received from the caller.
        cause: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Routing,
    Ringing,
    Answered(LegId),
    Ended,
}

/// The state of one call.
#[derive(Debug)]
pub struct CallCore {
    state: State,
    ringing: Vec<LegId>,
    ring_timeout: Duration,
    deadline: Option<Instant>,
    trunk_fallback: bool,
    tried_trunk: bool,
    told_ringing: bool,
    declined: Option<u16>,
    /// Legs that declined or vanished: never offered again by a re-route.
    spent: Vec<LegId>,
    reroutes: u32,
    route: &'static str,
    /// Steps of the plan not started yet.
    steps: VecDeque<Step>,
    step_deadline: Option<Instant>,
    /// Where the trunk leg calls (a forwarding number), if not the user's own line.
    trunk_target: Option<String>,
    actions: VecDeque<Action>,
}

impl CallCore {
    /// A call that will give up ringing after `ring_timeout`.
    pub fn new(ring_timeout: Duration) -> Self {
        Self {
            state: State::Routing,
            ringing: Vec::new(),
            ring_timeout,
            deadline: None,
            trunk_fallback: false,
            tried_trunk: false,
            told_ringing: false,
            declined: None,
            spent: Vec::new(),
            reroutes: 0,
            route: "none",
            steps: VecDeque::new(),
            step_deadline: None,
            trunk_target: None,
            actions: VecDeque::new(),
        }
    }

    /// The route label of the legs started last (`im`, `pstn`, `none`).
    pub fn route(&self) -> &'static str {
        self.route
    }

    /// The leg that answered, once answered.
    pub fn answered_leg(&self) -> Option<LegId> {
        match self.state {
            State::Answered(l) => Some(l),
            _ => None,
        }
    }

    /// Whether the call has finished.
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// The router decided. `trunk_fallback` says whether the PSTN line may be tried if every
    /// device leg disappears.
    pub fn handle_route(&mut self, now: Instant, route: Route, trunk_fallback: bool) {
        let plan = match route {
            Route::Devices(s) => Plan::Ring(vec![Step {
                legs: s.into_iter().map(LegId::Device).collect(),
                timeout: None,
            }]),
            Route::Trunk => Plan::Ring(vec![Step {
                legs: vec![LegId::Trunk],
                timeout: None,
            }]),
            Route::Unavailable => Plan::Unavailable,
        };
        self.handle_plan(now, plan, trunk_fallback);
    }

    /// The user's rules (or the default policy) produced a plan.
    pub fn handle_plan(&mut self, now: Instant, plan: Plan, trunk_fallback: bool) {
        if self.state != State::Routing {
            return;
        }
        self.trunk_fallback = trunk_fallback;
        self.deadline = Some(now + self.ring_timeout);
        let plan_kind = if matches!(plan, Plan::Dial(_)) {
            PlanKind::Dial
        } else {
            PlanKind::Other
        };
        match plan {
            Plan::Ring(steps) => {
                self.state = State::Ringing;
                self.steps = steps.into();
                self.next_step(now);
            }
            Plan::Forward(number) | Plan::Dial(number) => {
                self.state = State::Ringing;
                self.route = if matches!(plan_kind, PlanKind::Dial) {
                    "pstn"
                } else {
                    "forward"
                };
                self.trunk_target = Some(number);
                self.tried_trunk = true;
                self.ringing.push(LegId::Trunk);
                self.actions
                    .push_back(Action::StartTrunk(self.trunk_target.clone()));
            }
            Plan::Reject(code) => self.finish_failed(code, Disposition::Rejected),
            Plan::Unavailable => self.finish_failed(480, Disposition::Unavailable),
        }
    }

    /// Starts the next step that still has a leg to ring; false when none is left.
    fn next_step(&mut self, now: Instant) -> bool {
        while let Some(step) = self.steps.pop_front() {
            let legs: Vec<LegId> = step
                .legs
                .into_iter()
                .filter(|l| {
                    !self.spent.contains(l)
                        && !self.ringing.contains(l)
                        && (*l != LegId::Trunk || !self.tried_trunk)
                })
                .collect();
            if legs.is_empty() {
                continue;
            }
            self.step_deadline = step.timeout.map(|t| now + t);
            self.route = if legs.iter().any(|l| matches!(l, LegId::Device(_))) {
                "im"
            } else {
                "pstn"
            };
            for leg in legs {
                self.ringing.push(leg);
                match leg {
                    LegId::Device(s) => self.actions.push_back(Action::OfferDevice(s)),
                    LegId::Trunk => {
                        self.tried_trunk = true;
                        self.actions.push_back(Action::StartTrunk(None));
                    }
                }
            }
            return true;
        }
        self.step_deadline = None;
        false
    }

    /// Whether the call follows a plan of several steps (re-routing on presence changes
    /// applies only to single-step plans).
    pub fn has_more_steps(&self) -> bool {
        !self.steps.is_empty()
    }

    /// A leg is ringing (device got the offer; trunk sent 180/183).
    pub fn handle_leg_ringing(&mut self, leg: LegId) {
        if self.state == State::Ringing && self.ringing.contains(&leg) && !self.told_ringing {
            self.told_ringing = true;
            self.actions.push_back(Action::CallerRinging);
        }
    }

    /// A leg answered.
    pub fn handle_leg_answered(&mut self, leg: LegId) {
        if self.state != State::Ringing || !self.ringing.contains(&leg) {
            // Answered too late (cancelled, or another leg won): end that leg.
            if self.answered_leg() != Some(leg) {
                self.actions
                    .push_back(Action::Hangup(leg, "answered_elsewhere"));
            }
            return;
        }
        for other in self.ringing.drain(..).filter(|l| *l != leg) {
            self.actions
                .push_back(Action::Withdraw(other, "answered_elsewhere"));
        }
        self.state = State::Answered(leg);
        self.deadline = None;
        self.actions.push_back(Action::Connect(leg));
    }

    /// A ringing leg stopped ringing without answering.
    pub fn handle_leg_failed(&mut self, now: Instant, leg: LegId, why: LegFailure) {
        if let State::Answered(a) = self.state {
            if a == leg {
                self.handle_leg_hangup(now, leg);
            }
            return;
        }
        if self.state != State::Ringing {
            return;
        }
        let before = self.ringing.len();
        self.ringing.retain(|l| *l != leg);
        if self.ringing.len() == before {
            return;
        }
        if let LegFailure::Declined(code) = why {
            self.declined = Some(code);
        }
        self.spent.push(leg);
        if !self.ringing.is_empty() {
            return;
        }
        // The step is exhausted: the plan's next step, if any, rings now.
        if self.declined.is_none() && self.next_step(now) {
            return;
        }
        match (self.declined, why) {
            (Some(code), _) => self.finish_failed(code, Disposition::Rejected),
            (None, LegFailure::Failed(_)) if !self.tried_trunk && self.trunk_fallback => {
                self.steps.push_back(Step {
                    legs: vec![LegId::Trunk],
                    timeout: None,
                });
                self.next_step(now);
            }
            // Whatever made the last leg fail (trunk timeout, 5xx, device gone), the
            // caller learns only that the user cannot be reached now.
            (None, LegFailure::Failed(_)) => self.finish_failed(480, Disposition::Unavailable),
            (None, LegFailure::Declined(_)) => unreachable_declined(),
        }
    }

    /// Presence changed while the call rings: ring `route` instead of what rings now.
    ///
    /// Legs no longer wanted are withdrawn (`rerouted`), new ones are offered; legs that
    /// stay keep ringing untouched, and the caller hears ringback throughout (no new
    /// provisional response). A leg that declined or vanished is not offered again, and the
    /// trunk is tried at most once per call. Returns whether anything changed; after
    /// [`MAX_REROUTES`] changes the call stays where it rings.
    pub fn handle_reroute(&mut self, legs: Vec<LegId>) -> bool {
        if self.state != State::Ringing || self.reroutes >= MAX_REROUTES {
            return false;
        }
        let label = if legs.iter().any(|l| matches!(l, LegId::Device(_))) {
            "im"
        } else if legs.is_empty() {
            "none"
        } else {
            "pstn"
        };
        let mut wanted = legs;

        wanted.retain(|l| {
            !self.spent.contains(l)
                && (*l != LegId::Trunk || !self.tried_trunk || self.ringing.contains(l))
        });
        let unchanged =
            wanted.len() == self.ringing.len() && wanted.iter().all(|l| self.ringing.contains(l));
        if unchanged || (wanted.is_empty() && label != "none") {
            // Nothing new to ring (only spent legs): keep what rings rather than drop the call.
            return false;
        }
        self.reroutes += 1;
        self.route = label;
        let old = std::mem::take(&mut self.ringing);
        for leg in old.iter().filter(|l| !wanted.contains(l)) {
            self.actions.push_back(Action::Withdraw(*leg, "rerouted"));
        }
        for leg in wanted.iter().filter(|l| !old.contains(l)) {
            match leg {
                LegId::Device(s) => self.actions.push_back(Action::OfferDevice(*s)),
                LegId::Trunk => {
                    self.tried_trunk = true;
                    self.actions.push_back(Action::StartTrunk(None));
                }
            }
        }
        self.ringing = wanted;
        if self.ringing.is_empty() {
            self.finish_failed(480, Disposition::Unavailable);
        }
        true
    }

    /// Re-routes so far.
    pub fn reroutes(&self) -> u32 {
        self.reroutes
    }

    /// Whether the call is still ringing (re-routing applies).
    pub fn is_ringing(&self) -> bool {
        self.state == State::Ringing
    }

    /// The caller sent CANCEL while the call rang.
    pub fn handle_caller_cancel(&mut self) {
        if self.state == State::Ringing || self.state == State::Routing {
            self.withdraw_all("cancelled");
            self.actions.push_back(Action::RejectCaller(487));
            self.finish(Disposition::Cancelled, 487);
        }
    }

    /// The caller hung up (BYE), or never acknowledged our answer.
    pub fn handle_caller_gone(&mut self, disposition: Disposition, cause: u16) {
        match self.state {
            State::Answered(leg) => {
                self.actions.push_back(Action::Hangup(leg, "remote_hangup"));
                self.finish(disposition, cause);
            }
            State::Ringing | State::Routing => {
                self.withdraw_all("cancelled");
                self.finish(Disposition::Cancelled, cause);
            }
            State::Ended => {}
        }
    }

    /// An answered leg hung up (device hang-up or disconnect, BYE from the trunk).
    pub fn handle_leg_hangup(&mut self, now: Instant, leg: LegId) {
        match self.state {
            State::Answered(a) if a == leg => {
                self.actions.push_back(Action::ByeCaller);
                self.finish(Disposition::Answered, 200);
            }
            State::Ringing => self.handle_leg_failed(now, leg, LegFailure::Failed(480)),
            _ => {}
        }
    }

    /// The answered leg's media could not be set up: end that leg and fail the call.
    pub fn handle_connect_failed(&mut self, code: u16) {
        if let State::Answered(leg) = self.state {
            self.actions
                .push_back(Action::Hangup(leg, "media_unavailable"));
            self.actions.push_back(Action::RejectCaller(code));
            self.finish(Disposition::Failed, code);
        }
    }

    /// No media crossed the answered call for the media timeout: end both sides (the
    /// caller gets a BYE, the leg is hung up); the CDR stays `ANSWERED` with cause 408.
    pub fn handle_media_timeout(&mut self) {
        if let State::Answered(leg) = self.state {
            self.actions.push_back(Action::Hangup(leg, "media_timeout"));
            self.actions.push_back(Action::ByeCaller);
            self.finish(Disposition::Answered, 408);
        }
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.deadline, self.step_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.step_deadline
            && now >= d
            && self.state == State::Ringing
        {
            // Nobody answered in this step: on to the next one (the current legs stop).
            self.step_deadline = None;
            if !self.steps.is_empty() {
                self.withdraw_all("rerouted");
                if !self.next_step(now) {
                    self.finish_failed(480, Disposition::NoAnswer);
                }
            } else {
                // The last step had its own timeout: the plan is exhausted.
                self.withdraw_all("timeout");
                self.finish_failed(480, Disposition::NoAnswer);
            }
            return;
        }
        if let Some(d) = self.deadline
            && now >= d
            && self.state == State::Ringing
        {
            self.withdraw_all("timeout");
            self.actions.push_back(Action::RejectCaller(480));
            self.finish(Disposition::NoAnswer, 480);
        }
    }

    /// Next thing to do.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn withdraw_all(&mut self, reason: &'static str) {
        for leg in self.ringing.drain(..) {
            self.actions.push_back(Action::Withdraw(leg, reason));
        }
    }

    fn finish_failed(&mut self, code: u16, d: Disposition) {
        self.actions.push_back(Action::RejectCaller(code));
        self.finish(d, code);
    }

    fn finish(&mut self, disposition: Disposition, cause: u16) {
        self.state = State::Ended;
        self.deadline = None;
        self.step_deadline = None;
        self.actions
            .push_back(Action::Finish { disposition, cause });
    }
}

// `declined` is set just before the match whenever `why` is `Declined`, so that arm is dead;
// it exists only to keep the match exhaustive without a wildcard hiding future variants.
fn unreachable_declined() {}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn devs(s: &[u64]) -> Vec<LegId> {
        s.iter().map(|s| LegId::Device(*s)).collect()
    }

    fn drain(c: &mut CallCore) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn start(route: Route, fallback: bool) -> (CallCore, Instant) {
        let t0 = Instant::now();
        let mut c = CallCore::new(Duration::from_secs(30));
        c.handle_route(t0, route, fallback);
        (c, t0)
    }

    #[test]
    fn device_answers() {
        let (mut c, _) = start(Route::Devices(vec![1, 2]), true);
        assert_eq!(drain(&mut c), vec![OfferDevice(1), OfferDevice(2)]);
        c.handle_leg_ringing(LegId::Device(1));
        c.handle_leg_ringing(LegId::Device(2));
        assert_eq!(drain(&mut c), vec![CallerRinging], "180 once");
        c.handle_leg_answered(LegId::Device(2));
        assert_eq!(
            drain(&mut c),
            vec![
                Withdraw(LegId::Device(1), "answered_elsewhere"),
                Connect(LegId::Device(2))
            ]
        );
        // A second answer from the loser is ended.
        c.handle_leg_answered(LegId::Device(1));
        assert_eq!(
            drain(&mut c),
            vec![Hangup(LegId::Device(1), "answered_elsewhere")]
        );
        c.handle_caller_gone(Disposition::Answered, 200);
        assert_eq!(
            drain(&mut c),
            vec![
                Hangup(LegId::Device(2), "remote_hangup"),
                Finish {
                    disposition: Disposition::Answered,
                    cause: 200
                }
            ]
        );
        assert!(c.is_ended());
    }

    #[test]
    fn device_hangs_up_first() {
        let (mut c, _) = start(Route::Devices(vec![7]), true);
        c.handle_leg_answered(LegId::Device(7));
        drain(&mut c);
        c.handle_leg_hangup(Instant::now(), LegId::Device(7));
        assert_eq!(
            drain(&mut c),
            vec![
                ByeCaller,
                Finish {
                    disposition: Disposition::Answered,
                    cause: 200
                }
            ]
        );
    }

    #[test]
    fn cancel_while_ringing() {
        let (mut c, _) = start(Route::Devices(vec![1]), true);
        drain(&mut c);
        c.handle_caller_cancel();
        assert_eq!(
            drain(&mut c),
            vec![
                Withdraw(LegId::Device(1), "cancelled"),
                RejectCaller(487),
                Finish {
                    disposition: Disposition::Cancelled,
                    cause: 487
                }
            ]
        );
        // Late answer after cancel gets hung up, no second finish.
        c.handle_leg_answered(LegId::Device(1));
        assert_eq!(
            drain(&mut c),
            vec![Hangup(LegId::Device(1), "answered_elsewhere")]
        );
    }

    #[test]
    fn device_vanishes_then_trunk_fallback() {
        let (mut c, _) = start(Route::Devices(vec![1]), true);
        drain(&mut c);
        c.handle_leg_failed(Instant::now(), LegId::Device(1), LegFailure::Failed(480));
        assert_eq!(drain(&mut c), vec![StartTrunk(None)]);
        assert_eq!(c.route(), "pstn");
        c.handle_leg_failed(Instant::now(), LegId::Trunk, LegFailure::Failed(503));
        assert_eq!(
            drain(&mut c),
            vec![
                RejectCaller(480),
                Finish {
                    disposition: Disposition::Unavailable,
                    cause: 480
                }
            ]
        );
    }

    #[test]
    fn decline_on_last_device_rejects() {
        let (mut c, _) = start(Route::Devices(vec![1, 2]), true);
        drain(&mut c);
        c.handle_leg_failed(Instant::now(), LegId::Device(1), LegFailure::Declined(603));
        assert_eq!(drain(&mut c), vec![]);
        c.handle_leg_failed(Instant::now(), LegId::Device(2), LegFailure::Failed(480));
        assert_eq!(
            drain(&mut c),
            vec![
                RejectCaller(603),
                Finish {
                    disposition: Disposition::Rejected,
                    cause: 603
                }
            ]
        );
    }

    #[test]
    fn no_route() {
        let (mut c, _) = start(Route::Unavailable, false);
        assert_eq!(
            drain(&mut c),
            vec![
                RejectCaller(480),
                Finish {
                    disposition: Disposition::Unavailable,
                    cause: 480
                }
            ]
        );
    }

    #[test]
    fn ring_timeout_on_virtual_clock() {
        let (mut c, t0) = start(Route::Trunk, false);
        assert_eq!(drain(&mut c), vec![StartTrunk(None)]);
        c.handle_timeout(t0 + Duration::from_secs(29));
        assert_eq!(drain(&mut c), vec![]);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        c.handle_timeout(t0 + Duration::from_secs(30));
        assert_eq!(
            drain(&mut c),
            vec![
                Withdraw(LegId::Trunk, "timeout"),
                RejectCaller(480),
                Finish {
                    disposition: Disposition::NoAnswer,
                    cause: 480
                }
            ]
        );
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn trunk_answers_then_hangs_up() {
        let (mut c, _) = start(Route::Trunk, false);
        drain(&mut c);
        c.handle_leg_ringing(LegId::Trunk);
        c.handle_leg_answered(LegId::Trunk);
        assert_eq!(drain(&mut c), vec![CallerRinging, Connect(LegId::Trunk)]);
        c.handle_leg_hangup(Instant::now(), LegId::Trunk);
        assert_eq!(
            drain(&mut c),
            vec![
                ByeCaller,
                Finish {
                    disposition: Disposition::Answered,
                    cause: 200
                }
            ]
        );
    }

    #[test]
    fn reroute_moves_the_offer_and_keeps_ringback() {
        let (mut c, _) = start(Route::Devices(vec![1]), true);
        drain(&mut c);
        c.handle_leg_ringing(LegId::Device(1));
        assert_eq!(drain(&mut c), vec![CallerRinging]);
        // Device 1 went away, device 2 became available.
        assert!(c.handle_reroute(devs(&[2])));
        assert_eq!(
            drain(&mut c),
            vec![Withdraw(LegId::Device(1), "rerouted"), OfferDevice(2)]
        );
        c.handle_leg_ringing(LegId::Device(2));
        assert_eq!(drain(&mut c), vec![], "no second 180");
        // The same presence again: nothing to do.
        assert!(!c.handle_reroute(devs(&[2])));
        c.handle_leg_answered(LegId::Device(2));
        assert_eq!(drain(&mut c), vec![Connect(LegId::Device(2))]);
        assert_eq!(c.reroutes(), 1);
        assert!(!c.handle_reroute(devs(&[1])), "answered calls stay put");
    }

    #[test]
    fn reroute_adds_a_device_and_cancels_the_trunk() {
        let (mut c, _) = start(Route::Trunk, true);
        assert_eq!(drain(&mut c), vec![StartTrunk(None)]);
        assert!(c.handle_reroute(devs(&[5])));
        assert_eq!(
            drain(&mut c),
            vec![Withdraw(LegId::Trunk, "rerouted"), OfferDevice(5)]
        );
        assert_eq!(c.route(), "im");
        // The trunk is not tried a second time; with nothing else to ring the call keeps
        // ringing the device.
        assert!(!c.handle_reroute(vec![LegId::Trunk]));
        assert_eq!(drain(&mut c), vec![]);
    }

    #[test]
    fn reroute_to_nowhere_fails_the_call_and_declined_devices_are_not_reoffered() {
        let (mut c, _) = start(Route::Devices(vec![1, 2]), false);
        drain(&mut c);
        c.handle_leg_failed(Instant::now(), LegId::Device(1), LegFailure::Declined(603));
        assert!(!c.handle_reroute(devs(&[1, 2])), "1 declined: still just 2");
        assert!(c.handle_reroute(vec![]));
        assert_eq!(
            drain(&mut c),
            vec![
                Withdraw(LegId::Device(2), "rerouted"),
                RejectCaller(480),
                Finish {
                    disposition: Disposition::Unavailable,
                    cause: 480
                }
            ]
        );
    }

    #[test]
    fn reroutes_are_bounded() {
        let (mut c, _) = start(Route::Devices(vec![0]), false);
        drain(&mut c);
        let mut changes = 0;
        for i in 1..100u64 {
            if c.handle_reroute(devs(&[i])) {
                changes += 1;
            }
        }
        assert_eq!(changes, MAX_REROUTES);
        assert!(c.is_ringing());
    }

    fn plan_steps(steps: &[(&[LegId], Option<u64>)]) -> Plan {
        Plan::Ring(
            steps
                .iter()
                .map(|(l, t)| Step {
                    legs: l.to_vec(),
                    timeout: t.map(Duration::from_secs),
                })
                .collect(),
        )
    }

    #[test]
    fn sequential_steps_advance_on_their_timeout() {
        let t0 = Instant::now();
        let mut c = CallCore::new(Duration::from_secs(60));
        c.handle_plan(
            t0,
            plan_steps(&[
                (&[LegId::Device(1)], Some(10)),
                (&[LegId::Device(2), LegId::Trunk], None),
            ]),
            true,
        );
        assert_eq!(drain(&mut c), vec![OfferDevice(1)]);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        c.handle_leg_ringing(LegId::Device(1));
        drain(&mut c);
        c.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(
            drain(&mut c),
            vec![
                Withdraw(LegId::Device(1), "rerouted"),
                OfferDevice(2),
                StartTrunk(None)
            ]
        );
        assert_eq!(
            c.poll_timeout(),
            Some(t0 + Duration::from_secs(60)),
            "the last step rings until the ring timeout"
        );
        c.handle_leg_answered(LegId::Trunk);
        assert_eq!(
            drain(&mut c),
            vec![
                Withdraw(LegId::Device(2), "answered_elsewhere"),
                Connect(LegId::Trunk)
            ]
        );
    }

    #[test]
    fn a_vanished_step_moves_on_at_once_but_a_decline_ends_the_call() {
        let t0 = Instant::now();
        let plan = || plan_steps(&[(&[LegId::Device(1)], Some(10)), (&[LegId::Device(2)], None)]);
        let mut c = CallCore::new(Duration::from_secs(60));
        c.handle_plan(t0, plan(), false);
        drain(&mut c);
        c.handle_leg_failed(t0, LegId::Device(1), LegFailure::Failed(480));
        assert_eq!(drain(&mut c), vec![OfferDevice(2)]);
        let mut c = CallCore::new(Duration::from_secs(60));
        c.handle_plan(t0, plan(), false);
        drain(&mut c);
        c.handle_leg_failed(t0, LegId::Device(1), LegFailure::Declined(603));
        assert_eq!(
            drain(&mut c),
            vec![
                RejectCaller(603),
                Finish {
                    disposition: Disposition::Rejected,
                    cause: 603
                }
            ]
        );
    }

    #[test]
    fn last_step_with_a_timeout_ends_as_no_answer() {
        let t0 = Instant::now();
        let mut c = CallCore::new(Duration::from_secs(60));
        c.handle_plan(
            t0,
            plan_steps(&[
                (&[LegId::Device(1)], Some(5)),
                (&[LegId::Device(2)], Some(5)),
            ]),
            false,
        );
        drain(&mut c);
        c.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(
            drain(&mut c),
            vec![Withdraw(LegId::Device(1), "rerouted"), OfferDevice(2)]
        );
        c.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(
            drain(&mut c),
            vec![
                Withdraw(LegId::Device(2), "timeout"),
                RejectCaller(480),
                Finish {
                    disposition: Disposition::NoAnswer,
                    cause: 480
                }
            ]
        );
    }

    #[test]
    fn forward_and_reject_plans() {
        let t0 = Instant::now();
        let mut c = CallCore::new(Duration::from_secs(60));
        c.handle_plan(t0, Plan::Forward("+15550199999".into()), false);
        assert_eq!(drain(&mut c), vec![StartTrunk(Some("+15550199999".into()))]);
        assert_eq!(c.route(), "forward");
        let mut c = CallCore::new(Duration::from_secs(60));
        c.handle_plan(t0, Plan::Reject(486), true);
        assert_eq!(
            drain(&mut c),
            vec![
                RejectCaller(486),
                Finish {
                    disposition: Disposition::Rejected,
                    cause: 486
                }
            ]
        );
    }

    #[test]
    fn media_timeout_ends_an_answered_call_only() {
        let (mut c, _) = start(Route::Devices(vec![1]), false);
        drain(&mut c);
        c.handle_media_timeout();
        assert_eq!(drain(&mut c), vec![], "a ringing call has no media yet");
        c.handle_leg_answered(LegId::Device(1));
        drain(&mut c);
        c.handle_media_timeout();
        assert_eq!(
            drain(&mut c),
            vec![
                Hangup(LegId::Device(1), "media_timeout"),
                ByeCaller,
                Finish {
                    disposition: Disposition::Answered,
                    cause: 408
                }
            ]
        );
    }
}
