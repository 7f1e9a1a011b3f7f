//! RTP/RTCP packets through the relay's per-stream rewrite: the input is a sequence of
//! packets, each prefixed by a length byte, applied to one `Continuity` as one stream's
//! packets arriving 20 ms apart.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use parley_codecs::rtp::{Continuity, RtpView, rewrite_rtcp_ssrc};

fuzz_target!(|data: &[u8]| {
    let mut c = Continuity::default();
    let t0 = Instant::now();
    let mut rest = data;
    let mut i = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        let mut pkt = tail[..n].to_vec();
        rest = &tail[n..];
        let _ = RtpView::parse(&pkt);
        let _ = c.apply(&mut pkt, t0 + Duration::from_millis(20 * i));
        if let Some(map) = c.ssrc_map() {
            rewrite_rtcp_ssrc(&mut pkt, map);
        }
        i += 1;
    }
});
