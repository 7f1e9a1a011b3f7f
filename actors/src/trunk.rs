//! The trunk actor: one per configured SIP trunk toward the PSTN (the "voice network").
//!
//! It owns the trunk's health, which the router reads. Health comes from SIP OPTIONS
//! probes (sent through the SIP driver, [`SendProbe`]) and from real calls that the trunk
//! refuses with 503 or never answers. The decision is the pure [`TrunkHealth`] machine:
//! `down_after` consecutive failures mark the trunk down, `up_after` consecutive successes
//! bring it back.

use std::collections::HashMap;
use std::net::SocketAddr;

use actix::prelude::*;

use crate::metrics as m;
pub use parley_core::trunk::{HealthPolicy, ProbeOutcome, TrunkHealth};

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
