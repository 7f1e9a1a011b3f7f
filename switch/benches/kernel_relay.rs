//! What the relay's eBPF program (`relay::kernel`) costs per forwarded packet, counted as
//! the whole machine's CPU (`/proc/stat`: the senders, softirq and the receiver are all
//! in it), minus the same workload sent straight to the receiver.
//!
//! In a private network namespace (its own loopback), `FLOWS` relay ports each get a flow
//! from one caller socket to one callee socket. A generator thread sends 172-byte RTP-sized
//! packets round-robin over the relay ports at `RATE` packets/s for `SECS` seconds; a
//! receiver thread reads the callee socket. Then the same generator sends the same number
//! of packets straight to the callee (the baseline). Both runs report packets received
//! (loss), and the difference in busy CPU per packet is the program's share: the lookup,
//! the rewrite, the checksum updates and the second pass through lo.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN) and a build with clang. `ONLY=kernel` or
//! `ONLY=direct` runs one mode (for `perf record -a` over it).
//!
//! Status (2026-12-07): the unpaced mode (`RATE` 0) gives repeatable figures, recorded in
//! `docs/BENCHMARKS.md` ("The eBPF fast path on its own"). The paced mode's machine figure
//! used to vary 2–6× between runs: it summed `/proc/stat`'s tick-sampled busy fields,
//! which a sender woken by 1 ms timers dodges; it now counts wall time × CPUs − idle
//! (idle is measured exactly). The issue's figures come from `relay-bench --kernel`
//! (`loadtest/bench/rtpengine_compare.sh`), which drives the whole relay.
//!
//! ```text
//! cargo bench -p parley-switch --bench kernel_relay -- [FLOWS] [RATE] [SECS]
//! ```
//! (defaults 1000 flows, 100,000 packets/s, 10 s; `RATE` 0: `SECS` million packets
//! unpaced, the receiver polling, and the sender's own CPU per packet the figure to
//! compare).

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parley_switch::relay::kernel::{KernelPath, Mapping};

/// The stream the generator sends (its packets are 0x80 bytes, SSRC included), unmapped.
const STREAM: Mapping = Mapping {
    in_ssrc: 0x8080_8080,
    out_ssrc: 0x8080_8080,
    seq_delta: 0,
    ts_delta: 0,
};

/// Idle jiffies of the whole machine (idle and iowait, all CPUs). Busy time over a window
/// is wall time × CPUs − idle: with NOHZ the kernel measures idle exactly (clock reads at
/// idle entry and exit), while its user/system/softirq fields are samples at the timer
/// tick, which a sender woken by 1 ms timers dodges (that is what made this bench's paced
/// mode vary 2–6× between runs).
fn idle_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu = stat.lines().next().unwrap();
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    v[3] + v[4]
}

fn v4(s: &UdpSocket) -> SocketAddrV4 {
    match s.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    }
}

/// This thread's CPU time so far, ns (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

