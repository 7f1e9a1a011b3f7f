//! Replaying recorded traffic: call arrival times, hold times and called numbers read from
//! a CDR file, as a [`Script`] the storm plays instead of its rate, `--to` and `--hold`.
//!
//! Two layouts are read (`docs/loadtest.md`, "Replay"):
//!
//! - **Parley CSV**: a header line naming the columns, in any order, among `call_id`,
//!   `caller`, `called`, `start_time`, `answer_time`, `end_time`, `duration_secs`,
//!   `disposition`; `called` and `start_time` are required. Times are RFC 3339.
//! - **Asterisk `Master.csv`**: no header; fields `accountcode, src, dst, dcontext, clid,
//!   channel, dstchannel, lastapp, lastdata, start, answer, end, duration, billsec,
//!   disposition, …`; `start` as `YYYY-MM-DD HH:MM:SS`.
//!
//! A file whose first non-blank line has a field `call_id` is Parley's; any other is
//! Asterisk's.

use std::path::Path;
use std::time::Duration;

use crate::plan::Numbers;

/// One call of a [`Script`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptedCall {
    /// When the call starts, after the start of the replay.
    pub offset: Duration,
    /// How long it is held once answered.
    pub hold: Duration,
    /// The number called.
    pub to: String,
}

/// Calls to place at given offsets, in order of their offsets.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Script {
    /// The calls, sorted by `offset`.
    pub calls: Vec<ScriptedCall>,
}

/// Why a CDR file could not be replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line could not be understood.
    #[error("line {line}: {why}")]
    Line {
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The speed-up is not a positive finite number.
    #[error("bad speed {0}: must be positive and finite")]
    Speed(f64),
    /// The file holds no call.
    #[error("no call in the file")]
    Empty,
}

/// The layout a CDR file was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Parley's CSV export, with a header.
    Parley,
    /// Asterisk's `Master.csv`, no header.
    Asterisk,
}

/// A call as read from a file, before the speed-up: start in seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    start: f64,
    hold: f64,
    to: String,
}

