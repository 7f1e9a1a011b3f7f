//! Cluster mode (`[cluster]`, `docs/operations.md` § Cluster): several nodes share where
//! every user's devices are through NATS JetStream, and a call arriving on any node rings
//! the callee's devices wherever they are connected.
//!
//! Why NATS (async-nats): the issue asks for an existing distributed engine rather than a
//! home-made protocol; NATS gives key-value buckets with watches (the registries) and
//! subjects (the call signalling between nodes) in one server, and `async-nats` is its
//! maintained Rust client (reconnects, resubscribes, JetStream KV).
//!
//! What lives where:
//! - bucket `parley_nodes`: one entry per node (`NodeRecord`: incarnation, relay address,
//!   load), written every `heartbeat_ms`. A node is alive while its entry keeps arriving:
//!   each node notes when it last saw every other node's entry (its own clock; no clock is
//!   shared), and one not seen for `node_expiry_secs` is dead. Debian's nats-server 2.9 has
//!   no per-key TTL, and an entry that ages out of a bucket tells no watcher, so liveness
//!   is the watchers' own judgement, as LiveKit's node selection uses fresh stats only.
//! - bucket `parley_devices`: one entry per logged-in device (`DeviceRecord`: user,
//!   presence, capabilities), key `<node>.<session>`, written on every presence change and
//!   again every `device_refresh_secs` (the bucket's max age is three times that, so a dead
//!   node's entries go from the bucket too). Every node watches the bucket and gives each
//!   user's actor the user's devices on the other nodes ([`RemoteDevice`]); presence
//!   changes on one node so reach the calls ringing through every other one, which
//!   re-route as they do for a local device.
//! - subject `parley.node.<id>`: the call signalling to a node (`Wire`, JSON). The node
//!   where a call arrives keeps the call (its call actor, its CDR, its routing of the
//!   user's rules over all the user's devices); a device on another node is rung through a
//!   proxy ([`RemoteProxy`]) that sends the offer there, where a [`HostedLeg`] offers it to
//!   the device and sends back what the device does. When the device answers, its node
//!   reserves a relay port and names it in the answer; the call bridges its caller's port
//!   to a port of its own that sends to it, and tells the device's node where its media
//!   comes from. The media so crosses the two nodes' relays and no other; one CDR, on the
//!   call's node.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use parley_actors::messages::{FlowStats, FromDevice, MediaPlane, SessionId, ToDevice};
use parley_actors::registry::Registry;
use parley_actors::remote::{DeviceBoard, RemoteLegs};
use parley_actors::user::RemoteDevice;
use parley_codecs::control::Status;
use parley_core::call::{DeviceLegEvent, EndReason};
use parley_core::router::DeviceState;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use crate::metrics as m;

#[cfg(test)]
mod tests;

/// The node registry's bucket.
pub const NODES_BUCKET: &str = "parley_nodes";
/// The device registry's bucket.
pub const DEVICES_BUCKET: &str = "parley_devices";
/// Claims on the CDRs of calls whose own node was lost (`<node>.<incarnation>.<call id>`):
/// the node that hosted the answered leg writes the CDR only if it created the claim, and
/// the lost node, restarted, drops its own row of that call.
pub const CLAIMS_BUCKET: &str = "parley_cdr_claims";
/// How long a claim is kept: a lost node restarted later keeps its own row too.
const CLAIMS_AGE: Duration = Duration::from_secs(7 * 86_400);
/// CDRs this node wrote for lost nodes' calls, remembered to withdraw if the node comes
/// back as it was (at most).
const MAX_SURVIVOR_CDRS: usize = 10_000;
/// Remote devices get node-local session ids from here up (local sessions count from 1).
const REMOTE_SESSION_BASE: u64 = 1 << 48;
/// Legs this node hosts for other nodes' calls, at most (more offers are refused `gone`).
const MAX_HOSTED_LEGS: usize = 100_000;
/// Legs this node's calls ring on other nodes, at most.
const MAX_PENDING_LEGS: usize = 100_000;
/// Expired nodes remembered for a fast re-read of their devices if they come back.
const MAX_EXPIRED_NODES: usize = 1024;
/// Legs remembered (all expired nodes together) to name in their `Forgot`, at most.
const MAX_FORGOTTEN_LEGS: usize = 10_000;
/// Device entries held for nodes not (yet) known to be alive, at most.
const MAX_WAITING_DEVICES: usize = 100_000;
/// A hosted leg not answered within this is ended (the calling node's own ring timeout is
/// far shorter: this only bounds a leg whose withdrawal was lost).
const HOSTED_RING_LIMIT: Duration = Duration::from_secs(600);
/// Messages waiting to go to NATS, at most (more are dropped and counted).
const OUTBOX: usize = 65_536;

/// How a node authenticates to NATS (its `Debug` never shows a secret).
#[derive(Clone)]
pub enum Auth {
    /// No credentials (a NATS server open to the node's network only).
    None,
    /// User name and password.
    UserPassword(String, String),
    /// A token.
    Token(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword(u, _) => write!(f, "UserPassword({u:?}, ***)"),
            Auth::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// NATS URLs for logs and errors: a password or token written into a URL
/// (`nats://user:secret@host`) is replaced by `***`.
pub fn redacted_urls(urls: &[String]) -> Vec<String> {
    urls.iter()
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme + 3 => {
                let userinfo = &u[scheme + 3..at];
                let user = userinfo.split(':').next().unwrap_or_default();
                if userinfo.contains(':') {
                    format!("{}{user}:***{}", &u[..scheme + 3], &u[at..])
                } else {
                    format!("{}***{}", &u[..scheme + 3], &u[at..])
                }
            }
            _ => u.clone(),
        })
        .collect()
}

/// What a node needs to join a cluster.
#[derive(Debug, Clone)]
pub struct Settings {
    /// NATS server URLs.
    pub urls: Vec<String>,
    /// This node's id.
    pub node_id: String,
    /// Credentials.
    pub auth: Auth,
    /// Where other nodes reach this node's relay.
    pub media_ip: IpAddr,
    /// Node registry refresh.
    pub heartbeat: Duration,
    /// A node unseen this long is dead.
    pub expiry: Duration,
    /// Device entry refresh.
    pub device_refresh: Duration,
}

/// A device as the device registry holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DeviceRecord {
    node: String,
    incarnation: u64,
    session: u64,
    tenant: String,
    user: String,
    device: String,
    status: Status,
    idle_ms: u64,
    note: Option<String>,
    opus: bool,
}

/// A node as the node registry holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeRecord {
    node: String,
    incarnation: u64,
    media_ip: IpAddr,
    /// Devices logged in on the node.
    devices: usize,
    /// Users with a device on the node.
    users: usize,
    /// Legs its calls ring or hold on other nodes.
    remote_legs: usize,
    /// Legs it hosts for other nodes' calls.
    hosted_legs: usize,
    /// Whether it is draining (takes no new devices or calls).
    draining: bool,
    /// The node process's CPU over the last heartbeat, in cores (1.0: one core busy).
    cpu_cores: f64,
}

/// What a device did with a leg, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LegEvent {
    Delivered,
    Answer,
    Reject,
    Hangup,
    Gone,
}

impl LegEvent {
    fn of(e: DeviceLegEvent) -> Self {
        match e {
            DeviceLegEvent::Delivered => Self::Delivered,
            DeviceLegEvent::Answer => Self::Answer,
            DeviceLegEvent::Reject => Self::Reject,
            DeviceLegEvent::Hangup => Self::Hangup,
            DeviceLegEvent::Gone => Self::Gone,
        }
    }

    fn core(self) -> DeviceLegEvent {
        match self {
            Self::Delivered => DeviceLegEvent::Delivered,
            Self::Answer => DeviceLegEvent::Answer,
            Self::Reject => DeviceLegEvent::Reject,
            Self::Hangup => DeviceLegEvent::Hangup,
            Self::Gone => DeviceLegEvent::Gone,
        }
    }

    /// Whether the leg is over after it.
    fn ends(self) -> bool {
        matches!(self, Self::Reject | Self::Hangup | Self::Gone)
    }
}

/// Call signalling between nodes (subject `parley.node.<to>`). `session` is always the
/// device's session id on the node that hosts the device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Wire {
    /// Ring the device.
    Offer {
        from: String,
        call_id: String,
        session: u64,
        caller: String,
        caller_name: Option<String>,
        called: String,
        /// The gateway's SIP Call-ID (empty: a device placed the call).
        #[serde(default)]
        sip_call_id: String,
        /// The calling node's incarnation (0: not said).
        #[serde(default)]
        incarnation: u64,
    },
    /// The device's answer was accepted; media to and from `media`.
    Connect {
        from: String,
        call_id: String,
        session: u64,
        media: SocketAddr,
        payload_type: u8,
        telephone_event: Option<u8>,
    },
    /// The offer is withdrawn or the call is over.
    End {
        from: String,
        call_id: String,
        session: u64,
        reason: String,
    },
    /// The device left an offer unacknowledged: close its session.
    Unresponsive { from: String, session: u64 },
    /// What the device did; `media` (with `answer`) is where its node receives the call's
    /// media for it.
    Event {
        from: String,
        call_id: String,
        session: u64,
        event: LegEvent,
        media: Option<SocketAddr>,
    },
    /// The sender had declared the receiver dead (it heard nothing for the expiry: a
    /// partition, a pause) and ended the legs between them; now it hears it again. The
    /// receiver, which may never have missed the sender, ends those legs too (a device
    /// ringing for a call the sender re-routed meanwhile stops): `legs` names them by
    /// call id and the session on the receiver's side, so a leg set up since the two
    /// see each other again is untouched.
    Forgot {
        from: String,
        #[serde(default)]
        legs: Vec<(String, u64)>,
    },
}

