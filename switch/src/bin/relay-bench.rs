//! `relay-bench`: G.711-shaped RTP through the media relay, measured.
//!
//! Starts the [`Relay`] in-process (or targets an external relay, see `--external`),
//! bridges N UDP↔UDP flows on loopback, and sends 172-byte RTP (12-byte header + 160
//! bytes of payload) at `--pps` packets per second per flow in each direction. The send
//! time is in the payload, so the receiver measures added latency. The generator uses
//! `sendmmsg` (many flows per system call) and `recvmmsg`, so it costs less than the relay.
//!
//! Reports forwarded packets per second, loss, latency p50/p99/max, and the relay
//! threads' CPU (`parley-relay-N`, from `/proc/self/task/TID/stat` and `schedstat`) per
//! relayed packet.
//!
//! ```sh
//! cargo build --release -p parley-switch
//! target/release/relay-bench --flows 1000 --secs 10
//! # An external relay (rtpengine): flows given as "caller_port callee_port" lines, the
//! # relay having been told that flow i's caller is 127.0.0.1:(gen_base + i % sockets)
//! # and its callee 127.0.0.1:(gen_base + sockets + i % sockets).
//! target/release/relay-bench --external ports.txt --external-pid PID --gen-base 40000
//! # The floor: the same flows through the least a socket-per-port relay can do.
//! target/release/relay-bench --flows 1000 --secs 10 --floor
//! ```
//!
//! `--floor` replaces Parley's relay by a bare forwarder with the same shape (a socket
//! per port, one epoll per worker thread, edge-triggered): on readiness it reads each
//! datagram with `recvfrom` until the socket is empty and sends it with `sendto` out of
//! the bridged socket to a fixed address — no RTP check, no latching, no table, no
//! metrics, no batching. Its CPU per packet is what the kernel charges a userspace relay
//! that keeps one UDP socket per port, the floor under any such relay on this machine.

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, sendmmsg};
use parley_actors::messages::{FlowStats, MediaPlane};
use parley_switch::relay::{KernelMode, Relay, RelaySettings};
use quinn::udp::{RecvMeta, UdpSocketState};

const PACKET: usize = 172;
const HEADER: usize = 12;

#[derive(Parser, Debug)]
#[command(about = "RTP through the Parley media relay: pps, loss, latency, CPU per packet")]
struct Args {
    /// Concurrent flows (calls); each sends `pps` packets per second each way.
    #[arg(long, default_value_t = 1000)]
    flows: usize,
    /// Packets per second per flow per direction (G.711 at 20 ms: 50).
    #[arg(long, default_value_t = 50)]
    pps: u32,
    /// Measured seconds (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Relay worker threads (default: number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// Relay interrupt moderation, µs (in-process relay; see `[relay] coalesce_us`).
    #[arg(long, default_value_t = 0)]
    coalesce_us: u64,
    /// First relay port (in-process relay).
    #[arg(long, default_value_t = 20000)]
    port_min: u16,
    /// Also bind an RTCP port per leg, as a node does by default (`[relay] rtcp_ports`);
    /// off here so that 4,500 flows fit in 20,000 file descriptors. No RTCP is sent
    /// either way, so it changes descriptors, not the per-packet path.
    #[arg(long)]
    rtcp_ports: bool,
    /// Generator sockets per side; flow i uses socket i % sockets on each side.
    #[arg(long, default_value_t = 16)]
    sockets: usize,
    /// First generator port (0: let the OS choose). Caller sockets are gen_base..,
    /// callee sockets gen_base + sockets...
    #[arg(long, default_value_t = 0)]
    gen_base: u16,
    /// Drive an external relay at 127.0.0.1: a file of "caller_port callee_port" lines.
    #[arg(long)]
    external: Option<std::path::PathBuf>,
    /// The external relay's process id, for its CPU time (all threads).
    #[arg(long)]
    external_pid: Option<u32>,
    /// Measure the floor instead of Parley's relay: a bare forwarder on the same sockets
    /// and threads (see the module docs).
    #[arg(long)]
    floor: bool,
    /// The in-process relay with its kernel fast path (`[relay] kernel = "required"`:
    /// root, a build with clang): each flow latches in userspace, then the eBPF program
    /// forwards it. Compare the machine's CPU per packet (the work is in softirq).
    #[arg(long)]
    kernel: bool,
    /// No relay: each caller socket sends straight to its callee socket and back, the
    /// same packets at the same rate — the baseline the machine's CPU per relayed packet
    /// of the other modes is compared with.
    #[arg(long)]
    direct: bool,
    /// The receiver spins over its sockets (non-blocking reads, one core busy throughout)
    /// instead of sleeping in epoll: how often it is woken then no longer depends on the
    /// mode, which otherwise moves the machine's CPU per packet by more than a fast path
    /// costs (a receiver woken per few packets costs ~2 µs a packet more than one woken
    /// per many). For the machine-CPU comparison with `--direct`. The spinning receiver
    /// gets the last CPU to itself and every other thread (sender, relay) the first, so
    /// that work is never hidden on the receiver's always-busy CPU: the first CPU must
    /// not saturate (kernel and direct modes; a userspace relay at 1,000 flows does).
    #[arg(long)]
    spin: bool,
    /// With --kernel: have the kernel time the eBPF program (`kernel.bpf_stats_enabled`
    /// for the run, put back after) and print its time per run. The timing itself costs
    /// two clock reads a run, so leave it off for the CPU figures.
    #[arg(long)]
    bpf_stats: bool,
    /// Sending threads (each sends an equal share of the flows). On loopback the kernel
    /// delivers a packet inside its sender's system call, fast path included, so one
    /// sender saturates near 250,000–300,000 packets/s on this machine.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// With --floor: each flow's two sockets on different workers (all first legs on one,
    /// all second legs on the next), as Parley placed a call's legs before
    /// `allocate_port_near`; by default both are on one worker.
    #[arg(long)]
    floor_split: bool,
}

