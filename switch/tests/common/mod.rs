//! Test harness: a real `parley` process on loopback with its own ports and data
//! directory, SIPp processes as gateways and trunks, `parley-load` devices.
//!
//! Peers are required: a missing `sipp` fails the test loudly (CI installs it).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parley_load::device::{Device, DeviceConfig, MediaMode};

pub mod ldap;
pub mod pg;

/// Which database a test's node stores into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// `parley.db` in the node's data directory (the default).
    Sqlite,
    /// A fresh database on a PostgreSQL server ([`pg::database`]).
    Postgres,
}

impl StoreKind {
    /// The `[store]` section for this kind, and what keeps its database alive.
    fn section(self) -> (String, Option<pg::TestPostgres>) {
        match self {
            StoreKind::Sqlite => (String::new(), None),
            StoreKind::Postgres => {
                // Its own thread and runtime: callable from sync and async tests alike.
                let db = std::thread::spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(pg::database())
                })
                .join()
                .unwrap_or_else(|_| panic!("no PostgreSQL database for the test"));
                (format!("\n[store]\nurl = \"{}\"\n", db.url), Some(db))
            }
        }
    }
}

/// Runs a test on both stores: `NAME::sqlite` and `NAME::postgres`, the body getting
/// the [`StoreKind`] to start its node with.
#[macro_export]
macro_rules! both_stores {
    ($(#[doc = $doc:expr])* #[test] fn $name:ident($store:ident) $body:block) => {
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($store: $crate::common::StoreKind) $body

            #[test]
            fn sqlite() {
                run($crate::common::StoreKind::Sqlite)
            }

            #[test]
            fn postgres() {
                run($crate::common::StoreKind::Postgres)
            }
        }
    };
    ($(#[doc = $doc:expr])* #[tokio::test $($args:tt)*] async fn $name:ident($store:ident) $body:block) => {
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($store: $crate::common::StoreKind) $body

            #[tokio::test $($args)*]
            async fn sqlite() {
                run($crate::common::StoreKind::Sqlite).await
            }

            #[tokio::test $($args)*]
            async fn postgres() {
                run($crate::common::StoreKind::Postgres).await
            }
        }
    };
}

/// Test ports come from below the kernel's ephemeral range (32768–60999 here): a port
/// the kernel hands out for some process's `bind(0)` or `connect` can never be one a test
/// reserved, and a reserved port is not free for the kernel to hand out. Between tests
/// (nextest runs each in its own process) a reservation is an exclusive lock on
/// `$TMPDIR/parley-test-ports/PORT`, held until the process ends; the lock goes with
/// the process, so a killed test leaves nothing behind.
const SINGLE_PORTS: std::ops::Range<u16> = 10_000..14_000;
/// Blocks (relay ranges, SIPp media) start at a multiple of 100 in this range.
const BLOCK_PORTS: std::ops::Range<u16> = 14_000..32_700;

/// Holds the locks of every port this process reserved.
static RESERVED: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());

/// Reserves `port..port + n` when every port is free of other tests' reservations and
/// binds on loopback (UDP and TCP); `false` leaves nothing reserved.
fn reserve(port: u16, n: u16) -> bool {
    let dir = std::env::temp_dir().join("parley-test-ports");
    std::fs::create_dir_all(&dir).expect("port lock directory");
    let mut locks = Vec::new();
    for p in port..port + n {
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(p.to_string()))
        else {
            return false;
        };
        let free = file.try_lock().is_ok()
            && UdpSocket::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !free {
            return false;
        }
        locks.push(file);
    }
    RESERVED.lock().unwrap().extend(locks);
    true
}

/// A UDP (or TCP) port on loopback reserved for this test process (see [`SINGLE_PORTS`]).
pub fn free_udp_port() -> u16 {
    for _ in 0..1000 {
        let port = SINGLE_PORTS.start + rand_u16() % (SINGLE_PORTS.end - SINGLE_PORTS.start);
        if reserve(port, 1) {
            return port;
        }
    }
    panic!("no free test port in {SINGLE_PORTS:?}");
}

