//! Any datagram into the SIP core, then the same core a transaction timeout later: the
//! core must answer or drop, never panic, and keep no state it cannot time out. The input
//! may carry several datagrams separated by a NUL byte (a request, then what follows it).
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use parley_core::directory::{StaticDirectory, UserIdentity};
use parley_core::ids::Sequence;
use parley_switch::sip::core::{CoreConfig, SipCore};

fuzz_target!(|data: &[u8]| {
    let directory = StaticDirectory(vec![UserIdentity {
        tenant: "demo".into(),
        user: "alice".into(),
        number: "+15550100001".into(),
    }]);
    let mut core = SipCore::new(
        CoreConfig {
            local: "127.0.0.1:5060".parse().unwrap(),
            local_tcp: None,
            local_tls: None,
            trunks: vec![parley_switch::sip::core::TrunkTarget {
                addr: "127.0.0.1:5080".parse().unwrap(),
                transport: parley_switch::sip::core::Transport::Udp,
                auth: None,
            }],
            region: "US".into(),
            timers: sipx_sip::Timers::default(),
            rng_seed: [1; 32],
            dialog_source_check: true,
            max_server_transactions: 10_000,
            max_calls_per_source: 0,
            overload: parley_core::overload::OverloadLimits::OFF,
            max_transactions_per_source: 0,
            call_id_host: "parley".into(),
        },
        Arc::new(directory),
        Arc::new(Sequence::new()),
    );
    let t0 = Instant::now();
    let gw = "127.0.0.1:5070".parse().unwrap();
    for (i, part) in data.split(|b| *b == 0).take(8).enumerate() {
        // Which shard of several would own it: any answer in range, never a panic.
        if let Some(k) = parley_switch::sip::shard::owner(part, 3) {
            assert!(k < 3);
        }
        core.handle_datagram(t0 + Duration::from_millis(i as u64), gw, Bytes::copy_from_slice(part));
        while core.poll_output().is_some() {}
    }
    // Every transaction and dialog of a call nobody drives must time out.
    let mut now = t0;
    for _ in 0..200 {
        let Some(at) = core.poll_timeout() else { break };
        now = now.max(at);
        core.handle_timeout(now);
        while core.poll_output().is_some() {}
    }
});
