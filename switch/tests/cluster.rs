//! Cluster mode against a real `nats-server -js` on loopback: three nodes share where
//! every user's devices are (JetStream key-value buckets), a SIPp call through any node
//! rings the callee's device on whichever node it is connected to, with media relayed
//! across the two nodes and one CDR written once (on the node the call arrived at); a
//! presence change on one node re-routes a call ringing through another; a killed node's
//! users route by their rules on the next call (the PSTN line, or a device on a third
//! node), a call through a survivor answered on it
//! ends with its CDR on that survivor, a node started later does not take the dead node's
//! last entries for a live node, and a restarted node rejoins; two devices answering at
//! once on two nodes connect one call; a node that comes back from a partition stops
//! ringing for calls the others re-routed meanwhile.

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Node, SippUas, scenario, sipp_uac, wait_metric};
use parley_codecs::control::{ClientMsg, ServerMsg, Status};

/// A `nats-server` with JetStream, a user and a password, on a free loopback port.
struct Nats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

const NATS_USER: &str = "parley";
const NATS_PASSWORD: &str = "cluster-secret-4711";

fn nats_bin() -> PathBuf {
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!(
        "nats-server is not installed (apt-get install nats-server): the cluster tests need a real NATS"
    );
}

impl Nats {
    fn start() -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_udp_port();
        let mut n = Nats {
            child: Self::spawn(dir.path(), port),
            port,
            _dir: dir,
        };
        n.wait_ready();
        n
    }

    fn spawn(dir: &std::path::Path, port: u16) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("nats.log"))
            .unwrap();
        Command::new(nats_bin())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["--user", NATS_USER, "--pass", NATS_PASSWORD])
            .arg("-sd")
            .arg(dir.join("js"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("nats-server exited: {s}");
            }
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = Self::spawn(self._dir.path(), self.port);
        self.wait_ready();
    }

    /// The `[cluster]` section of node `id`.
    fn section(&self, id: &str) -> String {
        format!(
            "[cluster]\nnats = [\"nats://127.0.0.1:{}\"]\nnode_id = \"{id}\"\nuser = \"{NATS_USER}\"\npassword = \"{NATS_PASSWORD}\"\nheartbeat_ms = 300\nnode_expiry_secs = 2\ndevice_refresh_secs = 5\n",
            self.port
        )
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Carol, a third user (tenant demo), on every node.
const CAROL: &str = "[[users]]\ntenant = \"demo\"\nuser = \"carol\"\nnumber = \"+15550100003\"\npassword = \"demo\"\n";

fn cluster_node(nats: &Nats, id: &str) -> Node {
    Node::start_with_tail("", "", "", 200, &format!("{CAROL}{}", nats.section(id)))
}

/// Asserts that SIPp's one call succeeded.
fn assert_answered(run: &common::SippRun, node: &Node) {
    assert_eq!(
        (run.code, run.successful),
        (0, 1),
        "{}\n{}",
        run.output,
        node.log()
    );
}

/// A device reports `status`.
async fn set_status(device: &parley_load::device::Device, status: Status) {
    let msg = ClientMsg::Presence {
        status,
        idle_ms: 0,
        note: None,
    };
    device.send(msg).await.unwrap();
}

/// Nodes a, b and c.
fn three_nodes(nats: &Nats) -> (Node, Node, Node) {
    (
        cluster_node(nats, "a"),
        cluster_node(nats, "b"),
        cluster_node(nats, "c"),
    )
}

/// alice's desk on `b` (rings, never answers) and her mobile on `c` (answers after
/// 300 ms), both seen by `a`.
async fn alice_on_b_and_c(
    a: &Node,
    b: &Node,
    c: &Node,
) -> (parley_load::device::Device, parley_load::device::Device) {
    let mut desk_cfg = b.device_config("alice", "desk");
    desk_cfg.answer_after = None;
    let desk = b.device(desk_cfg).await;
    let mobile_cfg = parley_load::device::DeviceConfig {
        answer_after: Some(Duration::from_millis(300)),
        ..c.device_config("alice", "mobile")
    };
    let mobile = c.device(mobile_cfg).await;
    wait_remote_devices(a, 2.0);
    (desk, mobile)
}

/// Sends `sig` (`-STOP`: the node is cut off, no heartbeat, no message; `-CONT`) to a
/// node's process.
fn signal(sig: &str, node: &Node) {
    let st = Command::new("kill")
        .args([sig, &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits until `node` counts `n` devices on other nodes.
fn wait_remote_devices(node: &Node, n: f64) {
    let seen = wait_metric(node, "parley_cluster_remote_devices", |v| v == n);
    assert_eq!(seen, n, "remote devices on a node:\n{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_calls_reach_users_on_every_node_through_every_node() {
    let nats = Nats::start();
    let nodes = [
        cluster_node(&nats, "a"),
        cluster_node(&nats, "b"),
        cluster_node(&nats, "c"),
    ];
    // carol on a, alice on b, bob on c.
    let users = [
        ("carol", "+15550100003"),
        ("alice", "+15550100001"),
        ("bob", "+15550100002"),
    ];
    let mut devices = Vec::new();
    for (node, (user, _)) in nodes.iter().zip(users) {
        devices.push(node.device(node.device_config(user, "desk")).await);
    }
    for node in &nodes {
        wait_remote_devices(node, 2.0);
        let seen = wait_metric(node, "parley_cluster_nodes", |v| v == 3.0);
        assert_eq!(seen, 3.0, "{}", node.log());
    }

    // The node registry, as the admin API shows it: every node with its load figures.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(nodes[0].get("/api/v1/cluster", false).0, 401);
    let (st, body) = nodes[0].get("/api/v1/cluster", true);
    assert_eq!(st, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    let listed: Vec<&str> = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["a", "b", "c"], "{body}");
    assert_eq!(view["nats_connected"], true, "{body}");
    for n in view["nodes"].as_array().unwrap() {
        assert_eq!(n["entry"]["devices"], 1, "{n}");
        assert_eq!(n["entry"]["users"], 1, "{n}");
        assert!(n["entry"]["cpu_cores"].as_f64().is_some(), "{n}");
        assert!(n["age_ms"].as_u64().unwrap() < 2000, "{n}");
    }

    let sc = scenario(nodes[0].dir.path(), "uac_pcmu.xml");
    for node in &nodes {
        for (user, number) in users {
            let run = sipp_uac(
                node,
                &["-sf", sc.to_str().unwrap()],
                number,
                1,
                1,
                &["-d", "1000"],
            )
            .await;
            assert_eq!(
                (run.code, run.successful, run.failed),
                (0, 1, 0),
                "call to {user} through {}:\n{}\n{}",
                node.sip,
                run.output,
                node.log()
            );
        }
    }
    // One CDR per call, on the node the call arrived at, naming the user's device.
    for node in &nodes {
        let cdrs = node.wait_cdrs(3);
        assert_eq!(cdrs.len(), 3, "{cdrs:#?}");
        for (c, (user, number)) in cdrs.iter().rev().zip(users) {
            assert_eq!(c["disposition"], "ANSWERED", "{c}");
            assert_eq!(c["user"], user, "{c}");
            assert_eq!(c["called"], number, "{c}");
            assert_eq!(c["answered_by"], "desk", "{c}");
            // SIPp streams ~50 packets a second; the device echoes them back.
            assert!(c["packets_in"].as_i64().unwrap() >= 25, "{c}");
            assert!(c["packets_out"].as_i64().unwrap() >= 25, "{c}");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for node in &nodes {
        assert_eq!(node.cdrs().len(), 3, "a node wrote another node's CDR");
        // Two of its three calls were handed to another node; it hosted two legs.
        assert_eq!(
            node.metric("parley_cluster_offers_total{direction=\"sent\"}"),
            2.0
        );
        assert_eq!(
            node.metric("parley_cluster_offers_total{direction=\"received\"}"),
            2.0
        );
        assert_eq!(node.metric("parley_cluster_handoffs_answered_total"), 2.0);
        assert_eq!(node.metric("parley_calls_active"), 0.0);
        assert!(node.metric("parley_cluster_nats_seconds_count") >= 1.0);
    }
    for d in &devices {
        let s = d.stats().snapshot();
        assert_eq!(s.calls_connected, 3, "{s}");
        assert!(s.rtp_received >= 3 * 25, "{s}");
        assert_eq!(s.bad_datagrams, 0);
    }
    // The NATS password is in every node's configuration, never in a log.
    for node in &nodes {
        assert!(!node.log().contains(NATS_PASSWORD), "{}", node.log());
    }
    // Hosted legs and remote legs are all gone.
    for node in &nodes {
        let legs = wait_metric(node, "parley_cluster_hosted_legs", |v| v == 0.0);
        assert_eq!(legs, 0.0);
        assert_eq!(
            wait_metric(node, "parley_cluster_remote_legs", |v| v == 0.0),
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_change_on_one_node_reroutes_a_call_ringing_through_another() {
    let nats = Nats::start();
    let (a, b, c) = three_nodes(&nats);
    // alice's desk on b rings but is not picked up; her mobile on c is away at first.
    let mut desk_cfg = b.device_config("alice", "desk");
    desk_cfg.answer_after = None;
    let mut desk = b.device(desk_cfg).await;
    let mut mobile = c.device(c.device_config("alice", "mobile")).await;
    set_status(&mobile, Status::Away).await;
    wait_remote_devices(&a, 2.0);
    std::thread::sleep(Duration::from_millis(500));

    let caller = tokio::spawn(sipp_uac(
        &a,
        &["-sn", "uac"],
        "+15550100001",
        1,
        1,
        &["-d", "500"],
    ));
    let offer = desk
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::IncomingCall { .. })
        })
        .await;
    let Some(ServerMsg::IncomingCall { call_id, from, .. }) = offer else {
        panic!("the desk on b did not ring:\n{}\n{}", a.log(), b.log());
    };
    assert_eq!(from, "sip:sipp@127.0.0.1");
    assert!(call_id.ends_with("@a"), "{call_id}");
    // The mobile was away: it does not ring.
    assert!(
        mobile
            .wait_for(Duration::from_millis(300), |m| matches!(
                m,
                ServerMsg::IncomingCall { .. }
            ))
            .await
            .is_none()
    );
    // alice picks up her mobile (on c) and turns the desk (on b) to do-not-disturb.
    set_status(&mobile, Status::Available).await;
    set_status(&desk, Status::DoNotDisturb).await;
    let withdrawn = desk
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::CallEnded { call_id: id, reason } if *id == call_id && reason == "rerouted")
        })
        .await;
    assert!(
        withdrawn.is_some(),
        "the desk's offer was not withdrawn:\n{}",
        a.log()
    );
    let run = caller.await.unwrap();
    assert_answered(&run, &a);
    let cdrs = a.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{:?}", cdrs[0]);
    assert_eq!(cdrs[0]["answered_by"], "mobile", "{:?}", cdrs[0]);
    assert!(a.metric("parley_reroutes_total") >= 1.0, "{}", a.log());
    assert_eq!(mobile.stats().snapshot().calls_connected, 1);
    assert!(b.cdrs().is_empty() && c.cdrs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_users_route_by_their_rules_and_it_rejoins() {
    let nats = Nats::start();
    let a = cluster_node(&nats, "a");
    let mut b = cluster_node(&nats, "b");
    let _device = b.device(b.device_config("alice", "desk")).await;
    wait_remote_devices(&a, 1.0);

    // A call through a, answered on b, is up when b dies.
    let sc = scenario(a.dir.path(), "uac_remote_bye.xml");
    let caller = tokio::spawn(sipp_uac(
        &a,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    ));
    let up = wait_metric(&a, "parley_cluster_handoffs_answered_total", |v| v == 1.0);
    assert_eq!(up, 1.0, "{}", a.log());
    std::thread::sleep(Duration::from_millis(500));
    b.kill_now();
    // Within the expiry (2 s) a declares b dead: alice's device is offline for a, and the
    // call anchored on a ends with its CDR written by a.
    let run = caller.await.unwrap();
    assert_answered(&run, &a);
    assert_eq!(a.metric("parley_cluster_remote_devices"), 0.0);
    assert_eq!(a.metric("parley_cluster_nodes_lost_total"), 1.0);
    let cdrs = a.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{:?}", cdrs[0]);
    assert!(cdrs[0]["end_time"].is_string(), "{:?}", cdrs[0]);
    assert!(a.log().contains("cluster node expired"), "{}", a.log());

    // alice's next call routes by her rules: no device anywhere, so her PSTN line
    // through a's trunk.
    let _trunk = SippUas::start(&a, &["-sn", "uas"]);
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_answered(&run, &a);
    let cdrs = a.wait_cdrs(2);
    assert_eq!(cdrs[0]["route"], "pstn", "{:?}", cdrs[0]);

    // b restarts and rejoins; alice logs in there again and a rings her there.
    let b = b.crash_and_restart();
    let _device = b.device(b.device_config("alice", "desk")).await;
    wait_remote_devices(&a, 1.0);
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_answered(&run, &a);
    let cdrs = a.wait_cdrs(3);
    assert_eq!(cdrs[0]["route"], "im", "{:?}", cdrs[0]);
    assert_eq!(cdrs[0]["answered_by"], "desk", "{:?}", cdrs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_sends_its_devices_elsewhere_and_finishes_its_calls() {
    let nats = Nats::start();
    let a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b");
    let mut desk = b.device(b.device_config("alice", "desk")).await;
    wait_remote_devices(&a, 1.0);

    assert_eq!(
        wait_metric(&b, "parley_cluster_local_users", |v| v == 1.0),
        1.0
    );
    // A call through a, answered on b, lasts 4 s.
    let caller = tokio::spawn(sipp_uac(
        &a,
        &["-sn", "uac"],
        "+15550100001",
        1,
        1,
        &["-d", "4000"],
    ));
    assert_eq!(
        wait_metric(&a, "parley_cluster_handoffs_answered_total", |v| v == 1.0),
        1.0,
        "{}",
        a.log()
    );
    // SIGTERM to b: it drains.
    let status = Command::new("kill")
        .args(["-TERM", &b.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let told = desk
        .wait_for(
            Duration::from_secs(5),
            |m| matches!(m, ServerMsg::Reconnect { reason, .. } if reason == "draining"),
        )
        .await;
    assert!(
        told.is_some(),
        "the device was not asked to reconnect:\n{}",
        b.log()
    );
    // a no longer rings alice on b; b refuses new logins and new calls.
    wait_remote_devices(&a, 0.0);
    match parley_load::device::Device::connect(b.device_config("alice", "mobile")).await {
        Err(e) => assert!(e.to_string().contains("draining"), "{e}"),
        Ok(_) => panic!("a draining node took a login"),
    }
    let sc = scenario(a.dir.path(), "uac_or_retry_after.xml");
    let refused = sipp_uac(
        &b,
        &["-sf", sc.to_str().unwrap()],
        "+15550100002",
        1,
        1,
        &[],
    )
    .await;
    assert_eq!(
        (refused.code, refused.successful),
        (0, 1),
        "{}",
        refused.output
    );
    assert!(b.metric("parley_sip_overload_rejections_total{reason=\"draining\"}") >= 1.0);
    // The call in progress finishes normally, then b exits.
    let run = caller.await.unwrap();
    assert_answered(&run, &a);
    let cdrs = a.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{:?}", cdrs[0]);
    assert!(
        cdrs[0]["duration_secs"].as_f64().unwrap() >= 3.5,
        "{:?}",
        cdrs[0]
    );
    let (status, log) = b.stop_with_log();
    assert!(status.success(), "{log}");
    // It did not wait for the drain deadline: every leg it hosted ended with its call.
    assert!(!log.contains("drain deadline reached"), "{log}");
    assert!(
        log.contains("draining: other nodes no longer ring"),
        "{log}"
    );
    assert!(log.contains("left the cluster"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_rung_on_two_nodes_is_answered_once_and_the_other_offer_withdrawn() {
    let nats = Nats::start();
    let (a, b, c) = three_nodes(&nats);
    let mut desk_cfg = b.device_config("alice", "desk");
    desk_cfg.answer_after = None;
    let mut desk = b.device(desk_cfg).await;
    let mobile = c.device(c.device_config("alice", "mobile")).await;
    wait_remote_devices(&a, 2.0);
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "500"]).await;
    assert_answered(&run, &a);
    let offer = desk
        .wait_for(Duration::from_secs(1), |m| {
            matches!(m, ServerMsg::IncomingCall { .. })
        })
        .await;
    assert!(offer.is_some(), "both devices ring in parallel");
    let withdrawn = desk
        .wait_for(
            Duration::from_secs(5),
            |m| matches!(m, ServerMsg::CallEnded { reason, .. } if reason == "answered_elsewhere"),
        )
        .await;
    assert!(withdrawn.is_some(), "{}", a.log());
    let cdrs = a.wait_cdrs(1);
    assert_eq!(cdrs[0]["answered_by"], "mobile", "{:?}", cdrs[0]);
    assert_eq!(mobile.stats().snapshot().calls_connected, 1);
    assert_eq!(desk.stats().snapshot().calls_connected, 0);
    assert_eq!(
        a.metric("parley_cluster_offers_total{direction=\"sent\"}"),
        2.0
    );
    assert_eq!(a.metric("parley_cluster_handoffs_answered_total"), 1.0);
    // Both nodes let go of their legs.
    assert_eq!(
        wait_metric(&b, "parley_cluster_hosted_legs", |v| v == 0.0),
        0.0
    );
    assert_eq!(
        wait_metric(&c, "parley_cluster_hosted_legs", |v| v == 0.0),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_local_calls_while_nats_is_away_and_resume_after_it_restarts() {
    let mut nats = Nats::start();
    let a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b");
    let carol = a.device(a.device_config("carol", "desk")).await;
    let _alice = b.device(b.device_config("alice", "desk")).await;
    wait_remote_devices(&a, 1.0);
    assert_eq!(a.metric("parley_cluster_nats_connected"), 1.0);

    nats.kill();
    let gone = wait_metric(&a, "parley_cluster_nats_connected", |v| v == 0.0);
    assert_eq!(gone, 0.0, "{}", a.log());
    // NATS is away for longer than the expiry: a no longer rings alice on b (it cannot
    // know she is still there), but carol, on a itself, is reached as ever.
    assert_eq!(
        wait_metric(&a, "parley_cluster_remote_devices", |v| v == 0.0),
        0.0
    );
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100003", 1, 1, &["-d", "300"]).await;
    assert_answered(&run, &a);
    assert_eq!(carol.stats().snapshot().calls_connected, 1);

    nats.restart();
    assert_eq!(
        wait_metric(&a, "parley_cluster_nats_connected", |v| v == 1.0),
        1.0,
        "{}",
        a.log()
    );
    wait_remote_devices(&a, 1.0);
    wait_remote_devices(&b, 1.0);
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_answered(&run, &a);
    let cdrs = a.wait_cdrs(2);
    assert_eq!(cdrs[0]["user"], "alice", "{:?}", cdrs[0]);
    assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{:?}", cdrs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partition_heals_each_call_rings_each_device_once() {
    let nats = Nats::start();
    let (a, b, c) = three_nodes(&nats);
    let (mut desk, mobile) = alice_on_b_and_c(&a, &b, &c).await;

    // b is cut off (SIGSTOP: no heartbeat, no message) until a expires it.
    signal("-STOP", &b);
    assert_eq!(
        wait_metric(&a, "parley_cluster_nodes_lost_total", |v| v == 1.0),
        1.0
    );
    assert_eq!(a.metric("parley_cluster_remote_devices"), 1.0);
    // Meanwhile a call rings what a sees: the mobile on c, which answers.
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_answered(&run, &a);

    // The partition heals: a reads b's devices again (no change was coming for them).
    signal("-CONT", &b);
    wait_remote_devices(&a, 2.0);
    let read_again = |log: &str| {
        log.lines().any(|l| {
            l.contains("devices of a returning node read again")
                && l.contains("node=b")
                && l.contains("devices=1")
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !read_again(&a.log()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(read_again(&a.log()), "{}", a.log());
    // The desk never heard of the first call, even now that b runs again.
    assert!(
        desk.wait_for(Duration::from_millis(500), |m| matches!(
            m,
            ServerMsg::IncomingCall { .. }
        ))
        .await
        .is_none(),
        "a call from the partition reached the desk"
    );
    // The next call rings both devices, once each; the mobile answers, the desk's offer
    // is withdrawn.
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_answered(&run, &a);
    let (mut offers, mut ended) = (0, None);
    while let Some(m) = desk.next_event(Duration::from_secs(5)).await {
        match m {
            ServerMsg::IncomingCall { .. } => offers += 1,
            ServerMsg::CallEnded { reason, .. } => {
                ended = Some(reason);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(offers, 1, "the desk rang {offers} times for one call");
    assert_eq!(ended.as_deref(), Some("answered_elsewhere"));
    let cdrs = a.wait_cdrs(2);
    assert!(
        cdrs.iter().all(|c| c["answered_by"] == "mobile"),
        "{cdrs:?}"
    );
    assert_eq!(mobile.stats().snapshot().calls_connected, 2);
    assert!(b.cdrs().is_empty() && c.cdrs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_device_in_two_steps_of_a_rule_is_withdrawn_and_offered_again_in_order() {
    let nats = Nats::start();
    let (a, b, c) = three_nodes(&nats);
    let (mut desk, mobile) = alice_on_b_and_c(&a, &b, &c).await;
    // alice's rule on a: the desk alone for 1 s, then the desk and the mobile.
    let rules = serde_json::json!({"rules": [{"name": "desk first", "then": {"action": "ring", "steps": [
        {"targets": [{"device": "desk"}], "timeout_secs": 1},
        {"targets": [{"device": "desk"}, {"device": "mobile"}]}]}}]});
    let (st, body) = a.put("/api/v1/users/alice/preferences", &rules.to_string());
    assert_eq!(st, 200, "{body}");

    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
    assert_answered(&run, &a);
    // The desk sees the call offered, withdrawn for the next step, offered again, and
    // withdrawn when the mobile answers — in that order, every offer of it ended.
    let mut seen = Vec::new();
    while let Some(m) = desk.next_event(Duration::from_secs(5)).await {
        match m {
            ServerMsg::IncomingCall { .. } => seen.push("offer".to_owned()),
            ServerMsg::CallEnded { reason, .. } => {
                seen.push(reason.clone());
                if reason == "answered_elsewhere" {
                    break;
                }
            }
            _ => {}
        }
    }
    assert_eq!(seen.first().map(String::as_str), Some("offer"), "{seen:?}");
    assert_eq!(seen.iter().filter(|s| *s == "offer").count(), 2, "{seen:?}");
    assert_eq!(
        seen.last().map(String::as_str),
        Some("answered_elsewhere"),
        "{seen:?}"
    );
    let cdrs = a.wait_cdrs(1);
    assert_eq!(cdrs[0]["answered_by"], "mobile", "{cdrs:?}");
    assert_eq!(mobile.stats().snapshot().calls_connected, 1);
    // b let go of both legs of the desk.
    assert_eq!(
        wait_metric(&b, "parley_cluster_hosted_legs", |v| v == 0.0),
        0.0
    );
    assert_eq!(
        a.metric("parley_cluster_offers_total{direction=\"sent\"}"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_answering_at_once_on_two_nodes_connect_one_call() {
    let nats = Nats::start();
    let (a, b, c) = three_nodes(&nats);
    // Both answer the moment the offer arrives: the calling node sends each its offer
    // before any withdrawal, so both answers are always in flight together.
    let answer = |cfg: parley_load::device::DeviceConfig| parley_load::device::DeviceConfig {
        answer_after: Some(Duration::ZERO),
        ..cfg
    };
    let desk = b.device(answer(b.device_config("alice", "desk"))).await;
    let mobile = c.device(answer(c.device_config("alice", "mobile"))).await;
    wait_remote_devices(&a, 2.0);
    for calls in 1..=3 {
        let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "300"]).await;
        assert_answered(&run, &a);
        let cdrs = a.wait_cdrs(calls);
        let (d, m) = (desk.stats().snapshot(), mobile.stats().snapshot());
        // Both rang and both answered; the node connected exactly one.
        assert_eq!(
            (d.calls_offered, m.calls_offered),
            (calls as u64, calls as u64)
        );
        assert_eq!(
            (d.calls_answered, m.calls_answered),
            (calls as u64, calls as u64),
            "both devices answered every call"
        );
        assert_eq!(
            d.calls_connected + m.calls_connected,
            calls as u64,
            "one device connected per call: {d:?} {m:?}\n{}",
            a.log()
        );
        let by = cdrs[0]["answered_by"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(by == "desk" || by == "mobile", "{:?}", cdrs[0]);
        assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{:?}", cdrs[0]);
    }
    assert_eq!(a.metric("parley_cluster_handoffs_answered_total"), 3.0);
    assert!(b.cdrs().is_empty() && c.cdrs().is_empty());
    // Neither node keeps a leg or a relay port of the losing answers.
    for n in [&b, &c] {
        assert_eq!(
            wait_metric(n, "parley_cluster_hosted_legs", |v| v == 0.0),
            0.0
        );
        assert_eq!(
            wait_metric(n, "parley_relay_ports_active", |v| v == 0.0),
            0.0,
            "{}",
            n.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_a_partition_stops_ringing_for_calls_routed_on_meanwhile() {
    let nats = Nats::start();
    let a = cluster_node(&nats, "a");
    // b would take a minute to miss a: only a declares the other dead.
    let b = Node::start_with_tail(
        "",
        "",
        "",
        200,
        &format!(
            "{CAROL}{}",
            nats.section("b")
                .replace("node_expiry_secs = 2", "node_expiry_secs = 60")
        ),
    );
    let mut desk_cfg = b.device_config("alice", "desk");
    desk_cfg.answer_after = None;
    let mut desk = b.device(desk_cfg).await;
    wait_remote_devices(&a, 1.0);
    let _trunk = SippUas::start(&a, &["-sn", "uas"]);

    // A call rings the desk on b; b is cut off (SIGSTOP) while it rings.
    let caller = tokio::spawn(sipp_uac(
        &a,
        &["-sn", "uac"],
        "+15550100001",
        1,
        1,
        &["-d", "300"],
    ));
    let offer = desk
        .wait_for(Duration::from_secs(5), |m| {
            matches!(m, ServerMsg::IncomingCall { .. })
        })
        .await;
    assert!(offer.is_some(), "{}", a.log());
    signal("-STOP", &b);
    // a declares b dead and routes the call on: alice's PSTN line, answered there.
    let run = caller.await.unwrap();
    assert_answered(&run, &a);
    let cdrs = a.wait_cdrs(1);
    assert_eq!(cdrs[0]["route"], "pstn", "{:?}", cdrs[0]);
    assert_eq!(a.metric("parley_cluster_nodes_lost_total"), 1.0);

    // b runs again, never having missed a: the desk must stop ringing for that call.
    signal("-CONT", &b);
    let ended = desk
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::CallEnded { .. })
        })
        .await;
    assert!(
        ended.is_some(),
        "the desk still rings for a call a routed elsewhere\n{}\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(
        wait_metric(&b, "parley_cluster_hosted_legs", |v| v == 0.0),
        0.0,
        "{}",
        b.log()
    );
    assert_eq!(b.metric("parley_relay_ports_active"), 0.0);
    // And the next call rings the desk again (a reads b's devices again).
    wait_remote_devices(&a, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_after_another_died_does_not_take_its_last_entries_for_a_live_node() {
    let nats = Nats::start();
    let a = cluster_node(&nats, "a");
    let mut b = cluster_node(&nats, "b");
    let _carol = a.device(a.device_config("carol", "desk")).await;
    let _alice = b.device(b.device_config("alice", "desk")).await;
    wait_remote_devices(&a, 1.0);
    b.kill_now();
    assert_eq!(
        wait_metric(&a, "parley_cluster_nodes_lost_total", |v| v == 1.0),
        1.0
    );
    // b's last node and device entries are still in the buckets (they age out after a
    // minute and 15 s): c, started now, replays them with its watches.
    let c = cluster_node(&nats, "c");
    assert_eq!(
        wait_metric(&c, "parley_cluster_remote_devices", |v| v >= 1.0),
        1.0,
        "carol on a"
    );
    assert_eq!(wait_metric(&c, "parley_cluster_nodes", |v| v >= 2.0), 2.0);
    // For a while (longer than the 2 s the old code took b for alive): only a and
    // carol; alice's call routes by her rules at once, without an offer to b.
    let _trunk = SippUas::start(&c, &["-sn", "uas"]);
    for _ in 0..5 {
        assert_eq!(
            c.metric("parley_cluster_remote_devices"),
            1.0,
            "{}",
            c.log()
        );
        assert_eq!(c.metric("parley_cluster_nodes"), 2.0, "{}", c.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = sipp_uac(&c, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "100"]).await;
    assert_answered(&run, &c);
    let cdrs = c.wait_cdrs(1);
    assert_eq!(cdrs[0]["route"], "pstn", "{:?}", cdrs[0]);
    assert_eq!(
        c.metric("parley_cluster_offers_total{direction=\"sent\"}"),
        0.0,
        "{}",
        c.log()
    );
    let (st, body) = c.get("/api/v1/cluster", true);
    assert_eq!(st, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(names, ["c", "a"], "{listed}");
}

/// A SIPp call through `a` answered by alice's desk on `b` (which answers after 200 ms);
/// returns the running SIPp (it waits for the far end's BYE) once the call is up.
async fn call_up_through_a_answered_on_b(
    a: &Node,
    b: &Node,
) -> (
    parley_load::device::Device,
    tokio::task::JoinHandle<common::SippRun>,
) {
    let desk = b
        .device(parley_load::device::DeviceConfig {
            answer_after: Some(Duration::from_millis(200)),
            ..b.device_config("alice", "desk")
        })
        .await;
    wait_remote_devices(a, 1.0);
    let sc = scenario(a.dir.path(), "uac_remote_bye.xml");
    let caller = tokio::spawn(sipp_uac(
        a,
        &["-sf", sc.to_str().unwrap()],
        "+15550100001",
        1,
        1,
        &[],
    ));
    let up = wait_metric(a, "parley_cluster_handoffs_answered_total", |v| v == 1.0);
    assert_eq!(up, 1.0, "{}", a.log());
    assert_eq!(
        wait_metric(b, "parley_relay_flows_active", |v| v == 1.0),
        1.0,
        "{}",
        b.log()
    );
    (desk, caller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_node_dies_leaves_its_cdr_on_the_survivor_and_the_restarted_node_drops_its_row()
 {
    let nats = Nats::start();
    let mut a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b");
    let (mut desk, caller) = call_up_through_a_answered_on_b(&a, &b).await;

    // The call's own node dies: its call actor and CDR with it.
    a.kill_now();
    caller.abort();
    let ended = desk
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::CallEnded { .. })
        })
        .await;
    assert!(ended.is_some(), "{}", b.log());
    // b hosted the answered leg: it writes the call's CDR, once.
    let cdrs = b.wait_cdrs(1);
    let cdr = &cdrs[0];
    assert_eq!(cdr["call_id"], "c-1@a", "{cdr:?}");
    assert_eq!(cdr["disposition"], "INTERRUPTED", "{cdr:?}");
    assert_eq!(
        (cdr["user"].as_str(), cdr["answered_by"].as_str()),
        (Some("alice"), Some("desk"))
    );
    assert_eq!(cdr["route"], "im", "{cdr:?}");
    assert!(
        cdr["answer_time"].is_string() && cdr["end_time"].is_string(),
        "{cdr:?}"
    );
    let sip_call_id = cdr["sip_call_id"].as_str().unwrap_or_default().to_owned();
    assert!(!sip_call_id.is_empty(), "{cdr:?}");
    assert_eq!(
        b.metric("parley_cluster_survivor_cdrs_total{outcome=\"written\"}"),
        1.0
    );
    assert_eq!(
        wait_metric(&b, "parley_relay_ports_active", |v| v == 0.0),
        0.0
    );

    // a restarts: it closes its open row of the call as INTERRUPTED, then finds that b
    // claimed the call and drops its own row: one CDR of the call in the cluster.
    let a = a.crash_and_restart();
    assert!(
        a.log()
            .contains("closed the CDRs of calls cut by the last stop"),
        "{}",
        a.log()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let rows_of_call = |n: &Node| {
        n.cdrs()
            .iter()
            .filter(|c| c["sip_call_id"] == sip_call_id.as_str())
            .count()
    };
    while rows_of_call(&a) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rows_of_call(&a), 0, "{:?}\n{}", a.cdrs(), a.log());
    assert!(a.log().contains("own row dropped"), "{}", a.log());
    assert_eq!(rows_of_call(&b), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivors_cdr_is_withdrawn_when_the_calls_node_comes_back_and_writes_its_own() {
    let nats = Nats::start();
    let a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b");
    let (_desk, caller) = call_up_through_a_answered_on_b(&a, &b).await;
    // a stops (a long pause: b cannot tell it from a death) while the call is up.
    signal("-STOP", &a);
    let cdrs = b.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "INTERRUPTED", "{:?}", cdrs[0]);
    // a runs again, as it was: the call ends there with a's own CDR, and b's goes.
    signal("-CONT", &a);
    let run = caller.await.unwrap();
    assert_eq!(
        (run.code, run.successful),
        (0, 1),
        "{}\n{}",
        run.output,
        a.log()
    );
    let cdrs = a.wait_cdrs(1);
    assert_eq!(cdrs[0]["call_id"], "c-1", "{:?}", cdrs[0]);
    assert_eq!(cdrs[0]["answered_by"], "desk", "{:?}", cdrs[0]);
    assert_eq!(
        wait_metric(
            &b,
            "parley_cluster_survivor_cdrs_total{outcome=\"withdrawn\"}",
            |v| v == 1.0
        ),
        1.0,
        "{}",
        b.log()
    );
    assert!(b.cdrs().is_empty(), "{:?}", b.cdrs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_signalling_that_names_another_sender_than_its_subject_is_refused() {
    let nats = Nats::start();
    let a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b");
    let _alice = b.device(b.device_config("alice", "desk")).await;
    wait_remote_devices(&a, 1.0);
    // A client with the cluster's credentials posing as "c" on b's subject to a: asking
    // a to forget b (which would end every leg between them) is ignored.
    let client = async_nats::ConnectOptions::new()
        .user_and_password(NATS_USER.into(), NATS_PASSWORD.into())
        .connect(format!("nats://127.0.0.1:{}", nats.port))
        .await
        .unwrap();
    client
        .publish("parley.node.a.b", r#"{"t":"forgot","from":"c"}"#.into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    assert_eq!(
        wait_metric(&a, "parley_cluster_messages_invalid_total", |v| v == 1.0),
        1.0,
        "{}",
        a.log()
    );
    assert!(
        a.log().contains("sender is not its subject's"),
        "{}",
        a.log()
    );
    assert!(
        !a.log().contains("had declared this one lost"),
        "{}",
        a.log()
    );
    // b's device is still rung through a.
    assert_eq!(a.metric("parley_cluster_remote_devices"), 1.0);
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "100"]).await;
    assert_answered(&run, &a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_at_once_still_drops_its_row_of_a_call_the_survivor_claimed() {
    let nats = Nats::start();
    let a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b");
    let (_desk, caller) = call_up_through_a_answered_on_b(&a, &b).await;
    // Killed and started again at once: b learns of the restart from a's new entry
    // (perhaps before it would have expired a) and claims the call only then, after a
    // has set up its registries.
    let a = a.crash_and_restart();
    caller.abort();
    let cdrs = b.wait_cdrs(1);
    assert_eq!(cdrs[0]["disposition"], "INTERRUPTED", "{:?}", cdrs[0]);
    let sip_call_id = cdrs[0]["sip_call_id"].as_str().unwrap().to_owned();
    let rows_of_call = || {
        a.cdrs()
            .iter()
            .filter(|c| c["sip_call_id"] == sip_call_id.as_str())
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while rows_of_call() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rows_of_call(), 0, "{:?}\n{}", a.cdrs(), a.log());
    assert!(a.log().contains("own row dropped"), "{}", a.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_user_is_rung_on_her_device_on_a_third_node() {
    let nats = Nats::start();
    let a = cluster_node(&nats, "a");
    let mut b = cluster_node(&nats, "b");
    let c = cluster_node(&nats, "c");
    let _desk = b.device(b.device_config("alice", "desk")).await;
    let mobile = c.device(c.device_config("alice", "mobile")).await;
    wait_remote_devices(&a, 2.0);
    b.kill_now();
    // Within the expiry a and c declare b dead; alice's next call through a rings what
    // is left of her devices: the mobile on c.
    assert_eq!(
        wait_metric(&a, "parley_cluster_nodes_lost_total", |v| v == 1.0),
        1.0
    );
    assert_eq!(a.metric("parley_cluster_remote_devices"), 1.0);
    let run = sipp_uac(&a, &["-sn", "uac"], "+15550100001", 1, 1, &["-d", "200"]).await;
    assert_answered(&run, &a);
    let cdrs = a.wait_cdrs(1);
    assert_eq!(
        (cdrs[0]["route"].as_str(), cdrs[0]["answered_by"].as_str()),
        (Some("im"), Some("mobile")),
        "{:?}",
        cdrs[0]
    );
    assert_eq!(mobile.stats().snapshot().calls_connected, 1);
    assert_eq!(
        wait_metric(&c, "parley_cluster_nodes_lost_total", |v| v == 1.0),
        1.0
    );
}
