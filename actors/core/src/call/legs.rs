//! The legs of a call: which ring, which answered, which are withdrawn, and how the call
//! ends. The inner state machine of [`super::CallCore`], which adds what the call knows
//! (the caller, the callee's devices, media) to each [`Out`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::io::EndReason;
use crate::cdr::{CallRoute, Disposition};
use crate::plan::{LegId, Plan, Step};
#[cfg(test)]
use crate::router::Route;

#[derive(Clone, Copy)]
enum PlanKind {
    Dial,
    Other,
}

/// Most re-routes one call may go through.
pub const MAX_REROUTES: u32 = 8;

/// Why a ringing leg stopped ringing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegFailure {
    /// The callee declined on that device / the trunk answered 486, 600, 603.
    Declined(u16),
    /// The device disconnected, or the trunk failed (timeout, 4xx/5xx other than busy).
    Failed(u16),
}

impl LegFailure {
    /// How a final failure status from the trunk counts: busy and decline are the callee's
    /// answer, anything else is a failure of the route.
    pub fn of_trunk(code: u16) -> Self {
        if matches!(code, 486 | 600 | 603) {
            LegFailure::Declined(code)
        } else {
            LegFailure::Failed(code)
        }
    }
}

/// What the leg machine decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Offer the call to a device.
    Offer(u64),
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
    Withdraw(LegId, EndReason),
    /// End an answered leg (device: call ended; trunk: BYE).
    Hangup(LegId, EndReason),
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

/// The legs of one call.
#[derive(Debug)]
pub struct Legs {
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
    route: CallRoute,
    ended: Option<(Disposition, u16)>,
    /// Steps of the plan not started yet.
    steps: VecDeque<Step>,
    step_deadline: Option<Instant>,
    /// Where the trunk leg calls (a forwarding number), if not the user's own line.
    trunk_target: Option<String>,
    actions: VecDeque<Out>,
}

