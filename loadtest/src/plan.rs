//! What a storm dials, when, and for how long: the numbers to call ([`Numbers`]), the call
//! rate with an optional linear ramp ([`Schedule`]) and the hold time ([`Hold`]).
//!
//! Pure functions of their inputs; the storm driver asks them for the n-th call.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;

use crate::parse_duration;

/// Why a storm plan could not be built from its text form.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A `--hold` value that is none of the accepted forms.
    #[error("bad hold time `{0}`: {1} (use DUR, uniform:A-B or exp:MEAN)")]
    Hold(String, String),
    /// A `--to` value that is not a number, a range or `@FILE`.
    #[error("bad number spec `{0}`: {1}")]
    Numbers(String, String),
    /// The number file could not be read.
    #[error("reading {path}: {source}")]
    NumbersFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A rate that is not a positive finite number.
    #[error("bad rate {0}: calls per second must be positive and finite")]
    Rate(f64),
}

/// How long an answered call is held before our BYE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hold {
    /// Always this long (`--hold 2s`; `0` hangs up right after the ACK).
    Fixed(Duration),
    /// Uniformly distributed between the two bounds (`--hold uniform:1s-3s`).
    Uniform(Duration, Duration),
    /// Exponentially distributed with this mean (`--hold exp:90s`), as call-centre traffic
    /// models assume.
    Exp(Duration),
}

impl Default for Hold {
    fn default() -> Self {
        Hold::Fixed(Duration::ZERO)
    }
}

impl Hold {
    /// Draws one hold time.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        match *self {
            Hold::Fixed(d) => d,
            Hold::Uniform(lo, hi) if lo >= hi => lo,
            Hold::Uniform(lo, hi) => rng.random_range(lo..=hi),
            Hold::Exp(mean) => {
                // Inverse transform; 1 - u is in (0, 1], so the logarithm is finite.
                let u: f64 = rng.random();
                Duration::try_from_secs_f64(-mean.as_secs_f64() * (1.0 - u).ln())
                    .unwrap_or(Duration::ZERO)
            }
        }
    }

    /// The mean hold time.
    pub fn mean(&self) -> Duration {
        match *self {
            Hold::Fixed(d) | Hold::Exp(d) => d,
            Hold::Uniform(lo, hi) => (lo + hi) / 2,
        }
    }
}

impl FromStr for Hold {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| PlanError::Hold(s.to_owned(), why);
        let s = s.trim();
        if let Some(range) = s.strip_prefix("uniform:") {
            let (a, b) = range
                .split_once('-')
                .ok_or_else(|| bad("uniform needs two bounds, A-B".into()))?;
            let (a, b) = (
                parse_duration(a).map_err(bad)?,
                parse_duration(b).map_err(bad)?,
            );
            if a > b {
                return Err(bad("the lower bound is above the upper one".into()));
            }
            Ok(Hold::Uniform(a, b))
        } else if let Some(mean) = s.strip_prefix("exp:") {
            Ok(Hold::Exp(parse_duration(mean).map_err(bad)?))
        } else {
            Ok(Hold::Fixed(parse_duration(s).map_err(bad)?))
        }
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Fixed(d) => write!(f, "{d:?}"),
            Hold::Uniform(a, b) => write!(f, "uniform:{a:?}-{b:?}"),
            Hold::Exp(m) => write!(f, "exp:{m:?}"),
        }
    }
}

/// The numbers a storm calls, in turn: call `n` dials [`Numbers::nth`]`(n)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Numbers {
    /// These numbers, cycled through (one number, or the lines of a file).
    List(Vec<String>),
    /// A numeric range `first..=first+count-1`, cycled through; written with a leading `+`
    /// when `plus` and zero-padded to `width` digits.
    Range {
        /// The first number's digits.
        first: u64,
        /// How many numbers the range holds (at least 1).
        count: u64,
        /// Digits written, zero-padded.
        width: usize,
        /// Whether numbers are written with a leading `+`.
        plus: bool,
    },
}

/// A run of up to 19 digits with an optional leading `+`: `(plus, digits)`.
fn digits_of(s: &str) -> Option<(bool, &str)> {
    let (plus, d) = match s.strip_prefix('+') {
        Some(d) => (true, d),
        None => (false, s),
    };
    (!d.is_empty() && d.len() <= 19 && d.bytes().all(|b| b.is_ascii_digit())).then_some((plus, d))
}

/// Characters allowed in a dialled number: digits, letters and a few URI-safe marks, so that
/// a number can go into a Request-URI and a To header unescaped.
fn valid_number(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._*".contains(&b))
}

