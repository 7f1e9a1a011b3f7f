//! Carrier CDR import (`POST /api/v1/cdrs/import`, `parley cdr import`): files in each
//! real layout, with the ugly cases carriers produce, end up in the right users' address
//! books, once.

mod common;

use std::time::Duration;

use common::*;
use parley_codecs::control::ServerMsg;

/// The node's users: alice +15550100001 and bob +15550100002 (tenant demo, region US),
/// olga +15550100009 of tenant `other`.
fn node(store: StoreKind) -> Node {
    Node::start_with_olga(store)
}

fn book(node: &Node, tenant: &str, user: &str) -> Vec<serde_json::Value> {
    let (st, body) = node.get(
        &format!("/api/v1/users/{user}/address-book?tenant={tenant}"),
        true,
    );
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn entry<'a>(book: &'a [serde_json::Value], address: &str) -> &'a serde_json::Value {
    book.iter()
        .find(|e| e["address"] == address)
        .unwrap_or_else(|| panic!("no {address} in {book:#?}"))
}

/// `parley cdr import` options for the tests' generic files ([`GENERIC_CDR_HEADER`]).
const GENERIC_CLI: [&str; 14] = [
    "--format",
    "generic",
    "--column",
    "src=Caller",
    "--column",
    "dst=Callee",
    "--column",
    "start=Started (epoch)",
    "--column",
    "duration=Seconds",
    "--column",
    "billsec=Billed",
    "--column",
    "id=Call Ref",
];

/// Counts of an entry: (incoming, outgoing, missed, call_count).
fn counts(e: &serde_json::Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
    (n("incoming"), n("outgoing"), n("missed"), n("call_count"))
}

/// Runs `parley cdr import` against the node; returns (exit ok, stdout JSON or stderr).
/// Runs `parley cdr import ARGS --node URL --token T FILE` (the node's options after the
/// subcommand, as an operator types them; `cli_import_to` puts them before it).
fn cli_import(node: &Node, args: &[&str], file: &std::path::Path) -> (bool, String) {
    let http = node.http.to_string();
    let mut all = args.to_vec();
    all.extend(["--node", &http, "--token", &node.token]);
    let (ok, out, err) = cli_import_to(&[], &all, file);
    (ok, if ok { out } else { err })
}

