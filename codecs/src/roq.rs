//! RTP over QUIC datagram framing.
//!
//! Every datagram is `flow-id (QUIC varint, RFC 9000 §16) || RTP-or-RTCP packet`. Flow ids
//! are assigned by the call signalling (`docs/protocol.md`); one flow carries one media
//! stream in both directions.

use bytes::{BufMut, BytesMut};

use crate::CodecError;

/// Largest value a QUIC varint can carry.
pub const MAX_VARINT: u64 = (1 << 62) - 1;

/// Appends `flow_id` as a QUIC varint, then `packet`.
///
/// `flow_id` above [`MAX_VARINT`] is clamped to it: flow ids are ours and never that large.
pub fn encode(flow_id: u64, packet: &[u8], out: &mut BytesMut) {
    out.reserve(8 + packet.len());
    put_varint(flow_id.min(MAX_VARINT), out);
    out.put_slice(packet);
}

/// Writes a QUIC variable-length integer.
pub fn put_varint(v: u64, out: &mut BytesMut) {
    if v < 1 << 6 {
        out.put_u8(v as u8);
    } else if v < 1 << 14 {
        out.put_u16(0x4000 | v as u16);
    } else if v < 1 << 30 {
        out.put_u32(0x8000_0000 | v as u32);
    } else {
        out.put_u64(0xc000_0000_0000_0000 | v);
    }
}

/// Splits a datagram into its flow id and the packet it carries.
pub fn decode(datagram: &[u8]) -> Result<(u64, &[u8]), CodecError> {
    let first = *datagram.first().ok_or(CodecError::Varint)?;
    let len = 1usize << (first >> 6);
    let head = datagram.get(..len).ok_or(CodecError::Varint)?;
    let mut v = u64::from(first & 0x3f);
    for b in &head[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Ok((v, &datagram[len..]))
}

/// How many bytes the varint for `v` takes.
pub fn varint_len(v: u64) -> usize {
    match v {
        0..=0x3f => 1,
        0x40..=0x3fff => 2,
        0x4000..=0x3fff_ffff => 4,
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 §A.1 sample encodings.
        let cases: [(&[u8], u64); 4] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (wire, value) in cases {
            assert_eq!(decode(wire).unwrap(), (value, &[][..]));
            let mut out = BytesMut::new();
            put_varint(value, &mut out);
            assert_eq!(&out[..], wire);
        }
    }

    #[test]
    fn truncated_varint_is_an_error() {
        assert_eq!(decode(&[]), Err(CodecError::Varint));
        assert_eq!(decode(&[0x40]), Err(CodecError::Varint));
        assert_eq!(decode(&[0xc0, 1, 2]), Err(CodecError::Varint));
    }

    proptest! {
        #[test]
        fn roundtrip(flow in 0..=MAX_VARINT, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = BytesMut::new();
            encode(flow, &payload, &mut out);
            prop_assert_eq!(out.len(), varint_len(flow) + payload.len());
            let (f, p) = decode(&out).unwrap();
            prop_assert_eq!(f, flow);
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..20)) {
            let _ = decode(&data);
        }
    }
}