/// The subject `from` sends call signalling to `to` on: the sender's name is the last
/// token, so NATS permissions can let each node publish only as itself
/// (`docs/operations.md` § Cluster), and a message whose body names another sender is
/// refused.
fn subject(to: &str, from: &str) -> String {
    format!("parley.node.{to}.{from}")
}

/// What a node subscribes to: every sender's messages to it.
fn inbox(node: &str) -> String {
    format!("parley.node.{node}.*")
}

impl Wire {
    /// The node the message says it is from.
    fn sender(&self) -> &str {
        match self {
            Self::Offer { from, .. }
            | Self::Connect { from, .. }
            | Self::End { from, .. }
            | Self::Unresponsive { from, .. }
            | Self::Event { from, .. }
            | Self::Forgot { from, .. } => from,
        }
    }
}

/// A leg this node's call rings on another node.
struct Pending {
    node: String,
    remote_session: u64,
    call: Recipient<FromDevice>,
    media: Option<SocketAddr>,
}

/// A leg hosted for another node's call: its actor, and the device it rings (told of
/// the leg's end straight from the signalling, so that a withdrawal and a new offer of the
/// same call reach the device in the order they were sent).
struct Hosted {
    leg: Addr<HostedLeg>,
    device: Recipient<ToDevice>,
    device_call_id: String,
}

/// A device of another node.
struct Remote {
    local: SessionId,
    tenant: String,
    user: String,
    proxy: Addr<RemoteProxy>,
}

/// A device of this node, as published.
struct Local {
    record: DeviceRecord,
    calls: Recipient<ToDevice>,
}

/// When this node last saw another node's entry, and the entry.
struct Seen {
    incarnation: u64,
    at: Instant,
    record: Option<NodeRecord>,
    /// The entry's revision in the bucket (0: known from an offer only).
    revision: u64,
    /// Known to be alive now: an entry written within the expiry (by the entry's time),
    /// a second entry since the first, or an offer from it. A node seen only by an old
    /// entry (a watch replaying a dead node's last heartbeat) is not: its devices are not
    /// rung, and it goes at expiry without being counted as lost.
    confirmed: bool,
}

/// Why a node's legs and devices are forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Not seen for the expiry.
    Expired,
    /// Back with a new incarnation: its earlier run died.
    Restarted,
    /// Deleted its entry at the end of a drain.
    Left,
    /// It had declared this node dead (`Wire::Forgot`): it is alive.
    Forgot,
}

impl Loss {
    /// Whether the node's calls may be gone with it (its answered legs here then leave
    /// a CDR written by this node, when it can claim them).
    fn calls_lost(self) -> bool {
        matches!(self, Self::Expired | Self::Restarted)
    }
}

/// A claim on a lost node's call (`CLAIMS_BUCKET`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    /// The node that wrote the CDR.
    by: String,
    /// The call id on the lost node.
    call_id: String,
    sip_call_id: String,
    /// When the offer reached the claiming node (the call started a little earlier).
    start_ms: u64,
}

/// A CDR this node wrote for a lost node's call.
struct SurvivorCdr {
    /// When it was written (forgotten after the claims' max age).
    at: Instant,
    incarnation: u64,
    /// The claim's key.
    key: String,
    /// The row's call id here (`<call id>@<node>`).
    call_id: String,
    sip_call_id: String,
}

/// Device entries of a node not known to be alive yet (arrived before its own entry, or
/// after it left), by session; since when the first one waits.
struct Waiting {
    since: Instant,
    devices: HashMap<u64, DeviceRecord>,
}

/// The cluster as a node takes part in it. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.me)
            .finish_non_exhaustive()
    }
}

struct Inner {
    me: String,
    /// Distinguishes this run of the node from an earlier one with the same id.
    incarnation: u64,
    settings: Settings,
    client: async_nats::Client,
    registry: Arc<Registry>,
    media: Arc<dyn MediaPlane>,
    /// This node's devices.
    local: DashMap<SessionId, Local>,
    /// Device entries to write (`Some`) or delete (`None`), latest per key.
    dirty: Mutex<HashMap<String, Option<Bytes>>>,
    dirty_notify: Notify,
    /// Other nodes' devices, by (node, their session id).
    remote: DashMap<(String, u64), Remote>,
    /// Legs of this node's calls on other nodes, by (call id, local session id).
    pending: DashMap<(String, SessionId), Pending>,
    /// The same legs by (node, call id, the node's session id).
    pending_idx: DashMap<(String, String, u64), SessionId>,
    /// Legs hosted for other nodes' calls, by (node, call id, local session).
    hosted: DashMap<(String, String, SessionId), Hosted>,
    nodes: Mutex<HashMap<String, Seen>>,
    next_remote: AtomicU64,
    outbox: mpsc::Sender<(String, Bytes)>,
    draining: std::sync::atomic::AtomicBool,
    /// This process's CPU over the last heartbeat, cores (`f64` bits).
    cpu_cores: AtomicU64,
    /// The device bucket, once set up (read again when an expired node comes back).
    devices_kv: Mutex<Option<kv::Store>>,
    /// Nodes this node declared dead: their devices are read again if they come back.
    expired: Mutex<std::collections::HashSet<String>>,
    /// Device entries of nodes not known to be alive, by node (bounded by
    /// `MAX_WAITING_DEVICES`; dropped with the bucket's max age).
    waiting: Mutex<HashMap<String, Waiting>>,
    /// The legs ended when a node expired, by node (call id, its session for the leg),
    /// named in the `Forgot` it gets if it comes back.
    forgotten: Mutex<HashMap<String, Vec<(String, u64)>>>,
    /// The claims bucket, once set up.
    claims_kv: Mutex<Option<kv::Store>>,
    /// The store and the CDR writer, for CDRs of lost nodes' calls (set once the node
    /// has them).
    cdrs: std::sync::OnceLock<(
        crate::store::Store,
        Arc<dyn parley_actors::messages::CdrSink>,
    )>,
    /// CDRs written for lost nodes' calls, by node (withdrawn if it comes back as it was).
    survivor_cdrs: Mutex<HashMap<String, Vec<SurvivorCdr>>>,
}

