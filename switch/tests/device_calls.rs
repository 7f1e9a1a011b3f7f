//! IM-originated calls: a device dials another user (by name or number); media flows RoQ to
//! RoQ through the relay; either side hangs up; unreachable callees end the call cleanly.

mod common;

use std::time::Duration;

use common::Node;
use parley_codecs::control::{ClientMsg, ServerMsg};
use parley_load::device::MediaMode;

const T: Duration = Duration::from_secs(10);

both_stores! {
/// Media both ways, the CDR, and the address books the call fills (on both stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_calls_device_with_media_both_ways(store) {
    let node = Node::start_on(store, ["", "", "", ""], 200);
    let mut cfg = node.device_config("alice", "desk");
    cfg.media = MediaMode::Tone;
    let mut alice = node.device(cfg).await;
    let mut bob = node.device(node.device_config("bob", "phone")).await; // auto-answers, echoes

    alice
        .send(ClientMsg::Dial { to: "bob".into() })
        .await
        .unwrap();
    let dialing = alice
        .wait_for(T, |m| matches!(m, ServerMsg::Dialing { .. }))
        .await;
    let Some(ServerMsg::Dialing { call_id, .. }) = dialing else {
        panic!("no dialing: {}", node.log())
    };
    assert!(
        alice
            .wait_for(T, |m| matches!(m, ServerMsg::CallRinging { .. }))
            .await
            .is_some()
    );
    let offer = bob
        .wait_for(T, |m| matches!(m, ServerMsg::IncomingCall { .. }))
        .await;
    assert!(
        matches!(offer, Some(ServerMsg::IncomingCall { ref from, ref from_name, .. }) if from == "+15550100001" && from_name.as_deref() == Some("alice")),
        "{offer:?}"
    );
    assert!(
        alice
            .wait_for(T, |m| matches!(m, ServerMsg::CallConnected { .. }))
            .await
            .is_some()
    );

    // Let a second of tone go to bob and come back.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    alice.send(ClientMsg::Hangup { call_id }).await.unwrap();
    let ended = bob
        .wait_for(T, |m| matches!(m, ServerMsg::CallEnded { .. }))
        .await;
    assert!(
        matches!(ended, Some(ServerMsg::CallEnded { ref reason, .. }) if reason == "remote_hangup"),
        "{ended:?}"
    );

    let (a, b) = (alice.stats().snapshot(), bob.stats().snapshot());
    assert!(a.rtp_sent >= 40, "{a}");
    assert!(b.rtp_received >= 40, "bob heard alice: {b}");
    assert!(a.rtp_received >= 40, "alice heard bob's echo: {a}");
    assert!(node.metric("parley_relay_packets_total{path=\"roq_roq\"}") >= 80.0);
    let cdrs = node.wait_cdrs(1);
    let c = &cdrs[0];
    assert_eq!(
        (
            c["disposition"].as_str(),
            c["route"].as_str(),
            c["user"].as_str()
        ),
        (Some("ANSWERED"), Some("im"), Some("bob")),
        "{c}"
    );
    assert_eq!(
        (c["caller"].as_str(), c["answered_by"].as_str()),
        (Some("+15550100001"), Some("phone")),
        "{c}"
    );
    assert!(
        c["packets_in"].as_i64().unwrap() >= 40 && c["packets_out"].as_i64().unwrap() >= 40,
        "{c}"
    );
    // Bob's address book learned alice's number (an incoming call), and alice's learned
    // bob's (the call her device dialled is her outgoing call).
    let bob = &node.address_book("bob")[0];
    assert_eq!(bob["address"], "+15550100001");
    assert_eq!(
        (&bob["incoming"], &bob["outgoing"]),
        (&1.into(), &0.into()),
        "{bob}"
    );
    let alice = &node.address_book("alice")[0];
    assert_eq!(alice["address"], "+15550100002");
    assert_eq!(
        (&alice["incoming"], &alice["outgoing"]),
        (&0.into(), &1.into()),
        "{alice}"
    );
    assert_eq!(alice["name"], "bob", "{alice}");
    assert_eq!(alice["known"], true, "{alice}");
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_by_number_the_callee_hangs_up_and_unreachable_users_end_cleanly() {
    // A short T1: the unreachable trunk (nothing listens) times out in 3.2 s.
    let node = Node::start_with("t1_ms = 50");
    let mut alice = node.device(node.device_config("alice", "desk")).await;
    let mut cfg = node.device_config("bob", "phone");
    cfg.hangup_after = Some(Duration::from_millis(500));
    let bob = node.device(cfg).await;

    alice
        .send(ClientMsg::Dial {
            to: "+15550100002".into(),
        })
        .await
        .unwrap();
    assert!(
        alice
            .wait_for(T, |m| matches!(m, ServerMsg::CallConnected { .. }))
            .await
            .is_some(),
        "{}",
        node.log()
    );
    let ended = alice
        .wait_for(T, |m| matches!(m, ServerMsg::CallEnded { .. }))
        .await;
    assert!(
        matches!(ended, Some(ServerMsg::CallEnded { ref reason, .. }) if reason == "remote_hangup"),
        "{ended:?}"
    );
    drop(bob);

    // Bob is gone now: his route is his PSTN line, and nothing answers on the trunk: 480.
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice
        .send(ClientMsg::Dial { to: "bob".into() })
        .await
        .unwrap();
    let ended = alice
        .wait_for(T, |m| matches!(m, ServerMsg::CallEnded { .. }))
        .await;
    assert!(
        matches!(ended, Some(ServerMsg::CallEnded { ref reason, .. }) if reason == "unavailable"),
        "{ended:?}"
    );
    let cdrs = node.wait_cdrs(2);
    assert_eq!(cdrs[0]["disposition"], "UNAVAILABLE");
    assert_eq!(cdrs[1]["disposition"], "ANSWERED");

    for bad in ["mallory", "12345", "alice"] {
        alice
            .send(ClientMsg::Dial { to: bad.into() })
            .await
            .unwrap();
        let err = alice
            .wait_for(T, |m| matches!(m, ServerMsg::Error { .. }))
            .await;
        assert!(
            matches!(err, Some(ServerMsg::Error { ref code, fatal: false, .. }) if code == "unknown_destination"),
            "{bad}: {err:?}"
        );
    }
}