/// A base port with `n` consecutive ports after it reserved for this test process (for
/// relay ranges and SIPp media ports; see [`BLOCK_PORTS`]).
pub fn free_port_block(n: u16) -> u16 {
    let slots = (BLOCK_PORTS.end - BLOCK_PORTS.start - n) / 100;
    for _ in 0..1000 {
        let base = BLOCK_PORTS.start + (rand_u16() % slots) * 100;
        if reserve(base, n) {
            return base;
        }
    }
    panic!("no free block of {n} test ports in {BLOCK_PORTS:?}");
}

fn rand_u16() -> u16 {
    rand::random::<u16>()
}

/// A running node.
pub struct Node {
    child: Child,
    pub dir: tempfile::TempDir,
    pub sip: SocketAddr,
    /// SIP over TCP, when the configuration turned it on.
    #[allow(dead_code)]
    pub sip_tcp: Option<SocketAddr>,
    /// SIP over TLS, when the configuration turned it on.
    #[allow(dead_code)]
    pub sip_tls: Option<SocketAddr>,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    /// The auth agent endpoint, when `[federation] listen` is set.
    pub agents: Option<SocketAddr>,
    pub trunk: SocketAddr,
    pub token: String,
    /// The web client's URL (`http://127.0.0.1:PORT/`).
    #[allow(dead_code)]
    pub web: String,
    /// The PostgreSQL database of a [`StoreKind::Postgres`] node (dropped after the node).
    pg: Option<pg::TestPostgres>,
}

impl Node {
    /// Starts a node with the demo users; `trunk` is where it sends PSTN calls.
    pub fn start() -> Node {
        Self::start_with("")
    }

    /// Starts a node with extra keys in its `[sip]` section.
    pub fn start_with(sip_extra: &str) -> Node {
        Self::start_configured(sip_extra, "")
    }

    /// Starts a node with extra keys in its `[sip]` and `[[trunks]]` sections.
    pub fn start_configured(sip_extra: &str, trunk_extra: &str) -> Node {
        Self::start_full(sip_extra, trunk_extra, "")
    }

    /// Starts a node with extra keys in its `[sip]`, `[[trunks]]` and `[calls]` sections.
    pub fn start_full(sip_extra: &str, trunk_extra: &str, calls_extra: &str) -> Node {
        Self::start_with_relay_ports(sip_extra, trunk_extra, calls_extra, 200)
    }

    /// As [`Node::start_full`], with a relay range of `relay_ports` ports (an even number:
    /// `relay_ports / 2` call legs).
    pub fn start_with_relay_ports(
        sip_extra: &str,
        trunk_extra: &str,
        calls_extra: &str,
        relay_ports: u16,
    ) -> Node {
        Self::start_with_tail(sip_extra, trunk_extra, calls_extra, relay_ports, "")
    }

    /// A node with its auth agent endpoint on (`[federation]`, with `extra` keys there;
    /// on a free port unless `extra` sets `listen`).
    pub fn start_federated(extra: &str) -> Node {
        Self::start_with_tail(
            "",
            "",
            "",
            200,
            &if extra.contains("listen") {
                format!("[federation]\n{extra}\n")
            } else {
                format!("[federation]\nlisten = \"127.0.0.1:0\"\n{extra}\n")
            },
        )
    }

    /// As [`Node::start_with_relay_ports`], with `tail` appended to the configuration.
    pub fn start_with_tail(
        sip_extra: &str,
        trunk_extra: &str,
        calls_extra: &str,
        relay_ports: u16,
        tail: &str,
    ) -> Node {
        Self::start_on(
            StoreKind::Sqlite,
            [sip_extra, trunk_extra, calls_extra, tail],
            relay_ports,
        )
    }

    /// A node storing into `store` with alice and bob (tenant demo) and olga
    /// +15550100009 of tenant `other`.
    pub fn start_with_olga(store: StoreKind) -> Node {
        Self::start_on(
            store,
            [
                "",
                "",
                "",
                "[[users]]\ntenant = \"other\"\nuser = \"olga\"\nnumber = \"+15550100009\"\npassword = \"demo\"\n",
            ],
            200,
        )
    }

