//! An answered call whose media stops is ended after the media timeout: BYE to the gateway,
//! `call_ended media_timeout` to the device, a CDR with cause 408.

mod common;

use std::time::Duration;

use common::{Node, scenario, sipp_uac};
use parley_codecs::control::ServerMsg;
use parley_load::device::MediaMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_answered_call_is_ended_after_the_media_timeout() {
    let node = Node::start_full("", "", "media_timeout_secs = 1");
    let mut cfg = node.device_config("alice", "desk");
    cfg.media = MediaMode::None; // the device sends nothing, and neither does the gateway
    let mut device = node.device(cfg).await;
    // The scenario answers our BYE: it only succeeds if Parley hangs up.
    let sc = scenario(node.dir.path(), "uac_remote_bye.xml");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(
        run.code,
        0,
        "SIPp never got the BYE:\n{}\n{}",
        run.output,
        node.log()
    );
    let ended = device
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::CallEnded { .. })
        })
        .await;
    assert!(
        matches!(ended, Some(ServerMsg::CallEnded { ref reason, .. }) if reason == "media_timeout"),
        "{ended:?}"
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(
        (
            cdrs[0]["disposition"].as_str(),
            cdrs[0]["sip_cause"].as_i64()
        ),
        (Some("ANSWERED"), Some(408)),
        "{}",
        cdrs[0]
    );
    assert_eq!(node.metric("parley_media_timeouts_total"), 1.0);
}