/// Runs `parley cdr TARGET import ARGS FILE`; returns (exit ok, stdout, stderr).
fn cli_import_to(
    target: &[String],
    args: &[&str],
    file: &std::path::Path,
) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("cdr")
        .args(target)
        .arg("import")
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `Master.csv` as Asterisk's cdr_csv writes it (every field quoted, numbers not),
/// with a BOM, CRLF line ends, a name with a comma and quotes, a field spanning two lines,
/// a byte that is not UTF-8, a SIP URI caller, and two bad rows.
fn master_csv() -> Vec<u8> {
    let rows: Vec<Vec<u8>> = vec![
        // Line 1: an outsider with a quoted, comma'd name calls bob (answered).
        br#""","2125550142","+15550100002","from-pstn","""Doe, John"" <2125550142>","SIP/gw-00000001","PJSIP/bob-00000002","Dial","PJSIP/bob,30,""tT""","2026-11-30 09:00:00","2026-11-30 09:00:05","2026-11-30 09:03:05",185,180,"ANSWERED","DOCUMENTATION","1764493200.1","","","1764493200.1",1"#.to_vec(),
        // Lines 2-3: a London caller nobody answered (alice); a userfield on two lines;
        // lastdata holds Latin-1 bytes.
        [
            &br#""","+442071838750","+15550100001","from-pstn","""Caf"#[..],
            &[0xe9][..],
            &br#" London"" <+442071838750>","SIP/gw-00000003","","Dial","PJSIP/alice,20,caf"#[..],
            &[0xe9][..],
            &b"\",\"2026-11-30 10:00:00\",\"\",\"2026-11-30 10:00:20\",20,0,\"NO ANSWER\",\"DOCUMENTATION\",\"1764496800.3\",\"first line\r\nsecond line\""[..],
        ]
        .concat(),
        // Line 4: a start time that is no time.
        br##""","+442071838750","+15550100001","from-pstn","","SIP/gw-9","","Dial","","yesterday","","",0,0,"NO ANSWER","DOCUMENTATION","x.1","""##.to_vec(),
        // Line 5: alice calls bob (a call between two users: in both books).
        br##""","+15550100001","+15550100002","internal","""Alice"" <+15550100001>","PJSIP/alice-4","PJSIP/bob-5","Dial","PJSIP/bob","2026-11-30 11:00:00","2026-11-30 11:00:02","2026-11-30 11:01:02",62,60,"ANSWERED","DOCUMENTATION","1764500400.5","""##.to_vec(),
        // Line 6: too few columns.
        br#""","+15550100001","+15550100002","internal","short""#.to_vec(),
        // Line 7: two outsiders (no book of the tenant).
        br##""","+442071838751","+442071838752","from-pstn","","SIP/gw-6","","Dial","","2026-11-30 12:00:00","2026-11-30 12:00:01","2026-11-30 12:00:11",11,10,"ANSWERED","DOCUMENTATION","1764504000.6","""##.to_vec(),
        // Line 8: a SIP caller with no number (src empty, the URI in the clid).
        br##""","","+15550100001","from-sip","""Partner Desk"" <sip:desk@partner.example>","SIP/peer-7","PJSIP/alice-8","Dial","PJSIP/alice","2026-11-30 13:00:00","2026-11-30 13:00:03","2026-11-30 13:00:33",33,30,"ANSWERED","DOCUMENTATION","1764507600.7","""##.to_vec(),
        // Line 9: olga's number (tenant `other`) calls bob: it is only an address in bob's book.
        br##""","+15550100009","+15550100002","from-pstn","","SIP/gw-8","PJSIP/bob-9","Dial","","2026-11-30 14:00:00","2026-11-30 14:00:01","2026-11-30 14:00:31",31,30,"ANSWERED","DOCUMENTATION","1764511200.8","""##.to_vec(),
    ];
    let mut out = vec![0xef, 0xbb, 0xbf];
    for r in rows {
        out.extend_from_slice(&r);
        out.extend_from_slice(b"\r\n");
    }
    out
}

