//! A device that vanishes mid-call ends the call: BYE to the gateway, a CDR.

use parley_core::cdr::Disposition;

use super::harness::{World, gw};

#[test]
fn a_device_lost_mid_call_ends_it_with_a_bye_to_the_gateway() {
    let mut w = World::new();
    let desk = w.login("alice", "desk");
    w.gateway_sends(gw::invite_alice("d1"));
    w.answer(desk, "c-1");
    let ok = w.gateway.drain(..).next_back().unwrap();
    w.gateway_sends(gw::ack("d1", &gw::to_tag(&ok)));
    w.disconnect(desk);
    let bye = w.gateway.pop_front().expect("a BYE");
    assert!(bye.starts_with("BYE "), "{bye}");
    w.gateway_sends(gw::answer(&bye, "200 OK", None));
    assert_eq!(
        (w.cdrs[0].disposition, w.cdrs[0].cause),
        (Disposition::Answered, 200)
    );
    assert_eq!(w.cdrs[0].answered_by.as_deref(), Some("desk"));
    assert_eq!(w.live_calls(), 0);
}
