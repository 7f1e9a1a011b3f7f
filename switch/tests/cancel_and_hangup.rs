//! Call teardown paths: the caller cancels while the device rings; the device hangs up;
//! the device disconnects mid-call. Each ends the call on both sides and writes one CDR.

mod common;

use std::time::Duration;

use common::{Node, scenario, sipp_uac};
use parley_codecs::control::{ClientMsg, ServerMsg};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_cancels_while_device_rings() {
    let node = Node::start();
    let mut cfg = node.device_config("alice", "desk");
    cfg.answer_after = None; // never answers
    let mut device = node.device(cfg).await;
    let sc = scenario(node.dir.path(), "uac_cancel.xml");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    let ended = device
        .wait_for(Duration::from_secs(5), |m| {
            matches!(m, ServerMsg::CallEnded { .. })
        })
        .await;
    assert!(
        matches!(ended, Some(ServerMsg::CallEnded { ref reason, .. }) if reason == "cancelled"),
        "{ended:?}"
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "CANCELLED", "{}", cdrs[0]);
    assert_eq!(cdrs[0]["sip_cause"], 487);
    assert!(cdrs[0]["answer_time"].is_null());
    // A missed call still teaches the address book.
    assert_eq!(node.address_book("alice")[0]["address"], "+15557770002");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_hangs_up_and_gateway_gets_bye() {
    let node = Node::start();
    let mut cfg = node.device_config("alice", "desk");
    cfg.hangup_after = Some(Duration::from_millis(1500));
    let _device = node.device(cfg).await;
    let sc = scenario(node.dir.path(), "uac_remote_bye.xml");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        2,
        2,
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    let cdrs = node.wait_cdrs(2);
    assert_eq!(cdrs.len(), 2);
    for c in cdrs {
        assert_eq!(c["disposition"], "ANSWERED", "{c}");
        assert!(c["duration_secs"].as_f64().unwrap() >= 1.0, "{c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_disconnect_mid_call_ends_the_call() {
    let node = Node::start();
    let mut device = node.device(node.device_config("alice", "laptop")).await;
    let sc = scenario(node.dir.path(), "uac_remote_bye.xml");
    // SIPp runs in the background while the test drops the device connection.
    let sipp = tokio::spawn(sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    ));
    let connected = device
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::CallConnected { .. })
        })
        .await;
    assert!(connected.is_some(), "{}", node.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    device.close();
    let run = sipp.await.unwrap();
    assert!(
        run.code == 0,
        "SIPp did not get the BYE:\n{}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED");
    assert_eq!(node.metric("parley_presence_sessions_active"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_rejects_and_caller_gets_603() {
    let node = Node::start();
    let mut cfg = node.device_config("alice", "desk");
    cfg.answer_after = None;
    let mut device = node.device(cfg).await;
    let waiter = tokio::spawn(async move {
        let offer = device
            .wait_for(Duration::from_secs(10), |m| {
                matches!(m, ServerMsg::IncomingCall { .. })
            })
            .await;
        let Some(ServerMsg::IncomingCall { call_id, .. }) = offer else {
            panic!("no offer")
        };
        device.send(ClientMsg::Reject { call_id }).await.unwrap();
        device
    });
    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &[]).await;
    assert_ne!(run.code, 0);
    let _device = waiter.await.unwrap();
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "REJECTED", "{}", cdrs[0]);
    assert_eq!(cdrs[0]["sip_cause"], 603);
}
