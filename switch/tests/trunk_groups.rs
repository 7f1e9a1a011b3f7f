//! Several trunks: a number plan picks each number's trunk group, trunks are tried by
//! priority, a trunk that answers 503 hands the call to the next one, and each trunk's
//! calls are counted. Real SIPp trunks on loopback.

mod common;

use std::time::Duration;

use common::{Node, SippUas, free_udp_port, scenario};
use parley_codecs::control::{ClientMsg, ServerMsg};
use parley_load::device::{Device, MediaMode};

const T: Duration = Duration::from_secs(10);

/// Dials `to` from `dev`; returns how the call went: `Ok(())` once it connected (then
/// hangs up), `Err(reason)` when it ended first.
async fn dial(dev: &mut Device, to: &str, node: &Node) -> Result<(), String> {
    dev.send(ClientMsg::Dial { to: to.into() }).await.unwrap();
    let Some(ServerMsg::Dialing { call_id, .. }) = dev
        .wait_for(T, |m| matches!(m, ServerMsg::Dialing { .. }))
        .await
    else {
        panic!("no dialing\n{}", node.log())
    };
    match dev
        .wait_for(T, |m| {
            matches!(
                m,
                ServerMsg::CallConnected { .. } | ServerMsg::CallEnded { .. }
            )
        })
        .await
    {
        Some(ServerMsg::CallConnected { .. }) => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            dev.send(ClientMsg::Hangup { call_id }).await.unwrap();
            Ok(())
        }
        Some(ServerMsg::CallEnded { reason, .. }) => Err(reason),
        other => panic!("{other:?}\n{}", node.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_answering_503_hands_the_call_to_the_next_by_priority() {
    let backup_port = free_udp_port();
    // `pstn` (priority 1) is out of service; `backup` (priority 2) works.
    let node = Node::start_configured(
        "",
        &format!(
            "priority = 1\nprobe_interval_ms = 0\n\
             [[trunks]]\nname = \"backup\"\naddress = \"127.0.0.1:{backup_port}\"\npriority = 2\nprobe_interval_ms = 0"
        ),
    );
    let broken = scenario(node.dir.path(), "uas_503.xml");
    let _pstn = SippUas::start(&node, &["-sf", broken.to_str().unwrap()]);
    let _backup = SippUas::start_on(&node, backup_port, &["-sn", "uas"]);
    let mut cfg = node.device_config("alice", "desk");
    cfg.media = MediaMode::Tone;
    let mut alice = node.device(cfg).await;

    assert_eq!(dial(&mut alice, "+15551230000", &node).await, Ok(()));
    let cdrs = node.wait_cdrs(1);
    let c = &cdrs[0];
    assert_eq!(c["disposition"], "ANSWERED", "{c}");
    assert_eq!(c["route"], "pstn", "{c}");
    assert_eq!(c["answered_by"], "backup", "the trunk that carried it: {c}");
    for (metric, want) in [
        (
            "parley_trunk_calls_total{trunk=\"pstn\",result=\"failed\"}",
            1.0,
        ),
        (
            "parley_trunk_calls_total{trunk=\"pstn\",result=\"answered\"}",
            0.0,
        ),
        (
            "parley_trunk_calls_total{trunk=\"backup\",result=\"answered\"}",
            1.0,
        ),
        ("parley_trunk_failovers_total{trunk=\"pstn\"}", 1.0),
        ("parley_trunk_failovers_total{trunk=\"backup\"}", 0.0),
    ] {
        assert_eq!(node.metric(metric), want, "{metric}");
    }
    // The 503 counts against the broken trunk's health (call source).
    assert_eq!(
        node.metric("parley_trunk_probes_total{trunk=\"pstn\",source=\"call\",result=\"fail\"}"),
        1.0
    );
    assert!(node.log().contains("trunk failed: trying the next one"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_number_plan_sends_each_prefix_to_its_group_and_others_nowhere() {
    let uk_port = free_udp_port();
    let node = Node::start_configured(
        "",
        &format!(
            "probe_interval_ms = 0\n\
             [[trunks]]\nname = \"uk\"\naddress = \"127.0.0.1:{uk_port}\"\nprobe_interval_ms = 0\n\
             [[number_plan]]\nprefix = \"+44\"\ntrunks = [\"uk\"]\n\
             [[number_plan]]\nprefix = \"+1\"\ntrunks = [\"pstn\"]"
        ),
    );
    let _us = SippUas::start(&node, &["-sn", "uas"]);
    let _uk = SippUas::start_on(&node, uk_port, &["-sn", "uas"]);
    let mut cfg = node.device_config("alice", "desk");
    cfg.media = MediaMode::Tone;
    let mut alice = node.device(cfg).await;

    assert_eq!(dial(&mut alice, "+441632960000", &node).await, Ok(()));
    assert_eq!(dial(&mut alice, "+15551230000", &node).await, Ok(()));
    // No row matches +33: no trunk can reach it, the call is unavailable at once.
    assert_eq!(
        dial(&mut alice, "+33123456789", &node).await,
        Err("unavailable".to_owned())
    );
    let cdrs = node.wait_cdrs(3);
    let by_called = |n: &str| {
        cdrs.iter()
            .find(|c| c["called"] == n)
            .unwrap_or_else(|| panic!("no CDR for {n}: {cdrs:#?}"))
            .clone()
    };
    assert_eq!(by_called("+441632960000")["answered_by"], "uk");
    assert_eq!(by_called("+15551230000")["answered_by"], "pstn");
    let fr = by_called("+33123456789");
    assert_eq!(fr["disposition"], "UNAVAILABLE", "{fr}");
    for (metric, want) in [
        (
            "parley_trunk_calls_total{trunk=\"uk\",result=\"answered\"}",
            1.0,
        ),
        (
            "parley_trunk_calls_total{trunk=\"pstn\",result=\"answered\"}",
            1.0,
        ),
        ("parley_trunk_failovers_total{trunk=\"uk\"}", 0.0),
    ] {
        assert_eq!(node.metric(metric), want, "{metric}");
    }
}
