//! Carrier CDR files: Asterisk's `cdr_csv` (`Master.csv`), FreeSWITCH's `mod_cdr_csv`
//! default template, and any CSV with a header row and a column mapping.
//!
//! Rows are read with the `csv` crate (RFC 4180 quoting, CRLF, any byte content), one
//! [`csv::ByteRecord`] at a time from any reader: nothing holds more than a row, so a
//! file of any size streams. Fields are decoded as UTF-8 where they are, and lossily
//! (U+FFFD) where they are not; a UTF-8 byte-order mark before the first field is
//! dropped. A row that cannot be used gives a [`RowError`] with the reason; the rest of
//! the file still reads.
//!
//! Timestamps are `YYYY-MM-DD HH:MM:SS` (what both switches write; a `T` separator,
//! fractional seconds and a trailing `Z` are accepted too), taken as UTC, or Unix epoch
//! seconds; an empty answer time means the call was not answered.

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, SystemTime};

/// Which layout a file has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// Asterisk `cdr_csv` `Master.csv`: no header; accountcode, src, dst, dcontext, clid,
    /// channel, dstchannel, lastapp, lastdata, start, answer, end, duration, billsec,
    /// disposition, amaflags, uniqueid, userfield (and newer trailing columns).
    Asterisk,
    /// FreeSWITCH `mod_cdr_csv` default template: no header; caller_id_name,
    /// caller_id_number, destination_number, context, start_stamp, answer_stamp,
    /// end_stamp, duration, billsec, hangup_cause, uuid, bleg_uuid, accountcode,
    /// read_codec, write_codec.
    FreeSwitch,
    /// A header row, then rows; the mapping names the columns.
    Generic(Box<Mapping>),
}

/// Column names of a generic file (as its header row spells them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mapping {
    /// Calling number (required).
    pub src: String,
    /// Called number (required).
    pub dst: String,
    /// Start time (required).
    pub start: String,
    /// Caller's display name.
    pub name: Option<String>,
    /// Answer time (empty: not answered).
    pub answer: Option<String>,
    /// End time.
    pub end: Option<String>,
    /// Seconds from start to end.
    pub duration: Option<String>,
    /// Seconds billed (answered time); > 0 means answered when there is no answer column.
    pub billsec: Option<String>,
    /// Disposition text (`ANSWERED`, `NO ANSWER`, …).
    pub disposition: Option<String>,
    /// A unique id of the call (the stable key; otherwise the row's content is).
    pub id: Option<String>,
}

/// One call of a carrier file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarrierCdr {
    /// Calling number or URI, as written.
    pub src: String,
    /// Caller's display name, when the file has one.
    pub src_name: Option<String>,
    /// Called number, as written.
    pub dst: String,
    /// Start.
    pub start: SystemTime,
    /// Answer, if answered.
    pub answer: Option<SystemTime>,
    /// End (start + duration when the file has no end).
    pub end: SystemTime,
    /// Disposition as the file says it (upper case), or derived.
    pub disposition: String,
    /// The call's id in the file (`uniqueid`, `uuid`, the mapped id column).
    pub id: Option<String>,
    /// The row's fields, for a content key when there is no id.
    pub fields: Vec<String>,
}

/// Why a row was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RowError(pub String);

/// Line-end bytes (offset, byte) not yet behind a record start, lines passed, and the
/// offset of the last record start.
type SharedLines =
    std::rc::Rc<std::cell::RefCell<(std::collections::VecDeque<(u64, u8)>, u64, u64)>>;

/// Longest row read: a row (or an unterminated quote swallowing the rest of the file) past
/// it ends the file with a read error instead of growing one record without bound.
pub const MAX_ROW_BYTES: u64 = 1 << 20;

/// Counts the lines the CSV reader has been given, so that a record's byte offset maps
/// to its line (csv's own line numbers leave out blank lines).
struct Lines<R> {
    inner: R,
    /// Offset of the next byte read.
    offset: u64,
    /// Offsets of newlines read but not yet behind a record start.
    pending: SharedLines,
}

