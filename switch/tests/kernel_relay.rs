//! The relay's kernel fast path (`relay::kernel`): the eBPF program forwards installed
//! flows both ways, only from the latched source, counts what it forwards, follows a
//! re-point, and hands a removed flow's packets back to userspace.
//!
//! Each test runs in a network namespace of its own (`unshare(CLONE_NEWNET)` on the test's
//! thread: only loopback exists there, and attaching to its `lo` cannot touch another
//! test's traffic). Needs root (CAP_BPF, CAP_NET_ADMIN) and a build with clang: in CI both
//! are there, and a test that cannot load the program fails, saying why.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use parley_switch::relay::kernel::{KernelPath, RtpPosition};

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
        k.install(v4(&a), v4(&c), v4(&b), v4(&d)).unwrap();
        k.install(v4(&b), v4(&d), v4(&a), v4(&c)).unwrap();
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
        k.install(v4(&a), v4(&c), v4(&b), v4(&d)).unwrap();
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
        k.install(v4(&a), v4(&c), v4(&b), v4(&d)).unwrap();
        c.send_to(&packet(1), v4(&a)).unwrap();
        assert_eq!(recv(&d), Some((packet(1), v4(&b))));
        k.install(v4(&a), v4(&c), v4(&b), v4(&moved)).unwrap();
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
        k.install(v4(&a), v4(&caller), v4(&b), v4(&callee)).unwrap();
        k.install(v4(&b), v4(&callee), v4(&a), v4(&caller)).unwrap();
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
        for i in [0, 2] {
            ns.enter(i);
            assert_eq!(udp_checksum_errors(), 0, "checksum errors in {}", ns.0[i]);
        }
    })
    .join()
    .unwrap();
}
