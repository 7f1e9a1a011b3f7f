//! Load generator and endpoint simulator for Parley.
//!
//! [`storm`] places SIP calls as a PSTN gateway toward any SIP target (a Parley node, a
//! SIPp `uas`, another switch) at a set rate, and reports answer ratio, setup-time and
//! post-dial-delay percentiles and failures by reason ([`report::Report`]). Its SIP side is
//! the sans-IO [`sip_uac::Uac`]; what to dial and when is in [`plan`]. See
//! `docs/loadtest.md`. A storm can log in its callees itself ([`fleet`]: answering,
//! rejecting, moving ringing calls between a user's devices by presence), replay a CDR
//! file ([`replay::Script`]) and take its knobs from a TOML file ([`scenario`]).
//!
//! [`device::Device`] is a simulated IM device speaking the Parley protocol over QUIC: it
//! logs in, answers or rejects offered calls, and echoes or generates G.711 media as RTP
//! over QUIC datagrams, counting everything in [`device::DeviceStats`]. The `parley-load`
//! binary runs such devices from the command line; the switch's integration tests use the
//! library directly.
//!
//! ```no_run
//! use std::time::Duration;
//! use parley_codecs::control::ServerMsg;
//! use parley_load::device::{Device, DeviceConfig, MediaMode};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut alice = Device::connect(DeviceConfig {
//!     target: "127.0.0.1:4433".parse()?,
//!     cert_der: std::fs::read("parley-data/quic-cert.der")?,
//!     tenant: "demo".into(),
//!     user: "alice".into(),
//!     password: "demo".into(),
//!     device: "desk".into(),
//!     answer_after: Some(parley_load::parse_duration("500ms")?),
//!     reject: false,
//!     hangup_after: None,
//!     media: MediaMode::Echo,
//! })
//! .await?;
//! println!("logged in as {} (session {})", alice.number(), alice.session());
//! let connected = alice
//!     .wait_for(Duration::from_secs(30), |m| matches!(m, ServerMsg::CallConnected { .. }))
//!     .await;
//! println!("{connected:?}: {}", alice.stats().snapshot());
//! # Ok(())
//! # }
//! ```

pub mod capacity;
pub mod device;
pub mod fleet;
pub mod media;
pub mod plan;
pub mod presence;
pub mod replay;
pub mod report;
pub mod scenario;
pub mod sip_uac;
pub mod sip_uas;
pub mod storm;

use std::time::Duration;

/// Parses a duration written as a number and a unit: `250ms`, `5s`, `1.5s`, `2m`, `1h`.
///
/// A bare `0` is accepted as zero; any other number needs a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit (use ms, s, m or h)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` does not start with a number"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration("").is_err());
    }
}