/// The running bare forwarder: its flows, per-worker packet counters and threads.
struct Floor {
    flows: Vec<Flow>,
    stats: Vec<Arc<FlowStats>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The bare forwarder of `--floor`: one thread per worker, each with its share of the
/// flows' socket pairs. Returns the threads and a per-worker packet counter.
fn floor_relay(
    flows: usize,
    workers: usize,
    split: bool,
    caller_of: impl Fn(usize) -> SocketAddr,
    callee_of: impl Fn(usize) -> SocketAddr,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Floor> {
    use mio::net::UdpSocket as MioUdp;
    // Per worker: (socket, bridged socket index, destination) entries.
    let mut shards: Vec<Vec<(MioUdp, usize, SocketAddr)>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut out: Vec<Vec<UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
    let mut list = Vec::with_capacity(flows);
    for i in 0..flows {
        let w = if split { 0 } else { i % workers };
        let a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let b = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        list.push(Flow {
            a: a.local_addr()?.port(),
            b: b.local_addr()?.port(),
        });
        // What arrives on a leaves from b to the callee, and back. Each worker sends out
        // of its own copy of the other socket.
        let wb = if split { (w + 1) % workers } else { w };
        let ib = out[w].len();
        out[w].push(b.try_clone()?);
        let ia = out[wb].len();
        out[wb].push(a.try_clone()?);
        shards[w].push((MioUdp::from_std(a), ib, callee_of(i)));
        shards[wb].push((MioUdp::from_std(b), ia, caller_of(i)));
    }
    let mut stats = Vec::new();
    let mut threads = Vec::new();
    for (w, (mut socks, outs)) in shards.into_iter().zip(out).enumerate() {
        let st = Arc::new(FlowStats::default());
        stats.push(st.clone());
        let stop = stop.clone();
        let mut poll = mio::Poll::new()?;
        for (t, (s, _, _)) in socks.iter_mut().enumerate() {
            poll.registry()
                .register(s, mio::Token(t), mio::Interest::READABLE)?;
        }
        threads.push(
            std::thread::Builder::new()
                .name(format!("parley-relay-floor-{w}"))
                .spawn(move || {
                    let mut events = mio::Events::with_capacity(1024);
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if poll
                            .poll(&mut events, Some(Duration::from_millis(100)))
                            .is_err()
                        {
                            continue;
                        }
                        let mut n = 0u64;
                        for ev in events.iter() {
                            let (sock, o, dest) = &socks[ev.token().0];
                            while let Ok((len, _)) = sock.recv_from(&mut buf) {
                                let _ = outs[*o].send_to(&buf[..len], *dest);
                                n += 1;
                            }
                        }
                        let _ = st.count(true, n);
                    }
                })?,
        );
    }
    Ok(Floor {
        flows: list,
        stats,
        threads,
    })
}

/// A generator socket with its quinn-udp state (for recvmmsg).
struct GenSocket {
    sock: UdpSocket,
    state: UdpSocketState,
}

fn gen_socket(port: u16) -> anyhow::Result<GenSocket> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).context("generator bind")?;
    let state = UdpSocketState::new((&sock).into())?;
    // Bounded by net.core.rmem_max; a larger buffer only absorbs scheduling hiccups.
    let _ = state.set_recv_buffer_size((&sock).into(), 8 << 20);
    let _ = state.set_send_buffer_size((&sock).into(), 8 << 20);
    Ok(GenSocket { sock, state })
}

