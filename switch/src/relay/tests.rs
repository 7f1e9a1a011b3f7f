//! The relay over real loopback sockets: forwarding, latching, spoofed and malformed input,
//! release.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parley_actors::messages::{FlowStats, MediaPlane};

use super::{Relay, RelaySettings};

/// A 172-byte G.711-shaped RTP packet.
fn rtp_from(ssrc: u32, seq: u16, ts: u32) -> Vec<u8> {
    let mut h = [0u8; 12];
    parley_codecs::rtp::write_header(&mut h, 0, false, seq, ts, ssrc);
    let mut p = h.to_vec();
    p.extend_from_slice(&[0xff; 160]);
    p
}

/// Packet `seq` of the one stream most tests send.
fn rtp(seq: u16) -> Vec<u8> {
    rtp_from(0x1234, seq, u32::from(seq) * 160)
}

fn sock() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s
}

fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    s.recv_from(&mut buf)
        .ok()
        .map(|(n, a)| (buf[..n].to_vec(), a))
}

/// A base port near the OS's ephemeral choice, `below` ports under it (ranges from it are
/// skipped where taken).
fn base_port(below: u16) -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .saturating_sub(below)
        .max(1024)
}

fn relay() -> Arc<Relay> {
    // Let the OS pick: bind-and-release a port, use the 50 above it (skipped if taken).
    let base = base_port(60);
    Relay::start(RelaySettings {
        coalesce: Duration::from_micros(200),
        ..RelaySettings::loopback(base, base + 50, 2)
    })
    .unwrap()
}

#[test]
fn udp_bridge_forwards_both_ways_latches_and_drops_spoofed_and_malformed() {
    let relay = relay();
    let (pa, pb) = (
        relay.allocate_port().unwrap(),
        relay.allocate_port().unwrap(),
    );
    assert_ne!(pa, pb);
    let (caller, callee, spoof) = (sock(), sock(), sock());
    let stats = Arc::new(FlowStats::default());
    relay
        .bridge_udp(
            (pa, caller.local_addr().unwrap()),
            (pb, callee.local_addr().unwrap()),
            stats.clone(),
        )
        .unwrap();
    let a: SocketAddr = ([127, 0, 0, 1], pa).into();
    let b: SocketAddr = ([127, 0, 0, 1], pb).into();

    caller.send_to(&rtp(1), a).unwrap();
    let (pkt, from) = recv(&callee).expect("forwarded to the callee");
    assert_eq!(
        (pkt, from),
        (rtp(1), b),
        "arrives unchanged, from the callee-side relay port"
    );
    callee.send_to(&rtp(2), b).unwrap();
    assert_eq!(recv(&caller).expect("forwarded back"), (rtp(2), a));

    // Another source on the latched port: dropped, never reaches the callee.
    spoof.send_to(&rtp(99), a).unwrap();
    // Not RTP at all from the right source: dropped too.
    caller.send_to(b"hello", a).unwrap();
    caller.send_to(&rtp(3), a).unwrap();
    assert_eq!(
        recv(&callee).map(|r| r.0),
        Some(rtp(3)),
        "only the genuine packet got through"
    );
    assert_eq!(stats.caller_to_callee.load(Ordering::Relaxed), 2);
    assert_eq!(stats.callee_to_caller.load(Ordering::Relaxed), 1);

    relay.release(&[pa, pb], &[]);
    std::thread::sleep(Duration::from_millis(100));
    caller.send_to(&rtp(4), a).unwrap();
    assert!(recv(&callee).is_none(), "nothing flows after release");
    relay.stop();
}

