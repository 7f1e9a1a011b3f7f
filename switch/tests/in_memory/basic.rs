//! One call, end to end: INVITE → 100/180 → a device answers → 200 with our SDP → ACK →
//! the device hangs up → BYE to the gateway → CDR and address-book entry.

use std::time::Duration;

use parley_core::cdr::{CallRoute, Direction, Disposition};

use super::harness::{CALLER, DeviceMsg, World, gw};

#[test]
fn a_gateway_call_rings_the_device_and_leaves_a_cdr_and_a_contact() {
    let mut w = World::new();
    let desk = w.login("alice", "desk");
    w.gateway_sends(gw::invite_alice("b1"));
    assert_eq!(
        w.gateway_lines(),
        ["SIP/2.0 100 Trying", "SIP/2.0 180 Ringing"]
    );
    assert_eq!(
        w.device_inbox(desk),
        [DeviceMsg::Offer {
            call: "c-1".into(),
            video: false
        }]
    );

    w.advance(Duration::from_secs(2));
    w.answer(desk, "c-1");
    let ok = w.gateway.pop_front().expect("a 200");
    assert!(ok.starts_with("SIP/2.0 200 OK"), "{ok}");
    assert!(
        ok.contains("m=audio 2000"),
        "our relay port in the answer: {ok}"
    );
    assert!(ok.contains("a=rtpmap:0 PCMU/8000"), "{ok}");
    let tag = gw::to_tag(&ok);
    w.gateway_sends(gw::ack("b1", &tag));
    assert_eq!(
        w.device_inbox(desk),
        [DeviceMsg::Connected { call: "c-1".into() }]
    );

    // No retransmission of the 200 once it is acknowledged.
    w.advance(Duration::from_secs(5));
    assert_eq!(w.gateway_lines(), Vec::<String>::new());

    w.hangup(desk, "c-1");
    let bye = w.gateway.pop_front().expect("a BYE");
    assert!(
        bye.starts_with("BYE sip:gw@127.0.0.1:5070 SIP/2.0"),
        "{bye}"
    );
    assert!(
        bye.contains(&format!(";tag={tag}")),
        "our tag in From: {bye}"
    );
    w.gateway_sends(gw::answer(&bye, "200 OK", None));

    assert_eq!(w.cdrs.len(), 1);
    let cdr = &w.cdrs[0];
    assert_eq!(
        (cdr.disposition, cdr.cause, cdr.route, cdr.direction),
        (Disposition::Answered, 200, CallRoute::Im, Direction::In)
    );
    assert_eq!(cdr.answered_by.as_deref(), Some("desk"));
    assert_eq!(cdr.caller, CALLER);
    assert_eq!(cdr.sip_call_id, "b1");
    assert_eq!(
        cdr.answer.unwrap().duration_since(cdr.start).unwrap(),
        Duration::from_secs(2)
    );
    assert_eq!(
        cdr.end.duration_since(cdr.start).unwrap(),
        Duration::from_secs(7)
    );
    let contact = &w.books["alice"][CALLER];
    assert_eq!((contact.name.as_deref(), contact.calls), (Some("Gw"), 1));
    assert_eq!(w.live_calls(), 0);
}

#[test]
fn a_call_nobody_can_take_gets_480_and_still_leaves_a_cdr() {
    let mut w = World::new();
    // No device, and the trunk refuses: the voice network cannot take it either.
    w.gateway_sends(gw::invite_alice("n1"));
    assert_eq!(w.gateway_lines(), ["SIP/2.0 100 Trying"]);
    let invite = w.trunk_messages().remove(0);
    assert!(
        invite.starts_with("INVITE sip:+15550100001@127.0.0.1:5080"),
        "{invite}"
    );
    w.trunk_sends(gw::answer(&invite, "503 Service Unavailable", Some("t9")));
    let ack = w.trunk_messages();
    assert!(
        ack[0].starts_with("ACK sip:+15550100001@127.0.0.1:5080"),
        "{ack:?}"
    );
    let final_ = w.gateway.pop_front().expect("a final response");
    assert!(
        final_.starts_with("SIP/2.0 480 Temporarily Unavailable"),
        "{final_}"
    );
    w.gateway_sends(gw::ack_error("n1", &gw::to_tag(&final_)));
    w.advance(Duration::from_secs(5));
    assert_eq!(
        w.gateway_lines(),
        Vec::<String>::new(),
        "acknowledged: not retransmitted"
    );
    assert_eq!(
        (w.cdrs[0].disposition, w.cdrs[0].cause),
        (Disposition::Unavailable, 480)
    );
    assert_eq!(w.books["alice"][CALLER].calls, 1);
}
