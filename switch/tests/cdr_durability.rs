//! No CDR is lost: a call's row is written when it starts and completed when it ends, so a
//! node killed with SIGKILL mid-call leaves the row, and the next start closes it as
//! `INTERRUPTED`. SIPp holds a long call to alice's device while the node dies.

mod common;

use std::time::Duration;

use common::{Node, sipp_uac};

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_by_a_crash_leaves_an_interrupted_cdr(store) {
    let node = Node::start_on(store, [""; 4], 200);
    let _device = node.device(node.device_config("alice", "desk")).await;
    // A 20-s call; the node dies in its middle.
    let sipp = tokio::spawn(sipp_uac(
        &node,
        &["-sn", "uac", "-d", "20000", "-cid_str", "durable-%u"],
        "+15550100001",
        1,
        1,
        &["-timeout", "8s"],
    ));
    assert!(
        common::wait_metric(&node, "parley_calls_active", |v| v >= 1.0) >= 1.0,
        "the call never became active\n{}",
        node.log()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(node.cdrs().is_empty(), "no finished call yet");
    let node = node.crash_and_restart();
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs.len(), 1, "{cdrs:?}\n{}", node.log());
    let c = &cdrs[0];
    assert_eq!(c["disposition"], "INTERRUPTED", "{c}");
    assert_eq!(c["sip_call_id"], "durable-1", "{c}");
    assert_eq!(c["user"], "alice", "{c}");
    assert!(
        node.log()
            .contains("closed the CDRs of calls cut by the last stop")
    );
    sipp.abort();
}
}