impl Cluster {
    /// Joins the cluster: connects to NATS (in the background: a node whose NATS is away
    /// starts anyway and serves its own devices), creates the buckets when they are not
    /// there, and starts the heartbeat, the watches and the signalling. Call on the actix
    /// system's thread.
    pub async fn start(
        settings: Settings,
        registry: Arc<Registry>,
        media: Arc<dyn MediaPlane>,
    ) -> anyhow::Result<Self> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("parley {}", settings.node_id))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(|e| async move {
                match e {
                    async_nats::Event::Connected => {
                        metrics::gauge!(m::CLUSTER_NATS_CONNECTED).set(1.0);
                        tracing::info!("NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        metrics::gauge!(m::CLUSTER_NATS_CONNECTED).set(0.0);
                        tracing::warn!("NATS disconnected: reconnecting (local calls go on)");
                    }
                    other => tracing::info!(event = %other, "NATS"),
                }
            });
        opts = match &settings.auth {
            Auth::None => opts,
            Auth::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
            Auth::Token(t) => opts.token(t.clone()),
        };
        let client = opts.connect(settings.urls.clone()).await.map_err(|e| {
            anyhow::anyhow!("cluster.nats {:?}: {e}", redacted_urls(&settings.urls))
        })?;
        let (outbox, out_rx) = mpsc::channel(OUTBOX);
        let incarnation = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        let inner = Arc::new(Inner {
            me: settings.node_id.clone(),
            incarnation,
            settings,
            client,
            registry,
            media,
            local: DashMap::new(),
            dirty: Mutex::new(HashMap::new()),
            dirty_notify: Notify::new(),
            remote: DashMap::new(),
            pending: DashMap::new(),
            pending_idx: DashMap::new(),
            hosted: DashMap::new(),
            nodes: Mutex::new(HashMap::new()),
            next_remote: AtomicU64::new(REMOTE_SESSION_BASE),
            outbox,
            draining: std::sync::atomic::AtomicBool::new(false),
            cpu_cores: AtomicU64::new(0),
            devices_kv: Mutex::new(None),
            expired: Mutex::new(std::collections::HashSet::new()),
            waiting: Mutex::new(HashMap::new()),
            forgotten: Mutex::new(HashMap::new()),
            claims_kv: Mutex::new(None),
            cdrs: std::sync::OnceLock::new(),
            survivor_cdrs: Mutex::new(HashMap::new()),
        });
        let sub = inner
            .client
            .subscribe(inbox(&inner.me))
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to {}: {e}", inbox(&inner.me)))?;
        actix_rt::spawn(publisher(inner.clone(), out_rx));
        actix_rt::spawn(receiver(inner.clone(), sub));
        actix_rt::spawn(registries(inner.clone()));
        tracing::info!(node = %inner.me, urls = ?redacted_urls(&inner.settings.urls), "cluster mode: joining");
        Ok(Self { inner })
    }

    /// Gives the cluster the node's store and CDR writer: an answered leg hosted for a
    /// call whose node is lost then leaves a CDR here (see [`CLAIMS_BUCKET`]).
    pub fn set_cdrs(
        &self,
        store: crate::store::Store,
        sink: Arc<dyn parley_actors::messages::CdrSink>,
    ) {
        let _ = self.inner.cdrs.set((store, sink));
    }

    /// The node's board, for user actors to publish their devices on.
    pub fn board(&self) -> Arc<dyn DeviceBoard> {
        Arc::new(self.clone())
    }

    /// The legs to other nodes' devices, for call actors.
    pub fn legs(&self) -> Arc<dyn RemoteLegs> {
        Arc::new(self.clone())
    }

    /// Starts a drain: the node takes no new legs from other nodes, its entry says
    /// `draining` (the other nodes stop ringing its devices but keep the calls they have
    /// here), and its devices' entries are deleted.
    pub async fn drain(&self) {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::Relaxed);
        let js = jetstream::new(inner.client.clone());
        let timeout = Duration::from_secs(2);
        if let Ok(Ok(nodes)) = tokio::time::timeout(timeout, js.get_key_value(NODES_BUCKET)).await
            && let Ok(value) = serde_json::to_vec(&inner.node_record())
        {
            let _ = tokio::time::timeout(timeout, nodes.put(&inner.me, Bytes::from(value))).await;
        }
        if let Ok(Ok(devices)) =
            tokio::time::timeout(timeout, js.get_key_value(DEVICES_BUCKET)).await
        {
            let keys: Vec<String> = inner
                .local
                .iter()
                .map(|e| device_key(&inner.me, *e.key()))
                .collect();
            // All at once, within one bound (NATS may be away: the drain goes on).
            let deletes = futures_util::future::join_all(keys.iter().map(|k| devices.delete(k)));
            let _ = tokio::time::timeout(timeout, deletes).await;
        }
        tracing::info!(node = %inner.me, "draining: other nodes no longer ring this node's devices");
    }

    /// The cluster as this node sees it: itself and every live node, with its last entry
    /// (load figures) and how long ago it arrived (admin API `GET /api/v1/cluster`).
    pub fn nodes(&self) -> serde_json::Value {
        let inner = &self.inner;
        let mut list = vec![serde_json::json!({
            "node": inner.me,
            "self": true,
            "entry": inner.node_record(),
            "age_ms": 0,
        })];
        let nodes = inner
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut others: Vec<_> = nodes.iter().filter(|(_, s)| s.confirmed).collect();
        others.sort_by(|a, b| a.0.cmp(b.0));
        for (id, seen) in others {
            list.push(serde_json::json!({
                "node": id,
                "self": false,
                "entry": seen.record,
                "age_ms": seen.at.elapsed().as_millis() as u64,
            }));
        }
        serde_json::json!({
            "node": inner.me,
            "nats_connected": matches!(inner.client.connection_state(), async_nats::connection::State::Connected),
            "remote_devices": inner.remote.len(),
            "nodes": list,
        })
    }

    /// Legs this node hosts for other nodes' calls now (a drain waits for them too).
    pub fn hosted_legs(&self) -> usize {
        self.inner.hosted.len()
    }

    /// Leaves the cluster at the end of a drain: the node's entry is deleted, so the other
    /// nodes forget it at once rather than at expiry.
    pub async fn leave(&self) {
        let inner = &self.inner;
        let js = jetstream::new(inner.client.clone());
        let timeout = Duration::from_secs(2);
        if let Ok(Ok(nodes)) = tokio::time::timeout(timeout, js.get_key_value(NODES_BUCKET)).await {
            let _ = tokio::time::timeout(timeout, nodes.delete(&inner.me)).await;
        }
        let _ = tokio::time::timeout(timeout, inner.client.flush()).await;
        tracing::info!(node = %inner.me, "left the cluster");
    }
}

fn device_key(node: &str, session: SessionId) -> String {
    format!("{node}.{session}")
}

fn parse_device_key(key: &str) -> Option<(&str, u64)> {
    let (node, session) = key.rsplit_once('.')?;
    Some((node, session.parse().ok()?))
}

impl Inner {
    /// Queues a message to a node.
    fn send(&self, to: &str, msg: &Wire) {
        let payload = match serde_json::to_vec(msg) {
            Ok(p) => Bytes::from(p),
            Err(e) => return tracing::error!(error = %e, "cluster message not serialisable"),
        };
        match self.outbox.try_send((subject(to, &self.me), payload)) {
            Ok(()) => {
                metrics::counter!(m::CLUSTER_MESSAGES_TOTAL, "direction" => "out").increment(1)
            }
            Err(_) => {
                metrics::counter!(m::CLUSTER_MESSAGES_DROPPED_TOTAL).increment(1);
                tracing::warn!(to, "cluster outbox full: message dropped");
            }
        }
    }