impl Numbers {
    /// Parses `--to`: a number (`+15550100001`), a range (`+15550100001-+15550100099`; the
    /// second `+` is optional), or `@FILE` (one number a line; blank lines and `#` comments
    /// skipped).
    pub fn parse(spec: &str) -> Result<Numbers, PlanError> {
        let bad = |why: &str| PlanError::Numbers(spec.to_owned(), why.to_owned());
        let spec_t = spec.trim();
        if let Some(path) = spec_t.strip_prefix('@') {
            let text = std::fs::read_to_string(path).map_err(|source| PlanError::NumbersFile {
                path: path.into(),
                source,
            })?;
            let list: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            if list.is_empty() {
                return Err(bad("the file holds no number"));
            }
            if let Some(n) = list.iter().find(|n| !valid_number(n)) {
                return Err(PlanError::Numbers(
                    spec.to_owned(),
                    format!("`{n}` is not a dialable number"),
                ));
            }
            return Ok(Numbers::List(list));
        }
        if let Some((a, b)) = spec_t.split_once('-')
            && let (Some((plus, da)), Some((_, db))) = (digits_of(a), digits_of(b))
        {
            let (first, last): (u64, u64) = match (da.parse(), db.parse()) {
                (Ok(f), Ok(l)) => (f, l),
                _ => return Err(bad("the bounds do not fit 64 bits")),
            };
            if first > last {
                return Err(bad("the first number is above the last"));
            }
            return Ok(Numbers::Range {
                first,
                count: last - first + 1,
                width: da.len(),
                plus,
            });
        }
        if !valid_number(spec_t) {
            return Err(bad(
                "use a number (digits, letters, + - . _ *), FIRST-LAST or @FILE",
            ));
        }
        Ok(Numbers::List(vec![spec_t.to_owned()]))
    }

    /// One number.
    pub fn single(number: impl Into<String>) -> Numbers {
        Numbers::List(vec![number.into()])
    }

    /// How many distinct numbers are cycled through.
    pub fn len(&self) -> u64 {
        match self {
            Numbers::List(l) => l.len() as u64,
            Numbers::Range { count, .. } => *count,
        }
    }

    /// Whether there is no number at all (only an empty `List` built by hand).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the number call `n` dials into `out` (cleared first).
    pub fn nth(&self, n: u64, out: &mut String) {
        use std::fmt::Write as _;
        out.clear();
        match self {
            Numbers::List(l) if l.is_empty() => {}
            Numbers::List(l) => out.push_str(&l[(n % l.len() as u64) as usize]),
            Numbers::Range {
                first,
                count,
                width,
                plus,
            } => {
                let v = first + n % (*count).max(1);
                let sign = if *plus { "+" } else { "" };
                // Writing into a String cannot fail.
                let _ = write!(out, "{sign}{v:0width$}");
            }
        }
    }
}

impl fmt::Display for Numbers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = String::new();
        self.nth(0, &mut first);
        match self {
            Numbers::List(l) if l.len() == 1 => f.write_str(&first),
            Numbers::List(l) => write!(f, "{first} and {} more", l.len() - 1),
            Numbers::Range { count, .. } => {
                let mut last = String::new();
                self.nth(count - 1, &mut last);
                write!(f, "{first}-{last}")
            }
        }
    }
}

/// When each call starts: `rate` calls per second, after an optional linear ramp from
/// `ramp_from` over `ramp_time`. Call `n` (from 0) starts when the integral of the rate
/// reaches `n`, so call 0 starts at once and a constant rate spaces calls evenly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate: f64,
    ramp_from: f64,
    ramp_secs: f64,
}

impl Schedule {
    /// A constant rate.
    pub fn constant(rate: f64) -> Result<Schedule, PlanError> {
        Self::ramped(rate, rate, Duration::ZERO)
    }

