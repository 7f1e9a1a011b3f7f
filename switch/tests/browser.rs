//! The web client in a real browser: Debian's Chromium, headless, driven by Playwright
//! (`tests/browser/driver.py`, PyPI `playwright`), fake microphone, against a node on
//! loopback; SIPp plays the gateway with PCMU media. `.ci/test` installs both; without
//! them these tests fail, naming what is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Node, scenario, sipp_uac};
use serde_json::{Value, json};

/// One headless Chromium with one page.
struct Chromium {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: std::path::PathBuf,
}

impl Chromium {
    fn start(dir: &std::path::Path) -> Chromium {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/driver.py");
        let log = dir.join("chromium.log");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("python3 is needed for the browser tests");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut c = Chromium {
            child,
            stdin,
            stdout,
            log,
        };
        let ready = c.read();
        assert_eq!(
            ready["ready"],
            true,
            "Chromium or Playwright is missing (apt-get install chromium; pip install playwright): {ready}\n{}",
            c.log()
        );
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| json!({ "ok": false, "error": line }))
    }

    /// Runs one command; panics (with the browser's console) unless it worked.
    fn ok(&mut self, cmd: Value) -> Value {
        let r = self.run(&cmd);
        assert_eq!(r["ok"], true, "{cmd} -> {r}\n{}", self.log());
        r
    }

    fn run(&mut self, cmd: &Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.read()
    }

    fn eval(&mut self, js: &str) -> Value {
        self.ok(json!({ "cmd": "eval", "js": js }))["value"].clone()
    }

    /// Polls `js` until `pred` holds on its value (15 s at most).
    fn eval_until(&mut self, js: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.eval(js);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{js} stayed {v}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn sign_in(&mut self, node: &Node, user: &str, password: &str) {
        self.ok(json!({"cmd": "open", "url": node.web}));
        self.ok(json!({"cmd": "fill", "selector": "#tenant", "value": "demo"}));
        self.ok(json!({"cmd": "fill", "selector": "#user", "value": user}));
        self.ok(json!({"cmd": "fill", "selector": "#password", "value": password}));
        self.ok(json!({"cmd": "click", "selector": "#signin-button"}));
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, r#"{{"cmd":"quit"}}"#);
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const STATS: &str = "() => window.parleyMediaStats()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_rings_answers_a_gateway_call_and_talks_both_ways() {
    let node = Node::start();
    let mut page = tokio::task::block_in_place(|| Chromium::start(node.dir.path()));

    tokio::task::block_in_place(|| {
        // A wrong password is refused on the page, nothing else happens.
        page.sign_in(&node, "alice", "wrong");
        page.ok(json!({"cmd": "wait", "selector": "#signin-error", "text": "password"}));
        page.sign_in(&node, "alice", "demo");
        page.ok(json!({"cmd": "wait", "selector": "#me-number", "text": "+15550100001"}));
        // The page's peer connection: ICE-lite and DTLS with the node.
        page.eval_until(STATS, |s| s["state"] == "connected");
    });
    assert_eq!(
        node.metric("parley_webrtc_connections_total{result=\"connected\""),
        1.0
    );

    // The gateway calls alice with 6 s of PCMU; the page rings, the test answers.
    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    let sipp = tokio::spawn(sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &["-d", "6000"],
    ));
    let (before, during) = tokio::task::block_in_place(|| {
        page.ok(json!({"cmd": "wait", "selector": "#ring-from", "text": "+15557770001"}));
        page.ok(json!({"cmd": "screenshot", "path": node.dir.path().join("ringing.png")}));
        let before = page.eval(STATS);
        page.ok(json!({"cmd": "click", "selector": "#answer"}));
        page.ok(json!({"cmd": "wait", "selector": "#call-state", "text": "Connected"}));
        // SIPp's audio arrives in the page, and the page's microphone goes out.
        let during = page.eval_until(STATS, |s| {
            s["inbound"].as_u64().unwrap() >= before["inbound"].as_u64().unwrap() + 50
                && s["outbound"].as_u64().unwrap() >= before["outbound"].as_u64().unwrap() + 50
        });
        page.ok(json!({"cmd": "screenshot", "path": node.dir.path().join("in-call.png")}));
        (before, during)
    });
    let run = sipp.await.unwrap();
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert_eq!((run.successful, run.failed), (1, 0));

    // SIPp hung up: the page is back, with the call in its history and the caller in
    // its book.
    tokio::task::block_in_place(|| {
        page.eval_until("() => document.getElementById('incall').hidden", |v| {
            *v == json!(true)
        });
        page.ok(json!({"cmd": "wait", "selector": "#history", "text": "SIPp Gateway"}));
        page.ok(json!({"cmd": "wait", "selector": "#book", "text": "SIPp Gateway"}));
        page.ok(json!({"cmd": "screenshot", "path": node.dir.path().join("after.png")}));
    });
    let cdrs = node.wait_cdrs(1);
    let c = &cdrs[0];
    assert_eq!(c["disposition"], "ANSWERED", "{c}");
    assert_eq!(c["route"], "im", "{c}");
    // Both directions crossed the relay: SIPp → browser and browser → SIPp.
    assert!(c["packets_in"].as_i64().unwrap() >= 50, "{c}");
    assert!(c["packets_out"].as_i64().unwrap() >= 50, "{c}");
    assert!(node.metric("parley_webrtc_packets_total{direction=\"to_browser\"") >= 50.0);
    assert!(node.metric("parley_webrtc_packets_total{direction=\"from_browser\"") >= 50.0);
    assert!(
        during["inbound"].as_u64().unwrap() > before["inbound"].as_u64().unwrap(),
        "{before} {during}"
    );
    if let Ok(dir) = std::env::var("PARLEY_SCREENSHOTS") {
        for f in ["ringing.png", "in-call.png", "after.png"] {
            let _ = std::fs::copy(node.dir.path().join(f), std::path::Path::new(&dir).join(f));
        }
    }
}