    fn mark_dirty(&self, key: String, value: Option<Bytes>) {
        // A draining node has taken its devices out of the registry: they stay out.
        if value.is_some() && self.draining.load(Ordering::Relaxed) {
            return;
        }
        self.dirty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, value);
        self.dirty_notify.notify_one();
    }

    fn node_record(&self) -> NodeRecord {
        NodeRecord {
            node: self.me.clone(),
            incarnation: self.incarnation,
            media_ip: self.settings.media_ip,
            devices: self.local.len(),
            users: self.local_users(),
            remote_legs: self.pending.len(),
            hosted_legs: self.hosted.len(),
            draining: self.draining.load(Ordering::Relaxed),
            cpu_cores: f64::from_bits(self.cpu_cores.load(Ordering::Relaxed)),
        }
    }

    /// Users with a device on this node.
    fn local_users(&self) -> usize {
        self.local
            .iter()
            .map(|e| {
                let r = &e.value().record;
                (r.tenant.clone(), r.user.clone())
            })
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// A node's entry arrived, written `age` ago by the entry's own time (`None`: not
    /// known): it is alive (and, with a new incarnation, restarted). A first entry older
    /// than the expiry (a watch replays the last entry of a node that may be dead) does
    /// not make it alive: only a next entry does.
    fn node_seen(
        self: &Arc<Self>,
        node: &str,
        incarnation: u64,
        record: Option<NodeRecord>,
        revision: u64,
        age: Option<Duration>,
    ) {
        let expiry = self.settings.expiry;
        let (restarted, confirmed_now, alive_now) = {
            let mut nodes = self
                .nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let prev = nodes.get(node);
            let same_run = prev.filter(|p| p.incarnation == incarnation);
            let was_confirmed = same_run.is_some_and(|p| p.confirmed);
            let next_entry = same_run.is_some_and(|p| p.revision != 0 && p.revision != revision);
            // The entry this node has already (a watch set up again replays it): no news.
            let replay = same_run.filter(|p| p.revision == revision).map(|p| p.at);
            let now = Instant::now();
            let (at, confirmed, alive_now) = match (age, replay) {
                // Its next entry: alive now, whatever the clocks say.
                _ if next_entry => (now, true, true),
                (_, Some(at)) => (at, was_confirmed, false),
                // A first entry, recent by its time: alive since it was written.
                (Some(age), None) if age <= expiry => {
                    (now.checked_sub(age).unwrap_or(now), true, true)
                }
                // Old, or of unknown age: alive only if another entry follows.
                _ => (now, false, false),
            };
            let new = !prev.is_some_and(|p| p.confirmed);
            let prev = nodes.insert(
                node.to_owned(),
                Seen {
                    incarnation,
                    at,
                    record,
                    revision,
                    confirmed,
                },
            );
            if new && confirmed {
                tracing::info!(node = %node, "cluster node joined");
            } else if !confirmed {
                tracing::debug!(node = %node, age_ms = age.map(|a| a.as_millis() as u64), "old entry of a cluster node: alive once another entry follows");
            }
            // Incarnation 0: the node was known only from an offer, not yet from its entry.
            (
                prev.is_some_and(|p| p.incarnation != 0 && p.incarnation != incarnation),
                confirmed && !was_confirmed,
                alive_now,
            )
        };
        // Back after this node expired it: only on an entry that shows it alive now (not
        // on a replay of its last one).
        let back = alive_now
            && self
                .expired
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(node);
        if restarted {
            tracing::warn!(node = %node,
                "cluster node restarted: its earlier devices and legs are gone"
            );
            self.node_lost(node, Loss::Restarted);
        }
        // CDRs written here for its calls: the node is back as it was, so it ended those
        // calls and wrote them itself; a restarted node drops its own rows instead.
        if back || restarted {
            self.withdraw_if_back(node, incarnation);
        }
        if confirmed_now {
            self.release_waiting(node);
        }
        if restarted {
            // Its new devices may have arrived before this entry and been taken for the
            // old run's: read them again.
            actix_rt::spawn(resync(self.clone(), node.to_owned()));
        } else if back {
            // Seen again after this node expired it (a partition healed, a long pause):
            // its devices' entries are still in the bucket, but no change is coming for
            // them, so they are read again now rather than at their next refresh. It may
            // never have missed this node: it is told that the legs between them ended.
            tracing::info!(node = %node, "cluster node is back: reading its devices again");
            let legs = self
                .forgotten
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(node)
                .unwrap_or_default();
            self.send(
                node,
                &Wire::Forgot {
                    from: self.me.clone(),
                    legs,
                },
            );
            actix_rt::spawn(resync(self.clone(), node.to_owned()));
        }
    }

    /// The claims bucket, once set up.
    fn claims(&self) -> Option<kv::Store> {
        self.claims_kv
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Withdraws the CDRs written here for `node`'s calls of run `incarnation` (it is
    /// alive as that run: it wrote them itself); forgets those of other runs.
    fn withdraw_if_back(self: &Arc<Self>, node: &str, incarnation: u64) {
        let written = self
            .survivor_cdrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(node);
        let back_as_it_was: Vec<SurvivorCdr> = written
            .into_iter()
            .flatten()
            .filter(|w| w.incarnation == incarnation)
            .collect();
        if !back_as_it_was.is_empty() {
            actix_rt::spawn(withdraw_survivor_cdrs(self.clone(), back_as_it_was));
        }
    }

    /// Whether `node` runs as `incarnation`, known alive and not expired.
    fn alive_as(&self, node: &str, incarnation: u64) -> bool {
        let alive = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .is_some_and(|s| s.confirmed && s.incarnation == incarnation);
        alive
            && !self
                .expired
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(node)
    }

    /// Holds a device entry of a node not known to be alive (bounded).
    fn hold_waiting(&self, rec: DeviceRecord) {
        let mut waiting = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held: usize = waiting.values().map(|w| w.devices.len()).sum();
        let replaces = waiting
            .get(&rec.node)
            .is_some_and(|w| w.devices.contains_key(&rec.session));
        if held >= MAX_WAITING_DEVICES && !replaces {
            tracing::warn!(node = %rec.node, "too many device entries of unknown nodes: one dropped");
            return;
        }
        waiting
            .entry(rec.node.clone())
            .or_insert_with(|| Waiting {
                since: Instant::now(),
                devices: HashMap::new(),
            })
            .devices
            .insert(rec.session, rec);
    }

    /// `node` is known alive now: the device entries that waited for it are taken in.
    fn release_waiting(self: &Arc<Self>, node: &str) {
        let held = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(node);
        for rec in held.into_iter().flat_map(|w| w.devices.into_values()) {
            self.remote_put(rec);
        }
    }

    /// Forgets everything of a node that died, restarted or left: its devices go offline
    /// for this node's users, legs this node's calls had there end (`gone`: the calls route
    /// on or end, with their CDRs written here), legs hosted for its calls end.
    fn node_lost(&self, node: &str, why: Loss) {
        let devices: Vec<(String, u64)> = self
            .remote
            .iter()
            .filter(|e| e.key().0 == node)
            .map(|e| e.key().clone())
            .collect();
        for key in devices {
            self.remote_gone(&key);
        }
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(node);
        let ended = self.end_legs_with(node, why, |_, _| true);
        if why == Loss::Expired {
            // Named in its `Forgot` if it comes back (it may not have missed this node).
            let mut forgotten = self
                .forgotten
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Bounded in all (legs of nodes that never come back are forgotten first).
            let held: usize = forgotten.values().map(Vec::len).sum();
            if forgotten.len() >= MAX_EXPIRED_NODES || held + ended.len() > MAX_FORGOTTEN_LEGS {
                forgotten.clear();
            }
            let list = forgotten.entry(node.to_owned()).or_default();
            list.extend(ended);
            list.truncate(MAX_FORGOTTEN_LEGS);
        }
    }

    /// Ends the legs between this node and `node` that `which(call id, session on the
    /// other node's side)` selects: this node's calls' legs there (they end as `gone`,
    /// and the node is told) and legs hosted here for its calls (the device is told).
    /// Returns the legs ended, as the other node names them.
    fn end_legs_with(
        &self,
        node: &str,
        why: Loss,
        which: impl Fn(&str, u64) -> bool,
    ) -> Vec<(String, u64)> {
        let mut ended = Vec::new();
        let legs: Vec<(String, String, u64)> = self
            .pending_idx
            .iter()
            .filter(|e| e.key().0 == node && which(&e.key().1, e.key().2))
            .map(|e| e.key().clone())
            .collect();
        let lost = legs.len();
        for (n, call_id, session) in legs {
            // Best effort: a dead node reads nothing, but one that was only cut off or
            // paused stops ringing the device when it reads this.
            self.send(
                &n,
                &Wire::End {
                    from: self.me.clone(),
                    call_id: call_id.clone(),
                    session,
                    reason: EndReason::Failed.as_str().to_owned(),
                },
            );
            self.leg_event(&n, &call_id, session, LegEvent::Gone, None);
            // The other node hosts it under this session.
            ended.push((call_id, session));
        }
        let hosted: Vec<(String, String, SessionId)> = self
            .hosted
            .iter()
            .filter(|e| e.key().0 == node && which(&e.key().1, e.key().2))
            .map(|e| e.key().clone())
            .collect();
        for key in hosted {
            if why.calls_lost()
                && let Some(h) = self.hosted.get(&key)
            {
                // Answered, it leaves a CDR here if this node can claim the call.
                h.leg.do_send(HostedLost);
            }
            self.end_hosted(&key, EndReason::RemoteHangup.as_str());
            // The other node's call knows this leg by this node's session.
            ended.push((key.1, key.2));
        }
        if lost > 0 {
            tracing::warn!(node = %node, legs = lost, "legs on a lost node ended");
        }
        ended
    }

    /// Ends a hosted leg: the device is told now, the leg's actor lets its port go.
    fn end_hosted(&self, key: &(String, String, SessionId), reason: &'static str) {
        if let Some((_, h)) = self.hosted.remove(key) {
            h.device.do_send(ToDevice::Ended {
                call_id: h.device_call_id,
                reason,
            });
            h.leg.do_send(HostedStop);
        }
    }

    /// A device entry of another node arrived.
    fn remote_put(self: &Arc<Self>, rec: DeviceRecord) {
        if rec.node == self.me {
            return;
        }
        {
            let mut nodes = self
                .nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match nodes.get_mut(&rec.node) {
                // An entry of an earlier run of that node, not yet aged out.
                Some(seen) if seen.incarnation != 0 && seen.incarnation != rec.incarnation => {
                    return;
                }
                // A draining node's devices are not rung (an entry still in flight).
                Some(seen) if seen.record.as_ref().is_some_and(|r| r.draining) => return,
                Some(seen) if seen.confirmed && seen.incarnation != 0 => {}
                // Devices may arrive before the node's own entry (or after it left, or of
                // a node whose last entry is old, or known only from an offer, whose run
                // a device entry of an earlier run must not name): they wait until its
                // entry shows it alive.
                Some(_) | None => {
                    drop(nodes);
                    return self.hold_waiting(rec);
                }
            }
        }
        let Some(user) = self.registry.user_by_name(&rec.tenant, &rec.user) else {
            tracing::debug!(tenant = %rec.tenant, user = %rec.user, node = %rec.node, "device of a user this node does not know");
            return;
        };
        let key = (rec.node.clone(), rec.session);
        let existing = self.remote.get(&key).map(|r| {
            (
                r.tenant == rec.tenant && r.user == rec.user,
                r.local,
                r.proxy.clone(),
            )
        });
        let (local, proxy) = match existing {
            Some((true, local, proxy)) => (local, proxy),
            Some((false, ..)) => {
                // The session id now names another user's device: the old one went.
                self.remote_gone(&key);
                return self.remote_put(rec);
            }
            None => {
                let local = self.next_remote.fetch_add(1, Ordering::Relaxed);
                let proxy = RemoteProxy {
                    inner: self.clone(),
                    node: rec.node.clone(),
                    remote_session: rec.session,
                    local,
                }
                .start();
                self.remote.insert(
                    key,
                    Remote {
                        local,
                        tenant: rec.tenant.clone(),
                        user: rec.user.clone(),
                        proxy: proxy.clone(),
                    },
                );
                metrics::gauge!(m::CLUSTER_REMOTE_DEVICES).set(self.remote.len() as f64);
                tracing::info!(node = %rec.node, tenant = %rec.tenant, user = %rec.user, device = %rec.device, session = local, "remote device online");
                (local, proxy)
            }
        };
        user.addr.do_send(RemoteDevice {
            session: local,
            state: Some(DeviceState {
                session: local,
                device: rec.device,
                status: rec.status,
                idle_ms: rec.idle_ms,
                note: rec.note,
                // Video is not carried between nodes.
                video: false,
                opus: rec.opus,
            }),
            calls: proxy.recipient(),
        });
    }

    /// Another node's device went.
    fn remote_gone(&self, key: &(String, u64)) {
        let Some((_, r)) = self.remote.remove(key) else {
            return;
        };
        metrics::gauge!(m::CLUSTER_REMOTE_DEVICES).set(self.remote.len() as f64);
        tracing::info!(node = %key.0, tenant = %r.tenant, user = %r.user, session = r.local, "remote device offline");
        if let Some(user) = self.registry.user_by_name(&r.tenant, &r.user) {
            user.addr.do_send(RemoteDevice {
                session: r.local,
                state: None,
                calls: r.proxy.clone().recipient(),
            });
        }
        // The proxy lives on while a call still holds it (to end its leg there), and stops
        // when the last holder lets go.
    }

    /// What a device on `node` did with a leg of one of this node's calls.
    fn leg_event(
        &self,
        node: &str,
        call_id: &str,
        session: u64,
        event: LegEvent,
        media: Option<SocketAddr>,
    ) {
        let idx = (node.to_owned(), call_id.to_owned(), session);
        let Some(local) = self.pending_idx.get(&idx).map(|l| *l) else {
            // A leg this node does not know (ended already, or never offered by it).
            tracing::debug!(node = %node, call = %call_id, "cluster event for no leg");
            return;
        };
        let key = (call_id.to_owned(), local);
        let call = match self.pending.get_mut(&key) {
            Some(mut p) => {
                if event == LegEvent::Answer {
                    p.media = media;
                }
                p.call.clone()
            }
            None => return,
        };
        if event.ends() {
            self.pending.remove(&key);
            self.pending_idx.remove(&idx);
        }
        call.do_send(FromDevice {
            session: local,
            event: event.core(),
        });
    }

    /// Signalling from another node.
    fn dispatch(self: &Arc<Self>, msg: Wire) {
        match msg {
            Wire::Offer {
                from,
                call_id,
                session,
                caller,
                caller_name,
                called,
                sip_call_id,
                incarnation,
            } => {
                let refuse = |why: &str| {
                    tracing::info!(node = %from, call = %call_id, session, why, "cluster offer refused");
                    self.send(
                        &from,
                        &Wire::Event {
                            from: self.me.clone(),
                            call_id: call_id.clone(),
                            session,
                            event: LegEvent::Gone,
                            media: None,
                        },
                    );
                };
                if self.draining.load(Ordering::Relaxed) {
                    return refuse("draining");
                }
                let Some((device, rec)) = self
                    .local
                    .get(&session)
                    .map(|l| (l.calls.clone(), l.record.clone()))
                else {
                    return refuse("no such device");
                };
                {
                    // A node known only from its offer (its entry not seen yet, just
                    // started) expires like any other, which ends its legs here.
                    let mut nodes = self
                        .nodes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let seen = nodes.entry(from.clone()).or_insert_with(|| Seen {
                        incarnation: 0,
                        at: Instant::now(),
                        record: None,
                        revision: 0,
                        confirmed: true,
                    });
                    // It sends: it is alive (its entry's watch may lag).
                    seen.confirmed = true;
                }
                let key = (from.clone(), call_id.clone(), session);
                if self.hosted.contains_key(&key) {
                    return;
                }
                if self.hosted.len() >= MAX_HOSTED_LEGS {
                    return refuse("too many hosted legs");
                }
                metrics::counter!(m::CLUSTER_OFFERS_TOTAL, "direction" => "received").increment(1);
                // Call ids are per node ("c-N" on every node): the device sees the calling
                // node's name in it, so it never meets two calls with one id.
                let device_call_id = format!("{call_id}@{from}");
                let leg = HostedLeg {
                    inner: self.clone(),
                    key: key.clone(),
                    device_call_id: device_call_id.clone(),
                    device: device.clone(),
                    port: None,
                    flow: None,
                    done: false,
                    call: HostedCall {
                        incarnation,
                        sip_call_id,
                        tenant: rec.tenant,
                        user: rec.user,
                        device: rec.device,
                        caller: caller.clone(),
                        caller_name: caller_name.clone(),
                        called: called.clone(),
                        offered: SystemTime::now(),
                        answered: None,
                    },
                    stats: Arc::default(),
                }
                .start();
                self.hosted.insert(
                    key,
                    Hosted {
                        leg: leg.clone(),
                        device: device.clone(),
                        device_call_id: device_call_id.clone(),
                    },
                );
                device.do_send(ToDevice::Offer {
                    call_id: device_call_id,
                    from: caller,
                    from_name: caller_name,
                    to: called,
                    video: false,
                    sip_call_id: String::new(),
                    call: leg.recipient(),
                });
            }
            Wire::Connect {
                from,
                call_id,
                session,
                media,
                payload_type,
                telephone_event,
            } => {
                if let Some(h) = self.hosted.get(&(from, call_id, session)) {
                    h.leg.do_send(HostedConnect {
                        media,
                        payload_type,
                        telephone_event,
                    });
                }
            }
            Wire::End {
                from,
                call_id,
                session,
                reason,
            } => {
                self.end_hosted(&(from, call_id, session), end_reason(&reason));
            }
            Wire::Unresponsive { from, session } => {
                // Only a node whose call offered to the device may ask.
                let offered = self
                    .hosted
                    .iter()
                    .any(|e| e.key().0 == from && e.key().2 == session);
                if offered && let Some(l) = self.local.get(&session) {
                    l.calls.do_send(ToDevice::Unresponsive);
                }
            }
            Wire::Event {
                from,
                call_id,
                session,
                event,
                media,
            } => self.leg_event(&from, &call_id, session, event, media),
            Wire::Forgot { from, legs } => {
                if from == self.me {
                    return;
                }
                // Only the legs it ended (named by call id and this node's session for
                // them); its devices, as this node sees them, are as they were.
                let named: std::collections::HashSet<(String, u64)> =
                    legs.into_iter().take(MAX_FORGOTTEN_LEGS).collect();
                let ended = self.end_legs_with(&from, Loss::Forgot, |call_id, session| {
                    named.contains(&(call_id.to_owned(), session))
                });
                tracing::warn!(node = %from, legs = ended.len(),
                    "cluster node had declared this one lost: the legs it ended end here too"
                );
            }
        }
    }
}

/// A claim's key: `<node>.<incarnation>.<call id>`.
fn claim_key(node: &str, incarnation: u64, call_id: &str) -> String {
    format!("{node}.{incarnation}.{call_id}")
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes the CDR of a lost node's call answered here, if this node creates the call's
/// claim (an atomic create: one writer, whoever else tries); without NATS it writes
/// nothing (the call's node, which may be alive, writes it).
async fn claim_and_write(
    inner: Arc<Inner>,
    node: String,
    incarnation: u64,
    key: String,
    claim: Claim,
    cdr: parley_core::cdr::CdrRecord,
) {
    let not_claimed = |why: &str| {
        tracing::info!(node = %node, call = %claim.call_id, why, "CDR of a lost node's call not written here");
        metrics::counter!(m::CLUSTER_SURVIVOR_CDRS_TOTAL, "outcome" => "not_claimed").increment(1);
    };
    let Some((_, sink)) = inner.cdrs.get() else {
        return not_claimed("no CDR writer");
    };
    let claims = inner.claims();
    let Some(claims) = claims else {
        return not_claimed("claims bucket unavailable");
    };
    let Ok(value) = serde_json::to_vec(&claim) else {
        return;
    };
    match tokio::time::timeout(Duration::from_secs(2), claims.create(&key, value.into())).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return not_claimed(&format!("claimed already or refused: {e}")),
        Err(_) => return not_claimed("NATS unreachable"),
    }
    let row = SurvivorCdr {
        at: Instant::now(),
        incarnation,
        key,
        call_id: cdr.call_id.clone(),
        sip_call_id: cdr.sip_call_id.clone(),
    };
    tracing::warn!(node = %node, call = %cdr.call_id, sip_call_id = %cdr.sip_call_id, user = %cdr.user,
        "call's node lost while it was up: its CDR is written here (INTERRUPTED)");
    sink.submit(cdr);
    metrics::counter!(m::CLUSTER_SURVIVOR_CDRS_TOTAL, "outcome" => "written").increment(1);
    {
        let mut written = inner
            .survivor_cdrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        written.retain(|_, rows| {
            rows.retain(|r| r.at.elapsed() < CLAIMS_AGE);
            !rows.is_empty()
        });
        if written.values().map(Vec::len).sum::<usize>() < MAX_SURVIVOR_CDRS {
            written.entry(node.clone()).or_default().push(row);
        } else {
            tracing::warn!(node = %node, "too many CDRs written for lost nodes remembered: this one cannot be withdrawn");
        }
    }
    // The node came back as it was while the claim was on its way.
    if inner.alive_as(&node, incarnation) {
        inner.withdraw_if_back(&node, incarnation);
    }
}

/// A node this one took for lost came back as it was: it wrote its calls' CDRs itself,
/// so the ones written here for them go (with their claims).
async fn withdraw_survivor_cdrs(inner: Arc<Inner>, rows: Vec<SurvivorCdr>) {
    let Some((store, _)) = inner.cdrs.get() else {
        return;
    };
    let claims = inner.claims();
    for r in rows {
        // The row may still be in the CDR writer's queue: a few tries, a second apart.
        let mut gone = false;
        for attempt in 0..5 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            match store
                .drop_interrupted_cdr(&r.call_id, &r.sip_call_id, 0, u64::MAX)
                .await
            {
                Ok(0) => {}
                Ok(_) => {
                    gone = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(call = %r.call_id, error = %e, "CDR not withdrawn");
                    break;
                }
            }
        }
        if !gone {
            tracing::warn!(call = %r.call_id, "CDR written for a call of a node that came back not found to withdraw");
            continue;
        }
        tracing::info!(call = %r.call_id,
            "CDR written for a call of a node that came back withdrawn: that node wrote it");
        metrics::counter!(m::CLUSTER_SURVIVOR_CDRS_TOTAL, "outcome" => "withdrawn").increment(1);
        if let Some(c) = &claims {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.delete(&r.key)).await;
        }
    }
}

