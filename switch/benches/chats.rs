//! Chats per second: stored for an offline user, delivered from the store at login, and
//! delivered live.
//!
//! `cargo bench -p parley-switch --bench chats [-- COUNT WINDOW]` starts a node and two
//! `parley-load` devices' worth of users over QUIC: alice sends COUNT chats (WINDOW
//! unacknowledged at most) to bob while bob is offline, then bob logs in and takes them
//! from the store, then alice sends COUNT more while bob is online. Each phase prints
//! chats per second and the node's CPU per chat; the figures go to `docs/BENCHMARKS.md`.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::Node;
use parley_codecs::control::{ClientMsg, ServerMsg};
use parley_load::device::Device;

use common::process_cpu_secs as cpu;

const T: Duration = Duration::from_secs(30);

/// Sends `count` chats to bob with at most `window` unacknowledged; returns how many
/// acks said `stored` and how many said delivered.
async fn send_all(alice: &mut Device, count: u64, window: u64) -> (u64, u64) {
    let (mut sent, mut acked, mut stored, mut delivered) = (0u64, 0u64, 0u64, 0u64);
    while acked < count {
        while sent < count && sent - acked < window {
            sent += 1;
            alice
                .send(ClientMsg::Chat {
                    to: "bob".into(),
                    text: format!("message {sent} of the benchmark"),
                    id: sent,
                })
                .await
                .expect("send");
        }
        match alice.next_event(T).await {
            Some(ServerMsg::ChatAck { stored: s, .. }) => {
                acked += 1;
                if s {
                    stored += 1;
                } else {
                    delivered += 1;
                }
            }
            Some(ServerMsg::Error { code, message, .. }) => {
                panic!("chat refused: {code} {message}")
            }
            Some(_) => {}
            None => panic!("no ack after {acked} of {count}"),
        }
    }
    (stored, delivered)
}

async fn receive(bob: &mut Device, count: u64) {
    let mut got = 0;
    while got < count {
        match bob.next_event(T).await {
            Some(ServerMsg::Chat { .. }) => got += 1,
            Some(_) => {}
            None => panic!("bob got {got} of {count}"),
        }
    }
}

/// `unexpected`: chats whose ack said the other thing (delivered while bob was offline,
/// or stored while he was online).
fn report(phase: &str, count: u64, secs: f64, node_cpu: f64, unexpected: u64) {
    println!(
        "{phase}: {count} chats in {secs:.2} s = {:.0} chats/s; node CPU {:.1} µs per chat; unexpected acks {unexpected}",
        count as f64 / secs,
        node_cpu / count as f64 * 1e6
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let count: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let window: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(32);
    let node = Node::start_with_tail(
        "",
        "",
        "",
        200,
        &format!("[chat]\noffline_max_messages = {count}\n"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut alice = node.device(node.device_config("alice", "bench")).await;

        let (c0, t0) = (cpu(node.pid()), Instant::now());
        let (_, delivered) = send_all(&mut alice, count, window).await;
        report(
            "stored for an offline user",
            count,
            t0.elapsed().as_secs_f64(),
            cpu(node.pid()) - c0,
            delivered,
        );

        let (c0, t0) = (cpu(node.pid()), Instant::now());
        let mut bob = node.device(node.device_config("bob", "bench")).await;
        receive(&mut bob, count).await;
        report(
            "delivered from the store at login",
            count,
            t0.elapsed().as_secs_f64(),
            cpu(node.pid()) - c0,
            0,
        );

        let (c0, t0) = (cpu(node.pid()), Instant::now());
        let recv = async {
            receive(&mut bob, count).await;
        };
        let (sent, ()) = tokio::join!(send_all(&mut alice, count, window), recv);
        report(
            "delivered live",
            count,
            t0.elapsed().as_secs_f64(),
            cpu(node.pid()) - c0,
            sent.0,
        );
        println!(
            "archive: {} messages (parley_chat_archive_messages)",
            node.metric("parley_chat_archive_messages")
        );
    });
}