    /// A linear ramp from `from` to `rate` over `time`, then `rate`.
    pub fn ramped(rate: f64, from: f64, time: Duration) -> Result<Schedule, PlanError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(PlanError::Rate(rate));
        }
        if !(from.is_finite() && from >= 0.0) {
            return Err(PlanError::Rate(from));
        }
        Ok(Schedule {
            rate,
            ramp_from: from,
            ramp_secs: time.as_secs_f64(),
        })
    }

    /// The final rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Calls due in the first `t` (the integral of the rate; fractional).
    pub fn due(&self, t: Duration) -> f64 {
        let t = t.as_secs_f64();
        let (r0, r1, tr) = (self.ramp_from, self.rate, self.ramp_secs);
        if t < tr {
            r0 * t + (r1 - r0) * t * t / (2.0 * tr)
        } else {
            (r0 + r1) * tr / 2.0 + r1 * (t - tr)
        }
    }

    /// When call `n` (from 0) is due, after the start.
    pub fn time_of(&self, n: u64) -> Duration {
        let n = n as f64;
        let (r0, r1, tr) = (self.ramp_from, self.rate, self.ramp_secs);
        let ramp_calls = (r0 + r1) * tr / 2.0;
        let secs = if n <= ramp_calls && tr > 0.0 {
            let a = (r1 - r0) / tr;
            if a.abs() < 1e-12 {
                n / r0
            } else {
                // a/2 t² + r0 t = n; the discriminant is at least r1² within the ramp.
                (-r0 + (r0 * r0 + 2.0 * a * n).max(0.0).sqrt()) / a
            }
        } else {
            tr + (n - ramp_calls) / r1
        };
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn hold_parses_every_form() {
        assert_eq!("2s".parse::<Hold>().unwrap(), Hold::Fixed(ms(2000)));
        assert_eq!("0".parse::<Hold>().unwrap(), Hold::Fixed(Duration::ZERO));
        assert_eq!(
            "uniform:0ms-200ms".parse::<Hold>().unwrap(),
            Hold::Uniform(Duration::ZERO, ms(200))
        );
        assert_eq!(
            "uniform:1s-1.5s".parse::<Hold>().unwrap(),
            Hold::Uniform(ms(1000), ms(1500))
        );
        assert_eq!("exp:90s".parse::<Hold>().unwrap(), Hold::Exp(ms(90_000)));
        for bad in [
            "",
            "5",
            "uniform:1s",
            "uniform:3s-1s",
            "uniform:a-b",
            "exp:",
            "normal:1s",
        ] {
            assert!(bad.parse::<Hold>().is_err(), "{bad}");
        }
        assert_eq!("uniform:1s-3s".parse::<Hold>().unwrap().mean(), ms(2000));
    }

    #[test]
    fn hold_samples_stay_in_their_distribution() {
        let mut rng = rand::rng();
        let u = Hold::Uniform(ms(100), ms(200));
        for _ in 0..1000 {
            let d = u.sample(&mut rng);
            assert!((ms(100)..=ms(200)).contains(&d), "{d:?}");
        }
        let e = Hold::Exp(ms(1000));
        let n = 20_000;
        let total: Duration = (0..n).map(|_| e.sample(&mut rng)).sum();
        let mean = total.as_secs_f64() / f64::from(n);
        // The mean of 20 000 draws is within 5% of 1 s with overwhelming probability.
        assert!((0.95..1.05).contains(&mean), "{mean}");
        assert_eq!(Hold::Fixed(ms(7)).sample(&mut rng), ms(7));
    }

    #[test]
    fn numbers_parse_and_cycle() {
        let mut s = String::new();
        let one = Numbers::parse("+15550100001").unwrap();
        one.nth(5, &mut s);
        assert_eq!(s, "+15550100001");

        let r = Numbers::parse("+15550100098-+15550100101").unwrap();
        assert_eq!(r.len(), 4);
        let got: Vec<String> = (0..6)
            .map(|i| {
                r.nth(i, &mut s);
                s.clone()
            })
            .collect();
        assert_eq!(
            got,
            [
                "+15550100098",
                "+15550100099",
                "+15550100100",
                "+15550100101",
                "+15550100098",
                "+15550100099"
            ]
        );
        let padded = Numbers::parse("0007-0009").unwrap();
        padded.nth(2, &mut s);
        assert_eq!(s, "0009");
        assert_eq!(padded.to_string(), "0007-0009");

        let dir = std::env::temp_dir().join(format!("parley-load-numbers-{}", std::process::id()));
        std::fs::write(&dir, "# test numbers\n+15550100001\n\n  +15550100002 \n").unwrap();
        let f = Numbers::parse(&format!("@{}", dir.display())).unwrap();
        assert_eq!(
            f,
            Numbers::List(vec!["+15550100001".into(), "+15550100002".into()])
        );
        std::fs::remove_file(&dir).unwrap();

        for bad in ["", "9-3", "+1 555", "a<b", "@/nonexistent/parley-numbers"] {
            assert!(Numbers::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn constant_schedule_spaces_calls_evenly() {
        let s = Schedule::constant(100.0).unwrap();
        assert_eq!(s.time_of(0), Duration::ZERO);
        assert_eq!(s.time_of(1), ms(10));
        assert_eq!(s.time_of(200), ms(2000));
        assert!((s.due(ms(1500)) - 150.0).abs() < 1e-9);
        assert!(Schedule::constant(0.0).is_err());
        assert!(Schedule::constant(f64::NAN).is_err());
        assert!(Schedule::ramped(10.0, -1.0, ms(1000)).is_err());
    }

    #[test]
    fn ramp_is_linear_then_constant() {
        // 0 → 100 cps over 10 s: 500 calls in the ramp, then 100 per second.
        let s = Schedule::ramped(100.0, 0.0, Duration::from_secs(10)).unwrap();
        assert!((s.due(Duration::from_secs(10)) - 500.0).abs() < 1e-9);
        assert!((s.due(Duration::from_secs(5)) - 125.0).abs() < 1e-9);
        assert!((s.due(Duration::from_secs(12)) - 700.0).abs() < 1e-9);
        for n in [1u64, 10, 125, 499, 500, 501, 700, 5000] {
            let t = s.time_of(n);
            assert!((s.due(t) - n as f64).abs() < 1e-6, "{n}: {t:?}");
        }
        assert_eq!(s.time_of(125), Duration::from_secs(5));
        // A ramp down works the same way.
        let down = Schedule::ramped(10.0, 50.0, Duration::from_secs(4)).unwrap();
        for n in [1u64, 50, 119, 120, 121, 200] {
            let t = down.time_of(n);
            assert!((down.due(t) - n as f64).abs() < 1e-6, "{n}: {t:?}");
        }
    }
}