/// Calls of this node's earlier runs that another node claimed have their CDR there, so
/// this node's own rows of them (closed `INTERRUPTED` at start) go: the claims of this
/// node are watched from the start (those made before, and those the others make when
/// they notice the restart, after this node's first heartbeat). Ends only with the
/// registries.
async fn drop_claimed_rows(inner: &Arc<Inner>, claims: &kv::Store) {
    // The node hands over its store just after joining.
    let store = loop {
        if let Some((store, _)) = inner.cdrs.get() {
            break store;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let Ok(mut watch) = claims.watch_with_history(format!("{}.>", inner.me)).await else {
        tracing::warn!("claims watch could not start");
        return std::future::pending().await;
    };
    let prefix = format!("{}.", inner.me);
    while let Some(Ok(entry)) = watch.next().await {
        if entry.operation != kv::Operation::Put {
            continue;
        }
        let earlier_run = entry
            .key
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(inc, _)| inc.parse::<u64>().ok())
            .is_some_and(|inc| inc != inner.incarnation);
        let Ok(claim) = serde_json::from_slice::<Claim>(&entry.value) else {
            continue;
        };
        if !earlier_run {
            continue;
        }
        // The row's start is the INVITE's, a little before the offer reached the other
        // node: a minute's window tells it from a namesake of another run.
        let from = claim.start_ms.saturating_sub(60_000);
        match store
            .drop_interrupted_cdr(&claim.call_id, &claim.sip_call_id, from, claim.start_ms)
            .await
        {
            Ok(n) => {
                tracing::info!(call = %claim.call_id, by = %claim.by, rows = n,
                    "call of an earlier run written by the node that hosted its answered leg: own row dropped");
                let _ = claims.delete(&entry.key).await;
            }
            Err(e) => tracing::warn!(call = %claim.call_id, error = %e, "claimed row not dropped"),
        }
    }
    tracing::warn!("claims watch ended");
}

/// The `&'static` reason of `call_ended` a remote node names (unknown ones: `failed`).
fn end_reason(s: &str) -> &'static str {
    [
        EndReason::AnsweredElsewhere,
        EndReason::Rerouted,
        EndReason::Cancelled,
        EndReason::Timeout,
        EndReason::RemoteHangup,
        EndReason::MediaTimeout,
        EndReason::MediaUnavailable,
        EndReason::Rejected,
        EndReason::Unavailable,
        EndReason::Failed,
    ]
    .into_iter()
    .map(EndReason::as_str)
    .find(|r| *r == s)
    .unwrap_or("failed")
}

