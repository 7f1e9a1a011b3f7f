//! Trunk health: whether the voice network toward a trunk is up.
//!
//! Health comes from SIP OPTIONS probes and from real calls that the trunk refuses with
//! 503 or never answers. [`TrunkHealth`] is the pure decision: `down_after` consecutive
//! failures mark the trunk down, `up_after` consecutive successes bring it back.

use std::time::Duration;

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
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            down_after: 2,
            up_after: 2,
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
