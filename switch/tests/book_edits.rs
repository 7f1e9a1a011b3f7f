//! The address book in the IM client: a user renames, notes, favourites, deletes and
//! blocks entries and searches the book from a `parley-load` device (and an operator does
//! the same through the admin API); every device of the user sees each change, calls do
//! not undo the user's words, a deleted entry stays deleted, a blocked caller is refused
//! by routing and still recorded, entries that are Parley users carry their presence, and
//! no device reaches another user's book.

mod common;

use std::time::Duration;

use common::*;
use parley_codecs::control::{AddressBookEntry, ClientMsg, ServerMsg, Status};
use parley_load::device::Device;

const CAROL: &str = "+15557770001";
const T: Duration = Duration::from_secs(10);

/// The node's users: alice +15550100001 and bob +15550100002 (tenant demo, region US),
/// olga +15550100009 of tenant `other`.
fn node(store: StoreKind) -> Node {
    Node::start_with_olga(store)
}

/// Sends `msg` with request id `id` and returns the answer that echoes it (`book_ok`,
/// `book_results` or `error`).
async fn request(dev: &mut Device, msg: ClientMsg, id: u64) -> ServerMsg {
    request_seen(dev, msg, id, &mut Vec::new()).await
}

/// [`request`], keeping the other messages that came before the answer in `seen`.
async fn request_seen(
    dev: &mut Device,
    msg: ClientMsg,
    id: u64,
    seen: &mut Vec<ServerMsg>,
) -> ServerMsg {
    dev.send_request(msg.clone(), id).await.unwrap();
    loop {
        let m = dev
            .next_event(T)
            .await
            .unwrap_or_else(|| panic!("no answer to {msg:?}"));
        match &m {
            ServerMsg::BookOk { id: i, .. }
            | ServerMsg::BookResults { id: i, .. }
            | ServerMsg::Error { id: i, .. }
                if i == &Some(id) =>
            {
                return m;
            }
            _ => seen.push(m),
        }
    }
}

/// A message matching `f`: among those already `seen` (taken from there), or the next one.
async fn seen_or_next(
    dev: &mut Device,
    seen: &mut Vec<ServerMsg>,
    f: impl Fn(&ServerMsg) -> bool,
) -> Option<ServerMsg> {
    if let Some(i) = seen.iter().position(&f) {
        return Some(seen.remove(i));
    }
    dev.wait_for(T, f).await
}

/// The entry a `book_ok` carries.
fn ok_entry(m: ServerMsg) -> AddressBookEntry {
    match m {
        ServerMsg::BookOk { entry: Some(e), .. } => e,
        other => panic!("expected book_ok with an entry, got {other:?}"),
    }
}

