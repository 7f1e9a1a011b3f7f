//! The device side of a storm: many simulated IM devices ([`Device`]) logged in to a
//! Parley node, answering or rejecting the storm's calls and, with churn, moving ringing
//! calls from one device of a user to the other by changing presence.
//!
//! One task per user owns that user's devices (one, or two when churn is on) and decides
//! every offer itself: the devices are connected with no automatic answer, and the task
//! sends `answer`, `reject` and `presence` through [`Device::send`]. A call is decided on
//! its first `incoming_call` for the user; when it shows up again on a device (re-routed
//! by someone else's churn, or the churn's own target) it is answered.
//!
//! Churn, for a call chosen to churn on a user with devices A (ringing, `available`) and B
//! (`away`): B sends `presence available`, then A sends `presence away`. B goes first so
//! that the user always has an `available` device: A away first would, for a moment,
//! leave the user with only `away` devices, which the node routes to the PSTN line while
//! the trunk is up. The node then offers the call to B (`incoming_call`) and withdraws it
//! from A (`call_ended rerouted`); the time from B's `presence` to B's `incoming_call` is
//! the `reroute` sample. A and B have swapped roles for the next churn.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use parley_codecs::control::{ClientMsg, ServerMsg, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::device::{Device, DeviceConfig, DeviceError, MediaMode, StatsSnapshot};
use crate::report::{DevicesReport, Latency};

/// Most users a `PATTERN:FIRST-LAST` spec may expand to.
pub const MAX_USERS: u64 = 10_000;
/// Logins (QUIC handshake and `login`) [`Fleet::start`] runs at once.
const MAX_LOGINS_IN_FLIGHT: usize = 64;
/// How long [`Fleet::start`] waits for the `pong` that follows the initial presence.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time given to the node to apply the initial presence of every device before calls
/// come; the `pong` only proves that the device's connection read the `presence`.
const SETTLE: Duration = Duration::from_millis(200);
/// [`Device::next_event`] needs a timeout; this one only bounds a wait that a stop or a
/// timer interrupts anyway.
const EVENT_WAIT: Duration = Duration::from_secs(3600);

/// The devices a storm logs in and how they treat calls.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The node's QUIC address.
    pub quic: SocketAddr,
    /// The node's certificate (DER).
    pub cert_der: Vec<u8>,
    /// Tenant of every user.
    pub tenant: String,
    /// User names; each gets one device, two with `churn_ratio > 0`.
    pub users: Vec<String>,
    /// The password of every user.
    pub password: String,
    /// Delay between `incoming_call` and `answer`.
    pub answer_after: Duration,
    /// Share of calls rejected (`reject`, so the caller gets 603), 0 to 1.
    pub reject_ratio: f64,
    /// Share of calls moved to the user's second device while they ring, 0 to 1.
    pub churn_ratio: f64,
    /// Media on connected calls.
    pub media: MediaMode,
}

impl FleetConfig {
    /// One device per user answering at once with echoed media, no rejects, no churn, in
    /// tenant `demo`.
    pub fn new(quic: SocketAddr, cert_der: Vec<u8>, users: Vec<String>, password: &str) -> Self {
        FleetConfig {
            quic,
            cert_der,
            tenant: "demo".into(),
            users,
            password: password.into(),
            answer_after: Duration::ZERO,
            reject_ratio: 0.0,
            churn_ratio: 0.0,
            media: MediaMode::Echo,
        }
    }

    /// Devices per user: two when churn is on.
    pub fn devices_per_user(&self) -> usize {
        if self.churn_ratio > 0.0 { 2 } else { 1 }
    }

    fn check(&self) -> Result<(), FleetError> {
        if self.users.is_empty() {
            return Err(FleetError::Config("no device user".into()));
        }
        for (name, r) in [
            ("reject ratio", self.reject_ratio),
            ("churn ratio", self.churn_ratio),
        ] {
            if !(0.0..=1.0).contains(&r) {
                return Err(FleetError::Config(format!("{name} {r} is not in 0..=1")));
            }
        }
        Ok(())
    }
}

/// Why the devices could not be logged in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// A configuration value is out of range.
    #[error("bad device configuration: {0}")]
    Config(String),
    /// A device could not log in.
    #[error("device {user}/{device}")]
    Login {
        /// The user.
        user: String,
        /// The device name.
        device: String,
        /// What went wrong.
        source: DeviceError,
    },
    /// The devices' QUIC endpoint could not be set up.
    #[error("QUIC endpoint: {0}")]
    Endpoint(DeviceError),
    /// A device did not confirm its initial presence.
    #[error("device {0} did not answer the ping after its presence")]
    Settle(String),
}

