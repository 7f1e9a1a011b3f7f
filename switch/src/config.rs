//! Node configuration: one TOML file with nested sections and defaults for every key.
//!
//! `parley run` with no `--config` uses [`Config::demo`]: loopback only, SQLite in
//! `./parley-data`, tenant `demo` with three users and a `pstn` trunk. Every key is
//! documented in `parley.example.toml`. Errors name the key and the line (the `toml`
//! crate's span-carrying errors, with `deny_unknown_fields` so a typo is an error, not a
//! silently ignored setting).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where SQLite, the QUIC certificate and the admin token live.
    pub data_dir: PathBuf,
    /// Demo mode: seeds the demo tenant, generates and prints an admin token.
    pub demo: bool,
    /// SIP transport.
    pub sip: SipConfig,
    /// QUIC endpoint for IM devices.
    pub quic: QuicConfig,
    /// HTTP admin API and metrics.
    pub http: HttpConfig,
    /// The web client for browsers and its WebSocket.
    pub web: WebConfig,
    /// Media relay.
    pub relay: RelayConfig,
    /// Call handling.
    pub calls: CallsConfig,
    /// Personal address books.
    pub address_book: AddressBookConfig,
    /// CDR retention.
    pub cdrs: CdrsConfig,
    /// Chat messages: offline storage and the archive.
    pub chat: ChatConfig,
    /// The database: SQLite in `data_dir` unless a URL says otherwise.
    pub store: StoreConfig,
    /// Login throttling and caps on connections not logged in yet.
    pub login: LoginConfig,
    /// SIP trunks toward the PSTN.
    pub trunks: Vec<TrunkConfig>,
    /// Number prefix → trunk group. Empty: every trunk serves every number.
    pub number_plan: Vec<NumberPlanConfig>,
    /// Users of the built-in user store.
    pub users: Vec<UserConfig>,
    /// Federated authentication: the auth agent endpoint and its limits.
    pub federation: FederationConfig,
    /// Cluster mode: several nodes sharing users' whereabouts over NATS JetStream.
    pub cluster: ClusterConfig,
}

/// `[cluster]`: off (a single node, no NATS) unless `nats` lists a server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`; JetStream must be on: `nats-server -js`).
    /// Empty: cluster mode is off.
    pub nats: Vec<String>,
    /// This node's name in the cluster: letters, digits, `-` and `_`, unique per node.
    pub node_id: String,
    /// NATS user name (with `password`).
    pub user: Option<String>,
    /// NATS password.
    pub password: Option<String>,
    /// NATS token (instead of a user name and password).
    pub token: Option<String>,
    /// The address other nodes reach this node's relay at (calls handed to a device on
    /// this node send their media there). Default: `relay.ip`, which must then not be
    /// `0.0.0.0`.
    pub media_ip: Option<IpAddr>,
    /// How often this node refreshes its entry in the node registry (with its load), ms.
    pub heartbeat_ms: u64,
    /// A node whose entry is older than this is dead: its devices are offline for every
    /// other node and its calls' legs end, seconds. At least twice `heartbeat_ms`.
    pub node_expiry_secs: u64,
    /// How often each device's entry is written again (the device bucket's entries expire
    /// after three times this), seconds.
    pub device_refresh_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats: Vec::new(),
            node_id: String::new(),
            user: None,
            password: None,
            token: None,
            media_ip: None,
            heartbeat_ms: 2000,
            node_expiry_secs: 6,
            device_refresh_secs: 20,
        }
    }
}

/// `[federation]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Where auth agents connect (QUIC, mutual TLS). Unset: no agent endpoint (tenants
    /// with a directory then refuse every login with `no_agent`). Demo mode listens on
    /// 127.0.0.1:4434.
    pub listen: Option<SocketAddr>,
    /// How long a login waits for the agent's answer, ms.
    pub request_timeout_ms: u64,
    /// Logins of one tenant waiting for agents at once; more are refused `directory_busy`.
    pub max_pending_per_tenant: usize,
    /// After a tenant's last agent disconnected, seconds during which devices may still
    /// reconnect with a session token (sessions already up are never cut for it).
    pub no_agent_grace_secs: u64,
    /// Lifetime of the certificates issued to agents, seconds (they renew when a quarter is
    /// left).
    pub agent_cert_secs: u64,
    /// Lifetime of device session tokens, seconds.
    pub session_token_secs: u64,
    /// Lifetime of enrolment tokens, seconds.
    pub enrolment_token_secs: u64,
    /// Most users one tenant's directory may list.
    pub max_directory_users: usize,
}

impl Default for FederationConfig {
    fn default() -> Self {
        let d = crate::federation::Settings::default();
        Self {
            listen: None,
            request_timeout_ms: d.request_timeout.as_millis() as u64,
            max_pending_per_tenant: d.max_pending_per_tenant,
            no_agent_grace_secs: d.no_agent_grace.as_secs(),
            agent_cert_secs: d.agent_cert_lifetime.as_secs(),
            session_token_secs: d.session_token_lifetime.as_secs(),
            enrolment_token_secs: crate::store::tenants::ENROLMENT_TOKEN_LIFETIME.as_secs(),
            max_directory_users: d.max_directory_users,
        }
    }
}

