//! The trunk actor: one per configured SIP trunk toward the PSTN (the "voice network").
//!
//! It owns the trunk's health, which the router reads. Health comes from SIP OPTIONS
//! probes (sent through the SIP driver, [`SendProbe`]) and from real calls that the trunk
//! refuses with 503 or never answers. The decision is the pure [`TrunkHealth`] machine:
//! `down_after` consecutive failures mark the trunk down, `up_after` consecutive successes
//! bring it back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;

use crate::metrics as m;

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

/// Ask the SIP driver to send an OPTIONS probe to `dest`; the outcome comes back to `reply`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SendProbe {
    /// Where to send it.
    pub dest: SocketAddr,
    /// The prober's sequence number, echoed in the result.
    pub seq: u64,
    /// Where the result goes.
    pub reply: Recipient<ProbeResult>,
}

/// The outcome of a probe.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct ProbeResult {
    /// The sequence number from [`SendProbe`].
    pub seq: u64,
    /// What happened.
    pub outcome: ProbeOutcome,
}

/// A call through the trunk failed in a way that says something about its health
/// (503 or no answer at all).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct CallOutcome(pub ProbeOutcome);

/// One trunk.
pub struct TrunkActor {
    name: String,
    addr: SocketAddr,
    health: TrunkHealth,
    policy: HealthPolicy,
    prober: Option<Recipient<SendProbe>>,
    seq: u64,
    pending: HashMap<u64, SpawnHandle>,
}

impl TrunkActor {
    /// A trunk that starts up; with a `prober` it is probed with OPTIONS per `policy`.
    pub fn new(
        name: String,
        addr: SocketAddr,
        policy: HealthPolicy,
        prober: Option<Recipient<SendProbe>>,
    ) -> Self {
        Self {
            name,
            addr,
            health: TrunkHealth::new(policy),
            policy,
            prober,
            seq: 0,
            pending: HashMap::new(),
        }
    }

    fn record(&mut self, outcome: ProbeOutcome, source: &'static str) {
        let result = if outcome.is_ok() { "ok" } else { "fail" };
        metrics::counter!(m::TRUNK_PROBES_TOTAL, "trunk" => self.name.clone(), "source" => source, "result" => result).increment(1);
        if let Some(up) = self.health.handle_outcome(outcome) {
            metrics::gauge!(m::TRUNK_UP, "trunk" => self.name.clone()).set(if up {
                1.0
            } else {
                0.0
            });
            if up {
                tracing::info!(trunk = %self.name, addr = %self.addr, "trunk up");
            } else {
                tracing::warn!(trunk = %self.name, addr = %self.addr, ?outcome, "trunk down: calls go over the packet network");
            }
        }
    }

    fn probe(&mut self, ctx: &mut Context<Self>) {
        let Some(prober) = self.prober.clone() else {
            return;
        };
        self.seq += 1;
        let seq = self.seq;
        prober.do_send(SendProbe {
            dest: self.addr,
            seq,
            reply: ctx.address().recipient(),
        });
        let timer = ctx.run_later(self.policy.timeout, move |act, _| {
            if act.pending.remove(&seq).is_some() {
                act.record(ProbeOutcome::Timeout, "options");
            }
        });
        self.pending.insert(seq, timer);
    }
}

impl Actor for TrunkActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics::gauge!(m::TRUNK_UP, "trunk" => self.name.clone()).set(1.0);
        for source in ["options", "call"] {
            for result in ["ok", "fail"] {
                metrics::counter!(m::TRUNK_PROBES_TOTAL, "trunk" => self.name.clone(), "source" => source, "result" => result).increment(0);
            }
        }
        if self.prober.is_some() && !self.policy.interval.is_zero() {
            self.probe(ctx);
            ctx.run_interval(self.policy.interval, |act, ctx| act.probe(ctx));
        }
    }
}

/// Whether the trunk can take calls, and where it is.
#[derive(Message)]
#[rtype(result = "TrunkState")]
pub struct GetTrunkState;

/// Reply to [`GetTrunkState`].
#[derive(Debug, Clone, MessageResponse)]
pub struct TrunkState {
    /// Trunk name.
    pub name: String,
    /// Signalling address.
    pub addr: SocketAddr,
    /// Whether calls may be routed to it.
    pub up: bool,
}

impl Handler<GetTrunkState> for TrunkActor {
    type Result = TrunkState;
    fn handle(&mut self, _: GetTrunkState, _: &mut Context<Self>) -> TrunkState {
        TrunkState {
            name: self.name.clone(),
            addr: self.addr,
            up: self.health.is_up(),
        }
    }
}

impl Handler<ProbeResult> for TrunkActor {
    type Result = ();
    fn handle(&mut self, r: ProbeResult, ctx: &mut Context<Self>) {
        // A result after our own timeout already counted as a failure: ignore it.
        if let Some(timer) = self.pending.remove(&r.seq) {
            ctx.cancel_future(timer);
            self.record(r.outcome, "options");
        }
    }
}

impl Handler<CallOutcome> for TrunkActor {
    type Result = ();
    fn handle(&mut self, c: CallOutcome, _: &mut Context<Self>) {
        self.record(c.0, "call");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProbeOutcome::*;

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