/// Parses a list of users: `alice,bob` (comma-separated) or `PATTERN:FIRST-LAST`, where
/// `%d` in the pattern is replaced by each number of the range (`user%d:1-50` is `user1`
/// … `user50`).
pub fn parse_users(spec: &str) -> Result<Vec<String>, String> {
    let spec = spec.trim();
    if spec.contains("%d") {
        let (pattern, range) = spec
            .rsplit_once(':')
            .ok_or_else(|| format!("`{spec}`: a pattern needs a range, PATTERN:FIRST-LAST"))?;
        let (a, b) = range
            .split_once('-')
            .ok_or_else(|| format!("`{spec}`: the range must be FIRST-LAST"))?;
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("`{spec}`: `{s}` is not a number"))
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("`{spec}`: FIRST is above LAST"));
        }
        if b - a >= MAX_USERS {
            return Err(format!("`{spec}`: more than {MAX_USERS} users"));
        }
        return Ok((a..=b)
            .map(|n| pattern.replace("%d", &n.to_string()))
            .collect());
    }
    let users: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if users.is_empty() {
        return Err(format!("`{spec}` names no user"));
    }
    Ok(users)
}

/// Logged-in devices working through a storm's calls; [`Fleet::finish`] logs them out and
/// returns what they saw.
#[derive(Debug)]
pub struct Fleet {
    stop: watch::Sender<bool>,
    users: JoinSet<UserResult>,
    devices: u64,
}

impl Fleet {
    /// Logs every device in (all at once), sends the initial presence (`away` on each
    /// user's second device) and gives the node a moment to apply it.
    pub async fn start(cfg: FleetConfig) -> Result<Fleet, FleetError> {
        cfg.check()?;
        let per_user = cfg.devices_per_user();
        // One UDP socket for all devices: thousands of endpoints would cost a socket and a
        // driver task each.
        let endpoint = crate::device::client_endpoint(cfg.quic).map_err(FleetError::Endpoint)?;
        let mut jobs = Vec::with_capacity(cfg.users.len() * per_user);
        for (u, user) in cfg.users.iter().enumerate() {
            for d in 0..per_user {
                let dcfg = DeviceConfig {
                    target: cfg.quic,
                    cert_der: cfg.cert_der.clone(),
                    tenant: cfg.tenant.clone(),
                    user: user.clone(),
                    password: cfg.password.clone(),
                    device: format!("load-{d}"),
                    answer_after: None,
                    reject: false,
                    hangup_after: None,
                    media: cfg.media,
                };
                jobs.push((u, d, dcfg));
            }
        }
        let mut slots: Vec<Vec<Option<Device>>> = (0..cfg.users.len())
            .map(|_| (0..per_user).map(|_| None).collect())
            .collect();
        let mut jobs = jobs.into_iter();
        let mut logins = JoinSet::new();
        loop {
            // A bounded number of handshakes in flight, so that a large fleet does not
            // hit the node (and its login deadline) all at once.
            while logins.len() < MAX_LOGINS_IN_FLIGHT
                && let Some((u, d, dcfg)) = jobs.next()
            {
                logins.spawn(login(endpoint.clone(), u, d, dcfg));
            }
            let Some(joined) = logins.join_next().await else {
                break;
            };
            let Ok(done) = joined else {
                return Err(FleetError::Config("a login task panicked".into()));
            };
            let (u, d, dev) = done?;
            slots[u][d] = Some(dev);
        }
        let users: Vec<Vec<Device>> = slots
            .into_iter()
            .map(|s| s.into_iter().flatten().collect())
            .collect();
        if per_user > 1 {
            tokio::time::sleep(SETTLE).await;
        }

        let devices = (cfg.users.len() * per_user) as u64;
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for devs in users {
            let (timer_tx, timer_rx) = mpsc::unbounded_channel();
            let user = UserTask {
                devs,
                stop: stop_rx.clone(),
                timer_tx,
                rng: StdRng::from_rng(&mut rand::rng()),
                cfg: Knobs {
                    answer_after: cfg.answer_after,
                    reject_ratio: cfg.reject_ratio,
                    churn_ratio: cfg.churn_ratio,
                },
            };
            tasks.spawn(user.run(timer_rx));
        }
        Ok(Fleet {
            stop,
            users: tasks,
            devices,
        })
    }

    /// Stops every user task, closes the devices and sums what they counted.
    pub async fn finish(mut self) -> DevicesReport {
        let _ = self.stop.send(true);
        let mut total = UserResult::new();
        let mut users = 0;
        while let Some(joined) = self.users.join_next().await {
            if let Ok(r) = joined {
                users += 1;
                total.merge(&r);
            }
        }
        let s = total.stats;
        DevicesReport {
            users,
            devices: self.devices,
            offered: s.calls_offered,
            answered: s.calls_answered,
            rejected: total.rejected,
            connected: s.calls_connected,
            ended: s.calls_ended,
            rerouted: total.rerouted,
            churns: total.churns,
            rtp_received: s.rtp_received,
            rtp_sent: s.rtp_sent,
            rtp_ssrc_changes: s.rtp_ssrc_changes,
            rtp_discontinuities: s.rtp_discontinuities,
            reroute: Latency::of(&total.reroute),
        }
    }
}

