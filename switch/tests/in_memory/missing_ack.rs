//! A 200 the gateway never acknowledges is retransmitted with back-off for 64·T1; the
//! first retransmission due after that ends the call with a BYE to the gateway (RFC 3261
//! §13.3.1.4, `docs/routing.md`).

use std::time::Duration;

use parley_core::cdr::Disposition;

use super::harness::{DeviceMsg, World, gw};

#[test]
fn an_unacknowledged_answer_is_retransmitted_then_ended_with_a_bye() {
    let mut w = World::new();
    let desk = w.login("alice", "desk");
    w.gateway_sends(gw::invite_alice("m1"));
    w.answer(desk, "c-1");
    w.gateway_lines();
    w.advance(Duration::from_secs(31));
    let retransmitted = w.gateway_lines();
    assert!(
        retransmitted.len() >= 8,
        "T1 doubling to T2: {retransmitted:?}"
    );
    assert!(retransmitted.iter().all(|l| l == "SIP/2.0 200 OK"));
    assert_eq!(w.cdrs.len(), 0);
    // Retransmissions at 0.5, 1.5, 3.5, 7.5, then every T2 (4 s): 31.5, then 35.5 s,
    // past 64·T1 = 32 s.
    w.advance(Duration::from_secs(5));
    let got: Vec<String> = w.gateway.drain(..).collect();
    let bye = got
        .iter()
        .find(|m| m.starts_with("BYE "))
        .expect("a BYE to the gateway");
    assert!(bye.contains("Call-ID: m1"), "{bye}");
    assert_eq!(
        w.device_inbox(desk).last().unwrap(),
        &DeviceMsg::Ended {
            call: "c-1".into(),
            reason: "remote_hangup".into()
        }
    );
    assert_eq!(
        (w.cdrs[0].disposition, w.cdrs[0].cause),
        (Disposition::Failed, 408)
    );
}