#[test]
fn unbridged_port_forwards_nothing_and_many_legs_may_share_one_remote() {
    let relay = relay();
    let lonely = relay.allocate_port().unwrap();
    let (gw, echo) = (sock(), sock());
    gw.send_to(&rtp(1), ("127.0.0.1", lonely)).unwrap();
    assert!(recv(&echo).is_none());
    // Two calls whose callee side is the same address (SIPp -rtp_echo uses one socket).
    let stats = Arc::new(FlowStats::default());
    let (g1, g2) = (sock(), sock());
    let ports: Vec<u16> = (0..4).map(|_| relay.allocate_port().unwrap()).collect();
    relay
        .bridge_udp(
            (ports[0], g1.local_addr().unwrap()),
            (ports[1], echo.local_addr().unwrap()),
            stats.clone(),
        )
        .unwrap();
    relay
        .bridge_udp(
            (ports[2], g2.local_addr().unwrap()),
            (ports[3], echo.local_addr().unwrap()),
            stats.clone(),
        )
        .unwrap();
    g1.send_to(&rtp(10), ("127.0.0.1", ports[0])).unwrap();
    let (_, from1) = recv(&echo).unwrap();
    g2.send_to(&rtp(20), ("127.0.0.1", ports[2])).unwrap();
    let (_, from2) = recv(&echo).unwrap();
    assert_eq!((from1.port(), from2.port()), (ports[1], ports[3]));
    // The echo answers each relay port; each call's caller gets only its own packets.
    echo.send_to(&rtp(11), from1).unwrap();
    echo.send_to(&rtp(21), from2).unwrap();
    assert_eq!(recv(&g1).unwrap().0, rtp(11));
    assert_eq!(recv(&g2).unwrap().0, rtp(21));
    relay.stop();
}

#[test]
fn port_range_exhaustion_is_an_error_not_a_crash() {
    // Released ports closed (none kept warm), then kept warm: either way they come back.
    for warm_ports in [0, 4] {
        let base = base_port(10) & !1;
        // Two RTP/RTCP pairs.
        let relay = Relay::start(RelaySettings {
            warm_ports,
            ..RelaySettings::loopback(base, base + 3, 2)
        })
        .unwrap();
        let mut got = Vec::new();
        while let Ok(p) = relay.allocate_port() {
            assert_eq!(p % 2, 0, "RTP ports are even");
            got.push(p);
            assert!(got.len() <= 2);
        }
        assert!(matches!(
            relay.allocate_port(),
            Err(parley_actors::messages::MediaError::PortsExhausted)
        ));
        relay.release(&got, &[]);
        // The workers hand released ports back once their sockets are closed (or reset,
        // when kept warm); a call placed in that moment waits for them instead of being
        // refused on a range that is not full.
        for _ in &got {
            let p = relay
                .allocate_port()
                .expect("a released port is reusable at once");
            assert!(
                got.contains(&p),
                "{p} is one of {got:?} (warm: {warm_ports})"
            );
        }
        assert!(matches!(
            relay.allocate_port(),
            Err(parley_actors::messages::MediaError::PortsExhausted)
        ));
        relay.stop();
    }
}

