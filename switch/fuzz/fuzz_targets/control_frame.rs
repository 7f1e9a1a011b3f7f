//! IM control frames from devices: the length prefix, then the JSON body as a client
//! message (what the node reads) and as a server message (what clients read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_codecs::control::{self, ClientMsg, ServerMsg};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = control::frame_len([data[0], data[1], data[2], data[3]]);
    }
    let _ = control::decode::<ClientMsg>(data);
    let _ = control::decode::<ServerMsg>(data);
});
