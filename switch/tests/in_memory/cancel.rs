//! CANCEL and its races with the answer (RFC 3261 §9.2, §15): a CANCEL while ringing ends
//! the call with 487; a CANCEL that crosses our 200 changes nothing; a device that answers
//! after the CANCEL is hung up.

use parley_core::cdr::Disposition;

use super::harness::{DeviceMsg, World, gw};

#[test]
fn cancel_while_ringing_gets_200_then_487_and_withdraws_the_offer() {
    let mut w = World::new();
    let desk = w.login("alice", "desk");
    w.gateway_sends(gw::invite_alice("x1"));
    w.gateway_lines();
    w.gateway_sends(gw::cancel("x1"));
    let got = w.gateway.drain(..).collect::<Vec<_>>();
    assert!(
        got[0].starts_with("SIP/2.0 200 OK") && got[0].contains("CSeq: 1 CANCEL"),
        "{got:?}"
    );
    assert!(
        got[1].starts_with("SIP/2.0 487 Request Terminated") && got[1].contains("CSeq: 1 INVITE"),
        "{got:?}"
    );
    let tag = gw::to_tag(&got[1]);
    w.gateway_sends(gw::ack_error("x1", &tag));
    assert_eq!(
        w.device_inbox(desk)[1..],
        [DeviceMsg::Ended {
            call: "c-1".into(),
            reason: "cancelled".into()
        }]
    );
    assert_eq!(w.cdrs[0].disposition, Disposition::Cancelled);

    // The device answers a moment too late: it is told the call is gone, nothing else.
    w.answer(desk, "c-1");
    assert_eq!(w.gateway_lines(), Vec::<String>::new());
    assert_eq!(w.cdrs.len(), 1);
}

#[test]
fn a_cancel_that_crosses_the_200_leaves_the_call_up() {
    let mut w = World::new();
    let desk = w.login("alice", "desk");
    w.gateway_sends(gw::invite_alice("x2"));
    w.gateway_lines();
    w.answer(desk, "c-1");
    let ok = w.gateway.pop_front().unwrap();
    assert!(ok.starts_with("SIP/2.0 200 OK"));
    // The gateway's CANCEL was already on its way: answered, but the call stays up.
    w.gateway_sends(gw::cancel("x2"));
    let lines = w.gateway_lines();
    assert_eq!(lines, ["SIP/2.0 200 OK"], "only the CANCEL's own 200");
    w.gateway_sends(gw::ack("x2", &gw::to_tag(&ok)));
    assert_eq!(w.cdrs.len(), 0);
    assert_eq!(w.live_calls(), 1);
    w.gateway_sends(gw::bye("x2", &gw::to_tag(&ok)));
    assert_eq!(w.cdrs[0].disposition, Disposition::Answered);
}

#[test]
fn a_device_answering_after_another_won_is_hung_up() {
    let mut w = World::new();
    let desk = w.login("alice", "desk");
    let mobile = w.login("alice", "mobile");
    w.gateway_sends(gw::invite_alice("x3"));
    w.answer(desk, "c-1");
    assert_eq!(
        w.device_inbox(mobile)[1..],
        [DeviceMsg::Ended {
            call: "c-1".into(),
            reason: "answered_elsewhere".into()
        }]
    );
    w.answer(mobile, "c-1");
    assert_eq!(
        w.device_inbox(mobile),
        [DeviceMsg::Ended {
            call: "c-1".into(),
            reason: "answered_elsewhere".into()
        }]
    );
    let oks = w
        .gateway_lines()
        .iter()
        .filter(|l| l.starts_with("SIP/2.0 200"))
        .count();
    assert_eq!(oks, 1, "one answer for the caller");
}
