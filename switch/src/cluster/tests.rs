use super::*;

#[test]
fn device_keys_round_trip_and_refuse_garbage() {
    assert_eq!(
        parse_device_key(&device_key("node-a", 17)),
        Some(("node-a", 17))
    );
    assert_eq!(parse_device_key("node-a"), None);
    assert_eq!(parse_device_key("node-a.x"), None);
}

#[test]
fn wire_messages_keep_their_fields_and_unknown_reasons_become_failed() {
    let w = Wire::Event {
        from: "b".into(),
        call_id: "c1".into(),
        session: 9,
        event: LegEvent::Answer,
        media: Some("127.0.0.1:30000".parse().unwrap()),
    };
    let json = serde_json::to_string(&w).unwrap();
    assert!(
        json.contains(r#""t":"event""#) && json.contains(r#""event":"answer""#),
        "{json}"
    );
    match serde_json::from_str::<Wire>(&json).unwrap() {
        Wire::Event {
            session,
            event,
            media,
            ..
        } => {
            assert_eq!((session, event), (9, LegEvent::Answer));
            assert_eq!(media.unwrap().port(), 30000);
        }
        other => panic!("{other:?}"),
    }
    assert!(serde_json::from_str::<Wire>(r#"{"t":"nonsense"}"#).is_err());
    assert_eq!(end_reason("rerouted"), "rerouted");
    assert_eq!(end_reason("answered_elsewhere"), "answered_elsewhere");
    assert_eq!(end_reason("<script>"), "failed");
}

#[test]
fn leg_events_map_both_ways_and_say_which_end_a_leg() {
    for e in [
        DeviceLegEvent::Delivered,
        DeviceLegEvent::Answer,
        DeviceLegEvent::Reject,
        DeviceLegEvent::Hangup,
        DeviceLegEvent::Gone,
    ] {
        assert_eq!(LegEvent::of(e).core(), e);
    }
    assert!(!LegEvent::Delivered.ends() && !LegEvent::Answer.ends());
    assert!(LegEvent::Reject.ends() && LegEvent::Hangup.ends() && LegEvent::Gone.ends());
}

#[test]
fn secrets_in_urls_and_credentials_never_reach_logs() {
    let urls = vec![
        "nats://parley:s3cret@nats1:4222".to_owned(),
        "nats://tok3n@nats2:4222".to_owned(),
        "nats://nats3:4222".to_owned(),
    ];
    let shown = redacted_urls(&urls);
    assert_eq!(
        shown,
        [
            "nats://parley:***@nats1:4222",
            "nats://***@nats2:4222",
            "nats://nats3:4222"
        ]
    );
    let debug = format!(
        "{:?} {:?}",
        Auth::UserPassword("parley".into(), "s3cret".into()),
        Auth::Token("tok3n".into())
    );
    assert!(
        !debug.contains("s3cret") && !debug.contains("tok3n"),
        "{debug}"
    );
    assert!(debug.contains("parley"), "{debug}");
}