impl DeviceBoard for Cluster {
    fn device_changed(
        &self,
        tenant: &str,
        user: &str,
        state: &DeviceState,
        calls: &Recipient<ToDevice>,
    ) {
        let inner = &self.inner;
        let record = DeviceRecord {
            node: inner.me.clone(),
            incarnation: inner.incarnation,
            session: state.session,
            tenant: tenant.to_owned(),
            user: user.to_owned(),
            device: state.device.clone(),
            status: state.status,
            idle_ms: state.idle_ms,
            note: state.note.clone(),
            opus: state.opus,
        };
        let unchanged = inner.local.get(&state.session).is_some_and(|l| {
            DeviceRecord {
                idle_ms: state.idle_ms,
                ..l.record.clone()
            } == record
        });
        if unchanged {
            return;
        }
        let value = serde_json::to_vec(&record).ok().map(Bytes::from);
        inner.local.insert(
            state.session,
            Local {
                record,
                calls: calls.clone(),
            },
        );
        inner.mark_dirty(device_key(&inner.me, state.session), value);
    }

    fn device_gone(&self, session: SessionId) {
        let inner = &self.inner;
        if inner.local.remove(&session).is_some() {
            inner.mark_dirty(device_key(&inner.me, session), None);
        }
    }
}

impl RemoteLegs for Cluster {
    fn answer_media(&self, session: SessionId, call_id: &str) -> Option<SocketAddr> {
        self.inner
            .pending
            .get(&(call_id.to_owned(), session))
            .and_then(|p| p.media)
    }

    fn connect(
        &self,
        session: SessionId,
        call_id: &str,
        media: SocketAddr,
        payload_type: u8,
        telephone_event: Option<u8>,
    ) {
        let inner = &self.inner;
        let Some((node, remote_session)) = inner
            .pending
            .get(&(call_id.to_owned(), session))
            .map(|p| (p.node.clone(), p.remote_session))
        else {
            return;
        };
        // The call took this answer (another device's that came second is withdrawn).
        metrics::counter!(m::CLUSTER_HANDOFFS_ANSWERED_TOTAL).increment(1);
        inner.send(
            &node,
            &Wire::Connect {
                from: inner.me.clone(),
                call_id: call_id.to_owned(),
                session: remote_session,
                media,
                payload_type,
                telephone_event,
            },
        );
    }

    fn media_ip(&self) -> IpAddr {
        self.inner.settings.media_ip
    }
}

/// Sends queued messages in order.
async fn publisher(inner: Arc<Inner>, mut rx: mpsc::Receiver<(String, Bytes)>) {
    while let Some((subject, payload)) = rx.recv().await {
        if let Err(e) = inner.client.publish(subject, payload).await {
            tracing::warn!(error = %e, "cluster message not sent");
        }
    }
}

/// Takes signalling off this node's subject.
async fn receiver(inner: Arc<Inner>, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        metrics::counter!(m::CLUSTER_MESSAGES_TOTAL, "direction" => "in").increment(1);
        let sent_by = msg.subject.rsplit('.').next().unwrap_or_default();
        match serde_json::from_slice::<Wire>(&msg.payload) {
            Ok(w) if w.sender() == sent_by && sent_by != inner.me => inner.dispatch(w),
            Ok(w) => {
                metrics::counter!(m::CLUSTER_MESSAGES_INVALID_TOTAL).increment(1);
                tracing::warn!(subject = %msg.subject, says = %w.sender(), "cluster message whose sender is not its subject's ignored");
            }
            Err(e) => {
                metrics::counter!(m::CLUSTER_MESSAGES_INVALID_TOTAL).increment(1);
                tracing::warn!(error = %e, "invalid cluster message ignored");
            }
        }
    }
}

/// Creates a bucket's stream by a raw JetStream API request: `async-nats`'s
/// `create_key_value` does not parse nats-server 2.9's answer (`../shared/CRATES.md`). A
/// bucket another node created already is used as it is.
async fn ensure_bucket(
    client: &async_nats::Client,
    bucket: &str,
    max_age: Duration,
) -> anyhow::Result<kv::Store> {
    let stream = format!("KV_{bucket}");
    let config = serde_json::json!({
        "name": stream,
        "subjects": [format!("$KV.{bucket}.>")],
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs_per_subject": 1,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": max_age.as_nanos() as u64,
        "max_msg_size": -1,
        "storage": "file",
        "discard": "new",
        "num_replicas": 1,
        "duplicate_window": max_age.min(Duration::from_secs(120)).as_nanos() as u64,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "deny_purge": false,
        "allow_direct": true,
    });
    let reply = client
        .request(
            format!("$JS.API.STREAM.CREATE.{stream}"),
            Bytes::from(config.to_string()),
        )
        .await?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if let Some(err) = answer.get("error") {
        // 10058: the stream exists (with another node's settings): use it.
        if err.get("err_code").and_then(serde_json::Value::as_u64) != Some(10058) {
            anyhow::bail!("creating bucket {bucket}: {err}");
        }
    }
    Ok(jetstream::new(client.clone()).get_key_value(bucket).await?)
}

