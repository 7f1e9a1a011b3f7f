//! IM devices reaching the voice network: a device dials a PSTN number through the trunk
//! (SIPp `uas` echoing media), and a device calls a user whose route is their PSTN line.

mod common;

use std::time::Duration;

use common::{Node, SippUas};
use parley_codecs::control::{ClientMsg, ServerMsg};
use parley_load::device::MediaMode;

const T: Duration = Duration::from_secs(10);

both_stores! {
/// Media through the trunk, the CDR, and the dialled number in the book (on both stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_dials_a_pstn_number_through_the_trunk(store) {
    let node = Node::start_on(store, ["", "", "", ""], 200);
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    let mut cfg = node.device_config("alice", "desk");
    cfg.media = MediaMode::Tone;
    let mut alice = node.device(cfg).await;

    alice
        .send(ClientMsg::Dial {
            to: "+15551230000".into(),
        })
        .await
        .unwrap();
    let Some(ServerMsg::Dialing { call_id, .. }) = alice
        .wait_for(T, |m| matches!(m, ServerMsg::Dialing { .. }))
        .await
    else {
        panic!("no dialing\n{}", node.log())
    };
    assert!(
        alice
            .wait_for(T, |m| matches!(m, ServerMsg::CallRinging { .. }))
            .await
            .is_some(),
        "no 180 relayed\n{}",
        node.log()
    );
    assert!(
        alice
            .wait_for(T, |m| matches!(m, ServerMsg::CallConnected { .. }))
            .await
            .is_some(),
        "{}",
        node.log()
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    alice.send(ClientMsg::Hangup { call_id }).await.unwrap();

    let cdrs = node.wait_cdrs(1);
    let c = &cdrs[0];
    assert_eq!(
        (
            c["disposition"].as_str(),
            c["route"].as_str(),
            c["direction"].as_str()
        ),
        (Some("ANSWERED"), Some("pstn"), Some("out")),
        "{c}"
    );
    assert_eq!(
        (
            c["user"].as_str(),
            c["caller"].as_str(),
            c["called"].as_str()
        ),
        (Some("alice"), Some("+15550100001"), Some("+15551230000")),
        "{c}"
    );
    // Tone out to SIPp, echoed back through the relay to the device.
    let a = alice.stats().snapshot();
    assert!(a.rtp_received >= 40, "{a}");
    assert!(
        c["packets_in"].as_i64().unwrap() >= 40 && c["packets_out"].as_i64().unwrap() >= 40,
        "{c}"
    );
    // The dialled number is now in alice's address book.
    assert_eq!(node.address_book("alice")[0]["address"], "+15551230000");

    // The call released its trunk leg in the SIP core: a clean stop finds no call up and
    // does not wait out the 30-s drain deadline.
    drop(alice);
    let (status, log) = node.stop_with_log();
    assert!(status.success(), "{log}");
    assert!(log.contains("parley stopped"), "{log}");
    assert!(
        !log.contains("drain deadline reached"),
        "a finished device-dialled call still held the drain:\n{log}"
    );
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_calls_an_offline_user_on_their_pstn_line() {
    let node = Node::start();
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    let mut alice = node.device(node.device_config("alice", "desk")).await;
    // Bob has no device online: his calls go to his PSTN line through the trunk.
    alice
        .send(ClientMsg::Dial { to: "bob".into() })
        .await
        .unwrap();
    let Some(ServerMsg::Dialing { call_id, .. }) = alice
        .wait_for(T, |m| matches!(m, ServerMsg::Dialing { .. }))
        .await
    else {
        panic!("no dialing")
    };
    assert!(
        alice
            .wait_for(T, |m| matches!(m, ServerMsg::CallConnected { .. }))
            .await
            .is_some(),
        "{}",
        node.log()
    );
    alice.send(ClientMsg::Hangup { call_id }).await.unwrap();
    let cdrs = node.wait_cdrs(1);
    let c = &cdrs[0];
    assert_eq!(
        (
            c["disposition"].as_str(),
            c["route"].as_str(),
            c["user"].as_str(),
            c["direction"].as_str()
        ),
        (Some("ANSWERED"), Some("pstn"), Some("bob"), Some("in")),
        "{c}"
    );
    assert_eq!(c["answered_by"], "pstn");
}
