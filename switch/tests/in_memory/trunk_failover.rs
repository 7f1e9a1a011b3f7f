//! Voice-network failover: when OPTIONS probes find the trunk down, calls that would go to
//! the PSTN line ring the user's away devices over the packet network; when it is back,
//! they go to the PSTN line again.

use std::time::Duration;

use parley_codecs::control::Status;

use super::harness::{DeviceMsg, World, gw};

#[test]
fn a_dead_trunk_sends_calls_to_away_devices_and_a_live_one_gets_them_back() {
    let mut w = World::new();
    let mobile = w.login("alice", "mobile");
    w.presence(mobile, Status::Away);

    // Trunk up: an away device does not ring; the PSTN line does.
    w.gateway_sends(gw::invite_alice("f1"));
    let invite = w.trunk_messages();
    assert_eq!(invite.len(), 1, "{invite:?}");
    assert_eq!(w.device_inbox(mobile), []);
    w.trunk_sends(gw::answer(&invite[0], "486 Busy Here", Some("t1")));
    assert!(
        w.gateway_lines()
            .contains(&"SIP/2.0 486 Busy Here".to_owned())
    );

    // Two probes that nobody answers mark the trunk down (default policy: down_after 2).
    for _ in 0..2 {
        w.probe_trunk();
        w.advance(Duration::from_secs(33));
    }
    assert!(!w.trunk.is_up());
    w.trunk_messages();

    w.gateway_sends(gw::invite_alice("f2"));
    assert_eq!(
        w.trunk_messages(),
        Vec::<String>::new(),
        "no INVITE toward a dead trunk"
    );
    assert_eq!(
        w.device_inbox(mobile),
        [DeviceMsg::Offer {
            call: "c-2".into(),
            video: false
        }]
    );
    w.hangup(mobile, "c-2");

    // Two answered probes bring it back.
    for _ in 0..2 {
        w.probe_trunk();
        let options = w.trunk_messages().pop().unwrap();
        assert!(
            options.starts_with("OPTIONS sip:127.0.0.1:5080"),
            "{options}"
        );
        w.trunk_sends(gw::answer(&options, "200 OK", Some("p")));
    }
    assert!(w.trunk.is_up());
    w.gateway_sends(gw::invite_alice("f3"));
    assert_eq!(w.trunk_messages().len(), 1, "the PSTN line again");
    assert_eq!(w.device_inbox(mobile), []);
}
