//! Scenario files: `parley-load storm --scenario FILE.toml` reads the storm's knobs from a
//! TOML file, one key per flag (the flag's name without `--`, dashes as underscores);
//! flags given on the command line override the file. See `docs/loadtest.md`,
//! "Scenario files", and the examples in `loadtest/scenarios/`.
//!
//! Every value is checked when the file is read, with the same parsers as the flags, so a
//! bad scenario fails before any call.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::fleet::parse_users;
use crate::parse_duration;
use crate::plan::{Hold, Numbers};

/// Why a scenario file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key or a value of the wrong type.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// A value the flag's parser refuses.
    #[error("`{key}`: {why}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The file as written: strings where the flag takes a duration, an address or a spec.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    target: Option<String>,
    to: Option<String>,
    from: Option<String>,
    rate: Option<f64>,
    ramp_from: Option<f64>,
    ramp_time: Option<String>,
    calls: Option<u64>,
    duration: Option<String>,
    max_concurrent: Option<usize>,
    hold: Option<String>,
    answer_timeout: Option<String>,
    media: Option<bool>,
    json: Option<PathBuf>,
    max_fail_ratio: Option<f64>,
    max_setup_p99: Option<String>,
    local: Option<String>,
    quiet: Option<bool>,
    devices: Option<String>,
    password: Option<String>,
    tenant: Option<String>,
    quic: Option<String>,
    cert: Option<PathBuf>,
    answer_after: Option<String>,
    reject_ratio: Option<f64>,
    churn_ratio: Option<f64>,
}

/// A storm's knobs read from a scenario file; `None` where the file does not set one.
/// Field meanings are those of the `storm` flags of the same names.
#[derive(Debug, Default, Clone, PartialEq)]
#[allow(missing_docs)] // One field per flag, documented with the flags.
pub struct Scenario {
    pub target: Option<SocketAddr>,
    pub to: Option<Numbers>,
    pub from: Option<String>,
    pub rate: Option<f64>,
    pub ramp_from: Option<f64>,
    pub ramp_time: Option<Duration>,
    pub calls: Option<u64>,
    pub duration: Option<Duration>,
    pub max_concurrent: Option<usize>,
    pub hold: Option<Hold>,
    pub answer_timeout: Option<Duration>,
    pub media: Option<bool>,
    pub json: Option<PathBuf>,
    pub max_fail_ratio: Option<f64>,
    pub max_setup_p99: Option<Duration>,
    pub local: Option<SocketAddr>,
    pub quiet: Option<bool>,
    pub devices: Option<Vec<String>>,
    pub password: Option<String>,
    pub tenant: Option<String>,
    pub quic: Option<SocketAddr>,
    pub cert: Option<PathBuf>,
    pub answer_after: Option<Duration>,
    pub reject_ratio: Option<f64>,
    pub churn_ratio: Option<f64>,
}

fn conv<T, E: ToString>(
    key: &'static str,
    v: Option<String>,
    f: impl Fn(&str) -> Result<T, E>,
) -> Result<Option<T>, ScenarioError> {
    v.map(|s| {
        f(&s).map_err(|e| ScenarioError::Value {
            key,
            why: e.to_string(),
        })
    })
    .transpose()
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("`{s}` is not an IP address and port: {e}"))
}

impl Scenario {
    /// Reads and checks a scenario file. A `to = "@FILE"` is read relative to the current
    /// directory, as on the command line.
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks the text of a scenario file.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let r: Raw = toml::from_str(text)?;
        Ok(Scenario {
            target: conv("target", r.target, addr)?,
            to: conv("to", r.to, Numbers::parse)?,
            from: r.from,
            rate: r.rate,
            ramp_from: r.ramp_from,
            ramp_time: conv("ramp_time", r.ramp_time, parse_duration)?,
            calls: r.calls,
            duration: conv("duration", r.duration, parse_duration)?,
            max_concurrent: r.max_concurrent,
            hold: conv("hold", r.hold, str::parse::<Hold>)?,
            answer_timeout: conv("answer_timeout", r.answer_timeout, parse_duration)?,
            media: r.media,
            json: r.json,
            max_fail_ratio: r.max_fail_ratio,
            max_setup_p99: conv("max_setup_p99", r.max_setup_p99, parse_duration)?,
            local: conv("local", r.local, addr)?,
            quiet: r.quiet,
            devices: conv("devices", r.devices, parse_users)?,
            password: r.password,
            tenant: r.tenant,
            quic: conv("quic", r.quic, addr)?,
            cert: r.cert,
            answer_after: conv("answer_after", r.answer_after, parse_duration)?,
            reject_ratio: r.reject_ratio,
            churn_ratio: r.churn_ratio,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_example_parses() {
        let s = Scenario::parse(include_str!("../scenarios/node-devices-churn.toml")).unwrap();
        assert_eq!(s.target, Some("127.0.0.1:5060".parse().unwrap()));
        assert_eq!(
            s.to.as_ref().map(ToString::to_string).as_deref(),
            Some("+15550100001-+15550100002")
        );
        assert_eq!(
            s.devices.as_deref(),
            Some(&["alice".to_owned(), "bob".to_owned()][..])
        );
        assert_eq!(s.password.as_deref(), Some("demo"));
        assert_eq!(s.churn_ratio, Some(0.5));
        assert_eq!(s.reject_ratio, Some(0.05));
        assert_eq!(s.answer_after, Some(Duration::from_millis(100)));
        assert_eq!(s.calls, Some(500));
        assert!(s.hold.is_some());
    }

    #[test]
    fn the_sipp_example_parses() {
        let s = Scenario::parse(include_str!("../scenarios/sipp-uas.toml")).unwrap();
        assert_eq!(s.target, Some("127.0.0.1:5090".parse().unwrap()));
        assert_eq!((s.ramp_from, s.rate), (Some(10.0), Some(200.0)));
        assert_eq!(s.ramp_time, Some(Duration::from_secs(10)));
        assert_eq!(s.duration, Some(Duration::from_secs(60)));
        assert_eq!(s.devices, None);
        assert_eq!(s.max_fail_ratio, Some(0.001));
    }

    #[test]
    fn bad_scenarios_are_errors() {
        assert!(matches!(
            Scenario::parse("rate = 10\nsped = 2\n"),
            Err(ScenarioError::Toml(_))
        ));
        assert!(matches!(
            Scenario::parse("rate = \"fast\"\n"),
            Err(ScenarioError::Toml(_))
        ));
        assert!(matches!(
            Scenario::parse("hold = \"forever\"\n"),
            Err(ScenarioError::Value { key: "hold", .. })
        ));
        assert!(matches!(
            Scenario::parse("target = \"localhost\"\n"),
            Err(ScenarioError::Value { key: "target", .. })
        ));
        assert_eq!(Scenario::parse("").unwrap(), Scenario::default());
    }
}