fn error_code(m: &ServerMsg) -> &str {
    match m {
        ServerMsg::Error { code, fatal, .. } => {
            assert!(!fatal, "{m:?}");
            code
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn search(dev: &mut Device, query: &str, id: u64) -> Vec<String> {
    let msg = ClientMsg::BookSearch {
        query: query.into(),
        limit: None,
    };
    match request(dev, msg, id).await {
        ServerMsg::BookResults {
            entries, query: q, ..
        } => {
            assert_eq!(q, query);
            entries.into_iter().map(|e| e.address).collect()
        }
        other => panic!("expected book_results, got {other:?}"),
    }
}

async fn set_presence(dev: &Device, status: Status) {
    let msg = ClientMsg::Presence {
        status,
        idle_ms: 0,
        note: None,
    };
    dev.send(msg).await.unwrap();
}

/// Waits for `user`'s presence `status` on `dev`.
async fn sees(dev: &mut Device, user: &str, status: Status, what: &str) {
    dev.wait_for(T, |m| {
        matches!(m, ServerMsg::PresenceUpdate { user: u, status: s, .. } if u == user && *s == status)
    })
    .await
    .unwrap_or_else(|| panic!("{what}"));
}

/// Waits until a device's copy of its book satisfies `f`.
async fn until_book(dev: &Device, what: &str, f: impl Fn(&[AddressBookEntry]) -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !f(&dev.address_book()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: book is {:#?}",
            dev.address_book()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn find<'a>(book: &'a [AddressBookEntry], address: &str) -> Option<&'a AddressBookEntry> {
    book.iter().find(|e| e.address == address)
}

fn admin_book(node: &Node, tenant: &str, user: &str) -> Vec<serde_json::Value> {
    let (st, body) = node.get(
        &format!("/api/v1/users/{user}/address-book?tenant={tenant}"),
        true,
    );
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// One SIPp gateway call to alice from CAROL ("SIPp Gateway"), answered by a device.
async fn answered_call(node: &Node) {
    let pcmu = scenario(node.dir.path(), "uac_pcmu.xml");
    let run = sipp_uac(
        node,
        &["-sf", pcmu.to_str().unwrap(), "-d", "200"],
        "+15550100001",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(
        (run.code, run.successful),
        (0, 1),
        "{}\n{}",
        run.output,
        node.log()
    );
}

/// One SIPp gateway call to alice from CAROL that must be declined with 603.
async fn declined_call(node: &Node) {
    let declined = scenario(node.dir.path(), "uac_603_from.xml");
    let run = sipp_uac(
        node,
        &["-sf", declined.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        // The caller is the prefix followed by the call number (1).
        &["-key", "prefix", "+1555777000"],
    )
    .await;
    assert_eq!(
        (run.code, run.successful),
        (0, 1),
        "{}\n{}",
        run.output,
        node.log()
    );
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_reach_every_device_and_calls_do_not_undo_them(store) {
    let node = node(store);
    let mut desk = node.device(node.device_config("alice", "desk")).await;
    let mobile = node.device(node.device_config("alice", "mobile")).await;

    // A gateway call, answered: an entry named by its caller id.
    answered_call(&node).await;
    until_book(&mobile, "the call's entry", |b| {
        find(b, CAROL).is_some_and(|e| e.name.as_deref() == Some("SIPp Gateway"))
    })
    .await;

    // Renamed, noted and made a favourite from the desk, the number written as people do.
    let e = ok_entry(
        request(
            &mut desk,
            ClientMsg::BookSet {
                address: "+1 555 777 0001".into(),
                name: Some("Carol".into()),
                note: Some("plumber, evenings".into()),
                favourite: Some(true),
            },
            1,
        )
        .await,
    );
    assert_eq!(
        (
            e.address.as_str(),
            e.name.as_deref(),
            e.note.as_deref(),
            e.favourite,
            e.known,
            e.call_count
        ),
        (
            CAROL,
            Some("Carol"),
            Some("plumber, evenings"),
            true,
            true,
            1
        )
    );
    until_book(&mobile, "the rename on the other device", |b| {
        find(b, CAROL).is_some_and(|e| e.name.as_deref() == Some("Carol") && e.favourite)
    })
    .await;

    // Another call with a caller id: counted, and the user's name stays.
    answered_call(&node).await;
    until_book(&mobile, "the second call", |b| {
        find(b, CAROL).is_some_and(|e| e.call_count == 2)
    })
    .await;
    let book = admin_book(&node, "demo", "alice");
    let row = book.iter().find(|e| e["address"] == CAROL).unwrap();
    assert_eq!(
        (&row["name"], &row["note"], &row["favourite"]),
        (
            &serde_json::json!("Carol"),
            &serde_json::json!("plumber, evenings"),
            &serde_json::json!(true)
        ),
        "{row}"
    );

    // Search: by note (any case), by digits as written, nothing.
    assert_eq!(search(&mut desk, "PLUMB", 2).await, vec![CAROL]);
    assert_eq!(search(&mut desk, "777 0001", 3).await, vec![CAROL]);
    assert!(search(&mut desk, "zebra", 4).await.is_empty());
    // A LIKE wildcard is a character like any other.
    assert!(search(&mut desk, "%", 41).await.is_empty());

    // Refusals name the request and leave the connection up.
    let bad = request(
        &mut desk,
        ClientMsg::BookSet {
            address: "hello".into(),
            name: None,
            note: None,
            favourite: None,
        },
        5,
    )
    .await;
    assert_eq!(error_code(&bad), "bad_entry");
    let unknown = request(
        &mut desk,
        ClientMsg::BookDelete {
            address: "+15559990000".into(),
        },
        6,
    )
    .await;
    assert_eq!(error_code(&unknown), "unknown_entry");

    // Deleted: gone from both devices and the admin API, and a later call does not bring
    // it back (the call is still recorded).
    let deleted = request(
        &mut desk,
        ClientMsg::BookDelete {
            address: CAROL.into(),
        },
        7,
    )
    .await;
    assert_eq!(
        deleted,
        ServerMsg::BookOk {
            id: Some(7),
            entry: None
        }
    );
    until_book(&mobile, "the delete", |b| find(b, CAROL).is_none()).await;
    answered_call(&node).await;
    assert_eq!(node.wait_cdrs(3).len(), 3);
    assert!(
        !admin_book(&node, "demo", "alice")
            .iter()
            .any(|e| e["address"] == CAROL),
        "a call brought a deleted entry back"
    );
    assert!(find(&mobile.address_book(), CAROL).is_none());

    // Added again by the user: back, without the old words or counts.
    let back = ok_entry(
        request(
            &mut desk,
            ClientMsg::BookSet {
                address: CAROL.into(),
                name: None,
                note: None,
                favourite: None,
            },
            8,
        )
        .await,
    );
    assert_eq!(
        (
            back.call_count,
            back.name.as_deref(),
            back.note.as_deref(),
            back.known
        ),
        (0, None, None, true)
    );
    // Calls count again; the caller id names it again.
    answered_call(&node).await;
    until_book(&mobile, "calls counting again", |b| {
        find(b, CAROL)
            .is_some_and(|e| e.call_count == 1 && e.name.as_deref() == Some("SIPp Gateway"))
    })
    .await;

    // Blocked: routing declines the caller (603), the CDR records it, no device rings.
    let blocked = ok_entry(
        request(
            &mut desk,
            ClientMsg::BookBlock {
                address: CAROL.into(),
                blocked: true,
            },
            9,
        )
        .await,
    );
    assert!(blocked.blocked);
    until_book(&mobile, "the block", |b| {
        find(b, CAROL).is_some_and(|e| e.blocked)
    })
    .await;
    let offered = desk.stats().snapshot().calls_offered + mobile.stats().snapshot().calls_offered;
    declined_call(&node).await;
    let cdrs = node.wait_cdrs(5);
    let last = cdrs
        .iter()
        .filter(|c| c["caller"] == CAROL)
        .max_by_key(|c| c["end_time"].as_str().unwrap().to_owned())
        .unwrap();
    assert_eq!(
        (&last["disposition"], &last["sip_cause"]),
        (&serde_json::json!("REJECTED"), &serde_json::json!(603)),
        "{last}"
    );
    assert_eq!(
        desk.stats().snapshot().calls_offered + mobile.stats().snapshot().calls_offered,
        offered,
        "a blocked caller rang a device"
    );
    // A blocked entry is not deleted unseen.
    let refused = request(
        &mut desk,
        ClientMsg::BookDelete {
            address: CAROL.into(),
        },
        10,
    )
    .await;
    assert_eq!(error_code(&refused), "entry_blocked");

    // The block survives a crash and restart.
    drop((desk, mobile));
    let node = node.crash_and_restart();
    declined_call(&node).await;
    let mut desk = node.device(node.device_config("alice", "desk")).await;
    until_book(&desk, "the book after the restart", |b| {
        // Missed: the declined call before the restart and the one after it.
        find(b, CAROL).is_some_and(|e| e.blocked && e.missed == 2)
    })
    .await;

    // Unblocked: the caller rings again.
    let unblocked = ok_entry(
        request(
            &mut desk,
            ClientMsg::BookBlock {
                address: CAROL.into(),
                blocked: false,
            },
            11,
        )
        .await,
    );
    assert!(!unblocked.blocked);
    answered_call(&node).await;

    assert_eq!(
        node.metric("parley_address_book_edits_total{op=\"unblock\",result=\"ok\"}"),
        1.0
    );
}
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_are_users_carry_presence_and_dial_in_one_message(store) {
    let node = node(store);
    let mut desk = node.device(node.device_config("alice", "desk")).await;

    // Bob's number in alice's book: the entry names him, and his presence follows.
    let mut seen = Vec::new();
    let e = ok_entry(
        request_seen(
            &mut desk,
            ClientMsg::BookSet {
                address: "5550100002".into(),
                name: Some("Bob B.".into()),
                note: None,
                favourite: None,
            },
            1,
            &mut seen,
        )
        .await,
    );
    assert_eq!(
        (e.address.as_str(), e.user.as_deref()),
        ("+15550100002", Some("bob"))
    );
    let first = seen_or_next(
        &mut desk,
        &mut seen,
        |m| matches!(m, ServerMsg::PresenceUpdate { user, .. } if user == "bob"),
    )
    .await
    .expect("bob's presence without a subscription");
    assert!(
        matches!(
            &first,
            ServerMsg::PresenceUpdate {
                status: Status::Offline,
                devices: 0,
                ..
            }
        ),
        "{first:?}"
    );
    // Olga's number is another tenant's user: just an address.
    let o = ok_entry(
        request(
            &mut desk,
            ClientMsg::BookSet {
                address: "+15550100009".into(),
                name: None,
                note: None,
                favourite: None,
            },
            2,
        )
        .await,
    );
    assert_eq!(o.user, None);

    let mut bob = node.device(node.device_config("bob", "desk")).await;
    bob.send(ClientMsg::Presence {
        status: Status::Busy,
        idle_ms: 0,
        note: Some("meeting".into()),
    })
    .await
    .unwrap();
    sees(&mut desk, "bob", Status::Busy, "bob busy").await;

    // Unsubscribing by hand does not stop what the book shows.
    desk.send(ClientMsg::Unsubscribe {
        users: vec!["bob".into()],
    })
    .await
    .unwrap();
    set_presence(&bob, Status::Away).await;
    sees(&mut desk, "bob", Status::Away, "bob away after unsubscribe").await;

    // A device logging in later gets the entry with its user, then that user's presence.
    let mut mobile = node.device(node.device_config("alice", "mobile")).await;
    until_book(&mobile, "the book at login", |b| {
        find(b, "+15550100002").is_some_and(|e| e.user.as_deref() == Some("bob"))
    })
    .await;
    sees(&mut mobile, "bob", Status::Away, "bob's presence at login").await;

    // Dialling the entry is one message: its address (bob available, so he rings).
    set_presence(&bob, Status::Available).await;
    sees(&mut mobile, "bob", Status::Available, "bob available").await;
    let address = find(&mobile.address_book(), "+15550100002")
        .unwrap()
        .address
        .clone();
    mobile.send(ClientMsg::Dial { to: address }).await.unwrap();
    mobile
        .wait_for(T, |m| matches!(m, ServerMsg::Dialing { .. }))
        .await
        .expect("dialing");
    bob.wait_for(T, |m| matches!(m, ServerMsg::IncomingCall { .. }))
        .await
        .expect("bob rings");

    // Deleted from the book (and not subscribed by hand): bob's presence stops.
    let mut seen = Vec::new();
    let gone = request_seen(
        &mut desk,
        ClientMsg::BookDelete {
            address: "+15550100002".into(),
        },
        3,
        &mut seen,
    )
    .await;
    assert!(
        matches!(gone, ServerMsg::BookOk { entry: None, .. }),
        "{gone:?}"
    );
    let removal = |m: &ServerMsg| matches!(m, ServerMsg::AddressBookUpdate { removed, .. } if removed.iter().any(|r| r == "+15550100002"));
    seen_or_next(&mut desk, &mut seen, removal)
        .await
        .expect("the delete on the desk");
    mobile
        .wait_for(T, removal)
        .await
        .expect("the delete on the mobile");
    set_presence(&bob, Status::DoNotDisturb).await;
    // Once bob's actor shows the change, it has also published it: a `presence_update`
    // for alice's devices would be in their sessions' mailboxes before a later ping.
    let deadline = std::time::Instant::now() + T;
    loop {
        let (st, body) = node.get("/api/v1/users/bob/presence", true);
        assert_eq!(st, 200, "{body}");
        if body.contains("do_not_disturb") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for dev in [&mut desk, &mut mobile] {
        dev.send(ClientMsg::Ping { id: 99 }).await.unwrap();
        let mut late = Vec::new();
        while let Some(m) = dev.next_event(T).await {
            if m == (ServerMsg::Pong { id: 99 }) {
                break;
            }
            late.push(m);
        }
        assert!(
            !late
                .iter()
                .any(|m| matches!(m, ServerMsg::PresenceUpdate { user, .. } if user == "bob")),
            "bob's presence after the delete: {late:?}"
        );
    }
}
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reaches_only_its_own_users_book(store) {
    let node = node(store);
    // Bob has an entry; the operator put it there (the admin API edits like a device).
    let (st, body) = node.put(
        &format!("/api/v1/users/bob/address-book/{CAROL}"),
        r#"{"name":"Bob's plumber","note":"private"}"#,
    );
    assert_eq!(st, 200, "{body}");
    let mut alice = node.device(node.device_config("alice", "desk")).await;
    // Alice cannot see, delete, block off or rename bob's entry: her requests are hers.
    assert!(search(&mut alice, "plumber", 1).await.is_empty());
    assert!(search(&mut alice, "777", 2).await.is_empty());
    let del = request(
        &mut alice,
        ClientMsg::BookDelete {
            address: CAROL.into(),
        },
        3,
    )
    .await;
    assert_eq!(error_code(&del), "unknown_entry");
    let unblock = request(
        &mut alice,
        ClientMsg::BookBlock {
            address: CAROL.into(),
            blocked: false,
        },
        4,
    )
    .await;
    assert_eq!(error_code(&unblock), "unknown_entry");
    let mine = ok_entry(
        request(
            &mut alice,
            ClientMsg::BookSet {
                address: CAROL.into(),
                name: Some("Mine".into()),
                note: None,
                favourite: None,
            },
            5,
        )
        .await,
    );
    assert_eq!(mine.name.as_deref(), Some("Mine"));
    let bobs = admin_book(&node, "demo", "bob");
    assert_eq!(bobs.len(), 1);
    assert_eq!(
        (&bobs[0]["name"], &bobs[0]["note"]),
        (
            &serde_json::json!("Bob's plumber"),
            &serde_json::json!("private")
        )
    );

    // The admin API: the token is required, and a user is named in their own tenant.
    let (st, _) = node.request(
        "PUT",
        &format!("/api/v1/users/alice/address-book/{CAROL}"),
        r#"{"favourite":true}"#,
        false,
    );
    assert_eq!(st, 401);
    let (st, body) = node.put(
        &format!("/api/v1/users/alice/address-book/{CAROL}?tenant=other"),
        r#"{"favourite":true}"#,
    );
    assert_eq!(st, 404, "{body}");
    let (st, body) = node.request(
        "DELETE",
        &format!("/api/v1/users/olga/address-book/{CAROL}?tenant=demo"),
        "",
        true,
    );
    assert_eq!(st, 404, "{body}");
    let (st, body) = node.put(
        "/api/v1/users/alice/address-book/not-a-number",
        r#"{"name":"x"}"#,
    );
    assert_eq!((st, body.contains("bad_entry")), (400, true), "{body}");

    // An operator's edit reaches alice's device like her own.
    let (st, body) = node.put(
        &format!("/api/v1/users/alice/address-book/{CAROL}"),
        r#"{"favourite":true,"blocked":true}"#,
    );
    assert_eq!(st, 200, "{body}");
    let e: AddressBookEntry = serde_json::from_str(&body).unwrap();
    assert!(e.favourite && e.blocked, "{body}");
    until_book(&alice, "the operator's edit", |b| {
        find(b, CAROL)
            .is_some_and(|e| e.favourite && e.blocked && e.name.as_deref() == Some("Mine"))
    })
    .await;
    let (st, body) = node.get("/api/v1/users/alice/address-book?q=mine", true);
    assert_eq!(st, 200, "{body}");
    let found: Vec<AddressBookEntry> = serde_json::from_str(&body).unwrap();
    assert_eq!(found.len(), 1, "{body}");
    let (st, body) = node.request(
        "DELETE",
        &format!("/api/v1/users/alice/address-book/{CAROL}"),
        "",
        true,
    );
    assert_eq!((st, body.contains("entry_blocked")), (409, true), "{body}");
    // Unblocked, the entry can go; both reach the device.
    let (st, body) = node.put(
        &format!("/api/v1/users/alice/address-book/{CAROL}"),
        r#"{"blocked":false}"#,
    );
    assert_eq!(st, 200, "{body}");
    until_book(&alice, "the operator's unblock", |b| {
        find(b, CAROL).is_some_and(|e| !e.blocked && e.favourite)
    })
    .await;
    let (st, body) = node.request(
        "DELETE",
        &format!("/api/v1/users/alice/address-book/{CAROL}"),
        "",
        true,
    );
    assert_eq!(st, 204, "{body}");
    until_book(&alice, "the operator's delete", |b| find(b, CAROL).is_none()).await;
    assert!(
        admin_book(&node, "demo", "alice")
            .iter()
            .all(|e| e["address"] != CAROL),
        "{:#?}",
        admin_book(&node, "demo", "alice")
    );
    // Bob's entry of the same number is his still.
    assert_eq!(admin_book(&node, "demo", "bob").len(), 1);
    // Olga's book was never touched.
    assert!(admin_book(&node, "other", "olga").is_empty());
}
}

both_stores! {
/// An entry that arrives by import is like one the user added: a carrier's call between
/// alice and bob puts bob in alice's book, her online device is told the entry is bob,
/// and his presence follows on it without her subscribing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_entry_of_a_user_carries_his_presence(store) {
    let node = node(store);
    let mut desk = node.device(node.device_config("alice", "desk")).await;
    let deadline = std::time::Instant::now() + T;
    while !desk.address_book_complete() {
        assert!(std::time::Instant::now() < deadline, "no book at login");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let file = format!("{GENERIC_CDR_HEADER}b1,5550100002,5550100001,1764493200,65,60\n");
    let (st, body) = node.post(GENERIC_CDR_IMPORT, &file, true);
    assert_eq!(st, 200, "{body}");
    let update = desk
        .wait_for(T, |m| {
            matches!(m, ServerMsg::AddressBookUpdate { entries, .. }
                if entries.iter().any(|e| e.address == "+15550100002"))
        })
        .await;
    let Some(ServerMsg::AddressBookUpdate { entries, .. }) = update else {
        panic!("no update: {}", node.log())
    };
    let e = entries
        .iter()
        .find(|e| e.address == "+15550100002")
        .unwrap();
    assert_eq!(e.user.as_deref(), Some("bob"), "{e:?}");
    let bob = node.device(node.device_config("bob", "desk")).await;
    bob.send(ClientMsg::Presence {
        status: Status::Busy,
        idle_ms: 0,
        note: None,
    })
    .await
    .unwrap();
    sees(&mut desk, "bob", Status::Busy, "bob busy, his entry imported").await;
    set_presence(&bob, Status::Away).await;
    sees(&mut desk, "bob", Status::Away, "bob away").await;
}
}
