//! The relay's kernel fast path (`relay::kernel`): the eBPF program forwards installed
//! flows both ways, only from the latched source, counts what it forwards, follows a
//! re-point, and hands a removed flow's packets back to userspace.
//!
//! Each test runs in a network namespace of its own (`unshare(CLONE_NEWNET)` on the test's
//! thread: only loopback exists there, and attaching to its `lo` cannot touch another
//! test's traffic). Needs root (CAP_BPF, CAP_NET_ADMIN) and a build with clang: in CI both
//! are there, and a test that cannot load the program fails, saying why.

mod common;

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parley_actors::messages::{FlowStats, MediaPlane};
use parley_switch::relay::kernel::{KernelPath, Mapping, RtpPosition};
use parley_switch::relay::{KernelMode, Relay, RelaySettings};

/// Runs `test` on a thread of its own in a private network namespace (its loopback up):
/// namespaces are per thread, so tests in one process (plain `cargo test`) stay apart.
fn in_private_netns(test: impl FnOnce() + Send + 'static) {
    std::thread::spawn(|| {
        private_netns();
        test();
    })
    .join()
    .unwrap();
}

/// A private network namespace for this thread, with its loopback up.
fn private_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect(
        "unshare(CLONE_NEWNET): the kernel fast-path tests need root (CAP_SYS_ADMIN, CAP_BPF)",
    );
    // The child inherits this thread's namespace.
    let st = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (iproute2)");
    assert!(st.success(), "ip link set lo up: {st}");
}

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

fn v4(s: &UdpSocket) -> SocketAddrV4 {
    match s.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    }
}

/// The next datagram and its source, or `None` within the read timeout.
fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddrV4)> {
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Ok((n, SocketAddr::V4(from))) => Some((buf[..n].to_vec(), from)),
        Ok(_) => None,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

/// SSRC of the test streams.
const SSRC: u32 = 0x1234_5678;

/// A G.711 RTP packet of source `ssrc`, sequence `seq`.
fn packet_of(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut p = packet(seq);
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

/// (sequence, SSRC) of an RTP packet.
fn seq_ssrc(p: &[u8]) -> (u16, u32) {
    (
        u16::from_be_bytes([p[2], p[3]]),
        u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
    )
}

/// Polls `cond` until it holds (at most 5 s); whether it did.
fn eventually(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// `pkt` as a flow mapped by `map` forwards it.
fn mapped(pkt: &[u8], map: Mapping) -> Vec<u8> {
    let mut p = pkt.to_vec();
    let seq = u16::from_be_bytes([p[2], p[3]]).wrapping_add(map.seq_delta);
    let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]).wrapping_add(map.ts_delta);
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&ts.to_be_bytes());
    p[8..12].copy_from_slice(&map.out_ssrc.to_be_bytes());
    p
}

/// The stream the test flows carry, not rewritten.
const STREAM: Mapping = Mapping {
    in_ssrc: SSRC,
    out_ssrc: SSRC,
    seq_delta: 0,
    ts_delta: 0,
};

/// A G.711 RTP packet (172 bytes): sequence `seq`, timestamp `seq × 160`, [`SSRC`].
fn packet(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&SSRC.to_be_bytes());
    p.extend(std::iter::repeat_n(0xd5, 160));
    p
}

fn load(interfaces: &[&str]) -> KernelPath {
    KernelPath::load(interfaces).unwrap_or_else(|e| {
        panic!("the relay's eBPF program did not load ({e}): these tests need root and a build with clang")
    })
}

