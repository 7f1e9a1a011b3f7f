//! A borrowed view of an RTP or RTCP packet's fixed header.
//!
//! The relay reads the payload type, sequence number, timestamp and SSRC and may rewrite
//! them in place; nothing else of the packet is touched, so no allocation and no copy.

use crate::CodecError;

/// Size of the fixed RTP header.
pub const RTP_HEADER_LEN: usize = 12;

/// What a packet on an RTP port is, by RFC 5761 §4 (RTP/RTCP multiplexing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// RTP media.
    Rtp,
    /// RTCP (packet types 192–223 in the second byte).
    Rtcp,
}

/// Validated view of an RTP/RTCP packet.
#[derive(Debug, Clone, Copy)]
pub struct RtpView<'a> {
    buf: &'a [u8],
}

impl<'a> RtpView<'a> {
    /// Validates version and minimum length.
    ///
    /// RTCP packets are accepted too (they share the version bits); see [`Self::kind`].
    pub fn parse(buf: &'a [u8]) -> Result<Self, CodecError> {
        if buf.len() < 8 {
            return Err(CodecError::Truncated {
                what: "RTP",
                len: buf.len(),
            });
        }
        let version = buf[0] >> 6;
        if version != 2 {
            return Err(CodecError::RtpVersion(version));
        }
        let view = Self { buf };
        if view.kind() == Kind::Rtp {
            let csrc = usize::from(buf[0] & 0x0f) * 4;
            if buf.len() < RTP_HEADER_LEN + csrc {
                return Err(CodecError::Truncated {
                    what: "RTP",
                    len: buf.len(),
                });
            }
        }
        Ok(view)
    }

    /// RTP or RTCP.
    pub fn kind(&self) -> Kind {
        if (192..=223).contains(&self.buf[1]) {
            Kind::Rtcp
        } else {
            Kind::Rtp
        }
    }

    /// The 7-bit payload type (RTP only).
    pub fn payload_type(&self) -> u8 {
        self.buf[1] & 0x7f
    }

    /// The marker bit.
    pub fn marker(&self) -> bool {
        self.buf[1] & 0x80 != 0
    }

    /// The sequence number (RTP only).
    pub fn sequence(&self) -> u16 {
        u16::from_be_bytes([self.buf[2], self.buf[3]])
    }

    /// The media timestamp (RTP only).
    pub fn timestamp(&self) -> u32 {
        u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]])
    }

    /// The sender's SSRC (RTP; for RTCP this is the sender SSRC at the same offset).
    pub fn ssrc(&self) -> u32 {
        let b = self.buf;
        if self.kind() == Kind::Rtcp {
            u32::from_be_bytes([b[4], b[5], b[6], b[7]])
        } else if b.len() >= RTP_HEADER_LEN {
            u32::from_be_bytes([b[8], b[9], b[10], b[11]])
        } else {
            0
        }
    }

    /// The media payload: after the fixed header, the CSRC list and a header extension
    /// (X bit), without padding (P bit). A packet whose extension or padding runs past
    /// its end has an empty payload.
    pub fn payload(&self) -> &'a [u8] {
        let mut start = RTP_HEADER_LEN + usize::from(self.buf[0] & 0x0f) * 4;
        if self.buf[0] & 0x10 != 0 {
            // RFC 3550 5.3.1: 16-bit profile word, 16-bit length in 32-bit words.
            let Some(len) = self.buf.get(start + 2..start + 4) else {
                return &[];
            };
            start += 4 + usize::from(u16::from_be_bytes([len[0], len[1]])) * 4;
        }
        let mut end = self.buf.len();
        if self.buf[0] & 0x20 != 0 {
            let pad = usize::from(self.buf[end - 1]);
            end = end.saturating_sub(pad);
        }
        self.buf.get(start..end).unwrap_or(&[])
    }
}

/// Writes a minimal RTP header (no CSRC, no extension) into `out`.
pub fn write_header(
    out: &mut [u8; RTP_HEADER_LEN],
    pt: u8,
    marker: bool,
    seq: u16,
    ts: u32,
    ssrc: u32,
) {
    out[0] = 0x80;
    out[1] = (pt & 0x7f) | if marker { 0x80 } else { 0 };
    out[2..4].copy_from_slice(&seq.to_be_bytes());
    out[4..8].copy_from_slice(&ts.to_be_bytes());
    out[8..12].copy_from_slice(&ssrc.to_be_bytes());
}

