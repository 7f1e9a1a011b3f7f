//! Browsers' transport: the web client served by the node, and the IM protocol over
//! WebSocket against a real node on loopback (a WebSocket client here, a QUIC device from
//! `parley-load` on the other side). The page itself is driven in headless Chromium by
//! `web_client.py` (see `.ci/test`).

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::Node;
use futures_util::{SinkExt, StreamExt};
use parley_codecs::control::{ClientMsg, ServerMsg, Status};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The web listener's `host:port`.
fn web_host(node: &Node) -> String {
    node.web
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// A plain HTTP/1.1 GET on the web listener: (status line, headers, body).
fn get(node: &Node, path: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(web_host(node)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        web_host(node)
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

/// Opens `/ws` as a page of `origin` would (`None`: no `Origin`, not a page).
async fn open(node: &Node, origin: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("ws://{}/ws", web_host(node))
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next protocol message (pings skipped); `None` once the node closed.
async fn recv(ws: &mut Ws) -> Option<Value> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no message from the node within 10 s")?;
        match m {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(other) => panic!("unexpected WebSocket message {other:?}"),
        }
    }
}

/// Messages until one of type `ty` (which is returned), within 15 s.
async fn until(ws: &mut Ws, ty: &str) -> Value {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let m = recv(ws).await?;
            if m["type"] == ty {
                return Some(m);
            }
            seen.push(if m["type"] == "error" {
                m.to_string()
            } else {
                m["type"].to_string()
            });
        }
    })
    .await;
    match found {
        Ok(Some(m)) => m,
        Ok(None) => panic!("closed before a {ty}; saw {seen:?}"),
        Err(_) => panic!("no {ty} within 15 s; saw {seen:?}"),
    }
}

/// The close after a fatal error: the error, then the connection ends.
async fn fatal(ws: &mut Ws, code: &str) {
    let e = until(ws, "error").await;
    assert_eq!(e["code"], code, "{e}");
    assert_eq!(e["fatal"], true, "{e}");
    assert!(
        recv(ws).await.is_none(),
        "the connection stays open after {code}"
    );
}

/// A page of the node's own origin, logged in as `user`.
async fn login(node: &Node, user: &str) -> Ws {
    login_as(node, user, "browser").await
}

async fn login_as(node: &Node, user: &str, device: &str) -> Ws {
    let mut ws = open(node, Some(node.web.trim_end_matches('/')))
        .await
        .unwrap();
    send(
        &mut ws,
        json!({"type": "login", "tenant": "demo", "user": user, "password": "demo", "device": device}),
    )
    .await;
    let ok = until(&mut ws, "login_ok").await;
    assert!(ok["number"].as_str().unwrap().starts_with("+1555"), "{ok}");
    ws
}

