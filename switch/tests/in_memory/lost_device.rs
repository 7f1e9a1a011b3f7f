//! A device that loses its network sends no close: the node finds out when the device
//! leaves a call offer unacknowledged. The call routes on within the offer timeout (3 s
//! here), the device's connection is closed, and the next call never rings it.

use std::time::Duration;

use super::harness::{DeviceMsg, World, gw};

#[test]
fn a_lost_device_is_skipped_within_the_offer_timeout_and_forgotten() {
    let mut w = World::new();
    let phone = w.login("alice", "phone");
    let desk = w.login("alice", "desk");
    w.lose(phone);
    w.gateway_sends(gw::invite_alice("l1"));
    assert_eq!(w.device_inbox(desk).len(), 1, "the desk rings at once");
    // The phone never acknowledges; the desk has.
    w.advance(Duration::from_millis(2_999));
    assert!(w.dropped.is_empty());
    w.advance(Duration::from_millis(1));
    assert_eq!(w.dropped, [phone], "the lost phone is closed");
    assert_eq!(w.device_inbox(desk), [], "the desk rings on, untouched");

    // Its presence went with it: the next call rings only the desk, no waiting.
    assert!(!w.users["alice"].sessions().any(|s| s == phone));
    w.hangup(desk, "c-1");
    w.gateway_sends(gw::invite_alice("l2"));
    assert_eq!(
        w.device_inbox(desk),
        [DeviceMsg::Offer {
            call: "c-2".into(),
            video: false
        }]
    );
    // Nothing waits on the phone any more: the call's only timer is the ring timeout.
    w.advance(Duration::from_secs(5));
    assert_eq!(w.device_inbox(desk), []);
    assert_eq!(w.dropped, [phone]);
}

#[test]
fn a_call_to_a_user_whose_only_device_is_lost_reaches_the_pstn_line_in_seconds() {
    let mut w = World::new();
    let phone = w.login("alice", "phone");
    w.lose(phone);
    w.gateway_sends(gw::invite_alice("l3"));
    assert!(w.trunk_messages().is_empty());
    w.advance(Duration::from_secs(3));
    let invite = w.trunk_messages();
    assert_eq!(
        invite.len(),
        1,
        "the PSTN line rings 3 s after the INVITE: {invite:?}"
    );
    assert!(invite[0].starts_with("INVITE sip:+15550100001@127.0.0.1:5080"));
}