/// Sends `total` packets round-robin to `dests` at `rate` per second (0: as fast as the
/// thread can); returns how many sends failed and the thread's CPU time, ns. On loopback
/// the kernel delivers a packet (softirq included, the eBPF program included) inside the
/// sender's system call, so the sender's CPU per packet is the path's cost up to the
/// receiving socket.
fn generate(from: &UdpSocket, dests: &[SocketAddrV4], rate: u64, total: u64) -> (u64, u64) {
    let pkt = [0x80u8; 172];
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut failed = 0;
    let slot = Duration::from_millis(1);
    let per_slot = if rate == 0 {
        total
    } else {
        (rate / 1000).max(1)
    };
    let mut sent = 0u64;
    let mut i = 0usize;
    while sent < total {
        for _ in 0..per_slot.min(total - sent) {
            if from.send_to(&pkt, dests[i]).is_err() {
                failed += 1;
            }
            i = (i + 1) % dests.len();
            sent += 1;
        }
        let due = start + slot * (sent / per_slot) as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    (failed, thread_cpu_ns() - cpu0)
}

struct Run {
    received: u64,
    failed: u64,
    sender_ns: u64,
    busy_secs: f64,
    wall: Duration,
}

/// One run: the generator toward `dests`, the receiver counting on `callee`.
fn run(
    caller: &UdpSocket,
    callee: &Arc<UdpSocket>,
    dests: &[SocketAddrV4],
    rate: u64,
    total: u64,
) -> Run {
    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Unpaced, the receiver polls (non-blocking) so that it is never woken per packet.
    let spin = rate == 0;
    callee.set_nonblocking(spin).unwrap();
    let rx = {
        let (callee, got, stop) = (callee.clone(), got.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                match callee.recv(&mut buf) {
                    Ok(_) => {
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if spin => std::hint::spin_loop(),
                    Err(_) => {}
                }
            }
        })
    };
    let hz = 100.0; // USER_HZ on Linux
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (t0, i0) = (Instant::now(), idle_ticks());
    let (failed, sender_ns) = generate(caller, dests, rate, total);
    // Let the last packets land.
    let deadline = Instant::now() + Duration::from_secs(2);
    while got.load(Ordering::Relaxed) < total - failed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (wall, idle) = (t0.elapsed(), idle_ticks() - i0);
    stop.store(true, Ordering::Relaxed);
    rx.join().unwrap();
    Run {
        received: got.load(Ordering::Relaxed),
        failed,
        sender_ns,
        busy_secs: (wall.as_secs_f64() * cpus - idle as f64 / hz).max(0.0),
        wall,
    }
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let flows = args.first().copied().unwrap_or(1000) as usize;
    let rate = args.get(1).copied().unwrap_or(100_000);
    let secs = args.get(2).copied().unwrap_or(10);
    // Unpaced (`RATE` 0), `SECS` is millions of packets.
    let total = if rate == 0 {
        secs * 1_000_000
    } else {
        rate * secs
    };
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare: run as root");
        let st = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip");
        assert!(st.success());
        let caller = UdpSocket::bind("127.0.0.1:0").unwrap();
        let callee = UdpSocket::bind("127.0.0.1:0").unwrap();
        callee
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        socket2::SockRef::from(&callee)
            .set_recv_buffer_size(16 << 20)
            .unwrap();
        let callee = Arc::new(callee);
        let ports: Vec<UdpSocket> = (0..flows)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut k = KernelPath::load(&["lo"]).expect("load the eBPF program (root, clang build)");
        for p in &ports {
            // Each flow leaves from its own relay port toward the callee.
            k.install(v4(p), v4(&caller), (v4(p), v4(&callee)), STREAM).unwrap();
        }
        let relay: Vec<SocketAddrV4> = ports.iter().map(v4).collect();
        let direct = vec![v4(&callee)];
        println!("{flows} flows, {rate} packets/s for {secs} s ({total} packets per run)");
        let only = std::env::var("ONLY").ok();
        for (label, dests) in [("direct", &direct), ("kernel", &relay), ("direct", &direct), ("kernel", &relay)] {
            if only.as_deref().is_some_and(|o| o != label) {
                continue;
            }
            let r = run(&caller, &callee, dests, rate, total);
            println!(
                "{label:>6}: received {} of {} (send errors {}), {:.2} s, machine busy {:.2} s = {:.3} us/packet, sender {:.3} us/packet",
                r.received,
                total,
                r.failed,
                r.wall.as_secs_f64(),
                r.busy_secs,
                1e6 * r.busy_secs / total as f64,
                r.sender_ns as f64 / 1e3 / total as f64
            );
        }
        let forwarded: u64 = ports
            .iter()
            .map(|p| k.stats(v4(p)).map_or(0, |s| s.packets))
            .sum();
        println!("the program counted {forwarded} packets over both kernel runs");
    })
    .join()
    .unwrap();
}
