//! Preferences as rules: set through the admin API and the IM protocol, applied to real
//! calls from SIPp — sequential ringing with a step timeout, rejection, and the predicted
//! device learning from which device answered.

mod common;

use std::time::Duration;

use common::{Node, sipp_uac};
use parley_codecs::control::{ClientMsg, ServerMsg, Status};

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_rule_set_by_admin_api_rings_desk_then_mobile() {
    let node = Node::start();
    let mut desk_cfg = node.device_config("alice", "desk");
    desk_cfg.answer_after = None;
    let mut desk = node.device(desk_cfg).await;
    let mobile = node.device(node.device_config("alice", "mobile")).await;

    let rules = r#"{"rules":[{"name":"desk first","then":{"action":"ring","steps":[
        {"targets":[{"device":"desk"}],"timeout_secs":1},{"targets":[{"device":"mobile"}]}]}}]}"#;
    let (st, body) = node.put("/api/v1/users/alice/preferences", rules);
    assert_eq!(st, 200, "{body}");
    let (st, body) = node.get("/api/v1/users/alice/preferences", true);
    assert_eq!(st, 200);
    assert!(body.contains("desk first"), "{body}");
    // Bad rules are refused with the rule's index; the good ones stay.
    let (st, body) = node.put(
        "/api/v1/users/alice/preferences",
        r#"{"rules":[{"then":{"action":"reject","code":99}}]}"#,
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("rules[0]"), "{body}");
    assert_eq!(node.put("/api/v1/users/nobody/preferences", rules).0, 404);

    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    // The desk rang first and was withdrawn when its step timed out; the mobile answered.
    assert!(
        desk.wait_for(T, |m| matches!(m, ServerMsg::IncomingCall { .. }))
            .await
            .is_some()
    );
    let ended = desk
        .wait_for(T, |m| matches!(m, ServerMsg::CallEnded { .. }))
        .await;
    assert!(
        matches!(ended, Some(ServerMsg::CallEnded { ref reason, .. }) if reason == "rerouted"),
        "{ended:?}"
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED");
    assert_eq!(cdrs[0]["answered_by"], "mobile");
    assert_eq!(mobile.stats().snapshot().calls_connected, 1);
    assert_eq!(
        node.metric("parley_route_decisions_total{route=\"ring\",by=\"rule\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_rule_set_from_the_im_client() {
    let node = Node::start();
    let mut bob = node.device(node.device_config("bob", "phone")).await;
    let rules = serde_json::json!({"rules": [{"name": "no calls", "then": {"action": "reject", "code": 486}}]});
    bob.send(ClientMsg::SetPreferences { preferences: rules })
        .await
        .unwrap();
    let got = bob
        .wait_for(T, |m| matches!(m, ServerMsg::Preferences { .. }))
        .await;
    assert!(
        matches!(got, Some(ServerMsg::Preferences { ref preferences }) if preferences["rules"][0]["name"] == "no calls"),
        "{got:?}"
    );
    // Invalid preferences: a non-fatal error that names the rule; the valid ones stay.
    bob.send(ClientMsg::SetPreferences {
        preferences: serde_json::json!({"rules": [{"then": {"action": "ring", "steps": []}}]}),
    })
    .await
    .unwrap();
    let err = bob
        .wait_for(T, |m| matches!(m, ServerMsg::Error { .. }))
        .await;
    assert!(
        matches!(err, Some(ServerMsg::Error { ref code, ref message, fatal: false, .. }) if code == "bad_preferences" && message.contains("rules[0]")),
        "{err:?}"
    );

    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100002", 1, 1, &[]).await;
    assert_ne!(run.code, 0, "the call must be refused");
    let cdrs = node.wait_cdrs(1);
    assert_eq!(
        (
            cdrs[0]["disposition"].as_str(),
            cdrs[0]["sip_cause"].as_i64()
        ),
        (Some("REJECTED"), Some(486)),
        "{}",
        cdrs[0]
    );
    assert_eq!(bob.stats().snapshot().calls_offered, 0);
    // The admin API sees what the client set.
    assert!(
        node.get("/api/v1/users/bob/preferences?tenant=demo", true)
            .1
            .contains("no calls")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicted_device_learns_from_who_answered() {
    let node = Node::start();
    let desk = node.device(node.device_config("alice", "desk")).await;
    let mobile = node.device(node.device_config("alice", "mobile")).await;
    let (st, body) = node.put("/api/v1/users/alice/preferences", r#"{"rules":[{"name":"predicted","then":{"action":"ring","steps":[{"targets":["predicted"]}]}}]}"#);
    assert_eq!(st, 200, "{body}");
    let presence = |idle_ms| ClientMsg::Presence {
        status: Status::Available,
        idle_ms,
        note: None,
    };

    // No history yet: the most recently used device (the mobile) is predicted and answers.
    desk.send(presence(60_000)).await.unwrap();
    mobile.send(presence(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "200"]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    assert_eq!(node.wait_cdrs(1)[0]["answered_by"], "mobile");

    // Now the desk is the more recently used one, but history says the mobile answers.
    desk.send(presence(0)).await.unwrap();
    mobile.send(presence(60_000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "200"]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    assert_eq!(node.wait_cdrs(2)[0]["answered_by"], "mobile");
    assert_eq!(desk.stats().snapshot().calls_offered, 0);
    assert_eq!(node.metric("parley_answered_rank_total{rank=\"1\"}"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_not_disturb_forwards_to_a_number_through_the_trunk() {
    let node = Node::start();
    let trunk = common::SippUas::start(&node, &["-sn", "uas"]);
    let alice = node.device(node.device_config("alice", "desk")).await;
    let rules = r#"{"rules":[{"name":"dnd forwards","when":{"status":["do_not_disturb"]},
        "then":{"action":"forward","number":"+15550199999"}}]}"#;
    assert_eq!(node.put("/api/v1/users/alice/preferences", rules).0, 200);
    alice
        .send(ClientMsg::Presence {
            status: Status::DoNotDisturb,
            idle_ms: 0,
            note: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "200"]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    let cdrs = node.wait_cdrs(1);
    assert_eq!(
        (cdrs[0]["disposition"].as_str(), cdrs[0]["route"].as_str()),
        (Some("ANSWERED"), Some("forward")),
        "{}",
        cdrs[0]
    );
    assert_eq!(
        alice.stats().snapshot().calls_offered,
        0,
        "a DND device is never rung"
    );
    assert!(node.log().contains("rule=dnd forwards"), "{}", node.log());
    drop(trunk);
}
