//! The relay's per-packet work in this crate, on 172-byte G.711 RTP packets (12-byte
//! header + 160 bytes: 20 ms of PCMU), 32 packets per iteration (one `recvmmsg` batch):
//!
//! - `rtp_view`: `RtpView::parse` plus the reads the relay makes (payload type, marker,
//!   sequence number, timestamp, SSRC, payload).
//! - `continuity`: `Continuity::apply` on a steady stream (one source: the common case,
//!   packets are only read) and on a stream after a source change (every packet's
//!   sequence number, timestamp and SSRC rewritten). Each iteration first stamps the next
//!   32 sequence numbers, timestamps and the SSRC into the headers so the stream moves on
//!   as a real one does; `stamp_only` measures that alone, to subtract.
//! - `roq_encode`: `roq::encode` of each packet into one reused `BytesMut` (flow id 1000,
//!   a two-byte varint).
//!
//! Throughput is counted in packets, so criterion's `thrpt` is packets per second and the
//! time per packet is `time / 32`.
//!
//! ```text
//! cargo bench -p parley-codecs --bench relay_path
//! cargo bench -p parley-codecs --bench relay_path -- --warm-up-time 1 --measurement-time 2
//! ```

use std::hint::black_box;
use std::time::Instant;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use parley_codecs::roq;
use parley_codecs::rtp::{Continuity, RTP_HEADER_LEN, RtpView, write_header};

/// Packets per iteration: the relay reads up to this many per `recvmmsg`.
const BATCH: usize = 32;
/// 12-byte header + 20 ms of 8 kHz G.711.
const PKT_LEN: usize = RTP_HEADER_LEN + 160;
/// Samples per packet, the timestamp step.
const TS_STEP: u32 = 160;
const PCMU: u8 = 0;

type Packet = [u8; PKT_LEN];

/// One source's stream: where its next packet's header starts.
struct Source {
    ssrc: u32,
    seq: u16,
    ts: u32,
}

impl Source {
    fn new(ssrc: u32, seq: u16, ts: u32) -> Self {
        Self { ssrc, seq, ts }
    }

    /// A batch of this source's next packets (µ-law silence).
    fn batch(&mut self) -> Vec<Packet> {
        let mut batch = vec![[0xff; PKT_LEN]; BATCH];
        self.stamp(&mut batch);
        batch
    }

    /// Writes the next sequence numbers, timestamps and the SSRC into `batch`, as the
    /// sender would have: `Continuity` rewrites headers in place, and would otherwise see
    /// the same packets again (duplicates) or a different SSRC.
    fn stamp(&mut self, batch: &mut [Packet]) {
        for p in batch {
            let mut h = [0; RTP_HEADER_LEN];
            write_header(&mut h, PCMU, false, self.seq, self.ts, self.ssrc);
            p[..RTP_HEADER_LEN].copy_from_slice(&h);
            self.seq = self.seq.wrapping_add(1);
            self.ts = self.ts.wrapping_add(TS_STEP);
        }
    }
}

fn rtp_view(c: &mut Criterion) {
    let batch = Source::new(0x1234_5678, 1_000, 160_000).batch();
    let mut g = c.benchmark_group("rtp_view");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("parse_and_read_fields", |b| {
        b.iter(|| {
            for p in black_box(&batch) {
                if let Ok(v) = RtpView::parse(p) {
                    black_box((
                        v.payload_type(),
                        v.marker(),
                        v.sequence(),
                        v.timestamp(),
                        v.ssrc(),
                        v.payload().len(),
                    ));
                }
            }
        })
    });
    g.finish();
}

fn continuity(c: &mut Criterion) {
    // A fixed clock: the steady path only stores it, and reading the clock per packet
    // would be the bench's own cost (the relay reads it once per batch).
    let now = Instant::now();
    let mut g = c.benchmark_group("continuity");
    g.throughput(Throughput::Elements(BATCH as u64));

    g.bench_function("stamp_only", |b| {
        let mut src = Source::new(0x1111, 1_000, 160_000);
        let mut batch = src.batch();
        b.iter(|| {
            src.stamp(&mut batch);
            black_box(&mut batch);
        })
    });

    g.bench_function("steady_source", |b| {
        let mut src = Source::new(0x1111, 1_000, 160_000);
        let mut batch = src.batch();
        let mut cont = Continuity::default();
        for p in &mut batch {
            let _ = cont.apply(p, now);
        }
        b.iter(|| {
            src.stamp(&mut batch);
            for p in black_box(&mut batch).iter_mut() {
                let _ = black_box(cont.apply(p, now));
            }
        });
        assert_eq!(
            cont.switches(),
            0,
            "the steady stream never switched source"
        );
    });

    g.bench_function("after_source_change", |b| {
        let mut first = Source::new(0x1111, 1_000, 160_000);
        let mut cont = Continuity::default();
        for p in &mut first.batch() {
            let _ = cont.apply(p, now);
        }
        // A re-INVITE moved the far end: a new SSRC with its own bases, mapped onto the
        // stream from here on, so every later packet is rewritten.
        let mut src = Source::new(0x2222, 50_000, 9_000_000);
        let mut batch = src.batch();
        for p in &mut batch {
            let _ = cont.apply(p, now);
        }
        assert_eq!(cont.switches(), 1);
        b.iter(|| {
            src.stamp(&mut batch);
            for p in black_box(&mut batch).iter_mut() {
                let _ = black_box(cont.apply(p, now));
            }
        });
        assert_eq!(cont.switches(), 1, "only the one source change");
        assert_eq!(
            RtpView::parse(&batch[0]).map(|v| v.ssrc()),
            Ok(0x1111),
            "packets of the new source carry the stream's SSRC"
        );
    });
    g.finish();
}

fn roq_encode(c: &mut Criterion) {
    const FLOW: u64 = 1_000;
    let batch = Source::new(0x1234_5678, 1_000, 160_000).batch();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut g = c.benchmark_group("roq_encode");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("reused_bytesmut", |b| {
        b.iter(|| {
            for p in black_box(&batch) {
                roq::encode(FLOW, p, &mut out);
                black_box(&out[..]);
                out.clear();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, rtp_view, continuity, roq_encode);
criterion_main!(benches);
