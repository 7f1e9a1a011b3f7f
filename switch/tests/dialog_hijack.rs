//! A stranger who knows a live call's Call-ID cannot end or move it (RFC 3261 §12): SIPp
//! holds an 6-second call to alice's device while the test, from another UDP port, sends
//! a BYE with made-up tags and a re-INVITE moving the media to 127.0.0.2. Both get 481;
//! the call lasts its full length and ends with SIPp's own BYE.

mod common;

use std::time::Duration;

use common::{Node, sipp_uac};

fn stranger_request(node: &Node, method: &str, call_id: &str, src: &std::net::UdpSocket) -> String {
    let local = src.local_addr().unwrap();
    let body = "v=0\r\no=- 1 2 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\nm=audio 7777 RTP/AVP 0\r\n";
    let (ctype, body) = if method == "INVITE" {
        ("Content-Type: application/sdp\r\n", body)
    } else {
        ("", "")
    };
    format!(
        "{method} sip:+15550100001@{sip} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-stranger-{method}\r\nFrom: <sip:sipp@127.0.0.1>;tag=made-up-1\r\nTo: <sip:+15550100001@127.0.0.1>;tag=made-up-2\r\nCall-ID: {call_id}\r\nCSeq: 7 {method}\r\nMax-Forwards: 70\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
        body.len(),
        sip = node.sip,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_with_the_call_id_cannot_end_or_move_the_call() {
    let node = Node::start();
    let _device = node.device(node.device_config("alice", "desk")).await;
    // SIPp's Call-IDs are `hijack-<n>` (-cid_str), so the stranger knows the live one.
    let sipp = tokio::spawn(sipp_uac(
        &node,
        &["-sn", "uac", "-d", "6000", "-cid_str", "hijack-%u"],
        "+15550100001",
        1,
        1,
        &[],
    ));
    assert!(
        common::wait_metric(&node, "parley_calls_active", |v| v >= 1.0) >= 1.0,
        "the call never became active\n{}",
        node.log()
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = [0u8; 4096];
    for method in ["BYE", "INVITE"] {
        let req = stranger_request(&node, method, "hijack-1", &stranger);
        stranger.send_to(req.as_bytes(), node.sip).unwrap();
        let n = stranger.recv(&mut buf).expect("an answer to the stranger");
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            answer.starts_with("SIP/2.0 481 "),
            "{method} from a stranger: {answer}\n{}",
            node.log()
        );
    }
    let run = sipp.await.unwrap();
    assert_eq!(
        run.code,
        0,
        "SIPp's call failed:\n{}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{}", cdrs[0]);
    assert!(
        cdrs[0]["duration_secs"].as_f64().unwrap() >= 5.5,
        "the call ran its full 6 s: {}",
        cdrs[0]
    );
    assert!(node.metric("parley_sip_unmatched_requests_total{method=\"BYE\"}") >= 1.0);
    assert!(node.metric("parley_sip_unmatched_requests_total{method=\"INVITE\"}") >= 1.0);
    assert_eq!(
        node.metric("parley_sip_reinvites_total{result=\"moved\"}"),
        0.0,
        "the relay never followed the stranger's media"
    );
}
