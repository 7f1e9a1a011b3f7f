//! Parley's wire formats, with no I/O.
//!
//! - [`rtp`]: a zero-copy view of the fixed RTP header (RFC 3550) and the RTP/RTCP
//!   demultiplexing rule of RFC 5761, cheap enough for the relay hot path.
//! - [`roq`]: RTP over QUIC datagram framing (draft-ietf-avtcore-rtp-over-quic): a QUIC
//!   variable-length integer flow identifier followed by the RTP or RTCP packet.
//! - [`g711`]: µ-law and A-law sample conversion and a tone generator for test media.
//! - [`sdp`]: the SDP offer/answer subset a G.711 B2BUA needs (RFC 3264).
//! - [`control`]: the JSON control messages of the Parley IM protocol and their
//!   length-prefixed framing (`docs/protocol.md`).
//! - [`cdr_csv`]: carrier CDR files (Asterisk, FreeSWITCH, generic CSV), row by row.
//! - [`agent`]: the node ↔ auth agent protocol of federated tenants (`docs/auth.md`).
//!
//! Library choices: SDP is parsed with Mozilla's `webrtc-sdp` (the parser Firefox ships,
//! strict and fuzzed); answers are written by hand because the subset is tiny and must be
//! byte-exact. G.711 uses `audio-codec-algorithms` (ITU-T reference behaviour, no
//! dependencies). The RTP header view is our own: the relay needs to read and rewrite
//! four fields in place without allocating, which the `rtp` crate's owned `Packet` does not
//! offer; `rtp` is used in tests as an independent parser to check this one.
//!
//! ```
//! use parley_codecs::roq;
//! let mut buf = bytes::BytesMut::new();
//! roq::encode(7, &[0x80, 0, 0, 1], &mut buf);
//! let (flow, payload) = roq::decode(&buf).unwrap();
//! assert_eq!((flow, payload.len()), (7, 4));
//! ```

pub mod agent;
pub mod cdr_csv;
pub mod control;
pub mod g711;
pub mod roq;
pub mod rtp;
pub mod sdp;

/// Errors from parsing any of Parley's wire formats.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The packet is shorter than its header claims.
    #[error("truncated {what}: {len} bytes")]
    Truncated {
        /// Which format.
        what: &'static str,
        /// How many bytes there were.
        len: usize,
    },
    /// The RTP version field is not 2.
    #[error("RTP version {0} (expected 2)")]
    RtpVersion(u8),
    /// A QUIC variable-length integer does not fit the buffer.
    #[error("bad QUIC varint")]
    Varint,
    /// A control frame is larger than the protocol allows.
    #[error("control frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    /// A control message is not valid JSON of a known type.
    #[error("bad control message: {0}")]
    Control(String),
    /// SDP could not be parsed or has no usable media.
    #[error("bad SDP: {0}")]
    Sdp(String),
}
