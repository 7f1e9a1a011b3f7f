//! SIP over TCP (RFC 3261 §18): SIPp over TCP as the gateway (calls to a device, BYE
//! from either side over the gateway's connection) and as a trunk reached over TCP; and
//! the defences of the listener: a slow sender, a broken stream, an idle connection and
//! the connection cap each close the connection, and nothing else breaks.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Node, SippUas, scenario, sipp_uac_to, wait_metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tcp(node: &Node) -> SocketAddr {
    node.sip_tcp.expect("the node listens on TCP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_over_tcp_reaches_the_device_and_both_sides_can_hang_up() {
    // No trunk probes: the retransmission count below is the calls' alone.
    let node = Node::start_configured("tcp_listen = \"127.0.0.1:0\"", "probe_interval_ms = 0");
    let mut cfg = node.device_config("alice", "desk");
    cfg.hangup_after = None;
    let _device = node.device(cfg).await;
    // SIPp hangs up: 3 calls over one TCP connection (`-t t1`).
    let pcmu = scenario(node.dir.path(), "uac_pcmu.xml");
    let run = sipp_uac_to(
        &node,
        tcp(&node),
        &["-sf", pcmu.to_str().unwrap()],
        "+15550100001",
        3,
        3,
        &["-t", "t1", "-d", "1000"],
    )
    .await;
    assert_eq!(
        (run.code, run.successful, run.failed),
        (0, 3, 0),
        "{}\n{}",
        run.output,
        node.log()
    );
    // One connection per call (`-t tn`): 2 more calls, each on its own connection.
    let run = sipp_uac_to(
        &node,
        tcp(&node),
        &["-sf", pcmu.to_str().unwrap()],
        "+15550100001",
        2,
        2,
        &["-t", "tn", "-max_socket", "100", "-d", "1000"],
    )
    .await;
    assert_eq!(
        (run.code, run.successful, run.failed),
        (0, 2, 0),
        "{}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(5);
    for c in &cdrs {
        assert_eq!(c["disposition"], "ANSWERED", "{c}");
        assert!(c["packets_in"].as_i64().unwrap() >= 20, "media flowed: {c}");
    }
    assert_eq!(
        node.metric("parley_sip_retransmissions_total"),
        0.0,
        "nothing is retransmitted over TCP (the ACKs came at once)\n{}",
        node.log()
    );
    drop(_device);

    // The device hangs up: the node's BYE goes to SIPp over its connection.
    let mut cfg = node.device_config("alice", "laptop");
    cfg.hangup_after = Some(Duration::from_millis(800));
    let _device = node.device(cfg).await;
    let bye = scenario(node.dir.path(), "uac_remote_bye.xml");
    let run = sipp_uac_to(
        &node,
        tcp(&node),
        &["-sf", bye.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &["-t", "t1"],
    )
    .await;
    assert_eq!(
        (run.code, run.successful),
        (0, 1),
        "{}\n{}",
        run.output,
        node.log()
    );
    assert_eq!(node.wait_cdrs(6)[0]["disposition"], "ANSWERED");
    // SIPp closed its connection when it ended.
    assert_eq!(
        wait_metric(&node, "parley_sip_connections ", |v| v == 0.0),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_over_tcp_carries_the_call_to_an_offline_user() {
    let node = Node::start_configured(
        "tcp_listen = \"127.0.0.1:0\"",
        "transport = \"tcp\"\nprobe_interval_ms = 500",
    );
    let _trunk = SippUas::start(&node, &["-sn", "uas", "-t", "t1"]);
    // The OPTIONS probes go over TCP and are answered.
    let ok = wait_metric(
        &node,
        "parley_trunk_probes_total{trunk=\"pstn\",source=\"options\",result=\"ok\"}",
        |v| v >= 1.0,
    );
    assert!(ok >= 1.0, "{}", node.log());
    // Nobody is logged in: the call goes to alice's PSTN line, through the TCP trunk.
    let run = sipp_uac_to(
        &node,
        node.sip,
        &["-sn", "uac"],
        "+15550100001",
        2,
        2,
        &["-d", "500"],
    )
    .await;
    assert_eq!(
        (run.code, run.successful),
        (0, 2),
        "{}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(2);
    for c in &cdrs {
        assert_eq!(
            (c["disposition"].as_str(), c["route"].as_str()),
            (Some("ANSWERED"), Some("pstn")),
            "{c}"
        );
    }
    assert!(
        node.metric("parley_sip_connections ") >= 1.0,
        "the trunk's connection stays open for reuse"
    );
}

/// Reads until the node closes the connection; `true` if it did within `within`.
async fn closed_by_node(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_broken_and_idle_connections_are_closed() {
    let node = Node::start_with(
        "tcp_listen = \"127.0.0.1:0\"\ntcp_message_timeout_ms = 300\ntcp_idle_timeout_secs = 1",
    );
    let addr = tcp(&node);
    // A slow sender: half a request, then nothing.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"OPTIONS sip:parley@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKslow\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_node(&mut slow, Duration::from_secs(3)).await,
        "slow sender kept"
    );
    // A stream that cannot be framed: no Content-Length.
    let mut broken = tokio::net::TcpStream::connect(addr).await.unwrap();
    broken
        .write_all(b"OPTIONS sip:parley@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKb\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_node(&mut broken, Duration::from_secs(3)).await,
        "unframed stream kept"
    );
    // An idle connection.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_by_node(&mut idle, Duration::from_secs(4)).await,
        "idle connection kept"
    );
    for reason in ["slow", "framing", "idle"] {
        assert!(
            node.metric(&format!(
                "parley_sip_connections_closed_total{{transport=\"tcp\",reason=\"{reason}\"}}"
            )) >= 1.0,
            "{reason}\n{}",
            node.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_others_still_served() {
    let node = Node::start_with("tcp_listen = \"127.0.0.1:0\"\ntcp_max_connections = 3");
    let addr = tcp(&node);
    // Three quiet connections fit, a fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    assert_eq!(
        wait_metric(&node, "parley_sip_connections ", |v| v == 3.0),
        3.0
    );
    let mut surplus = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_by_node(&mut surplus, Duration::from_secs(2)).await);
    assert_eq!(
        node.metric("parley_sip_connections_refused_total{transport=\"tcp\"}"),
        1.0
    );
    drop(held);
    // A well-formed request on a fresh connection is still answered on it.
    assert_eq!(
        wait_metric(&node, "parley_sip_connections ", |v| v == 0.0),
        0.0
    );
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"OPTIONS sip:parley@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKok\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: ok-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(3);
    while !got.windows(4).any(|w| w == b"\r\n\r\n") && Instant::now() < deadline {
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), ok.read(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n]);
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("SIP/2.0 200"), "{text}\n{}", node.log());
}
