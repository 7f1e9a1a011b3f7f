//! Overload control of new calls, against real SIPp peers: a gateway (SIPp UAC) storms
//! the node, whose trunk is a SIPp UAS. Calls over the node's limits get 503 with
//! Retry-After at once, without state (the scenario fails a 503 that lacks it); the calls
//! admitted complete with their CDRs; and the node holds no state for the refused ones
//! and takes calls again when the storm is over.

mod common;

use common::{Node, SippRun, SippUas, scenario, sipp_uac, wait_metric};

/// `calls` calls to alice (offline: her PSTN line, through the trunk) at `rate` a second,
/// each held `hold_ms`, answered or refused with 503 + Retry-After.
async fn storm(node: &Node, calls: u32, rate: u32, hold_ms: u32) -> SippRun {
    let sc = scenario(node.dir.path(), "uac_or_retry_after.xml");
    sipp_uac(
        node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        calls,
        rate,
        &["-d", &hold_ms.to_string()],
    )
    .await
}

/// What SIPp's `-trace_err` logged, if it was on.
fn sipp_errors(node: &Node) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(node.dir.path()).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with("_errors.log") {
            all += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    all
}

fn rejections(node: &Node, reason: &str) -> f64 {
    node.metric(&format!(
        "parley_sip_overload_rejections_total{{reason=\"{reason}\"}}"
    ))
}

/// Stops the node's process (SIGSTOP) for `how_long`, then lets it go on (SIGCONT): it
/// reads nothing meanwhile, while peers go on sending.
async fn stall(node: &Node, how_long: std::time::Duration) {
    let pid = node.pid().to_string();
    let signal = |s: &str| {
        let ok = std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {s} {pid}");
    };
    signal("-STOP");
    tokio::time::sleep(how_long).await;
    signal("-CONT");
}