/// RTP clock rate of a payload type, for the static types of RFC 3551 §6; dynamic types
/// (96–127) are taken as 8 kHz, the telephony rate (only used to advance the timestamp
/// across a source change, where an estimate is enough).
pub fn clock_rate(pt: u8) -> u32 {
    match pt {
        6 => 16_000,
        10 | 11 => 44_100,
        16 => 11_025,
        17 => 22_050,
        25 | 26 | 28 | 31..=34 => 90_000,
        _ => 8_000,
    }
}

/// Rewrites an RTCP packet's sender SSRC `map.0` to `map.1` (see
/// [`Continuity::ssrc_map`]); other packets are left alone.
pub fn rewrite_rtcp_ssrc(pkt: &mut [u8], map: (u32, u32)) {
    if let Ok(v) = RtpView::parse(pkt)
        && v.kind() == Kind::Rtcp
        && v.ssrc() == map.0
    {
        pkt[4..8].copy_from_slice(&map.1.to_be_bytes());
    }
}

/// Keeps one outgoing RTP stream continuous when the source behind it changes.
///
/// A B2BUA relays one stream per direction toward a peer (a gateway, a trunk) that expects
/// one SSRC with consecutive sequence numbers and a timestamp that follows the clock. When
/// the source behind that stream changes mid-call (a re-INVITE moved the far end, a leg
/// was re-routed, a device restarted its stream), packets arrive with a new SSRC and new
/// sequence and timestamp bases. `Continuity` maps them onto the stream the peer already
/// knows: the first SSRC is kept, the sequence number goes on at last + 1, the timestamp at
/// last + the time elapsed since the previous packet (at least one packet's worth), and the
/// first packet of the new source carries the marker bit (a new talkspurt, RFC 3551 §4.1),
/// so the receiver's jitter buffer re-syncs instead of seeing a new stream. RTCP sender
/// SSRCs of the current source are rewritten to match.
///
/// The state is a few words per stream; a packet of an unchanged source is only read.
/// Sans-IO: time is passed in.
#[derive(Debug, Clone, Default)]
pub struct Continuity {
    stream: Option<Stream>,
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    /// SSRC of the current source.
    in_ssrc: u32,
    /// SSRC the peer sees (the first source's).
    out_ssrc: u32,
    /// Added (wrapping) to the current source's sequence numbers.
    seq_delta: u16,
    /// Added (wrapping) to the current source's timestamps.
    ts_delta: u32,
    /// Highest sequence number sent (rewritten), and its timestamp.
    last_seq: u16,
    last_ts: u32,
    /// Timestamp increment between two consecutive packets (0 until seen).
    step: u32,
    /// When `last_seq` was sent.
    last_at: std::time::Instant,
    /// Source changes so far.
    switches: u32,
}

impl Stream {
    fn rewrites(&self) -> bool {
        self.seq_delta != 0 || self.ts_delta != 0 || self.in_ssrc != self.out_ssrc
    }
}

