//! SDP bodies as offers and re-offers: parse, read the direction, re-describe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_codecs::sdp;

fuzz_target!(|data: &[u8]| {
    let body = String::from_utf8_lossy(data);
    if let Ok((audio, video)) = sdp::parse_offer(&body) {
        let _ = (audio.first_g711(), audio.telephone_event(), audio.g711_formats());
        let _ = video.map(|v| v.formats.len());
    }
    let _ = sdp::parse_audio(&body);
    if let Ok(dir) = sdp::direction(&body) {
        let _ = sdp::redescribe(&body, dir.answer(), sdp::version(&body).unwrap_or(0));
    }
});