/// Caller `c` ↔ relay port `a` … relay port `b` ↔ callee `d`: both directions installed,
/// the kernel forwards each way with the relay ports as sources, the relay's own sockets
/// see nothing, and the counters are what was sent.
#[test]
fn installed_flows_forward_both_ways_from_the_bridged_port_and_count() {
    in_private_netns(|| {
        let mut k = load(&["lo"]);
        let (a, b, c, d) = (socket(), socket(), socket(), socket());
        k.install(v4(&a), v4(&c), (v4(&b), v4(&d)), STREAM).unwrap();
        k.install(v4(&b), v4(&d), (v4(&a), v4(&c)), STREAM).unwrap();
        for seq in 0..50u16 {
            c.send_to(&packet(seq), v4(&a)).unwrap();
            let (p, from) = recv(&d).expect("the callee gets the caller's packet");
            assert_eq!((p, from), (packet(seq), v4(&b)));
            d.send_to(&packet(1000 + seq), v4(&b)).unwrap();
            let (p, from) = recv(&c).expect("the caller gets the callee's packet");
            assert_eq!((p, from), (packet(1000 + seq), v4(&a)));
        }
        a.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        b.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(
            recv(&a).is_none(),
            "the relay's socket saw a forwarded packet"
        );
        assert!(
            recv(&b).is_none(),
            "the relay's socket saw a forwarded packet"
        );
        let sa = k.stats(v4(&a)).unwrap();
        let sb = k.stats(v4(&b)).unwrap();
        assert_eq!((sa.packets, sb.packets), (50, 50));
        // 172 bytes of payload + UDP 8 + IP 20 + Ethernet 14 (lo's header).
        assert_eq!((sa.bytes, sb.bytes), (50 * 214, 50 * 214));
        assert!(sa.last_ns > 0 && sb.last_ns > 0);
        // Where each stream is, for userspace to go on from.
        let at = |seq: u16| RtpPosition {
            ssrc: SSRC,
            seq,
            ts: u32::from(seq) * 160,
        };
        assert_eq!((sa.rtp(), sb.rtp()), (Some(at(49)), Some(at(1049))));
    });
}

/// Another source sending to a latched port is not forwarded: it reaches the relay's own
/// socket (which drops it, as the userspace relay does) and is not counted.
#[test]
fn a_spoofed_source_goes_to_userspace_not_to_the_callee() {
    in_private_netns(|| {
        let mut k = load(&["lo"]);
        let (a, b, c, d, stranger) = (socket(), socket(), socket(), socket(), socket());
        k.install(v4(&a), v4(&c), (v4(&b), v4(&d)), STREAM).unwrap();
        stranger.send_to(&packet(7), v4(&a)).unwrap();
        let (p, from) = recv(&a).expect("userspace gets the stranger's packet");
        assert_eq!((p, from), (packet(7), v4(&stranger)));
        d.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(recv(&d).is_none(), "a stranger's packet reached the callee");
        assert_eq!(k.stats(v4(&a)).unwrap().packets, 0);
        // The latched caller still goes through.
        c.send_to(&packet(8), v4(&a)).unwrap();
        assert_eq!(recv(&d), Some((packet(8), v4(&b))));
    });
}

/// A re-point (a re-INVITE moved the callee) sends the next packets to the new peer;
/// removing the flow hands the port back to userspace and returns its last counters.
#[test]
fn a_repointed_flow_follows_and_a_removed_one_is_userspaces_again() {
    in_private_netns(|| {
        let mut k = load(&["lo"]);
        let (a, b, c, d, moved) = (socket(), socket(), socket(), socket(), socket());
        k.install(v4(&a), v4(&c), (v4(&b), v4(&d)), STREAM).unwrap();
        c.send_to(&packet(1), v4(&a)).unwrap();
        assert_eq!(recv(&d), Some((packet(1), v4(&b))));
        k.install(v4(&a), v4(&c), (v4(&b), v4(&moved)), STREAM)
            .unwrap();
        c.send_to(&packet(2), v4(&a)).unwrap();
        assert_eq!(recv(&moved), Some((packet(2), v4(&b))));
        d.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(recv(&d).is_none(), "the old peer still gets packets");
        c.send_to(&packet(3), v4(&a)).unwrap();
        assert_eq!(recv(&moved), Some((packet(3), v4(&b))));
        let last = k.remove(v4(&a)).expect("the removed flow's counters");
        // Counters restart at a re-point: packets 2 and 3.
        assert_eq!(last.packets, 2);
        assert_eq!(last.rtp().map(|r| r.seq), Some(3));
        assert!(k.stats(v4(&a)).is_none());
        c.send_to(&packet(4), v4(&a)).unwrap();
        assert_eq!(
            recv(&a),
            Some((packet(4), v4(&c))),
            "userspace gets it again"
        );
        moved
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(recv(&moved).is_none());
    });
}