impl Continuity {
    /// Validates `pkt` (as [`RtpView::parse`]) and rewrites it in place if needed, so the
    /// relay checks and maps a packet in one pass. Returns `Ok(true)` when this packet
    /// started a new source (and was mapped onto the stream); an invalid packet is left
    /// alone and the state unchanged.
    pub fn apply(&mut self, pkt: &mut [u8], now: std::time::Instant) -> Result<bool, CodecError> {
        let view = RtpView::parse(pkt)?;
        if view.kind() == Kind::Rtcp {
            if let Some(st) = &self.stream
                && st.in_ssrc != st.out_ssrc
                && view.ssrc() == st.in_ssrc
            {
                pkt[4..8].copy_from_slice(&st.out_ssrc.to_be_bytes());
            }
            return Ok(false);
        }
        let (ssrc, seq, ts, pt) = (
            view.ssrc(),
            view.sequence(),
            view.timestamp(),
            view.payload_type(),
        );
        let Some(st) = &mut self.stream else {
            self.stream = Some(Stream {
                in_ssrc: ssrc,
                out_ssrc: ssrc,
                seq_delta: 0,
                ts_delta: 0,
                last_seq: seq,
                last_ts: ts,
                step: 0,
                last_at: now,
                switches: 0,
            });
            return Ok(false);
        };
        let switched = ssrc != st.in_ssrc;
        if switched {
            // Map the new source onto the stream: next sequence number, timestamp advanced
            // by the wall-clock gap (never less than one packet's worth).
            let gap = now.saturating_duration_since(st.last_at);
            let elapsed = (gap.as_micros() as u64 * u64::from(clock_rate(pt)) / 1_000_000)
                .min(u64::from(u32::MAX / 2)) as u32;
            let advance = elapsed.max(st.step).max(1);
            let out_seq = st.last_seq.wrapping_add(1);
            let out_ts = st.last_ts.wrapping_add(advance);
            st.seq_delta = out_seq.wrapping_sub(seq);
            st.ts_delta = out_ts.wrapping_sub(ts);
            st.in_ssrc = ssrc;
            st.switches += 1;
        }
        let out_seq = seq.wrapping_add(st.seq_delta);
        let out_ts = ts.wrapping_add(st.ts_delta);
        // Only packets newer than the last one move the reference (reordering and
        // duplicates are passed through, rewritten the same way).
        let ahead = out_seq.wrapping_sub(st.last_seq);
        if switched || (ahead != 0 && ahead < 0x8000) {
            if ahead == 1 && !switched {
                let d = out_ts.wrapping_sub(st.last_ts);
                if d != 0 && d < 0x8000_0000 {
                    st.step = d;
                }
            }
            st.last_seq = out_seq;
            st.last_ts = out_ts;
            st.last_at = now;
        }
        if st.rewrites() {
            pkt[2..4].copy_from_slice(&out_seq.to_be_bytes());
            pkt[4..8].copy_from_slice(&out_ts.to_be_bytes());
            pkt[8..12].copy_from_slice(&st.out_ssrc.to_be_bytes());
            if switched {
                pkt[1] |= 0x80;
            }
        }
        Ok(switched)
    }

    /// `(current source's SSRC, SSRC the peer sees)` while they differ: what RTCP sent
    /// beside this stream on a separate port must be rewritten with
    /// ([`rewrite_rtcp_ssrc`]).
    pub fn ssrc_map(&self) -> Option<(u32, u32)> {
        self.stream
            .filter(|s| s.in_ssrc != s.out_ssrc)
            .map(|s| (s.in_ssrc, s.out_ssrc))
    }

    /// How many times the source changed.
    pub fn switches(&self) -> u32 {
        self.stream.map_or(0, |s| s.switches)
    }

    /// How the current source's packets are mapped onto the stream (`None` before the
    /// first packet): what a fast path forwarding this stream must apply to them.
    pub fn mapping(&self) -> Option<Mapping> {
        self.stream.map(|s| Mapping {
            in_ssrc: s.in_ssrc,
            out_ssrc: s.out_ssrc,
            seq_delta: s.seq_delta,
            ts_delta: s.ts_delta,
        })
    }

    /// Packets of the current source were forwarded elsewhere (a kernel fast path), the
    /// last one leaving as `(seq, ts)` with SSRC `out_ssrc`: the stream is there now, so a
    /// new source is mapped on from that point. Ignored if the stream is not the one the
    /// fast path carried (another output SSRC) or the position is older than ours.
    pub fn caught_up(&mut self, out_ssrc: u32, seq: u16, ts: u32, now: std::time::Instant) {
        let Some(st) = &mut self.stream else {
            return;
        };
        let ahead = seq.wrapping_sub(st.last_seq);
        if st.out_ssrc == out_ssrc && ahead != 0 && ahead < 0x8000 {
            st.last_seq = seq;
            st.last_ts = ts;
            st.last_at = now;
        }
    }
}

/// How one source's packets are mapped onto the stream a peer sees: SSRC replaced,
/// sequence numbers and timestamps shifted (wrapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The source's SSRC.
    pub in_ssrc: u32,
    /// The SSRC the peer sees.
    pub out_ssrc: u32,
    /// Added to the source's sequence numbers.
    pub seq_delta: u16,
    /// Added to the source's timestamps.
    pub ts_delta: u32,
}

