//! Sending one batch of 32 relayed packets (172-byte G.711 RTP) over loopback UDP, the
//! ways the relay worker can (`send_udp` in `switch/src/relay/worker.rs`):
//!
//! - `send_to_one_dest`: 32 `send_to` calls to one destination.
//! - `gso_one_dest`: the 32 packets copied into one buffer and sent with one GSO
//!   `sendmsg` (`UdpSocketState::try_send` with `segment_size`), copy included, as the
//!   worker does for a run of equal-sized packets to one peer.
//! - `send_to_32_dests`: 32 `send_to` calls from one socket to 32 destinations.
//! - `send_to_32_dests_32_sockets`: the same out of 32 sockets, one packet each: the
//!   relay's real case, where each flow (50 packets/s) leaves from its own port.
//! - `sendmmsg_32_dests`: one `sendmmsg` of 32 packets to 32 destinations: the best a
//!   design batching sends across destinations could do (one socket for all flows).
//! - `recvmmsg_32_one_socket`: one `recvmmsg` returning 32 queued datagrams: the receive
//!   side's best case.
//! - `recvfrom_empty`: 32 `recvfrom` on an empty non-blocking socket (each `EAGAIN`): about
//!   what a system call costs here before any packet work, the most a batching API
//!   (io_uring) could save per call.
//!
//! The last two bound what any userspace relay over the kernel's UDP sockets pays per
//! packet, whatever its design: see docs/BENCHMARKS.md ("the floor").
//!
//! Only the sends are timed (`iter_custom`). Between two timed batches the bench thread
//! drains every receiving socket, so their buffers never fill and no packet should be
//! dropped; a send that fails or a packet that never arrives is counted and reported on
//! stderr (it would make the send look cheaper than it is). On loopback the kernel
//! usually delivers each packet to the receiving socket inside the sender's syscall, so
//! these figures include the receive-side kernel path and no NIC driver: they compare
//! the options, they are not the cost on a real interface.
//!
//! The sending sockets are set up with `UdpSocketState::new`, as relay ports are; the
//! relay's receive-only socket options are left out (they do not touch sending).
//!
//! ```text
//! cargo bench -p parley-switch --bench udp_send
//! cargo bench -p parley-switch --bench udp_send -- --warm-up-time 1 --measurement-time 2
//! ```

use std::io::{ErrorKind, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quinn::udp::{Transmit, UdpSocketState};

/// Packets per batch: the relay reads up to this many per `recvmmsg`, and coalesces at
/// most this many into one GSO send.
const BATCH: usize = 32;
/// 12-byte RTP header + 20 ms of 8 kHz G.711.
const PKT_LEN: usize = 172;

/// A relay-like sending socket.
struct Sender {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl Sender {
    fn bind() -> Self {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback socket");
        // Sets non-blocking mode and the options quinn-udp wants, as on relay ports.
        let state = UdpSocketState::new((&sock).into()).expect("quinn-udp socket state");
        Self { sock, state }
    }
}

/// A destination, drained between timed batches.
struct Receiver {
    sock: UdpSocket,
    addr: SocketAddr,
}

impl Receiver {
    fn bind() -> Self {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback socket");
        sock.set_nonblocking(true).expect("non-blocking receiver");
        let addr = sock.local_addr().expect("bound socket has an address");
        Self { sock, addr }
    }

    /// Reads everything queued; returns how many datagrams that was.
    fn drain(&self, buf: &mut [u8]) -> u64 {
        let mut n = 0;
        loop {
            match self.sock.recv(buf) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return n,
            }
        }
    }
}

/// Packets sent and received over all of one bench's runs (warm-up included).
#[derive(Default)]
struct Tally {
    sent: u64,
    send_errors: u64,
    received: u64,
}

impl Tally {
    /// Drains the receivers one last time (packets may still be in flight) and reports
    /// any loss.
    fn report(mut self, name: &str, receivers: &[Receiver], buf: &mut [u8]) {
        std::thread::sleep(Duration::from_millis(50));
        self.received += receivers.iter().map(|r| r.drain(buf)).sum::<u64>();
        let lost = self.sent.saturating_sub(self.received);
        if self.send_errors > 0 || lost > 0 {
            eprintln!(
                "udp_send/{name}: {} send errors, {lost} of {} packets not received: \
                 the figure understates the send cost",
                self.send_errors, self.sent
            );
        }
    }
}

/// 32 RTP packets with consecutive sequence numbers (µ-law silence).
fn packets() -> Vec<[u8; PKT_LEN]> {
    (0..BATCH)
        .map(|i| {
            let mut p = [0xff; PKT_LEN];
            let mut h = [0; parley_codecs::rtp::RTP_HEADER_LEN];
            parley_codecs::rtp::write_header(&mut h, 0, false, i as u16, 160 * i as u32, 7);
            p[..h.len()].copy_from_slice(&h);
            p
        })
        .collect()
}

/// Times `send` (one batch) over `iters` batches, draining `receivers` after each.
fn timed(
    iters: u64,
    receivers: &[Receiver],
    tally: &mut Tally,
    buf: &mut [u8],
    mut send: impl FnMut(&mut Tally),
) -> Duration {
    let mut spent = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        send(tally);
        spent += start.elapsed();
        tally.received += receivers.iter().map(|r| r.drain(buf)).sum::<u64>();
    }
    spent
}

