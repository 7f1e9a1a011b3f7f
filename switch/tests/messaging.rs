//! The messaging service over real QUIC connections with `parley-load` devices: chats to
//! offline users kept and handed over at login, in order, across a node crash; history
//! paged on a fresh device; copies to the sender's other devices; delivery and read
//! receipts; quotas; and nobody reading or marking another user's messages.

mod common;

use std::time::Duration;

use common::*;
use parley_codecs::control::{ChatRecord, ClientMsg, ReceiptStatus, ServerMsg};
use parley_load::device::Device;

const T: Duration = Duration::from_secs(10);

/// alice, bob (demo), carol (demo), olga (tenant `other`); `chat` keys in `[chat]`.
fn node(store: StoreKind, chat: &str) -> Node {
    Node::start_on(
        store,
        [
            "",
            "",
            "",
            &format!(
                "[[users]]\ntenant = \"demo\"\nuser = \"carol\"\nnumber = \"+15550100003\"\npassword = \"demo\"\n\
             [[users]]\ntenant = \"other\"\nuser = \"olga\"\nnumber = \"+15550100009\"\npassword = \"demo\"\n\
             [chat]\n{chat}\n"
            ),
        ],
        200,
    )
}

fn device_of(
    node: &Node,
    tenant: &str,
    user: &str,
    device: &str,
) -> parley_load::device::DeviceConfig {
    let mut cfg = node.device_config(user, device);
    cfg.tenant = tenant.into();
    cfg
}

/// Sends a chat and returns its ack's (message id, delivered, stored).
async fn chat(dev: &mut Device, to: &str, text: &str, id: u64) -> (u64, u32, bool) {
    dev.send(ClientMsg::Chat {
        to: to.into(),
        text: text.into(),
        id,
    })
    .await
    .unwrap();
    match dev
        .wait_for(T, |m| {
            matches!(m, ServerMsg::ChatAck { id: i, .. } if *i == id)
                || matches!(m, ServerMsg::Error { id: Some(i), .. } if *i == id)
        })
        .await
    {
        Some(ServerMsg::ChatAck {
            message,
            delivered,
            stored,
            ..
        }) => (message, delivered, stored),
        other => panic!("chat {text:?} to {to}: {other:?}"),
    }
}

/// The next `n` chats a device receives, as (id, from, text, own).
async fn chats(dev: &mut Device, n: usize) -> Vec<(u64, String, String, bool)> {
    let mut got = Vec::new();
    while got.len() < n {
        match dev
            .wait_for(T, |m| matches!(m, ServerMsg::Chat { .. }))
            .await
        {
            Some(ServerMsg::Chat {
                id,
                from,
                text,
                own,
                ..
            }) => got.push((id, from, text, own)),
            other => panic!("expected {n} chats, got {got:?} then {other:?}"),
        }
    }
    got
}

/// Receipts a device receives until it has `n`, as (message, status).
async fn receipts(dev: &mut Device, n: usize) -> Vec<(u64, ReceiptStatus)> {
    let mut got = Vec::new();
    while got.len() < n {
        match dev
            .wait_for(T, |m| matches!(m, ServerMsg::ChatReceipt { .. }))
            .await
        {
            Some(ServerMsg::ChatReceipt {
                message, status, ..
            }) => got.push((message, status)),
            other => panic!("expected {n} receipts, got {got:?} then {other:?}"),
        }
    }
    got
}

async fn history(
    dev: &mut Device,
    with: &str,
    (before, after, limit): (Option<u64>, Option<u64>, Option<u32>),
    id: u64,
) -> Result<(Vec<ChatRecord>, bool), String> {
    let msg = ClientMsg::ChatHistory {
        with: with.into(),
        before,
        after,
        limit,
    };
    dev.send_request(msg, id).await.unwrap();
    match dev
        .wait_for(T, |m| {
            matches!(m, ServerMsg::ChatHistory { id: Some(i), .. } | ServerMsg::Error { id: Some(i), .. } if *i == id)
        })
        .await
    {
        Some(ServerMsg::ChatHistory {
            messages, more, ..
        }) => Ok((messages, more)),
        Some(ServerMsg::Error { code, .. }) => Err(code),
        other => panic!("chat_history: {other:?}"),
    }
}

