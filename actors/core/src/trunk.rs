//! Trunk health: whether the voice network toward a trunk is up.
//!
//! Health comes from SIP OPTIONS probes and from real calls that the trunk refuses with
//! 503 or never answers. [`TrunkHealth`] is the pure decision: `down_after` consecutive
//! failures mark the trunk down, `up_after` consecutive successes bring it back.
//!
//! A node that is itself overloaded reads its socket late, so a trunk's answers reach it
//! late and probes and calls time out although the trunk answered. Such a timeout says
//! nothing about the trunk: [`TrunkMonitor::handle_node_load`] tells the monitor when the
//! node is behind, and a timeout whose wait overlapped that is discounted (counted as
//! such in metrics, neither a failure nor a success). So is a probe's timeout noticed
//! [`LATE`] or more after its deadline: the monitor's own thread was behind (a stalled
//! event loop, a stopped process), so it cannot tell whether the answer came in time.
//! Answers are never discounted: a 503 from the trunk is the trunk's word.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub use crate::overload::LATE;

/// How a trunk is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Time between OPTIONS probes (zero disables probing).
    pub interval: Duration,
    /// A probe with no answer after this long counts as failed.
    pub timeout: Duration,
    /// Consecutive failures that mark the trunk down.
    pub down_after: u32,
    /// Consecutive successes that mark it up again.
    pub up_after: u32,
    /// How long a call can wait for the trunk's final answer (Timer B, 64×T1): a call's
    /// timeout is discounted when the node was overloaded within this long.
    pub call_window: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            down_after: 2,
            up_after: 2,
            call_window: Duration::from_secs(32),
        }
    }
}

/// What a probe (or a call) learned about the trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The trunk answered with this status. Anything but 503 proves it alive (a 404 or 405
    /// to OPTIONS still means the trunk processes SIP).
    Answered(u16),
    /// No answer in time.
    Timeout,
}

impl ProbeOutcome {
    /// Whether this outcome counts as healthy.
    pub fn is_ok(self) -> bool {
        matches!(self, ProbeOutcome::Answered(code) if code != 503)
    }
}

/// What a call's final answer from the trunk says about the trunk's health: a 2xx proves
/// it alive, a 503 or no answer at all (408, our own timeout) counts against it, anything
/// else (busy, not found, declined) says nothing about the voice network.
pub fn call_outcome(code: u16) -> Option<ProbeOutcome> {
    match code {
        200..=299 => Some(ProbeOutcome::Answered(code)),
        408 => Some(ProbeOutcome::Timeout),
        503 => Some(ProbeOutcome::Answered(503)),
        _ => None,
    }
}

/// Up/down state with hysteresis. Sans-IO: outcomes in, state changes out.
#[derive(Debug, Clone)]
pub struct TrunkHealth {
    policy: HealthPolicy,
    up: bool,
    fails: u32,
    oks: u32,
}

impl TrunkHealth {
    /// A trunk that starts up.
    pub fn new(policy: HealthPolicy) -> Self {
        Self {
            policy,
            up: true,
            fails: 0,
            oks: 0,
        }
    }

    /// Whether calls may use the trunk.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Feeds one outcome; returns the new state when it changed.
    pub fn handle_outcome(&mut self, outcome: ProbeOutcome) -> Option<bool> {
        if outcome.is_ok() {
            self.fails = 0;
            self.oks = self.oks.saturating_add(1);
            if !self.up && self.oks >= self.policy.up_after.max(1) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.oks = 0;
            self.fails = self.fails.saturating_add(1);
            if self.up && self.fails >= self.policy.down_after.max(1) {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

/// Where a health outcome came from (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeSource {
    /// An OPTIONS probe.
    Options,
    /// A real call.
    Call,
}

impl OutcomeSource {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeSource::Options => "options",
            OutcomeSource::Call => "call",
        }
    }
}

/// How an outcome was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Healthy.
    Ok,
    /// Against the trunk.
    Fail,
    /// A timeout while the node itself was overloaded: not counted either way.
    Discounted,
}