both_stores! {
#[test]
fn an_asterisk_file_fills_the_books_once_and_reports_each_bad_line(store) {
    let node = node(store);
    let file = node.dir.path().join("Master.csv");
    std::fs::write(&file, master_csv()).unwrap();
    let (ok, out) = cli_import(&node, &["--format", "asterisk"], &file);
    assert!(ok, "{out}\n{}", node.log());
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["rows"], 8, "{report:#}");
    assert_eq!(report["imported"], 5, "{report:#}");
    assert_eq!(report["unmatched"], 1, "{report:#}");
    assert_eq!(report["rejected"], 2, "{report:#}");
    assert_eq!(report["users_touched"], 2, "{report:#}");
    let rejections = report["rejections"].as_array().unwrap();
    assert_eq!(rejections[0]["line"], 4, "{report:#}");
    assert!(
        rejections[0]["reason"]
            .as_str()
            .unwrap()
            .contains("bad start time \"yesterday\""),
        "{report:#}"
    );
    assert_eq!(rejections[1]["line"], 6, "{report:#}");
    assert!(
        rejections[1]["reason"]
            .as_str()
            .unwrap()
            .contains("columns"),
        "{report:#}"
    );

    let bob = book(&node, "demo", "bob");
    let doe = entry(&bob, "+12125550142");
    assert_eq!(doe["name"], "Doe, John", "{doe}");
    assert_eq!(counts(doe), (1, 0, 0, 1));
    assert_eq!(doe["first_seen"], "2026-11-30T09:03:05.000Z", "{doe}");
    assert_eq!(doe["last_seen"], "2026-11-30T09:03:05.000Z", "{doe}");
    assert_eq!(counts(entry(&bob, "+15550100001")), (1, 0, 0, 1));
    assert_eq!(counts(entry(&bob, "+15550100009")), (1, 0, 0, 1));
    assert_eq!(bob.len(), 3, "{bob:#?}");

    let alice = book(&node, "demo", "alice");
    let london = entry(&alice, "+442071838750");
    assert_eq!(london["name"], "Caf\u{fffd} London", "{london}");
    assert_eq!(counts(london), (1, 0, 1, 1));
    assert_eq!(counts(entry(&alice, "+15550100002")), (0, 1, 0, 1));
    let desk = entry(&alice, "sip:desk@partner.example");
    assert_eq!(desk["name"], "Partner Desk", "{desk}");
    assert_eq!(alice.len(), 3, "{alice:#?}");
    // Olga is of another tenant: a demo file never reaches her book.
    assert_eq!(book(&node, "other", "olga").len(), 0);

    // The same file again adds nothing. This time the CLI finds the node and its token
    // in the data directory (`node.json`, and `admin-token`, which a demo node writes;
    // this node's token is configured, so the test puts it there), and with stderr not a
    // terminal it reports progress as lines.
    let data = node.data_dir();
    std::fs::write(data.join("admin-token"), &node.token).unwrap();
    let target = ["--data-dir".to_owned(), data.display().to_string()];
    let (ok, out, err) = cli_import_to(&target, &["--format", "asterisk"], &file);
    assert!(ok, "{err}");
    assert!(
        err.contains("Master.csv: sent") && err.contains("(100%); waiting for the node's report"),
        "{err}"
    );
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            &again["imported"],
            &again["duplicates"],
            &again["users_touched"]
        ),
        (&0.into(), &5.into(), &0.into()),
        "{again:#}"
    );
    assert_eq!(book(&node, "demo", "alice"), alice);
    assert_eq!(book(&node, "demo", "bob"), bob);
    assert_eq!(
        node.metric("parley_cdr_import_rows_total{result=\"imported\"}"),
        5.0
    );
    assert_eq!(
        node.metric("parley_cdr_import_rows_total{result=\"duplicate\"}"),
        5.0
    );

    // The tenant `other` imports the file that names demo's numbers: only olga's own
    // call (line 9) is hers, and demo's books stay as they were.
    let (ok, out) = cli_import(&node, &["--format", "asterisk", "--tenant", "other"], &file);
    assert!(ok, "{out}");
    let other: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            &other["imported"],
            &other["unmatched"],
            &other["users_touched"]
        ),
        (&1.into(), &5.into(), &1.into()),
        "{other:#}"
    );
    let olga = book(&node, "other", "olga");
    assert_eq!(olga.len(), 1, "{olga:#?}");
    assert_eq!(counts(entry(&olga, "+15550100002")), (0, 1, 0, 1));
    assert_eq!(book(&node, "demo", "alice"), alice);
    assert_eq!(book(&node, "demo", "bob"), bob);
}
}

