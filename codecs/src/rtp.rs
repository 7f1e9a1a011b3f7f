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

    /// The payload after the fixed header and CSRC list (extensions are not skipped).
    pub fn payload(&self) -> &'a [u8] {
        let start = RTP_HEADER_LEN + usize::from(self.buf[0] & 0x0f) * 4;
        self.buf.get(start..).unwrap_or(&[])
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

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(v) = RtpView::parse(&data) {
                let _ = (v.kind(), v.payload_type(), v.sequence(), v.timestamp(), v.ssrc(), v.payload());
            }
        }
    }
}
