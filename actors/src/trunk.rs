//! The trunk actor: one per configured SIP trunk toward the PSTN (the "voice network"),
//! the shell around a [`TrunkMonitor`]. Health comes from SIP OPTIONS probes (sent
//! through the SIP driver, [`SendProbe`]) and from real calls; the monitor decides when to
//! probe, which answers count and whether the trunk is up. The actor sends the probes,
//! keeps the timer and exports the metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use parley_core::numberplan::{NumberPlan, TrunkId, TrunkSnapshot};
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

/// The node is (or is no longer) overloaded itself: timeouts meanwhile say nothing about
/// a trunk.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct NodeLoad {
    /// Whether the node is behind now.
    pub overloaded: bool,
}

/// One trunk.
pub struct TrunkActor {
    name: String,
    addr: SocketAddr,
    policy: HealthPolicy,
    monitor: TrunkMonitor,
    prober: Option<Recipient<SendProbe>>,
    timer: Option<SpawnHandle>,
    /// Up or down, as calls read it (see [`TrunkSet`]).
    up: Arc<AtomicBool>,
}

/// Every trunk of the node, and the number plan over them: what a call reads when it
/// routes. The up/down flags are shared with the trunk actors (which set them), so a
/// call's lookup reads them without a message per trunk.
#[derive(Debug, Default)]
pub struct TrunkSet {
    plan: Arc<NumberPlan>,
    trunks: Vec<TrunkEntry>,
    /// Whether the node is behind now (from [`TrunkSet::node_load`]).
    behind: AtomicBool,
    /// When it last caught up ([`crate::messages::flow_clock_ms`]; 0: never behind).
    caught_up_ms: std::sync::atomic::AtomicU64,
}

/// One trunk of a [`TrunkSet`].
#[derive(Debug)]
struct TrunkEntry {
    addr: Addr<TrunkActor>,
    up: Arc<AtomicBool>,
}

impl TrunkSet {
    /// The trunks (in [`TrunkId`] order, as in `plan`) with their actors' addresses and
    /// shared up flags (from [`TrunkActor::up_flag`]).
    pub fn new(plan: NumberPlan, trunks: Vec<(Addr<TrunkActor>, Arc<AtomicBool>)>) -> Self {
        Self {
            plan: Arc::new(plan),
            trunks: trunks
                .into_iter()
                .map(|(addr, up)| TrunkEntry { addr, up })
                .collect(),
            behind: AtomicBool::new(false),
            caught_up_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether the node has no trunk at all.
    pub fn is_empty(&self) -> bool {
        self.trunks.is_empty()
    }

    /// A trunk's name.
    pub fn name(&self, id: TrunkId) -> &str {
        self.plan.name(id)
    }

    /// What a call routing now sees; `seed` draws its weighted order.
    pub fn snapshot(&self, seed: u64) -> TrunkSnapshot {
        TrunkSnapshot {
            plan: self.plan.clone(),
            up: self
                .trunks
                .iter()
                .map(|t| t.up.load(Ordering::Relaxed))
                .collect(),
            seed,
        }
    }

    /// Tells every trunk whether the node itself is overloaded (and remembers it for the
    /// calls: [`TrunkSet::node_behind_at`]).
    pub fn node_load(&self, overloaded: bool) {
        if !overloaded && self.behind.load(Ordering::Relaxed) {
            self.caught_up_ms
                .store(crate::messages::flow_clock_ms(), Ordering::Relaxed);
        }
        self.behind.store(overloaded, Ordering::Relaxed);
        for t in &self.trunks {
            t.addr.do_send(NodeLoad { overloaded });
        }
    }

    /// The last time the node was behind, as of `now` (`now` while it is; `None`: never
    /// since start): a call gives an offer due in that time more time.
    pub fn node_behind_at(&self, now: Instant) -> Option<Instant> {
        if self.behind.load(Ordering::Relaxed) {
            return Some(now);
        }
        match self.caught_up_ms.load(Ordering::Relaxed) {
            0 => None,
            at => {
                let ago = crate::messages::flow_clock_ms().saturating_sub(at);
                now.checked_sub(Duration::from_millis(ago))
            }
        }
    }

    /// Feeds a trunk's health with what a call learned.
    pub fn call_outcome(&self, id: TrunkId, outcome: ProbeOutcome) {
        if let Some(t) = self.trunks.get(id) {
            t.addr.do_send(CallOutcome(outcome));
        }
    }
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
            policy,
            monitor: TrunkMonitor::new(policy, prober.is_some(), Instant::now()),
            prober,
            timer: None,
            up: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Probes through `prober` (for an actor created before its prober existed).
    pub fn with_prober(mut self, prober: Recipient<SendProbe>) -> Self {
        self.monitor = TrunkMonitor::new(self.policy, true, Instant::now());
        self.prober = Some(prober);
        self
    }

    /// The flag this actor keeps equal to its up/down state, for a [`TrunkSet`].
    pub fn up_flag(&self) -> Arc<AtomicBool> {
        self.up.clone()
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
                TrunkOutput::Counted { source, result } => {
                    metrics::counter!(m::TRUNK_PROBES_TOTAL, "trunk" => self.name.clone(), "source" => source.as_str(), "result" => result.as_str()).increment(1);
                }
                TrunkOutput::Changed { up, outcome } => {
                    self.up.store(up, Ordering::Relaxed);
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
        for result in ["answered", "failed", "rejected"] {
            metrics::counter!(m::TRUNK_CALLS_TOTAL, "trunk" => self.name.clone(), "result" => result).increment(0);
        }
        metrics::counter!(m::TRUNK_FAILOVERS_TOTAL, "trunk" => self.name.clone()).increment(0);
        for source in ["options", "call"] {
            for result in ["ok", "fail", "discounted"] {
                metrics::counter!(m::TRUNK_PROBES_TOTAL, "trunk" => self.name.clone(), "source" => source, "result" => result).increment(0);
            }
        }
        self.drive(ctx);
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
        self.monitor.handle_call_outcome(Instant::now(), c.0);
        self.drive(ctx);
    }
}

impl Handler<NodeLoad> for TrunkActor {
    type Result = ();
    fn handle(&mut self, l: NodeLoad, ctx: &mut Context<Self>) {
        if l.overloaded {
            tracing::info!(trunk = %self.name, "node overloaded: timeouts toward the trunk are not held against it");
        }
        self.monitor.handle_node_load(Instant::now(), l.overloaded);
        self.drive(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::TrunkSet;
    use parley_core::numberplan::NumberPlan;
    use std::time::{Duration, Instant};

    /// The calls see when the node was last behind: now while it is, the moment it
    /// caught up after, nothing before it ever was.
    #[test]
    fn the_calls_see_when_the_node_was_last_behind() {
        let set = TrunkSet::new(NumberPlan::new(Vec::new(), Vec::new()), Vec::new());
        let now = Instant::now();
        assert_eq!(set.node_behind_at(now), None);
        set.node_load(true);
        assert_eq!(set.node_behind_at(now), Some(now));
        set.node_load(false);
        std::thread::sleep(Duration::from_millis(30));
        let later = Instant::now();
        let at = set.node_behind_at(later).expect("it was behind");
        assert!(
            at < later && later - at >= Duration::from_millis(20),
            "{:?} ago",
            later - at
        );
        // Told again that it is not behind: the catch-up time stays.
        set.node_load(false);
        assert!(set.node_behind_at(Instant::now()).unwrap() <= at + Duration::from_millis(2));
    }
}
