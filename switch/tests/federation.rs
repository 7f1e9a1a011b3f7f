//! Federated authentication against real OpenLDAP directories (`slapd`) through real
//! `parley auth-agent` processes: enrolment, logins and each way they fail, directory
//! numbers that route SIPp calls, failover between directory servers and between agents,
//! revocation, session tokens, tenant isolation.

mod common;

use std::time::Duration;

use common::ldap::{
    Agent, Person, Slapd, acme_people, directory_agent, directory_section, directory_tenant,
    wait_for_metric,
};
use common::{Node, scenario, sipp_uac};
use parley_codecs::control::{self, ClientMsg, ServerMsg};

/// Logs in over a raw control stream and returns the first answer (and the connection,
/// kept open by the caller while the session should live).
async fn login(
    node: &Node,
    tenant: &str,
    user: &str,
    password: &str,
    token: Option<&str>,
) -> (
    ServerMsg,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let conn = node.quic_connection().await.expect("QUIC handshake");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut buf = bytes::BytesMut::new();
    control::encode(
        &ClientMsg::Login {
            tenant: tenant.into(),
            user: user.into(),
            password: password.into(),
            device: "desk".into(),
            token: token.map(String::from),
        },
        &mut buf,
    )
    .unwrap();
    send.write_all(&buf).await.unwrap();
    let msg = read(&mut recv).await;
    (msg, conn, send, recv)
}

async fn read(recv: &mut quinn::RecvStream) -> ServerMsg {
    let mut header = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(15), recv.read_exact(&mut header))
        .await
        .expect("an answer in time")
        .expect("a frame");
    let mut body = vec![0u8; control::frame_len(header).unwrap()];
    recv.read_exact(&mut body).await.unwrap();
    control::decode(&body).unwrap()
}

/// The error code of a refused login (panics on success).
async fn refused(node: &Node, tenant: &str, user: &str, password: &str) -> String {
    match login(node, tenant, user, password, None).await.0 {
        ServerMsg::Error { code, fatal, .. } => {
            assert!(fatal);
            code
        }
        other => panic!("{tenant}/{user} logged in: {other:?}"),
    }
}

/// A node with tenant `acme` (region FR) whose agent reads `slapd`.
fn acme(node_extra: &str, agent_extra: &str) -> (Slapd, Node, Agent) {
    let slapd = Slapd::start("acme", &acme_people());
    let node = Node::start_federated(node_extra);
    let agent = directory_agent(&node, &slapd, "acme", "FR", agent_extra);
    (slapd, node, agent)
}

fn wait_agents(node: &Node, tenant: &str, n: usize) {
    wait_for_metric(
        node,
        &format!("parley_auth_agents_connected{{tenant=\"{tenant}\"}}"),
        |v| v == n as f64,
        "agents connected",
    );
}