/// Waits until a device's next message with request `id` is an error; returns its code.
async fn error_code(dev: &mut Device, id: u64) -> String {
    match dev
        .wait_for(
            T,
            |m| matches!(m, ServerMsg::Error { id: Some(i), .. } if *i == id),
        )
        .await
    {
        Some(ServerMsg::Error { code, fatal, .. }) => {
            assert!(!fatal);
            code
        }
        other => panic!("no error for request {id}: {other:?}"),
    }
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_to_an_offline_user_arrive_at_login_in_order_after_a_crash(store) {
    let node = node(store, "");
    let mut alice = node.device(node.device_config("alice", "desk")).await;
    let mut sent = Vec::new();
    for (i, text) in ["one", "two", "three"].into_iter().enumerate() {
        let (message, delivered, stored) = chat(&mut alice, "bob", text, i as u64 + 1).await;
        assert_eq!((delivered, stored), (0, true), "{text}");
        sent.push(message);
    }
    assert!(sent.windows(2).all(|w| w[0] < w[1]), "{sent:?}");
    drop(alice);

    // The node dies; what it kept is on disk.
    let node = node.crash_and_restart();
    let mut alice = node.device(node.device_config("alice", "desk")).await;
    let mut bob = node.device(node.device_config("bob", "desk")).await;
    let got = chats(&mut bob, 3).await;
    assert_eq!(
        got,
        vec![
            (sent[0], "alice".to_owned(), "one".to_owned(), false),
            (sent[1], "alice".to_owned(), "two".to_owned(), false),
            (sent[2], "alice".to_owned(), "three".to_owned(), false),
        ]
    );
    // Alice learns each was delivered.
    let mut d = receipts(&mut alice, 3).await;
    d.sort_by_key(|(m, _)| *m);
    assert_eq!(
        d,
        sent.iter()
            .map(|m| (*m, ReceiptStatus::Delivered))
            .collect::<Vec<_>>()
    );
    // Bob reads up to the last: alice gets a read receipt naming it.
    bob.send(ClientMsg::ChatRead { message: sent[2] })
        .await
        .unwrap();
    assert_eq!(
        receipts(&mut alice, 1).await,
        vec![(sent[2], ReceiptStatus::Read)]
    );
    // And back: bob's answer is delivered at once (his ack says so; a receipt tells his
    // other devices), and alice's read reaches bob.
    let mut phone = node.device(node.device_config("bob", "phone")).await;
    let (answer, delivered, stored) = chat(&mut bob, "alice", "got them", 9).await;
    assert_eq!((delivered, stored), (1, false));
    let (id, from, text, _) = chats(&mut alice, 1).await.remove(0);
    assert_eq!(
        (id, from.as_str(), text.as_str()),
        (answer, "bob", "got them")
    );
    assert_eq!(
        receipts(&mut phone, 1).await,
        vec![(answer, ReceiptStatus::Delivered)]
    );
    alice
        .send(ClientMsg::ChatRead { message: answer })
        .await
        .unwrap();
    assert_eq!(
        receipts(&mut bob, 1).await,
        vec![(answer, ReceiptStatus::Read)]
    );
    // Delivered once: a second device of bob's gets nothing from the inbox.
    let mut tablet = node.device(node.device_config("bob", "tablet")).await;
    tablet.send(ClientMsg::Ping { id: 5 }).await.unwrap();
    let before_pong: Vec<ServerMsg> = {
        let mut v = Vec::new();
        while let Some(m) = tablet.next_event(T).await {
            if m == (ServerMsg::Pong { id: 5 }) {
                break;
            }
            v.push(m);
        }
        v
    };
    assert!(
        !before_pong
            .iter()
            .any(|m| matches!(m, ServerMsg::Chat { .. })),
        "{before_pong:?}"
    );
    assert_eq!(node.metric("parley_chat_offline_delivered_total"), 3.0);
    // History shows it all, read flags included.
    let (page, more) = history(&mut tablet, "alice", (None, None, None), 20)
        .await
        .unwrap();
    assert!(!more);
    let flags: Vec<(&str, bool, bool)> = page
        .iter()
        .map(|m| (m.text.as_str(), m.delivered, m.read))
        .collect();
    assert_eq!(
        flags,
        [
            ("one", true, true),
            ("two", true, true),
            ("three", true, true),
            ("got them", true, true)
        ]
    );
}
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_on_a_fresh_device_and_copies_reach_the_senders_other_devices(store) {
    let node = node(store, "");
    let mut desk = node.device(node.device_config("alice", "desk")).await;
    let mut mobile = node.device(node.device_config("alice", "mobile")).await;
    let mut bob = node.device(node.device_config("bob", "desk")).await;
    let mut ids = Vec::new();
    for i in 1..=5u64 {
        ids.push(chat(&mut desk, "bob", &format!("a{i}"), i).await.0);
    }
    // The mobile sees what the desk sent, marked as its own; the desk does not get copies.
    let copies = chats(&mut mobile, 5).await;
    assert!(
        copies
            .iter()
            .zip(&ids)
            .all(|((id, from, _, own), sent)| id == sent && from == "alice" && *own),
        "{copies:?}"
    );
    assert_eq!(chats(&mut bob, 5).await.len(), 5);
    for i in 1..=2u64 {
        ids.push(chat(&mut bob, "alice", &format!("b{i}"), 10 + i).await.0);
    }
    desk.send(ClientMsg::Ping { id: 77 }).await.unwrap();
    let mut seen_by_desk = Vec::new();
    while let Some(m) = desk.next_event(T).await {
        if m == (ServerMsg::Pong { id: 77 }) {
            break;
        }
        seen_by_desk.push(m);
    }
    assert!(
        !seen_by_desk
            .iter()
            .any(|m| matches!(m, ServerMsg::Chat { own: true, .. })),
        "the sending device got its own copy: {seen_by_desk:?}"
    );

    // A fresh device pages back through the conversation.
    let mut laptop = node.device(node.device_config("alice", "laptop")).await;
    let (latest, more) = history(&mut laptop, "bob", (None, None, Some(3)), 1)
        .await
        .unwrap();
    let texts = |p: &[ChatRecord]| p.iter().map(|m| m.text.clone()).collect::<Vec<_>>();
    assert_eq!(
        (texts(&latest), more),
        (vec!["a5".into(), "b1".into(), "b2".into()], true)
    );
    assert_eq!(
        (
            latest[0].from.as_str(),
            latest[0].to.as_str(),
            latest[2].from.as_str()
        ),
        ("alice", "bob", "bob")
    );
    let (older, more) = history(&mut laptop, "bob", (Some(latest[0].id), None, Some(3)), 2)
        .await
        .unwrap();
    assert_eq!(
        (texts(&older), more),
        (vec!["a2".into(), "a3".into(), "a4".into()], true)
    );
    let (oldest, more) = history(&mut laptop, "bob", (Some(older[0].id), None, Some(3)), 3)
        .await
        .unwrap();
    assert_eq!((texts(&oldest), more), (vec!["a1".into()], false));
    let (after, more) = history(&mut laptop, "bob", (None, Some(ids[0]), None), 4)
        .await
        .unwrap();
    assert_eq!((after.len(), more), (6, false));

    // The archive is the user's own: carol sees nothing of it, another tenant cannot
    // name alice, and nobody marks another user's message read.
    let mut carol = node.device(node.device_config("carol", "desk")).await;
    assert!(
        history(&mut carol, "alice", (None, None, None), 5)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    assert!(
        history(&mut carol, "bob", (None, None, None), 6)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    let mut olga = node.device(device_of(&node, "other", "olga", "desk")).await;
    for (i, name) in ["alice", "alice@demo"].into_iter().enumerate() {
        assert_eq!(
            history(&mut olga, name, (None, None, None), 7 + i as u64).await,
            Err("unknown_user".into()),
            "{name}"
        );
    }
    carol
        .send_request(ClientMsg::ChatRead { message: ids[0] }, 9)
        .await
        .unwrap();
    assert_eq!(error_code(&mut carol, 9).await, "unknown_message");
    // Alice cannot mark her own sent message read on bob's behalf either.
    desk.send_request(ClientMsg::ChatRead { message: ids[0] }, 10)
        .await
        .unwrap();
    assert_eq!(error_code(&mut desk, 10).await, "unknown_message");
    let (page, _) = history(&mut bob, "alice", (None, None, None), 11)
        .await
        .unwrap();
    assert!(page.iter().all(|m| !m.read), "{page:?}");
    // Both cursors at once is a question the server refuses.
    assert_eq!(
        history(&mut bob, "alice", (Some(5), Some(1), None), 12).await,
        Err("bad_message".into())
    );
}
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_users_mailbox_has_a_quota(store) {
    let node = node(store, "offline_max_messages = 3");
    let mut alice = node.device(node.device_config("alice", "desk")).await;
    for i in 1..=3u64 {
        assert!(chat(&mut alice, "bob", "hi", i).await.2);
    }
    alice
        .send(ClientMsg::Chat {
            to: "bob".into(),
            text: "one too many".into(),
            id: 4,
        })
        .await
        .unwrap();
    assert_eq!(error_code(&mut alice, 4).await, "mailbox_full");
    assert_eq!(
        node.metric("parley_chat_messages_total{result=\"mailbox_full\"}"),
        1.0
    );
    // Once bob has them, there is room again.
    let mut bob = node.device(node.device_config("bob", "desk")).await;
    assert_eq!(chats(&mut bob, 3).await.len(), 3);
    // The delivery is recorded before its receipts go out.
    assert_eq!(receipts(&mut alice, 3).await.len(), 3);
    bob.close();
    let deadline = std::time::Instant::now() + T;
    while !node
        .get("/api/v1/users/bob/presence", true)
        .1
        .contains("\"devices\":[]")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "bob never went offline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(chat(&mut alice, "bob", "again", 5).await.2);
}
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_device_shows_chats_sends_them_and_marks_them_read(store) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let node = node(store, "");
    let mut alice = node.device(node.device_config("alice", "desk")).await;
    let (kept, _, stored) = chat(&mut alice, "bob", "while you were out", 1).await;
    assert!(stored);
    let mut bob = tokio::process::Command::new(common::parley_load_bin())
        .args(["device", "--target", &node.quic.to_string(), "--cert"])
        .arg(node.data_dir().join("quic-cert.der"))
        .args(["--user", "bob", "--password", "demo", "--device", "cli"])
        .args([
            "--stats-every",
            "0",
            "--duration",
            "30s",
            "--stdin",
            "--mark-read",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn parley-load device");
    let mut out = tokio::io::BufReader::new(bob.stdout.take().unwrap()).lines();
    let mut stdin = bob.stdin.take().unwrap();
    let mut until = async |want: &str| {
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(T, out.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {want:?} in {seen:#?}"))
                .unwrap()
                .unwrap_or_else(|| panic!("output ended without {want:?}: {seen:#?}"));
            if line.contains(want) {
                return line;
            }
            seen.push(line);
        }
    };
    // The kept message is shown at login, and read: alice gets the receipt.
    until(&format!("chat {kept} from alice: while you were out")).await;
    assert_eq!(
        receipts(&mut alice, 2).await,
        vec![
            (kept, ReceiptStatus::Delivered),
            (kept, ReceiptStatus::Read)
        ]
    );
    // A line of JSON on stdin is sent as it is: a chat to alice and a history request.
    stdin
        .write_all(b"{\"type\":\"chat\",\"to\":\"alice\",\"text\":\"back now\",\"id\":5}\n")
        .await
        .unwrap();
    let (_, from, text, _) = chats(&mut alice, 1).await.remove(0);
    assert_eq!((from.as_str(), text.as_str()), ("bob", "back now"));
    until("delivered to 1 devices").await;
    stdin
        .write_all(b"{\"type\":\"chat_history\",\"with\":\"alice\",\"id\":6}\n")
        .await
        .unwrap();
    until("history with alice: 2 messages").await;
    until("alice -> bob: while you were out (read)").await;
}
}