impl FederationConfig {
    /// As the federation takes them.
    pub fn settings(&self) -> crate::federation::Settings {
        crate::federation::Settings {
            request_timeout: Duration::from_millis(self.request_timeout_ms.max(1)),
            max_pending_per_tenant: self.max_pending_per_tenant.max(1),
            no_agent_grace: Duration::from_secs(self.no_agent_grace_secs),
            agent_cert_lifetime: Duration::from_secs(self.agent_cert_secs.max(60)),
            session_token_lifetime: Duration::from_secs(self.session_token_secs),
            max_directory_users: self.max_directory_users,
        }
    }
}

/// `[sip]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// TCP listen address for SIP over TCP (RFC 3261 §18); off when absent.
    pub tcp_listen: Option<SocketAddr>,
    /// Seconds a SIP connection may carry nothing before it is closed.
    pub tcp_idle_timeout_secs: u64,
    /// Milliseconds a peer has to finish a message it began sending on a connection
    /// (slow-sender defence); also the timeout for opening a connection.
    pub tcp_message_timeout_ms: u64,
    /// Most SIP connections open at once (inbound and outbound); more are refused.
    pub tcp_max_connections: usize,
    /// SIP server transactions in flight beyond which new requests are refused (503 with
    /// Retry-After, answered without keeping any state); requests inside a live call
    /// are not. A call holds two (INVITE, BYE) for 64*T1 each after their answers.
    pub max_server_transactions: usize,
    /// Server transactions in flight from one source address beyond which its new
    /// requests are refused the same way, so one source cannot take the whole table;
    /// 0: unbounded (a gateway at 1,000 calls/s holds ~64,000).
    pub max_transactions_per_source: usize,
    /// Live calls from one source address beyond which its new INVITEs get 503 with
    /// Retry-After; 0: unbounded (a gateway carrying more calls than this from one
    /// address needs it raised).
    pub max_calls_per_source: usize,
    /// New calls per second the node admits (a token bucket holding one second's
    /// worth); more get 503 with Retry-After at once. 0: no rate limit.
    pub max_call_rate: u32,
    /// Live calls at once beyond which new INVITEs get 503 with Retry-After; 0: no cap
    /// (the relay's port range still bounds calls with media).
    pub max_calls: usize,
    /// Shed new calls (503 with Retry-After) while SIP datagrams wait longer than this in
    /// the receive queue: when even the least-delayed datagram of a 100 ms window waited
    /// longer, the node is behind, and admitting more calls only lengthens the wait
    /// until gateways retransmit. Admitted again below half of it. 0: off.
    pub max_queue_delay_ms: u64,
    /// Receive and send buffer of the SIP UDP socket, bytes (`SO_RCVBUF`/`SO_SNDBUF`,
    /// capped by `net.core.rmem_max`/`wmem_max`; a warning is logged when capped). What
    /// arrives while the control thread is busy waits here: too small, and a burst is
    /// dropped and comes back as retransmissions. 0 keeps the kernel default.
    pub udp_buffer_bytes: usize,
    /// TCP listen address for SIP over TLS; off when absent.
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener (required with `tls_listen` unless
    /// `demo = true`, which generates a self-signed pair in the data directory).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener.
    pub tls_key: Option<PathBuf>,
    /// Default region for numbers without a `+` (ISO 3166 code, e.g. `US`).
    pub default_region: String,
    /// SIP timer T1 in milliseconds (RFC 3261 round-trip estimate; 64*T1 is the
    /// transaction timeout). Lower it only on networks known to be fast.
    pub t1_ms: u64,
    /// Whether BYE, re-INVITE, ACK and CANCEL in a gateway's dialog must come from the
    /// address the dialog's INVITE came from (besides carrying both dialog tags). Turn it
    /// off only for gateways behind load balancers that spread a dialog over addresses.
    pub dialog_source_check: bool,
    /// Control threads that carry SIP signalling (shards). Each runs its own SIP
    /// transactions, dialogs and call actors; a call belongs to the shard its Call-ID
    /// hashes to, and every shard reads the UDP socket, handing what it reads for another
    /// to it. The limits above (`max_call_rate`, `max_calls`, the per-source caps) are
    /// shared out evenly. 1 (the default) keeps everything on the main thread; more need
    /// SIP over UDP only (no `tcp_listen`, `tls_listen`, or TCP/TLS trunks). See
    /// docs/architecture.md § Threads.
    pub control_threads: usize,
}

/// `[quic]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// UDP listen address for QUIC.
    pub listen: SocketAddr,
    /// Seconds a new connection has to log in.
    pub login_timeout_secs: u64,
    /// Seconds of silence after which a device's connection is dropped (the QUIC idle
    /// timeout) and its presence goes. The node keeps idle connections alive with QUIC
    /// PINGs every third of it, so a live device never hits it; a device that lost its
    /// network does, within this bound.
    pub idle_timeout_secs: u64,
    /// Receive and send buffer of the QUIC socket, bytes (`SO_RCVBUF`/`SO_SNDBUF`, capped
    /// by `net.core.rmem_max`/`wmem_max`; a warning is logged when capped). All devices'
    /// datagrams share this one socket: the default 4 MiB absorbs ~20 ms of 1,000 device
    /// calls while the control thread is busy. 0 keeps the kernel default.
    pub socket_buffer_bytes: usize,
    /// Threads (`parley-quic-N`) that run QUIC — packet encryption and decryption for
    /// every device, and handing device media to the relay — apart from the control
    /// thread that runs the actors.
    pub threads: usize,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// TCP listen address.
    pub listen: SocketAddr,
    /// Bearer token for `/api/v1`. Required unless `demo = true` (then generated).
    pub admin_token: Option<String>,
}

