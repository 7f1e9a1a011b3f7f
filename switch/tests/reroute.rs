//! Mid-setup re-routing: while a call rings, presence changes of the callee move it. The
//! caller's SIPp call still succeeds; the withdrawn device is told `rerouted`.

mod common;

use std::time::Duration;

use common::{Node, sipp_uac};
use parley_codecs::control::{ClientMsg, ServerMsg, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_change_while_ringing_moves_the_call_to_the_other_device() {
    let node = Node::start();
    let mut desk_cfg = node.device_config("alice", "desk");
    desk_cfg.answer_after = None;
    let mut desk = node.device(desk_cfg).await;
    let mut mobile_cfg = node.device_config("alice", "mobile");
    mobile_cfg.answer_after = None;
    let mut mobile = node.device(mobile_cfg).await;
    mobile
        .send(ClientMsg::Presence {
            status: Status::Away,
            idle_ms: 0,
            note: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let caller = tokio::spawn(sipp_uac(
        &node,
        &["-sn", "uac"],
        "+15550100001",
        1,
        1,
        &["-d", "500"],
    ));

    // Only the desk rings at first (the mobile is away).
    let offer = desk
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::IncomingCall { .. })
        })
        .await;
    assert!(offer.is_some(), "{}", node.log());
    // The user picks up the mobile: it becomes available and starts ringing too.
    mobile
        .send(ClientMsg::Presence {
            status: Status::Available,
            idle_ms: 0,
            note: None,
        })
        .await
        .unwrap();
    let offer = mobile
        .wait_for(Duration::from_secs(5), |m| {
            matches!(m, ServerMsg::IncomingCall { .. })
        })
        .await;
    let Some(ServerMsg::IncomingCall { call_id, .. }) = offer else {
        panic!("mobile never rang\n{}", node.log())
    };
    // The desk goes do-not-disturb: its offer is withdrawn as re-routed.
    desk.send(ClientMsg::Presence {
        status: Status::DoNotDisturb,
        idle_ms: 0,
        note: None,
    })
    .await
    .unwrap();
    let ended = desk
        .wait_for(Duration::from_secs(5), |m| {
            matches!(m, ServerMsg::CallEnded { .. })
        })
        .await;
    assert!(
        matches!(ended, Some(ServerMsg::CallEnded { ref reason, .. }) if reason == "rerouted"),
        "{ended:?}"
    );
    // The mobile answers; the gateway's call succeeds.
    mobile.send(ClientMsg::Answer { call_id }).await.unwrap();
    let run = caller.await.unwrap();
    assert!(
        run.code == 0,
        "SIPp call failed:\n{}\n{}",
        run.output,
        node.log()
    );

    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED");
    assert_eq!(cdrs[0]["route"], "im");
    assert_eq!(node.metric("parley_reroutes_total"), 2.0);
    assert!(node.metric("parley_reroute_seconds_count") >= 1.0);
    assert_eq!(mobile.stats().snapshot().calls_connected, 1);
    assert_eq!(desk.stats().snapshot().calls_connected, 0);
}
