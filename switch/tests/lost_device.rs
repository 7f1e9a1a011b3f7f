//! A phone that loses its network sends no close. Alice's only device is a `parley-load`
//! process killed with SIGKILL just before SIPp calls her: the node offers the call to the
//! dead device, gets no `ringing` within the offer timeout, drops the device and routes
//! the call on to her PSTN line (a SIPp uas), which answers.

mod common;

use std::process::{Command, Stdio};

use common::{Node, SippUas, sipp_uac};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_device_is_skipped_and_the_call_reaches_the_pstn_line() {
    let node = Node::start_full("", "probe_interval_ms = 0", "ring_timeout_secs = 60");
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    let cert = node.data_dir().join("quic-cert.der");
    let mut phone = Command::new(common::parley_load_bin())
        .args(["device", "--target", &node.quic.to_string(), "--cert"])
        .arg(&cert)
        .args(["--user", "alice", "--password", "demo", "--device", "phone"])
        .args([
            "--answer-after",
            "30s",
            "--media",
            "none",
            "--stats-every",
            "0",
            "--duration",
            "60s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn parley-load device");
    let online = common::wait_metric(&node, "parley_presence_sessions_active", |v| v >= 1.0);
    assert_eq!(online, 1.0, "the phone logged in\n{}", node.log());
    phone.kill().unwrap(); // SIGKILL: no QUIC close reaches the node
    phone.wait().unwrap();

    let run = sipp_uac(
        &node,
        &["-sn", "uac", "-d", "500"],
        "+15550100001",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(
        run.code,
        0,
        "the call was not answered:\n{}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{}", cdrs[0]);
    assert_eq!(cdrs[0]["answered_by"], "pstn", "{}", cdrs[0]);
    assert_eq!(
        node.metric("parley_offers_unacknowledged_total"),
        1.0,
        "routed on because the offer went unacknowledged, not by the idle timeout\n{}",
        node.log()
    );
    // Its presence went with it.
    assert_eq!(node.metric("parley_presence_sessions_active"), 0.0);
}