/// `[web]`: the web client browsers sign in with (`/`) and its WebSocket (`/ws`), on a
/// listener of its own, so that the admin API and metrics never face browsers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the web client.
    pub enabled: bool,
    /// TCP listen address. Anything but loopback needs `tls_cert` and `tls_key`: passwords
    /// and chats cross it.
    pub listen: SocketAddr,
    /// Certificate chain (PEM) the listener presents; with `tls_key`, the listener speaks
    /// HTTPS and WSS only.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Origins besides the node's own page (`scheme://host[:port]`, as browsers send them
    /// in `Origin`) whose pages may open the WebSocket. Others are refused (403): a page on
    /// another site must not talk to the node with a user's browser.
    pub allowed_origins: Vec<String>,
    /// UDP address of browsers' media (WebRTC, ICE-lite: this address is the one host
    /// candidate the node offers, so it must be one browsers reach, not `0.0.0.0`); port
    /// 0 picks a free one.
    pub media_listen: SocketAddr,
    /// TCP connections open on the web listener at most, from accept on (TLS handshakes,
    /// pages, assets and WebSockets);
    /// one more is closed at once and counted (`parley_web_sessions_refused_total{reason="connections"}`).
    pub max_connections: usize,
    /// A connection must have sent a whole request's headers this many seconds after it
    /// opened or after its previous request (slow or idle clients are closed), and a TLS
    /// handshake must finish within it.
    pub header_timeout_secs: u64,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: ([127, 0, 0, 1], 8088).into(),
            tls_cert: None,
            tls_key: None,
            allowed_origins: Vec::new(),
            media_listen: ([127, 0, 0, 1], 0).into(),
            max_connections: 10_000,
            header_timeout_secs: 10,
        }
    }
}

/// `[relay]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Address relay sockets bind to and advertise in SDP.
    pub ip: IpAddr,
    /// First port of the relay range (inclusive).
    pub port_min: u16,
    /// Last port of the relay range (inclusive).
    pub port_max: u16,
    /// Relay worker threads (`parley-relay-N`); ports are sharded over them by
    /// `port % workers`. Defaults to the number of CPUs.
    pub workers: usize,
    /// Interrupt moderation, microseconds: while packets flow, a worker reads its sockets
    /// at most once per this interval, so it is woken once per turn rather than once per
    /// packet. Adds at most this much latency; 0 disables.
    pub coalesce_us: u64,
    /// Bind an RTCP port (RTP port + 1) next to each RTP port and relay RTCP on it, for
    /// peers that do not multiplex RTCP (RFC 3550 §11). RTP ports are always even and
    /// their + 1 always reserved, so stray RTCP never reaches another call; `false` binds
    /// only the RTP port (RTCP then only relayed multiplexed, RFC 5761) and halves the
    /// file descriptors a call needs.
    pub rtcp_ports: bool,
    /// Receive and send buffer of each relay socket, bytes (`SO_RCVBUF`/`SO_SNDBUF`,
    /// capped by `net.core.rmem_max`/`wmem_max`); 0 keeps the kernel default.
    pub socket_buffer_bytes: usize,
    /// Most RTP ports (call legs) one worker may hold; a call that would exceed it is
    /// answered 503 like port exhaustion. 0: bounded by the port range only.
    pub max_ports_per_worker: usize,
    /// Free RTP ports (with their RTCP ports) kept bound after a call for the next one,
    /// instead of closing each socket and binding a new one per call leg (a dozen system
    /// calls per port). Bounded also by a quarter of the open-file limit
    /// (the node raises its soft limit to the hard one at start). 0 closes every
    /// released port.
    pub warm_ports: usize,
    /// Latch a leg's media onto the first source whatever its IP address (SIP peers
    /// behind NAT). By default only a source with the IP address the peer's SDP gave may
    /// latch (its port may differ), so a third party cannot take a call's media by
    /// sending first.
    pub latch_any_source: bool,
    /// Forward latched UDP↔UDP media in the kernel with Parley's eBPF program (TC
    /// classifier; the relay installs each flow once both peers have latched and takes it
    /// back on a re-INVITE, hang-up or media timeout): `off` (the default), `auto` (where
    /// the program loads: root with CAP_BPF and CAP_NET_ADMIN, a build with clang; else
    /// userspace, saying why in the log) or `required` (the node does not start without
    /// it).
    pub kernel: crate::relay::KernelMode,
    /// Interfaces the kernel fast path attaches to (ingress); empty: `lo` and the
    /// interface holding `ip`.
    pub kernel_interfaces: Vec<String>,
}

/// `[calls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Seconds a call may ring before it is answered 480.
    pub ring_timeout_secs: u64,
    /// Seconds without any media on an answered call before Parley ends it (BYE to both
    /// sides, CDR cause 408); 0 disables.
    pub media_timeout_secs: u64,
    /// Milliseconds a device has to acknowledge a call offer (`ringing`) before the call
    /// treats it as lost — withdraws it, routes on to the next device or the PSTN line —
    /// and its connection is closed; 0 waits for the ring timeout instead.
    pub offer_ack_timeout_ms: u64,
    /// Calls ringing one user at once beyond which a new call to them is refused 486 Busy
    /// Here (a flood of calls cannot pile up on a user's devices); 0: unbounded.
    pub max_ringing_per_user: usize,
}

