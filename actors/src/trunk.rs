//! The trunk actor: one per configured SIP trunk toward the PSTN (the "voice network"),
//! the shell around a [`TrunkMonitor`]. Health comes from SIP OPTIONS probes (sent
//! through the SIP driver, [`SendProbe`]) and from real calls; the monitor decides when to
//! probe, which answers count and whether the trunk is up. The actor sends the probes,
//! keeps the timer and exports the metrics.

use std::net::SocketAddr;
use std::time::Instant;

use actix::prelude::*;
use parley_core::trunk::{TrunkMonitor, TrunkOutput};

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
    monitor: TrunkMonitor,
    prober: Option<Recipient<SendProbe>>,
    timer: Option<SpawnHandle>,
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
            monitor: TrunkMonitor::new(policy, prober.is_some(), Instant::now()),
            prober,
            timer: None,
        }
    }

    /// Performs what the monitor decided, then re-arms its timer.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        while let Some(out) = self.monitor.poll_output() {
            match out {
                TrunkOutput::SendProbe(seq) => {
                    if let Some(p) = &self.prober {
                        p.do_send(SendProbe {
                            dest: self.addr,
                            seq,
                            reply: ctx.address().recipient(),
                        });
                    }
                }
                TrunkOutput::Counted { source, ok } => {
                    let result = if ok { "ok" } else { "fail" };
                    metrics::counter!(m::TRUNK_PROBES_TOTAL, "trunk" => self.name.clone(), "source" => source.as_str(), "result" => result).increment(1);
                }
                TrunkOutput::Changed { up, outcome } => {
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
        }
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
        if let Some(at) = self.monitor.poll_timeout() {
            let after = at.saturating_duration_since(Instant::now());
            self.timer = Some(ctx.run_later(after, |act, ctx| {
                act.timer = None;
                act.monitor.handle_timeout(Instant::now());
                act.drive(ctx);
            }));
        }
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
        self.drive(ctx);
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
            up: self.monitor.is_up(),
        }
    }
}

impl Handler<ProbeResult> for TrunkActor {
    type Result = ();
    fn handle(&mut self, r: ProbeResult, ctx: &mut Context<Self>) {
        self.monitor.handle_probe_result(r.seq, r.outcome);
        self.drive(ctx);
    }
}

impl Handler<CallOutcome> for TrunkActor {
    type Result = ();
    fn handle(&mut self, c: CallOutcome, ctx: &mut Context<Self>) {
        self.monitor.handle_call_outcome(c.0);
        self.drive(ctx);
    }
}
