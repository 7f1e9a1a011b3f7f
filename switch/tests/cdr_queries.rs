//! CDRs for operators: `GET /api/v1/cdrs` filters and cursor pages, and the streamed
//! CSV / JSON-lines export, over CDRs of real SIPp calls.

mod common;

use common::*;

/// The `X-Next-Cursor` of a response head.
fn next_cursor(head: &str) -> Option<String> {
    head.lines()
        .find_map(|l| l.strip_prefix("x-next-cursor: "))
        .map(str::to_owned)
}

fn json(body: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The call ids of a JSON-lines export, in its order.
fn call_ids(jsonl: &str) -> Vec<String> {
    jsonl
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["call_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_pages_and_exports_match_the_calls(store) {
    // bob has no device and the trunk is dead: his calls fail fast (T1 50 ms).
    let node = Node::start_on(store, ["t1_ms = 50", "", "", ""], 200);
    let alice = node.device(node.device_config("alice", "desk")).await;
    let run = sipp_uac(&node, &["-sn", "uac"], "+15550100001", 5, 5, &[]).await;
    assert_eq!((run.successful, run.failed), (5, 0), "{}", run.output);
    let run = sipp_uac(
        &node,
        &["-sn", "uac"],
        "+15550100002",
        2,
        2,
        &["-recv_timeout", "40000"],
    )
    .await;
    assert_eq!(run.failed, 2, "{}", run.output);
    let all = node.wait_cdrs(7);
    assert_eq!(all.len(), 7, "{all:#?}");

    // Filters narrow.
    let only = |q: &str| {
        let (st, body) = node.get(&format!("/api/v1/cdrs?{q}"), true);
        assert_eq!(st, 200, "{q}: {body}");
        json(&body)
    };
    let answered = only("disposition=answered&route=im");
    assert_eq!(answered.len(), 5, "{answered:#?}");
    assert!(answered.iter().all(|c| c["user"] == "alice"));
    let bob = only("user=bob&tenant=demo");
    assert_eq!(bob.len(), 2);
    assert!(
        bob.iter()
            .all(|c| c["disposition"] == "UNAVAILABLE" && c["route"] == "pstn")
    );
    assert_eq!(only("number=%2B15550100002").len(), 2);
    assert_eq!(only("tenant=other").len(), 0);
    assert_eq!(only("from=2999-01-01T00:00:00Z").len(), 0);
    assert_eq!(only("to=2999-01-01T00:00:00Z").len(), 7);
    assert_eq!(only("from=0").len(), 7);

    // Cursor pages: 3 + 3 + 1, newest first, no row twice, none lost.
    let mut seen = Vec::new();
    let mut path = "/api/v1/cdrs?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let (st, head, body) = node.get_full(&path);
        assert_eq!(st, 200, "{body}");
        pages += 1;
        let rows = json(&body);
        seen.extend(
            rows.iter()
                .map(|r| r["call_id"].as_str().unwrap().to_owned()),
        );
        match next_cursor(&head) {
            Some(c) => path = format!("/api/v1/cdrs?limit=3&cursor={c}"),
            None => break,
        }
        assert!(pages < 10, "pages do not end");
    }
    assert_eq!(pages, 3);
    let ids: Vec<String> = all
        .iter()
        .map(|r| r["call_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, ids, "pages in order, each row once");

    // Exports: every matching row, in the same order.
    let (st, head, csv) = node.get_full("/api/v1/cdrs/export?format=csv&user=alice");
    assert_eq!(st, 200, "{csv}");
    assert!(head.contains("content-type: text/csv"), "{head}");
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("call_id,sip_call_id,tenant,user,caller")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 5, "{csv}");
    assert!(rows.iter().all(|l| l.contains(",alice,")), "{csv}");
    let (st, head, jsonl) = node.get_full("/api/v1/cdrs/export?format=jsonl");
    assert_eq!(st, 200);
    assert!(head.contains("application/x-ndjson"), "{head}");
    let exported = call_ids(&jsonl);
    assert_eq!(exported, ids);

    // Bad parameters are named; no token, no CDRs.
    for (q, says) in [
        ("/api/v1/cdrs?from=yesterday", "`from`"),
        ("/api/v1/cdrs?cursor=abc", "`cursor`"),
        ("/api/v1/cdrs?format=csv", "export"),
        ("/api/v1/cdrs?color=red", "color"),
        ("/api/v1/cdrs/export?format=xml", "csv or jsonl"),
        ("/api/v1/cdrs/export", "csv or jsonl"),
    ] {
        let (st, body) = node.get(q, true);
        assert_eq!(st, 400, "{q}: {body}");
        assert!(body.contains(says), "{q}: {body}");
    }
    assert_eq!(node.get("/api/v1/cdrs/export?format=csv", false).0, 401);
    assert_eq!(node.get("/api/v1/cdrs", false).0, 401);
    assert_eq!(node.get("/api/v1/cdrs?user=alice", false).0, 401);

    // A number as a person types it is read in the tenant's region (the CDRs hold E.164).
    assert_eq!(only("number=5550100002").len(), 2);
    assert_eq!(only("number=5550100002&tenant=demo").len(), 2);

    // A call alice's device dials is bob's CDR (he is the one called) and alice's call:
    // `user=alice` finds it as well as the calls to her.
    alice
        .send(parley_codecs::control::ClientMsg::Dial { to: "bob".into() })
        .await
        .unwrap();
    let all = node.wait_cdrs(8);
    let dialled = &all[0];
    assert_eq!(
        (dialled["user"].as_str(), dialled["dialled_by"].as_str()),
        (Some("bob"), Some("alice")),
        "{dialled:#}"
    );
    let alices = only("user=alice");
    assert_eq!(alices.len(), 6, "{alices:#?}");
    assert_eq!(alices[0]["call_id"], dialled["call_id"]);
    assert_eq!(only("user=bob").len(), 3);
}
}

both_stores! {
/// An export longer than the node reads at a time (pages of 1,000 rows) streams every
/// row once, in the order the cursor pages give them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_longer_than_a_page_has_every_row_once(store) {
    const CALLS: usize = 1_100;
    let node = Node::start_on(store, ["", "", "", ""], 200);
    // bob has no device: his calls go to his PSTN line, the trunk UAS answers.
    let _uas = SippUas::start(&node, &["-sn", "uas"]);
    let run = sipp_uac(
        &node,
        &["-sn", "uac"],
        "+15550100002",
        CALLS as u32,
        100,
        &[],
    )
    .await;
    assert_eq!(
        (run.successful, run.failed),
        (CALLS as u64, 0),
        "{}",
        run.output
    );
    let export = || {
        let (st, _, jsonl) = node.get_full("/api/v1/cdrs/export?format=jsonl");
        assert_eq!(st, 200, "{jsonl}");
        call_ids(&jsonl)
    };
    // CDRs are written after the calls end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let exported = loop {
        let e = export();
        if e.len() >= CALLS || std::time::Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let mut paged = Vec::new();
    let mut path = "/api/v1/cdrs?limit=500".to_owned();
    loop {
        let (st, head, body) = node.get_full(&path);
        assert_eq!(st, 200, "{body}");
        paged.extend(
            json(&body)
                .iter()
                .map(|r| r["call_id"].as_str().unwrap().to_owned()),
        );
        match next_cursor(&head) {
            Some(c) => path = format!("/api/v1/cdrs?limit=500&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(paged.len(), CALLS);
    assert_eq!(exported, paged, "the export: every row once, in order");
    let (st, _, csv) = node.get_full("/api/v1/cdrs/export?format=csv");
    assert_eq!(st, 200);
    // The header once, then a row per call.
    assert_eq!(csv.lines().count(), CALLS + 1);
    assert_eq!(csv.matches("call_id,sip_call_id").count(), 1);
}
}