/// `[login]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginConfig {
    /// Failed logins from one source address (any user names) before further attempts
    /// from it are refused with `rate_limited`; it earns one attempt back every
    /// `window_secs / failures_per_source`.
    pub failures_per_source: u32,
    /// Failed logins for one user name (from any address; existing or not) before further
    /// attempts for it are refused, even with the right password.
    pub failures_per_user: u32,
    /// Seconds in which a throttled bucket refills completely.
    pub window_secs: u64,
    /// Connections from one address that have not logged in yet (handshaking or before
    /// `login`); more are refused at once, before their handshake.
    pub pending_per_source: u32,
    /// Connections from all addresses that have not logged in yet.
    pub pending_total: u32,
}

impl Default for LoginConfig {
    fn default() -> Self {
        let d = parley_core::admission::LoginLimits::default();
        Self {
            failures_per_source: d.failures_per_source,
            failures_per_user: d.failures_per_user,
            window_secs: d.window.as_secs(),
            pending_per_source: d.pending_per_source,
            pending_total: d.pending_total,
        }
    }
}

impl LoginConfig {
    /// As the guard takes them.
    pub fn limits(&self) -> parley_core::admission::LoginLimits {
        parley_core::admission::LoginLimits {
            failures_per_source: self.failures_per_source,
            failures_per_user: self.failures_per_user,
            window: Duration::from_secs(self.window_secs),
            pending_per_source: self.pending_per_source,
            pending_total: self.pending_total,
            ..Default::default()
        }
    }
}

/// `[address_book]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AddressBookConfig {
    /// Most entries one user's book holds. A new party beyond it evicts the least valuable
    /// entry: parties the user never called or answered go first, then the least called,
    /// then the oldest; so callers that were only ever rejected or missed cannot push out
    /// the user's real contacts.
    pub max_entries: usize,
}

impl Default for AddressBookConfig {
    fn default() -> Self {
        Self {
            max_entries: crate::store::DEFAULT_BOOK_LIMIT,
        }
    }
}

/// `[cdrs]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdrsConfig {
    /// Days a CDR (the node's own and imported carrier rows) is kept after its call ended;
    /// older ones are deleted hourly. Address books keep what they learned. 0: forever.
    pub retention_days: u32,
}

/// `[store]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (append `?sslmode=require` off
    /// loopback) for a PostgreSQL server, or `sqlite://PATH`; unset: `parley.db` in
    /// `data_dir`. The password is never logged.
    pub url: Option<String>,
    /// Connections to the database (default: 4 for SQLite, 8 for PostgreSQL).
    pub max_connections: Option<u32>,
}

impl StoreConfig {
    /// Where the store is, for a node whose data directory is `data_dir`.
    pub fn url(&self, data_dir: &std::path::Path) -> Result<crate::store::StoreUrl, String> {
        let mut url = match &self.url {
            Some(u) => crate::store::StoreUrl::parse(u)?,
            None => crate::store::StoreUrl::sqlite_in(data_dir),
        };
        if let Some(n) = self.max_connections {
            if !(1..=1000).contains(&n) {
                return Err("max_connections must be between 1 and 1000".to_owned());
            }
            url.max_connections = n;
        }
        Ok(url)
    }
}

/// `[chat]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    /// Most messages kept for one user while none of their devices is online; a chat
    /// beyond it is refused with `mailbox_full`.
    pub offline_max_messages: u32,
    /// Days a message waits for an offline user; older ones are no longer handed over at
    /// login (they stay in the archive until `history_days`).
    pub offline_days: u32,
    /// Days the archive keeps messages (deleted hourly). 0: forever.
    pub history_days: u32,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            offline_max_messages: 1000,
            offline_days: 30,
            history_days: 0,
        }
    }
}

/// `[[trunks]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    /// Name (used in logs, metrics and CDRs).
    pub name: String,
    /// SIP address of the trunk.
    pub address: SocketAddr,
    /// How to reach it: `udp` (default), `tcp` or `tls`.
    #[serde(default)]
    pub transport: TrunkTransport,
    /// With `transport = "tls"`: PEM file of the CA certificates (or the trunk's own
    /// self-signed certificate) to trust.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// With `transport = "tls"`: the name (or IP address) the trunk's certificate must
    /// carry; by default the address's IP.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Milliseconds between SIP OPTIONS health probes (0 disables probing).
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// A probe unanswered after this many milliseconds counts as failed.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes (or calls refused with 503 / unanswered) that mark the
    /// trunk down; calls then go over the packet network.
    #[serde(default = "default_probe_threshold")]
    pub down_after: u32,
    /// Consecutive successful probes that mark it up again.
    #[serde(default = "default_probe_threshold")]
    pub up_after: u32,
    /// Digest username, if the trunk challenges our INVITEs (401/407).
    #[serde(default)]
    pub username: Option<String>,
    /// Digest password (with `username`).
    #[serde(default)]
    pub password: Option<String>,
    /// Trunks of a number's group are tried lowest priority first; a call fails over to
    /// the next on 408, 5xx or no answer.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Among trunks of equal priority, calls are shared in proportion to weight (1–1000).
    #[serde(default = "default_priority")]
    pub weight: u32,
}

/// A trunk's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrunkTransport {
    /// SIP over UDP.
    #[default]
    Udp,
    /// SIP over TCP (one connection, opened on demand and reused).
    Tcp,
    /// SIP over TLS (likewise; the trunk's certificate verified against `tls_ca`).
    Tls,
}

impl TrunkTransport {
    /// As the SIP core names it.
    pub fn transport(self) -> crate::sip::core::Transport {
        match self {
            TrunkTransport::Udp => crate::sip::core::Transport::Udp,
            TrunkTransport::Tcp => crate::sip::core::Transport::Tcp,
            TrunkTransport::Tls => crate::sip::core::Transport::Tls,
        }
    }
}