impl Script {
    /// Reads a CDR file (either layout) and builds the script, with gaps and holds divided
    /// by `speed`.
    pub fn from_file(path: &Path, speed: f64) -> Result<(Script, Layout), ReplayError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, speed)
    }

    /// Builds the script from the text of a CDR file (either layout).
    pub fn parse(text: &str, speed: f64) -> Result<(Script, Layout), ReplayError> {
        if !(speed.is_finite() && speed > 0.0) {
            return Err(ReplayError::Speed(speed));
        }
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
            .filter(|(_, l)| !l.trim().is_empty());
        let Some((first_no, first)) = lines.next() else {
            return Err(ReplayError::Empty);
        };
        let first_fields = split_csv(first);
        let (layout, mut rows) = if first_fields.iter().any(|f| f.trim() == "call_id") {
            let cols =
                ParleyColumns::from_header(&first_fields).map_err(|why| ReplayError::Line {
                    line: first_no,
                    why,
                })?;
            let rows = lines
                .map(|(n, l)| {
                    cols.row(&split_csv(l))
                        .map_err(|why| ReplayError::Line { line: n, why })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (Layout::Parley, rows)
        } else {
            let rows = std::iter::once((first_no, first))
                .chain(lines)
                .map(|(n, l)| {
                    asterisk_row(&split_csv(l)).map_err(|why| ReplayError::Line { line: n, why })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (Layout::Asterisk, rows)
        };
        if rows.is_empty() {
            return Err(ReplayError::Empty);
        }
        rows.sort_by(|a, b| a.start.total_cmp(&b.start));
        let t0 = rows[0].start;
        let secs = |s: f64| Duration::try_from_secs_f64((s / speed).max(0.0)).unwrap_or_default();
        let calls = rows
            .into_iter()
            .map(|r| ScriptedCall {
                offset: secs(r.start - t0),
                hold: secs(r.hold),
                to: r.to,
            })
            .collect();
        Ok((Script { calls }, layout))
    }

    /// The numbers called, each once, in order of first appearance (for the report).
    pub fn numbers(&self) -> Numbers {
        let mut seen = std::collections::HashSet::new();
        let list = self
            .calls
            .iter()
            .filter(|c| seen.insert(c.to.as_str()))
            .map(|c| c.to.clone())
            .collect();
        Numbers::List(list)
    }
}

/// Positions of the Parley CSV columns.
struct ParleyColumns {
    called: usize,
    start: usize,
    answer: Option<usize>,
    end: Option<usize>,
    duration: Option<usize>,
    disposition: Option<usize>,
}

impl ParleyColumns {
    fn from_header(fields: &[String]) -> Result<Self, String> {
        let pos = |name: &str| fields.iter().position(|f| f.trim() == name);
        Ok(ParleyColumns {
            called: pos("called").ok_or("the header has no `called` column")?,
            start: pos("start_time").ok_or("the header has no `start_time` column")?,
            answer: pos("answer_time"),
            end: pos("end_time"),
            duration: pos("duration_secs"),
            disposition: pos("disposition"),
        })
    }

    fn row(&self, f: &[String]) -> Result<Row, String> {
        let get = |i: Option<usize>| i.and_then(|i| f.get(i)).map(|s| s.trim()).unwrap_or("");
        let to = get(Some(self.called));
        if to.is_empty() {
            return Err("empty `called`".into());
        }
        let start = get(Some(self.start));
        let start = parse_time(start).ok_or_else(|| format!("bad start_time `{start}`"))?;
        let answered = match get(self.disposition) {
            "" => !get(self.answer).is_empty(),
            d => d.eq_ignore_ascii_case("ANSWERED"),
        };
        let hold = if !answered {
            0.0
        } else if let Ok(d) = get(self.duration).parse::<f64>() {
            d
        } else {
            match (parse_time(get(self.answer)), parse_time(get(self.end))) {
                (Some(a), Some(e)) => e - a,
                _ => 0.0,
            }
        };
        Ok(Row {
            start,
            hold: clean_secs(hold),
            to: to.to_owned(),
        })
    }
}

/// A row of Asterisk's Master.csv: dst (2), start (9), billsec (13), disposition (14).
fn asterisk_row(f: &[String]) -> Result<Row, String> {
    if f.len() < 14 {
        return Err(format!(
            "{} fields; Master.csv rows have at least 14 (a Parley CSV needs its header)",
            f.len()
        ));
    }
    let to = f[2].trim();
    if to.is_empty() {
        return Err("empty dst".into());
    }
    let start = f[9].trim();
    let start = parse_time(start).ok_or_else(|| format!("bad start `{start}`"))?;
    let billsec = f[13].trim();
    let hold = billsec
        .parse::<f64>()
        .map_err(|_| format!("bad billsec `{billsec}`"))?;
    Ok(Row {
        start,
        hold: clean_secs(hold),
        to: to.to_owned(),
    })
}

/// A hold in seconds, with negatives and non-numbers as 0 and at most a day.
fn clean_secs(s: f64) -> f64 {
    if s.is_finite() {
        s.clamp(0.0, 86_400.0)
    } else {
        0.0
    }
}

/// Splits one CSV line: fields separated by commas, optionally in double quotes, with `""`
/// for a quote inside quotes. Never fails: a stray quote is kept as text.
pub fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' if quoted => quoted = false,
            '"' if field.trim().is_empty() => {
                field.clear();
                quoted = true;
            }
            ',' if !quoted => out.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    out.push(field);
    out
}

/// Parses `YYYY-MM-DD[T ]HH:MM:SS[.fff][Z|±HH:MM]` into seconds since the Unix epoch. A
/// time without an offset is taken as UTC (a replay only uses differences).
pub fn parse_time(s: &str) -> Option<f64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        frac = format!("0.{}", &r[..n]).parse().ok()?;
        rest = &r[n..];
    }
    let offset = match rest {
        "" | "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let oh: i64 = o.get(1..3)?.parse().ok()?;
            let om: i64 = o.get(4..6)?.parse().ok()?;
            let v = oh * 3600 + om * 60;
            if o.starts_with('-') { -v } else { v }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(secs as f64 + frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARLEY: &str = "\
call_id,caller,called,start_time,answer_time,end_time,duration_secs,disposition
c-2,+15557770001,+15550100002,2025-11-28T14:00:01.5Z,2025-11-28T14:00:02Z,2025-11-28T14:00:06Z,4,ANSWERED
c-1,+15557770001,+15550100001,2025-11-28T14:00:00Z,2025-11-28T14:00:01Z,2025-11-28T14:00:03Z,2,ANSWERED

c-3,+15557770001,+15550100001,2025-11-28T15:00:03+01:00,,2025-11-28T14:00:04Z,,NO_ANSWER
";

    const ASTERISK: &str = "\
\"\",\"1000\",\"+15550100001\",\"default\",\"\"\"Alice\"\" <1000>\",\"SIP/1000-0001\",\"SIP/2000-0002\",\"Dial\",\"SIP/2000,30\",\"2025-11-28 14:00:00\",\"2025-11-28 14:00:01\",\"2025-11-28 14:00:11\",11,10,\"ANSWERED\",\"DOCUMENTATION\",\"1732802400.1\",\"\"
\"\",\"1000\",\"+15550100002\",\"default\",\"\",\"SIP/1000-0003\",\"\",\"Dial\",\"SIP/2000,30\",\"2025-11-28 14:00:04\",,\"2025-11-28 14:00:09\",5,0,\"NO ANSWER\",\"DOCUMENTATION\",\"1732802404.3\",\"\"
";

    #[test]
    fn parley_csv_is_sorted_scaled_and_held() {
        let (s, layout) = Script::parse(PARLEY, 2.0).unwrap();
        assert_eq!(layout, Layout::Parley);
        let got: Vec<_> = s
            .calls
            .iter()
            .map(|c| (c.offset.as_millis(), c.hold.as_millis(), c.to.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (0, 1000, "+15550100001"),
                (750, 2000, "+15550100002"),
                (1500, 0, "+15550100001"),
            ]
        );
        assert_eq!(s.numbers().to_string(), "+15550100001 and 1 more");
    }

    #[test]
    fn asterisk_master_csv_is_read() {
        let (s, layout) = Script::parse(ASTERISK, 1.0).unwrap();
        assert_eq!(layout, Layout::Asterisk);
        let got: Vec<_> = s
            .calls
            .iter()
            .map(|c| (c.offset.as_secs(), c.hold.as_secs(), c.to.as_str()))
            .collect();
        assert_eq!(got, [(0, 10, "+15550100001"), (4, 0, "+15550100002")]);
    }

    #[test]
    fn bad_input_is_an_error_with_its_line() {
        assert!(matches!(Script::parse("", 1.0), Err(ReplayError::Empty)));
        assert!(matches!(
            Script::parse("call_id,called,start_time\n", 1.0),
            Err(ReplayError::Empty)
        ));
        assert!(matches!(
            Script::parse(PARLEY, 0.0),
            Err(ReplayError::Speed(_))
        ));
        let bad = "call_id,called,start_time\nc,+1,yesterday\n";
        assert!(matches!(
            Script::parse(bad, 1.0),
            Err(ReplayError::Line { line: 2, .. })
        ));
        assert!(matches!(
            Script::parse("call_id,caller\n", 1.0),
            Err(ReplayError::Line { line: 1, .. })
        ));
        assert!(matches!(
            Script::parse("a,b,c\n", 1.0),
            Err(ReplayError::Line { line: 1, .. })
        ));
        // Odd bytes never panic.
        for s in ["\"", "\",\"", "é,é\n\u{0}", "2025-11-28T14:00:0é"] {
            let _ = Script::parse(s, 1.0);
            let _ = parse_time(s);
        }
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_time("1970-01-02 00:00:01"), Some(86_401.0));
        assert_eq!(parse_time("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        assert_eq!(
            parse_time("2025-11-28T15:00:00+01:00"),
            parse_time("2025-11-28T14:00:00Z")
        );
        assert_eq!(parse_time("1970-01-01T00:00:00.25Z"), Some(0.25));
        assert_eq!(parse_time("1970-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("1970-01-01T00:00:00+0100"), None);
        assert_eq!(parse_time("1970-01-01T00:00:00."), None);
    }

    #[test]
    fn csv_fields_split() {
        assert_eq!(split_csv("a,\"b,c\",\"d\"\"e\","), ["a", "b,c", "d\"e", ""]);
        assert_eq!(split_csv(""), [""]);
    }
}