    /// A node storing into `store`, with extra keys in its `[sip]`, `[[trunks]]` and
    /// `[calls]` sections and a tail of configuration (`extra`, in that order).
    pub fn start_on(store: StoreKind, extra: [&str; 4], relay_ports: u16) -> Node {
        Self::start_on_relay(store, extra, relay_ports, "")
    }

    /// As [`Node::start_on`], with extra keys in its `[relay]` section.
    pub fn start_on_relay(
        store: StoreKind,
        extra: [&str; 4],
        relay_ports: u16,
        relay_extra: &str,
    ) -> Node {
        let [sip_extra, trunk_extra, calls_extra, tail] = extra;
        let (store_section, pg) = store.section();
        let dir = tempfile::tempdir().expect("tempdir");
        let trunk_port = free_udp_port();
        let relay = free_port_block(relay_ports);
        let token = "test-token-0123456789".to_owned();
        let cfg = format!(
            r#"
data_dir = "{data}"
[sip]
listen = "127.0.0.1:0"
{sip_extra}
[calls]
{calls_extra}
[quic]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
admin_token = "{token}"
{web_section}
[relay]
port_min = {relay}
port_max = {relay_max}
{relay_extra}
[[trunks]]
name = "pstn"
address = "127.0.0.1:{trunk_port}"
{trunk_extra}
[[users]]
tenant = "demo"
user = "alice"
number = "+15550100001"
password = "demo"
[[users]]
tenant = "demo"
user = "bob"
number = "+15550100002"
password = "demo"
{tail}
{store_section}
"#,
            data = dir.path().join("data").display(),
            relay_max = relay + relay_ports - 1,
            // A tail with its own `[web]` says where it listens.
            web_section = if tail.contains("[web]") {
                ""
            } else {
                "[web]\nlisten = \"127.0.0.1:0\""
            },
        );
        let cfg_path = dir.path().join("parley.toml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let mut node = Self::spawn(dir, trunk_port, token);
        if pg.is_some() {
            // The node stores into PostgreSQL, not a file beside it.
            assert!(
                !node.data_dir().join("parley.db").exists(),
                "a node with [store] url made parley.db"
            );
            assert!(node.log().contains("store=postgres://"), "{}", node.log());
        }
        node.pg = pg;
        node
    }

    /// Starts `parley run` on the configuration in `dir` and waits for its `node.json`.
    fn spawn(dir: tempfile::TempDir, trunk_port: u16, token: String) -> Node {
        let cfg_path = dir.path().join("parley.toml");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("node.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["run", "--config"])
            .arg(&cfg_path)
            .env("PARLEY_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn parley");
        let info = dir.path().join("data").join("node.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut child = child;
        let json = loop {
            if let Ok(s) = std::fs::read_to_string(&info)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&s)
            {
                break v;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "parley exited early ({status}):\n{}",
                    std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "node did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let addr = |k: &str| json[k].as_str().unwrap().parse().unwrap();
        Node {
            agents: json["agents"].as_str().and_then(|s| s.parse().ok()),
            sip: addr("sip"),
            sip_tcp: json["sip_tcp"].as_str().and_then(|s| s.parse().ok()),
            sip_tls: json["sip_tls"].as_str().and_then(|s| s.parse().ok()),
            quic: addr("quic"),
            http: addr("http"),
            web: json["web"].as_str().unwrap_or_default().to_owned(),
            trunk: ([127, 0, 0, 1], trunk_port).into(),
            child,
            dir,
            token,
            pg: None,
        }
    }

    /// Kills the node with SIGKILL (no drain, nothing flushed, `node.json` left behind)
    /// and starts it again on the same data directory and configuration.
    #[allow(dead_code)]
    pub fn crash_and_restart(mut self) -> Node {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.data_dir().join("node.json"));
        // Move the directory out: `Node`'s Drop only kills the (dead) child.
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let (trunk_port, token) = (self.trunk.port(), self.token.clone());
        let pg = self.pg.take();
        drop(self);
        let mut node = Self::spawn(dir, trunk_port, token);
        node.pg = pg;
        node
    }

    /// Kills the node with SIGKILL and waits for it (start it again with
    /// [`Node::crash_and_restart`]).
    #[allow(dead_code)]
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The node process's resident memory, KiB (`VmRSS`).
    #[allow(dead_code)]
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// GET a path; returns (status, body).
    pub fn get(&self, path: &str, auth: bool) -> (u16, String) {
        self.http_request("GET", path, None, auth)
    }

    /// PUT a JSON body with the admin token; returns (status, body).
    pub fn put(&self, path: &str, body: &str) -> (u16, String) {
        self.http_request("PUT", path, Some(body), true)
    }

    /// POST a JSON body, with the admin token when `auth`; returns (status, body).
    pub fn post(&self, path: &str, body: &str, auth: bool) -> (u16, String) {
        self.http_request("POST", path, Some(body), auth)
    }

    /// Any request; returns (status, body).
    pub fn request(&self, method: &str, path: &str, body: &str, auth: bool) -> (u16, String) {
        self.http_request(method, path, Some(body), auth)
    }

    fn http_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        auth: bool,
    ) -> (u16, String) {
        let (status, _, body) = self.http_request_full(method, path, body, auth);
        (status, body)
    }

    /// GET with the admin token; returns (status, response head, body).
    #[allow(dead_code)]
    pub fn get_full(&self, path: &str) -> (u16, String, String) {
        self.http_request_full("GET", path, None, true)
    }

    fn http_request_full(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        auth: bool,
    ) -> (u16, String, String) {
        let mut s = TcpStream::connect(self.http).expect("connect http");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let auth = if auth {
            format!("Authorization: Bearer {}\r\n", self.token)
        } else {
            String::new()
        };
        let body = body.unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .map(|(h, b)| (h.to_owned(), b.to_owned()))
            .unwrap_or_default();
        (status, head, dechunk(&body))
    }

    pub fn cdrs(&self) -> Vec<serde_json::Value> {
        let (st, body) = self.get("/api/v1/cdrs", true);
        assert_eq!(st, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// Waits until `n` CDRs exist (CDRs are written asynchronously after the call ends).
    pub fn wait_cdrs(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = self.cdrs();
            if c.len() >= n || Instant::now() > deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn address_book(&self, user: &str) -> Vec<serde_json::Value> {
        let (st, body) = self.get(&format!("/api/v1/users/{user}/address-book"), true);
        assert_eq!(st, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Sum of a metric's samples whose line starts with `prefix` (name plus optional labels).
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, body) = self.get("/metrics", false);
        body.lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn cert(&self) -> Vec<u8> {
        std::fs::read(self.data_dir().join("quic-cert.der")).unwrap()
    }

    /// A raw QUIC connection to the node (handshake done, nothing sent).
    #[allow(dead_code)]
    pub async fn quic_connection(&self) -> Result<quinn::Connection, quinn::ConnectionError> {
        let endpoint = parley_load::device::client_endpoint(self.quic).expect("client endpoint");
        endpoint
            .connect_with(
                parley_load::device::client_config(&self.cert()).expect("client config"),
                self.quic,
                "localhost",
            )
            .expect("connect")
            .await
    }

    pub fn device_config(&self, user: &str, device: &str) -> DeviceConfig {
        DeviceConfig {
            target: self.quic,
            cert_der: self.cert(),
            tenant: "demo".into(),
            user: user.into(),
            password: "demo".into(),
            device: device.into(),
            answer_after: Some(Duration::from_millis(50)),
            reject: false,
            hangup_after: None,
            media: MediaMode::Echo,
        }
    }

    pub async fn device(&self, cfg: DeviceConfig) -> Device {
        Device::connect(cfg)
            .await
            .unwrap_or_else(|e| panic!("device login failed: {e}\n{}", self.log()))
    }

    /// Sends SIGTERM, waits for the exit, and returns it with the node's whole log.
    #[allow(dead_code)]
    pub fn stop_with_log(mut self) -> (std::process::ExitStatus, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            assert!(Instant::now() < deadline, "node did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, self.log())
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(Instant::now() < deadline, "node did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(body: &str) -> String {
    // axum answers with chunked encoding when it does not know the length in advance.
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, tail)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 {
            return out;
        }
        if tail.len() < n {
            return body.to_owned();
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
}

/// The `sipp` binary; panics (fails the test) if it is not installed.
pub fn sipp_bin() -> &'static str {
    let ok = Command::new("sipp")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "sipp is required for this test (Debian package sip-tester; .ci/run installs it)"
    );
    "sipp"
}

/// A scenario from tests/sipp with @RTPFILE@ replaced; returns its path in `dir`.
pub fn scenario(dir: &Path, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sipp")
        .join(name);
    let ulaw = dir.join("tone.ulaw");
    if !ulaw.exists() {
        std::fs::write(
            &ulaw,
            parley_codecs::g711::tone(parley_codecs::g711::PT_PCMU, 440.0, 4.0),
        )
        .unwrap();
    }
    let text = std::fs::read_to_string(src)
        .unwrap()
        .replace("@RTPFILE@", ulaw.to_str().unwrap());
    let out = dir.join(name);
    std::fs::write(&out, text).unwrap();
    out
}

/// Writes a pcap (Ethernet, IPv4, UDP) of `packets` VP8 RTP packets (payload type 96,
/// 30 a second, one packet a frame) for SIPp's `play_pcap_video`, with an RTCP PLI (a
/// keyframe request, on the same port) in place of every 40th. The frames are not a
/// decodable picture: they are RTP a relay must carry, counted at the far end.
pub fn vp8_pcap(path: &Path, packets: u16) {
    let mut out = Vec::new();
    // Global header: magic, version 2.4, zone, accuracy, snap length, Ethernet.
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for i in 0..packets {
        let mut rtp = vec![0u8; 12];
        if i % 40 == 39 {
            rtp = vec![0x81, 206, 0, 2, 0x5e, 0xed, 0, 1, 0, 0, 0, 0];
        } else {
            parley_codecs::rtp::write_header(
                (&mut rtp[..12]).try_into().unwrap(),
                96,
                true,
                i,
                u32::from(i) * 3000,
                0x5eed_0001,
            );
            // VP8 payload descriptor (start of partition), then filler.
            rtp.push(0x10);
            rtp.extend_from_slice(&[0x9d; 200]);
        }
        let udp_len = 8 + rtp.len();
        let ip_len = 20 + udp_len;
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1,
        ];
        ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        let sum = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum::<u32>();
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&6002u16.to_be_bytes());
        frame.extend_from_slice(&6002u16.to_be_bytes());
        frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&rtp);
        let micros = u32::from(i) * 33_333;
        out.extend_from_slice(&(micros / 1_000_000).to_le_bytes());
        out.extend_from_slice(&(micros % 1_000_000).to_le_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&frame);
    }
    std::fs::write(path, out).unwrap();
}

/// Result of one SIPp run.
pub struct SippRun {
    pub code: i32,
    pub successful: u64,
    pub failed: u64,
    pub output: String,
}

/// Runs a SIPp UAC to completion (bounded by `-timeout`).
///
/// The command is built now; the returned future owns it, so a test can also
/// `tokio::spawn` it and act on the call while SIPp runs.
pub fn sipp_uac(
    node: &Node,
    scenario_args: &[&str],
    number: &str,
    calls: u32,
    rate: u32,
    extra: &[&str],
) -> impl std::future::Future<Output = SippRun> + Send + use<> {
    sipp_uac_to(node, node.sip, scenario_args, number, calls, rate, extra)
}

/// As [`sipp_uac`], toward `target` (the node's TCP listener, with `-t t1` in `extra`).
pub fn sipp_uac_to(
    node: &Node,
    target: SocketAddr,
    scenario_args: &[&str],
    number: &str,
    calls: u32,
    rate: u32,
    extra: &[&str],
) -> impl std::future::Future<Output = SippRun> + Send + use<> {
    let dir = node.dir.path().to_path_buf();
    let port = free_udp_port().to_string();
    let media = free_port_block(40).to_string();
    let stat = dir.join(format!("uac-{port}.csv"));
    let mut cmd = tokio::process::Command::new(sipp_bin());
    cmd.args(scenario_args)
        .arg(target.to_string())
        .args([
            "-s",
            number,
            "-i",
            "127.0.0.1",
            "-p",
            &port,
            "-mp",
            &media,
            "-nostdin",
            "-timeout",
            "60s",
        ])
        .args([
            "-m",
            &calls.to_string(),
            "-r",
            &rate.to_string(),
            "-trace_stat",
            "-stf",
        ])
        .arg(&stat)
        .args(["-fd", "1"])
        .args(extra)
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    async move { run_uac(cmd, stat).await }
}

async fn run_uac(mut cmd: tokio::process::Command, stat: PathBuf) -> SippRun {
    let out = cmd.output().await.expect("run sipp");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (successful, failed) = stat_counts(&stat);
    SippRun {
        code: out.status.code().unwrap_or(-1),
        successful,
        failed,
        output,
    }
}

fn stat_counts(csv: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(csv).unwrap_or_default();
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return (0, 0);
    };
    let Some(last) = lines.last() else {
        return (0, 0);
    };
    let cols: Vec<&str> = header.split(';').collect();
    let vals: Vec<&str> = last.split(';').collect();
    let get = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .and_then(|i| vals.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("SuccessfulCall(C)"), get("FailedCall(C)"))
}

/// A SIPp UAS acting as the PSTN trunk, echoing media and answering OPTIONS (`-aa`).
pub struct SippUas(Child);

impl SippUas {
    pub fn start(node: &Node, scenario_args: &[&str]) -> SippUas {
        Self::start_on(node, node.trunk.port(), scenario_args)
    }

    /// As [`SippUas::start`], listening on `port` (a second trunk).
    pub fn start_on(node: &Node, port: u16, scenario_args: &[&str]) -> SippUas {
        let media = free_port_block(4).to_string();
        let log = node.dir.path().join(format!("sipp-uas-{port}.log"));
        let child = Command::new(sipp_bin())
            .args(scenario_args)
            .args([
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-mp",
                &media,
                "-rtp_echo",
                "-aa",
                "-nostdin",
                "-timeout",
                "90s",
            ])
            .current_dir(node.dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("sipp log"))
            .spawn()
            .expect("spawn sipp uas");
        std::thread::sleep(Duration::from_millis(300));
        let mut uas = SippUas(child);
        if let Ok(Some(status)) = uas.0.try_wait() {
            panic!(
                "the SIPp UAS on port {port} exited at start ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        uas
    }
}

impl Drop for SippUas {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls a metric until `pred` holds (bounded); returns the last value, also when the
/// deadline passed without it: the caller asserts on it.
#[must_use = "wait_metric returns the last value when its deadline passes: assert on it"]
pub fn wait_metric(node: &Node, prefix: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = node.metric(prefix);
        if pred(v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// user+system CPU a process has used, seconds (`/proc/PID/stat`).
#[allow(dead_code)]
pub fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command: state is 0, utime 11, stime 12 (clock ticks of 1/100 s).
    (ticks(11) + ticks(12)) / 100.0
}

/// The `parley-load` binary next to the test's `parley` binary (the workspace builds
/// both); fails loudly if it is missing.
#[allow(dead_code)]
pub fn parley_load_bin() -> PathBuf {
    let parley = PathBuf::from(env!("CARGO_BIN_EXE_parley"));
    let load = parley.with_file_name("parley-load");
    assert!(
        load.exists(),
        "{} missing: build the workspace first",
        load.display()
    );
    load
}

/// The header of the generic CDR files the tests write, and the import request that maps
/// its columns (the body: this header and rows).
pub const GENERIC_CDR_HEADER: &str = "Call Ref,Caller,Callee,Started (epoch),Seconds,Billed\n";
/// See [`GENERIC_CDR_HEADER`].
pub const GENERIC_CDR_IMPORT: &str = "/api/v1/cdrs/import?format=generic&src=Caller&dst=Callee&start=Started%20(epoch)&duration=Seconds&billsec=Billed&id=Call%20Ref";