/// `[[number_plan]]`: numbers starting with `prefix` go to the trunks named in `trunks`
/// (the longest matching prefix wins; a number no row matches has no trunk).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumberPlanConfig {
    /// E.164 prefix: `+` and digits (`+44`, `+1212`), or `""` for every other number.
    pub prefix: String,
    /// Names of the trunks in the group.
    pub trunks: Vec<String>,
}

fn default_priority() -> u32 {
    1
}

fn default_probe_interval_ms() -> u64 {
    10_000
}

fn default_probe_timeout_ms() -> u64 {
    2_000
}

fn default_probe_threshold() -> u32 {
    2
}

impl SipConfig {
    /// Limits and timeouts of SIP connections.
    pub fn stream_settings(&self) -> crate::sip::stream::StreamSettings {
        crate::sip::stream::StreamSettings {
            idle_timeout: Duration::from_secs(self.tcp_idle_timeout_secs),
            message_timeout: Duration::from_millis(self.tcp_message_timeout_ms),
            max_connections: self.tcp_max_connections,
            ..Default::default()
        }
    }
}

impl Config {
    /// The number plan over `trunks` (trunk ids are their positions in the list).
    pub fn number_plan(&self) -> parley_core::numberplan::NumberPlan {
        use parley_core::numberplan::{NumberPlan, NumberRoute, TrunkSpec};
        let id = |name: &String| self.trunks.iter().position(|t| t.name == *name);
        NumberPlan::new(
            self.trunks
                .iter()
                .map(|t| TrunkSpec {
                    name: t.name.clone(),
                    priority: t.priority,
                    weight: t.weight,
                })
                .collect(),
            self.number_plan
                .iter()
                .map(|r| NumberRoute {
                    prefix: r.prefix.clone(),
                    trunks: r.trunks.iter().filter_map(id).collect(),
                })
                .collect(),
        )
    }
}

impl TrunkConfig {
    /// Digest credentials toward the trunk, when configured.
    pub fn credentials(&self) -> Option<sipx_sip::auth::Credentials> {
        Some(sipx_sip::auth::Credentials::new(
            self.username.clone()?,
            self.password.clone()?,
        ))
    }
    /// The trunk's health-check policy.
    pub fn health_policy(&self) -> parley_core::trunk::HealthPolicy {
        parley_core::trunk::HealthPolicy {
            interval: Duration::from_millis(self.probe_interval_ms),
            timeout: Duration::from_millis(self.probe_timeout_ms),
            down_after: self.down_after,
            up_after: self.up_after,
            ..Default::default()
        }
    }
}

