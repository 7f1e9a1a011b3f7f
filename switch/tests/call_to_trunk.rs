//! With the user offline, a gateway call goes to the PSTN line through the trunk (SIPp
//! `uas` with `-rtp_echo`); media is relayed UDP to UDP.

mod common;

use common::{Node, SippUas, scenario, sipp_uac};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_user_is_reached_through_the_trunk() {
    let node = Node::start();
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    let calls = 3;
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        calls,
        3,
        &["-d", "2000"],
    )
    .await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert_eq!(run.successful, u64::from(calls));

    let cdrs = node.wait_cdrs(calls as usize);
    assert_eq!(cdrs.len(), calls as usize);
    for c in &cdrs {
        assert_eq!(c["disposition"], "ANSWERED", "{c}");
        assert_eq!(c["route"], "pstn");
        assert!(c["packets_in"].as_i64().unwrap() >= 50, "{c}");
        assert!(c["packets_out"].as_i64().unwrap() >= 50, "{c}");
    }
    assert!(
        node.metric("parley_relay_packets_total{path=\"udp_udp\"}") >= 100.0 * f64::from(calls)
    );
    assert_eq!(
        node.metric("parley_calls_total{disposition=\"ANSWERED\",route=\"pstn\"}"),
        f64::from(calls)
    );
    assert_eq!(
        node.address_book("alice")[0]["call_count"],
        u64::from(calls)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_user_and_dead_trunk_gets_480_and_a_cdr() {
    // Nothing listens on the trunk port; a short T1 makes the INVITE time out in 3.2 s.
    let node = Node::start_with("t1_ms = 50");
    let run = sipp_uac(
        &node,
        &["-sn", "uac"],
        "+15550100002",
        1,
        1,
        &["-recv_timeout", "40000"],
    )
    .await;
    assert_ne!(run.code, 0, "the call must fail");
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs.len(), 1);
    assert_eq!(cdrs[0]["disposition"], "UNAVAILABLE", "{}", cdrs[0]);
    assert_eq!(cdrs[0]["route"], "pstn");
    assert_eq!(cdrs[0]["user"], "bob");
    assert_eq!(cdrs[0]["sip_cause"], 480);
    assert_eq!(
        node.metric("parley_sip_responses_total{code=\"480\",direction=\"sent\"}"),
        1.0
    );
}