both_stores! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeswitch_import_reaches_an_online_device(store) {
    let node = node(store);
    let mut device = node.device(node.device_config("alice", "desk")).await;
    // The book page sent at login (empty) has arrived before the import.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !device.address_book_complete() {
        assert!(std::time::Instant::now() < deadline, "no book at login");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(device.address_book().is_empty());
    // FreeSWITCH's default cdr_csv template; the national number is alice's (region US),
    // the second call was not answered.
    let file = concat!(
        "\"Carrier Desk\",\"+33 1 23 45 67 89\",\"5550100001\",\"default\",\"2026-11-30 09:00:00\",\"2026-11-30 09:00:04\",\"2026-11-30 09:01:04\",\"64\",\"60\",\"NORMAL_CLEARING\",\"6f1c9d1e-0001\",\"6f1c9d1e-0002\",\"\",\"PCMU\",\"PCMU\"\n",
        "\"Carrier Desk\",\"+33123456789\",\"+15550100001\",\"default\",\"2026-11-30 10:00:00\",\"\",\"2026-11-30 10:00:30\",\"30\",\"0\",\"NO_ANSWER\",\"6f1c9d1e-0003\",\"\",\"\",\"PCMU\",\"PCMU\"\n",
    );
    let (st, body) = node.post("/api/v1/cdrs/import?format=freeswitch", file, true);
    assert_eq!(st, 200, "{body}\n{}", node.log());
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&report["imported"], &report["rejected"]),
        (&2.into(), &0.into()),
        "{report:#}"
    );
    // The device learns the entry without asking.
    let update = device
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::AddressBookUpdate { entries, .. }
                if entries.iter().any(|e| e.address == "+33123456789"))
        })
        .await;
    assert!(update.is_some(), "{}", node.log());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let book = device.address_book();
        if let Some(e) = book.iter().find(|e| e.address == "+33123456789")
            && e.call_count == 2
        {
            assert_eq!(e.name.as_deref(), Some("Carrier Desk"));
            assert_eq!((e.incoming, e.outgoing, e.missed), (2, 0, 1), "{e:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{book:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
}

both_stores! {
#[test]
fn a_generic_file_maps_its_columns_and_bad_requests_say_what_is_wrong(store) {
    let node = node(store);
    let file = "Call Ref,Caller,Callee,Started (epoch),Seconds,Billed\n\
                r1,+442071838750,+15550100002,1764493200,65,60\n\
                r2,+442071838750,+15550100002,1764496800,20,0\n\
                r3,+442071838750,+15550100002,not-a-time,20,0\n";
    let base = GENERIC_CDR_IMPORT;
    let (st, body) = node.post(base, file, true);
    assert_eq!(st, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&report["imported"], &report["rejected"]),
        (&2.into(), &1.into()),
        "{report:#}"
    );
    assert_eq!(report["rejections"][0]["line"], 4, "{report:#}");
    let bob = book(&node, "demo", "bob");
    let e = entry(&bob, "+442071838750");
    assert_eq!(counts(e), (2, 0, 1, 2), "{e}");
    assert_eq!(e["name"], serde_json::Value::Null, "{e}");
    // Through the CLI, with --column.
    let path = node.dir.path().join("generic.csv");
    std::fs::write(&path, file).unwrap();
    let (ok, out) = cli_import(&node, &GENERIC_CLI, &path);
    assert!(ok, "{out}");
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["duplicates"], 2, "{again:#}");
    let (ok, err) = cli_import(
        &node,
        &["--format", "generic", "--column", "from=Caller"],
        &path,
    );
    assert!(!ok && err.contains("unknown field \"from\""), "{err}");

    // Each bad request is refused with what is wrong, and imports nothing.
    for (path, status, code, says) in [
        (
            "/api/v1/cdrs/import?format=generic&src=Caller&start=Started%20(epoch)",
            400,
            "bad_request",
            "needs `dst`",
        ),
        (
            "/api/v1/cdrs/import?format=generic&src=Caller&dst=To&start=Started%20(epoch)",
            400,
            "bad_header",
            "no column \\\"To\\\"",
        ),
        (
            "/api/v1/cdrs/import?format=xml",
            400,
            "bad_request",
            "unknown format",
        ),
        (
            "/api/v1/cdrs/import?format=asterisk&src=Caller",
            400,
            "bad_request",
            "format=generic",
        ),
        ("/api/v1/cdrs/import", 400, "bad_request", "format"),
        (
            "/api/v1/cdrs/import?format=asterisk&tenant=nope",
            404,
            "unknown_tenant",
            "nope",
        ),
    ] {
        let (st, body) = node.post(path, file, true);
        assert_eq!(st, status, "{path}: {body}");
        assert!(
            body.contains(&format!("\"error\":\"{code}\"")) && body.contains(says),
            "{path}: {body}"
        );
    }
    assert_eq!(node.post(base, file, false).0, 401);
    assert_eq!(book(&node, "demo", "bob"), bob);
}
}

/// A generic file of two calls to bob, one a day old, one 400 days old.
fn two_calls_for_bob() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!(
        "src,dst,start,billsec\n+442071838750,+15550100002,{},30\n+442071838751,+15550100002,{},30\n",
        now - 86_400,
        now - 400 * 86_400
    )
}

/// The import of [`two_calls_for_bob`]'s layout.
const RETENTION_IMPORT: &str =
    "/api/v1/cdrs/import?format=generic&src=src&dst=dst&start=start&billsec=billsec";

both_stores! {
#[test]
fn rows_older_than_the_retention_are_not_imported(store) {
    let node = Node::start_on(store, ["", "", "", "[cdrs]\nretention_days = 30\n"], 200);
    let file = two_calls_for_bob();
    let (st, body) = node.post(
        RETENTION_IMPORT,
        &file,
        true,
    );
    assert_eq!(st, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&report["imported"], &report["expired"]),
        (&1.into(), &1.into()),
        "{report:#}"
    );
    let bob = book(&node, "demo", "bob");
    assert_eq!(bob.len(), 1, "{bob:#?}");
    assert_eq!(bob[0]["address"], "+442071838750");
    assert_eq!(
        node.metric("parley_cdr_import_rows_total{result=\"expired\"}"),
        1.0
    );
}
}