fn result_metric(tenant: &str, result: &str) -> String {
    format!("parley_auth_results_total{{tenant=\"{tenant}\",result=\"{result}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_users_log_in_through_an_agent_and_a_directory_number_rings_them() {
    let slapd = Slapd::start("acme", &acme_people());
    let node = Node::start_federated("");
    let token = directory_tenant(&node, "acme", "FR");
    // The first server is down: the agent fails over to the second.
    let dead = format!("ldap://127.0.0.1:{}", common::ldap::free_tcp_port());
    let _agent = Agent::start(
        &node,
        &token,
        &directory_section(&slapd, &[&dead, &slapd.url]),
        "sync_interval_secs = 0",
    );
    wait_agents(&node, "acme", 1);
    // An enrolment token works once.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["auth-agent", "enroll", "--node"])
        .arg(node.agents.unwrap().to_string())
        .args(["--token", &token, "--state-dir"])
        .arg(node.dir.path().join("second"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("bad_token"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Each failure has its own code and metric.
    assert_eq!(
        refused(&node, "acme", "alice", "wrong").await,
        "auth_failed"
    );
    assert_eq!(refused(&node, "acme", "alice", "").await, "auth_failed");
    assert_eq!(refused(&node, "acme", "nobody", "x").await, "auth_failed");
    assert_eq!(
        refused(&node, "acme", "bob", "bob-pw").await,
        "account_locked"
    );
    assert_eq!(
        refused(&node, "acme", "carol", "carol-pw").await,
        "account_disabled"
    );
    // LDAP filter metacharacters in a login name are escaped: no match, not "any user".
    assert_eq!(refused(&node, "acme", "*", "alice-pw").await, "auth_failed");
    assert_eq!(
        refused(&node, "acme", "al*)(uid=*", "alice-pw").await,
        "auth_failed"
    );
    assert_eq!(node.metric(&result_metric("acme", "wrong_password")), 2.0);
    assert_eq!(node.metric(&result_metric("acme", "unknown_user")), 3.0);
    assert_eq!(node.metric(&result_metric("acme", "locked")), 1.0);
    assert_eq!(node.metric(&result_metric("acme", "disabled")), 1.0);

    // The right password: the node learns the directory's name and numbers (E.164, FR).
    let mut cfg = node.device_config("alice", "desk");
    cfg.tenant = "acme".into();
    cfg.password = "alice-pw".into();
    let device = node.device(cfg).await;
    assert_eq!(device.number(), "+33123456789");
    assert_eq!(node.metric(&result_metric("acme", "ok")), 1.0);
    // No password reaches the node's log or the agent's.
    assert!(!node.log().contains("alice-pw"));
    assert!(!_agent.log().contains("alice-pw"));
    assert!(
        _agent.log().contains("directory failover"),
        "{}",
        _agent.log()
    );

    // A gateway call to the mobile number, which only the directory lists, rings alice.
    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    let run = sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+33612345678",
        1,
        1,
        &["-d", "500"],
    )
    .await;
    assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
    assert_eq!((run.successful, run.failed), (1, 0));
    let cdrs = node.wait_cdrs(1);
    assert_eq!(cdrs[0]["tenant"], "acme", "{cdrs:#?}");
    assert_eq!(cdrs[0]["user"], "alice");
    assert_eq!(cdrs[0]["route"], "im");
    assert_eq!(device.stats().snapshot().calls_connected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_reconnects_until_the_password_changes() {
    let (slapd, node, _agent) = acme("", "sync_interval_secs = 0");
    let (ok, conn, ..) = login(&node, "acme", "alice", "alice-pw", None).await;
    let ServerMsg::LoginOk {
        token: Some(session_token),
        display_name,
        ..
    } = ok
    else {
        panic!("{ok:?}")
    };
    assert_eq!(display_name.as_deref(), Some("Alice Martin"));
    conn.close(0u32.into(), b"");
    // Reconnect with the token, no password.
    let (again, conn, ..) = login(&node, "acme", "alice", "", Some(&session_token)).await;
    assert!(matches!(again, ServerMsg::LoginOk { .. }), "{again:?}");
    conn.close(0u32.into(), b"");
    // A token is bound to its user.
    let (other, ..) = login(&node, "acme", "bob", "", Some(&session_token)).await;
    assert!(
        matches!(&other, ServerMsg::Error { code, .. } if code == "auth_failed"),
        "{other:?}"
    );
    // The directory changes alice's password: her tokens end at the next check.
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: userPassword\nuserPassword: alice-new\n",
        slapd.dn("alice")
    ));
    let (after, ..) = login(&node, "acme", "alice", "", Some(&session_token)).await;
    assert!(
        matches!(&after, ServerMsg::Error { code, .. } if code == "auth_failed"),
        "{after:?}\n{}",
        node.log()
    );
    assert_eq!(node.metric(&result_metric("acme", "bad_token")), 2.0);
    let (fresh, ..) = login(&node, "acme", "alice", "alice-new", None).await;
    assert!(matches!(fresh, ServerMsg::LoginOk { .. }), "{fresh:?}");
}

async fn logged_in(node: &Node, tenant: &str, user: &str, password: &str) -> bool {
    matches!(
        login(node, tenant, user, password, None).await.0,
        ServerMsg::LoginOk { .. }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_serve_a_tenant_and_killing_one_mid_run_fails_no_login() {
    let (slapd, node, mut first) = acme("request_timeout_ms = 2000", "sync_interval_secs = 0");
    let second = Agent::start(
        &node,
        &common::ldap::enrolment_token(&node, "acme"),
        &directory_section(&slapd, &[&slapd.url]),
        "sync_interval_secs = 0",
    );
    wait_agents(&node, "acme", 2);
    for i in 0..10 {
        assert!(
            logged_in(&node, "acme", "alice", "alice-pw").await,
            "login {i}"
        );
    }
    // Round robin: both agents answered.
    for a in [&first, &second] {
        assert!(a.log().contains("request answered"), "{}", a.log());
    }
    // SIGKILL between two logins: the node still holds the dead agent's connection (it
    // has not timed out); requests it never acknowledges go to the other agent.
    first.kill();
    for i in 0..10 {
        assert!(
            logged_in(&node, "acme", "alice", "alice-pw").await,
            "login {i} after the kill\n{}",
            node.log()
        );
    }
    wait_agents(&node, "acme", 1);
    assert_eq!(node.metric(&result_metric("acme", "ok")), 20.0);
    for r in ["timeout", "no_agent", "busy", "directory_unavailable"] {
        assert_eq!(node.metric(&result_metric("acme", r)), 0.0, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_foreign_agents_are_refused_at_the_handshake() {
    let (slapd, node, agent) = acme("", "sync_interval_secs = 0");
    let admin = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
            .args([
                "tenant",
                "--node",
                &node.http.to_string(),
                "--token",
                &node.token,
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let agents = admin(&["agents", "acme"]);
    assert_eq!(agents[0]["id"], agent.id.as_str(), "{agents}");
    assert_eq!(agents[0]["connected"], true);
    admin(&["revoke", &agent.id]);
    wait_agents(&node, "acme", 0);
    // The agent keeps reconnecting; each handshake is refused.
    wait_for_metric(
        &node,
        "parley_auth_agent_handshakes_refused_total{reason=\"revoked\"}",
        |v| v >= 1.0,
        "revoked agent refused",
    );
    assert_eq!(admin(&["agents", "acme"])[0]["revoked"], true);
    assert_eq!(
        refused(&node, "acme", "alice", "alice-pw").await,
        "no_agent"
    );
    assert!(node.metric(&result_metric("acme", "no_agent")) >= 1.0);

    // A certificate from another CA, with a key that matches it, is refused too.
    let mut foreign = Agent::start(
        &node,
        &common::ldap::enrolment_token(&node, "acme"),
        &directory_section(&slapd, &[&slapd.url]),
        "sync_interval_secs = 0",
    );
    wait_agents(&node, "acme", 1);
    foreign.kill();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["agent".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "acme");
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(foreign.state_dir().join("agent-cert-0.pem"), cert.pem()).unwrap();
    std::fs::write(
        foreign.state_dir().join("agent-key-0.der"),
        key.serialize_der(),
    )
    .unwrap();
    foreign.resume();
    wait_for_metric(
        &node,
        "parley_auth_agent_handshakes_refused_total{reason=\"untrusted\"}",
        |v| v >= 1.0,
        "foreign agent refused",
    );
    // Only the killed process's stale connection is left: nobody answers for acme.
    assert_eq!(
        refused(&node, "acme", "alice", "alice-pw").await,
        "no_agent"
    );
    wait_agents(&node, "acme", 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_agent_new_logins_fail_while_sessions_and_tokens_carry_on() {
    // A fixed agent port: the restarted node must be where the agent looks for it.
    let port = common::free_udp_port();
    let (_slapd, node, mut agent) = acme(
        &format!(
            "listen = \"127.0.0.1:{port}\"\nrequest_timeout_ms = 2000\nno_agent_grace_secs = 600"
        ),
        "sync_interval_secs = 0",
    );
    let (ok, _conn, mut send, mut recv) = login(&node, "acme", "alice", "alice-pw", None).await;
    let ServerMsg::LoginOk {
        token: Some(token), ..
    } = ok
    else {
        panic!("{ok:?}")
    };
    agent.kill();
    // The first login after the kill finds the agent unresponsive; the tenant then has
    // none connected.
    assert_eq!(
        refused(&node, "acme", "alice", "alice-pw").await,
        "no_agent"
    );
    wait_agents(&node, "acme", 0);
    // The session already up carries on.
    let mut buf = bytes::BytesMut::new();
    control::encode(&ClientMsg::Ping { id: 9 }, &mut buf).unwrap();
    send.write_all(&buf).await.unwrap();
    loop {
        match read(&mut recv).await {
            ServerMsg::Pong { id } => {
                assert_eq!(id, 9);
                break;
            }
            _ => continue,
        }
    }
    // Within the grace, the device reconnects with its token.
    let (again, ..) = login(&node, "acme", "alice", "", Some(&token)).await;
    assert!(matches!(again, ServerMsg::LoginOk { .. }), "{again:?}");

    // The agent comes back; then the node restarts and the agent reconnects by itself.
    agent.resume();
    wait_agents(&node, "acme", 1);
    assert!(logged_in(&node, "acme", "alice", "alice-pw").await);
    let node = node.crash_and_restart();
    // The agent notices the dead connection at its 30 s idle timeout, then reconnects.
    common::ldap::wait_for_metric_within(
        &node,
        "parley_auth_agents_connected{tenant=\"acme\"}",
        |v| v == 1.0,
        "agent back after the node's restart",
        Duration::from_secs(60),
    );
    assert!(logged_in(&node, "acme", "alice", "alice-pw").await);
    assert!(
        agent.log().contains("reconnecting to the node"),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_slow_directory_fails_with_its_own_error_and_no_pile_up() {
    let (mut slapd, node, _agent) = acme(
        "request_timeout_ms = 1000\nmax_pending_per_tenant = 2",
        "sync_interval_secs = 0",
    );
    assert!(logged_in(&node, "acme", "alice", "alice-pw").await);
    slapd.pause();
    assert_eq!(
        refused(&node, "acme", "alice", "alice-pw").await,
        "directory_unavailable"
    );
    slapd.resume();
    assert!(logged_in(&node, "acme", "alice", "alice-pw").await);

    // A directory that accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!("ldap://{}", hole.local_addr().unwrap());
    let _held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in hole.incoming() {
            conns.push(c);
        }
    });
    let (st, body) = node.post(
        "/api/v1/tenants",
        r#"{"name":"slow","region":"FR","directory":true}"#,
        true,
    );
    assert_eq!(st, 201, "{body}");
    let slow_section =
        directory_section(&slapd, &[&hole_url]).replace("timeout_ms = 1000", "timeout_ms = 5000");
    let _slow = Agent::start(
        &node,
        &common::ldap::enrolment_token(&node, "slow"),
        &slow_section,
        "sync_interval_secs = 0",
    );
    wait_agents(&node, "slow", 1);
    let logins: Vec<_> = (0..6)
        .map(|_| {
            let n = &node;
            async move { refused(n, "slow", "alice", "alice-pw").await }
        })
        .collect();
    let codes = futures_util::future::join_all(logins).await;
    let timeouts = codes.iter().filter(|c| *c == "directory_timeout").count();
    let busy = codes.iter().filter(|c| *c == "directory_busy").count();
    assert_eq!(timeouts + busy, 6, "{codes:?}");
    assert!(timeouts >= 1 && busy >= 1, "{codes:?}");
    assert_eq!(
        node.metric(&result_metric("slow", "timeout")),
        timeouts as f64
    );
    assert_eq!(node.metric(&result_metric("slow", "busy")), busy as f64);
}

/// A device of `tenant/user` logged in over a raw stream, for IM requests.
struct Raw {
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Raw {
    async fn new(node: &Node, tenant: &str, user: &str, password: &str) -> Raw {
        let (ok, conn, send, recv) = login(node, tenant, user, password, None).await;
        assert!(matches!(ok, ServerMsg::LoginOk { .. }), "{ok:?}");
        Raw {
            _conn: conn,
            send,
            recv,
        }
    }

    async fn send(&mut self, msg: ClientMsg) {
        let mut buf = bytes::BytesMut::new();
        control::encode(&msg, &mut buf).unwrap();
        self.send.write_all(&buf).await.unwrap();
    }

    /// The next message matching `pred` (others skipped).
    async fn expect(&mut self, pred: impl Fn(&ServerMsg) -> bool) -> ServerMsg {
        loop {
            let m = read(&mut self.recv).await;
            if pred(&m) {
                return m;
            }
        }
    }

    /// The next error's code.
    async fn error(&mut self) -> String {
        match self.expect(|m| matches!(m, ServerMsg::Error { .. })).await {
            ServerMsg::Error { code, .. } => code,
            _ => unreachable!(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_unless_both_federate() {
    let globex_dir = Slapd::start(
        "globex",
        &[
            Person {
                uid: "gina",
                cn: "Gina Globex",
                password: "gina-pw",
                phones: &["+33 1 99 99 99 99"],
                mobile: None,
                extra: "",
            },
            // Same login name as acme's alice, other password.
            Person {
                uid: "alice",
                cn: "Alice of Globex",
                password: "globex-pw",
                phones: &[],
                mobile: None,
                extra: "",
            },
        ],
    );
    let mut people = acme_people();
    // Acme's directory claims gina's number for one of its own.
    people.push(Person {
        uid: "mallory",
        cn: "Mallory",
        password: "m-pw",
        phones: &["01 99 99 99 99"],
        mobile: None,
        extra: "",
    });
    let acme_dir = Slapd::start("acme", &people);
    let node = Node::start_federated("");
    let globex_token = directory_tenant(&node, "globex", "FR");
    let mut globex = Agent::start(
        &node,
        &globex_token,
        &directory_section(&globex_dir, &[&globex_dir.url]),
        "sync_interval_secs = 1",
    );
    // Globex's sync lands first: the number is gina's.
    wait_for_metric(
        &node,
        "parley_directory_users{tenant=\"globex\"}",
        |v| v == 2.0,
        "globex synced",
    );
    let acme_token = directory_tenant(&node, "acme", "FR");
    let _acme = Agent::start(
        &node,
        &acme_token,
        &directory_section(&acme_dir, &[&acme_dir.url]),
        "sync_interval_secs = 1",
    );
    wait_for_metric(
        &node,
        "parley_directory_users{tenant=\"acme\"}",
        |v| v == 5.0,
        "acme synced",
    );
    assert_eq!(
        node.metric("parley_directory_numbers_refused{tenant=\"acme\"}"),
        1.0
    );
    // Synced users exist before they ever log in.
    assert_eq!(
        node.get("/api/v1/users/gina/presence?tenant=globex", true)
            .0,
        200
    );
    // A call to gina's number is hers (her phone answers it), not mallory's.
    let mut cfg = node.device_config("gina", "phone");
    cfg.tenant = "globex".into();
    cfg.password = "gina-pw".into();
    cfg.answer_after = None;
    let mut phone = node.device(cfg).await;
    let mut alice = Raw::new(&node, "acme", "alice", "alice-pw").await;
    let sc = scenario(node.dir.path(), "uac_pcmu.xml");
    let call = tokio::spawn(sipp_uac(
        &node,
        &["-sf", sc.to_str().unwrap()],
        "+33199999999",
        1,
        1,
        &["-d", "200"],
    ));
    let offer = phone
        .wait_for(Duration::from_secs(10), |m| {
            matches!(m, ServerMsg::IncomingCall { .. })
        })
        .await;
    let Some(ServerMsg::IncomingCall { call_id, .. }) = offer else {
        panic!("no offer: {offer:?}\n{}", node.log())
    };
    // A user of another tenant who knows the call id can neither take, refuse nor end it.
    for msg in [
        ClientMsg::Ringing {
            call_id: call_id.clone(),
        },
        ClientMsg::Answer {
            call_id: call_id.clone(),
        },
        ClientMsg::Reject {
            call_id: call_id.clone(),
        },
        ClientMsg::Hangup {
            call_id: call_id.clone(),
        },
    ] {
        alice.send(msg.clone()).await;
        assert_eq!(alice.error().await, "unknown_call", "{msg:?}");
    }
    phone.send(ClientMsg::Answer { call_id }).await.unwrap();
    let run = call.await.unwrap();
    assert_eq!((run.successful, run.failed), (1, 0), "{}", run.output);
    let cdrs = node.wait_cdrs(1);
    assert!(
        !cdrs.is_empty(),
        "{}
{}",
        run.output,
        node.log()
    );
    assert_eq!(
        (cdrs[0]["tenant"].as_str(), cdrs[0]["user"].as_str()),
        (Some("globex"), Some("gina")),
        "{cdrs:#?}"
    );

    // Each tenant's agent answers for its own directory only.
    assert_eq!(
        refused(&node, "globex", "alice", "alice-pw").await,
        "auth_failed"
    );
    assert_eq!(
        refused(&node, "acme", "gina", "gina-pw").await,
        "auth_failed"
    );
    let mut gina = Raw::new(&node, "globex", "gina", "gina-pw").await;

    // Without a rule on both sides nothing of globex can be reached from acme.
    for rule in [None, Some("acme")] {
        if let Some(t) = rule {
            let (st, body) = node.put(
                &format!("/api/v1/tenants/{t}/federation"),
                r#"{"allow":["globex"]}"#,
            );
            assert_eq!(st, 200, "{body}");
        }
        alice
            .send(ClientMsg::Subscribe {
                users: vec!["gina@globex".into()],
            })
            .await;
        assert_eq!(alice.error().await, "unknown_user");
        alice
            .send(ClientMsg::Chat {
                to: "gina@globex".into(),
                text: "hi".into(),
                id: 1,
            })
            .await;
        assert_eq!(alice.error().await, "unknown_user");
        alice
            .send(ClientMsg::Dial {
                to: "gina@globex".into(),
            })
            .await;
        assert_eq!(alice.error().await, "unknown_destination");
        // A name of the own tenant never leaks into another.
        alice
            .send(ClientMsg::Subscribe {
                users: vec!["gina".into()],
            })
            .await;
        assert_eq!(alice.error().await, "unknown_user");
    }
    // Both sides allow it: alice reaches gina as gina@globex, and gina sees alice@acme.
    let (st, body) = node.put("/api/v1/tenants/globex/federation", r#"{"allow":["acme"]}"#);
    assert_eq!(st, 200, "{body}");
    alice
        .send(ClientMsg::Subscribe {
            users: vec!["gina@globex".into()],
        })
        .await;
    let update = alice
        .expect(|m| matches!(m, ServerMsg::PresenceUpdate { .. }))
        .await;
    assert!(
        matches!(&update, ServerMsg::PresenceUpdate { user, .. } if user == "gina@globex"),
        "{update:?}"
    );
    alice
        .send(ClientMsg::Chat {
            to: "gina@globex".into(),
            text: "hello from acme".into(),
            id: 2,
        })
        .await;
    let got = gina.expect(|m| matches!(m, ServerMsg::Chat { .. })).await;
    assert!(
        matches!(&got, ServerMsg::Chat { from, text, .. } if from == "alice@acme" && text == "hello from acme"),
        "{got:?}"
    );
    // Unsubscribing drops only the sender's own watches: gina cannot cut alice's watch on
    // her. Her second device leaving still reaches alice.
    gina.send(ClientMsg::Unsubscribe {
        users: vec!["alice@acme".into()],
    })
    .await;
    drop(gina);
    let update = alice
        .expect(|m| matches!(m, ServerMsg::PresenceUpdate { devices: 1, .. }))
        .await;
    assert!(
        matches!(&update, ServerMsg::PresenceUpdate { user, .. } if user == "gina@globex"),
        "{update:?}"
    );

    // A call between two users of one tenant: the callee's book names the caller as the
    // directory does (not by the login name the call carried).
    let mut cfg = node.device_config("dave", "desk");
    cfg.tenant = "acme".into();
    cfg.password = "dave-pw".into();
    cfg.reject = true;
    let _dave = node.device(cfg).await;
    alice
        .send(ClientMsg::Dial {
            to: "+33123456711".into(),
        })
        .await;
    alice
        .expect(|m| matches!(m, ServerMsg::CallEnded { .. }))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (st, body) = node.get("/api/v1/users/dave/address-book?tenant=acme", true);
        assert_eq!(st, 200, "{body}");
        let book: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        if let Some(e) = book.iter().find(|e| e["address"] == "+33123456789") {
            assert_eq!(e["name"], "Alice Martin", "{e}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{book:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Admin routes scope every read and write by tenant: globex's alice is not acme's.
    let rules = r#"{"rules":[{"name":"globex only","then":{"action":"reject","code":480}}]}"#;
    let (st, body) = node.put("/api/v1/users/alice/preferences?tenant=globex", rules);
    assert_eq!(st, 200, "{body}");
    let (st, body) = node.get("/api/v1/users/alice/preferences?tenant=acme", true);
    assert_eq!(st, 200, "{body}");
    assert!(!body.contains("globex only"), "{body}");
    let (st, body) = node.get("/api/v1/users/alice/address-book?tenant=acme", true);
    assert_eq!(st, 200, "{body}");
    assert!(
        body.contains("+33123456711"),
        "acme alice called dave: {body}"
    );
    let (st, body) = node.get("/api/v1/users/alice/address-book?tenant=globex", true);
    assert_eq!((st, body.as_str()), (200, "[]"));
    let (st, body) = node.get("/api/v1/cdrs?tenant=globex", true);
    assert_eq!(st, 200, "{body}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["tenant"] == "globex"),
        "{rows:#?}"
    );
    assert_eq!(
        node.get("/api/v1/users/mallory/presence?tenant=globex", true)
            .0,
        404
    );

    // Admin routes: the token is required, names are checked.
    for (method, path) in [
        ("GET", "/api/v1/tenants"),
        ("POST", "/api/v1/tenants"),
        ("POST", "/api/v1/tenants/acme/enrolment-tokens"),
        ("GET", "/api/v1/tenants/acme/agents"),
        ("PUT", "/api/v1/tenants/acme/federation"),
        ("POST", "/api/v1/agents/x/revoke"),
    ] {
        assert_eq!(
            node.request(method, path, "{}", false).0,
            401,
            "{method} {path}"
        );
    }
    assert_eq!(
        node.post("/api/v1/tenants/nope/enrolment-tokens", "", true)
            .0,
        404
    );
    assert_eq!(
        node.post(
            "/api/v1/tenants",
            r#"{"name":"Bad Name","region":"FR"}"#,
            true
        )
        .0,
        400
    );
    assert_eq!(
        node.post("/api/v1/tenants", r#"{"name":"ok","region":"XX"}"#, true)
            .0,
        400
    );

    // With globex's agent gone, acme's agent is never asked for globex.
    globex.kill();
    assert_eq!(
        refused(&node, "globex", "gina", "gina-pw").await,
        "no_agent"
    );
    assert!(!_acme.log().contains("gina-pw"));

    // A user removed from the directory is gone at the next sync.
    globex.resume();
    wait_agents(&node, "globex", 1);
    globex_dir.modify(&format!(
        "dn: {}\nchangetype: delete\n",
        globex_dir.dn("gina")
    ));
    wait_for_metric(
        &node,
        "parley_directory_users{tenant=\"globex\"}",
        |v| v == 1.0,
        "gina removed",
    );
    assert_eq!(
        node.get("/api/v1/users/gina/presence?tenant=globex", true)
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_renew_their_certificates_before_expiry() {
    // 60 s certificates (66 s with the backdating): the agent renews when 16.5 s are left.
    let (_slapd, node, agent) = acme("agent_cert_secs = 60", "sync_interval_secs = 0");
    let deadline = std::time::Instant::now() + Duration::from_secs(75);
    while !agent.log().contains("certificate renewed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no renewal:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.state_dir().join("agent.json")).unwrap())
            .unwrap();
    assert_eq!(state["generation"], 1);
    assert!(!agent.state_dir().join("agent-cert-0.pem").exists());
    wait_agents(&node, "acme", 1);
    assert!(logged_in(&node, "acme", "alice", "alice-pw").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_directory_accounts_over_ldaps_and_starttls() {
    let slapd = Slapd::start_tls(
        "corp",
        &[
            Person {
                uid: "ada",
                cn: "Ada Lovelace",
                password: "ada-pw",
                phones: &["+44 20 7946 0000"],
                mobile: None,
                extra: "memberOf: cn=Sales,dc=corp,dc=test",
            },
            Person {
                uid: "eve",
                cn: "Eve Locked",
                password: "eve-pw",
                phones: &[],
                mobile: None,
                // AD: a non-zero lockoutTime is a locked account.
                extra: "lockoutTime: 133000000000000000",
            },
        ],
    );
    let node = Node::start_federated("");
    let ca = slapd.ca_file.clone().unwrap();
    // A CA the directory's certificate does not chain to.
    let other_ca = node.dir.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other_ca, params.self_signed(&key).unwrap().pem()).unwrap();
    let section = |url: &str, starttls: bool, ca: &std::path::Path| {
        format!(
            "kind = \"active_directory\"\nservers = [\"{url}\"]\nstarttls = {starttls}\nca_file = \"{}\"\nbind_dn = \"cn=svc,dc=corp,dc=test\"\nbind_password = \"{}\"\nbase = \"ou=people,dc=corp,dc=test\"\n",
            ca.display(),
            common::ldap::SERVICE_PW
        )
    };
    let ldaps = slapd.ldaps_url.clone().unwrap();
    let mut agents = Vec::new();
    for (tenant, url, starttls, ca) in [
        ("corp", ldaps.as_str(), false, &ca),
        ("corp2", slapd.url.as_str(), true, &ca),
        ("corp3", ldaps.as_str(), false, &other_ca),
    ] {
        let token = directory_tenant(&node, tenant, "GB");
        agents.push(Agent::start(
            &node,
            &token,
            &section(url, starttls, ca),
            "sync_interval_secs = 0",
        ));
        wait_agents(&node, tenant, 1);
    }
    for tenant in ["corp", "corp2"] {
        let (ok, ..) = login(&node, tenant, "ada", "ada-pw", None).await;
        let ServerMsg::LoginOk {
            number,
            display_name,
            ..
        } = ok
        else {
            panic!("{tenant}: {ok:?}\n{}", node.log())
        };
        assert_eq!(number, "+442079460000");
        assert_eq!(display_name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(refused(&node, tenant, "ada", "nope").await, "auth_failed");
        assert_eq!(
            refused(&node, tenant, "eve", "eve-pw").await,
            "account_locked"
        );
    }
    // A directory whose certificate the agent cannot verify is unreachable, not trusted.
    assert_eq!(
        refused(&node, "corp3", "ada", "ada-pw").await,
        "directory_unavailable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locking_an_account_in_the_directory_ends_its_sessions_and_tokens() {
    let (slapd, node, _agent) = acme("", "sync_interval_secs = 1");
    let (ok, _conn, _send, mut recv) = login(&node, "acme", "alice", "alice-pw", None).await;
    let ServerMsg::LoginOk {
        token: Some(token), ..
    } = ok
    else {
        panic!("{ok:?}")
    };
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nadd: pwdAccountLockedTime\npwdAccountLockedTime: 000001010000Z\n",
        slapd.dn("alice")
    ));
    // The next sync reports the lock: the node closes alice's live session.
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut header = [0u8; 4];
        loop {
            match recv.read_exact(&mut header).await {
                Ok(()) => {
                    let len = control::frame_len(header).unwrap();
                    let mut body = vec![0u8; len];
                    if recv.read_exact(&mut body).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "session not closed\n{}", node.log());
    assert!(
        node.log().contains("directory ended the account"),
        "{}",
        node.log()
    );
    let (after, ..) = login(&node, "acme", "alice", "", Some(&token)).await;
    assert!(
        matches!(&after, ServerMsg::Error { code, .. } if code == "auth_failed"),
        "{after:?}"
    );
    assert_eq!(
        refused(&node, "acme", "alice", "alice-pw").await,
        "account_locked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_tenants_issues_tokens_and_sets_federation() {
    let slapd = Slapd::start("acme", &acme_people());
    let node = Node::start_federated("");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
            .arg("tenant")
            .arg("--data-dir")
            .arg(node.data_dir())
            .args(["--token", &node.token])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The node is found through its data directory (node.json).
    let (ok, out, err) = cli(&["create", "acme", "--region", "fr", "--directory"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"region\": \"FR\""), "{out}");
    let (ok, out, err) = cli(&["token", "acme", "--ttl-secs", "600"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = v["token"].as_str().unwrap();
    let _agent = Agent::start(
        &node,
        token,
        &directory_section(&slapd, &[&slapd.url]),
        "sync_interval_secs = 0",
    );
    wait_agents(&node, "acme", 1);
    assert!(logged_in(&node, "acme", "alice", "alice-pw").await);
    let (ok, out, _) = cli(&["list"]);
    assert!(ok && out.contains("\"agents_connected\": 1"), "{out}");
    let (ok, _, err) = cli(&["federate", "acme", "globex"]);
    assert!(ok, "{err}");
    // Errors are plain: an unknown tenant, a bad region.
    let (ok, _, err) = cli(&["token", "nowhere"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = cli(&["create", "x", "--region", "ZZ"]);
    assert!(!ok && err.contains("bad_region"), "{err}");
}
