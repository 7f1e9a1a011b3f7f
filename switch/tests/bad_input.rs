//! Bad input: malformed SIP gets 400, garbage is counted and dropped, unknown numbers get
//! 404, IM connections must log in first and with the right password — and the node keeps
//! serving calls throughout.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Node, SippUas, scenario, sipp_uac};
use parley_load::device::{Device, DeviceError};

fn exchange(node: &Node, msg: &str) -> Option<String> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(msg.as_bytes(), node.sip).unwrap();
    let mut buf = [0u8; 4096];
    s.recv_from(&mut buf)
        .ok()
        .map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
}

const BAD_CSEQ: &str = "INVITE sip:+15550100001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKbad1\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\nTo: <sip:+15550100001@127.0.0.1>\r\nCall-ID: bad-1\r\nCSeq: abc INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sip_gets_400_and_garbage_is_dropped_while_calls_continue() {
    let node = Node::start();
    let reply = exchange(&node, BAD_CSEQ).expect("a reply to a malformed request");
    assert!(reply.starts_with("SIP/2.0 400"), "{reply}");

    let unknown = "OPTIONS sip:nobody@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKopt1\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\nTo: <sip:nobody@127.0.0.1>\r\nCall-ID: opt-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    let reply = exchange(&node, unknown).expect("OPTIONS answered");
    assert!(reply.starts_with("SIP/2.0 200"), "{reply}");

    // A flood of garbage: random bytes, truncated messages, an oversized header block.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9e37_79b9_u32;
    for i in 0..5000u32 {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let len = 1 + (seed % 1400) as usize;
        let mut pkt: Vec<u8> = (0..len)
            .map(|j| (seed.wrapping_mul(j as u32 + 1) >> 3) as u8)
            .collect();
        if i % 3 == 0 {
            pkt = BAD_CSEQ.as_bytes()[..(seed as usize % BAD_CSEQ.len())].to_vec();
        }
        let _ = s.send_to(&pkt, node.sip);
        // Paced so that the kernel's socket buffer, not the node, is never what drops them
        // (the node answers the readable ones with 400).
        if i % 100 == 99 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    // The node still serves a normal call through the trunk.
    let _trunk = SippUas::start(&node, &["-sn", "uas"]);
    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+15550100002",
        2,
        2,
        &["-d", "1000"],
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.output, node.log());
    let counted = node.metric("parley_sip_parse_errors_total");
    assert!(counted >= 1000.0, "garbage not counted: {counted}");
    assert_eq!(node.wait_cdrs(2).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_number_gets_404_and_bad_sdp_gets_488() {
    let node = Node::start();
    let run = sipp_uac(&node, &["-sn", "uac"], "+15559999999", 1, 1, &[]).await;
    assert_ne!(run.code, 0);
    assert!(node.metric("parley_sip_responses_total{code=\"404\",direction=\"sent\"}") >= 1.0);
    let no_sdp = "INVITE sip:+15550100001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKnosdp\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\nTo: <sip:+15550100001@127.0.0.1>\r\nCall-ID: nosdp-1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: 5\r\n\r\nhello";
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(no_sdp.as_bytes(), node.sip).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok((n, _)) = s.recv_from(&mut buf) {
        got.push(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        );
        if got.last().is_some_and(|l| !l.contains(" 100 ")) {
            break;
        }
    }
    assert_eq!(
        got.last().map(String::as_str),
        Some("SIP/2.0 488 Not Acceptable Here"),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_login_is_required_and_checked() {
    let node = Node::start();
    let mut cfg = node.device_config("alice", "desk");
    cfg.password = "wrong".into();
    match Device::connect(cfg).await {
        Err(DeviceError::Auth(msg)) => assert!(msg.contains("auth_failed"), "{msg}"),
        other => panic!("expected auth failure, got {other:?}"),
    }
    assert_eq!(
        node.metric("parley_auth_results_total{tenant=\"demo\",result=\"denied\"}"),
        1.0
    );

    // Something other than login first: the node refuses and closes.
    let (_conn, mut send, mut recv) = control_stream(&node).await;
    let mut buf = bytes::BytesMut::new();
    parley_codecs::control::encode(&parley_codecs::control::ClientMsg::Ping { id: 1 }, &mut buf)
        .unwrap();
    send.write_all(&buf).await.unwrap();
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.unwrap();
    let mut body = vec![0u8; parley_codecs::control::frame_len(header).unwrap()];
    recv.read_exact(&mut body).await.unwrap();
    let msg: parley_codecs::control::ServerMsg = parley_codecs::control::decode(&body).unwrap();
    assert!(
        matches!(msg, parley_codecs::control::ServerMsg::Error { ref code, fatal: true, .. } if code == "not_logged_in"),
        "{msg:?}"
    );

    // The right password still works afterwards.
    let ok = node.device(node.device_config("alice", "desk")).await;
    assert_eq!(ok.number(), "+15550100001");
}

/// Protocol §2: after login, a length prefix over the limit gets a fatal `bad_message`
/// before the close, as before login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_frame_after_login_gets_bad_message_then_the_close() {
    use parley_codecs::control::{self, ClientMsg, ServerMsg};
    let node = Node::start();
    let (_conn, mut send, mut recv) = control_stream(&node).await;
    let mut buf = bytes::BytesMut::new();
    let login = ClientMsg::Login {
        tenant: "demo".into(),
        user: "alice".into(),
        password: "demo".into(),
        device: "raw".into(),
        token: None,
    };
    control::encode(&login, &mut buf).unwrap();
    send.write_all(&buf).await.unwrap();
    // A length prefix of 16 MiB, far over the 64 KiB limit.
    send.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
    let mut last = None;
    loop {
        let mut header = [0u8; 4];
        if recv.read_exact(&mut header).await.is_err() {
            break; // the close
        }
        let mut body = vec![0u8; control::frame_len(header).unwrap()];
        recv.read_exact(&mut body).await.unwrap();
        last = Some(control::decode::<ServerMsg>(&body).unwrap());
    }
    assert!(
        matches!(last, Some(ServerMsg::Error { ref code, fatal: true, .. }) if code == "bad_message"),
        "the last message before the close: {last:?}\n{}",
        node.log()
    );
}

/// Every request may carry an `id`; an `error` answering it names that `id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_request_they_answer() {
    use parley_codecs::control::{self, ServerMsg};
    let node = Node::start();
    let (_conn, mut send, mut recv) = control_stream(&node).await;
    for json in [
        r#"{"type":"login","tenant":"demo","user":"alice","password":"demo","device":"raw","id":1}"#,
        r#"{"type":"subscribe","users":["nobody"],"id":42}"#,
        r#"{"type":"answer","call_id":"c-99","id":43}"#,
        r#"{"type":"dial","to":"12"}"#,
    ] {
        send.write_all(&(json.len() as u32).to_be_bytes())
            .await
            .unwrap();
        send.write_all(json.as_bytes()).await.unwrap();
    }
    let mut errors = Vec::new();
    while errors.len() < 3 {
        let mut header = [0u8; 4];
        recv.read_exact(&mut header).await.unwrap();
        let mut body = vec![0u8; control::frame_len(header).unwrap()];
        recv.read_exact(&mut body).await.unwrap();
        if let ServerMsg::Error { code, id, .. } = control::decode::<ServerMsg>(&body).unwrap() {
            errors.push((code, id));
        }
    }
    assert_eq!(
        errors,
        [
            ("unknown_user".to_owned(), Some(42)),
            ("unknown_call".to_owned(), Some(43)),
            ("unknown_destination".to_owned(), None),
        ],
        "{}",
        node.log()
    );
}

/// A raw QUIC connection to the node and its control stream (no login sent).
async fn control_stream(node: &Node) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = node.quic_connection().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (conn, send, recv)
}
