//! The address book cannot be used against its owner: a flood of calls from made-up
//! numbers, all declined by a "strangers are declined" rule, keeps the book within its
//! limit without pushing out the real contact, never makes a stranger "known", and reaches
//! the devices as deltas and, at login, as pages that each fit a frame.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Node, scenario, sipp_uac};
use parley_codecs::control::{AddressBookEntry, ServerMsg};

const LIMIT: usize = 700;
const FLOOD: u32 = 900;
const T: Duration = Duration::from_secs(10);

/// address → (call_count, known), from the admin API.
fn book_of(node: &Node) -> BTreeMap<String, (u64, bool)> {
    node.address_book("alice")
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_owned(),
                (
                    e["call_count"].as_u64().unwrap(),
                    e["known"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

fn mirror_of(entries: &[AddressBookEntry]) -> BTreeMap<String, (u64, bool)> {
    entries
        .iter()
        .map(|e| (e.address.clone(), (e.call_count, e.known)))
        .collect()
}

/// One SIPp call to alice that must succeed as its scenario says.
async fn one_call(node: &Node, args: &[&str]) {
    let run = sipp_uac(node, args, "+15550100001", 1, 1, &[]).await;
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
async fn rejected_strangers_cannot_fill_the_book_or_become_known(store) {
    let node = Node::start_on(store, ["", "", &format!("[address_book]\nmax_entries = {LIMIT}"), ""], 200);
    let device = node.device(node.device_config("alice", "desk")).await;
    let known = "+15557770001";

    // A real contact: a call from it that alice answers.
    let pcmu = scenario(node.dir.path(), "uac_pcmu.xml");
    one_call(&node, &["-sf", pcmu.to_str().unwrap(), "-d", "500"]).await;
    node.wait_cdrs(1);
    assert_eq!(book_of(&node)[known], (1, true));

    // Strangers are declined.
    let rules = r#"{"rules":[{"name":"strangers","when":{"caller_known":false},"then":{"action":"reject","code":603}}]}"#;
    let (st, body) = node.put("/api/v1/users/alice/preferences", rules);
    assert_eq!(st, 200, "{body}");

    // The flood: FLOOD calls, each from a new number.
    let strangers = scenario(node.dir.path(), "uac_603_from.xml");
    let run = sipp_uac(
        &node,
        &["-sf", strangers.to_str().unwrap()],
        "+15550100001",
        FLOOD,
        300,
        &["-key", "prefix", "+1555888"],
    )
    .await;
    assert_eq!(
        (run.code, run.successful, run.failed),
        (0, u64::from(FLOOD), 0),
        "{}\n{}",
        run.output,
        node.log()
    );
    let cdrs = node.wait_cdrs(1 + FLOOD as usize);
    assert_eq!(cdrs.len(), 1 + FLOOD as usize);
    assert!(
        cdrs.iter()
            .filter(|c| c["caller"] != known)
            .all(|c| c["disposition"] == "REJECTED" && c["sip_cause"] == 603)
    );

    // Bounded, the real contact kept, every stranger unknown.
    let book = book_of(&node);
    assert_eq!(book.len(), LIMIT);
    assert_eq!(
        book[known],
        (1, true),
        "the answered caller survives the flood"
    );
    assert_eq!(book.values().filter(|(_, k)| *k).count(), 1);
    assert_eq!(
        node.metric("parley_address_book_evictions_total"),
        (1 + FLOOD as usize - LIMIT) as f64
    );

    // The logged-in device followed through deltas and holds the same book.
    let deadline = Instant::now() + T;
    while mirror_of(&device.address_book()) != book && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mirror_of(&device.address_book()), book);

    // A stranger that is in the book after a declined call is still declined.
    let repeat = "+1555888891";
    assert_eq!(
        book.get(repeat),
        Some(&(1, false)),
        "{repeat} is one of the latest"
    );
    one_call(
        &node,
        &[
            "-sf",
            strangers.to_str().unwrap(),
            "-key",
            "prefix",
            "+155588889",
        ],
    )
    .await;
    let deadline = Instant::now() + T;
    while book_of(&node).get(repeat) != Some(&(2, false)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(book_of(&node).get(repeat), Some(&(2, false)));
    // The real contact still gets through.
    one_call(&node, &["-sf", pcmu.to_str().unwrap(), "-d", "500"]).await;
    let cdrs = node.wait_cdrs(3 + FLOOD as usize);
    let last_known = cdrs.iter().find(|c| c["caller"] == known).unwrap();
    assert_eq!(last_known["disposition"], "ANSWERED", "{last_known}");

    // A device logging in now gets the whole book in pages that each fit a frame (the
    // book is larger than one frame: 700 entries of ~105 bytes of JSON).
    let mut fresh = node.device(node.device_config("alice", "laptop")).await;
    let mut pages = 0;
    while let Some(m) = fresh
        .wait_for(Duration::from_secs(5), |m| {
            matches!(m, ServerMsg::AddressBook { .. })
        })
        .await
    {
        pages += 1;
        if let ServerMsg::AddressBook {
            entries,
            offset,
            total,
        } = m
        {
            assert_eq!(total, LIMIT as u64);
            if offset + entries.len() as u64 == total {
                break;
            }
        }
    }
    assert!(pages >= 2, "{pages} pages");
    assert!(fresh.address_book_complete());
    assert_eq!(mirror_of(&fresh.address_book()), book_of(&node));
    // Neither device ever saw a frame it had to refuse (it closes the connection on one).
    assert_eq!(node.metric("parley_im_frames_refused_total"), 0.0);
    for d in [&device, &fresh] {
        assert_eq!(d.close_reason(), None, "the device kept its connection");
    }
    fresh
        .send(parley_codecs::control::ClientMsg::Ping { id: 5 })
        .await
        .unwrap();
    let pong = fresh
        .wait_for(T, |m| matches!(m, ServerMsg::Pong { id: 5 }))
        .await;
    assert!(pong.is_some());
}
}