impl<R: Read> Read for Lines<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut p = self.pending.borrow_mut();
        if self.offset + n as u64 - p.2 > MAX_ROW_BYTES + buf.len() as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the row after line {} runs past {} KiB (an unterminated quote?)",
                    p.1 + 1,
                    MAX_ROW_BYTES / 1024
                ),
            ));
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b == b'\n' || *b == b'\r' {
                p.0.push_back((self.offset + i as u64, *b));
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// A file being read.
pub struct CdrReader<R: Read> {
    format: Format,
    rows: csv::ByteRecordsIntoIter<Lines<R>>,
    /// Newline offsets not yet passed, and lines passed.
    lines: SharedLines,
    columns: HashMap<String, usize>,
    first: bool,
    /// A read error ended the file.
    ended: bool,
    /// Line of the last record read (the header's, for a generic file).
    last_line: u64,
}

impl<R: Read> std::fmt::Debug for CdrReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CdrReader")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// What a generic file's header lacked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header: {0}")]
pub struct HeaderError(pub String);

impl<R: Read> CdrReader<R> {
    /// Starts reading; a generic file's header is read (and checked against the
    /// mapping) now.
    pub fn new(format: Format, reader: R) -> Result<Self, HeaderError> {
        let lines = std::rc::Rc::new(std::cell::RefCell::new((
            std::collections::VecDeque::new(),
            0u64,
            0u64,
        )));
        let rows = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(Lines {
                inner: reader,
                offset: 0,
                pending: lines.clone(),
            })
            .into_byte_records();
        let mut me = Self {
            format,
            rows,
            lines,
            columns: HashMap::new(),
            first: true,
            ended: false,
            last_line: 0,
        };
        if let Format::Generic(m) = me.format.clone() {
            let header = match me.rows.next() {
                Some(Ok(r)) => me.fields(&r),
                Some(Err(e)) => return Err(HeaderError(e.to_string())),
                None => return Err(HeaderError("the file is empty".into())),
            };
            me.last_line = 1;
            me.columns = header
                .iter()
                .enumerate()
                .map(|(i, h)| (h.trim().to_owned(), i))
                .collect();
            for (what, col) in [("src", &m.src), ("dst", &m.dst), ("start", &m.start)] {
                if !me.columns.contains_key(col.as_str()) {
                    return Err(HeaderError(format!(
                        "no column {col:?} (the {what} column)"
                    )));
                }
            }
            for col in [
                &m.name,
                &m.answer,
                &m.end,
                &m.duration,
                &m.billsec,
                &m.disposition,
                &m.id,
            ]
            .into_iter()
            .flatten()
            {
                if !me.columns.contains_key(col.as_str()) {
                    return Err(HeaderError(format!("no column {col:?}")));
                }
            }
        }
        Ok(me)
    }

    /// The line (1-based) of the byte at `offset`.
    fn line_at(&self, offset: u64) -> u64 {
        let mut l = self.lines.borrow_mut();
        l.2 = l.2.max(offset);
        // csv puts a record's start at the line ends before it that it skipped (a CRLF's
        // LF, blank lines): those count as before the record.
        let mut at = offset;
        while let Some(&(o, b)) = l.0.front() {
            if o < offset || o == at {
                if o == at {
                    at += 1;
                }
                l.0.pop_front();
                l.1 += u64::from(b == b'\n');
            } else {
                break;
            }
        }
        l.1 + 1
    }

    /// Fields as text (lossy UTF-8), the first one without a byte-order mark.
    fn fields(&mut self, r: &csv::ByteRecord) -> Vec<String> {
        let mut out: Vec<String> = r
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        if std::mem::replace(&mut self.first, false)
            && let Some(f) = out.first_mut()
            && let Some(rest) = f.strip_prefix('\u{feff}')
        {
            *f = rest.to_owned();
        }
        out
    }

