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
    /// Media relay.
    pub relay: RelayConfig,
    /// Call handling.
    pub calls: CallsConfig,
    /// Personal address books.
    pub address_book: AddressBookConfig,
    /// SIP trunks toward the PSTN.
    pub trunks: Vec<TrunkConfig>,
    /// Users of the built-in user store.
    pub users: Vec<UserConfig>,
}

/// `[sip]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Default region for numbers without a `+` (ISO 3166 code, e.g. `US`).
    pub default_region: String,
    /// SIP timer T1 in milliseconds (RFC 3261 round-trip estimate; 64*T1 is the
    /// transaction timeout). Lower it only on networks known to be fast.
    pub t1_ms: u64,
    /// Whether BYE, re-INVITE, ACK and CANCEL in a gateway's dialog must come from the
    /// address the dialog's INVITE came from (besides carrying both dialog tags). Turn it
    /// off only for gateways behind load balancers that spread a dialog over addresses.
    pub dialog_source_check: bool,
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
    /// Latch a leg's media onto the first source whatever its IP address (SIP peers
    /// behind NAT). By default only a source with the IP address the peer's SDP gave may
    /// latch (its port may differ), so a third party cannot take a call's media by
    /// sending first.
    pub latch_any_source: bool,
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

/// `[[trunks]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    /// Name (used in logs, metrics and CDRs).
    pub name: String,
    /// SIP address of the trunk (UDP).
    pub address: SocketAddr,
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
            relay: RelayConfig::default(),
            calls: CallsConfig::default(),
            address_book: AddressBookConfig::default(),
            trunks: Vec::new(),
            users: Vec::new(),
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
            latch_any_source: false,
        }
    }
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            ring_timeout_secs: 60,
            media_timeout_secs: 60,
            offer_ack_timeout_ms: 3000,
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
            }],
            users,
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
        if !self.demo && self.http.admin_token.as_deref().is_none_or(str::is_empty) {
            return Err(bad("http.admin_token", "required unless demo = true"));
        }
        for (i, t) in self.trunks.iter().enumerate() {
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
        if !(10..=5000).contains(&self.sip.t1_ms) {
            return Err(bad("sip.t1_ms", "must be between 10 and 5000"));
        }
        if self.calls.ring_timeout_secs == 0 {
            return Err(bad("calls.ring_timeout_secs", "must be at least 1"));
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
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../parley.example.toml");
        let cfg = Config::parse(text, Path::new("parley.example.toml")).unwrap();
        assert_eq!(cfg.users.len(), 3);
        assert_eq!(cfg.trunks[0].name, "pstn");
    }
}