impl Counted {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Counted::Ok => "ok",
            Counted::Fail => "fail",
            Counted::Discounted => "discounted",
        }
    }
}

/// What the trunk's driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrunkOutput {
    /// Send OPTIONS probe number `seq`; its answer comes back through
    /// [`TrunkMonitor::handle_probe_result`].
    SendProbe(u64),
    /// An outcome was counted (metrics).
    Counted {
        /// Probe or call.
        source: OutcomeSource,
        /// How it counted.
        result: Counted,
    },
    /// The trunk went up or down because of `outcome`.
    Changed {
        /// The new state.
        up: bool,
        /// The outcome that tipped it.
        outcome: ProbeOutcome,
    },
}

/// The trunk's health over time: when to probe, which probe answers still count, and
/// the up/down state. Sans-IO: time in, probes and state changes out.
#[derive(Debug)]
pub struct TrunkMonitor {
    health: TrunkHealth,
    policy: HealthPolicy,
    next_probe: Option<Instant>,
    /// Probes in flight: when each was sent and when it counts as unanswered.
    pending: BTreeMap<u64, (Instant, Instant)>,
    /// Whether the node is overloaded now, and when it last was.
    node_overloaded: bool,
    overloaded_at: Option<Instant>,
    seq: u64,
    out: VecDeque<TrunkOutput>,
}

impl TrunkMonitor {
    /// A trunk that starts up. With `probing` (and a non-zero interval) the first probe is
    /// due at once, then every interval.
    pub fn new(policy: HealthPolicy, probing: bool, now: Instant) -> Self {
        Self {
            health: TrunkHealth::new(policy),
            policy,
            next_probe: (probing && !policy.interval.is_zero()).then_some(now),
            pending: BTreeMap::new(),
            node_overloaded: false,
            overloaded_at: None,
            seq: 0,
            out: VecDeque::new(),
        }
    }

    /// Whether calls may use the trunk.
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// A probe was answered (or failed) before its deadline; a late answer is ignored,
    /// since its timeout already counted.
    pub fn handle_probe_result(&mut self, seq: u64, outcome: ProbeOutcome) {
        if let Some((sent, _)) = self.pending.remove(&seq) {
            let discount = outcome == ProbeOutcome::Timeout && self.overloaded_since(sent);
            self.record(outcome, OutcomeSource::Options, discount);
        }
    }

    /// A real call taught something about the trunk ([`call_outcome`]).
    pub fn handle_call_outcome(&mut self, now: Instant, outcome: ProbeOutcome) {
        let recent = self.node_overloaded
            || self
                .overloaded_at
                .is_some_and(|at| now.saturating_duration_since(at) <= self.policy.call_window);
        let discount = outcome == ProbeOutcome::Timeout && recent;
        self.record(outcome, OutcomeSource::Call, discount);
    }

    /// The node became overloaded (its own queue is behind) or recovered.
    pub fn handle_node_load(&mut self, now: Instant, overloaded: bool) {
        if self.node_overloaded || overloaded {
            self.overloaded_at = Some(now);
        }
        self.node_overloaded = overloaded;
    }

    /// Whether the node was overloaded at any time from `since` on.
    fn overloaded_since(&self, since: Instant) -> bool {
        self.node_overloaded || self.overloaded_at.is_some_and(|at| at >= since)
    }

