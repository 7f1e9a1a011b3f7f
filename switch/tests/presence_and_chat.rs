//! Presence subscriptions with fan-out on change, and chat delivered to every online
//! device of the recipient with a delivery acknowledgement.

mod common;

use std::time::Duration;

use common::Node;
use parley_codecs::control::{ClientMsg, ServerMsg, Status};
use parley_load::device::Device;

const T: Duration = Duration::from_secs(5);

async fn presence_of(dev: &mut Device, user: &str) -> (Status, Option<String>, u32) {
    let m = dev
        .wait_for(
            T,
            |m| matches!(m, ServerMsg::PresenceUpdate { user: u, .. } if u == user),
        )
        .await;
    match m {
        Some(ServerMsg::PresenceUpdate {
            status,
            note,
            devices,
            ..
        }) => (status, note, devices),
        other => panic!("no presence update for {user}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_aggregate_presence_and_chat_reaches_every_device() {
    let node = Node::start();
    let mut desk = node.device(node.device_config("alice", "desk")).await;
    let mut mobile = node.device(node.device_config("alice", "mobile")).await;
    let mut bob = node.device(node.device_config("bob", "phone")).await;

    bob.send(ClientMsg::Subscribe {
        users: vec!["alice".into()],
    })
    .await
    .unwrap();
    assert_eq!(
        presence_of(&mut bob, "alice").await,
        (Status::Available, None, 2)
    );
    bob.send(ClientMsg::Subscribe {
        users: vec!["mallory".into()],
    })
    .await
    .unwrap();
    let err = bob
        .wait_for(T, |m| matches!(m, ServerMsg::Error { .. }))
        .await;
    assert!(
        matches!(err, Some(ServerMsg::Error { ref code, fatal: false, .. }) if code == "unknown_user"),
        "{err:?}"
    );

    // One device away: alice is still available (best device wins), so no update is sent;
    // the mobile going busy changes her aggregate.
    desk.send(ClientMsg::Presence {
        status: Status::Away,
        idle_ms: 0,
        note: Some("lunch".into()),
    })
    .await
    .unwrap();
    mobile
        .send(ClientMsg::Presence {
            status: Status::Busy,
            idle_ms: 0,
            note: Some("meeting".into()),
        })
        .await
        .unwrap();
    assert_eq!(
        presence_of(&mut bob, "alice").await,
        (Status::Busy, Some("meeting".into()), 2)
    );

    // Chat from bob reaches both of alice's devices; bob learns it was delivered twice.
    bob.send(ClientMsg::Chat {
        to: "alice".into(),
        text: "lunch at 1?".into(),
        id: 7,
    })
    .await
    .unwrap();
    for dev in [&mut desk, &mut mobile] {
        let got = dev
            .wait_for(T, |m| matches!(m, ServerMsg::Chat { .. }))
            .await;
        assert!(
            matches!(got, Some(ServerMsg::Chat { ref from, ref text, .. }) if from == "bob" && text == "lunch at 1?"),
            "{got:?}"
        );
    }
    let ack = bob
        .wait_for(T, |m| matches!(m, ServerMsg::ChatAck { .. }))
        .await;
    assert!(
        matches!(
            ack,
            Some(ServerMsg::ChatAck {
                id: 7,
                delivered: 2,
                message: 1..,
                stored: false
            })
        ),
        "{ack:?}"
    );
    // A chat to nobody, and an empty one, are refused without closing the connection.
    bob.send(ClientMsg::Chat {
        to: "mallory".into(),
        text: "hi".into(),
        id: 8,
    })
    .await
    .unwrap();
    let err = bob
        .wait_for(T, |m| matches!(m, ServerMsg::Error { .. }))
        .await;
    assert!(
        matches!(err, Some(ServerMsg::Error { ref code, .. }) if code == "unknown_user"),
        "{err:?}"
    );
    for (text, id) in [("", 9), ("bell\u{7}", 10)] {
        bob.send(ClientMsg::Chat {
            to: "alice".into(),
            text: text.into(),
            id,
        })
        .await
        .unwrap();
        let err = bob
            .wait_for(T, |m| matches!(m, ServerMsg::Error { .. }))
            .await;
        assert!(
            matches!(err, Some(ServerMsg::Error { ref code, fatal: false, id: Some(i), .. }) if code == "bad_message" && i == id),
            "{text:?}: {err:?}"
        );
    }

    // Operators see each device, with its network location.
    let (st, body) = node.get("/api/v1/users/alice/presence", true);
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "busy", "{v}");
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{v}");
    assert!(
        devices.iter().all(|d| d["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))),
        "{v}"
    );
    assert_eq!(node.get("/api/v1/users/alice/presence", false).0, 401);

    // The mobile disconnects: alice is now away with one device.
    mobile.close();
    assert_eq!(
        presence_of(&mut bob, "alice").await,
        (Status::Away, Some("lunch".into()), 1)
    );
    // Alice answers bob; bob's single device gets it.
    desk.send(ClientMsg::Chat {
        to: "bob".into(),
        text: "yes".into(),
        id: 1,
    })
    .await
    .unwrap();
    let got = bob
        .wait_for(T, |m| matches!(m, ServerMsg::Chat { .. }))
        .await;
    assert!(
        matches!(got, Some(ServerMsg::Chat { ref from, .. }) if from == "alice"),
        "{got:?}"
    );
    let ack = desk
        .wait_for(T, |m| matches!(m, ServerMsg::ChatAck { .. }))
        .await;
    assert!(
        matches!(
            ack,
            Some(ServerMsg::ChatAck {
                id: 1,
                delivered: 1,
                stored: false,
                ..
            })
        ),
        "{ack:?}"
    );

    // After unsubscribing, bob hears no more about alice.
    bob.send(ClientMsg::Unsubscribe {
        users: vec!["alice".into()],
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    desk.send(ClientMsg::Presence {
        status: Status::Available,
        idle_ms: 0,
        note: None,
    })
    .await
    .unwrap();
    let late = bob
        .wait_for(Duration::from_millis(800), |m| {
            matches!(m, ServerMsg::PresenceUpdate { .. })
        })
        .await;
    assert!(late.is_none(), "{late:?}");
    // Two aggregate changes (busy, then away after the disconnect) to one subscriber.
    assert_eq!(node.metric("parley_presence_fanout_total"), 2.0);
    assert_eq!(
        node.metric("parley_chat_messages_total{result=\"delivered\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_load_delivers_every_update_to_every_watcher() {
    let node = Node::start();
    let report = parley_load::presence::run(parley_load::presence::PresenceConfig {
        target: node.quic,
        cert_der: node.cert(),
        tenant: "demo".into(),
        password: "demo".into(),
        users: vec!["alice".into(), "bob".into()],
        watchers: 1,
        rate: 40.0,
        duration: Duration::from_secs(1),
    })
    .await
    .expect("presence load");
    assert!(report.updates_sent >= 30, "{report:?}");
    assert_eq!(report.delivered, report.expected, "{report:?}");
    // The node pushed every update; the devices' logout at the end may add one push each
    // (their user going offline), depending on when the connections close.
    let pushed = node.metric("parley_presence_fanout_total");
    let expected = report.expected as f64;
    assert!(
        (expected..=expected + 2.0).contains(&pushed),
        "{pushed} pushes for {expected} updates"
    );
}
