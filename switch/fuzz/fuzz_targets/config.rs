//! Configuration files: parse and validate; errors must name a key or a line, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parley_switch::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