impl Mapping {
    /// Whether packets change at all.
    pub fn rewrites(&self) -> bool {
        self.seq_delta != 0 || self.ts_delta != 0 || self.in_ssrc != self.out_ssrc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn agrees_with_the_rtp_crate() {
        use rtp::packet::Packet;
        use webrtc_util::marshal::Unmarshal as _;
        let mut buf = [0u8; 12];
        write_header(&mut buf, 8, true, 513, 160_000, 0xdead_beef);
        let mut pkt = buf.to_vec();
        pkt.extend_from_slice(&[0xd5; 160]);
        let theirs = Packet::unmarshal(&mut &pkt[..]).unwrap();
        let ours = RtpView::parse(&pkt).unwrap();
        assert_eq!(ours.kind(), Kind::Rtp);
        assert_eq!(ours.payload_type(), theirs.header.payload_type);
        assert_eq!(ours.marker(), theirs.header.marker);
        assert_eq!(ours.sequence(), theirs.header.sequence_number);
        assert_eq!(ours.timestamp(), theirs.header.timestamp);
        assert_eq!(ours.ssrc(), theirs.header.ssrc);
        assert_eq!(ours.payload(), &theirs.payload[..]);
        // With a header extension (one 32-bit word) and 3 bytes of padding.
        let mut ext = buf.to_vec();
        ext[0] |= 0x30;
        ext.extend_from_slice(&[0xbe, 0xde, 0x00, 0x01, 0x10, 0xaa, 0x00, 0x00]);
        ext.extend_from_slice(&[0xd5; 160]);
        ext.extend_from_slice(&[0, 0, 3]);
        let theirs = Packet::unmarshal(&mut &ext[..]).unwrap();
        let ours = RtpView::parse(&ext).unwrap();
        assert_eq!(ours.payload(), &theirs.payload[..]);
        assert_eq!(ours.payload(), &[0xd5; 160][..]);
        // Extension or padding past the end: empty, no panic.
        let mut bad = buf.to_vec();
        bad[0] |= 0x10;
        bad.extend_from_slice(&[0xbe, 0xde, 0x00, 0x09, 1, 2]);
        assert!(RtpView::parse(&bad).unwrap().payload().is_empty());
        let mut pad = buf.to_vec();
        pad[0] |= 0x20;
        pad.push(200);
        assert!(RtpView::parse(&pad).unwrap().payload().is_empty());
    }

    #[test]
    fn rejects_short_and_wrong_version() {
        assert!(matches!(
            RtpView::parse(&[0x80, 0, 0]),
            Err(CodecError::Truncated { .. })
        ));
        assert_eq!(
            RtpView::parse(&[0x40; 12]).unwrap_err(),
            CodecError::RtpVersion(1)
        );
        // CSRC count says 15 entries but the packet is only the fixed header.
        assert!(RtpView::parse(&[0x8f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn rtcp_is_recognised() {
        // Receiver report, PT 201.
        let rr = [0x80, 201, 0, 1, 0, 0, 0, 42];
        let v = RtpView::parse(&rr).unwrap();
        assert_eq!(v.kind(), Kind::Rtcp);
        assert_eq!(v.ssrc(), 42);
    }

    fn packet(ssrc: u32, seq: u16, ts: u32) -> Vec<u8> {
        let mut h = [0u8; RTP_HEADER_LEN];
        write_header(&mut h, 0, false, seq, ts, ssrc);
        let mut p = h.to_vec();
        p.extend_from_slice(&[0xff; 160]);
        p
    }

    #[test]
    fn continuity_maps_a_new_source_onto_the_stream() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let mut c = Continuity::default();
        // First source: passed through untouched.
        for i in 0..10u16 {
            let mut p = packet(0x1111, 100 + i, 8_000 + 160 * u32::from(i));
            let before = p.clone();
            assert_eq!(
                c.apply(&mut p, t0 + Duration::from_millis(20 * u64::from(i))),
                Ok(false)
            );
            assert_eq!(p, before);
        }
        // A new source 100 ms after the last packet, with its own bases.
        let at = t0 + Duration::from_millis(180 + 100);
        let mut p = packet(0x2222, 60_000, 4_000_000);
        assert_eq!(c.apply(&mut p, at), Ok(true));
        let v = RtpView::parse(&p).unwrap();
        assert_eq!(v.ssrc(), 0x1111);
        assert_eq!(v.sequence(), 110);
        assert!(v.marker(), "a new talkspurt starts");
        // 100 ms at 8 kHz after the last timestamp.
        assert_eq!(v.timestamp(), 8_000 + 160 * 9 + 800);
        // Its next packets follow on, across the new source's sequence wrap.
        for i in 1..=5536u16 {
            let mut p = packet(
                0x2222,
                60_000u16.wrapping_add(i),
                4_000_000 + 160 * u32::from(i),
            );
            assert_eq!(
                c.apply(&mut p, at + Duration::from_millis(20 * u64::from(i))),
                Ok(false)
            );
            let v = RtpView::parse(&p).unwrap();
            assert_eq!(v.ssrc(), 0x1111);
            assert_eq!(v.sequence(), 110u16.wrapping_add(i));
            assert_eq!(v.timestamp(), 8_000 + 160 * 9 + 800 + 160 * u32::from(i));
            assert!(!v.marker());
        }
        // RTCP of the current source carries the stream's SSRC too.
        let mut rr = vec![0x80, 201, 0, 1, 0, 0, 0x22, 0x22];
        assert_eq!(c.apply(&mut rr, at), Ok(false));
        assert_eq!(RtpView::parse(&rr).unwrap().ssrc(), 0x1111);
        assert_eq!(c.switches(), 1);
    }

    /// A fast path forwarded the stream meanwhile: a new source then follows on from where
    /// the fast path left it, not from the last packet this state saw itself.
    #[test]
    fn continuity_picks_up_where_a_fast_path_left_the_stream() {
        use std::time::{Duration, Instant};
        let t = Instant::now();
        let mut c = Continuity::default();
        assert_eq!(c.mapping(), None);
        let _ = c.apply(&mut packet(7, 100, 16_000), t);
        let m = c.mapping().unwrap();
        assert_eq!((m.in_ssrc, m.out_ssrc, m.rewrites()), (7, 7, false));
        // 500 packets later (the kernel's record of the last one)...
        c.caught_up(7, 600, 16_000 + 500 * 160, t + Duration::from_secs(10));
        // ...a stale or foreign position changes nothing.
        c.caught_up(7, 590, 0, t);
        c.caught_up(9, 700, 0, t);
        let mut p = packet(8, 5, 0);
        assert_eq!(
            c.apply(
                &mut p,
                t + Duration::from_secs(10) + Duration::from_millis(20)
            ),
            Ok(true)
        );
        let v = RtpView::parse(&p).unwrap();
        assert_eq!((v.ssrc(), v.sequence()), (7, 601));
        assert_eq!(v.timestamp(), 16_000 + 500 * 160 + 160);
        let m = c.mapping().unwrap();
        assert_eq!((m.in_ssrc, m.out_ssrc, m.seq_delta), (8, 7, 596));
        assert!(m.rewrites());
    }

    #[test]
    fn continuity_advances_at_least_one_packet_on_an_immediate_switch() {
        use std::time::Instant;
        let t = Instant::now();
        let mut c = Continuity::default();
        for i in 0..3u16 {
            let _ = c.apply(&mut packet(7, i, 160 * u32::from(i)), t);
        }
        let mut p = packet(8, 9_000, 0);
        assert_eq!(c.apply(&mut p, t), Ok(true));
        let v = RtpView::parse(&p).unwrap();
        assert_eq!((v.ssrc(), v.sequence(), v.timestamp()), (7, 3, 480));
        // Late packets of the old source are not "new sources" again once seen; a second
        // switch back maps onto the stream as well.
        let mut back = packet(7, 3, 480);
        assert_eq!(c.apply(&mut back, t), Ok(true));
        let v = RtpView::parse(&back).unwrap();
        assert_eq!((v.ssrc(), v.sequence()), (7, 4));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(v) = RtpView::parse(&data) {
                let _ = (v.kind(), v.payload_type(), v.sequence(), v.timestamp(), v.ssrc(), v.payload());
            }
        }
    }
}