/// A released port stays bound (up to `warm_ports`) and is handed to a later call reset:
/// the next call neither receives the last call's peer's packets nor finds the port
/// latched to it; beyond the cap, released ports are closed.
#[test]
fn a_warm_port_serves_its_next_call_as_a_fresh_one() {
    let base = base_port(60) & !1;
    let relay = Relay::start(RelaySettings {
        warm_ports: 2,
        ..RelaySettings::loopback(base, base + 50, 2)
    })
    .unwrap();
    let (pa, pb) = (
        relay.allocate_port().unwrap(),
        relay.allocate_port().unwrap(),
    );
    let (old_caller, old_callee) = (sock(), sock());
    relay
        .bridge_udp(
            (pa, old_caller.local_addr().unwrap()),
            (pb, old_callee.local_addr().unwrap()),
            Arc::new(FlowStats::default()),
        )
        .unwrap();
    let a: SocketAddr = ([127, 0, 0, 1], pa).into();
    let b: SocketAddr = ([127, 0, 0, 1], pb).into();
    old_caller.send_to(&rtp(1), a).unwrap();
    assert_eq!(recv(&old_callee).map(|r| r.0), Some(rtp(1)));
    relay.release(&[pa, pb], &[]);
    // Offered again once their workers have reset them.
    for _ in 0..100 {
        if relay.warm_ports() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(relay.warm_ports(), 2, "both RTP ports kept");
    assert!(
        UdpSocket::bind(a).is_err(),
        "a warm port stays bound: no other program takes it meanwhile"
    );
    // The last call's peer goes on sending, before and after the port is taken again.
    old_caller.send_to(&rtp(2), a).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let again: Vec<u16> = (0..2).map(|_| relay.allocate_port().unwrap()).collect();
    assert!(
        again.contains(&pa) && again.contains(&pb),
        "{again:?}: warm ports first"
    );
    assert_eq!(relay.warm_ports(), 0);
    old_caller.send_to(&rtp(3), a).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (caller, callee) = (sock(), sock());
    let stats = Arc::new(FlowStats::default());
    relay
        .bridge_udp(
            (pa, caller.local_addr().unwrap()),
            (pb, callee.local_addr().unwrap()),
            stats.clone(),
        )
        .unwrap();
    let fresh = rtp_from(0x9999, 1, 160);
    caller.send_to(&fresh, a).unwrap();
    assert_eq!(
        recv(&callee),
        Some((fresh, b)),
        "the new caller latches the port (the old peer's packets neither reached the new \
         callee nor took the latch)"
    );
    old_caller.send_to(&rtp(4), a).unwrap();
    assert!(
        recv(&callee).is_none(),
        "the old peer is another source now"
    );
    assert!(
        recv(&old_callee).is_none(),
        "and nothing reaches the old callee"
    );
    assert_eq!(stats.caller_to_callee.load(Ordering::Relaxed), 1);
    callee.send_to(&rtp(5), b).unwrap();
    assert_eq!(recv(&caller).map(|r| r.0), Some(rtp(5)));

    // Over the cap: a third released port is closed (and free to others).
    let pc = relay.allocate_port().unwrap();
    relay.release(&[pa, pb, pc], &[]);
    for _ in 0..100 {
        if relay.warm_ports() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(relay.warm_ports(), 2);
    let closed = [pa, pb, pc]
        .into_iter()
        .filter(|&p| {
            // The worker closes it a moment after the release.
            (0..50).any(|_| {
                let ok = UdpSocket::bind(("127.0.0.1", p)).is_ok();
                if !ok {
                    std::thread::sleep(Duration::from_millis(10));
                }
                ok
            })
        })
        .count();
    assert_eq!(closed, 1, "exactly one of the three ports was closed");
    relay.stop();
}

/// Two allocated ports owned by different workers ((port / 2) % 2 differs).
fn ports_on_two_workers(relay: &Relay) -> (u16, u16) {
    let a = relay.allocate_port().unwrap();
    loop {
        let b = relay.allocate_port().unwrap();
        if (a / 2) % 2 != (b / 2) % 2 {
            return (a, b);
        }
    }
}

#[test]
fn latching_on_one_worker_retargets_the_bridged_port_on_the_other() {
    let relay = relay();
    assert_eq!(relay.workers(), 2);
    let (pa, pb) = ports_on_two_workers(&relay);
    let (caller, callee_sdp, callee_real) = (sock(), sock(), sock());
    let stats = Arc::new(FlowStats::default());
    // Signalling names one address for the callee; its media really comes from another
    // (a NAT): the relay answers where the media comes from once it latched.
    relay
        .bridge_udp(
            (pa, caller.local_addr().unwrap()),
            (pb, callee_sdp.local_addr().unwrap()),
            stats.clone(),
        )
        .unwrap();
    let a: SocketAddr = ([127, 0, 0, 1], pa).into();
    let b: SocketAddr = ([127, 0, 0, 1], pb).into();
    caller.send_to(&rtp(1), a).unwrap();
    assert_eq!(
        recv(&callee_sdp).map(|r| r.0),
        Some(rtp(1)),
        "before latching: the signalled address"
    );
    callee_real.send_to(&rtp(2), b).unwrap();
    assert_eq!(recv(&caller).expect("forwarded back"), (rtp(2), a));
    // The other worker learns of the latch through its queue: retry until it has.
    let mut seq = 3;
    let got = loop {
        caller.send_to(&rtp(seq), a).unwrap();
        if let Some(r) = recv(&callee_real) {
            break r;
        }
        seq += 1;
        assert!(seq < 20, "latched address never used");
    };
    assert_eq!(got, (rtp(seq), b));
    relay.release(&[pa, pb], &[]);
    relay.stop();
}

#[test]
fn a_burst_is_relayed_complete_and_in_order() {
    let relay = relay();
    let (pa, pb) = ports_on_two_workers(&relay);
    let (caller, callee) = (sock(), sock());
    let stats = Arc::new(FlowStats::default());
    relay
        .bridge_udp(
            (pa, caller.local_addr().unwrap()),
            (pb, callee.local_addr().unwrap()),
            stats.clone(),
        )
        .unwrap();
    // More than one recvmmsg batch, queued before the worker reads: batched receive and
    // GSO send, and the re-read of a socket that filled its batch.
    for seq in 0..100 {
        caller.send_to(&rtp(seq), ("127.0.0.1", pa)).unwrap();
    }
    for seq in 0..100 {
        let (pkt, from) = recv(&callee).expect("every packet arrives");
        assert_eq!((pkt, from.port()), (rtp(seq), pb));
    }
    assert_eq!(stats.caller_to_callee.load(Ordering::Relaxed), 100);
    relay.release(&[pa, pb], &[]);
    relay.stop();
}

/// Once the call has closed its stats (it has ended and taken its CDR's counts), the
/// relay sends nothing more of the stream, even before its workers let the ports go: the
/// CDR holds exactly what was relayed.
#[test]
fn nothing_is_relayed_after_the_call_closes_its_counts() {
    let relay = relay();
    let (caller, callee) = (sock(), sock());
    let (pa, pb, stats) = bridged(&relay, &caller, &callee);
    for seq in 0..3 {
        caller.send_to(&rtp(seq), ("127.0.0.1", pa)).unwrap();
        callee.send_to(&rtp(seq), ("127.0.0.1", pb)).unwrap();
    }
    for _ in 0..3 {
        recv(&callee).expect("relayed before the close");
        recv(&caller).expect("relayed before the close");
    }
    assert_eq!(stats.close(), (3, 3));
    // The ports are still bridged (no release yet): what arrives now is dropped.
    for seq in 3..6 {
        caller.send_to(&rtp(seq), ("127.0.0.1", pa)).unwrap();
        callee.send_to(&rtp(seq), ("127.0.0.1", pb)).unwrap();
    }
    assert_eq!(recv(&callee), None, "relayed after the close");
    assert_eq!(recv(&caller), None, "relayed after the close");
    assert_eq!(stats.packets(), (3, 3));
    relay.release(&[pa, pb], &[]);
    relay.stop();
}

/// Two ports on one worker bridged between `caller` and `callee` (as a node allocates a
/// call's legs); returns the ports and the call's stats.
fn bridged(relay: &Relay, caller: &UdpSocket, callee: &UdpSocket) -> (u16, u16, Arc<FlowStats>) {
    let pa = relay.allocate_port().unwrap();
    let pb = relay.allocate_port_near(pa).unwrap();
    let stats = Arc::new(FlowStats::default());
    relay
        .bridge_udp(
            (pa, caller.local_addr().unwrap()),
            (pb, callee.local_addr().unwrap()),
            stats.clone(),
        )
        .unwrap();
    (pa, pb, stats)
}

/// A re-INVITE moves the caller's media to a new address with a new SSRC and new
/// sequence/timestamp bases: the callee keeps seeing one continuous stream, the caller's
/// old address is never latched again, and the callee's media now goes to the new one.
#[test]
fn source_change_keeps_the_stream_continuous_and_relatches_only_the_new_peer() {
    use parley_codecs::rtp::RtpView;
    let relay = relay();
    let (old, new, callee) = (sock(), sock(), sock());
    let (pa, pb, _) = bridged(&relay, &old, &callee);
    let a: SocketAddr = ([127, 0, 0, 1], pa).into();
    let b: SocketAddr = ([127, 0, 0, 1], pb).into();
    let mut seen = Vec::new();
    for i in 0..5u16 {
        old.send_to(&rtp_from(0xaaaa, 1000 + i, 50_000 + 160 * u32::from(i)), a)
            .unwrap();
        seen.push(recv(&callee).expect("relayed").0);
        std::thread::sleep(Duration::from_millis(20));
    }

    relay.repoint(pa, new.local_addr().unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // The old source's late packet: dropped (it must not win the new latch).
    old.send_to(&rtp_from(0xaaaa, 1005, 50_800), a).unwrap();
    for i in 0..5u16 {
        new.send_to(
            &rtp_from(0xbbbb, 40_000 + i, 7_000_000 + 160 * u32::from(i)),
            a,
        )
        .unwrap();
        seen.push(recv(&callee).expect("relayed from the new source").0);
        std::thread::sleep(Duration::from_millis(20));
    }
    let views: Vec<_> = seen.iter().map(|p| RtpView::parse(p).unwrap()).collect();
    for w in views.windows(2) {
        assert_eq!(w[1].ssrc(), 0xaaaa, "one SSRC toward the callee");
        assert_eq!(
            w[1].sequence(),
            w[0].sequence().wrapping_add(1),
            "no gap, no jump"
        );
        let dt = w[1].timestamp().wrapping_sub(w[0].timestamp());
        assert!(
            (160..8_000).contains(&dt),
            "timestamp moves forward with time: +{dt}"
        );
        assert_eq!(w[1].payload(), &[0xff; 160][..]);
    }
    assert!(views[5].marker(), "the new source starts a talkspurt");
    assert!(!views[6].marker());

    // The callee's media goes to the new address, from the caller-side port.
    callee.send_to(&rtp(7), b).unwrap();
    assert_eq!(
        recv(&new).expect("callee media to the new address"),
        (rtp(7), a)
    );
    assert!(recv(&old).is_none(), "nothing to the old address");
    // And the old source stays locked out.
    old.send_to(&rtp_from(0xaaaa, 1006, 50_960), a).unwrap();
    assert!(recv(&callee).is_none());
    relay.release(&[pa, pb], &[]);
    relay.stop();
}

/// Raises the soft open-file limit to at least `need` (up to the hard limit); fails the
/// test loudly if the machine does not allow it.
fn raise_nofile(need: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= need,
        "this test needs {need} open files; the hard limit is {hard} (raise it with ulimit -Hn)"
    );
    if soft < need {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// A generator socket with a large receive buffer (the whole window may queue on it).
fn gen_sock() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// 5,000 bridged calls carry traffic both ways while other calls are bridged, carry a
/// little media and are released on the side: not one packet of the 5,000 is lost or
/// reordered. The sender keeps at most `WINDOW` packets in flight per direction, so the
/// only way to lose one is the relay itself.
#[test]
fn flows_added_and_removed_while_5000_carry_traffic_lose_nothing() {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU64;
    const FLOWS: usize = 5_000;
    const ROUNDS: u16 = 8;
    const WINDOW: u64 = 400;
    raise_nofile(12_000);
    // RTP ports only: 10,000 sockets for the 5,000 calls (with RTCP ports it would be
    // 20,000, this machine's whole descriptor limit).
    let relay = Relay::start(RelaySettings {
        coalesce: Duration::from_micros(200),
        rtcp_ports: false,
        ..RelaySettings::loopback(8_000, 29_999, 2)
    })
    .unwrap();
    let (ga, gb) = (Arc::new(gen_sock()), Arc::new(gen_sock()));
    let mut ports = Vec::with_capacity(FLOWS);
    for _ in 0..FLOWS {
        let (pa, pb) = (
            relay.allocate_port().unwrap(),
            relay.allocate_port().unwrap(),
        );
        relay
            .bridge_udp(
                (pa, ga.local_addr().unwrap()),
                (pb, gb.local_addr().unwrap()),
                Arc::new(FlowStats::default()),
            )
            .unwrap();
        ports.push((pa, pb));
    }
    // Which flow a packet belongs to, by the relay port it came out of.
    let mut flow_of: HashMap<u16, usize> = HashMap::new();
    for (i, &(pa, pb)) in ports.iter().enumerate() {
        flow_of.insert(pa, i);
        flow_of.insert(pb, i);
    }
    let flow_of = Arc::new(flow_of);

    // Receivers: per flow, the sequence numbers seen, in arrival order.
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = |s: Arc<UdpSocket>| {
        let (flow_of, received, done) = (flow_of.clone(), received.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<Vec<u16>> = vec![Vec::new(); FLOWS];
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                let Ok((n, from)) = s.recv_from(&mut buf) else {
                    continue;
                };
                let seq = parley_codecs::rtp::RtpView::parse(&buf[..n])
                    .expect("relayed RTP")
                    .sequence();
                seen[flow_of[&from.port()]].push(seq);
                received.fetch_add(1, Ordering::Relaxed);
            }
            seen
        })
    };
    let (at_a, at_b) = (receiver(ga.clone()), receiver(gb.clone()));

    // Churn: calls bridged, used and released while the 5,000 run.
    let stop_churn = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (relay, stop) = (relay.clone(), stop_churn.clone());
        std::thread::spawn(move || {
            let (x, y) = (sock(), sock());
            let (mut cycles, mut delivered) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let (px, py) = (
                    relay.allocate_port().unwrap(),
                    relay.allocate_port().unwrap(),
                );
                relay
                    .bridge_udp(
                        (px, x.local_addr().unwrap()),
                        (py, y.local_addr().unwrap()),
                        Arc::new(FlowStats::default()),
                    )
                    .unwrap();
                x.send_to(&rtp(1), ("127.0.0.1", px)).unwrap();
                if recv(&y).is_some() {
                    delivered += 1;
                }
                relay.release(&[px, py], &[]);
                cycles += 1;
            }
            (cycles, delivered)
        })
    };

    let mut sent = 0u64;
    for round in 0..ROUNDS {
        for &(pa, pb) in &ports {
            while sent - received.load(Ordering::Relaxed) >= WINDOW {
                std::thread::yield_now();
            }
            ga.send_to(&rtp(round), ("127.0.0.1", pa)).unwrap();
            gb.send_to(&rtp(round), ("127.0.0.1", pb)).unwrap();
            sent += 2;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < sent && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop_churn.store(true, Ordering::Relaxed);
    let (cycles, delivered) = churn.join().unwrap();
    done.store(true, Ordering::Relaxed);
    let (seen_a, seen_b) = (at_a.join().unwrap(), at_b.join().unwrap());

    let expected: Vec<u16> = (0..ROUNDS).collect();
    let mut bad = Vec::new();
    for (i, (a, b)) in seen_a.iter().zip(&seen_b).enumerate() {
        if *a != expected || *b != expected {
            bad.push((i, a.clone(), b.clone()));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {FLOWS} flows lost or reordered packets (first: {:?}); {} of {sent} received",
        bad.len(),
        bad.first(),
        received.load(Ordering::Relaxed)
    );
    assert!(cycles >= 20, "churn ran only {cycles} add/remove cycles");
    assert_eq!(delivered, cycles, "churned calls forwarded their media too");
    relay.stop();
}

/// A loopback socket on an even port, and one on the port above it (an RTP/RTCP pair).
fn sock_pair() -> (UdpSocket, UdpSocket) {
    loop {
        let rtp = sock();
        let port = rtp.local_addr().unwrap().port();
        if port.is_multiple_of(2)
            && let Ok(rtcp) = UdpSocket::bind(("127.0.0.1", port + 1))
        {
            rtcp.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            return (rtp, rtcp);
        }
    }
}

/// Peers that do not multiplex RTCP send it to the RTP port + 1: it is relayed between
/// the ports above the bridged RTP ports, latched like RTP, and not counted as media.
#[test]
fn rtcp_on_separate_ports_is_relayed_between_the_ports_above() {
    let relay = relay();
    let (pa, pb) = ports_on_two_workers(&relay);
    let ((caller, caller_rtcp), (callee, callee_rtcp)) = (sock_pair(), sock_pair());
    let stats = Arc::new(FlowStats::default());
    relay
        .bridge_udp(
            (pa, caller.local_addr().unwrap()),
            (pb, callee.local_addr().unwrap()),
            stats.clone(),
        )
        .unwrap();
    caller.send_to(&rtp(1), ("127.0.0.1", pa)).unwrap();
    assert_eq!(recv(&callee).map(|r| r.0), Some(rtp(1)));

    // A sender report (PT 200) from the caller's RTCP port, and a receiver report back.
    let mut sr = vec![0x80, 200, 0, 6, 0, 0, 0x12, 0x34];
    sr.extend_from_slice(&[7; 20]);
    caller_rtcp.send_to(&sr, ("127.0.0.1", pa + 1)).unwrap();
    let (got, from) = recv(&callee_rtcp).expect("RTCP relayed to the callee's RTCP port");
    assert_eq!((got, from.port()), (sr.clone(), pb + 1));
    let rr = [0x80, 201, 0, 1, 0, 0, 0x56, 0x78];
    callee_rtcp.send_to(&rr, ("127.0.0.1", pb + 1)).unwrap();
    let (got, from) = recv(&caller_rtcp).expect("RTCP relayed back");
    assert_eq!((got, from.port()), (rr.to_vec(), pa + 1));
    // Latched like RTP: another source on the RTCP port goes nowhere.
    sock().send_to(&sr, ("127.0.0.1", pa + 1)).unwrap();
    assert!(recv(&callee_rtcp).is_none());
    assert_eq!(
        stats.caller_to_callee.load(Ordering::Relaxed),
        1,
        "RTCP is not counted as media"
    );
    relay.release(&[pa, pb], &[]);
    relay.stop();
}

/// `max_ports_per_worker`: a worker at its cap takes no more legs (the other worker's
/// ports are used first); when all are at their cap the call gets `PortsExhausted` (503),
/// and a released leg makes room again.
#[test]
fn workers_at_their_port_cap_refuse_more_legs() {
    let base = base_port(60) & !1;
    let relay = Relay::start(RelaySettings {
        max_ports_per_worker: 2,
        ..RelaySettings::loopback(base, base + 50, 2)
    })
    .unwrap();
    let got: Vec<u16> = (0..4).map(|_| relay.allocate_port().unwrap()).collect();
    let per_worker = |w: u16| got.iter().filter(|p| (**p / 2) % 2 == w).count();
    assert_eq!((per_worker(0), per_worker(1)), (2, 2), "{got:?}");
    assert!(matches!(
        relay.allocate_port(),
        Err(parley_actors::messages::MediaError::PortsExhausted)
    ));
    relay.release(&got[..1], &[]);
    assert_eq!(
        relay.allocate_port().ok().map(|p| (p / 2) % 2),
        Some((got[0] / 2) % 2)
    );
    relay.stop();
}

/// Only a source with the signalled IP address may latch a port (any port number: peers
/// often send from another port than the one in their SDP); a third party sending first
/// from elsewhere is dropped and cannot take the call's media. `latch_any_source` lets
/// any first source latch (peers behind NAT).
#[test]
fn only_the_signalled_ip_may_latch_unless_any_source_is_allowed() {
    let other_host = || {
        let s = UdpSocket::bind("127.0.0.2:0").expect("127.0.0.2 is loopback on Linux");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    };
    for any in [false, true] {
        let base = base_port(60);
        let relay = Relay::start(RelaySettings {
            latch_any_source: any,
            ..RelaySettings::loopback(base, base + 50, 2)
        })
        .unwrap();
        // The caller's SDP names one port; it sends from another on the same host. Both
        // legs on one worker: the latch retargets the other leg at once (across workers it
        // takes a queued command; `latching_on_one_worker_…` covers that).
        let (caller_sdp, caller_real, callee, intruder) = (sock(), sock(), sock(), other_host());
        let (pa, pb, _) = bridged(&relay, &caller_sdp, &callee);
        intruder.send_to(&rtp(66), ("127.0.0.1", pa)).unwrap();
        let first = recv(&callee).map(|r| r.0);
        caller_real.send_to(&rtp(1), ("127.0.0.1", pa)).unwrap();
        let second = recv(&callee).map(|r| r.0);
        if any {
            assert_eq!(first, Some(rtp(66)), "any source latches");
            assert_eq!(second, None, "and then holds the port");
        } else {
            assert_eq!(first, None, "another host cannot latch");
            assert_eq!(
                second,
                Some(rtp(1)),
                "the signalled host latches from any port"
            );
            // The callee's media goes where the caller really sends from.
            callee.send_to(&rtp(2), ("127.0.0.1", pb)).unwrap();
            assert_eq!(recv(&caller_real).map(|r| r.0), Some(rtp(2)));
        }
        relay.release(&[pa, pb], &[]);
        relay.stop();
    }
}

/// A call's second leg is allocated on its first leg's worker while that worker has
/// ports (and its cap allows), then anywhere.
#[test]
fn a_calls_second_leg_lands_on_the_first_legs_worker() {
    let relay = relay();
    for _ in 0..5 {
        let a = relay.allocate_port().unwrap();
        let b = relay.allocate_port_near(a).unwrap();
        assert_eq!((a / 2) % 2, (b / 2) % 2, "{a} and {b}");
    }
    relay.stop();
    // With a cap of one leg per worker, the second leg has to go to the other worker.
    let base = base_port(60);
    let capped = Relay::start(RelaySettings {
        max_ports_per_worker: 1,
        ..RelaySettings::loopback(base, base + 50, 2)
    })
    .unwrap();
    let a = capped.allocate_port().unwrap();
    let b = capped.allocate_port_near(a).unwrap();
    assert_ne!((a / 2) % 2, (b / 2) % 2);
    capped.stop();
}

/// After a source change, RTCP sent on the separate RTCP port carries the SSRC the far
/// side knows, like the RTP it describes.
#[test]
fn rtcp_on_the_port_above_follows_the_streams_ssrc_after_a_source_change() {
    use parley_codecs::rtp::RtpView;
    let relay = relay();
    let ((old, _old_rtcp), (new, new_rtcp), (callee, callee_rtcp)) =
        (sock_pair(), sock_pair(), sock_pair());
    let (pa, pb, _) = bridged(&relay, &old, &callee);
    old.send_to(&rtp_from(0xaaaa, 1, 160), ("127.0.0.1", pa))
        .unwrap();
    assert!(recv(&callee).is_some());
    relay.repoint(pa, new.local_addr().unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    new.send_to(&rtp_from(0xbbbb, 9, 90_000), ("127.0.0.1", pa))
        .unwrap();
    let (p, _) = recv(&callee).expect("new source relayed");
    assert_eq!(RtpView::parse(&p).unwrap().ssrc(), 0xaaaa);
    // A sender report of the new source, on its RTCP port.
    let mut sr = vec![0x80, 200, 0, 6, 0, 0, 0xbb, 0xbb];
    sr.extend_from_slice(&[3; 20]);
    new_rtcp.send_to(&sr, ("127.0.0.1", pa + 1)).unwrap();
    let (got, from) = recv(&callee_rtcp).expect("RTCP relayed");
    assert_eq!(from.port(), pb + 1);
    assert_eq!(RtpView::parse(&got).unwrap().ssrc(), 0xaaaa, "{got:?}");
    assert_eq!(&got[8..], &sr[8..], "only the SSRC is rewritten");
    relay.release(&[pa, pb], &[]);
    relay.stop();
}

/// The kernel fast path keys flows by the relay's own address: on `0.0.0.0` it cannot,
/// so `auto` relays in userspace and `required` refuses to start, saying why.
#[test]
fn kernel_mode_on_an_unspecified_address_is_userspace_or_an_error() {
    use super::KernelMode;
    let base = base_port(10) & !1;
    let on = |kernel| {
        Relay::start(RelaySettings {
            ip: [0, 0, 0, 0].into(),
            kernel,
            ..RelaySettings::loopback(base, base + 3, 1)
        })
    };
    let auto = on(KernelMode::Auto).expect("auto falls back to userspace");
    assert!(auto.kernel().is_none());
    auto.stop();
    let err = on(KernelMode::Required).expect_err("required cannot start");
    let text = err.to_string();
    assert!(
        text.contains("[relay] kernel = \"required\"") && text.contains("0.0.0.0"),
        "{text}"
    );
}
