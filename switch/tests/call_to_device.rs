//! A gateway call (SIPp `uac` with PCMU media) rings the IM device where the user is
//! logged in; media is relayed both ways; one CDR per call; the caller lands in the
//! address book with the right call count, pushed to the device too.

mod common;

use std::time::Duration;

use common::{Node, scenario, sipp_uac};
use parley_codecs::control::ServerMsg;

both_stores! {
/// SIPp calls to alice's device: media, metrics, and her address book (on both stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_calls_reach_the_logged_in_device_with_media(store) {
    let node = Node::start_on(store, ["", "", "", ""], 200);
    let mut device = node.device(node.device_config("alice", "desk")).await;
    assert_eq!(device.number(), "+15550100001");

    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    let calls = 5;
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        calls,
        5,
        &["-d", "2000"],
    )
    .await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert_eq!((run.successful, run.failed), (u64::from(calls), 0));

    let cdrs = node.wait_cdrs(calls as usize);
    assert_eq!(cdrs.len(), calls as usize, "{cdrs:#?}");
    for c in &cdrs {
        assert_eq!(c["disposition"], "ANSWERED", "{c}");
        assert_eq!(c["route"], "im");
        assert_eq!(c["user"], "alice");
        assert_eq!(c["caller"], "+15557770001");
        assert_eq!(c["caller_name"], "SIPp Gateway");
        assert_eq!(c["called"], "+15550100001");
        assert!(c["answer_time"].is_string());
        assert!(c["duration_secs"].as_f64().unwrap() > 1.0, "{c}");
        // SIPp streams 50 pps for ~2 s; the device echoes every packet.
        assert!(c["packets_in"].as_i64().unwrap() >= 50, "{c}");
        assert!(c["packets_out"].as_i64().unwrap() >= 50, "{c}");
    }

    let stats = device.stats().snapshot();
    assert_eq!(stats.calls_connected, u64::from(calls));
    assert!(stats.rtp_received >= 50 * u64::from(calls), "{stats}");
    assert_eq!(stats.bad_datagrams, 0);
    // What the device echoed went back out toward SIPp's RTP port.
    let to_sipp = node.metric("parley_relay_packets_total{path=\"roq_udp\"}");
    let to_device = node.metric("parley_relay_packets_total{path=\"udp_roq\"}");
    assert!(
        to_device >= stats.rtp_received as f64,
        "relay sent {to_device}, device got {}",
        stats.rtp_received
    );
    assert!(to_sipp >= 50.0 * f64::from(calls), "{to_sipp}");
    assert_eq!(
        node.metric("parley_calls_total{disposition=\"ANSWERED\",route=\"im\"}"),
        f64::from(calls)
    );
    assert_eq!(node.metric("parley_calls_active"), 0.0);
    assert!(node.metric("parley_call_setup_seconds_count") >= f64::from(calls));

    let book = node.address_book("alice");
    assert_eq!(book.len(), 1, "{book:?}");
    assert_eq!(book[0]["address"], "+15557770001");
    assert_eq!(book[0]["name"], "SIPp Gateway");
    assert_eq!(book[0]["call_count"], u64::from(calls));
    // The device received the updated book.
    let pushed = device
        .wait_for(Duration::from_secs(5), |m| matches!(m, ServerMsg::AddressBookUpdate { entries, .. } if entries.first().is_some_and(|e| e.call_count == u64::from(calls))))
        .await;
    assert!(
        pushed.is_some(),
        "device never got the address book with {calls} calls: {:?}",
        device.address_book()
    );
    // Bob's book is untouched.
    assert!(node.address_book("bob").is_empty());

    // Every metric the Grafana dashboard queries is one this node really exports.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../grafana/dashboards/parley-node.json"
    ))
    .unwrap();
    let (_, exported) = node.get("/metrics", false);
    let mut used: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("parley_"))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 10, "{used:?}");
    for name in used {
        let found = exported
            .lines()
            .any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']));
        assert!(
            found,
            "dashboard uses {name}, which the node does not export"
        );
    }
    assert!(node.stop().success());
}
}