/// Network namespaces made for one test (`ip netns add`), deleted when it ends.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(roles: &[&str]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let names = roles
            .iter()
            .map(|r| format!("pk-{r}-{}-{n}", std::process::id()))
            .collect::<Vec<_>>();
        for name in &names {
            sh(&format!("ip netns add {name}"));
        }
        Namespaces(names)
    }

    /// This thread enters namespace `i` (sockets it makes now live there).
    fn enter(&self, i: usize) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.0[i])).unwrap();
        nix::sched::setns(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
    }
}

fn sh(cmd: &str) {
    let st = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .expect("sh");
    assert!(st.success(), "{cmd}: {st}");
}

/// UDP checksum errors counted in this thread's namespace (`/proc/thread-self/net/snmp`).
fn udp_checksum_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Between hosts: the caller and the callee each in a namespace of their own, the relay
/// in a third with an interface toward each (veth pairs) and IP forwarding off, as on a
/// media server. The program forwards from one interface out of the other (the
/// neighbour's MAC filled in by the kernel) with checksums that the receivers verify
/// (every offload off, so each checksum is computed in full and checked in software).
#[test]
fn between_namespaces_over_veth_with_checksums_verified() {
    std::thread::spawn(|| {
        let ns = Namespaces::new(&["c", "r", "d"]);
        let [c, r, d] = [0, 1, 2].map(|i| ns.0[i].clone());
        sh(&format!(
            "set -e
             ip link add c0 netns {c} type veth peer name r0 netns {r}
             ip link add d0 netns {d} type veth peer name r1 netns {r}
             ip -n {c} addr add 10.77.1.2/24 dev c0
             ip -n {r} addr add 10.77.1.1/24 dev r0
             ip -n {r} addr add 10.77.2.1/24 dev r1
             ip -n {d} addr add 10.77.2.2/24 dev d0
             for x in '{c} c0' '{r} r0' '{r} r1' '{d} d0'; do
               set -- $x
               ip -n $1 link set $2 up
               ip netns exec $1 ethtool -K $2 rx off tx off >/dev/null
             done
             for n in {c} {r} {d}; do ip -n $n link set lo up; done
             ip -n {c} route add default via 10.77.1.1
             ip -n {d} route add default via 10.77.2.1
             test \"$(ip netns exec {r} sysctl -n net.ipv4.ip_forward)\" = 0"
        ));
        let bind = |i: usize, addr: &str| {
            ns.enter(i);
            let s = UdpSocket::bind(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        };
        let caller = bind(0, "10.77.1.2:0");
        let callee = bind(2, "10.77.2.2:0");
        let a = bind(1, "10.77.1.1:0");
        let b = bind(1, "10.77.2.1:0");
        // In the relay's namespace from here on.
        let mut k = load(&["r0", "r1"]);
        k.install(v4(&a), v4(&caller), (v4(&b), v4(&callee)), STREAM)
            .unwrap();
        k.install(v4(&b), v4(&callee), (v4(&a), v4(&caller)), STREAM)
            .unwrap();
        for seq in 0..20u16 {
            caller.send_to(&packet(seq), v4(&a)).unwrap();
            assert_eq!(
                recv(&callee),
                Some((packet(seq), v4(&b))),
                "packet {seq} to the callee"
            );
            callee.send_to(&packet(500 + seq), v4(&b)).unwrap();
            assert_eq!(
                recv(&caller),
                Some((packet(500 + seq), v4(&a))),
                "packet {seq} to the caller"
            );
        }
        assert_eq!(
            (
                k.stats(v4(&a)).unwrap().packets,
                k.stats(v4(&b)).unwrap().packets
            ),
            (20, 20)
        );
        // Userspace's continuity mapped a new source onto the stream the callee sees: the
        // kernel rewrites SSRC, sequence and timestamp (and the checksum with them).
        let map = Mapping {
            in_ssrc: SSRC,
            out_ssrc: 0xcafe_babe,
            seq_delta: 65_000,
            ts_delta: 4_000_000_000,
        };
        k.install(v4(&a), v4(&caller), (v4(&b), v4(&callee)), map)
            .unwrap();
        for seq in 20..30u16 {
            caller.send_to(&packet(seq), v4(&a)).unwrap();
            assert_eq!(
                recv(&callee),
                Some((mapped(&packet(seq), map), v4(&b))),
                "mapped packet {seq}"
            );
        }
        let last = k.stats(v4(&a)).unwrap().rtp().unwrap();
        assert_eq!(
            (last.ssrc, last.seq, last.ts),
            (
                0xcafe_babe,
                29u16.wrapping_add(65_000),
                (29 * 160u32).wrapping_add(4_000_000_000)
            ),
            "the kernel records where the stream is as the callee sees it"
        );
        // Another SSRC, RTCP of a mapped stream, and a packet that is not RTP are the
        // relay's: they reach its socket as sent.
        let mut other = packet(30);
        other[8..12].copy_from_slice(&0x0bad_f00du32.to_be_bytes());
        let rtcp = [
            0x81, 201, 0, 7, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let junk = [0x00u8; 40];
        for p in [&other[..], &rtcp[..], &junk[..]] {
            caller.send_to(p, v4(&a)).unwrap();
            assert_eq!(recv(&a), Some((p.to_vec(), v4(&caller))));
        }
        assert_eq!(k.stats(v4(&a)).unwrap().packets, 10);
        for i in [0, 2] {
            ns.enter(i);
            assert_eq!(udp_checksum_errors(), 0, "checksum errors in {}", ns.0[i]);
        }
    })
    .join()
    .unwrap();
}

/// The relay in kernel mode drives the program itself: once both sides of a UDP↔UDP
/// bridge have latched, the kernel forwards them; a new source on one side is mapped onto
/// the stream in userspace and the kernel then forwards it mapped; a re-point takes the
/// moved side back until its new peer latches; a release takes every flow out, and the
/// call's counters hold every packet, whichever path carried it.
#[test]
fn the_relay_hands_latched_flows_to_the_kernel_and_takes_them_back() {
    in_private_netns(|| {
        let relay = Relay::start(RelaySettings {
            kernel: KernelMode::Required,
            ..RelaySettings::loopback(40_000, 40_099, 2)
        })
        .unwrap_or_else(|e| panic!("the relay in kernel mode did not start ({e}): these tests need root and a build with clang"));
        let k = relay.kernel().expect("kernel mode");
        let (caller, callee) = (socket(), socket());
        // Consecutive ports: the two legs are on different workers.
        let (a, b) = (
            relay.allocate_port().unwrap(),
            relay.allocate_port().unwrap(),
        );
        let (ra, rb) = (
            SocketAddrV4::new([127, 0, 0, 1].into(), a),
            SocketAddrV4::new([127, 0, 0, 1].into(), b),
        );
        let stats = Arc::new(FlowStats::default());
        relay
            .bridge_udp(
                (a, caller.local_addr().unwrap()),
                (b, callee.local_addr().unwrap()),
                stats.clone(),
            )
            .unwrap();
        let (mut from_caller, mut from_callee) = (0u64, 0u64);
        // The first packets latch both sides, in userspace.
        caller.send_to(&packet(0), ra).unwrap();
        from_caller += 1;
        assert_eq!(recv(&callee), Some((packet(0), rb)));
        callee.send_to(&packet(1000), rb).unwrap();
        from_callee += 1;
        assert_eq!(recv(&caller), Some((packet(1000), ra)));
        assert!(eventually(|| k.len() == 2), "both directions in the kernel");
        for seq in 1..=100u16 {
            caller.send_to(&packet(seq), ra).unwrap();
            assert_eq!(recv(&callee), Some((packet(seq), rb)));
            callee.send_to(&packet(1000 + seq), rb).unwrap();
            assert_eq!(recv(&caller), Some((packet(1000 + seq), ra)));
        }
        (from_caller, from_callee) = (from_caller + 100, from_callee + 100);
        assert_eq!((k.forwarded(a), k.forwarded(b)), (Some(100), Some(100)));

        // The caller's side switches to a new source (same address, new SSRC): the
        // callee still sees one stream, the sequence going on from where the kernel
        // left it; after the first packet the kernel forwards it, mapped.
        for i in 0..50u16 {
            caller
                .send_to(&packet_of(0x5555_0000, 7000 + i), ra)
                .unwrap();
            let (p, from) = recv(&callee).expect("the new source reaches the callee");
            assert_eq!((seq_ssrc(&p), from), ((101 + i, SSRC), rb), "packet {i}");
        }
        from_caller += 50;
        assert!(
            k.forwarded(a).is_some_and(|n| n >= 40),
            "the kernel forwards the mapped source: {:?}",
            k.forwarded(a)
        );

        // A re-INVITE moves the callee: its side is userspace's until the new peer
        // latches; the caller's packets go to the new address.
        let moved = socket();
        relay.repoint(b, moved.local_addr().unwrap()).unwrap();
        assert!(
            eventually(|| k.forwarded(b).is_none()),
            "the moved side is taken back"
        );
        moved
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut seq = 151u16;
        loop {
            caller
                .send_to(&packet_of(0x5555_0000, 7000 + seq - 101), ra)
                .unwrap();
            from_caller += 1;
            seq += 1;
            if recv(&moved).is_some() {
                break;
            }
            assert!(
                seq < 1000,
                "the caller's packets never reached the moved callee"
            );
        }
        moved.send_to(&packet(2000), rb).unwrap();
        from_callee += 1;
        assert_eq!(
            recv(&caller).map(|(p, f)| (seq_ssrc(&p).1, f)),
            Some((SSRC, ra))
        );
        assert!(
            eventually(|| k.len() == 2),
            "the new peer latched: both in the kernel again"
        );
        for i in 1..=20u16 {
            moved.send_to(&packet(2000 + i), rb).unwrap();
            assert!(recv(&caller).is_some());
        }
        from_callee += 20;
        assert!(
            k.forwarded(b).is_some_and(|n| n >= 19),
            "{:?}",
            k.forwarded(b)
        );

        // Hang-up: every flow out of the kernel at once, every packet counted.
        relay.release(&[a, b], &[]);
        assert_eq!(k.len(), 0);
        assert_eq!(
            (
                stats.caller_to_callee.load(Ordering::Relaxed),
                stats.callee_to_caller.load(Ordering::Relaxed)
            ),
            (from_caller, from_callee)
        );
        // The ports are the relay's again: nothing is forwarded.
        caller.send_to(&packet(9999), ra).unwrap();
        moved
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(recv(&moved).is_none(), "a released port still forwards");
        relay.stop();
    });
}

/// A node in kernel mode (`[relay] kernel = "required"`, `[calls]` extras given) in this
/// thread's namespace, a SIPp `uas` as its trunk (echoing media), and a runtime on this
/// thread to drive SIPp UACs with (spawned from this thread: in this namespace too).
fn kernel_node(calls_extra: &str) -> (common::Node, common::SippUas, tokio::runtime::Runtime) {
    let node = common::Node::start_on_relay(
        common::StoreKind::Sqlite,
        ["", "", calls_extra, ""],
        200,
        "kernel = \"required\"",
    );
    let trunk = common::SippUas::start(&node, &["-sn", "uas"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (node, trunk, rt)
}

/// SIPp's media through a node in kernel mode (`[relay] kernel = "required"`): a gateway
/// call to the PSTN line (SIPp `uas` echoing the media), G.711 both ways, each leg
/// latched in userspace and then forwarded by the kernel; the CDRs count the packets as
/// in userspace mode, and hang-up leaves no flow in the kernel.
#[test]
fn sipp_media_through_a_node_in_kernel_mode_is_forwarded_by_the_kernel() {
    use common::{scenario, sipp_uac};
    in_private_netns(|| {
        let (node, _trunk, rt) = kernel_node("");
        assert!(
            node.log().contains("relay kernel fast path loaded"),
            "{}",
            node.log()
        );
        assert_eq!(node.metric("parley_relay_kernel_loaded"), 1.0);
        let sc = scenario(node.dir.path(), "uac_pcmu.xml");
        let calls = 3;
        let run = rt.block_on(sipp_uac(
            &node,
            &["-sf", sc.to_str().unwrap()],
            "+15550100001",
            calls,
            3,
            &["-d", "2000"],
        ));
        assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
        assert_eq!(run.successful, u64::from(calls));
        let cdrs = node.wait_cdrs(calls as usize);
        for c in &cdrs {
            assert_eq!(
                (c["disposition"].as_str(), c["route"].as_str()),
                (Some("ANSWERED"), Some("pstn")),
                "{c}"
            );
            assert!(c["packets_in"].as_i64().unwrap() >= 50, "{c}");
            assert!(c["packets_out"].as_i64().unwrap() >= 50, "{c}");
        }
        let relayed = node.metric("parley_relay_packets_total{path=\"udp_udp\"}");
        let in_kernel = node.metric("parley_relay_kernel_packets_total");
        assert!(
            relayed >= 100.0 * f64::from(calls),
            "{relayed} packets relayed"
        );
        assert!(
            in_kernel >= 0.9 * relayed,
            "the kernel forwarded {in_kernel} of {relayed} packets"
        );
        assert_eq!(
            node.metric("parley_relay_kernel_flows"),
            0.0,
            "flows left after hang-up"
        );
        let sum: i64 = cdrs
            .iter()
            .map(|c| c["packets_in"].as_i64().unwrap() + c["packets_out"].as_i64().unwrap())
            .sum();
        assert_eq!(sum as f64, relayed, "the CDRs count every packet relayed");
    });
}

/// The media timeout reads the kernel's counters: a call whose media the kernel carries
/// is not ended for silence while it flows (the userspace relay sees none of it), and is
/// ended (BYE both ways, CDR cause 408) once it stops.
#[test]
fn in_kernel_mode_the_media_timeout_sees_the_kernels_packets() {
    use common::{scenario, sipp_uac};
    in_private_netns(|| {
        let (node, _trunk, rt) = kernel_node("media_timeout_secs = 2");
        // Media for the whole call (the tone looped), 5 s: longer than the timeout.
        let looped = scenario(node.dir.path(), "uac_pcmu.xml");
        let run = rt.block_on(sipp_uac(
            &node,
            &["-sf", looped.to_str().unwrap()],
            "+15550100001",
            1,
            1,
            &["-d", "5000"],
        ));
        assert_eq!(
            run.code,
            0,
            "the call was cut while the kernel carried its media:\n{}\n{}",
            run.output,
            node.log()
        );
        let first = node.wait_cdrs(1)[0].clone();
        assert_ne!(first["sip_cause"].as_i64(), Some(408), "{first}");
        assert!(node.metric("parley_relay_kernel_packets_total") >= 400.0);
        // The tone played once (4 s), then silence in a 12 s call: Parley hangs up.
        let once = node.dir.path().join("uac_pcmu_once.xml");
        let text = std::fs::read_to_string(&looped).unwrap();
        assert!(text.contains(",-1,0\""), "the scenario loops its tone");
        std::fs::write(&once, text.replace(",-1,0\"", ",1,0\"")).unwrap();
        let _ = rt.block_on(sipp_uac(
            &node,
            &["-sf", once.to_str().unwrap()],
            "+15550100001",
            1,
            1,
            &["-d", "12000"],
        ));
        let cdrs = node.wait_cdrs(2);
        let second = &cdrs[0];
        assert_eq!(
            (second["disposition"].as_str(), second["sip_cause"].as_i64()),
            (Some("ANSWERED"), Some(408)),
            "{second}"
        );
        // Its 4 s of media were counted (50 packets a second each way).
        assert!(second["packets_in"].as_i64().unwrap() >= 150, "{second}");
        assert_eq!(node.metric("parley_media_timeouts_total"), 1.0);
        assert_eq!(node.metric("parley_relay_kernel_flows"), 0.0);
    });
}

/// Without the capability (every capability dropped, as for a node not run as root),
/// `auto` relays in userspace and says why in the log, and `required` refuses to start,
/// naming the key.
#[test]
fn without_the_capability_auto_relays_in_userspace_and_required_does_not_start() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let base = common::free_port_block(20);
    let start = |mode: &str| {
        let cfg = dir.path().join(format!("{mode}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "data_dir = \"{data}\"\n[sip]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:0\"\n\
                 [http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"test-token-0123456789\"\n[web]\nlisten = \"127.0.0.1:0\"\n\
                 [relay]\nport_min = {base}\nport_max = {max}\nkernel = \"{mode}\"\n",
                data = dir.path().join(mode).display(),
                max = base + 19,
            ),
        )
        .unwrap();
        let log = dir.path().join(format!("{mode}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("setpriv")
            .args([
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                "--",
            ])
            .arg(env!("CARGO_BIN_EXE_parley"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("PARLEY_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("setpriv (util-linux)");
        (child, log)
    };
    let read = |log: &std::path::Path| std::fs::read_to_string(log).unwrap_or_default();

    let (mut required, log) = start("required");
    let status = (0..300)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            required.try_wait().unwrap()
        })
        .unwrap_or_else(|| {
            panic!(
                "a node that requires the fast path started without it:\n{}",
                read(&log)
            )
        });
    assert!(!status.success());
    assert!(
        read(&log).contains("[relay] kernel = \"required\", but the fast path cannot load"),
        "{}",
        read(&log)
    );

    let (mut auto, log) = start("auto");
    let ready = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        read(&log).contains("parley ready")
    });
    let _ = auto.kill();
    let _ = auto.wait();
    let text = read(&log);
    assert!(ready, "the node in auto mode did not start:\n{text}");
    assert!(
        text.contains("relay kernel fast path unavailable; relaying in userspace")
            && text.contains("Operation not permitted"),
        "{text}"
    );
}

/// A gateway moves its media with a re-INVITE (SIPp) on a trunk call whose media the
/// kernel forwards: the gateway's side is taken back from the kernel, latches the new
/// address only, and the new source (its own SSRC, sequence and timestamp bases) is
/// mapped onto the stream the trunk already had — first in userspace from where the
/// kernel left the stream, then by the kernel. The trunk (SIPp echoing) sees one stream:
/// its echo arriving at the gateway's new address carries the old SSRC and the next
/// sequence numbers.
#[test]
fn a_reinvite_on_a_kernel_forwarded_call_keeps_one_stream_toward_the_trunk() {
    use common::{scenario, sipp_uac, wait_metric};
    use std::sync::atomic::AtomicBool;
    in_private_netns(|| {
        let (node, _trunk, rt) = kernel_node("");
        let (old, new) = (Arc::new(socket()), Arc::new(socket()));
        let sc = scenario(node.dir.path(), "uac_reinvite.xml");
        let text = std::fs::read_to_string(&sc)
            .unwrap()
            .replace("@MEDIA1@", &v4(&old).port().to_string())
            .replace("@MEDIA2@", &v4(&new).port().to_string());
        std::fs::write(&sc, text).unwrap();
        let _guard = rt.enter();
        // Spawned here, so SIPp starts in this namespace; it runs while this thread
        // blocks on the runtime below.
        let sipp = rt.spawn(sipp_uac(
            &node,
            &["-sf", sc.to_str().unwrap()],
            "+15550100001",
            1,
            1,
            &["-trace_msg"],
        ));
        // The call's gateway-side relay port, from Parley's answer in SIPp's message log.
        let (p_old, p_new) = (v4(&old).port(), v4(&new).port());
        let relay = rt.block_on(async {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let answered = std::fs::read_dir(node.dir.path())
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with("_messages.log"))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .flat_map(|log| {
                        log.lines()
                            .filter_map(|l| l.trim().strip_prefix("m=audio "))
                            .filter_map(|l| l.split(' ').next()?.parse::<u16>().ok())
                            .collect::<Vec<_>>()
                    })
                    .find(|p| ![p_old, p_new].contains(p));
                if let Some(port) = answered {
                    return SocketAddrV4::new([127, 0, 0, 1].into(), port);
                }
            }
            panic!("no answer with SDP in SIPp's message log\n{}", node.log());
        });
        let moved = Arc::new(AtomicBool::new(false));
        let sender = {
            let (old, new, moved) = (old.clone(), new.clone(), moved.clone());
            std::thread::spawn(move || {
                let mut i = 0u16;
                while !moved.load(Ordering::Relaxed) && i < 1000 {
                    old.send_to(&packet_of(0xaaaa_0001, 1000 + i), relay)
                        .unwrap();
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                for j in 0..50u16 {
                    new.send_to(&packet_of(0xbbbb_0002, 65_500u16.wrapping_add(j)), relay)
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
                i
            })
        };
        // Before the move: the trunk's echo comes back to the first address, through
        // the kernel once both sides latched.
        let echoed = rt.block_on(async {
            let o = old.clone();
            // (The call is being set up meanwhile: up to 5 s.)
            tokio::task::spawn_blocking(move || (0..10).find_map(|_| recv(&o)))
                .await
                .unwrap()
        });
        assert!(
            echoed.is_some(),
            "no echo at the first address\n{}",
            node.log()
        );
        let reinvited = wait_metric(&node, "parley_sip_reinvites_total{result=\"moved\"}", |v| {
            v >= 1.0
        });
        assert_eq!(reinvited, 1.0, "{}", node.log());
        let before_move = node.metric("parley_relay_kernel_packets_total");
        assert!(
            before_move > 0.0,
            "the kernel forwarded nothing before the move"
        );
        moved.store(true, Ordering::Relaxed);
        // Echoes at the new address: the old stream, going on.
        let mut later = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_millis(900);
        while std::time::Instant::now() < deadline {
            if let Some((p, from)) = recv(&new) {
                later.push((seq_ssrc(&p), from));
            }
        }
        let sent_old = sender.join().unwrap();
        let run = rt.block_on(sipp).unwrap();
        assert_eq!(run.code, 0, "SIPp failed:\n{}\n{}", run.output, node.log());
        assert!(
            later.len() >= 30,
            "{} echoes at the new address: {later:?}\n{}",
            later.len(),
            node.get("/metrics", false)
                .1
                .lines()
                .filter(|l| l.starts_with("parley_relay"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        // The first echoes there may be the old source's last packets, in flight at the
        // move; then the new source's, mapped: one sequence without a gap or a jump.
        let first = later[0].0.0;
        assert!(
            (1000..1000 + sent_old).contains(&first),
            "{first}: not the old stream"
        );
        for (i, ((seq, ssrc), from)) in later.iter().enumerate() {
            assert_eq!(
                (*seq, *ssrc, *from),
                (first + i as u16, 0xaaaa_0001, relay),
                "echo {i} at the new address: {later:?}"
            );
        }
        assert!(
            first + later.len() as u16 > 1000 + sent_old + 25,
            "the new source's packets are among them"
        );
        assert!(
            node.metric("parley_relay_kernel_packets_total") >= before_move + 30.0,
            "the kernel did not forward the moved stream"
        );
        let cdrs = node.wait_cdrs(1);
        assert_eq!(cdrs[0]["disposition"], "ANSWERED", "{}", cdrs[0]);
        assert_eq!(node.metric("parley_relay_kernel_flows"), 0.0);
    });
}
