//! A relay whose port range is full answers the next call 503 (with a CDR and a metric)
//! while the calls that hold the ports go on; freed ports serve new calls.

mod common;

use common::{Node, scenario, sipp_uac};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_relay_range_answers_503_and_the_calls_holding_it_go_on() {
    // Two RTP/RTCP pairs: two gateway-to-device calls at once.
    let node = Node::start_with_relay_ports("", "", "", 4);
    let _device = node.device(node.device_config("alice", "desk")).await;
    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    // Three calls 200 ms apart, each held 3 s: the third finds no port.
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        3,
        5,
        &["-d", "3000"],
    )
    .await;
    assert_eq!(
        (run.successful, run.failed),
        (2, 1),
        "SIPp:\n{}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(3);
    let mut answered: Vec<_> = cdrs
        .iter()
        .map(|c| {
            (
                c["disposition"].as_str().unwrap_or("").to_owned(),
                c["sip_cause"].as_i64(),
            )
        })
        .collect();
    answered.sort();
    assert_eq!(
        answered,
        vec![
            ("ANSWERED".to_owned(), Some(200)),
            ("ANSWERED".to_owned(), Some(200)),
            ("FAILED".to_owned(), Some(503)),
        ],
        "{cdrs:#?}"
    );
    for c in cdrs.iter().filter(|c| c["disposition"] == "ANSWERED") {
        assert!(
            c["packets_in"].as_i64().unwrap() >= 100,
            "media went on: {c}"
        );
    }
    assert_eq!(
        node.metric("parley_media_setup_failures_total{reason=\"ports_exhausted\"}"),
        1.0
    );
    // The ports came back: a new call gets through.
    let again = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &["-d", "500"],
    )
    .await;
    assert_eq!((again.successful, again.failed), (1, 0), "{}", again.output);
}