/// One flow as the generator sees it: where each side sends.
#[derive(Clone, Copy)]
struct Flow {
    /// Relay port the caller sends to.
    a: u16,
    /// Relay port the callee sends to.
    b: u16,
}

/// CPU seconds of threads: `(user+sys from stat, run time from schedstat, context
/// switches)`.
fn cpu_of(dir: &str, name_prefix: Option<&str>) -> (f64, f64, u64) {
    let (mut ticks, mut ns, mut switches) = (0u64, 0u64, 0u64);
    let Ok(tasks) = std::fs::read_dir(dir) else {
        return (0.0, 0.0, 0);
    };
    for t in tasks.flatten() {
        let p = t.path();
        if let Some(prefix) = name_prefix {
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
        }
        if let Ok(stat) = std::fs::read_to_string(p.join("stat"))
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the comm.
            ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
        if let Ok(st) = std::fs::read_to_string(p.join("status")) {
            for l in st.lines() {
                if l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt") {
                    switches += l
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
        if let Ok(s) = std::fs::read_to_string(p.join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    // USER_HZ is 100 on Linux whatever the kernel's HZ.
    (ticks as f64 / 100.0, ns as f64 / 1e9, switches)
}

/// Runs and nanoseconds of the BPF programs this process holds (the kernel keeps both
/// in each program's fdinfo while `kernel.bpf_stats_enabled` is 1).
fn bpf_prog_runs() -> (u64, u64) {
    let (mut runs, mut ns) = (0, 0);
    let Ok(fds) = std::fs::read_dir("/proc/self/fdinfo") else {
        return (0, 0);
    };
    for fd in fds.flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        if !info.contains("prog_type:") {
            continue;
        }
        for l in info.lines() {
            let mut kv = l.split_whitespace();
            match (kv.next(), kv.next().and_then(|v| v.parse::<u64>().ok())) {
                (Some("run_cnt:"), Some(v)) => runs += v,
                (Some("run_time_ns:"), Some(v)) => ns += v,
                _ => {}
            }
        }
    }
    (runs, ns)
}

/// CPU seconds of the kernel's `ksoftirqd/N` threads: loopback packet delivery that the
/// kernel deferred there is nobody's thread time.
fn softirqd_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|d| {
            std::fs::read_to_string(d.path().join("comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .map(|d| cpu_of(&d.path().join("task").to_string_lossy(), None).0)
        .sum()
}

/// Idle seconds of the whole machine so far, all CPUs (`/proc/stat`'s first line: idle
/// plus iowait, in USER_HZ, which Linux fixes at 100 there). The machine's busy time over
/// a window is then wall time × CPUs − idle. Idle is what to read: with NOHZ the kernel
/// measures it exactly (clock reads at idle entry and exit), while the user/system/softirq
/// fields are samples taken at the timer tick — and a workload woken by 1 ms timers, as
/// the generator is, runs between ticks, so those samples were seen to read 1.4 s and
/// 8.7 s for the same 5.7 s of work.
fn machine_idle_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle: u64 = [3, 4].iter().filter_map(|&i| v.get(i)).sum();
    idle as f64 / 100.0
}

fn udp_errors() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    if lines.len() < 2 {
        return (0, 0);
    }
    let get = |k: &str| {
        lines[0]
            .iter()
            .position(|h| *h == k)
            .and_then(|i| lines[1].get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("RcvbufErrors"), get("SndbufErrors"))
}

struct Shared {
    start: Instant,
    stop_send: AtomicBool,
    stop_recv: AtomicBool,
    /// Count and timestamp only while true (after warm-up).
    measuring: AtomicBool,
    sent: AtomicU64,
    send_errors: AtomicU64,
}

/// Sends one packet per flow per direction every `1/pps` s, spread over 1 ms ticks.
/// `part`: (this sender, senders): it sends the flows whose index is `this` modulo
/// `senders`.
fn sender(
    shared: &Shared,
    callers: &[GenSocket],
    callees: &[GenSocket],
    flows: &[Flow],
    pps: u32,
    (this, senders): (usize, usize),
) {
    let k = callers.len();
    let period = Duration::from_secs(1) / pps;
    let ticks = (period.as_millis() as usize).max(1);
    let tick = period / ticks as u32;
    let mut headers: MultiHeaders<SockaddrIn> = MultiHeaders::preallocate(64, None);
    let mut pkts = vec![[0u8; PACKET]; 64];
    let mut seq = vec![0u16; flows.len() * 2];
    // Per generator socket, the flows (index, relay port) it sends to.
    let mut by_sock: Vec<Vec<(usize, u16)>> = vec![Vec::new(); 2 * k];
    let mut next = Instant::now();
    let mut n_tick = 0usize;
    let no_cmsgs: [ControlMessage<'_>; 0] = [];
    while !shared.stop_send.load(Ordering::Relaxed) {
        for v in &mut by_sock {
            v.clear();
        }
        for (i, f) in flows.iter().enumerate().skip(n_tick % ticks).step_by(ticks) {
            if i % senders != this {
                continue;
            }
            by_sock[i % k].push((2 * i, f.a));
            by_sock[k + i % k].push((2 * i + 1, f.b));
        }
        let measuring = shared.measuring.load(Ordering::Relaxed);
        for (s, targets) in by_sock.iter().enumerate() {
            let sock = if s < k { &callers[s] } else { &callees[s - k] };
            for chunk in targets.chunks(64) {
                let now_ns = shared.start.elapsed().as_nanos() as u64;
                for (pkt, &(id, _)) in pkts.iter_mut().zip(chunk) {
                    let sq = seq[id];
                    seq[id] = sq.wrapping_add(1);
                    let mut h = [0u8; HEADER];
                    parley_codecs::rtp::write_header(
                        &mut h,
                        0,
                        false,
                        sq,
                        u32::from(sq) * 160,
                        id as u32,
                    );
                    pkt[..HEADER].copy_from_slice(&h);
                    let stamp = if measuring { now_ns } else { 0 };
                    pkt[HEADER..HEADER + 8].copy_from_slice(&stamp.to_be_bytes());
                }
                let iovs: Vec<[IoSlice<'_>; 1]> = pkts[..chunk.len()]
                    .iter()
                    .map(|p| [IoSlice::new(p)])
                    .collect();
                let addrs: Vec<Option<SockaddrIn>> = chunk
                    .iter()
                    .map(|&(_, port)| Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into()))
                    .collect();
                match sendmmsg(
                    sock.sock.as_raw_fd(),
                    &mut headers,
                    &iovs,
                    &addrs,
                    no_cmsgs,
                    MsgFlags::empty(),
                ) {
                    Ok(_) => {
                        if measuring {
                            shared.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        shared
                            .send_errors
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        }
        n_tick += 1;
        next += tick;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_millis(200) {
            // Far behind (the machine is saturated): do not burst to catch up.
            next = now;
        }
    }
}

struct RecvResult {
    received: u64,
    latency_ns: Histogram<u64>,
}

fn receiver(shared: &Shared, socks: &[&GenSocket], spin: bool) -> anyhow::Result<RecvResult> {
    let mut poll = mio::Poll::new()?;
    for (i, s) in socks.iter().enumerate() {
        poll.registry().register(
            &mut mio::unix::SourceFd(&s.sock.as_raw_fd()),
            mio::Token(i),
            mio::Interest::READABLE,
        )?;
    }
    let mut events = mio::Events::with_capacity(256);
    let batch = quinn::udp::BATCH_SIZE;
    let mut buf = vec![0u8; batch * 2048];
    let mut meta = vec![RecvMeta::default(); batch];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut received = 0u64;
    let mut ready: Vec<usize> = Vec::new();
    while !shared.stop_recv.load(Ordering::Relaxed) {
        if spin {
            ready.extend(0..socks.len());
        } else {
            poll.poll(&mut events, Some(Duration::from_millis(50)))?;
            ready.extend(events.iter().map(|e| e.token().0));
        }
        while let Some(i) = ready.pop() {
            let s = &socks[i];
            loop {
                let mut slots = buf.chunks_mut(2048);
                let mut iovs: Vec<IoSliceMut<'_>> = (0..batch)
                    .filter_map(|_| slots.next().map(IoSliceMut::new))
                    .collect();
                let n = match s.state.recv((&s.sock).into(), &mut iovs, &mut meta) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => continue,
                };
                let now_ns = shared.start.elapsed().as_nanos() as u64;
                for (j, m) in meta[..n].iter().enumerate() {
                    let stride = m.stride.max(1);
                    let mut off = 0;
                    while off < m.len {
                        let p = &buf[j * 2048 + off..j * 2048 + off + stride.min(m.len - off)];
                        off += stride;
                        if p.len() < HEADER + 8 {
                            continue;
                        }
                        let mut t = [0u8; 8];
                        t.copy_from_slice(&p[HEADER..HEADER + 8]);
                        let stamp = u64::from_be_bytes(t);
                        if stamp != 0 {
                            received += 1;
                            hist.saturating_record(now_ns.saturating_sub(stamp).max(1));
                        }
                    }
                }
            }
        }
    }
    Ok(RecvResult {
        received,
        latency_ns: hist,
    })
}

/// Runs the calling thread (and threads it spawns later) on CPU `cpu` only.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.spin {
        anyhow::ensure!(ncpu >= 2, "--spin needs two CPUs");
        pin_to(0)?;
    }
    // Two relay sockets per flow: raise the descriptor limit if needed (and allowed).
    let need = (2 * args.flows + 4 * args.sockets + 1024) as u64;
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < need
        && setrlimit(Resource::RLIMIT_NOFILE, need, need.max(hard)).is_err()
    {
        eprintln!("warning: open-file limit {soft} < {need}; raise it (ulimit -n)");
    }
    let k = args.sockets.max(1);
    let port = |i: usize| {
        if args.gen_base == 0 {
            0
        } else {
            args.gen_base + i as u16
        }
    };
    let callers: Vec<GenSocket> = (0..k)
        .map(|i| gen_socket(port(i)))
        .collect::<Result<_, _>>()?;
    let callees: Vec<GenSocket> = (0..k)
        .map(|i| gen_socket(port(k + i)))
        .collect::<Result<_, _>>()?;
    let addr = |s: &GenSocket| -> anyhow::Result<SocketAddr> { Ok(s.sock.local_addr()?) };

    let mut relay = None;
    let mut stats = Vec::new();
    let floor_stop = Arc::new(AtomicBool::new(false));
    let mut floor_threads = Vec::new();
    let flows: Vec<Flow> = if args.floor {
        let workers = args
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let (ca, ce) = (
            callers
                .iter()
                .map(addr)
                .collect::<anyhow::Result<Vec<_>>>()?,
            callees
                .iter()
                .map(addr)
                .collect::<anyhow::Result<Vec<_>>>()?,
        );
        let floor = floor_relay(
            args.flows,
            workers,
            args.floor_split,
            |i| ca[i % k],
            |i| ce[i % k],
            floor_stop.clone(),
        )?;
        stats = floor.stats;
        floor_threads = floor.threads;
        floor.flows
    } else if args.direct {
        (0..args.flows)
            .map(|i| {
                Ok(Flow {
                    a: addr(&callees[i % k])?.port(),
                    b: addr(&callers[i % k])?.port(),
                })
            })
            .collect::<anyhow::Result<_>>()?
    } else if let Some(path) = &args.external {
        let text = std::fs::read_to_string(path)?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut it = l.split_whitespace().map(str::parse::<u16>);
                match (it.next(), it.next()) {
                    (Some(Ok(a)), Some(Ok(b))) => Ok(Flow { a, b }),
                    _ => bail!("bad line in {}: {l:?}", path.display()),
                }
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        let workers = args
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // Two RTP/RTCP pairs per flow, plus room for ports other programs hold.
        let span = u16::try_from(4 * args.flows + 2000).context("too many flows")?;
        let r = Relay::start(RelaySettings {
            coalesce: Duration::from_micros(args.coalesce_us),
            rtcp_ports: args.rtcp_ports,
            kernel: if args.kernel {
                KernelMode::Required
            } else {
                KernelMode::Off
            },
            ..RelaySettings::loopback(
                args.port_min,
                args.port_min.checked_add(span).context("port range")?,
                workers,
            )
        })?;
        let mut flows = Vec::with_capacity(args.flows);
        for i in 0..args.flows {
            // As a node allocates a call's second leg: on the first one's worker.
            let a = r.allocate_port()?;
            let b = r.allocate_port_near(a)?;
            let st = Arc::new(FlowStats::default());
            r.bridge_udp(
                (a, addr(&callers[i % k])?),
                (b, addr(&callees[i % k])?),
                st.clone(),
            )?;
            stats.push(st);
            flows.push(Flow { a, b });
        }
        relay = Some(r);
        flows
    };
    let workers = relay.as_ref().map_or(floor_threads.len(), |r| r.workers());

    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop_send: AtomicBool::new(false),
        stop_recv: AtomicBool::new(false),
        measuring: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
    });
    let callers = Arc::new(callers);
    let callees = Arc::new(callees);
    let flows = Arc::new(flows);
    let mut send_threads = Vec::new();
    for this in 0..args.senders.max(1) {
        let (sh, ca, ce, fl) = (
            shared.clone(),
            callers.clone(),
            callees.clone(),
            flows.clone(),
        );
        let (pps, senders) = (args.pps, args.senders.max(1));
        send_threads.push(
            std::thread::Builder::new()
                .name(format!("bench-send-{this}"))
                .spawn(move || sender(&sh, &ca, &ce, &fl, pps, (this, senders)))?,
        );
    }
    let recv_thread = {
        let (sh, ca, ce) = (shared.clone(), callers.clone(), callees.clone());
        let spin = args.spin;
        std::thread::Builder::new()
            .name("bench-recv".into())
            .spawn(move || -> anyhow::Result<RecvResult> {
                if spin {
                    pin_to(ncpu - 1)?;
                }
                let all: Vec<&GenSocket> = ca.iter().chain(ce.iter()).collect();
                receiver(&sh, &all, spin)
            })?
    };

    // Warm-up: every port latches, queues settle.
    std::thread::sleep(Duration::from_secs(1));
    let relay_pkts = |stats: &[Arc<FlowStats>]| -> u64 {
        // What the kernel forwarded is in the flows' stats once folded.
        if let Some(k) = relay.as_ref().and_then(|r| r.kernel()) {
            k.sweep();
        }
        stats
            .iter()
            .map(|s| {
                s.caller_to_callee.load(Ordering::Relaxed)
                    + s.callee_to_caller.load(Ordering::Relaxed)
            })
            .sum()
    };
    let ext_dir = args.external_pid.map(|p| format!("/proc/{p}/task"));
    let cpu_relay = || match &ext_dir {
        Some(d) => cpu_of(d, None),
        None => cpu_of("/proc/self/task", Some("parley-relay-")),
    };
    let cpu_gen = || cpu_of("/proc/self/task", Some("bench-"));
    let (relay0, gen0, pk0, err0) = (cpu_relay(), cpu_gen(), relay_pkts(&stats), udp_errors());
    // The eBPF program's own time (`kernel.bpf_stats_enabled`, put back afterwards).
    let bpf_stats_was = (args.kernel && args.bpf_stats).then(|| {
        let was = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
        was
    });
    let bpf0 = bpf_prog_runs();
    let softirqd0 = softirqd_cpu();
    let machine0 = (Instant::now(), machine_idle_secs());
    let t0 = Instant::now();
    shared.measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(args.secs));
    shared.measuring.store(false, Ordering::Relaxed);
    let (relay1, gen1, pk1) = (cpu_relay(), cpu_gen(), relay_pkts(&stats));
    let softirqd1 = softirqd_cpu();
    let bpf1 = bpf_prog_runs();
    if let Some(was) = &bpf_stats_was {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", was.trim());
    }
    let machine1 = (Instant::now(), machine_idle_secs());
    let window = t0.elapsed().as_secs_f64();
    // Let in-flight packets arrive before counting loss.
    std::thread::sleep(Duration::from_millis(500));
    shared.stop_send.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    shared.stop_recv.store(true, Ordering::Relaxed);
    let err1 = udp_errors();
    for t in send_threads {
        let _ = t.join();
    }
    let res = recv_thread
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    if let Some(r) = &relay {
        r.stop();
    }
    floor_stop.store(true, Ordering::Relaxed);
    for t in floor_threads {
        let _ = t.join();
    }

    let sent = shared.sent.load(Ordering::Relaxed);
    let lost = sent.saturating_sub(res.received);
    let relayed = if relay.is_some() || args.floor {
        pk1 - pk0
    } else if args.direct {
        // Every packet sent in the window, delivered once (no relay in between).
        sent
    } else {
        res.received
    };
    let relay_cpu = (relay1.0 - relay0.0, relay1.1 - relay0.1);
    let relay_switches = relay1.2 - relay0.2;
    let gen_cpu = (gen1.0 - gen0.0, gen1.1 - gen0.1);
    let h = &res.latency_ns;
    let us = |v: u64| v as f64 / 1000.0;
    println!(
        "relay: {}",
        if relay.is_some() {
            format!(
                "parley in-process, {workers} workers, coalesce {} µs{}",
                args.coalesce_us,
                if args.kernel {
                    ", kernel fast path"
                } else {
                    ""
                }
            )
        } else if args.direct {
            "none (direct: the generator's callers send straight to its callees)".to_owned()
        } else if args.floor {
            format!("floor (bare recvfrom/sendto forwarder), {workers} workers")
        } else {
            format!("external pid {:?}", args.external_pid)
        }
    );
    println!(
        "flows: {}  pps/flow/direction: {}  window: {window:.1} s",
        flows.len(),
        args.pps
    );
    let offered = flows.len() as f64 * 2.0 * f64::from(args.pps);
    println!(
        "offered: {offered:.0} pps  generated: {:.0} pps ({:.1}% of offered: below 100% the generator could not keep up)",
        sent as f64 / window,
        100.0 * sent as f64 / window / offered
    );
    println!(
        "sent: {sent}  received: {}  lost: {lost} ({:.4}%)  send errors: {}",
        res.received,
        100.0 * lost as f64 / sent.max(1) as f64,
        shared.send_errors.load(Ordering::Relaxed)
    );
    println!(
        "kernel UDP RcvbufErrors: +{}  SndbufErrors: +{}",
        err1.0 - err0.0,
        err1.1 - err0.1
    );
    println!(
        "relayed: {relayed} packets = {:.0} pps",
        relayed as f64 / window
    );
    println!(
        "latency (send to receive, through the relay): p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs",
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    );
    let per_pkt = |cpu: f64| 1e6 * cpu / relayed.max(1) as f64;
    println!(
        "relay CPU: {:.2} s user+sys ({:.1}% of one core), {:.2} s run time; per relayed packet: {:.2} µs (stat) {:.2} µs (schedstat)",
        relay_cpu.0,
        100.0 * relay_cpu.0 / window,
        relay_cpu.1,
        per_pkt(relay_cpu.0),
        per_pkt(relay_cpu.1)
    );
    println!(
        "relay context switches: {:.0}/s ({:.1} packets per switch)",
        relay_switches as f64 / window,
        relayed as f64 / relay_switches.max(1) as f64
    );
    println!(
        "generator CPU: {:.2} s user+sys ({:.1}% of one core); per packet: {:.2} µs",
        gen_cpu.0,
        100.0 * gen_cpu.0 / window,
        per_pkt(gen_cpu.0)
    );
    let machine = ((machine1.0 - machine0.0).as_secs_f64() * ncpu as f64
        - (machine1.1 - machine0.1))
        .max(0.0);
    println!(
        "machine CPU: {machine:.2} s busy ({:.1}% of {ncpu} CPUs; generator, relay, softirq and all else); per relayed packet: {:.2} µs",
        100.0 * machine / window / ncpu as f64,
        per_pkt(machine)
    );
    if let Some(k) = relay.as_ref().and_then(|r| r.kernel()) {
        println!("kernel flows installed: {}", k.len());
    }
    if bpf_stats_was.is_some() {
        let (runs, ns) = (bpf1.0 - bpf0.0, bpf1.1 - bpf0.1);
        println!(
            "eBPF program: {runs} runs, {:.3} s; per run: {:.0} ns (kernel.bpf_stats_enabled)",
            ns as f64 / 1e9,
            ns as f64 / runs.max(1) as f64
        );
    }
    println!(
        "ksoftirqd CPU (packet delivery the kernel deferred, charged to no thread above): {:.1}% of one core",
        100.0 * (softirqd1 - softirqd0) / window
    );
    Ok(())
}
