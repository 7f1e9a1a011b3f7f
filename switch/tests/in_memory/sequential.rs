//! Sequential ringing: a rule's steps ring one after the other, each for its timeout.

use std::time::Duration;

use parley_core::cdr::Disposition;

use super::harness::{DeviceMsg, World, gw};

const DESK_THEN_MOBILE: &str = r#"{"rules": [{"name": "desk first", "then": {"action": "ring", "steps": [
    {"targets": [{"device": "desk"}], "timeout_secs": 10},
    {"targets": [{"device": "mobile"}], "timeout_secs": 10}]}}]}"#;

#[test]
fn each_step_rings_for_its_timeout_then_the_next_one() {
    let mut w = World::new();
    w.prefer("alice", DESK_THEN_MOBILE);
    let desk = w.login("alice", "desk");
    let mobile = w.login("alice", "mobile");
    w.gateway_sends(gw::invite_alice("s1"));
    assert_eq!(w.device_inbox(desk).len(), 1);
    assert_eq!(w.device_inbox(mobile), []);

    w.advance(Duration::from_millis(9_999));
    assert_eq!(w.device_inbox(mobile), [], "the first step still rings");
    w.advance(Duration::from_millis(1));
    assert_eq!(
        w.device_inbox(desk),
        [DeviceMsg::Ended {
            call: "c-1".into(),
            reason: "rerouted".into()
        }]
    );
    assert_eq!(
        w.device_inbox(mobile),
        [DeviceMsg::Offer {
            call: "c-1".into(),
            video: false
        }]
    );
    w.answer(mobile, "c-1");
    let lines = w.gateway_lines();
    assert_eq!(
        lines,
        [
            "SIP/2.0 100 Trying",
            "SIP/2.0 180 Ringing",
            "SIP/2.0 200 OK"
        ]
    );
}

#[test]
fn when_the_last_step_times_out_the_call_ends_unanswered() {
    let mut w = World::new();
    w.prefer("alice", DESK_THEN_MOBILE);
    let _desk = w.login("alice", "desk");
    let mobile = w.login("alice", "mobile");
    w.gateway_sends(gw::invite_alice("s2"));
    w.advance(Duration::from_secs(20));
    assert_eq!(
        w.device_inbox(mobile),
        [
            DeviceMsg::Offer {
                call: "c-1".into(),
                video: false
            },
            DeviceMsg::Ended {
                call: "c-1".into(),
                reason: "timeout".into()
            }
        ]
    );
    let lines = w.gateway_lines();
    assert_eq!(lines.last().unwrap(), "SIP/2.0 480 Temporarily Unavailable");
    assert_eq!(w.cdrs[0].disposition, Disposition::NoAnswer);
}