    /// The next row: `(line, row)`, `None` at the end. `line` is the row's first line
    /// in the file (1-based).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<(u64, Result<CarrierCdr, RowError>)> {
        loop {
            if self.ended {
                return None;
            }
            let rec = match self.rows.next()? {
                Ok(r) => r,
                Err(e) => {
                    // An I/O error ends the file; a malformed row is skipped.
                    if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                        self.ended = true;
                        // It names no position: the row is the one after the last read
                        // (its line exact when that one took one line, as CDR rows do).
                        let line = self.last_line + 1;
                        return Some((line, Err(RowError(format!("read error: {e}")))));
                    }
                    let line = e.position().map_or(0, |p| self.line_at(p.byte()));
                    return Some((line, Err(RowError(format!("malformed CSV: {e}")))));
                }
            };
            let line = rec.position().map_or(0, |p| self.line_at(p.byte()));
            self.last_line = line;
            let fields = self.fields(&rec);
            // Blank lines carry nothing.
            if fields.iter().all(|f| f.trim().is_empty()) {
                continue;
            }
            let row = match &self.format {
                Format::Asterisk => asterisk(fields),
                Format::FreeSwitch => freeswitch(fields),
                Format::Generic(m) => generic(m, &self.columns, fields),
            };
            return Some((line, row));
        }
    }
}

fn field(fields: &[String], i: usize) -> &str {
    fields.get(i).map_or("", |f| f.trim())
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// `"Alice Martin" <+33123456789>` → (name, number); a bare number has no name.
pub fn split_clid(clid: &str) -> (Option<String>, Option<String>) {
    let clid = clid.trim();
    if let (Some(open), true) = (clid.rfind('<'), clid.ends_with('>')) {
        let number = clid[open + 1..clid.len() - 1].trim();
        let name = clid[..open].trim().trim_matches('"').trim();
        return (non_empty(name), non_empty(number));
    }
    if clid.chars().any(|c| c.is_ascii_digit()) && !clid.contains(' ') {
        (None, non_empty(clid))
    } else {
        (non_empty(clid.trim_matches('"')), None)
    }
}

/// Latest time a CDR may carry: 9999-12-31T23:59:59Z (later ones are not times a
/// carrier wrote, and would overflow millisecond counts).
const LAST_TIME_SECS: u64 = 253_402_300_799;

/// `t` if it is not after [`LAST_TIME_SECS`].
fn in_range(t: SystemTime) -> Option<SystemTime> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    (secs <= LAST_TIME_SECS).then_some(t)
}

/// Parses a CDR time: `YYYY-MM-DD HH:MM:SS[.frac][Z]` (UTC) or epoch seconds, from 1970
/// to 9999.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().ok()?;
        return in_range(SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))?);
    }
    let s = s.strip_suffix('Z').unwrap_or(s);
    humantime::parse_rfc3339_weak(s).ok().and_then(in_range)
}

fn secs(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v as u64)
}

/// Builds a row from its parts, checking what every format needs.
#[allow(clippy::too_many_arguments)]
fn build(
    src: &str,
    src_name: Option<String>,
    dst: &str,
    start: &str,
    answer: &str,
    end: &str,
    duration: &str,
    billsec: &str,
    disposition: &str,
    id: &str,
    fields: Vec<String>,
) -> Result<CarrierCdr, RowError> {
    if src.is_empty() && dst.is_empty() {
        return Err(RowError("no source and no destination".into()));
    }
    let start_t = parse_time(start).ok_or_else(|| RowError(format!("bad start time {start:?}")))?;
    let answer_t = match answer.trim() {
        "" => None,
        a => Some(parse_time(a).ok_or_else(|| RowError(format!("bad answer time {a:?}")))?),
    };
    let end_t = match end.trim() {
        "" => start_t
            .checked_add(Duration::from_secs(secs(duration).unwrap_or(0)))
            .and_then(in_range)
            .ok_or_else(|| RowError(format!("duration {duration:?} ends after the year 9999")))?,
        e => parse_time(e).ok_or_else(|| RowError(format!("bad end time {e:?}")))?,
    };
    if end_t < start_t {
        return Err(RowError("ends before it starts".into()));
    }
    let billed = secs(billsec).unwrap_or(0);
    // No answer time but billed seconds: answered that long before the end.
    let answer_t = answer_t.or_else(|| {
        (billed > 0).then(|| {
            end_t
                .checked_sub(Duration::from_secs(billed))
                .unwrap_or(start_t)
        })
    });
    let disposition = match disposition.trim() {
        "" if answer_t.is_some() => "ANSWERED".to_owned(),
        "" => "NO ANSWER".to_owned(),
        d => d.to_ascii_uppercase(),
    };
    Ok(CarrierCdr {
        src: src.to_owned(),
        src_name,
        dst: dst.to_owned(),
        start: start_t,
        answer: answer_t,
        end: end_t,
        disposition,
        id: non_empty(id),
        fields,
    })
}

