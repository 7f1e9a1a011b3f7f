//! A trunk that requires digest authentication: Parley answers the 401 challenge with the
//! configured credentials and the call goes through (SIPp verifies the digest).

mod common;

use std::time::Duration;

use common::{Node, SippUas, scenario, sipp_uac};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trunk_digest_challenge_is_answered() {
    let node = Node::start_configured(
        "",
        "username = \"parley\"\npassword = \"s3cret\"\nprobe_interval_ms = 0",
    );
    let sc = scenario(node.dir.path(), "uas_digest.xml");
    let _trunk = SippUas::start(&node, &["-sf", sc.to_str().unwrap()]);
    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 2, 2, &["-d", "300"]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    let cdrs = node.wait_cdrs(2);
    for c in &cdrs {
        assert_eq!(
            (c["disposition"].as_str(), c["route"].as_str()),
            (Some("ANSWERED"), Some("pstn")),
            "{c}"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        node.log()
            .contains("answering the trunk's digest challenge")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_trunk_password_fails_the_call_without_a_loop() {
    let node = Node::start_configured(
        "",
        "username = \"parley\"\npassword = \"wrong\"\nprobe_interval_ms = 0",
    );
    let sc = scenario(node.dir.path(), "uas_digest.xml");
    let _trunk = SippUas::start(&node, &["-sf", sc.to_str().unwrap()]);
    let sc480 = scenario(node.dir.path(), "uac_480.xml");
    let run = sipp_uac(
        &node,
        &["-sf", sc480.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(
        run.code,
        0,
        "the caller must get 480: {}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "UNAVAILABLE", "{}", cdrs[0]);
}