/// Every call of the storm was answered (with a CDR) or refused for `reason`, the
/// refused ones leaving nothing behind; returns (answered, refused).
fn account(node: &Node, run: &SippRun, calls: u32, reason: &str) -> (usize, f64) {
    assert_eq!(
        (run.code, run.successful, run.failed),
        (0, u64::from(calls), 0),
        "every call answered or refused with Retry-After\n{}\n{}\n{}",
        run.output,
        sipp_errors(node),
        node.log()
    );
    let refused = rejections(node, reason);
    let answered = calls as usize - refused as usize;
    let cdrs = node.wait_cdrs(answered);
    assert_eq!(
        cdrs.len(),
        answered,
        "one CDR per admitted call, none for refusals"
    );
    assert!(
        cdrs.iter().all(|c| c["disposition"] == "ANSWERED"),
        "{cdrs:#?}"
    );
    // Nothing of the refused calls stays: no call, no server transaction past the
    // admitted calls' own (which end 64*T1 after their final answer).
    assert_eq!(wait_metric(node, "parley_calls_active", |v| v == 0.0), 0.0);
    (answered, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_over_the_call_rate_is_refused_at_once_with_retry_after() {
    let node = Node::start_full(
        "max_call_rate = 20",
        "probe_interval_ms = 0",
        "max_ringing_per_user = 1000",
    );
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    // 150 calls offered at 150/s: the bucket holds 20 and refills at 20/s.
    let run = storm(&node, 150, 150, 100).await;
    let (answered, refused) = account(&node, &run, 150, "call_rate");
    assert!(answered >= 20, "the bucket's burst is admitted: {answered}");
    assert!(
        refused >= 1.0,
        "the rate limit never applied\n{}",
        node.log()
    );
    for other in ["calls", "queue_delay"] {
        assert_eq!(rejections(&node, other), 0.0, "{other}");
    }
    // The storm over, a call goes through (the bucket refills).
    let after = storm(&node, 1, 1, 100).await;
    assert_eq!((after.successful, after.failed), (1, 0), "{}", after.output);
    assert_eq!(node.wait_cdrs(answered + 1).len(), answered + 1);
    println!("{answered} answered, {refused} refused for the call rate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_live_call_cap_are_refused_until_calls_end() {
    let node = Node::start_full(
        "max_calls = 3",
        "probe_interval_ms = 0",
        "max_ringing_per_user = 1000",
    );
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    // Three calls held 6 s; the other seven come within the first second.
    let run = storm(&node, 10, 10, 6000).await;
    let (answered, refused) = account(&node, &run, 10, "calls");
    assert!(refused >= 1.0, "the cap never applied\n{}", node.log());
    assert!(answered >= 3, "{answered} answered");
    // Those calls ended: the cap has room again.
    let after = storm(&node, 3, 3, 100).await;
    assert_eq!((after.successful, after.failed), (3, 0), "{}", after.output);
    assert_eq!(node.wait_cdrs(answered + 3).len(), answered + 3);
    assert_eq!(rejections(&node, "calls"), refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_its_receive_queue_sheds_new_calls_then_recovers() {
    // Relay ports for every call the backlog holds (a call without a port is refused
    // with 503 too, and counted as a failed call, not as shedding).
    let node = Node::start_with_relay_ports(
        "max_queue_delay_ms = 100",
        "probe_interval_ms = 0",
        "max_ringing_per_user = 1000",
        2000,
    );
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    let calls = 400;
    let storming = tokio::spawn({
        let sc = scenario(node.dir.path(), "uac_or_retry_after.xml");
        sipp_uac(
            &node,
            &["-sf", sc.to_str().unwrap()],
            "+15550100001",
            calls,
            100,
            &["-d", "100", "-trace_err"],
        )
    });
    // The node stops reading for 3 s while the gateway goes on sending: when it resumes,
    // the requests it reads first waited seconds, and so does every request behind them
    // until the backlog is worked off (a standing queue, not a burst).
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    stall(&node, std::time::Duration::from_secs(3)).await;
    let run = storming.await.unwrap();
    let (answered, refused) = account(&node, &run, calls, "queue_delay");
    assert!(refused >= 1.0, "never shed\n{}", node.log());
    assert!(
        node.log()
            .contains("overload: requests wait in the receive queue"),
        "{}",
        node.log()
    );
    // Recovered: no longer shedding, and the next call is answered.
    assert_eq!(wait_metric(&node, "parley_sip_shedding", |v| v == 0.0), 0.0);
    let after = storm(&node, 1, 1, 100).await;
    assert_eq!((after.successful, after.failed), (1, 0), "{}", after.output);
    assert_eq!(node.wait_cdrs(answered + 1).len(), answered + 1);
    println!("{answered} answered, {refused} shed for queue delay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_is_not_marked_down_for_the_nodes_own_stall() {
    // Probes every 500 ms, each allowed 1 s, one failure marks the trunk down; the trunk
    // answers each probe after 900 ms, so one is always in flight (and calls at once:
    // a call that rings on past a device the stall closed reaches it).
    let node = Node::start_with_relay_ports(
        "",
        "probe_interval_ms = 500\nprobe_timeout_ms = 1000\ndown_after = 1",
        "max_ringing_per_user = 1000",
        2000,
    );
    let slow = scenario(node.dir.path(), "uas_options_slow.xml");
    let mut trunk = std::process::Command::new(common::sipp_bin())
        .args(["-sf", slow.to_str().unwrap(), "-i", "127.0.0.1", "-p"])
        .arg(node.trunk.port().to_string())
        .args(["-nostdin", "-timeout", "90s"])
        .current_dir(node.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn sipp");
    let _bob = node.device(node.device_config("bob", "desk")).await;
    let probes = |result: &str| {
        node.metric(&format!(
            "parley_trunk_probes_total{{trunk=\"pstn\",source=\"options\",result=\"{result}\"}}"
        ))
    };
    let ok = r#"parley_trunk_probes_total{trunk="pstn",source="options",result="ok"}"#;
    // (The node's first probe may have gone out before the trunk listened: the trunk
    // then went down and came back up with the next answers.)
    assert!(
        wait_metric(&node, ok, |v| v >= 2.0) >= 2.0,
        "{}",
        node.log()
    );
    let up = r#"parley_trunk_up{trunk="pstn"}"#;
    assert_eq!(wait_metric(&node, up, |v| v == 1.0), 1.0, "{}", node.log());
    let fails = probes("fail");
    let downs = node.log().matches("trunk down").count();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(probes("fail"), fails, "a slow answer is still in time");
    // A gateway storms bob (his device answers) while the node stops for 3 s: a probe's
    // deadline passes meanwhile, and its answer, which came in time, waits in the receive
    // queue behind the storm's INVITEs. The node, not the trunk, was late.
    let storming = tokio::spawn({
        let sc = scenario(node.dir.path(), "uac_or_retry_after.xml");
        sipp_uac(
            &node,
            &["-sf", sc.to_str().unwrap()],
            "+15550100002",
            600,
            200,
            &[],
        )
    });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    stall(&node, std::time::Duration::from_secs(3)).await;
    storming.await.unwrap();
    let discounted =
        r#"parley_trunk_probes_total{trunk="pstn",source="options",result="discounted"}"#;
    assert!(
        wait_metric(&node, discounted, |v| v >= 1.0) >= 1.0,
        "{}",
        node.log()
    );
    // Probing goes on, no probe counted against the trunk, and it stays up.
    let before = probes("ok");
    assert!(wait_metric(&node, ok, |v| v >= before + 2.0) >= before + 2.0);
    assert_eq!(probes("fail"), fails, "{}", node.log());
    assert_eq!(node.metric(up), 1.0);
    assert_eq!(
        node.log().matches("trunk down").count(),
        downs,
        "{}",
        node.log()
    );
    let _ = trunk.kill();
    let _ = trunk.wait();
}
