//! SIP signalling on two control threads (`[sip] control_threads = 2`): every call belongs
//! to the shard its Call-ID names or hashes to, whichever shard's socket the kernel handed
//! a datagram to. Real SIPp peers on loopback: gateway calls to the PSTN line through a
//! SIPp trunk and to a logged-in device, the trunk hanging up (an in-dialog request with
//! a Call-ID of Parley's), and gateways cancelling (the gateway's Call-ID) — on both shards.

mod common;

use common::{Node, SippUas, scenario, sipp_uac, wait_metric};

const TWO: &str = "control_threads = 2\n";

/// Runs `calls` SIPp calls of scenario file `name` to `number` at `rate`; all succeed.
async fn sipp_clean(node: &Node, name: &str, number: &str, calls: u32, rate: u32) {
    let sc = scenario(node.dir.path(), name);
    let run = sipp_uac(
        node,
        &["-sf", sc.to_str().unwrap()],
        number,
        calls,
        rate,
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert_eq!((run.successful, run.failed), (u64::from(calls), 0));
}

/// Both shards started calls, as many as `calls` in all, and handed datagrams over.
fn assert_both_shards_worked(node: &Node, calls: u64) {
    let (s0, s1) = (
        node.metric("parley_sip_shard_calls_total{shard=\"0\"}"),
        node.metric("parley_sip_shard_calls_total{shard=\"1\"}"),
    );
    assert_eq!(s0 + s1, calls as f64, "calls per shard: {s0} + {s1}");
    assert!(
        s0 >= 1.0 && s1 >= 1.0,
        "one shard took every call: {s0} / {s1}"
    );
    // The kernel gives one sender's datagrams to one socket: the other shard's calls
    // were handed over.
    assert!(node.metric("parley_sip_shard_handoffs_total") >= 1.0);
    assert_eq!(node.metric("parley_sip_control_threads"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_calls_to_the_pstn_line_are_carried_by_both_shards() {
    let node = Node::start_with(TWO);
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    let calls = 200;
    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", calls, 100, &[]).await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert_eq!((run.successful, run.failed), (u64::from(calls), 0));

    let cdrs = node.wait_cdrs(calls as usize);
    assert_eq!(cdrs.len(), calls as usize);
    for c in &cdrs {
        assert_eq!(c["disposition"], "ANSWERED", "{c}");
        assert_eq!(c["route"], "pstn", "{c}");
    }
    assert_both_shards_worked(&node, u64::from(calls));
    assert_eq!(wait_metric(&node, "parley_calls_active", |v| v == 0.0), 0.0);
    // The trunk's probes (sent by shard 0) came back to it whichever socket read them.
    assert_eq!(node.metric("parley_trunk_up{trunk=\"pstn\"}"), 1.0);
    assert_eq!(
        node.address_book("alice")[0]["call_count"],
        u64::from(calls)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_calls_to_a_device_are_carried_by_both_shards() {
    let node = Node::start_with(TWO);
    let device = node.device(node.device_config("bob", "desk")).await;
    let calls = 100;
    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100002",
        calls,
        50,
        &["-d", "200"],
    )
    .await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert_eq!((run.successful, run.failed), (u64::from(calls), 0));
    let cdrs = node.wait_cdrs(calls as usize);
    for c in &cdrs {
        assert_eq!(c["disposition"], "ANSWERED", "{c}");
        assert_eq!(c["route"], "im", "{c}");
        assert_eq!(c["answered_by"], "desk", "{c}");
    }
    assert_eq!(device.stats().snapshot().calls_connected, u64::from(calls));
    assert_both_shards_worked(&node, u64::from(calls));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trunk_hanging_up_and_the_gateway_cancelling_reach_the_call_s_shard() {
    let node = Node::start_with(TWO);
    // The trunk ends each call: its BYE carries the Call-ID of Parley's trunk leg.
    let bye = scenario(node.dir.path(), "uas_bye.xml");
    let _trunk = SippUas::start(&node, &["-sf", bye.to_str().unwrap()]);
    let calls = 20;
    sipp_clean(&node, "uac_remote_bye.xml", "+15550100001", calls, 10).await;
    let cdrs = node.wait_cdrs(calls as usize);
    assert_eq!(cdrs.len(), calls as usize);
    for c in &cdrs {
        assert_eq!(c["disposition"], "ANSWERED", "{c}");
        assert_eq!(c["route"], "pstn", "{c}");
    }

    // The gateway cancels calls ringing a device that never answers.
    let mut cfg = node.device_config("bob", "desk");
    cfg.answer_after = None;
    let _device = node.device(cfg).await;
    let cancelled = 20;
    sipp_clean(&node, "uac_cancel.xml", "+15550100002", cancelled, 10).await;
    let cdrs = node.wait_cdrs((calls + cancelled) as usize);
    let n = cdrs
        .iter()
        .filter(|c| c["disposition"] == "CANCELLED" && c["sip_cause"] == 487)
        .count();
    assert_eq!(n, cancelled as usize, "{cdrs:#?}");
    assert_both_shards_worked(&node, u64::from(calls + cancelled));
    assert_eq!(wait_metric(&node, "parley_calls_active", |v| v == 0.0), 0.0);
}

#[test]
fn a_second_node_on_a_sharded_node_s_port_does_not_start() {
    use std::process::{Command, Stdio};
    // The shards' SO_REUSEPORT group must not let another node join it.
    let node = Node::start_with(TWO);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("second.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[sip]\nlisten = \"{}\"\ncontrol_threads = 2\n[quic]\nlisten = \"127.0.0.1:0\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"test-token-0123456789\"\n[web]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data").display(),
            node.sip,
        ),
    )
    .unwrap();
    let log = dir.path().join("second.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("run parley");
    // Bounded: a node that did start would run until stopped.
    let status = (0..300).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        child.try_wait().unwrap()
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("a second node started on {}:\n{text}", node.sip);
    };
    assert!(!status.success(), "{text}");
    assert!(text.contains(&format!("sip.listen {}", node.sip)), "{text}");
    assert!(!text.contains("parley ready"), "{text}");
}