both_stores! {
#[test]
fn retention_deletes_old_carrier_rows_at_start_and_the_books_keep_them(store) {
    // Imported under a ten-year retention, then the operator shortens it to 30 days: the
    // node deletes the older row when it starts (and hourly after), the book keeps what
    // it learned, and the same file imported again counts that row expired, not new.
    let node = Node::start_on(store, ["", "", "", "[cdrs]\nretention_days = 3650\n"], 200);
    let file = two_calls_for_bob();
    let path = RETENTION_IMPORT;
    let (st, body) = node.post(path, &file, true);
    assert_eq!(st, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["imported"], 2, "{report:#}");
    let bob = book(&node, "demo", "bob");
    assert_eq!(bob.len(), 2, "{bob:#?}");

    let cfg = node.dir.path().join("parley.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("retention_days = 3650"));
    std::fs::write(&cfg, text.replace("retention_days = 3650", "retention_days = 30")).unwrap();
    let node = node.crash_and_restart();
    assert_eq!(
        wait_metric(&node, "parley_cdrs_expired_total", |n| n > 0.0),
        1.0
    );
    assert!(node.log().contains("old CDRs deleted"), "{}", node.log());
    assert_eq!(book(&node, "demo", "bob"), bob);
    let (st, body) = node.post(path, &file, true);
    assert_eq!(st, 200, "{body}");
    let again: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&again["imported"], &again["duplicates"], &again["expired"]),
        (&0.into(), &1.into(), &1.into()),
        "{again:#}"
    );
    assert_eq!(book(&node, "demo", "bob"), bob);
}
}

both_stores! {
/// Numbers without a `+` are read in the importing tenant's region: a French tenant's file
/// in French national format reaches its user's book as E.164, the caller's number too,
/// and the same digits under the US default region match nobody.
#[test]
fn national_numbers_are_read_in_the_tenants_region(store) {
    let node = Node::start_on(
        store,
        [
            "",
            "",
            "",
            "[[users]]\ntenant = \"paris\"\nuser = \"marie\"\nnumber = \"+33612345678\"\npassword = \"demo\"\n",
        ],
        200,
    );
    let (st, body) = node.post(
        "/api/v1/tenants",
        r#"{"name": "paris", "region": "FR", "directory": false}"#,
        true,
    );
    assert!(st == 200 || st == 201, "{st} {body}");
    let file = format!("{GENERIC_CDR_HEADER}p1,01 23 45 67 89,06 12 34 56 78,1764493200,65,60\n");
    let path = format!("{GENERIC_CDR_IMPORT}&tenant=paris");
    let (st, body) = node.post(&path, &file, true);
    assert_eq!(st, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&report["imported"], &report["users_touched"]),
        (&1.into(), &1.into()),
        "{report:#}"
    );
    let marie = book(&node, "paris", "marie");
    assert_eq!(marie.len(), 1, "{marie:#?}");
    assert_eq!(counts(entry(&marie, "+33123456789")), (1, 0, 0, 1));
    // The same digits for demo (region US) are no one's number there.
    let (st, body) = node.post(&path.replace("tenant=paris", "tenant=demo"), &file, true);
    assert_eq!(st, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&report["imported"], &report["unmatched"]),
        (&0.into(), &1.into()),
        "{report:#}"
    );
}
}

