//! Carrier CDR files (`POST /api/v1/cdrs/import`): every format reads any bytes to the
//! end without panicking, and the line numbers it reports for rows (the ones an import
//! report names) start at 1 and never go back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_codecs::cdr_csv::{CdrReader, Format, Mapping};

fuzz_target!(|data: &[u8]| {
    let generic = Format::Generic(Box::new(Mapping {
        src: "src".into(),
        dst: "dst".into(),
        start: "start".into(),
        name: Some("name".into()),
        answer: Some("answer".into()),
        end: Some("end".into()),
        duration: Some("duration".into()),
        billsec: Some("billsec".into()),
        disposition: Some("disposition".into()),
        id: Some("id".into()),
    }));
    for format in [Format::Asterisk, Format::FreeSwitch, generic] {
        let Ok(mut reader) = CdrReader::new(format, data) else {
            continue;
        };
        let mut last = 1;
        while let Some((line, row)) = reader.next() {
            assert!(line >= last, "line {line} after {last}");
            last = line;
            if let Ok(r) = row {
                assert!(r.end >= r.start, "{r:?}");
            }
        }
    }
});