fn asterisk(fields: Vec<String>) -> Result<CarrierCdr, RowError> {
    if fields.len() < 15 {
        return Err(RowError(format!(
            "{} columns; Asterisk Master.csv rows have at least 15",
            fields.len()
        )));
    }
    let (clid_name, clid_number) = split_clid(field(&fields, 4));
    let src = match field(&fields, 1) {
        "" => clid_number.unwrap_or_default(),
        s => s.to_owned(),
    };
    // An Asterisk "answer" of an unanswered call is empty or the start repeated; billsec
    // and the disposition are what says it was answered.
    let disposition = field(&fields, 14).to_owned();
    let answered =
        disposition.eq_ignore_ascii_case("ANSWERED") || secs(field(&fields, 13)).unwrap_or(0) > 0;
    let answer = if answered { field(&fields, 10) } else { "" };
    let (start, end, duration, billsec, uniqueid) = (
        field(&fields, 9).to_owned(),
        field(&fields, 11).to_owned(),
        field(&fields, 12).to_owned(),
        field(&fields, 13).to_owned(),
        field(&fields, 16).to_owned(),
    );
    let (dst, answer) = (field(&fields, 2).to_owned(), answer.to_owned());
    build(
        &src,
        clid_name,
        &dst,
        &start,
        &answer,
        &end,
        &duration,
        &billsec,
        &disposition,
        &uniqueid,
        fields,
    )
}

fn freeswitch(fields: Vec<String>) -> Result<CarrierCdr, RowError> {
    if fields.len() < 11 {
        return Err(RowError(format!(
            "{} columns; FreeSWITCH default-template rows have 15",
            fields.len()
        )));
    }
    let name = non_empty(field(&fields, 0));
    let cause = field(&fields, 9).to_owned();
    let billsec = field(&fields, 8).to_owned();
    let answered = !field(&fields, 5).is_empty() || secs(&billsec).unwrap_or(0) > 0;
    let disposition = match cause.as_str() {
        _ if answered => "ANSWERED".to_owned(),
        "USER_BUSY" => "BUSY".to_owned(),
        "" => String::new(),
        _ => "NO ANSWER".to_owned(),
    };
    let (src, dst, start, answer, end, duration, uuid) = (
        field(&fields, 1).to_owned(),
        field(&fields, 2).to_owned(),
        field(&fields, 4).to_owned(),
        field(&fields, 5).to_owned(),
        field(&fields, 6).to_owned(),
        field(&fields, 7).to_owned(),
        field(&fields, 10).to_owned(),
    );
    build(
        &src,
        name,
        &dst,
        &start,
        &answer,
        &end,
        &duration,
        &billsec,
        &disposition,
        &uuid,
        fields,
    )
}