fn count(tally: &mut Tally, ok: bool, packets: usize) {
    tally.sent += packets as u64;
    if !ok {
        tally.send_errors += packets as u64;
    }
}

fn udp_send(c: &mut Criterion) {
    let pkts = packets();
    let mut buf = vec![0u8; 64 * 1024];
    let mut g = c.benchmark_group("udp_send_32x172");
    g.throughput(Throughput::Elements(BATCH as u64));

    {
        let tx = Sender::bind();
        let rx = [Receiver::bind()];
        let dest = rx[0].addr;
        let mut tally = Tally::default();
        g.bench_function("send_to_one_dest", |b| {
            b.iter_custom(|iters| {
                timed(iters, &rx, &mut tally, &mut buf, |t| {
                    for p in &pkts {
                        count(t, tx.sock.send_to(p, dest).is_ok(), 1);
                    }
                })
            })
        });
        tally.report("send_to_one_dest", &rx, &mut buf);
    }

    {
        let tx = Sender::bind();
        let rx = [Receiver::bind()];
        let dest = rx[0].addr;
        let max_gso = tx.state.max_gso_segments();
        if max_gso < BATCH {
            eprintln!("udp_send/gso_one_dest: skipped, GSO allows {max_gso} segments here");
        } else {
            let mut gso = vec![0u8; BATCH * PKT_LEN];
            let mut tally = Tally::default();
            g.bench_function("gso_one_dest", |b| {
                b.iter_custom(|iters| {
                    timed(iters, &rx, &mut tally, &mut buf, |t| {
                        let mut at = 0;
                        for p in &pkts {
                            gso[at..at + p.len()].copy_from_slice(p);
                            at += p.len();
                        }
                        let sent = tx.state.try_send(
                            (&tx.sock).into(),
                            &Transmit {
                                destination: dest,
                                ecn: None,
                                contents: &gso[..at],
                                segment_size: Some(PKT_LEN),
                                src_ip: None,
                            },
                        );
                        count(t, sent.is_ok(), BATCH);
                    })
                })
            });
            tally.report("gso_one_dest", &rx, &mut buf);
            // quinn-udp turns GSO off for good when the kernel rejects a GSO send.
            if tx.state.max_gso_segments() < BATCH {
                eprintln!("udp_send/gso_one_dest: GSO was disabled during the run");
            }
        }
    }

    {
        let tx = Sender::bind();
        let rx: Vec<Receiver> = (0..BATCH).map(|_| Receiver::bind()).collect();
        let mut tally = Tally::default();
        g.bench_function("send_to_32_dests", |b| {
            b.iter_custom(|iters| {
                timed(iters, &rx, &mut tally, &mut buf, |t| {
                    for (p, r) in pkts.iter().zip(&rx) {
                        count(t, tx.sock.send_to(p, r.addr).is_ok(), 1);
                    }
                })
            })
        });
        tally.report("send_to_32_dests", &rx, &mut buf);
    }

    {
        let tx: Vec<Sender> = (0..BATCH).map(|_| Sender::bind()).collect();
        let rx: Vec<Receiver> = (0..BATCH).map(|_| Receiver::bind()).collect();
        let mut tally = Tally::default();
        g.bench_function("send_to_32_dests_32_sockets", |b| {
            b.iter_custom(|iters| {
                timed(iters, &rx, &mut tally, &mut buf, |t| {
                    for ((p, s), r) in pkts.iter().zip(&tx).zip(&rx) {
                        count(t, s.sock.send_to(p, r.addr).is_ok(), 1);
                    }
                })
            })
        });
        tally.report("send_to_32_dests_32_sockets", &rx, &mut buf);
    }
    {
        // The best case of batching sends across destinations: one `sendmmsg` for 32
        // packets to 32 destinations (a relay with a socket per port cannot even do this;
        // it bounds what any batching design pays the kernel per packet sent).
        use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, sendmmsg};
        let tx = Sender::bind();
        let rx: Vec<Receiver> = (0..BATCH).map(|_| Receiver::bind()).collect();
        let addrs: Vec<Option<SockaddrIn>> = rx
            .iter()
            .map(|r| match r.addr {
                SocketAddr::V4(a) => Some(SockaddrIn::from(a)),
                SocketAddr::V6(_) => None,
            })
            .collect();
        let iovs: Vec<[IoSlice<'_>; 1]> = pkts.iter().map(|p| [IoSlice::new(p)]).collect();
        let mut headers: MultiHeaders<SockaddrIn> = MultiHeaders::preallocate(BATCH, None);
        let no_cmsgs: [ControlMessage<'_>; 0] = [];
        let mut tally = Tally::default();
        g.bench_function("sendmmsg_32_dests", |b| {
            b.iter_custom(|iters| {
                timed(iters, &rx, &mut tally, &mut buf, |t| {
                    let sent = sendmmsg(
                        tx.sock.as_raw_fd(),
                        &mut headers,
                        &iovs,
                        &addrs,
                        no_cmsgs,
                        MsgFlags::empty(),
                    )
                    .map(|r| r.count());
                    count(t, sent == Ok(BATCH), BATCH);
                })
            })
        });
        tally.report("sendmmsg_32_dests", &rx, &mut buf);
    }

    {
        // The receive side's best case: 32 datagrams already queued on one socket, read by
        // one `recvmmsg` (quinn-udp, as relay ports read). Only the read is timed.
        let rx = Sender::bind();
        let to = rx.sock.local_addr().expect("bound socket has an address");
        let tx = Sender::bind();
        let mut slots = vec![[0u8; 2048]; BATCH];
        let mut meta = [quinn::udp::RecvMeta::default(); BATCH];
        let mut short = 0u64;
        g.bench_function("recvmmsg_32_one_socket", |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    for p in &pkts {
                        let _ = tx.sock.send_to(p, to);
                    }
                    let mut iov: Vec<IoSliceMut<'_>> =
                        slots.iter_mut().map(|s| IoSliceMut::new(s)).collect();
                    let start = Instant::now();
                    let n = rx.state.recv((&rx.sock).into(), &mut iov, &mut meta);
                    spent += start.elapsed();
                    if n.ok() != Some(BATCH) {
                        short += 1;
                    }
                }
                spent
            })
        });
        if short > 0 {
            eprintln!("udp_send/recvmmsg_32_one_socket: {short} reads returned fewer than {BATCH}");
        }
    }

    {
        let rx = Receiver::bind();
        g.bench_function("recvfrom_empty", |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    let _ = std::hint::black_box(rx.sock.recv_from(&mut buf));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, udp_send);
criterion_main!(benches);
