//! RTP-over-QUIC datagrams from devices: decode, and re-encode what decoded.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use parley_codecs::roq;

fuzz_target!(|data: &[u8]| {
    if let Ok((flow, pkt)) = roq::decode(data) {
        let mut out = BytesMut::new();
        roq::encode(flow, pkt, &mut out);
        assert_eq!(roq::decode(&out).ok(), Some((flow, pkt)), "round trip");
    }
});