fn generic(
    m: &Mapping,
    columns: &HashMap<String, usize>,
    fields: Vec<String>,
) -> Result<CarrierCdr, RowError> {
    let get = |col: &Option<String>| -> String {
        col.as_ref()
            .and_then(|c| columns.get(c))
            .map_or(String::new(), |i| field(&fields, *i).to_owned())
    };
    let src = get(&Some(m.src.clone()));
    let dst = get(&Some(m.dst.clone()));
    let start = get(&Some(m.start.clone()));
    let (clid_name, clid_number) = split_clid(&get(&m.name));
    let src = if src.is_empty() {
        clid_number.unwrap_or_default()
    } else {
        src
    };
    let (answer, end, duration, billsec, disposition, id) = (
        get(&m.answer),
        get(&m.end),
        get(&m.duration),
        get(&m.billsec),
        get(&m.disposition),
        get(&m.id),
    );
    build(
        &src,
        clid_name,
        &dst,
        &start,
        &answer,
        &end,
        &duration,
        &billsec,
        &disposition,
        &id,
        fields,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(format: Format, text: &[u8]) -> Vec<(u64, Result<CarrierCdr, RowError>)> {
        let mut r = CdrReader::new(format, text).unwrap();
        let mut out = Vec::new();
        while let Some(row) = r.next() {
            out.push(row);
        }
        out
    }

    fn t(s: &str) -> SystemTime {
        parse_time(s).unwrap()
    }

    #[test]
    fn asterisk_rows_with_quotes_commas_bom_crlf_and_bad_bytes() {
        let mut file = b"\xef\xbb\xbf".to_vec();
        file.extend_from_slice(
            b"\"\",\"+33123456789\",\"+33612345678\",\"from-pstn\",\"\"\"Martin, Alice\"\" <+33123456789>\",\"SIP/t-01\",\"SIP/a-02\",\"Dial\",\"SIP/a,30\",\"2026-11-30 14:03:12\",\"2026-11-30 14:03:20\",\"2026-11-30 14:05:20\",128,120,\"ANSWERED\",\"DOCUMENTATION\",\"1764511392.17\",\"\"\r\n",
        );
        // Unanswered, empty answer time, a name with a byte that is not UTF-8.
        file.extend_from_slice(
            b"\"\",\"0144556677\",\"+33612345678\",\"from-pstn\",\"\"\"Ren\xe9\"\" <0144556677>\",\"SIP/t-03\",\"\",\"Dial\",\"\",\"2026-11-30 15:00:00\",\"\",\"2026-11-30 15:00:30\",30,0,\"NO ANSWER\",\"DOCUMENTATION\",\"1764514800.18\",\"\",\"peer\",\"1764514800.18\",\"42\"\r\n",
        );
        file.extend_from_slice(b"\r\n\"\",\"1\",\"2\"\r\n");
        file.extend_from_slice(b"\"\",\"1\",\"2\",\"c\",\"\",\"\",\"\",\"\",\"\",\"yesterday\",\"\",\"\",0,0,\"NO ANSWER\",\"\",\"u3\",\"\"\r\n");
        let rows = read(Format::Asterisk, &file);
        assert_eq!(rows.len(), 4, "{rows:#?}");
        let a = rows[0].1.as_ref().unwrap();
        assert_eq!(rows[0].0, 1);
        assert_eq!(a.src, "+33123456789");
        assert_eq!(a.src_name.as_deref(), Some("Martin, Alice"));
        assert_eq!(a.dst, "+33612345678");
        assert_eq!(a.start, t("2026-11-30 14:03:12"));
        assert_eq!(a.answer, Some(t("2026-11-30 14:03:20")));
        assert_eq!(a.disposition, "ANSWERED");
        assert_eq!(a.id.as_deref(), Some("1764511392.17"));
        let b = rows[1].1.as_ref().unwrap();
        assert_eq!(b.src_name.as_deref(), Some("Ren\u{fffd}"));
        assert_eq!(b.answer, None);
        assert_eq!(b.disposition, "NO ANSWER");
        assert!(rows[2].1.as_ref().unwrap_err().0.contains("3 columns"));
        let lines: Vec<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(lines, [1, 2, 4, 5]);
        assert!(rows[3].1.as_ref().unwrap_err().0.contains("bad start time"));
    }

    #[test]
    fn freeswitch_default_template() {
        let file = b"\"Alice Martin\",\"+33123456789\",\"+33612345678\",\"default\",\"2026-11-30 14:03:12\",\"2026-11-30 14:03:15\",\"2026-11-30 14:04:15\",\"63\",\"60\",\"NORMAL_CLEARING\",\"6f0e7b1c-1f3a-4c55-9a4e-0e8f3f4c2a11\",\"\",\"\",\"PCMU\",\"PCMU\"\n\
\"\",\"0144556677\",\"+33612345678\",\"default\",\"2026-11-30 15:00:00\",\"\",\"2026-11-30 15:00:20\",\"20\",\"0\",\"NO_ANSWER\",\"0d1e2f30-0000-4000-8000-000000000002\",\"\",\"\",\"PCMU\",\"PCMU\"\n\
\"\",\"0144556677\",\"+33612345678\",\"default\",\"2026-11-30 15:10:00\",\"\",\"2026-11-30 15:10:02\",\"2\",\"0\",\"USER_BUSY\",\"0d1e2f30-0000-4000-8000-000000000003\",\"\",\"\",\"PCMU\",\"PCMU\"\n";
        let rows = read(Format::FreeSwitch, file);
        let r: Vec<&CarrierCdr> = rows.iter().map(|(_, r)| r.as_ref().unwrap()).collect();
        assert_eq!(r[0].src_name.as_deref(), Some("Alice Martin"));
        assert_eq!(r[0].answer, Some(t("2026-11-30 14:03:15")));
        assert_eq!(r[0].disposition, "ANSWERED");
        assert_eq!(r[1].answer, None);
        assert_eq!(r[1].disposition, "NO ANSWER");
        assert_eq!(r[2].disposition, "BUSY");
        assert_eq!(
            r[1].id.as_deref(),
            Some("0d1e2f30-0000-4000-8000-000000000002")
        );
    }

    /// The ugly cases of the Asterisk tests, in the other two layouts: a BOM, CRLF, a
    /// quoted name with a comma and quotes, a byte that is not UTF-8, an empty answer.
    #[test]
    fn freeswitch_and_generic_files_take_the_ugly_cases_too() {
        let mut fs = b"\xEF\xBB\xBF\"Doe, \"\"J\"\"\",\"+33123456789\",\"+33612345678\",\"default\",\"2026-11-30 14:03:12\",\"\",\"2026-11-30 14:04:15\",\"63\",\"0\",\"NO_ANSWER\",\"u-1\",\"\",\"\",\"PCMU\",\"PCMU\"\r\n".to_vec();
        fs.extend_from_slice(b"\"Caf\xE9\",\"0144556677\",\"+33612345678\",\"default\",\"2026-11-30 15:00:00\",\"2026-11-30 15:00:01\",\"2026-11-30 15:00:20\",\"20\",\"19\",\"NORMAL_CLEARING\",\"u-2\",\"\",\"\",\"PCMU\",\"PCMU\"\r\n");
        let rows = read(Format::FreeSwitch, &fs);
        let r: Vec<&CarrierCdr> = rows.iter().map(|(_, r)| r.as_ref().unwrap()).collect();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].src_name.as_deref(), Some("Doe, \"J\""));
        assert_eq!(r[0].src, "+33123456789");
        assert_eq!(r[0].answer, None);
        assert_eq!(r[0].disposition, "NO ANSWER");
        assert_eq!(r[1].src_name.as_deref(), Some("Caf\u{fffd}"));
        assert_eq!(r[1].answer, Some(t("2026-11-30 15:00:01")));

        let m = Mapping {
            src: "from".into(),
            dst: "to".into(),
            start: "when".into(),
            name: Some("caller".into()),
            ..Default::default()
        };
        let file = b"\xEF\xBB\xBFwhen,from,to,caller\r\n2026-11-30 15:00:00,0144556677,+33612345678,\"Caf\xE9, \"\"Le\"\" Bar\"\r\n";
        let rows = read(Format::Generic(Box::new(m)), file);
        let g = rows[0].1.as_ref().unwrap();
        assert_eq!(g.src_name.as_deref(), Some("Caf\u{fffd}, \"Le\" Bar"));
        assert_eq!(g.start, t("2026-11-30 15:00:00"));
        assert_eq!(g.answer, None);
    }

    #[test]
    fn generic_files_map_their_columns() {
        let m = Mapping {
            src: "from".into(),
            dst: "to".into(),
            start: "when".into(),
            name: Some("caller".into()),
            billsec: Some("talk".into()),
            ..Default::default()
        };
        let file = b"when,from,to,caller,talk\r\n1764511392,+33123456789,+33612345678,\"Alice, M.\",42\r\n2026-11-30T15:00:00Z,0144556677,+33612345678,,0\r\n";
        let rows = read(Format::Generic(Box::new(m.clone())), file);
        let a = rows[0].1.as_ref().unwrap();
        assert_eq!(rows[0].0, 2);
        assert_eq!(
            a.start,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_511_392)
        );
        assert_eq!(a.src_name.as_deref(), Some("Alice, M."));
        assert!(a.answer.is_some());
        let b = rows[1].1.as_ref().unwrap();
        assert_eq!(b.answer, None);
        assert_eq!(b.start, t("2026-11-30 15:00:00"));
        // A mapping naming a column the header lacks is refused before any row.
        let bad = Mapping {
            src: "nope".into(),
            ..m
        };
        assert!(CdrReader::new(Format::Generic(Box::new(bad)), &file[..]).is_err());
    }

    #[test]
    fn times_past_the_year_9999_are_refused_not_overflowed() {
        assert_eq!(parse_time("253402300799"), Some(t("9999-12-31 23:59:59")));
        assert_eq!(parse_time("253402300800"), None);
        assert_eq!(parse_time("00000000000000017286664110841848717"), None);
        let rows = read(
            Format::Generic(Box::new(Mapping {
                src: "src".into(),
                dst: "dst".into(),
                start: "start".into(),
                duration: Some("d".into()),
                ..Mapping::default()
            })),
            b"src,dst,start,d\n1,2,253402300000,18446744073709551615\n1,2,99999999999999999999,1\n",
        );
        assert!(
            matches!(&rows[0], (2, Err(e)) if e.0.contains("9999")),
            "{rows:?}"
        );
        assert!(
            matches!(&rows[1], (3, Err(e)) if e.0.contains("bad start time")),
            "{rows:?}"
        );
    }

    #[test]
    fn an_unterminated_quote_ends_the_file_at_the_row_limit() {
        let mut file = b"src,dst,start\n1,2,1764493200\n1,\"2,1764493200\n".to_vec();
        file.extend(std::iter::repeat_n(b'x', 3 << 20));
        let rows = read(
            Format::Generic(Box::new(Mapping {
                src: "src".into(),
                dst: "dst".into(),
                start: "start".into(),
                ..Mapping::default()
            })),
            &file,
        );
        assert!(matches!(&rows[0], (2, Ok(_))), "{rows:?}");
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(
            matches!(&rows[1], (3, Err(e)) if e.0.starts_with("read error") && e.0.contains("after line 2")),
            "{rows:?}"
        );
    }

    #[test]
    fn clids() {
        assert_eq!(
            split_clid("\"Alice\" <+331>"),
            (Some("Alice".into()), Some("+331".into()))
        );
        assert_eq!(split_clid("<+331>"), (None, Some("+331".into())));
        assert_eq!(split_clid("+331"), (None, Some("+331".into())));
        assert_eq!(split_clid("Anonymous"), (Some("Anonymous".into()), None));
        assert_eq!(split_clid(""), (None, None));
    }
}