impl Legs {
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
            route: CallRoute::None,
            ended: None,
            steps: VecDeque::new(),
            step_deadline: None,
            trunk_target: None,
            actions: VecDeque::new(),
        }
    }

    /// Where the legs started last went.
    pub fn route(&self) -> CallRoute {
        self.route
    }

    /// How the call ended, once it did.
    pub fn disposition(&self) -> Option<Disposition> {
        self.ended.map(|(d, _)| d)
    }

    /// The SIP cause it ended with (0 while it is up).
    pub fn cause(&self) -> u16 {
        self.ended.map_or(0, |(_, c)| c)
    }

    /// Whether no plan has been followed yet.
    pub fn is_routing(&self) -> bool {
        self.state == State::Routing
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

    #[cfg(test)]
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
                    CallRoute::Pstn
                } else {
                    CallRoute::Forward
                };
                self.trunk_target = Some(number);
                self.tried_trunk = true;
                self.ringing.push(LegId::Trunk);
                self.actions
                    .push_back(Out::StartTrunk(self.trunk_target.clone()));
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
                CallRoute::Im
            } else {
                CallRoute::Pstn
            };
            for leg in legs {
                self.ringing.push(leg);
                match leg {
                    LegId::Device(s) => self.actions.push_back(Out::Offer(s)),
                    LegId::Trunk => {
                        self.tried_trunk = true;
                        self.actions.push_back(Out::StartTrunk(None));
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
            self.actions.push_back(Out::CallerRinging);
        }
    }

    /// A leg answered.
    pub fn handle_leg_answered(&mut self, leg: LegId) {
        if self.state != State::Ringing || !self.ringing.contains(&leg) {
            // Answered too late (cancelled, or another leg won): end that leg.
            if self.answered_leg() != Some(leg) {
                self.actions
                    .push_back(Out::Hangup(leg, EndReason::AnsweredElsewhere));
            }
            return;
        }
        for other in self.ringing.drain(..).filter(|l| *l != leg) {
            self.actions
                .push_back(Out::Withdraw(other, EndReason::AnsweredElsewhere));
        }
        self.state = State::Answered(leg);
        self.deadline = None;
        self.actions.push_back(Out::Connect(leg));
    }

    /// Whether `leg` is ringing now (not answered, withdrawn or failed).
    pub fn is_leg_ringing(&self, leg: LegId) -> bool {
        self.state == State::Ringing && self.ringing.contains(&leg)
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
            CallRoute::Im
        } else if legs.is_empty() {
            CallRoute::None
        } else {
            CallRoute::Pstn
        };
        let mut wanted = legs;

        wanted.retain(|l| {
            !self.spent.contains(l)
                && (*l != LegId::Trunk || !self.tried_trunk || self.ringing.contains(l))
        });
        let unchanged =
            wanted.len() == self.ringing.len() && wanted.iter().all(|l| self.ringing.contains(l));
        if unchanged || (wanted.is_empty() && label != CallRoute::None) {
            // Nothing new to ring (only spent legs): keep what rings rather than drop the call.
            return false;
        }
        self.reroutes += 1;
        self.route = label;
        let old = std::mem::take(&mut self.ringing);
        for leg in old.iter().filter(|l| !wanted.contains(l)) {
            self.actions
                .push_back(Out::Withdraw(*leg, EndReason::Rerouted));
        }
        for leg in wanted.iter().filter(|l| !old.contains(l)) {
            match leg {
                LegId::Device(s) => self.actions.push_back(Out::Offer(*s)),
                LegId::Trunk => {
                    self.tried_trunk = true;
                    self.actions.push_back(Out::StartTrunk(None));
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
            self.withdraw_all(EndReason::Cancelled);
            self.actions.push_back(Out::RejectCaller(487));
            self.finish(Disposition::Cancelled, 487);
        }
    }

    /// The caller hung up (BYE), or never acknowledged our answer.
    pub fn handle_caller_gone(&mut self, disposition: Disposition, cause: u16) {
        match self.state {
            State::Answered(leg) => {
                self.actions
                    .push_back(Out::Hangup(leg, EndReason::RemoteHangup));
                self.finish(disposition, cause);
            }
            State::Ringing | State::Routing => {
                self.withdraw_all(EndReason::Cancelled);
                self.finish(Disposition::Cancelled, cause);
            }
            State::Ended => {}
        }
    }

    /// The caller never acknowledged our 200 OK: end the answered leg, send the caller a
    /// BYE (RFC 3261 §13.3.1.4), fail the call with 408. Before an answer there is no 200
    /// to acknowledge; the call ends as if the caller had gone.
    pub fn handle_ack_timeout(&mut self) {
        match self.state {
            State::Answered(leg) => {
                self.actions
                    .push_back(Out::Hangup(leg, EndReason::RemoteHangup));
                self.actions.push_back(Out::ByeCaller);
                self.finish(Disposition::Failed, 408);
            }
            _ => self.handle_caller_gone(Disposition::Failed, 408),
        }
    }

    /// An answered leg hung up (device hang-up or disconnect, BYE from the trunk).
    pub fn handle_leg_hangup(&mut self, now: Instant, leg: LegId) {
        match self.state {
            State::Answered(a) if a == leg => {
                self.actions.push_back(Out::ByeCaller);
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
                .push_back(Out::Hangup(leg, EndReason::MediaUnavailable));
            self.actions.push_back(Out::RejectCaller(code));
            self.finish(Disposition::Failed, code);
        }
    }

    /// No media crossed the answered call for the media timeout: end both sides (the
    /// caller gets a BYE, the leg is hung up); the CDR stays `ANSWERED` with cause 408.
    pub fn handle_media_timeout(&mut self) {
        if let State::Answered(leg) = self.state {
            self.actions
                .push_back(Out::Hangup(leg, EndReason::MediaTimeout));
            self.actions.push_back(Out::ByeCaller);
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
                self.withdraw_all(EndReason::Rerouted);
                if !self.next_step(now) {
                    self.finish_failed(480, Disposition::NoAnswer);
                }
            } else {
                // The last step had its own timeout: the plan is exhausted.
                self.withdraw_all(EndReason::Timeout);
                self.finish_failed(480, Disposition::NoAnswer);
            }
            return;
        }
        if let Some(d) = self.deadline
            && now >= d
            && self.state == State::Ringing
        {
            self.withdraw_all(EndReason::Timeout);
            self.actions.push_back(Out::RejectCaller(480));
            self.finish(Disposition::NoAnswer, 480);
        }
    }

    /// Next decision.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Out> {
        self.actions.pop_front()
    }

    fn withdraw_all(&mut self, reason: EndReason) {
        for leg in self.ringing.drain(..) {
            self.actions.push_back(Out::Withdraw(leg, reason));
        }
    }

    fn finish_failed(&mut self, code: u16, d: Disposition) {
        self.actions.push_back(Out::RejectCaller(code));
        self.finish(d, code);
    }

    fn finish(&mut self, disposition: Disposition, cause: u16) {
        self.state = State::Ended;
        self.ended = Some((disposition, cause));
        self.deadline = None;
        self.step_deadline = None;
        self.actions.push_back(Out::Finish { disposition, cause });
    }
}

// `declined` is set just before the match whenever `why` is `Declined`, so that arm is dead;
// it exists only to keep the match exhaustive without a wildcard hiding future variants.
fn unreachable_declined() {}

#[cfg(test)]
#[path = "legs_tests.rs"]
mod tests;