/// Logs device `d` of user `u` in; the second device of a user then turns `away` (so that
/// only the first rings) and waits for the `pong` after it.
async fn login(
    endpoint: quinn::Endpoint,
    u: usize,
    d: usize,
    dcfg: DeviceConfig,
) -> Result<(usize, usize, Device), FleetError> {
    let mut dev = Device::connect_on(&endpoint, dcfg.clone())
        .await
        .map_err(|source| FleetError::Login {
            user: dcfg.user.clone(),
            device: dcfg.device.clone(),
            source,
        })?;
    if d > 0 {
        let settled = async {
            dev.send(presence(Status::Away)).await.ok()?;
            dev.send(ClientMsg::Ping { id: 1 }).await.ok()?;
            dev.wait_for(SETTLE_TIMEOUT, |m| matches!(m, ServerMsg::Pong { .. }))
                .await
        };
        if settled.await.is_none() {
            return Err(FleetError::Settle(format!("{}/{}", dcfg.user, dcfg.device)));
        }
    }
    Ok((u, d, dev))
}

fn presence(status: Status) -> ClientMsg {
    ClientMsg::Presence {
        status,
        idle_ms: 0,
        note: None,
    }
}

#[derive(Debug)]
struct Knobs {
    answer_after: Duration,
    reject_ratio: f64,
    churn_ratio: f64,
}

/// What one user's devices saw.
#[derive(Debug)]
struct UserResult {
    stats: StatsSnapshot,
    rejected: u64,
    rerouted: u64,
    churns: u64,
    reroute: Histogram<u64>,
}

impl UserResult {
    fn new() -> Self {
        UserResult {
            stats: StatsSnapshot::default(),
            rejected: 0,
            rerouted: 0,
            churns: 0,
            reroute: crate::report::histogram(),
        }
    }

    fn merge(&mut self, o: &UserResult) {
        let (a, b) = (&mut self.stats, &o.stats);
        a.calls_offered += b.calls_offered;
        a.calls_answered += b.calls_answered;
        a.calls_connected += b.calls_connected;
        a.calls_ended += b.calls_ended;
        a.rtp_received += b.rtp_received;
        a.rtp_sent += b.rtp_sent;
        a.bad_datagrams += b.bad_datagrams;
        a.rtp_ssrc_changes += b.rtp_ssrc_changes;
        a.rtp_discontinuities += b.rtp_discontinuities;
        self.rejected += o.rejected;
        self.rerouted += o.rerouted;
        self.churns += o.churns;
        // Same bounds and precision: adding cannot go out of range.
        let _ = self.reroute.add(&o.reroute);
    }
}

enum Step {
    Stop,
    Timer(usize, String),
    Event(usize, Option<ServerMsg>),
}

struct UserTask {
    devs: Vec<Device>,
    stop: watch::Receiver<bool>,
    timer_tx: mpsc::UnboundedSender<(usize, String)>,
    rng: StdRng,
    cfg: Knobs,
}

