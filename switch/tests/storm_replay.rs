//! `parley-load replay` as a library: a small CDR file in each accepted layout (Parley CSV,
//! Asterisk Master.csv) replayed, sped up, against a SIPp `uas` and against a node with a
//! logged-in device; every recorded call is placed once, to its recorded number.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Node, free_port_block, free_udp_port, sipp_bin};
use parley_load::replay::{Layout, Script};
use parley_load::report::Report;
use parley_load::storm::{self, StormConfig};

/// `n` calls a second apart alternating between alice's and bob's numbers, held 1–3 s,
/// every third one unanswered, in Parley's CSV layout.
fn parley_csv(n: u32) -> String {
    let mut s = String::from(
        "call_id,caller,called,start_time,answer_time,end_time,duration_secs,disposition\n",
    );
    for i in 0..n {
        let to = if i % 2 == 0 {
            "+15550100001"
        } else {
            "+15550100002"
        };
        let (answer, end, dur, disp) = if i % 3 == 2 {
            (
                String::new(),
                format!("2025-11-28T14:00:{:02}Z", i + 5),
                String::new(),
                "NO_ANSWER",
            )
        } else {
            (
                format!("2025-11-28T14:00:{:02}Z", i + 1),
                format!("2025-11-28T14:00:{:02}Z", i + 2 + i % 3),
                (1 + i % 3).to_string(),
                "ANSWERED",
            )
        };
        writeln!(
            s,
            "c-{i},+15557770001,{to},2025-11-28T14:00:{i:02}Z,{answer},{end},{dur},{disp}"
        )
        .unwrap();
    }
    s
}

/// The same kind of traffic as Asterisk writes it to Master.csv.
fn asterisk_csv(n: u32) -> String {
    let mut s = String::new();
    for i in 0..n {
        let to = if i % 2 == 0 {
            "+15550100001"
        } else {
            "+15550100002"
        };
        let billsec = if i % 3 == 2 { 0 } else { 1 + i % 3 };
        writeln!(
            s,
            "\"\",\"1000\",\"{to}\",\"default\",\"\"\"Gateway\"\" <1000>\",\"SIP/gw-{i:04}\",\"SIP/parley-{i:04}\",\"Dial\",\"SIP/parley/{to},30\",\"2025-11-28 14:00:{i:02}\",\"2025-11-28 14:00:{:02}\",\"2025-11-28 14:00:{:02}\",{},{billsec},\"ANSWERED\",\"DOCUMENTATION\",\"1732802400.{i}\",\"\"",
            i + 1,
            i + 1 + billsec,
            1 + billsec,
        )
        .unwrap();
    }
    s
}

/// Replays `text` at `speed` toward `target`, bounded in time.
async fn replay(target: SocketAddr, text: &str, speed: f64, layout: Layout) -> (Report, Script) {
    let (script, got) = Script::parse(text, speed).expect("a valid CDR file");
    assert_eq!(got, layout);
    let mut cfg = StormConfig::new(target, script.numbers());
    cfg.answer_timeout = Duration::from_secs(10);
    cfg.progress = true;
    cfg.script = Some(Arc::new(script.clone()));
    let report = tokio::time::timeout(Duration::from_secs(120), storm::run(cfg))
        .await
        .expect("the replay did not finish within 120 s")
        .expect("the replay could not start");
    println!("{report}");
    (report, script)
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
async fn both_layouts_replay_every_call_against_a_sipp_uas() {
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target: SocketAddr = ([127, 0, 0, 1], port).into();

    for (text, layout) in [
        (parley_csv(30), Layout::Parley),
        (asterisk_csv(30), Layout::Asterisk),
    ] {
        // 30 s of recorded traffic in 3 s.
        let (report, script) = replay(target, &text, 10.0, layout).await;
        assert_eq!(script.calls.len(), 30);
        assert_eq!(report.attempts, 30, "{layout:?}: {report}");
        assert_eq!(report.answered, 30, "{layout:?}: {report}");
        assert_eq!(report.completed, 30, "{layout:?}: {report}");
        assert_eq!(report.failed, 0, "{layout:?}: {report}");
        assert_eq!(report.to, "+15550100001 and 1 more");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_against_a_node_places_each_recorded_call_to_its_number() {
    let node = Node::start();
    let _alice = node.device(node.device_config("alice", "desk")).await;
    let _bob = node.device(node.device_config("bob", "desk")).await;
    let calls = 20;
    let (report, script) = replay(node.sip, &asterisk_csv(calls), 20.0, Layout::Asterisk).await;
    assert_eq!(
        (report.attempts, report.answered, report.completed),
        (calls.into(), calls.into(), calls.into()),
        "{report}\n{}",
        node.log()
    );

    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for c in &script.calls {
        *want.entry(c.to.clone()).or_default() += 1;
    }
    let cdrs = node.wait_cdrs(calls as usize);
    assert_eq!(cdrs.len(), calls as usize, "{cdrs:#?}");
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for c in &cdrs {
        assert_eq!(c["disposition"], "ANSWERED", "{c}");
        *got.entry(c["called"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    assert_eq!(got, want);
}