    /// Time passed: unanswered probes count as failures, a due probe is sent.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<(u64, Instant, Instant)> = self
            .pending
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(s, (sent, at))| (*s, *sent, *at))
            .collect();
        for (seq, sent, at) in expired {
            self.pending.remove(&seq);
            let late = now.saturating_duration_since(at) >= LATE;
            let discount = late || self.overloaded_since(sent);
            self.record(ProbeOutcome::Timeout, OutcomeSource::Options, discount);
        }
        if let Some(at) = self.next_probe
            && at <= now
        {
            self.seq += 1;
            self.pending
                .insert(self.seq, (now, now + self.policy.timeout));
            self.out.push_back(TrunkOutput::SendProbe(self.seq));
            self.next_probe = Some(now + self.policy.interval);
        }
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|(_, at)| *at).min();
        match (self.next_probe, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Next thing to do.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<TrunkOutput> {
        self.out.pop_front()
    }

    fn record(&mut self, outcome: ProbeOutcome, source: OutcomeSource, discount: bool) {
        let result = match (discount, outcome.is_ok()) {
            (true, _) => Counted::Discounted,
            (false, true) => Counted::Ok,
            (false, false) => Counted::Fail,
        };
        self.out.push_back(TrunkOutput::Counted { source, result });
        if discount {
            return;
        }
        if let Some(up) = self.health.handle_outcome(outcome) {
            self.out.push_back(TrunkOutput::Changed { up, outcome });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProbeOutcome::*;

    #[test]
    fn calls_count_toward_health_only_when_they_say_something() {
        let rows = [
            (200, Some(Answered(200))),
            (408, Some(Timeout)),
            (503, Some(Answered(503))),
            (486, None),
            (404, None),
            (603, None),
        ];
        for (code, want) in rows {
            assert_eq!(call_outcome(code), want, "{code}");
        }
    }

    fn drain(m: &mut TrunkMonitor) -> Vec<TrunkOutput> {
        std::iter::from_fn(|| m.poll_output()).collect()
    }

    #[test]
    fn probes_go_out_every_interval_and_unanswered_ones_count_as_failures() {
        let t0 = Instant::now();
        let policy = HealthPolicy::default(); // 10 s interval, 2 s timeout, 2 down, 2 up
        let mut m = TrunkMonitor::new(policy, true, t0);
        assert_eq!(m.poll_timeout(), Some(t0));
        m.handle_timeout(t0);
        assert_eq!(drain(&mut m), [TrunkOutput::SendProbe(1)]);
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        m.handle_probe_result(1, Answered(200));
        let ok = TrunkOutput::Counted {
            source: OutcomeSource::Options,
            result: Counted::Ok,
        };
        let fail = TrunkOutput::Counted {
            source: OutcomeSource::Options,
            result: Counted::Fail,
        };
        assert_eq!(drain(&mut m), [ok]);
        // Two probes nobody answers: the trunk goes down on the second timeout.
        for (i, at) in [10u64, 20].into_iter().enumerate() {
            m.handle_timeout(t0 + Duration::from_secs(at));
            assert_eq!(drain(&mut m), [TrunkOutput::SendProbe(2 + i as u64)]);
            m.handle_timeout(t0 + Duration::from_secs(at + 2));
            let mut want = vec![fail];
            if i == 1 {
                want.push(TrunkOutput::Changed {
                    up: false,
                    outcome: Timeout,
                });
            }
            assert_eq!(drain(&mut m), want);
        }
        assert!(!m.is_up());
        // An answer after its own timeout is ignored; a call's 2xx counts.
        m.handle_probe_result(3, Answered(200));
        assert_eq!(drain(&mut m), []);
        m.handle_call_outcome(t0, Answered(200));
        m.handle_call_outcome(t0, Answered(200));
        let call_ok = TrunkOutput::Counted {
            source: OutcomeSource::Call,
            result: Counted::Ok,
        };
        assert_eq!(
            drain(&mut m),
            [
                call_ok,
                call_ok,
                TrunkOutput::Changed {
                    up: true,
                    outcome: Answered(200)
                }
            ]
        );
    }

    #[test]
    fn timeouts_while_the_node_is_overloaded_are_discounted_answers_are_not() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let policy = HealthPolicy {
            down_after: 1,
            ..Default::default()
        };
        let mut m = TrunkMonitor::new(policy, true, t0);
        m.handle_timeout(t0);
        assert_eq!(drain(&mut m), [TrunkOutput::SendProbe(1)]);
        // The node falls behind while probe 1 waits, and recovers before its deadline:
        // the timeout overlapped the overload, so it says nothing about the trunk.
        m.handle_node_load(t0 + s(1), true);
        m.handle_node_load(t0 + Duration::from_millis(1500), false);
        m.handle_timeout(t0 + s(2));
        let discounted = |source| TrunkOutput::Counted {
            source,
            result: Counted::Discounted,
        };
        assert_eq!(drain(&mut m), [discounted(OutcomeSource::Options)]);
        assert!(m.is_up());
        // A call's timeout within the call window of the overload: discounted too; a 503
        // the trunk sent is its own word and counts.
        m.handle_call_outcome(t0 + s(5), Timeout);
        assert_eq!(drain(&mut m), [discounted(OutcomeSource::Call)]);
        assert!(m.is_up());
        // Probe 2, sent after the node recovered, times out: that counts.
        m.handle_timeout(t0 + s(10));
        assert_eq!(drain(&mut m), [TrunkOutput::SendProbe(2)]);
        m.handle_timeout(t0 + s(12));
        assert_eq!(
            drain(&mut m),
            [
                TrunkOutput::Counted {
                    source: OutcomeSource::Options,
                    result: Counted::Fail
                },
                TrunkOutput::Changed {
                    up: false,
                    outcome: Timeout
                }
            ]
        );
        // A deadline noticed a second late (the node's loop stalled): discounted.
        let mut m = TrunkMonitor::new(policy, true, t0);
        m.handle_timeout(t0);
        assert_eq!(drain(&mut m), [TrunkOutput::SendProbe(1)]);
        m.handle_timeout(t0 + s(3));
        assert_eq!(drain(&mut m)[0], discounted(OutcomeSource::Options));
        assert!(m.is_up());
        // Long after the overload, a call's timeout counts again; while overloaded, a
        // 503 answer still counts.
        let mut m = TrunkMonitor::new(policy, false, t0);
        m.handle_node_load(t0, true);
        m.handle_node_load(t0 + s(1), false);
        m.handle_call_outcome(t0 + s(40), Timeout);
        assert_eq!(
            drain(&mut m)[0],
            TrunkOutput::Counted {
                source: OutcomeSource::Call,
                result: Counted::Fail
            }
        );
        let mut m = TrunkMonitor::new(policy, false, t0);
        m.handle_node_load(t0, true);
        m.handle_call_outcome(t0 + s(1), Answered(503));
        assert_eq!(
            drain(&mut m),
            [
                TrunkOutput::Counted {
                    source: OutcomeSource::Call,
                    result: Counted::Fail
                },
                TrunkOutput::Changed {
                    up: false,
                    outcome: Answered(503)
                }
            ]
        );
    }

    #[test]
    fn without_a_prober_nothing_is_scheduled() {
        let m = TrunkMonitor::new(HealthPolicy::default(), false, Instant::now());
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn hysteresis() {
        let mut h = TrunkHealth::new(HealthPolicy {
            down_after: 2,
            up_after: 3,
            ..Default::default()
        });
        let rows: Vec<(ProbeOutcome, Option<bool>, bool)> = vec![
            (Answered(200), None, true),
            (Timeout, None, true),
            (Answered(200), None, true), // a success resets the failure count
            (Timeout, None, true),
            (Answered(503), Some(false), false), // second consecutive failure: down
            (Timeout, None, false),
            (Answered(404), None, false), // any answer but 503 is alive
            (Answered(200), None, false),
            (Answered(200), Some(true), true), // third consecutive success: up
            (Answered(200), None, true),
        ];
        for (i, (o, change, up)) in rows.into_iter().enumerate() {
            assert_eq!(h.handle_outcome(o), change, "row {i}");
            assert_eq!(h.is_up(), up, "row {i}");
        }
    }
}
