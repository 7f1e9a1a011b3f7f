//! Any byte stream from a gateway's TCP connection: cut into chunks where the input has a
//! NUL byte, framed by `sipx-sip`'s `StreamParser` as the connection task does, each
//! framed message into the SIP core over TCP, then every timer until the core is idle.
//! The framer must end the stream (an error) or frame it, never panic; the core must
//! answer or drop each message, never panic, and keep no state it cannot time out.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use parley_core::directory::{StaticDirectory, UserIdentity};
use parley_core::ids::Sequence;
use parley_switch::sip::core::{CoreConfig, SipCore, Transport, TrunkTarget};
use sipx_sip::StreamParser;

fuzz_target!(|data: &[u8]| {
    let directory = StaticDirectory(vec![UserIdentity {
        tenant: "demo".into(),
        user: "alice".into(),
        number: "+15550100001".into(),
    }]);
    let mut core = SipCore::new(
        CoreConfig {
            local: "127.0.0.1:5060".parse().unwrap(),
            local_tcp: Some("127.0.0.1:5060".parse().unwrap()),
            local_tls: None,
            trunks: vec![TrunkTarget {
                addr: "127.0.0.1:5080".parse().unwrap(),
                transport: Transport::Tcp,
                auth: None,
            }],
            region: "US".into(),
            timers: sipx_sip::Timers::default(),
            rng_seed: [1; 32],
            dialog_source_check: true,
            max_server_transactions: 10_000,
            max_calls_per_source: 4,
            overload: parley_core::overload::OverloadLimits::OFF,
            max_transactions_per_source: 64,
            call_id_host: "parley".into(),
        },
        Arc::new(directory),
        Arc::new(Sequence::new()),
    );
    let t0 = Instant::now();
    let gw = "127.0.0.1:5070".parse().unwrap();
    let mut parser = StreamParser::new(parley_switch::sip::stream::limits());
    'stream: for (i, chunk) in data.split(|b| *b == 0).take(64).enumerate() {
        match parser.push(chunk) {
            Ok(msgs) => {
                for msg in msgs {
                    core.handle_stream_message(
                        t0 + Duration::from_millis(i as u64),
                        gw,
                        Transport::Tcp,
                        msg,
                    );
                    while core.poll_output().is_some() {}
                }
            }
            // Framing lost: the connection is closed.
            Err(_) => break 'stream,
        }
    }
    let mut now = t0;
    for _ in 0..200 {
        let Some(at) = core.poll_timeout() else { break };
        now = now.max(at);
        core.handle_timeout(now);
        while core.poll_output().is_some() {}
    }
});