/// `[[users]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Tenant.
    pub tenant: String,
    /// User name.
    pub user: String,
    /// Telephone number (normalised to E.164).
    pub number: String,
    /// Password (hashed with Argon2id before it is stored).
    pub password: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("parley-data"),
            demo: false,
            sip: SipConfig::default(),
            quic: QuicConfig::default(),
            http: HttpConfig::default(),
            web: WebConfig::default(),
            relay: RelayConfig::default(),
            calls: CallsConfig::default(),
            address_book: AddressBookConfig::default(),
            cdrs: CdrsConfig::default(),
            chat: ChatConfig::default(),
            store: StoreConfig::default(),
            login: LoginConfig::default(),
            trunks: Vec::new(),
            number_plan: Vec::new(),
            users: Vec::new(),
            federation: FederationConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for SipConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 5060).into(),
            default_region: "US".into(),
            t1_ms: 500,
            dialog_source_check: true,
            tcp_listen: None,
            tcp_idle_timeout_secs: 600,
            tcp_message_timeout_ms: 5000,
            tcp_max_connections: 1024,
            max_server_transactions: 200_000,
            max_transactions_per_source: 160_000,
            max_calls_per_source: 2_000,
            max_call_rate: 0,
            max_calls: 0,
            max_queue_delay_ms: 100,
            udp_buffer_bytes: 4 << 20,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            control_threads: 1,
        }
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 4433).into(),
            login_timeout_secs: 10,
            idle_timeout_secs: 10,
            socket_buffer_bytes: 4 << 20,
            threads: 1,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            admin_token: None,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            ip: [127, 0, 0, 1].into(),
            port_min: 20000,
            port_max: 29999,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            coalesce_us: 0,
            rtcp_ports: true,
            socket_buffer_bytes: 0,
            max_ports_per_worker: 0,
            warm_ports: 4096,
            latch_any_source: false,
            kernel: crate::relay::KernelMode::Off,
            kernel_interfaces: Vec::new(),
        }
    }
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            ring_timeout_secs: 60,
            media_timeout_secs: 60,
            offer_ack_timeout_ms: 3000,
            max_ringing_per_user: 200,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or a bad key/value; the message names the key and line.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        message: String,
    },
    /// A value is well-formed but unusable.
    #[error("{path}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// The embedded demo configuration.
    pub fn demo() -> Self {
        let users = [
            ("alice", "+15550100001"),
            ("bob", "+15550100002"),
            ("carol", "+15550100003"),
        ]
        .into_iter()
        .map(|(u, n)| UserConfig {
            tenant: "demo".into(),
            user: u.into(),
            number: n.into(),
            password: "demo".into(),
        })
        .collect();
        Self {
            demo: true,
            trunks: vec![TrunkConfig {
                name: "pstn".into(),
                address: ([127, 0, 0, 1], 5080).into(),
                probe_interval_ms: default_probe_interval_ms(),
                probe_timeout_ms: default_probe_timeout_ms(),
                down_after: default_probe_threshold(),
                up_after: default_probe_threshold(),
                username: None,
                password: None,
                transport: TrunkTransport::Udp,
                tls_ca: None,
                tls_server_name: None,
                priority: default_priority(),
                weight: default_priority(),
            }],
            users,
            federation: FederationConfig {
                listen: Some(([127, 0, 0, 1], 4434).into()),
                ..FederationConfig::default()
            },
            ..Self::default()
        }
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text (`path` is only used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text.get(..s.start).unwrap_or(text).matches('\n').count() + 1);
            let message = match line {
                Some(l) => format!("line {l}: {}", e.message()),
                None => e.message().to_string(),
            };
            ConfigError::Parse {
                path: path.into(),
                message,
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError::Invalid {
            path: path.into(),
            key: key.into(),
            message: message.into(),
        };
        if self.relay.port_min > self.relay.port_max {
            return Err(bad(
                "relay.port_min",
                "must not be greater than relay.port_max",
            ));
        }
        if self.relay.port_min == 0 {
            return Err(bad("relay.port_min", "must be a real port (1-65535)"));
        }
        if self.relay.port_max - self.relay.port_min < 3 {
            return Err(bad(
                "relay.port_max",
                "the range must hold at least two RTP/RTCP port pairs (4 ports)",
            ));
        }
        if self.chat.offline_max_messages == 0 {
            return Err(bad(
                "chat.offline_max_messages",
                "must be at least 1 (messages to offline users are refused otherwise)",
            ));
        }
        if let Err(e) = self.store.url(&self.data_dir) {
            let key = if e.starts_with("max_connections") {
                "store.max_connections"
            } else {
                "store.url"
            };
            return Err(bad(key, &e));
        }
        if !(1..=256).contains(&self.quic.threads) {
            return Err(bad("quic.threads", "must be between 1 and 256"));
        }
        if !(1..=1024).contains(&self.relay.workers) {
            return Err(bad("relay.workers", "must be between 1 and 1024"));
        }
        if self.relay.coalesce_us > 20_000 {
            return Err(bad(
                "relay.coalesce_us",
                "must be at most 20000 (one G.711 packet interval)",
            ));
        }
        match (&self.web.tls_cert, &self.web.tls_key) {
            (Some(_), None) => return Err(bad("web.tls_key", "required with web.tls_cert")),
            (None, Some(_)) => return Err(bad("web.tls_cert", "required with web.tls_key")),
            (None, None) if self.web.enabled && !self.web.listen.ip().is_loopback() => {
                return Err(bad(
                    "web.listen",
                    "not a loopback address: set web.tls_cert and web.tls_key (browsers send passwords and chats over it)",
                ));
            }
            _ => {}
        }
        if self.web.max_connections == 0 {
            return Err(bad("web.max_connections", "must be at least 1"));
        }
        if !self.cluster.nats.is_empty() {
            let c = &self.cluster;
            let id_ok = !c.node_id.is_empty()
                && c.node_id.len() <= 64
                && c.node_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !id_ok {
                return Err(bad(
                    "cluster.node_id",
                    "required with cluster.nats: 1-64 letters, digits, '-' or '_', unique per node",
                ));
            }
            if let Some(u) = c
                .nats
                .iter()
                .find(|u| !u.starts_with("nats://") && !u.starts_with("tls://"))
            {
                return Err(bad(
                    "cluster.nats",
                    &format!("{u:?} is not a nats:// or tls:// URL"),
                ));
            }
            if c.user.is_some() != c.password.is_some() {
                return Err(bad(
                    "cluster.password",
                    "cluster.user and cluster.password go together",
                ));
            }
            if c.heartbeat_ms < 100 {
                return Err(bad("cluster.heartbeat_ms", "must be at least 100"));
            }
            if c.node_expiry_secs.saturating_mul(1000) < 2 * c.heartbeat_ms {
                return Err(bad(
                    "cluster.node_expiry_secs",
                    "must be at least twice cluster.heartbeat_ms (a node would expire between heartbeats)",
                ));
            }
            if c.device_refresh_secs == 0 {
                return Err(bad("cluster.device_refresh_secs", "must be at least 1"));
            }
            if c.media_ip.unwrap_or(self.relay.ip).is_unspecified() {
                return Err(bad(
                    "cluster.media_ip",
                    "required when relay.ip is 0.0.0.0: the address other nodes send this node's calls' media to",
                ));
            }
        }
        if self.web.header_timeout_secs == 0 {
            return Err(bad("web.header_timeout_secs", "must be at least 1"));
        }
        if self.web.media_listen.ip().is_unspecified() {
            return Err(bad(
                "web.media_listen",
                "must be an address browsers reach (it is the ICE candidate), not 0.0.0.0 or ::",
            ));
        }
        if let Some(o) =
            self.web.allowed_origins.iter().find(|o| {
                !(o.starts_with("https://") || o.starts_with("http://")) || o.ends_with('/')
            })
        {
            return Err(bad(
                "web.allowed_origins",
                &format!("{o:?} is not an origin (scheme://host[:port], no path)"),
            ));
        }
        if !self.demo && self.http.admin_token.as_deref().is_none_or(str::is_empty) {
            return Err(bad("http.admin_token", "required unless demo = true"));
        }
        for (i, t) in self.trunks.iter().enumerate() {
            if self.trunks[..i].iter().any(|o| o.name == t.name) {
                return Err(bad(
                    &format!("trunks[{i}].name"),
                    "trunk names must be unique",
                ));
            }
            if t.transport == TrunkTransport::Tls && t.tls_ca.is_none() {
                return Err(bad(
                    &format!("trunks[{i}].tls_ca"),
                    "required with transport = \"tls\" (the CA certificates to trust, PEM)",
                ));
            }
            if !(1..=1000).contains(&t.weight) {
                return Err(bad(
                    &format!("trunks[{i}].weight"),
                    "must be between 1 and 1000",
                ));
            }
            if t.probe_interval_ms > 0 && t.probe_timeout_ms == 0 {
                return Err(bad(
                    &format!("trunks[{i}].probe_timeout_ms"),
                    "must be at least 1 when probing",
                ));
            }
            if t.username.is_some() != t.password.is_some() {
                return Err(bad(
                    &format!("trunks[{i}].password"),
                    "username and password go together",
                ));
            }
            if t.down_after == 0 || t.up_after == 0 {
                return Err(bad(
                    &format!("trunks[{i}].down_after"),
                    "down_after and up_after must be at least 1",
                ));
            }
        }
        for (i, r) in self.number_plan.iter().enumerate() {
            let digits = r.prefix.strip_prefix('+');
            if !r.prefix.is_empty() && digits.is_none_or(|d| !d.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(bad(
                    &format!("number_plan[{i}].prefix"),
                    "must be + and digits (E.164), or \"\" for every other number",
                ));
            }
            if self.number_plan[..i].iter().any(|o| o.prefix == r.prefix) {
                return Err(bad(&format!("number_plan[{i}].prefix"), "appears twice"));
            }
            if r.trunks.is_empty() {
                return Err(bad(&format!("number_plan[{i}].trunks"), "names no trunk"));
            }
            if let Some(unknown) = r
                .trunks
                .iter()
                .find(|n| !self.trunks.iter().any(|t| t.name == **n))
            {
                return Err(bad(
                    &format!("number_plan[{i}].trunks"),
                    &format!("no trunk named {unknown:?}"),
                ));
            }
        }
        if !(1..=86_400).contains(&self.sip.tcp_idle_timeout_secs) {
            return Err(bad(
                "sip.tcp_idle_timeout_secs",
                "must be between 1 and 86400",
            ));
        }
        if !(100..=60_000).contains(&self.sip.tcp_message_timeout_ms) {
            return Err(bad(
                "sip.tcp_message_timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if self.sip.tls_listen.is_some()
            && !self.demo
            && (self.sip.tls_cert.is_none() || self.sip.tls_key.is_none())
        {
            return Err(bad(
                "sip.tls_cert",
                "tls_cert and tls_key are required with tls_listen unless demo = true",
            ));
        }
        if self.sip.max_server_transactions < 16 {
            return Err(bad("sip.max_server_transactions", "must be at least 16"));
        }
        if self.sip.tcp_max_connections == 0 {
            return Err(bad("sip.tcp_max_connections", "must be at least 1"));
        }
        if !(10..=5000).contains(&self.sip.t1_ms) {
            return Err(bad("sip.t1_ms", "must be between 10 and 5000"));
        }
        if !(1..=256).contains(&self.sip.control_threads) {
            return Err(bad("sip.control_threads", "must be between 1 and 256"));
        }
        if self.sip.control_threads > 1
            && (self.sip.tcp_listen.is_some()
                || self.sip.tls_listen.is_some()
                || self
                    .trunks
                    .iter()
                    .any(|t| t.transport != TrunkTransport::Udp))
        {
            return Err(bad(
                "sip.control_threads",
                "more than one control thread needs SIP over UDP only (no tcp_listen, \
                 tls_listen or TCP/TLS trunks)",
            ));
        }
        if self.calls.ring_timeout_secs == 0 {
            return Err(bad("calls.ring_timeout_secs", "must be at least 1"));
        }
        for (key, v) in [
            ("login.failures_per_source", self.login.failures_per_source),
            ("login.failures_per_user", self.login.failures_per_user),
            ("login.pending_per_source", self.login.pending_per_source),
            ("login.pending_total", self.login.pending_total),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if !(1..=86_400).contains(&self.login.window_secs) {
            return Err(bad("login.window_secs", "must be between 1 and 86400"));
        }
        if !(1..=100_000).contains(&self.address_book.max_entries) {
            return Err(bad(
                "address_book.max_entries",
                "must be between 1 and 100000",
            ));
        }
        if !(3..=600).contains(&self.quic.idle_timeout_secs) {
            return Err(bad("quic.idle_timeout_secs", "must be between 3 and 600"));
        }
        for (i, u) in self.users.iter().enumerate() {
            if crate::numbers::to_e164(&u.number, &self.sip.default_region).is_none() {
                return Err(bad(
                    &format!("users[{i}].number"),
                    "not a valid telephone number",
                ));
            }
        }
        Ok(())
    }

    /// Ring timeout as a duration.
    pub fn ring_timeout(&self) -> Duration {
        Duration::from_secs(self.calls.ring_timeout_secs)
    }

    /// Calls ringing one user beyond which new ones are refused, if bounded.
    pub fn max_ringing(&self) -> Option<usize> {
        (self.calls.max_ringing_per_user > 0).then_some(self.calls.max_ringing_per_user)
    }

    /// How long a device has to acknowledge an offer, if bounded.
    pub fn offer_ack_timeout(&self) -> Option<Duration> {
        (self.calls.offer_ack_timeout_ms > 0)
            .then(|| Duration::from_millis(self.calls.offer_ack_timeout_ms))
    }

    /// Media timeout of answered calls, if enabled.
    pub fn media_timeout(&self) -> Option<Duration> {
        (self.calls.media_timeout_secs > 0)
            .then(|| Duration::from_secs(self.calls.media_timeout_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_key_and_line() {
        let p = Path::new("t.toml");
        let e = Config::parse("demo = true\n[sip]\nlisten = \"nope\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        let e = Config::parse("demo = true\n[relay]\nport_mni = 3\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("port_mni") && e.contains("line 3"), "{e}");
        let e = Config::parse("[http]\nlisten = \"127.0.0.1:1\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.admin_token"), "{e}");
        let e = Config::parse("demo = true\n[relay]\nport_min = 10\nport_max = 5\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("relay.port_min"), "{e}");
        for key in ["max_connections", "header_timeout_secs"] {
            let e = Config::parse(&format!("demo = true\n[web]\n{key} = 0\n"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("web.{key}")), "{e}");
        }
    }

    #[test]
    fn control_threads_errors_name_the_key() {
        let p = Path::new("parley.toml");
        for toml in [
            "demo = true\n[sip]\ncontrol_threads = 0\n",
            "demo = true\n[sip]\ncontrol_threads = 2\ntcp_listen = \"127.0.0.1:5060\"\n",
        ] {
            let e = Config::parse(toml, p).unwrap_err().to_string();
            assert!(e.contains("sip.control_threads"), "{toml}: {e}");
        }
        let c = Config::parse("demo = true\n[sip]\ncontrol_threads = 2\n", p).unwrap();
        assert_eq!(c.sip.control_threads, 2);
    }

    #[test]
    fn cluster_errors_name_the_key() {
        let p = Path::new("parley.toml");
        let base = "demo = true\n[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\n";
        for (extra, key) in [
            ("", "cluster.node_id"),
            ("node_id = \"a.b\"\n", "cluster.node_id"),
            (
                "node_id = \"a\"\nheartbeat_ms = 2000\nnode_expiry_secs = 3\n",
                "cluster.node_expiry_secs",
            ),
            ("node_id = \"a\"\nuser = \"u\"\n", "cluster.password"),
            (
                "node_id = \"a\"\ndevice_refresh_secs = 0\n",
                "cluster.device_refresh_secs",
            ),
        ] {
            let e = Config::parse(&format!("{base}{extra}"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = Config::parse(
            "demo = true\n[cluster]\nnats = [\"http://x\"]\nnode_id = \"a\"\n",
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cluster.nats"), "{e}");
        let e = Config::parse("demo = true\n[cluster]\nnode_idd = \"a\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("node_idd") && e.contains("line 3"), "{e}");
        let ok = Config::parse(&format!("{base}node_id = \"node-1\"\n"), p).unwrap();
        assert_eq!(ok.cluster.node_id, "node-1");
        assert_eq!(ok.cluster.heartbeat_ms, 2000);
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../parley.example.toml");
        let cfg = Config::parse(text, Path::new("parley.example.toml")).unwrap();
        assert_eq!(cfg.users.len(), 3);
        assert_eq!(cfg.trunks[0].name, "pstn");
    }

    #[test]
    fn trunks_and_the_number_plan_are_checked_and_named() {
        let p = Path::new("t.toml");
        let trunks = "demo = true\n[[trunks]]\nname = \"a\"\naddress = \"127.0.0.1:5080\"\n\
                      [[trunks]]\nname = \"b\"\naddress = \"127.0.0.1:5082\"\npriority = 2\n";
        let rows = [
            (
                "[[number_plan]]\nprefix = \"44\"\ntrunks = [\"a\"]\n",
                "number_plan[0].prefix",
            ),
            (
                "[[number_plan]]\nprefix = \"+44\"\ntrunks = [\"c\"]\n",
                "number_plan[0].trunks",
            ),
            (
                "[[number_plan]]\nprefix = \"+44\"\ntrunks = []\n",
                "number_plan[0].trunks",
            ),
            (
                "[[number_plan]]\nprefix = \"+4\"\ntrunks = [\"a\"]\n[[number_plan]]\nprefix = \"+4\"\ntrunks = [\"b\"]\n",
                "number_plan[1].prefix",
            ),
        ];
        for (plan, key) in rows {
            let e = Config::parse(&format!("{trunks}{plan}"), p)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{plan}: {e}");
        }
        let dup = "demo = true\n[[trunks]]\nname = \"a\"\naddress = \"127.0.0.1:5080\"\n\
                   [[trunks]]\nname = \"a\"\naddress = \"127.0.0.1:5082\"\n";
        let e = Config::parse(dup, p).unwrap_err().to_string();
        assert!(e.contains("trunks[1].name"), "{e}");
        let cfg = Config::parse(
            &format!("{trunks}[[number_plan]]\nprefix = \"+44\"\ntrunks = [\"b\"]\n[[number_plan]]\nprefix = \"\"\ntrunks = [\"a\", \"b\"]\n"),
            p,
        )
        .unwrap();
        let plan = cfg.number_plan();
        assert_eq!(plan.group("+447700900123"), vec![1]);
        assert_eq!(plan.candidates("+15550100", &[true, true], 3), vec![0, 1]);
    }
}
