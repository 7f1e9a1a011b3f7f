//! Presence changes re-route a ringing call: new devices are offered, devices that went
//! away or to Do Not Disturb are withdrawn, and the caller hears one ringback throughout.

use parley_codecs::control::Status;
use parley_core::call::Observation;

use super::harness::{DeviceMsg, World, gw};

#[test]
fn a_ringing_call_follows_presence_and_the_caller_hears_one_ringback() {
    let mut w = World::new();
    let desk = w.login("alice", "desk");
    w.gateway_sends(gw::invite_alice("r1"));
    assert_eq!(
        w.gateway_lines(),
        ["SIP/2.0 100 Trying", "SIP/2.0 180 Ringing"]
    );
    assert_eq!(w.device_inbox(desk).len(), 1);

    // The mobile comes online while the desk rings: both ring.
    let mobile = w.login("alice", "mobile");
    assert_eq!(
        w.device_inbox(mobile),
        [DeviceMsg::Offer {
            call: "c-1".into(),
            video: false
        }]
    );
    assert_eq!(w.device_inbox(desk), [], "the desk keeps ringing untouched");

    // The desk goes Do Not Disturb: withdrawn, the mobile rings on.
    w.presence(desk, Status::DoNotDisturb);
    assert_eq!(
        w.device_inbox(desk),
        [DeviceMsg::Ended {
            call: "c-1".into(),
            reason: "rerouted".into()
        }]
    );
    assert_eq!(w.device_inbox(mobile), []);
    assert_eq!(w.gateway_lines(), Vec::<String>::new(), "no second 180");

    w.answer(mobile, "c-1");
    let ok = w.gateway.pop_front().unwrap();
    assert!(ok.starts_with("SIP/2.0 200 OK"), "{ok}");
    assert_eq!(w.cdrs.len(), 0, "the call is up");
    let reroutes = w
        .observations
        .iter()
        .filter(|o| matches!(o, Observation::Rerouted { .. }))
        .count();
    assert_eq!(reroutes, 2);
    // Once answered, presence changes do not touch the call.
    w.presence(mobile, Status::Away);
    assert_eq!(
        w.device_inbox(mobile),
        [DeviceMsg::Connected { call: "c-1".into() }]
    );
}

#[test]
fn a_device_that_leaves_while_ringing_hands_the_call_to_the_pstn_line() {
    let mut w = World::new();
    let desk = w.login("alice", "desk");
    w.gateway_sends(gw::invite_alice("r2"));
    w.gateway_lines();
    assert!(w.trunk_messages().is_empty());
    w.disconnect(desk);
    let invite = w.trunk_messages();
    assert_eq!(invite.len(), 1);
    assert!(
        invite[0].starts_with("INVITE sip:+15550100001@127.0.0.1:5080"),
        "{}",
        invite[0]
    );
}
