//! Voice-network failover: the trunk is health-checked with SIP OPTIONS; when it stops
//! answering, calls that would ring the PSTN line ring the user's IM device instead, and
//! when it recovers they go back to the PSTN line. Another trunk that stays up but cannot
//! reach the user's number (number plan: it serves `+44` only) changes nothing.

mod common;

use common::{Node, SippUas, free_udp_port, sipp_uac, wait_metric};
use parley_codecs::control::{ClientMsg, Status};

const TRUNK_UP: &str = "parley_trunk_up{trunk=\"pstn\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trunk_down_sends_calls_over_the_packet_network_and_back() {
    let uk_port = free_udp_port();
    let probes = "probe_interval_ms = 200\nprobe_timeout_ms = 300\ndown_after = 2\nup_after = 2";
    let node = Node::start_configured(
        "t1_ms = 50",
        &format!(
            "{probes}\n[[trunks]]\nname = \"uk\"\naddress = \"127.0.0.1:{uk_port}\"\n{probes}\n\
             [[number_plan]]\nprefix = \"+44\"\ntrunks = [\"uk\"]\n\
             [[number_plan]]\nprefix = \"\"\ntrunks = [\"pstn\"]"
        ),
    );
    let _uk = SippUas::start_on(&node, uk_port, &["-sn", "uas"]);
    // Alice is signed in but away: with the voice network up her calls go to her PSTN line.
    let device = node.device(node.device_config("alice", "desk")).await;
    device
        .send(ClientMsg::Presence {
            status: Status::Away,
            idle_ms: 600_000,
            note: None,
        })
        .await
        .unwrap();
    let trunk = SippUas::start(&node, &["-sn", "uas"]);
    let ok_probes = wait_metric(
        &node,
        "parley_trunk_probes_total{trunk=\"pstn\",source=\"options\",result=\"ok\"}",
        |v| v >= 2.0,
    );
    assert!(
        ok_probes >= 2.0,
        "the trunk never answered OPTIONS\n{}",
        node.log()
    );
    assert_eq!(node.metric(TRUNK_UP), 1.0);

    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    assert_eq!(node.wait_cdrs(1)[0]["route"], "pstn");

    // The trunk dies: probes time out, the trunk is marked down.
    drop(trunk);
    assert_eq!(
        wait_metric(&node, TRUNK_UP, |v| v == 0.0),
        0.0,
        "trunk never marked down\n{}",
        node.log()
    );
    assert_eq!(node.metric("parley_trunk_up{trunk=\"uk\"}"), 1.0);
    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_eq!(
        run.code,
        0,
        "the call must reach the away device: {}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(2);
    assert_eq!(
        (cdrs[0]["route"].as_str(), cdrs[0]["disposition"].as_str()),
        (Some("im"), Some("ANSWERED")),
        "{}",
        cdrs[0]
    );
    assert_eq!(device.stats().snapshot().calls_connected, 1);

    // It comes back: probes succeed again and calls return to the PSTN line.
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    assert_eq!(
        wait_metric(&node, TRUNK_UP, |v| v == 1.0),
        1.0,
        "trunk never recovered\n{}",
        node.log()
    );
    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    assert_eq!(node.wait_cdrs(3)[0]["route"], "pstn");
    assert_eq!(
        device.stats().snapshot().calls_offered,
        1,
        "the device rang only while the trunk was down"
    );
}