/// Keeps the registries: the buckets (re-created after a NATS restart lost them), this
/// node's entries, the watches over the others', and the expiry of dead nodes.
async fn registries(inner: Arc<Inner>) {
    let client = inner.client.clone();
    let s = inner.settings.clone();
    let nodes_age = (s.expiry * 10).max(Duration::from_secs(60));
    let devices_age = s.device_refresh * 3;
    loop {
        let buckets = async {
            let nodes = ensure_bucket(&client, NODES_BUCKET, nodes_age).await?;
            let devices = ensure_bucket(&client, DEVICES_BUCKET, devices_age).await?;
            let claims = ensure_bucket(&client, CLAIMS_BUCKET, CLAIMS_AGE).await?;
            anyhow::Ok((nodes, devices, claims))
        };
        match buckets.await {
            Ok((nodes, devices, claims)) => {
                tracing::info!(node = %inner.me, "cluster registries ready");
                *inner
                    .claims_kv
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(claims.clone());
                run_registries(&inner, nodes, devices, claims).await;
            }
            Err(e) => tracing::warn!(error = %e, "cluster registries unavailable; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs until a bucket fails (then [`registries`] sets them up again).
async fn run_registries(
    inner: &Arc<Inner>,
    nodes: kv::Store,
    devices: kv::Store,
    claims: kv::Store,
) {
    *inner
        .devices_kv
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(devices.clone());
    // Entries of an earlier run of this node that have not aged out yet.
    if let Ok(mut keys) = devices.keys().await {
        let prefix = format!("{}.", inner.me);
        let mut stale = Vec::new();
        while let Some(Ok(k)) = keys.next().await {
            if k.starts_with(&prefix)
                && !inner
                    .local
                    .contains_key(&parse_device_key(&k).map_or(0, |(_, s)| s))
            {
                stale.push(k);
            }
        }
        for k in stale {
            let _ = devices.delete(&k).await;
        }
    }
    // Everything local is written again (a new bucket, or one NATS lost).
    for e in inner.local.iter() {
        let value = serde_json::to_vec(&e.record).ok().map(Bytes::from);
        inner.mark_dirty(device_key(&inner.me, *e.key()), value);
    }
    let (Ok(node_watch), Ok(device_watch)) = (
        nodes.watch_with_history(">").await,
        devices.watch_with_history(">").await,
    ) else {
        tracing::warn!("cluster watches could not start");
        return;
    };
    tokio::select! {
        () = heartbeat(inner, &nodes) => {}
        () = write_devices(inner, &devices) => {}
        () = watch_nodes(inner, node_watch) => {}
        () = watch_devices(inner, device_watch) => {}
        () = drop_claimed_rows(inner, &claims) => {}
    }
}

/// Reads a node's device entries from the bucket (after that node came back).
async fn resync(inner: Arc<Inner>, node: String) {
    let store = inner
        .devices_kv
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Some(store) = store else {
        return;
    };
    let Ok(mut keys) = store.keys().await else {
        return;
    };
    let prefix = format!("{node}.");
    let mut mine = Vec::new();
    while let Some(Ok(k)) = keys.next().await {
        if k.starts_with(&prefix) {
            mine.push(k);
        }
    }
    let mut read = 0usize;
    for k in mine {
        if let Ok(Some(value)) = store.get(&k).await
            && let Ok(rec) = serde_json::from_slice::<DeviceRecord>(&value)
            && parse_device_key(&k) == Some((rec.node.as_str(), rec.session))
        {
            inner.remote_put(rec);
            read += 1;
        }
    }
    tracing::info!(node = %node,
        devices = read,
        "devices of a returning node read again"
    );
}

/// Writes this node's entry every heartbeat (timing the round trip) and expires nodes not
/// seen for the expiry; every device refresh, marks every local device for rewriting.
async fn heartbeat(inner: &Arc<Inner>, nodes: &kv::Store) {
    let mut tick = tokio::time::interval(inner.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refresh = Instant::now();
    let mut failing = false;
    let mut cpu_at = (Instant::now(), process_cpu());
    loop {
        tick.tick().await;
        let now = (Instant::now(), process_cpu());
        let wall = now.0.duration_since(cpu_at.0).as_secs_f64();
        if wall > 0.0 {
            let cores = (now.1 - cpu_at.1).as_secs_f64() / wall;
            inner.cpu_cores.store(cores.to_bits(), Ordering::Relaxed);
        }
        cpu_at = now;
        let record = inner.node_record();
        if let Ok(value) = serde_json::to_vec(&record) {
            let start = Instant::now();
            // Bounded: while NATS is away the sweep below must still run.
            let put = tokio::time::timeout(
                inner.settings.heartbeat,
                nodes.put(&inner.me, Bytes::from(value)),
            );
            match put.await {
                Ok(Ok(_)) => {
                    metrics::histogram!(m::CLUSTER_NATS_SECONDS)
                        .record(start.elapsed().as_secs_f64());
                    if failing {
                        // Back after an outage: the other nodes may have expired this one,
                        // so its devices are written again now, not at the next refresh.
                        failing = false;
                        tracing::info!(
                            "cluster registries reachable again: republishing this node's devices"
                        );
                        last_refresh = Instant::now()
                            .checked_sub(inner.settings.device_refresh)
                            .unwrap_or(last_refresh);
                    }
                }
                Ok(Err(e))
                    if matches!(
                        inner.client.connection_state(),
                        async_nats::connection::State::Connected
                    ) =>
                {
                    // Connected, but the bucket refused: set the buckets up again.
                    tracing::warn!(error = %e, "heartbeat refused: setting the registries up again");
                    return;
                }
                Ok(Err(_)) | Err(_) => {
                    if !failing {
                        tracing::warn!(
                            "heartbeat not written: NATS unreachable (local calls go on)"
                        );
                    }
                    failing = true;
                }
            }
        }
        let expired: Vec<String> = {
            let mut nodes = inner
                .nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let dead: Vec<String> = nodes
                .iter()
                .filter(|(_, s)| s.at.elapsed() > inner.settings.expiry)
                .map(|(n, _)| n.clone())
                .collect();
            let mut lost = Vec::new();
            for n in dead {
                // One never known alive (an old entry only) just goes.
                if nodes.remove(&n).is_some_and(|s| s.confirmed) {
                    lost.push(n);
                }
            }
            let live = nodes.values().filter(|s| s.confirmed).count();
            metrics::gauge!(m::CLUSTER_NODES).set((live + 1) as f64);
            lost
        };
        // Device entries that waited longer than the bucket keeps them for a node that
        // never showed up alive.
        inner
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, w| w.since.elapsed() <= inner.settings.device_refresh * 3);
        for n in expired {
            {
                let mut gone = inner
                    .expired
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Bounded by the nodes that ever expired; a fleet that renames its nodes
                // on every start only loses the fast re-read of a long-gone one.
                if gone.len() >= MAX_EXPIRED_NODES {
                    gone.clear();
                }
                gone.insert(n.clone());
            }
            tracing::warn!(node = %n, expiry_s = inner.settings.expiry.as_secs(), "cluster node expired: its devices are offline");
            metrics::counter!(m::CLUSTER_NODES_LOST_TOTAL).increment(1);
            inner.node_lost(&n, Loss::Expired);
        }
        // Legs whose call is gone without ending them (its actor stopped): forgotten, so
        // the table holds live calls only.
        let orphans: Vec<(String, SessionId)> = inner
            .pending
            .iter()
            .filter(|e| !e.value().call.connected())
            .map(|e| e.key().clone())
            .collect();
        for key in orphans {
            if let Some((_, p)) = inner.pending.remove(&key) {
                // The device's node still holds the leg: end it there too.
                inner.send(
                    &p.node,
                    &Wire::End {
                        from: inner.me.clone(),
                        call_id: key.0.clone(),
                        session: p.remote_session,
                        reason: EndReason::Failed.as_str().to_owned(),
                    },
                );
                inner.pending_idx.remove(&(p.node, key.0, p.remote_session));
            }
        }
        metrics::gauge!(m::CLUSTER_LOCAL_DEVICES).set(inner.local.len() as f64);
        metrics::gauge!(m::CLUSTER_LOCAL_USERS).set(record.users as f64);
        metrics::gauge!(m::CLUSTER_REMOTE_LEGS).set(inner.pending.len() as f64);
        metrics::gauge!(m::CLUSTER_HOSTED_LEGS).set(inner.hosted.len() as f64);
        if last_refresh.elapsed() >= inner.settings.device_refresh {
            last_refresh = Instant::now();
            for e in inner.local.iter() {
                let value = serde_json::to_vec(&e.record).ok().map(Bytes::from);
                inner.mark_dirty(device_key(&inner.me, *e.key()), value);
            }
        }
    }
}

/// The process's user + system CPU time so far.
fn process_cpu() -> Duration {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// Writes the device entries marked dirty (the latest state of each, so a device that
/// changes faster than NATS answers costs one write per round trip, not one per change).
async fn write_devices(inner: &Arc<Inner>, devices: &kv::Store) {
    loop {
        let batch: Vec<(String, Option<Bytes>)> = {
            let mut d = inner
                .dirty
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            d.drain().collect()
        };
        if batch.is_empty() {
            inner.dirty_notify.notified().await;
            continue;
        }
        for (key, value) in batch {
            let done = match &value {
                Some(v) => devices
                    .put(&key, v.clone())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => devices.delete(&key).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = done {
                tracing::warn!(key, error = %e, "device entry not written; retrying");
                // Keep it unless a newer state was marked meanwhile.
                inner
                    .dirty
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key)
                    .or_insert(value);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn watch_nodes(inner: &Arc<Inner>, mut watch: kv::Watch) {
    while let Some(entry) = watch.next().await {
        let Ok(entry) = entry else {
            tracing::warn!("node registry watch failed");
            return;
        };
        if entry.key == inner.me {
            continue;
        }
        // How long ago the entry was written, by the server's stamp and this node's clock
        // (one from the future counts as just written).
        let age = SystemTime::now()
            .duration_since(SystemTime::from(entry.created))
            .unwrap_or(Duration::ZERO);
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<NodeRecord>(&entry.value) {
                Ok(rec) if rec.node == entry.key => {
                    let revision = entry.revision;
                    if rec.draining {
                        // A draining node takes no new calls: its devices are not rung.
                        inner.node_seen(
                            &rec.node,
                            rec.incarnation,
                            Some(rec.clone()),
                            revision,
                            Some(age),
                        );
                        let devices: Vec<(String, u64)> = inner
                            .remote
                            .iter()
                            .filter(|e| e.key().0 == rec.node)
                            .map(|e| e.key().clone())
                            .collect();
                        for k in devices {
                            inner.remote_gone(&k);
                        }
                    } else {
                        let (node, incarnation) = (rec.node.clone(), rec.incarnation);
                        inner.node_seen(&node, incarnation, Some(rec), revision, Some(age));
                    }
                }
                _ => tracing::warn!(key = %entry.key, "invalid node entry ignored"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                let known = inner
                    .nodes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&entry.key)
                    .is_some();
                if known {
                    tracing::info!(node = %entry.key, "cluster node left");
                    inner.node_lost(&entry.key, Loss::Left);
                }
            }
        }
    }
}

async fn watch_devices(inner: &Arc<Inner>, mut watch: kv::Watch) {
    while let Some(entry) = watch.next().await {
        let Ok(entry) = entry else {
            tracing::warn!("device registry watch failed");
            return;
        };
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<DeviceRecord>(&entry.value) {
                Ok(rec)
                    if parse_device_key(&entry.key) == Some((rec.node.as_str(), rec.session)) =>
                {
                    inner.remote_put(rec);
                }
                _ => tracing::warn!(key = %entry.key, "invalid device entry ignored"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some((node, session)) = parse_device_key(&entry.key)
                    && node != inner.me
                {
                    if let Some(w) = inner
                        .waiting
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_mut(node)
                    {
                        w.devices.remove(&session);
                    }
                    inner.remote_gone(&(node.to_owned(), session));
                }
            }
        }
    }
}

/// Stands for a device on another node: what a call sends it goes there. It stops when
/// nothing holds its address any more (the user actor and the calls that rang it).
struct RemoteProxy {
    inner: Arc<Inner>,
    node: String,
    remote_session: u64,
    local: SessionId,
}

impl Actor for RemoteProxy {
    type Context = Context<Self>;
}

impl Handler<ToDevice> for RemoteProxy {
    type Result = ();
    fn handle(&mut self, msg: ToDevice, _: &mut Context<Self>) {
        let inner = &self.inner;
        match msg {
            ToDevice::Offer {
                call_id,
                from,
                from_name,
                to,
                call,
                sip_call_id,
                ..
            } => {
                if inner.pending.len() >= MAX_PENDING_LEGS {
                    tracing::warn!(call = %call_id, "too many legs on other nodes: offer not sent");
                    call.do_send(FromDevice {
                        session: self.local,
                        event: DeviceLegEvent::Gone,
                    });
                    return;
                }
                metrics::counter!(m::CLUSTER_OFFERS_TOTAL, "direction" => "sent").increment(1);
                inner.pending.insert(
                    (call_id.clone(), self.local),
                    Pending {
                        node: self.node.clone(),
                        remote_session: self.remote_session,
                        call,
                        media: None,
                    },
                );
                inner.pending_idx.insert(
                    (self.node.clone(), call_id.clone(), self.remote_session),
                    self.local,
                );
                inner.send(
                    &self.node,
                    &Wire::Offer {
                        from: inner.me.clone(),
                        call_id,
                        session: self.remote_session,
                        caller: from,
                        caller_name: from_name,
                        called: to,
                        sip_call_id,
                        incarnation: inner.incarnation,
                    },
                );
            }
            ToDevice::Ended { call_id, reason } => {
                if inner
                    .pending
                    .remove(&(call_id.clone(), self.local))
                    .is_some()
                {
                    inner.pending_idx.remove(&(
                        self.node.clone(),
                        call_id.clone(),
                        self.remote_session,
                    ));
                    inner.send(
                        &self.node,
                        &Wire::End {
                            from: inner.me.clone(),
                            call_id,
                            session: self.remote_session,
                            reason: reason.to_owned(),
                        },
                    );
                }
            }
            ToDevice::Unresponsive => inner.send(
                &self.node,
                &Wire::Unresponsive {
                    from: inner.me.clone(),
                    session: self.remote_session,
                },
            ),
            // A remote device never dials through this node, and its connection is made
            // through `RemoteLegs::connect`.
            ToDevice::Ringing { .. } | ToDevice::Connected { .. } => {}
        }
    }
}

/// A leg of another node's call to a device of this node.
struct HostedLeg {
    inner: Arc<Inner>,
    /// (calling node, call id, local session).
    key: (String, String, SessionId),
    /// The call id the device knows the call by (`<call id>@<calling node>`).
    device_call_id: String,
    device: Recipient<ToDevice>,
    port: Option<u16>,
    flow: Option<u64>,
    done: bool,
    /// What a CDR of the call needs, should the calling node be lost while it is up.
    call: HostedCall,
    /// The leg's media counts.
    stats: Arc<FlowStats>,
}

/// A hosted leg's call, as a CDR written here would name it.
struct HostedCall {
    /// The calling node's incarnation.
    incarnation: u64,
    sip_call_id: String,
    tenant: String,
    user: String,
    device: String,
    caller: String,
    caller_name: Option<String>,
    called: String,
    /// When the offer reached this node.
    offered: SystemTime,
    /// When the media was bridged (the call took the device's answer).
    answered: Option<SystemTime>,
}

impl HostedLeg {
    fn tell_caller_node(&self, event: LegEvent, media: Option<SocketAddr>) {
        let (node, call_id, session) = &self.key;
        self.inner.send(
            node,
            &Wire::Event {
                from: self.inner.me.clone(),
                call_id: call_id.clone(),
                session: *session,
                event,
                media,
            },
        );
    }

    fn release(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let ports: Vec<u16> = self.port.take().into_iter().collect();
        let roq: Vec<(SessionId, u64)> = self
            .flow
            .take()
            .map(|f| (self.key.2, f))
            .into_iter()
            .collect();
        if !ports.is_empty() || !roq.is_empty() {
            self.inner.media.release(&ports, &roq);
        }
    }
}

impl Actor for HostedLeg {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_later(HOSTED_RING_LIMIT, |act, ctx| {
            if act.port.is_none() {
                tracing::warn!(call = %act.key.1, node = %act.key.0, "hosted leg never answered nor withdrawn: ended");
                act.tell_caller_node(LegEvent::Gone, None);
                act.inner
                    .end_hosted(&act.key, EndReason::Timeout.as_str());
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.release();
        // Only this leg's entry: a new offer of the same call to the same device may hold
        // the key by now.
        let me = ctx.address();
        self.inner.hosted.remove_if(&self.key, |_, h| h.leg == me);
    }
}

impl Handler<FromDevice> for HostedLeg {
    type Result = ();
    fn handle(&mut self, msg: FromDevice, ctx: &mut Context<Self>) {
        if msg.session != self.key.2 {
            return;
        }
        let event = LegEvent::of(msg.event);
        if event == LegEvent::Answer && self.port.is_some() {
            // A second answer from the device: the first one's port stands.
            return;
        }
        let media = if event == LegEvent::Answer {
            match self.inner.media.allocate_port() {
                Ok(p) => {
                    self.port = Some(p);
                    Some(SocketAddr::new(self.inner.settings.media_ip, p))
                }
                Err(e) => {
                    tracing::warn!(call = %self.key.1, error = %e, "no relay port for a hosted leg");
                    None
                }
            }
        } else {
            None
        };
        self.tell_caller_node(event, media);
        if event.ends() {
            ctx.stop();
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct HostedConnect {
    media: SocketAddr,
    payload_type: u8,
    telephone_event: Option<u8>,
}

impl Handler<HostedConnect> for HostedLeg {
    type Result = ();
    fn handle(&mut self, msg: HostedConnect, ctx: &mut Context<Self>) {
        let Some(port) = self.port else {
            return;
        };
        if self.flow.is_some() {
            return;
        }
        let media = &self.inner.media;
        let flow = media.next_flow_id();
        let session = self.key.2;
        match media.bridge_roq((port, msg.media), session, flow, self.stats.clone()) {
            Ok(()) => {
                self.flow = Some(flow);
                self.call.answered = Some(SystemTime::now());
                self.device.do_send(ToDevice::Connected {
                    call_id: self.device_call_id.clone(),
                    flow_id: flow,
                    payload_type: msg.payload_type,
                    video_flow_id: None,
                    telephone_event: msg.telephone_event,
                    video_formats: Vec::new(),
                });
            }
            Err(e) => {
                tracing::warn!(call = %self.key.1, error = %e, "hosted leg's media not bridged");
                self.device.do_send(ToDevice::Ended {
                    call_id: self.device_call_id.clone(),
                    reason: EndReason::MediaUnavailable.as_str(),
                });
                self.tell_caller_node(LegEvent::Hangup, None);
                ctx.stop();
            }
        }
    }
}

/// The calling node is lost (expired, or restarted): an answered leg leaves a CDR of the
/// call here, if this node can claim it (then stops, as with [`HostedStop`]).
#[derive(Message)]
#[rtype(result = "()")]
struct HostedLost;

impl Handler<HostedLost> for HostedLeg {
    type Result = ();
    fn handle(&mut self, _: HostedLost, ctx: &mut Context<Self>) {
        let Some(answer) = self.call.answered else {
            // Never connected: the calling node's own row (closed when it restarts) is
            // the call's record.
            return ctx.stop();
        };
        // Ports released first: the counts are final.
        self.release();
        let (packets_in, packets_out) = self.stats.close();
        let (node, call_id, _) = &self.key;
        let c = &self.call;
        let cdr = parley_core::cdr::CdrRecord {
            call_id: self.device_call_id.clone(),
            sip_call_id: c.sip_call_id.clone(),
            tenant: c.tenant.clone(),
            user: c.user.clone(),
            caller: c.caller.clone(),
            caller_name: c.caller_name.clone(),
            called: c.called.clone(),
            route: parley_core::cdr::CallRoute::Im,
            start: c.offered,
            answer: Some(answer),
            end: SystemTime::now(),
            disposition: parley_core::cdr::Disposition::Interrupted,
            cause: 0,
            packets_in,
            packets_out,
            answered_by: Some(c.device.clone()),
            direction: parley_core::cdr::Direction::In,
            dialled_by: None,
        };
        let claim = Claim {
            by: self.inner.me.clone(),
            call_id: call_id.clone(),
            sip_call_id: c.sip_call_id.clone(),
            start_ms: unix_ms(c.offered),
        };
        let key = claim_key(node, c.incarnation, call_id);
        actix_rt::spawn(claim_and_write(
            self.inner.clone(),
            node.clone(),
            c.incarnation,
            key,
            claim,
            cdr,
        ));
        ctx.stop();
    }
}

/// The leg is over (its device was told by [`Inner::end_hosted`]).
#[derive(Message)]
#[rtype(result = "()")]
struct HostedStop;

impl Handler<HostedStop> for HostedLeg {
    type Result = ();
    fn handle(&mut self, _: HostedStop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