/// Hides the page as a browser does for a background tab.
const HIDE: &str = "() => { for (const [k, v] of [['hidden', true], ['visibilityState', 'hidden']]) \
    Object.defineProperty(document, k, { configurable: true, get: () => v }); \
    document.dispatchEvent(new Event('visibilitychange')); return true; }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_chats_and_talks_with_a_quic_device_and_a_hidden_tab_stops_ringing() {
    let node = Node::start();
    let mut bob = node.device(node.device_config("bob", "desk")).await;
    let mut page = tokio::task::block_in_place(|| Chromium::start(node.dir.path()));
    tokio::task::block_in_place(|| {
        page.sign_in(&node, "alice", "demo");
        page.ok(json!({"cmd": "wait", "selector": "#me-number", "text": "+15550100001"}));
        page.eval_until(STATS, |s| s["state"] == "connected");
    });

    // bob writes; the conversation opens in the page; alice answers from the page.
    bob.send(parley_codecs::control::ClientMsg::Chat {
        to: "alice".into(),
        text: "lunch at noon?".into(),
        id: 1,
    })
    .await
    .unwrap();
    tokio::task::block_in_place(|| {
        page.ok(json!({"cmd": "wait", "selector": "#messages", "text": "lunch at noon?"}));
        page.ok(json!({"cmd": "fill", "selector": "#chat-text", "value": "yes, see you"}));
        page.ok(json!({"cmd": "click", "selector": "#chat-send"}));
    });
    let reply = bob
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, parley_codecs::control::ServerMsg::Chat { text, .. } if text == "yes, see you")
        })
        .await;
    assert!(reply.is_some(), "bob's device did not get the page's reply");

    // The page dials bob; his device answers and echoes what it hears: the page hears
    // its own microphone back, through the relay, both ways.
    let before = tokio::task::block_in_place(|| {
        let before = page.eval(STATS);
        page.ok(json!({"cmd": "fill", "selector": "#dial-to", "value": "bob"}));
        page.ok(json!({"cmd": "click", "selector": "#dial-button"}));
        page.ok(json!({"cmd": "wait", "selector": "#call-state", "text": "Connected"}));
        page.eval_until(STATS, |s| {
            s["inbound"].as_u64().unwrap() >= before["inbound"].as_u64().unwrap() + 50
        });
        page.ok(json!({"cmd": "click", "selector": "#hangup"}));
        page.eval_until("() => document.getElementById('incall').hidden", |v| {
            *v == json!(true)
        });
        before
    });
    let stats = bob.stats().snapshot();
    assert!(
        stats.rtp_received >= 50,
        "bob's device got {stats} ({before})"
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{cdrs:?}");
    assert_eq!(cdrs[0]["user"], "bob", "{cdrs:?}");
    assert_eq!(cdrs[0]["answered_by"], "desk", "{cdrs:?}");
    tokio::task::block_in_place(|| {
        page.ok(json!({"cmd": "wait", "selector": "#history", "text": "+15550100002"}));
    });

    // alice also has a desk phone; her page goes to the background: away. A gateway
    // call for her rings the desk (available beats away), not the page.
    let _desk = node.device(node.device_config("alice", "desk")).await;
    tokio::task::block_in_place(|| {
        page.eval(HIDE);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, presence) = node.get("/api/v1/users/alice/presence", true);
            if presence.contains("\"away\"") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hidden page never went away: {presence}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &["-d", "1000"],
    )
    .await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    let cdrs = node.wait_cdrs(2);
    let gw = cdrs
        .iter()
        .find(|c| c["user"] == "alice")
        .expect("alice's CDR");
    assert_eq!(gw["answered_by"], "desk", "{gw}");
    let rang =
        tokio::task::block_in_place(|| page.eval("() => document.getElementById('ring').hidden"));
    assert_eq!(rang, json!(true), "the hidden page rang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_call_each_other() {
    let node = Node::start();
    let (mut alice, mut bob) = tokio::task::block_in_place(|| {
        let mut alice = Chromium::start(node.dir.path());
        let mut bob = Chromium::start(&node.dir.path().join("data"));
        for (page, user, number) in [
            (&mut alice, "alice", "+15550100001"),
            (&mut bob, "bob", "+15550100002"),
        ] {
            page.sign_in(&node, user, "demo");
            page.ok(json!({"cmd": "wait", "selector": "#me-number", "text": number}));
            page.eval_until(STATS, |s| s["state"] == "connected");
        }
        (alice, bob)
    });
    tokio::task::block_in_place(|| {
        let a0 = alice.eval(STATS);
        let b0 = bob.eval(STATS);
        alice.ok(json!({"cmd": "fill", "selector": "#dial-to", "value": "+15550100002"}));
        alice.ok(json!({"cmd": "click", "selector": "#dial-button"}));
        bob.ok(json!({"cmd": "wait", "selector": "#ring-from", "text": "+15550100001"}));
        bob.ok(json!({"cmd": "click", "selector": "#answer"}));
        alice.ok(json!({"cmd": "wait", "selector": "#call-state", "text": "Connected"}));
        bob.ok(json!({"cmd": "wait", "selector": "#call-state", "text": "Connected"}));
        // Each page hears the other's microphone.
        alice.eval_until(STATS, |s| {
            s["inbound"].as_u64().unwrap() >= a0["inbound"].as_u64().unwrap() + 50
        });
        bob.eval_until(STATS, |s| {
            s["inbound"].as_u64().unwrap() >= b0["inbound"].as_u64().unwrap() + 50
        });
        // alice's tab goes away mid-call (the WebSocket and the peer connection close):
        // the call ends for bob, with its CDR.
        alice.ok(json!({"cmd": "open", "url": "about:blank"}));
        bob.eval_until("() => document.getElementById('incall').hidden", |v| {
            *v == json!(true)
        });
    });
    let cdrs = node.wait_cdrs(1);
    let c = &cdrs[0];
    assert_eq!(c["disposition"], "ANSWERED", "{c}");
    assert_eq!(c["user"], "bob", "{c}");
    assert!(c["packets_in"].as_i64().unwrap() >= 50, "{c}");
    assert!(c["packets_out"].as_i64().unwrap() >= 50, "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_web_client_is_https_and_the_socket_wss() {
    // A certificate of the node's own (self-signed here; the browser is told to take it).
    let certs = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (
        certs.path().join("web.pem"),
        certs.path().join("web-key.pem"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let node = Node::start_with_tail(
        "",
        "",
        "",
        200,
        &format!(
            "[web]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    assert!(node.web.starts_with("https://127.0.0.1:"), "{}", node.web);
    // Plain HTTP is not served there.
    let host = node
        .web
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("200 OK"));

    let mut page = tokio::task::block_in_place(|| Chromium::start(node.dir.path()));
    tokio::task::block_in_place(|| {
        page.sign_in(&node, "alice", "demo");
        page.ok(json!({"cmd": "wait", "selector": "#me-number", "text": "+15550100001"}));
        assert_eq!(page.eval("() => location.protocol"), json!("https:"));
        page.eval_until(STATS, |s| s["state"] == "connected");
    });
    assert!(node.log().contains("transport=websocket"), "{}", node.log());
}
