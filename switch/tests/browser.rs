//! The web client in a real browser: Debian's Chromium, headless, driven by Playwright
//! (`tests/browser/driver.py`, PyPI `playwright`), fake microphone, against a node on
//! loopback; SIPp plays the gateway with PCMU media. `.ci/test` installs both; without
//! them these tests fail, naming what is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Node, scenario, sipp_uac, wait_metric};
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
        self.sign_in_to(node, "demo", user, password);
    }

    /// Signs `user` (password `demo`) in and waits for the number and the peer connection.
    fn ready(&mut self, node: &Node, user: &str, number: &str) {
        self.sign_in(node, user, "demo");
        self.ok(json!({"cmd": "wait", "selector": "#me-number", "text": number}));
        self.eval_until(STATS, |s| s["state"] == "connected");
    }

    /// Waits until the page rings; panics with both logs if it does not.
    fn rings(&mut self, node: &Node) {
        let r = self.run(&json!({"cmd": "wait", "selector": "#ring"}));
        assert_eq!(
            r["ok"],
            true,
            "the page never rang: {r}\n{}\n{}",
            self.log(),
            node.log()
        );
    }

    /// Waits for the ring from `from`, answers, and waits for the call to connect.
    fn answer(&mut self, from: &str) {
        self.ok(json!({"cmd": "wait", "selector": "#ring-from", "text": from}));
        self.ok(json!({"cmd": "click", "selector": "#answer"}));
        self.ok(json!({"cmd": "wait", "selector": "#call-state", "text": "Connected"}));
    }

    fn sign_in_to(&mut self, node: &Node, tenant: &str, user: &str, password: &str) {
        self.ok(json!({"cmd": "open", "url": node.web}));
        self.ok(json!({"cmd": "fill", "selector": "#tenant", "value": tenant}));
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

/// SIPp calls `number` once with scenario `name` (its media for `ms`), in the background.
fn gateway_call(
    node: &Node,
    name: &str,
    number: &str,
    ms: u32,
) -> tokio::task::JoinHandle<common::SippRun> {
    let sc = scenario(node.dir.path(), name);
    let hold = ms.to_string();
    tokio::spawn(sipp_uac(
        node,
        &["-sf", sc.to_str().unwrap()],
        number,
        1,
        1,
        &["-d", &hold],
    ))
}

/// Polls `user`'s presence (admin API) until it contains `needle` (10 s at most).
fn wait_presence(node: &Node, user: &str, needle: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, presence) = node.get(&format!("/api/v1/users/{user}/presence"), true);
        if presence.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {presence}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Packets since `before` reached `n` both ways.
fn both_ways(before: &Value, now: &Value, n: u64) -> bool {
    let d = |k: &str| now[k].as_u64().unwrap() >= before[k].as_u64().unwrap() + n;
    d("inbound") && d("outbound")
}

/// Clicks the in-call keypad's keys for `digits`.
fn press(page: &mut Chromium, digits: &str) {
    page.ok(json!({"cmd": "click", "selector": "#keypad"}));
    for d in digits.chars() {
        let id = match d {
            '*' => "star".to_owned(),
            '#' => "pound".to_owned(),
            d => d.to_string(),
        };
        page.ok(json!({"cmd": "click", "selector": format!("#dtmf-{id}")}));
        // insertDTMF queues; one key at a time keeps the events apart.
        std::thread::sleep(Duration::from_millis(250));
    }
}

const DTMF_FROM: &str = "parley_webrtc_dtmf_packets_total{direction=\"from_browser\"";
const DTMF_TO: &str = "parley_webrtc_dtmf_packets_total{direction=\"to_browser\"";
const OTHER_CODEC: &str = "parley_webrtc_drops_total{reason=\"other_codec\"";

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
    let sipp = gateway_call(&node, "uac_pcmu.xml", "+15550100001", 6000);
    let (before, during) = tokio::task::block_in_place(|| {
        page.ok(json!({"cmd": "wait", "selector": "#ring-from", "text": "+15557770001"}));
        page.ok(json!({"cmd": "screenshot", "path": node.dir.path().join("ringing.png")}));
        let before = page.eval(STATS);
        page.ok(json!({"cmd": "click", "selector": "#answer"}));
        page.ok(json!({"cmd": "wait", "selector": "#call-state", "text": "Connected"}));
        // SIPp's audio arrives in the page, and the page's microphone goes out.
        let during = page.eval_until(STATS, |s| both_ways(&before, s, 50));
        assert_eq!(
            (&during["outCodec"], &during["inCodec"]),
            (&json!("audio/PCMU"), &json!("audio/PCMU")),
            "{during}"
        );
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
    // The caller's entry in the book dials its number: the node places the call (to the
    // PSTN, where no trunk answers in this test, so it may end at once); hanging up ends
    // it if it is still going.
    tokio::task::block_in_place(|| {
        page.ok(json!({"cmd": "click", "selector": "#book li:has-text('SIPp Gateway') button:has-text('Call')"}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.log().contains("to=+15557770001") {
            assert!(
                Instant::now() < deadline,
                "the entry was not dialled\n{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if page.eval("() => document.getElementById('incall').hidden") != json!(true) {
            let _ = page.run(&json!({"cmd": "click", "selector": "#hangup"}));
        }
        page.eval_until("() => document.getElementById('incall').hidden", |v| {
            *v == json!(true)
        });
    });
    assert!(node.log().contains("device dials"), "{}", node.log());
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
        page.ready(&node, "alice", "+15550100001");
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
        let during = page.eval_until(STATS, |s| {
            s["inbound"].as_u64().unwrap() >= before["inbound"].as_u64().unwrap() + 50
        });
        // bob takes G.711 only: the page sends PCMU although it declared Opus.
        assert_eq!(during["outCodec"], json!("audio/PCMU"), "{during}");
        // The keypad's tones reach bob's device as RFC 4733 events under the call's
        // telephone-event type, and his echo comes back to the page's peer connection.
        press(&mut page, "123");
        let deadline = Instant::now() + Duration::from_secs(10);
        while bob.stats().dtmf_digits() != "123" {
            assert!(
                Instant::now() < deadline,
                "bob's device got DTMF {:?} ({})",
                bob.stats().dtmf_digits(),
                bob.stats().snapshot()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let v = wait_metric(&node, DTMF_TO, |v| v >= 3.0);
        assert!(v >= 3.0, "{v}\n{}", node.log());
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
        wait_presence(
            &node,
            "alice",
            "\"away\"",
            "the hidden page never went away",
        );
    });
    let run = gateway_call(&node, "uac_pcmu.xml", "+15550100001", 1000)
        .await
        .unwrap();
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
            page.ready(&node, user, number);
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
        // Each page hears the other's microphone, in Opus both ways (both declared it):
        // the node passes it through.
        for (page, zero) in [(&mut alice, &a0), (&mut bob, &b0)] {
            let s = page.eval_until(STATS, |s| {
                both_ways(zero, s, 50) && s["outCodec"] == "audio/opus"
            });
            assert_eq!(s["inCodec"], json!("audio/opus"), "{s}");
        }
        // alice's keypad reaches bob's peer connection.
        let (from, to) = (node.metric(DTMF_FROM), node.metric(DTMF_TO));
        press(&mut alice, "9");
        let v = wait_metric(&node, DTMF_FROM, |v| v >= from + 3.0);
        assert!(v >= from + 3.0, "{v}\n{}", node.log());
        let v = wait_metric(&node, DTMF_TO, |v| v >= to + 3.0);
        assert!(v >= to + 3.0, "{v}\n{}", node.log());
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
    assert_eq!(node.metric(OTHER_CODEC), 0.0, "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_declines_and_a_pcma_gateway_call_is_pcma_with_mute_and_the_keypad() {
    let node = Node::start();
    let mut page = tokio::task::block_in_place(|| Chromium::start(node.dir.path()));
    tokio::task::block_in_place(|| {
        page.ready(&node, "alice", "+15550100001");
    });
    // A stranger calls; the page declines: the gateway gets 603, the CDR says so.
    let sc = scenario(node.dir.path(), "uac_603_from.xml");
    let declined = tokio::spawn(sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &["-key", "prefix", "+1555888000"],
    ));
    tokio::task::block_in_place(|| {
        page.ok(json!({"cmd": "wait", "selector": "#ring-from", "text": "+15558880001"}));
        page.ok(json!({"cmd": "click", "selector": "#reject"}));
        page.eval_until("() => document.getElementById('ring').hidden", |v| {
            *v == json!(true)
        });
    });
    let run = declined.await.unwrap();
    assert_eq!(
        run.code,
        0,
        "SIPp did not get its 603:\n{}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "REJECTED", "{cdrs:?}");

    // A gateway that speaks A-law only, with telephone-event at 101.
    let sipp = gateway_call(&node, "uac_pcma.xml", "+15550100001", 2000);
    tokio::task::block_in_place(|| {
        let before = page.eval(STATS);
        page.answer("+15557770001");
        // The page switched its sender to the call's codec: PCMA both ways, no conversion.
        let s = page.eval_until(STATS, |s| {
            both_ways(&before, s, 50) && s["outCodec"] == "audio/PCMA"
        });
        assert_eq!(s["inCodec"], json!("audio/PCMA"), "{s}");
        press(&mut page, "5#");
        let v = wait_metric(&node, DTMF_FROM, |v| v >= 6.0);
        assert!(v >= 6.0, "{v}\n{}", node.log());
        // Mute silences the microphone track, and says so; unmute brings it back.
        const MIC: &str = "() => state.mic.enabled";
        page.ok(json!({"cmd": "click", "selector": "#mute"}));
        page.ok(json!({"cmd": "wait", "selector": "#call-state", "text": "muted"}));
        assert_eq!(page.eval(MIC), json!(false));
        page.ok(json!({"cmd": "click", "selector": "#mute"}));
        assert_eq!(page.eval(MIC), json!(true));
        // The gateway's digit (RFC 4733 at 101, SIPp's dtmf_2833_1.pcap: 10 packets) goes
        // on the page's peer connection under the browser's telephone-event type.
        let v = wait_metric(&node, DTMF_TO, |v| v >= 10.0);
        assert!(v >= 10.0, "{v}\n{}", node.log());
    });
    let run = sipp.await.unwrap();
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    let cdrs = node.wait_cdrs(2);
    let c = cdrs
        .iter()
        .find(|c| c["disposition"] == "ANSWERED")
        .unwrap_or_else(|| panic!("no answered call in {cdrs:?}"));
    assert_eq!(c["disposition"], "ANSWERED", "{c}");
    assert!(c["packets_in"].as_i64().unwrap() >= 50, "{c}");
    // The page's audio and its DTMF crossed to the gateway.
    assert!(
        c["packets_out"].as_f64().unwrap() >= 50.0 + node.metric(DTMF_FROM),
        "{c}"
    );
    assert_eq!(node.metric(OTHER_CODEC), 0.0, "{}", node.log());

    // A second connected call on the same peer connection: another source, its own
    // random sequence numbers; the track continues after the last number it sent, so
    // the browser's SRTP replay check keeps every packet and the page hears it.
    let again = gateway_call(&node, "uac_pcmu.xml", "+15550100001", 3000);
    tokio::task::block_in_place(|| {
        let before = page.eval(STATS);
        page.answer("+15557770001");
        page.eval_until(STATS, |s| {
            both_ways(&before, s, 50) && s["outCodec"] == "audio/PCMU"
        });
    });
    let run = again.await.unwrap();
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
}

/// The page's device name (it makes one up per tab).
const DEVICE: &str = "() => sessionStorage.getItem('parley-device')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_rings_with_a_quic_device_in_parallel_and_in_sequence_and_is_rerouted() {
    use parley_codecs::control::{ClientMsg, ServerMsg};
    const T: Duration = Duration::from_secs(10);
    let node = Node::start();
    let mut desk_cfg = node.device_config("alice", "desk");
    desk_cfg.answer_after = None;
    let mut desk = node.device(desk_cfg).await;
    let mut page = tokio::task::block_in_place(|| Chromium::start(node.dir.path()));
    let web = tokio::task::block_in_place(|| {
        page.ready(&node, "alice", "+15550100001");
        page.eval(DEVICE).as_str().unwrap().to_owned()
    });

    // 1. Both available, no rule: the page and the desk ring in parallel. The page's user
    // goes do-not-disturb while it rings: its offer is withdrawn (re-routed), the desk
    // keeps ringing and answers.
    let call = gateway_call(&node, "uac_pcmu.xml", "+15550100001", 500);
    let offer = desk
        .wait_for(T, |m| matches!(m, ServerMsg::IncomingCall { .. }))
        .await;
    let Some(ServerMsg::IncomingCall { call_id, .. }) = offer else {
        panic!("the desk never rang\n{}", node.log())
    };
    tokio::task::block_in_place(|| {
        page.rings(&node);
        page.ok(
            json!({"cmd": "eval", "js": "() => { const s = document.getElementById('status'); \
            s.value = 'do_not_disturb'; s.dispatchEvent(new Event('change')); return true; }"}),
        );
        page.eval_until("() => document.getElementById('ring').hidden", |v| {
            *v == json!(true)
        });
    });
    desk.send(ClientMsg::Answer { call_id }).await.unwrap();
    let run = call.await.unwrap();
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["answered_by"], "desk", "{cdrs:?}");
    assert_eq!(node.metric("parley_reroutes_total"), 1.0, "{}", node.log());

    // 2. In sequence: alice's rule rings the desk for 2 s, then the page alone; the page
    // answers.
    tokio::task::block_in_place(|| {
        page.ok(
            json!({"cmd": "eval", "js": "() => { const s = document.getElementById('status'); \
            s.value = 'available'; s.dispatchEvent(new Event('change')); return true; }"}),
        );
    });
    let rules = json!({"rules": [{"name": "desk first", "then": {"action": "ring", "steps": [
        {"targets": [{"device": "desk"}], "timeout_secs": 2},
        {"targets": [{"device": web}]}]}}]});
    let (st, body) = node.put("/api/v1/users/alice/preferences", &rules.to_string());
    assert_eq!(st, 200, "{body}");
    let call = gateway_call(&node, "uac_pcmu.xml", "+15550100001", 500);
    let offer = desk
        .wait_for(T, |m| matches!(m, ServerMsg::IncomingCall { .. }))
        .await;
    assert!(offer.is_some(), "the desk never rang first\n{}", node.log());
    // The page does not ring during the first step.
    let first =
        tokio::task::block_in_place(|| page.eval("() => document.getElementById('ring').hidden"));
    assert_eq!(first, json!(true), "the page rang in the desk's step");
    let withdrawn = desk
        .wait_for(T, |m| matches!(m, ServerMsg::CallEnded { .. }))
        .await;
    assert!(
        matches!(withdrawn, Some(ServerMsg::CallEnded { ref reason, .. }) if reason == "rerouted"),
        "{withdrawn:?}"
    );
    tokio::task::block_in_place(|| {
        page.rings(&node);
        page.ok(json!({"cmd": "click", "selector": "#answer"}));
        page.ok(json!({"cmd": "wait", "selector": "#call-state", "text": "Connected"}));
    });
    let run = call.await.unwrap();
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    let cdrs = node.wait_cdrs(2);
    let second = cdrs
        .iter()
        .find(|c| c["answered_by"] == json!(web))
        .unwrap_or_else(|| panic!("the page's answer is not in {cdrs:?}"));
    assert_eq!(second["disposition"], "ANSWERED", "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_user_signs_in_through_the_page() {
    use common::ldap::{Slapd, acme_people, directory_agent};
    let slapd = Slapd::start("acme", &acme_people());
    let node = Node::start_federated("");
    let _agent = directory_agent(&node, &slapd, "acme", "FR", "sync_interval_secs = 0");
    let mut page = tokio::task::block_in_place(|| Chromium::start(node.dir.path()));
    tokio::task::block_in_place(|| {
        // The directory's answers reach the page: a wrong password, a locked account.
        page.sign_in_to(&node, "acme", "alice", "wrong");
        page.ok(json!({"cmd": "wait", "selector": "#signin-error", "text": "password"}));
        page.sign_in_to(&node, "acme", "bob", "bob-pw");
        page.ok(json!({"cmd": "wait", "selector": "#signin-error", "text": "locked"}));
        // The directory's password and number: signed in, the peer connection up.
        page.sign_in_to(&node, "acme", "alice", "alice-pw");
        page.ok(json!({"cmd": "wait", "selector": "#me-number", "text": "+33123456789"}));
        page.ok(json!({"cmd": "wait", "selector": "#me-name", "text": "Alice Martin"}));
        page.eval_until(STATS, |s| s["state"] == "connected");
    });
    // A gateway call to the directory number rings the page.
    let sipp = gateway_call(&node, "uac_pcmu.xml", "+33123456789", 1000);
    tokio::task::block_in_place(|| page.answer("+15557770001"));
    let run = sipp.await.unwrap();
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{cdrs:?}");
    assert_eq!(cdrs[0]["tenant"], "acme", "{cdrs:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_gateway_call_shows_the_gateways_video_and_sends_the_camera() {
    let node = Node::start();
    let mut page = tokio::task::block_in_place(|| Chromium::start(node.dir.path()));
    tokio::task::block_in_place(|| page.ready(&node, "alice", "+15550100001"));
    // The page has a (fake) camera: it declared video, so a video call rings it.
    wait_presence(
        &node,
        "alice",
        "\"video\":true",
        "the page never declared video",
    );
    // A gateway offering VP8, playing 4 s of video RTP.
    let pcap = node.dir.path().join("vp8.pcap");
    common::vp8_pcap(&pcap, 120);
    let sc = scenario(node.dir.path(), "uac_video_media.xml");
    let text = std::fs::read_to_string(&sc)
        .unwrap()
        .replace("@VIDEO_RE@", "m=video [1-9][0-9]* RTP/AVP 96")
        .replace("@VIDEOPCAP@", pcap.to_str().unwrap());
    std::fs::write(&sc, text).unwrap();
    let sipp = tokio::spawn(sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &["-d", "5000"],
    ));
    tokio::task::block_in_place(|| {
        page.ok(json!({"cmd": "wait", "selector": "#ring-detail", "text": "video"}));
        let before = page.eval(STATS);
        page.answer("+15557770005");
        page.ok(json!({"cmd": "wait", "selector": "#video-view"}));
        // The gateway's video reaches the page's video track; the camera goes out.
        let gained =
            |s: &Value, k: &str, n: u64| s[k].as_u64().unwrap() >= before[k].as_u64().unwrap() + n;
        let s = page.eval_until(STATS, |s| {
            gained(s, "videoIn", 30) && gained(s, "videoOut", 30)
        });
        assert!(gained(&s, "outbound", 20), "{s}");
        page.ok(json!({"cmd": "click", "selector": "#keypad"}));
        page.ok(json!({"cmd": "screenshot", "path": node.dir.path().join("video-call.png")}));
    });
    if let Ok(dir) = std::env::var("PARLEY_SCREENSHOTS") {
        let _ = std::fs::copy(
            node.dir.path().join("video-call.png"),
            std::path::Path::new(&dir).join("video-call.png"),
        );
    }
    let run = sipp.await.unwrap();
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert!(
        node.metric("parley_webrtc_video_packets_total{direction=\"to_browser\"") >= 30.0,
        "{}",
        node.log()
    );
    assert!(node.metric("parley_webrtc_video_packets_total{direction=\"from_browser\"") >= 30.0);
    // Keyframe requests cross both ways: the page cannot decode the test's frames and
    // asks the gateway; the gateway's PLIs (in its pcap) reach the page's encoder.
    let k = |d: &str| {
        node.metric(&format!(
            "parley_webrtc_keyframe_requests_total{{direction=\"{d}\""
        ))
    };
    assert!(k("from_browser") >= 1.0, "{}", node.log());
    assert!(k("to_browser") >= 1.0, "{}", node.log());
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{cdrs:?}");
    tokio::task::block_in_place(|| {
        page.eval_until("() => document.getElementById('video-view').hidden", |v| {
            *v == json!(true)
        });
        // The camera was opened for the call only: it is closed again.
        page.eval_until("() => state.cam === null", |v| *v == json!(true));
    });
}
