//! The relay worker's flow lookup: `HashMap<u16, Port>::get_mut` by the port a batch was
//! read on, with 5,000 ports in the table, looked up in a random order (many flows each
//! sending every 20 ms). One lookup per iteration; the worker does one per socket read,
//! whatever the number of packets it read.
//!
//! The table is about 1.1 MB (224 bytes a bucket), so in this tight loop much of it stays
//! in L2/L3; in the worker, the syscalls between two lookups evict it, so the worker's
//! lookups cost more than these figures: read them as a lower bound and as a comparison.
//!
//! The worker's `Port` is private to `parley_switch::relay`, so this bench looks up a
//! stand-in, `FlowEntry`, with the same field types (shared handles as `Arc`s of
//! placeholders, since only their size matters here) rather than widen the library's
//! API: keep it in step with `switch/src/relay/worker.rs`. A port-indexed `Vec` is
//! measured beside the map as the alternative with no hashing.
//!
//! ```text
//! cargo bench -p parley-switch --bench flow_table
//! cargo bench -p parley-switch --bench flow_table -- --warm-up-time 1 --measurement-time 2
//! ```

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use parley_codecs::rtp::Continuity;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Ports in the table.
const FLOWS: u16 = 5_000;
/// First relay port; with two workers a worker owns every other port.
const PORT_MIN: u16 = 20_000;
const WORKERS: u16 = 2;
/// Length of the random lookup sequence (a power of two): 128 KiB of keys, much larger
/// than the table so the order does not repeat in step with it.
const LOOKUPS: usize = 1 << 16;

/// Stand-in for the worker's `Target`.
#[allow(dead_code)] // Fields are never read: they are here for their size.
enum Target {
    None,
    Udp {
        partner: u16,
        out: Arc<u16>,
        dest: SocketAddr,
    },
    Roq {
        conn: Arc<u16>,
        flow: u64,
    },
}

/// Stand-in for the worker's `Port`: same fields, placeholders for the shared handles.
#[allow(dead_code)] // Fields are never read: they are here for their size.
struct FlowEntry {
    sock: Arc<u16>,
    peer: Option<SocketAddr>,
    latched: Option<SocketAddr>,
    stale: Option<SocketAddr>,
    cont: Continuity,
    target: Target,
    stats: Option<Arc<u64>>,
    caller_side: bool,
}

fn entry(port: u16) -> FlowEntry {
    let addr = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), port));
    let handle = Arc::new(port);
    FlowEntry {
        sock: handle.clone(),
        peer: Some(addr),
        latched: Some(addr),
        stale: None,
        cont: Continuity::default(),
        target: Target::Udp {
            partner: port + 1,
            out: handle.clone(),
            dest: addr,
        },
        stats: Some(Arc::new(0)),
        caller_side: true,
    }
}

fn ports() -> Vec<u16> {
    (0..FLOWS).map(|i| PORT_MIN + i * WORKERS).collect()
}

/// Ports to look up, drawn at random (seeded, so every run looks up the same sequence).
fn lookup_order(ports: &[u16]) -> Vec<u16> {
    let mut rng = StdRng::seed_from_u64(5_000);
    (0..LOOKUPS)
        .map(|_| ports[rng.random_range(0..ports.len())])
        .collect()
}

fn flow_lookup(c: &mut Criterion) {
    let ports = ports();
    let order = lookup_order(&ports);
    let mut g = c.benchmark_group("flow_lookup_5000");
    g.throughput(Throughput::Elements(1));

    // As the worker holds it: `HashMap::new()`, SipHash with a random key.
    let mut map: HashMap<u16, FlowEntry> = ports.iter().map(|&p| (p, entry(p))).collect();
    g.bench_function("std_hashmap_get_mut", |b| {
        let mut i = 0;
        b.iter(|| {
            let port = order[i & (LOOKUPS - 1)];
            i += 1;
            black_box(map.get_mut(black_box(&port)));
        })
    });
    drop(map);

    let mut table: Vec<Option<FlowEntry>> = (0..=u16::MAX).map(|_| None).collect();
    for &p in &ports {
        table[usize::from(p)] = Some(entry(p));
    }
    g.bench_function("port_indexed_vec", |b| {
        let mut i = 0;
        b.iter(|| {
            let port = order[i & (LOOKUPS - 1)];
            i += 1;
            black_box(table[usize::from(black_box(port))].as_mut());
        })
    });
    g.finish();
}

criterion_group!(benches, flow_lookup);
criterion_main!(benches);
