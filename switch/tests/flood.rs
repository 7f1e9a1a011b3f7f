//! Bounded under floods: SIPp floods the node with INVITEs from 127.0.0.2 that are never
//! acknowledged or cancelled, while another SIPp, from 127.0.0.1, places ordinary calls.
//! The flood's source hits its live-call cap (503 with Retry-After, answered without
//! keeping a transaction), the legitimate calls all complete, and the node's memory stays
//! bounded. Beyond the server-transaction cap requests are refused without state; a user
//! with too many calls ringing gets 486 for the next one.

mod common;

use std::time::Duration;

use common::{Node, SippRun, scenario, sipp_uac, wait_metric};
use parley_load::device::Device;

/// alice logged in on a device that never answers: the flood's calls ring it.
async fn quiet_alice(node: &Node) -> Device {
    let mut quiet = node.device_config("alice", "desk");
    quiet.answer_after = None;
    node.device(quiet).await
}

/// `n` never-acknowledged INVITEs to alice at `rate` a second, from `from`.
fn flood(
    node: &Node,
    n: u32,
    rate: u32,
    from: &str,
) -> impl std::future::Future<Output = SippRun> + Send + use<> {
    let sc = scenario(node.dir.path(), "uac_flood.xml");
    // `-i` among the extra arguments: they come last, after the default one.
    sipp_uac(
        node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        n,
        rate,
        &["-i", from],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_flood_is_capped_and_legitimate_calls_still_complete() {
    let node = Node::start_full(
        "max_calls_per_source = 30",
        "probe_interval_ms = 0",
        "max_ringing_per_user = 1000",
    );
    // alice's device never answers (the flood rings it); bob's answers.
    let _alice = quiet_alice(&node).await;
    let _bob = node.device(node.device_config("bob", "desk")).await;
    let rss_before = node.rss_kib();

    let flood = tokio::spawn(flood(&node, 4000, 800, "127.0.0.2"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // In the middle of it: calls to bob, with media, from another address.
    let pcmu = scenario(node.dir.path(), "uac_pcmu.xml");
    let legit = sipp_uac(
        &node,
        &["-sf", pcmu.to_str().unwrap()],
        "+15550100002",
        5,
        5,
        &["-d", "1000"],
    )
    .await;
    let flood = flood.await.unwrap();
    assert_eq!(
        (legit.code, legit.successful, legit.failed),
        (0, 5, 0),
        "the legitimate calls must complete\n{}\n{}",
        legit.output,
        node.log()
    );
    assert!(flood.successful >= 3000, "{}", flood.output);
    let per_source =
        node.metric("parley_sip_overload_rejections_total{reason=\"calls_per_source\"}");
    assert!(
        per_source >= 3000.0,
        "the source cap never applied: {per_source}\n{}",
        node.log()
    );
    // Refused without state: the server transactions in flight are the ringing calls'
    // (and a few finishing), not the flood's.
    let server = node.metric("parley_sip_transactions{kind=\"server\"}");
    assert!(server <= 100.0, "{server} server transactions");
    assert!(node.metric("parley_calls_active") <= 30.0 + 5.0);
    let cdrs = node.wait_cdrs(5);
    let bob: Vec<_> = cdrs.iter().filter(|c| c["user"] == "bob").collect();
    assert_eq!(bob.len(), 5);
    assert!(bob.iter().all(|c| c["disposition"] == "ANSWERED"));
    let rss_after = node.rss_kib();
    // Bounded: the flood's state is capped (a generous bound; the figures of longer runs
    // are in docs/BENCHMARKS.md).
    assert!(
        rss_before > 0 && rss_after < rss_before + 100 * 1024,
        "RSS {rss_before} KiB -> {rss_after} KiB"
    );
    println!("RSS {rss_before} KiB before, {rss_after} KiB after; 503 per source {per_source}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_transaction_cap_requests_are_refused_without_state() {
    let node = Node::start_full(
        "max_calls_per_source = 0\nmax_server_transactions = 16",
        "probe_interval_ms = 0",
        "max_ringing_per_user = 1000",
    );
    let _alice = quiet_alice(&node).await;
    let run = flood(&node, 300, 300, "127.0.0.1").await;
    assert_eq!(run.successful, 300, "{}", run.output);
    let stateless = wait_metric(
        &node,
        "parley_sip_overload_rejections_total{reason=\"transactions\"}",
        |v| v >= 250.0,
    );
    assert!(stateless >= 250.0, "{stateless}\n{}", node.log());
    assert!(node.metric("parley_sip_transactions{kind=\"server\"}") <= 17.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_too_many_calls_ringing_is_busy_for_the_next() {
    let node = Node::start_full("", "probe_interval_ms = 0", "max_ringing_per_user = 2");
    let _alice = quiet_alice(&node).await;
    // Two calls ring (and go on ringing); a third gets 486.
    let run = flood(&node, 2, 10, "127.0.0.1").await;
    assert_eq!(run.successful, 2, "{}", run.output);
    assert_eq!(wait_metric(&node, "parley_calls_active", |v| v >= 2.0), 2.0);
    let busy = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &[]).await;
    assert_eq!(busy.failed, 1, "{}", busy.output);
    assert_eq!(node.metric("parley_calls_refused_ringing_cap_total"), 1.0);
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["sip_cause"], 486, "{cdrs:#?}");
    assert_eq!(cdrs[0]["disposition"], "REJECTED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_transaction() {
    // The flood's 486s are never ACKed, so each holds its transaction for 64*T1: the
    // source's share fills, then its requests are refused without state, while another
    // source's call goes through.
    let node = Node::start_full(
        "max_transactions_per_source = 16",
        "probe_interval_ms = 0",
        "max_ringing_per_user = 2",
    );
    let _alice = quiet_alice(&node).await;
    let _bob = node.device(node.device_config("bob", "desk")).await;
    let run = flood(&node, 200, 200, "127.0.0.2").await;
    assert_eq!(run.successful, 200, "{}", run.output);
    let share = wait_metric(
        &node,
        "parley_sip_overload_rejections_total{reason=\"transactions_per_source\"}",
        |v| v >= 150.0,
    );
    assert!(share >= 150.0, "{share}\n{}", node.log());
    assert!(node.metric("parley_calls_refused_ringing_cap_total") >= 1.0);
    let legit = sipp_uac(&node, &["-sn", "uac"], "+15550100002", 2, 2, &[]).await;
    assert_eq!(
        (legit.code, legit.successful),
        (0, 2),
        "{}\n{}",
        legit.output,
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_progress_hangs_up_while_its_source_share_is_full() {
    // bob answers a call from 127.0.0.2 held 8 s; meanwhile a flood from the same address
    // fills its transaction share (its 486s are never ACKed, so their transactions stay
    // for 64*T1, 32 s). The call's BYE still gets its 200: requests inside an admitted
    // call are never refused.
    let node = Node::start_full(
        "max_transactions_per_source = 16",
        "probe_interval_ms = 0",
        "max_ringing_per_user = 2",
    );
    let _alice = quiet_alice(&node).await;
    let _bob = node.device(node.device_config("bob", "desk")).await;
    let held = tokio::spawn(sipp_uac(
        &node,
        &["-sn", "uac"],
        "+15550100002",
        1,
        1,
        &["-d", "8000", "-i", "127.0.0.2"],
    ));
    assert_eq!(wait_metric(&node, "parley_calls_active", |v| v >= 1.0), 1.0);
    let flooding = tokio::spawn(flood(&node, 600, 200, "127.0.0.2"));
    let share = wait_metric(
        &node,
        "parley_sip_overload_rejections_total{reason=\"transactions_per_source\"}",
        |v| v >= 50.0,
    );
    assert!(share >= 50.0, "{share}\n{}", node.log());
    let held = held.await.unwrap();
    assert_eq!(
        (held.successful, held.failed),
        (1, 0),
        "{}\n{}",
        held.output,
        node.log()
    );
    flooding.await.unwrap();
    // bob's call left its CDR, answered (among the flood's rejected ones).
    let answered = |c: &serde_json::Value| c["user"] == "bob" && c["disposition"] == "ANSWERED";
    let bobs = || {
        let (st, body) = node.get("/api/v1/cdrs?user=bob", true);
        assert_eq!(st, 200, "{body}");
        serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut cdrs = bobs();
    while !cdrs.iter().any(answered) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        cdrs = bobs();
    }
    assert!(cdrs.iter().any(answered), "{cdrs:#?}");
}
