//! Logins per second through one auth agent and one real OpenLDAP directory.
//!
//! `cargo bench -p parley-switch --bench logins [-- COUNT CONCURRENCY]` starts slapd, a
//! node and one `parley auth-agent`, then logs devices in over QUIC, each with a fresh
//! connection and a password (so every login is a TLS handshake to the node, a search and
//! a bind in the directory). It prints logins per second and the CPU each process spent
//! per login; the figures go to `docs/BENCHMARKS.md`.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::Instant;

use common::Node;
use common::ldap::{Agent, Person, Slapd, directory_section, directory_tenant, wait_for_metric};
use parley_codecs::control::{self, ClientMsg, ServerMsg};

use common::process_cpu_secs as cpu;

/// One login on a fresh connection; the failure's reason otherwise.
async fn login_once(
    endpoint: &quinn::Endpoint,
    node: &Node,
    cfg: &quinn::ClientConfig,
) -> Result<(), String> {
    let connecting = endpoint
        .connect_with(cfg.clone(), node.quic, "localhost")
        .map_err(|e| format!("connect: {e}"))?;
    let conn = connecting.await.map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
    let mut buf = bytes::BytesMut::new();
    control::encode(
        &ClientMsg::Login {
            tenant: "acme".into(),
            user: "alice".into(),
            password: "alice-pw".into(),
            device: "bench".into(),
            token: None,
        },
        &mut buf,
    )
    .unwrap();
    send.write_all(&buf)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let mut body = vec![0u8; control::frame_len(header).unwrap_or(0)];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let answer = control::decode(&body);
    conn.close(0u32.into(), b"");
    match answer {
        Ok(ServerMsg::LoginOk { .. }) => Ok(()),
        Ok(ServerMsg::Error { code, .. }) => Err(format!("error {code}")),
        other => Err(format!("answer {other:?}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let count: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3000);
    let concurrency: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let slapd = Slapd::start(
        "acme",
        &[Person {
            uid: "alice",
            cn: "Alice",
            password: "alice-pw",
            phones: &["+33 1 23 45 67 89"],
            mobile: None,
            extra: "",
        }],
    );
    // Login throttling counts failures only; raise the pending caps for the burst.
    let node = Node::start_with_tail(
        "",
        "",
        "",
        200,
        "[login]\npending_per_source = 4096\npending_total = 8192\n[federation]\nlisten = \"127.0.0.1:0\"\nmax_pending_per_tenant = 4096\n",
    );
    let token = directory_tenant(&node, "acme", "FR");
    let agent = Agent::start(
        &node,
        &token,
        &directory_section(&slapd, &[&slapd.url]),
        "sync_interval_secs = 0\nmax_concurrent = 256",
    );
    wait_for_metric(
        &node,
        "parley_auth_agents_connected{tenant=\"acme\"}",
        |v| v == 1.0,
        "agent connected",
    );
    let cert = node.cert();
    let cfg = parley_load::device::client_config(&cert).unwrap();
    let endpoint = rt.block_on(async { parley_load::device::client_endpoint(node.quic).unwrap() });
    // Warm-up: connections, the agent's service bind, slapd's caches.
    rt.block_on(async {
        for _ in 0..50 {
            let r = login_once(&endpoint, &node, &cfg).await;
            assert!(r.is_ok(), "{r:?}\n{}", node.log());
        }
    });
    let pids = [
        ("node", node.pid()),
        ("agent", agent.pid()),
        ("slapd", slapd.pid()),
    ];
    let before: Vec<f64> = pids.iter().map(|(_, p)| cpu(*p)).collect();
    let started = Instant::now();
    let failed = rt.block_on(async {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (endpoint, cfg, next) = (endpoint.clone(), cfg.clone(), next.clone());
            let node = &node;
            tasks.push(async move {
                let mut failed = std::collections::BTreeMap::<String, usize>::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                    if let Err(why) = login_once(&endpoint, node, &cfg).await {
                        *failed.entry(why).or_default() += 1;
                    }
                }
                failed
            });
        }
        let mut all = std::collections::BTreeMap::<String, usize>::new();
        for m in futures_util::future::join_all(tasks).await {
            for (k, v) in m {
                *all.entry(k).or_default() += v;
            }
        }
        all
    });
    let reasons = failed
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let failed: usize = failed.values().sum();
    let wall = started.elapsed();
    let after: Vec<f64> = pids.iter().map(|(_, p)| cpu(*p)).collect();
    println!(
        "logins: {count} in {:.2} s with {concurrency} at once: {:.0} logins/s, {failed} failed{}",
        wall.as_secs_f64(),
        count as f64 / wall.as_secs_f64(),
        if failed > 0 {
            format!(" ({reasons})")
        } else {
            String::new()
        }
    );
    for (i, (name, _)) in pids.iter().enumerate() {
        let spent = after[i] - before[i];
        println!(
            "  {name}: {:.2} s CPU, {:.0} µs per login ({:.0}% of a core)",
            spent,
            spent * 1e6 / count as f64,
            spent * 100.0 / wall.as_secs_f64()
        );
    }
    if failed > 0 {
        // What the node said about its agents (the reasons behind the failures).
        for l in node
            .log()
            .lines()
            .filter(|l| {
                l.contains("slow to take")
                    || l.contains("agent request failed")
                    || l.contains("auth agent disconnected")
                    || (l.contains("agent") && !l.contains(" INFO "))
            })
            .take(20)
        {
            println!("  node: {l}");
        }
        for l in agent
            .log()
            .lines()
            .filter(|l| !l.contains(" INFO "))
            .take(20)
        {
            println!("  agent: {l}");
        }
    }
    drop(agent);
    drop(slapd);
    assert!(node.stop().success());
}