impl UserTask {
    async fn run(mut self, mut timer_rx: mpsc::UnboundedReceiver<(usize, String)>) -> UserResult {
        let mut out = UserResult::new();
        let mut alive = vec![true; self.devs.len()];
        // Calls offered to each device and not withdrawn.
        let mut offered: Vec<HashSet<String>> = vec![HashSet::new(); self.devs.len()];
        // Calls this user has already decided.
        let mut seen: HashSet<String> = HashSet::new();
        // Churned calls: when the churn started and where the call should come.
        let mut churned: HashMap<String, (Instant, usize)> = HashMap::new();
        loop {
            let step = {
                let (a, b) = self.devs.split_at_mut(1);
                let (a_alive, b_alive) = (alive[0], alive.get(1).copied().unwrap_or(false));
                tokio::select! {
                    r = self.stop.changed() => {
                        if r.is_err() || *self.stop.borrow() { Step::Stop } else { continue }
                    }
                    Some((d, call)) = timer_rx.recv() => Step::Timer(d, call),
                    e = a[0].next_event(EVENT_WAIT), if a_alive => Step::Event(0, e),
                    e = async {
                        match b.first_mut() {
                            Some(dev) => dev.next_event(EVENT_WAIT).await,
                            None => std::future::pending().await,
                        }
                    }, if b_alive => Step::Event(1, e),
                }
            };
            match step {
                Step::Stop => break,
                Step::Timer(d, call) => {
                    if offered[d].contains(&call) {
                        let _ = self.devs[d].send(ClientMsg::Answer { call_id: call }).await;
                    }
                }
                Step::Event(d, None) => {
                    if self.devs[d].events_closed() {
                        alive[d] = false;
                    }
                }
                Step::Event(d, Some(msg)) => match msg {
                    ServerMsg::IncomingCall { call_id, .. } => {
                        let ack = ClientMsg::Ringing {
                            call_id: call_id.clone(),
                        };
                        let _ = self.devs[d].send(ack).await;
                        offered[d].insert(call_id.clone());
                        if let Some(&(t0, to)) = churned.get(&call_id)
                            && to == d
                        {
                            churned.remove(&call_id);
                            out.reroute.saturating_record(
                                u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                            );
                            self.answer(d, call_id).await;
                        } else if !seen.insert(call_id.clone()) {
                            // Re-routed here by a churn: answer it.
                            self.answer(d, call_id).await;
                        } else {
                            let rejected = self
                                .decide(d, call_id.clone(), &mut out, &mut churned)
                                .await;
                            if rejected {
                                // The node tells a device nothing more about a call it
                                // rejected.
                                offered[d].remove(&call_id);
                                seen.remove(&call_id);
                            }
                        }
                    }
                    ServerMsg::CallEnded { call_id, reason } => {
                        offered[d].remove(&call_id);
                        if reason == "rerouted" {
                            out.rerouted += 1;
                        } else {
                            seen.remove(&call_id);
                            churned.remove(&call_id);
                        }
                    }
                    // Other messages (address book, presence, chat, new kinds) do not
                    // concern the storm.
                    _ => {}
                },
            }
        }
        for dev in &self.devs {
            let s = dev.stats().snapshot();
            let t = &mut out.stats;
            t.calls_offered += s.calls_offered;
            t.calls_answered += s.calls_answered;
            t.calls_connected += s.calls_connected;
            t.calls_ended += s.calls_ended;
            t.rtp_received += s.rtp_received;
            t.rtp_sent += s.rtp_sent;
            t.bad_datagrams += s.bad_datagrams;
            t.rtp_ssrc_changes += s.rtp_ssrc_changes;
            t.rtp_discontinuities += s.rtp_discontinuities;
        }
        out
    }

    /// The first offer of a call to this user: reject, churn or answer. Returns whether
    /// it rejected the call.
    async fn decide(
        &mut self,
        d: usize,
        call_id: String,
        out: &mut UserResult,
        churned: &mut HashMap<String, (Instant, usize)>,
    ) -> bool {
        if self.rng.random::<f64>() < self.cfg.reject_ratio {
            out.rejected += 1;
            let _ = self.devs[d].send(ClientMsg::Reject { call_id }).await;
            return true;
        }
        let other = 1 - d.min(1);
        if self.devs.len() > 1 && self.rng.random::<f64>() < self.cfg.churn_ratio {
            out.churns += 1;
            churned.insert(call_id, (Instant::now(), other));
            let _ = self.devs[other].send(presence(Status::Available)).await;
            let _ = self.devs[d].send(presence(Status::Away)).await;
            return false;
        }
        self.answer(d, call_id).await;
        false
    }

    /// Answers at once, or sets a timer that answers if the offer is still there.
    async fn answer(&mut self, d: usize, call_id: String) {
        if self.cfg.answer_after.is_zero() {
            let _ = self.devs[d].send(ClientMsg::Answer { call_id }).await;
            return;
        }
        let tx = self.timer_tx.clone();
        let after = self.cfg.answer_after;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send((d, call_id));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse() {
        assert_eq!(parse_users("alice, bob,").unwrap(), ["alice", "bob"]);
        assert_eq!(
            parse_users("user%d:1-3").unwrap(),
            ["user1", "user2", "user3"]
        );
        assert_eq!(parse_users("a%d-x:7-7").unwrap(), ["a7-x"]);
        assert!(parse_users(" , ").is_err());
        assert!(parse_users("user%d").is_err());
        assert!(parse_users("user%d:3-1").is_err());
        assert!(parse_users("user%d:1-x").is_err());
        assert!(parse_users("user%d:1-10001").is_err());
        assert_eq!(parse_users("user%d:1-10000").unwrap().len(), 10_000);
    }

    #[test]
    fn ratios_are_checked() {
        let mut cfg = FleetConfig::new("127.0.0.1:9".parse().unwrap(), vec![], vec![], "x");
        assert!(cfg.check().is_err());
        cfg.users = vec!["alice".into()];
        assert!(cfg.check().is_ok());
        assert_eq!(cfg.devices_per_user(), 1);
        cfg.churn_ratio = 0.5;
        assert_eq!(cfg.devices_per_user(), 2);
        cfg.reject_ratio = 1.5;
        assert!(cfg.check().is_err());
        cfg.reject_ratio = f64::NAN;
        assert!(cfg.check().is_err());
    }
}