both_stores! {
/// An unterminated quote swallows the rest of the file into one field: once that row runs
/// past the longest a row may be, reading stops there. The rows before it are imported
/// (those of the batch being read too), the row is rejected with its line, the report
/// says where reading stopped, and the CLI exits non-zero after printing it.
#[test]
fn an_unterminated_quote_stops_the_file_and_what_came_before_is_imported(store) {
    let node = node(store);
    let mut file = format!(
        "{GENERIC_CDR_HEADER}\
         r1,+442071838750,+15550100002,1764493200,65,60\n\
         r2,+442071838750,+15550100002,1764496800,20,0\n\
         r3,\"+442071838750,+15550100002,1764500400,20,0\n",
    );
    while file.len() < 1_200_000 {
        file.push_str("r4,+442071838751,+15550100002,1764504000,20,0\n");
    }
    let base = GENERIC_CDR_IMPORT;
    let (st, body) = node.post(base, &file, true);
    assert_eq!(st, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&report["imported"], &report["rejected"]),
        (&2.into(), &1.into()),
        "{report:#}"
    );
    assert_eq!(report["rejections"][0]["line"], 4, "{report:#}");
    let stopped = report["stopped"].as_str().unwrap_or_default();
    assert!(
        stopped.starts_with("line 4:") && stopped.contains("unterminated quote"),
        "{report:#}"
    );
    let bob = book(&node, "demo", "bob");
    assert_eq!(bob.len(), 1, "{bob:#?}");
    assert_eq!(counts(entry(&bob, "+442071838750")), (2, 0, 1, 2));
    assert!(node.log().contains("CDR import stopped"), "{}", node.log());

    // Through the CLI: the report on stdout (the rows again duplicates), and a failure.
    let path = node.dir.path().join("unterminated.csv");
    std::fs::write(&path, &file).unwrap();
    let http = node.http.to_string();
    let (ok, out, err) = cli_import_to(
        &[],
        &[&GENERIC_CLI[..], &["--node", http.as_str(), "--token", node.token.as_str()]].concat(),
        &path,
    );
    assert!(!ok, "{out}");
    assert!(err.contains("import stopped at line 4"), "{err}");
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&again["imported"], &again["duplicates"]),
        (&0.into(), &2.into()),
        "{again:#}"
    );
}
}

both_stores! {
/// Later imports move an entry's last call and keep its first; an entry the user deleted
/// stays deleted through later imports naming the number, until it is added again, and
/// then imports count into it once more.
#[test]
fn imports_after_an_edit_keep_first_and_last_seen_and_respect_a_deletion(store) {
    let node = node(store);
    let base = GENERIC_CDR_IMPORT;
    let import = |rows: &str| {
        let file = format!("{GENERIC_CDR_HEADER}{rows}");
        let (st, body) = node.post(base, &file, true);
        assert_eq!(st, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let london = "+442071838750";
    // Calls at 2025-12-01T09:00:00Z and a day later, 65 s each (seen: when they ended).
    import("a1,+442071838750,+15550100002,1764579600,65,60\n");
    import("a2,+442071838750,+15550100002,1764666000,65,60\n");
    let bob = book(&node, "demo", "bob");
    let e = entry(&bob, london);
    assert_eq!(counts(e), (2, 0, 0, 2), "{e}");
    assert!(
        e["first_seen"].as_str().unwrap().starts_with("2025-12-01T09:01:05")
            && e["last_seen"].as_str().unwrap().starts_with("2025-12-02T09:01:05"),
        "{e}"
    );

    // Bob deletes it: the next import naming the number leaves it deleted.
    let (st, body) = node.request(
        "DELETE",
        "/api/v1/users/bob/address-book/%2B442071838750",
        "",
        true,
    );
    assert_eq!(st, 204, "{body}");
    let report = import("a3,+442071838750,+15550100002,1764752400,65,60\n");
    assert_eq!(report["imported"], 1, "{report:#}");
    assert!(
        book(&node, "demo", "bob").iter().all(|e| e["address"] != london),
        "deleted entry came back"
    );
    // Added again, it counts the calls imported after that.
    let (st, body) = node.put(
        "/api/v1/users/bob/address-book/%2B442071838750",
        r#"{"name":"London office"}"#,
    );
    assert_eq!(st, 200, "{body}");
    import("a4,+442071838750,+15550100002,1764838800,65,60\n");
    let bob = book(&node, "demo", "bob");
    let e = entry(&bob, london);
    assert_eq!(e["name"], "London office", "{e}");
    // Only the call imported after the re-add counts (the deleted entry's two are gone);
    // it is older than the re-add, so it becomes the first seen, not the last.
    assert_eq!(counts(e), (1, 0, 0, 1), "{e}");
    assert!(
        e["first_seen"].as_str().unwrap().starts_with("2025-12-04T09:01:05"),
        "{e}"
    );
}
}