#[test]
fn the_web_client_is_served_with_a_policy_that_keeps_it_to_itself() {
    let node = Node::start();
    assert!(node.web.starts_with("http://127.0.0.1:"), "{}", node.web);
    let (status, headers, body) = get(&node, "/");
    assert!(status.contains("200"), "{status}");
    assert!(
        body.contains("<title>Parley</title>") && body.contains("/app.js"),
        "{body}"
    );
    assert!(headers.contains("content-type: text/html"), "{headers}");
    assert!(
        headers.contains("content-security-policy: default-src 'self'")
            && headers.contains("frame-ancestors 'none'"),
        "{headers}"
    );
    let (status, headers, body) = get(&node, "/app.js");
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("content-type: text/javascript"),
        "{headers}"
    );
    assert!(body.contains("new WebSocket("), "not the client script");
    let (status, headers, _) = get(&node, "/style.css");
    assert!(
        status.contains("200") && headers.contains("text/css"),
        "{status} {headers}"
    );
    // The admin API is not on this listener.
    let (status, _, _) = get(&node, "/api/v1/cdrs");
    assert!(status.contains("404"), "{status}");
    let (status, _, _) = get(&node, "/metrics");
    assert!(status.contains("404"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_session_chats_sees_presence_dials_and_reads_its_call_history() {
    let node = Node::start();
    let mut alice = login(&node, "alice").await;
    // The book right after login_ok, as on QUIC.
    let book = until(&mut alice, "address_book").await;
    assert_eq!(book["offset"], 0, "{book}");

    let mut bob = node.device(node.device_config("bob", "desk")).await;
    send(&mut alice, json!({"type": "subscribe", "users": ["bob"]})).await;
    loop {
        let p = until(&mut alice, "presence_update").await;
        if p["user"] == "bob" && p["status"] == "available" {
            break;
        }
    }
    bob.send(ClientMsg::Presence {
        status: Status::Busy,
        idle_ms: 0,
        note: Some("in a meeting".into()),
    })
    .await
    .unwrap();
    loop {
        let p = until(&mut alice, "presence_update").await;
        if p["status"] == "busy" {
            assert_eq!(p["note"], "in a meeting", "{p}");
            break;
        }
    }

    // Chat both ways between the two transports.
    send(
        &mut alice,
        json!({"type": "chat", "to": "bob", "text": "hello from a browser", "id": 7}),
    )
    .await;
    let ack = until(&mut alice, "chat_ack").await;
    assert_eq!(ack["id"], 7, "{ack}");
    assert_eq!(ack["delivered"], 1, "{ack}");
    let got = bob
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::Chat { .. })
        })
        .await
        .expect("bob's device got no chat");
    assert!(
        matches!(&got, ServerMsg::Chat { from, text, .. } if from == "alice" && text == "hello from a browser"),
        "{got:?}"
    );
    bob.send(ClientMsg::Chat {
        to: "alice".into(),
        text: "hello from QUIC".into(),
        id: 1,
    })
    .await
    .unwrap();
    let chat = until(&mut alice, "chat").await;
    assert_eq!(chat["from"], "bob", "{chat}");
    assert_eq!(chat["text"], "hello from QUIC", "{chat}");

    // Dial bob (his device answers once he is available again), hang up, and find the
    // call in the history.
    bob.send(ClientMsg::Presence {
        status: Status::Available,
        idle_ms: 0,
        note: None,
    })
    .await
    .unwrap();
    loop {
        let p = until(&mut alice, "presence_update").await;
        if p["status"] == "available" {
            break;
        }
    }
    send(&mut alice, json!({"type": "dial", "to": "bob", "id": 9})).await;
    let dialing = until(&mut alice, "dialing").await;
    let call_id = dialing["call_id"].as_str().unwrap().to_owned();
    // Bob's device answers, but this session set up no WebRTC media (a browser page
    // offers it at sign-in): the call cannot be bridged and ends, recorded.
    let ended = until(&mut alice, "call_ended").await;
    assert_eq!(ended["call_id"], call_id.as_str(), "{ended}");
    assert_eq!(ended["reason"], "failed", "{ended}");
    let mut calls = Value::Null;
    for _ in 0..50 {
        send(&mut alice, json!({"type": "call_history", "id": 11})).await;
        let page = until(&mut alice, "call_history").await;
        assert_eq!(page["id"], 11, "{page}");
        if page["calls"].as_array().is_some_and(|c| !c.is_empty()) {
            calls = page["calls"].clone();
            break;
        }
        // The CDR is written a moment after the call ends.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let call = &calls[0];
    assert_eq!(call["call_id"], call_id.as_str(), "{calls}");
    assert_eq!(call["direction"], "outgoing", "{call}");
    assert_eq!(call["peer"], "+15550100002", "{call}");
    // Bob's device answered; the call could not carry media.
    assert_eq!(call["answered_by"], "desk", "{call}");
    assert_eq!(call["disposition"], "FAILED", "{call}");
    // Bob's own history has it the other way round, and not alice's other calls.
    let cdrs = node.cdrs();
    assert!(
        cdrs.iter().any(|c| c["call_id"] == call_id.as_str()),
        "{cdrs:?}"
    );

    // A cursor the node did not give is refused, naming the request.
    send(
        &mut alice,
        json!({"type": "call_history", "before": "x", "id": 12}),
    )
    .await;
    let e = until(&mut alice, "error").await;
    assert_eq!(e["code"], "bad_message", "{e}");
    assert_eq!(e["id"], 12, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("call_history"),
        "{e}"
    );

    // Going away ends the session: bob sees alice offline.
    bob.send(ClientMsg::Subscribe {
        users: vec!["alice".into()],
    })
    .await
    .unwrap();
    bob.wait_for(Duration::from_secs(10), |m| {
        matches!(m, ServerMsg::PresenceUpdate { user, status: Status::Available, .. } if user == "alice")
    })
    .await
    .expect("alice's browser session not seen as available");
    alice.close(None).await.unwrap();
    bob.wait_for(Duration::from_secs(10), |m| {
        matches!(m, ServerMsg::PresenceUpdate { user, status: Status::Offline, .. } if user == "alice")
    })
    .await
    .expect("alice's browser session did not end");
    assert!(node.metric("parley_web_sessions_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_keeps_every_rule_of_the_quic_path() {
    let node = Node::start();

    // A page of another site cannot open it at all.
    let refused = open(&node, Some("http://evil.example")).await;
    match refused {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("a foreign origin got {other:?}"),
    }
    assert!(node.metric("parley_web_sessions_refused_total{reason=\"origin\"") >= 1.0);

    // Login first.
    let mut ws = open(&node, None).await.unwrap();
    send(&mut ws, json!({"type": "presence", "status": "available"})).await;
    fatal(&mut ws, "not_logged_in").await;

    // A wrong password is refused like on QUIC.
    let mut ws = open(&node, None).await.unwrap();
    send(
        &mut ws,
        json!({"type": "login", "tenant": "demo", "user": "alice", "password": "nope", "device": "b"}),
    )
    .await;
    fatal(&mut ws, "auth_failed").await;

    // Not JSON.
    let mut ws = open(&node, None).await.unwrap();
    ws.send(Message::Text("{not json".into())).await.unwrap();
    fatal(&mut ws, "bad_message").await;

    // Binary messages are not the protocol.
    let mut ws = login(&node, "alice").await;
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    fatal(&mut ws, "bad_message").await;

    // Over the 64 KiB limit.
    let mut ws = login(&node, "alice").await;
    let long = format!(
        r#"{{"type":"chat","to":"bob","text":"{}","id":1}}"#,
        "x".repeat(70 * 1024)
    );
    ws.send(Message::Text(long.into())).await.unwrap();
    let e = until(&mut ws, "error").await;
    assert_eq!(e["code"], "bad_message", "{e}");
    assert!(e["message"].as_str().unwrap().contains("65536"), "{e}");

    // A bad request after login names it and the session goes on (as on QUIC).
    let mut ws = login(&node, "alice").await;
    send(
        &mut ws,
        json!({"type": "book_search", "query": "q".repeat(300), "id": 5}),
    )
    .await;
    let e = until(&mut ws, "error").await;
    assert_eq!(e["id"], 5, "{e}");
    assert_eq!(e["fatal"], false, "{e}");
    send(&mut ws, json!({"type": "ping", "id": 6})).await;
    let pong = until(&mut ws, "pong").await;
    assert_eq!(pong["id"], 6, "{pong}");

    // The node survived all of it.
    let dev = node.device(node.device_config("bob", "desk")).await;
    assert!(dev.number().starts_with("+1555"));
}

/// Whether the node closes `s` (end of stream or reset) before `within` passes; `false`
/// if it is still open then.
async fn closed_by_node(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A response (408 and the like) before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_listener_closes_slow_clients_and_caps_its_connections() {
    use tokio::io::AsyncWriteExt;
    let node = Node::start_with_tail(
        "",
        "",
        "",
        200,
        "[web]\nlisten = \"127.0.0.1:0\"\nmax_connections = 3\nheader_timeout_secs = 1\n",
    );
    let host = web_host(&node);
    // A client that connects and says nothing, and one that sends its headers a byte at
    // a time (slowloris): the node closes both once the header timeout passes, however
    // long they would go on.
    let mut idle = tokio::net::TcpStream::connect(&host).await.unwrap();
    let slow = tokio::net::TcpStream::connect(&host).await.unwrap();
    let (mut slow_rx, mut slow_tx) = slow.into_split();
    let dribble = tokio::spawn(async move {
        let _ = slow_tx.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow_tx.write_all(b"X").await.is_err() {
                return true;
            }
        }
        false
    });
    assert!(closed_by_node(&mut idle, Duration::from_secs(15)).await);
    {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(15), slow_rx.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "the slow client is still connected");
    }
    dribble.abort();

    // Three WebSockets hold the three slots (past the upgrade, whatever the header
    // timeout): a fourth connection is closed at once, counted, and the sessions live on.
    let mut held = Vec::new();
    for (user, device) in [("alice", "tab1"), ("alice", "tab2"), ("bob", "tab1")] {
        held.push(login_as(&node, user, device).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut surplus = tokio::net::TcpStream::connect(&host).await.unwrap();
    let _ = surplus
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    // Closed unanswered: not a page first and a close after the header timeout.
    {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), surplus.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "the connection over the cap was served: {r:?}"
        );
    }
    assert_eq!(
        node.metric("parley_web_sessions_refused_total{reason=\"connections\"}"),
        1.0
    );
    send(&mut held[0], json!({"type": "ping", "id": 7})).await;
    let pong = until(&mut held[0], "pong").await;
    assert_eq!(pong["id"], 7);
    // One closes: its slot is free again, and the page is served.
    let mut first = held.remove(0);
    first.close(None).await.unwrap();
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ok = tokio::task::spawn_blocking({
            let host = host.clone();
            move || {
                let mut s = std::net::TcpStream::connect(&host).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                write!(
                    s,
                    "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                )
                .ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out.starts_with("HTTP/1.1 200"))
            }
        })
        .await
        .unwrap();
        if ok == Some(true) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the freed slot was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
