//! G.711 µ-law (PCMU, payload type 0) and A-law (PCMA, payload type 8).

/// RTP payload type of PCMU.
pub const PT_PCMU: u8 = 0;
/// RTP payload type of PCMA.
pub const PT_PCMA: u8 = 8;
/// Samples in a 20 ms G.711 frame at 8 kHz.
pub const SAMPLES_PER_20MS: usize = 160;

/// Encodes one linear sample as µ-law.
pub fn encode_ulaw(sample: i16) -> u8 {
    audio_codec_algorithms::encode_ulaw(sample)
}

/// Decodes one µ-law byte.
pub fn decode_ulaw(byte: u8) -> i16 {
    audio_codec_algorithms::decode_ulaw(byte)
}

/// Encodes one linear sample as A-law.
pub fn encode_alaw(sample: i16) -> u8 {
    audio_codec_algorithms::encode_alaw(sample)
}

/// Decodes one A-law byte.
pub fn decode_alaw(byte: u8) -> i16 {
    audio_codec_algorithms::decode_alaw(byte)
}

/// A sine tone at `freq_hz`, 8 kHz, `seconds` long, encoded with the codec of `pt`.
///
/// Used to make test media (SIPp's `rtp_stream` plays raw G.711 files).
pub fn tone(pt: u8, freq_hz: f64, seconds: f64) -> Vec<u8> {
    let n = (seconds * 8000.0) as usize;
    (0..n)
        .map(|i| {
            let s = (f64::from(i32::from(i16::MAX / 4))
                * (2.0 * std::f64::consts::PI * freq_hz * i as f64 / 8000.0).sin())
                as i16;
            if pt == PT_PCMA {
                encode_alaw(s)
            } else {
                encode_ulaw(s)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_and_roundtrip() {
        // The ITU code words for zero.
        assert_eq!(encode_ulaw(0), 0xff);
        assert_eq!(encode_alaw(0), 0xd5);
        for s in [-32000i16, -1000, -10, 0, 10, 1000, 32000] {
            let u = decode_ulaw(encode_ulaw(s));
            let a = decode_alaw(encode_alaw(s));
            // Companding error is bounded by the segment size (~3% of magnitude + small floor).
            assert!(
                (i32::from(u) - i32::from(s)).abs() <= i32::from(s).abs() / 16 + 8,
                "{s} {u}"
            );
            assert!(
                (i32::from(a) - i32::from(s)).abs() <= i32::from(s).abs() / 16 + 16,
                "{s} {a}"
            );
        }
    }

    #[test]
    fn tone_has_energy() {
        let t = tone(PT_PCMU, 440.0, 0.02);
        assert_eq!(t.len(), SAMPLES_PER_20MS);
        let peak = t
            .iter()
            .map(|b| decode_ulaw(*b).unsigned_abs())
            .max()
            .unwrap();
        assert!(peak > 4000, "{peak}");
    }
}
