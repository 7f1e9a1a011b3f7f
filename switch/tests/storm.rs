//! `parley-load storm` as a library against real peers on loopback: a Parley node with an
//! auto-answering device, a SIPp `uas` on its own, a number nobody has, and a node whose
//! callees are logged in by the storm itself (answering, rejecting, moving calls between
//! two devices by presence). Every count in the storm's report is checked against what the
//! peer saw.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Node, free_port_block, free_udp_port, sipp_bin};
use parley_load::fleet::FleetConfig;
use parley_load::plan::Numbers;
use parley_load::report::{Report, Thresholds};
use parley_load::storm::{self, StormConfig};

/// A storm toward `target`: `calls` calls at `rate` cps, held 0–200 ms.
fn config(target: SocketAddr, to: &str, calls: u64, rate: f64) -> StormConfig {
    let mut cfg = StormConfig::new(target, Numbers::parse(to).unwrap());
    cfg.rate = rate;
    cfg.calls = Some(calls);
    cfg.hold = "uniform:0ms-200ms".parse().unwrap();
    // Bounds a lost call; no test here expects one.
    cfg.answer_timeout = Duration::from_secs(10);
    cfg.progress = true;
    cfg
}

/// Runs a storm, bounded: a hung generator fails the test instead of hanging it.
async fn storm(cfg: StormConfig) -> Report {
    tokio::time::timeout(Duration::from_secs(120), storm::run(cfg))
        .await
        .expect("the storm did not finish within 120 s")
        .expect("the storm could not start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_to_a_logged_in_device_is_all_answered_with_one_cdr_per_call() {
    let node = Node::start();
    let device = node.device(node.device_config("alice", "desk")).await;
    let calls = 200;
    let report = storm(config(node.sip, "+15550100001", calls, 100.0)).await;
    println!("{report}");

    assert_eq!(report.attempts, calls, "{report}\n{}", node.log());
    assert_eq!(report.answered, calls, "{report}\n{}", node.log());
    assert_eq!(report.completed, calls, "{report}");
    assert_eq!((report.failed, report.remote_bye), (0, 0), "{report}");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!((report.bad_messages, report.send_errors), (0, 0));
    assert_eq!(report.setup.count, calls);
    // Parley rings the caller (180) before the device answers.
    assert_eq!(report.post_dial_delay.count, calls);
    assert!((report.asr - 1.0).abs() < f64::EPSILON);

    let cdrs = node.wait_cdrs(calls as usize);
    let answered = cdrs
        .iter()
        .filter(|c| c["disposition"] == "ANSWERED")
        .count();
    assert_eq!(cdrs.len(), calls as usize, "{cdrs:#?}");
    assert_eq!(answered as u64, report.answered);
    for c in &cdrs {
        assert_eq!(c["route"], "im", "{c}");
        assert_eq!(c["caller"], "+15557770001", "{c}");
        assert_eq!(c["called"], "+15550100001", "{c}");
    }
    assert_eq!(device.stats().snapshot().calls_connected, calls);
    assert_eq!(
        node.metric("parley_calls_total{disposition=\"ANSWERED\",route=\"im\"}"),
        calls as f64
    );
    assert_eq!(node.metric("parley_calls_active"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_media_is_relayed_to_the_device_and_echoed_back() {
    let node = Node::start();
    let device = node.device(node.device_config("alice", "desk")).await;
    let calls = 20;
    let mut cfg = config(node.sip, "+15550100001", calls, 20.0);
    cfg.hold = "1s".parse().unwrap();
    cfg.media = true;
    let report = storm(cfg).await;
    println!("{report}");

    assert_eq!(
        (report.answered, report.failed),
        (calls, 0),
        "{report}\n{}",
        node.log()
    );
    let media = report.media.expect("a media report");
    assert_eq!(media.streams, calls);
    // Every stream sent (50 packets a second while the call was up), the device echoed,
    // and the echoes came back through the relay. Only packets in flight when a call
    // ended may be missing, so most of them came back.
    assert!(media.sent >= calls, "{media:?}");
    let snap = device.stats().snapshot();
    let echoed = snap.rtp_sent;
    assert!(media.received <= echoed, "{media:?} vs {echoed} echoed");
    // Each call's stream reached the device as one stream: one SSRC per flow.
    assert_eq!(snap.rtp_ssrc_changes, 0, "{snap}");
    assert!(echoed <= media.sent, "{media:?} vs {echoed} echoed");
    assert!(
        2 * media.received >= media.sent,
        "{media:?}: most packets lost"
    );
    assert_eq!(media.foreign, 0, "{media:?}");
    assert_eq!(media.round_trip.count, media.received);
}

/// A SIPp process killed when the test ends.
struct Sipp(Child);

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_to_a_plain_sipp_uas_is_all_answered() {
    let port = free_udp_port();
    let media = free_port_block(4);
    let dir = tempfile::tempdir().unwrap();
    let _uas = Sipp(
        Command::new(sipp_bin())
            .args(["-sn", "uas", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-mp", &media.to_string(), "-nostdin", "-timeout", "60s"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sipp uas"),
    );
    // SIPp needs a moment to bind; an INVITE sent before is retransmitted anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let calls = 200;
    let target: SocketAddr = ([127, 0, 0, 1], port).into();
    let report = storm(config(target, "+15550100001-+15550100050", calls, 100.0)).await;
    println!("{report}");
    assert_eq!(report.attempts, calls, "{report}");
    assert_eq!(report.answered, calls, "{report}");
    assert_eq!(report.completed, calls, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    // SIPp's uas sends 180 before 200.
    assert_eq!(report.post_dial_delay.count, calls);
    assert!(
        report
            .check(&Thresholds {
                max_fail_ratio: Some(0.0),
                max_setup_p99: None,
            })
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_to_an_unknown_number_fails_every_call_with_404() {
    let node = Node::start();
    let calls = 20;
    let report = storm(config(node.sip, "+15559999999", calls, 50.0)).await;
    println!("{report}");

    assert_eq!(report.attempts, calls, "{report}");
    assert_eq!((report.answered, report.completed), (0, 0), "{report}");
    assert_eq!(report.failed, calls, "{report}");
    assert_eq!(
        report.failures,
        [("404".to_string(), calls)].into_iter().collect()
    );
    assert_eq!(report.setup.count, 0);
    assert_eq!(report.asr, 0.0);
    let violations = report.check(&Thresholds {
        max_fail_ratio: Some(0.01),
        max_setup_p99: Some(Duration::from_secs(1)),
    });
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].starts_with("fail ratio"), "{violations:?}");
    // The node kept nothing: no call, no CDR (a 404 is answered before a call exists).
    assert_eq!(node.metric("parley_calls_active"), 0.0);
    assert!(node.cdrs().is_empty());
}

/// The storm's own devices for alice and bob on `node`, answering after 20 ms.
fn fleet(node: &Node) -> FleetConfig {
    let mut f = FleetConfig::new(
        node.quic,
        node.cert(),
        vec!["alice".into(), "bob".into()],
        "demo",
    );
    f.answer_after = Duration::from_millis(20);
    f
}

fn answered_cdrs(node: &Node, n: usize) -> usize {
    node.wait_cdrs(n)
        .iter()
        .filter(|c| c["disposition"] == "ANSWERED")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_with_its_own_devices_answers_every_call() {
    let node = Node::start();
    let calls = 60;
    let mut cfg = config(node.sip, "+15550100001-+15550100002", calls, 30.0);
    cfg.devices = Some(fleet(&node));
    let report = storm(cfg).await;
    println!("{report}");

    assert_eq!(
        (report.attempts, report.answered, report.completed),
        (calls, calls, calls),
        "{report}\n{}",
        node.log()
    );
    assert_eq!(answered_cdrs(&node, calls as usize) as u64, report.answered);
    let d = report.devices.expect("a devices report");
    assert_eq!((d.users, d.devices), (2, 2));
    assert_eq!((d.offered, d.answered, d.connected), (calls, calls, calls));
    assert_eq!((d.rejected, d.churns, d.rerouted), (0, 0, 0));
    assert_eq!(d.ended, calls, "{d:?}");
    assert_eq!(d.reroute.count, 0);
    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!(json["devices"]["answered"], calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_devices_rejecting_every_call_give_603() {
    let node = Node::start();
    let calls = 20;
    let mut cfg = config(node.sip, "+15550100001-+15550100002", calls, 20.0);
    let mut f = fleet(&node);
    f.reject_ratio = 1.0;
    cfg.devices = Some(f);
    let report = storm(cfg).await;
    println!("{report}");

    assert_eq!(report.attempts, calls, "{report}");
    assert_eq!((report.answered, report.failed), (0, calls), "{report}");
    assert_eq!(
        report.failures,
        [("603".to_string(), calls)].into_iter().collect()
    );
    let d = report.devices.expect("a devices report");
    assert_eq!((d.offered, d.rejected, d.answered), (calls, calls, 0));
    assert_eq!(d.connected, 0);
    let cdrs = node.wait_cdrs(calls as usize);
    assert_eq!(cdrs.len(), calls as usize, "{cdrs:#?}");
    for c in &cdrs {
        assert_eq!(c["disposition"], "REJECTED", "{c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_with_presence_churn_reroutes_every_call_and_answers_it() {
    let node = Node::start();
    // Calls a quarter second apart, each over in well under that (answer after 20 ms, no
    // hold), so that one user's calls never overlap and each churn moves exactly its call.
    let calls = 20;
    let mut cfg = config(node.sip, "+15550100001-+15550100002", calls, 4.0);
    cfg.hold = "0".parse().unwrap();
    let mut f = fleet(&node);
    f.churn_ratio = 1.0;
    cfg.devices = Some(f);
    let report = storm(cfg).await;
    println!("{report}");

    assert_eq!(
        (report.attempts, report.answered, report.completed),
        (calls, calls, calls),
        "{report}\n{}",
        node.log()
    );
    let d = report.devices.expect("a devices report");
    assert_eq!((d.users, d.devices), (2, 4));
    assert_eq!(d.churns, calls, "{d:?}");
    assert_eq!(d.reroute.count, calls, "{d:?}");
    assert_eq!(d.connected, calls, "{d:?}");
    // Each call rang on its first device, then on the second.
    assert_eq!(d.offered, 2 * calls, "{d:?}");
    assert!(node.metric("parley_reroutes_total") >= calls as f64);
    assert_eq!(answered_cdrs(&node, calls as usize) as u64, report.answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_plays_the_trunk_too_and_media_crosses_the_relay() {
    let node = Node::start(); // alice offline: her calls go to the PSTN trunk
    let calls = 60;
    let mut cfg = config(node.sip, "+15550100001", calls, 30.0);
    cfg.hold = "uniform:500ms-800ms".parse().unwrap();
    cfg.media = true;
    cfg.uas = Some(parley_load::sip_uas::UasConfig {
        listen: node.trunk,
        answer_after: Duration::from_millis(50),
        reject_ratio: 0.0,
    });
    let report = storm(cfg).await;
    println!("{report}");
    assert_eq!(report.answered, calls, "{report}\n{}", node.log());
    let uas = report.uas.as_ref().expect("uas section");
    assert_eq!(
        (uas.invites, uas.answered, uas.byes),
        (calls, calls, calls),
        "{uas:?}"
    );
    let cdrs = node.wait_cdrs(calls as usize);
    assert_eq!(
        cdrs.iter()
            .filter(|c| c["disposition"] == "ANSWERED" && c["route"] == "pstn")
            .count() as u64,
        calls
    );
    // RTP went gateway → Parley → trunk UAS (echo) → Parley → gateway.
    let media = report.media.as_ref().expect("media section");
    assert!(media.sent >= 20 * calls, "{report}");
    assert!(
        media.received > 0 && media.received <= media.sent,
        "{report}"
    );
    assert!(uas.media_echoed >= media.received, "{uas:?} {report}");
}
