//! A whole call through [`CallCore`] on a virtual clock: the decisions the call actor used
//! to make (routing from a lookup, re-routing, failure classification, media wiring, the
//! media watchdog, the CDR) as table-like cases.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parley_codecs::control::Status;
use parley_codecs::sdp::{Format, MediaDescription, MediaKind};

use super::*;
use crate::directory::UserIdentity;
use crate::numberplan::{NumberPlan, TrunkSpec};
use crate::router::DeviceState;
use crate::rules::Preferences;

fn audio(port: u16) -> MediaDescription {
    MediaDescription {
        kind: MediaKind::Audio,
        addr: "127.0.0.1".parse().unwrap(),
        port,
        formats: vec![
            Format {
                pt: 0,
                name: "PCMU".into(),
                clock: 8000,
            },
            Format {
                pt: 101,
                name: "TELEPHONE-EVENT".into(),
                clock: 8000,
            },
        ],
    }
}

fn spec(origin: Origin, t0: Instant) -> CallSpec {
    CallSpec {
        handle: 9,
        sip_call_id: "abc@gw".into(),
        user: UserIdentity {
            tenant: "demo".into(),
            user: "alice".into(),
            number: "+15550100001".into(),
        },
        origin,
        dialled_by: None,
        caller: "+15557770001".into(),
        caller_name: Some("Gw".into()),
        called: "+15550100001".into(),
        pstn_destination: None,
        offer: audio(6000),
        video_offer: None,
        ring_timeout: Duration::from_secs(30),
        media_timeout: Some(Duration::from_secs(5)),
        offer_ack_timeout: Some(Duration::from_secs(3)),
        max_ringing: Some(2),
        started: t0,
        started_wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    }
}

fn dev(session: u64, name: &str, status: Status, video: bool) -> DeviceState {
    DeviceState {
        session,
        device: name.into(),
        status,
        idle_ms: 0,
        note: None,
        video,
        opus: false,
    }
}

fn view(devices: Vec<DeviceState>) -> CalleeView {
    CalleeView {
        devices,
        prefs: Arc::new(Preferences::default()),
        history: HashMap::new(),
        caller_known: false,
        caller_blocked: false,
        ringing: 0,
    }
}

/// Actions, without observations (they are checked where a test is about them).
fn drain(c: &mut CallCore) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_output())
        .filter(|a| !matches!(a, Action::Observe(_)))
        .collect()
}

fn drain_all(c: &mut CallCore) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

const NOW_UNIX: u64 = 1_800_000_000;

/// One trunk (`pstn`, id 0) serving every number, up or down.
fn trunks(up: bool) -> TrunkSnapshot {
    let mut t = TrunkSnapshot::single();
    t.up = vec![up];
    t
}

fn routed(origin: Origin, devices: Vec<DeviceState>, trunk_up: bool) -> (CallCore, Instant) {
    let t0 = Instant::now();
    let mut c = CallCore::new(spec(origin, t0));
    assert_eq!(drain(&mut c), vec![Action::Lookup]);
    c.handle_lookup(t0, view(devices), trunks(trunk_up), NOW_UNIX);
    (c, t0)
}

#[test]
fn a_lookup_routes_the_call_and_a_ringing_call_watches_presence() {
    let t0 = Instant::now();
    let mut c = CallCore::new(spec(Origin::Sip, t0));
    assert_eq!(drain(&mut c), vec![Action::Lookup]);
    c.handle_lookup(
        t0,
        view(vec![dev(1, "desk", Status::Available, false)]),
        trunks(true),
        NOW_UNIX,
    );
    assert_eq!(
        drain_all(&mut c),
        vec![
            Action::Observe(Observation::Routed {
                plan: "ring",
                rule: None
            }),
            Action::OfferDevice {
                session: 1,
                video: false
            },
            Action::WatchPresence,
        ]
    );
    // A second answer to the same lookup changes nothing.
    c.handle_lookup(t0, view(vec![]), trunks(true), NOW_UNIX);
    assert_eq!(drain(&mut c), vec![]);
}

#[test]
fn the_trunk_is_offered_the_callers_codecs_and_its_answer_wires_udp_to_udp() {
    let (mut c, t0) = routed(Origin::Sip, vec![], true);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::StartTrunk(TrunkOffer {
                trunk: 0,
                to: "+15550100001".into(),
                formats: vec![0],
                telephone_event: Some(101),
            }),
            Action::WatchPresence
        ]
    );
    c.handle_sip(t0, SipEvent::TrunkRinging);
    assert_eq!(drain(&mut c), vec![Action::CallerRinging]);
    c.handle_sip(
        t0 + Duration::from_secs(2),
        SipEvent::TrunkAnswered(audio(7000)),
    );
    assert_eq!(
        drain(&mut c),
        vec![
            Action::TrunkHealth(0, ProbeOutcome::Answered(200)),
            Action::Connect(MediaPlan::SipToTrunk {
                caller: "127.0.0.1:6000".parse().unwrap(),
                trunk: "127.0.0.1:7000".parse().unwrap(),
                pt: 0,
                telephone_event: Some(101),
                video_offered: false,
            })
        ]
    );
    c.handle_sip(t0 + Duration::from_secs(10), SipEvent::CallerBye);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::Hangup(LegId::Trunk, EndReason::RemoteHangup),
            Action::Finish {
                disposition: Disposition::Answered,
                cause: 200
            }
        ]
    );
    let cdr = c.cdr(40, 41);
    assert_eq!((cdr.packets_in, cdr.packets_out), (40, 41));
    assert_eq!(cdr.route, CallRoute::Pstn);
    assert_eq!(cdr.answered_by.as_deref(), Some("pstn"));
    assert_eq!(
        cdr.answer.unwrap().duration_since(cdr.start).unwrap(),
        Duration::from_secs(2)
    );
    assert_eq!(
        cdr.end.duration_since(cdr.start).unwrap(),
        Duration::from_secs(10)
    );
    assert_eq!(cdr.direction, Direction::In);
    assert_eq!(cdr.call_id, "c-9");
}

#[test]
fn a_blocked_caller_is_declined_before_any_rule_and_recorded() {
    let t0 = Instant::now();
    let mut c = CallCore::new(spec(Origin::Sip, t0));
    assert_eq!(drain(&mut c), vec![Action::Lookup]);
    let mut v = view(vec![dev(1, "desk", Status::Available, false)]);
    // A rule that would ring the device for a known caller: blocking wins over it.
    v.caller_known = true;
    v.caller_blocked = true;
    c.handle_lookup(t0, v, trunks(true), NOW_UNIX);
    assert_eq!(
        drain_all(&mut c),
        vec![
            Action::Observe(Observation::Routed {
                plan: "reject",
                rule: Some("blocked".into())
            }),
            Action::RejectCaller(603),
            Action::Finish {
                disposition: Disposition::Rejected,
                cause: 603
            },
        ]
    );
}

#[test]
fn trunk_failures_are_classified_and_feed_its_health() {
    // (status, health outcome, how the call ends)
    let rows = [
        (
            408,
            Some(ProbeOutcome::Timeout),
            Disposition::Unavailable,
            480,
        ),
        (
            503,
            Some(ProbeOutcome::Answered(503)),
            Disposition::Unavailable,
            480,
        ),
        (404, None, Disposition::Unavailable, 480),
        (486, None, Disposition::Rejected, 486),
        (603, None, Disposition::Rejected, 603),
    ];
    for (code, health, disposition, cause) in rows {
        let (mut c, t0) = routed(Origin::Sip, vec![], true);
        drain(&mut c);
        c.handle_sip(t0, SipEvent::TrunkFailed(code));
        let mut want = Vec::new();
        want.extend(health.map(|h| Action::TrunkHealth(0, h)));
        want.push(Action::RejectCaller(cause));
        want.push(Action::Finish { disposition, cause });
        assert_eq!(drain(&mut c), want, "trunk answered {code}");
    }
}

#[test]
fn a_device_answer_is_ranked_and_wired_with_video_when_both_take_it() {
    let t0 = Instant::now();
    let mut s = spec(Origin::Sip, t0);
    let mut v = audio(6002);
    v.kind = MediaKind::Video;
    v.formats = vec![Format {
        pt: 96,
        name: "VP8".into(),
        clock: 90000,
    }];
    s.video_offer = Some(v.clone());
    let mut c = CallCore::new(s);
    drain(&mut c);
    let devices = vec![
        dev(1, "desk", Status::Available, true),
        dev(2, "mobile", Status::Available, false),
    ];
    c.handle_lookup(t0, view(devices), trunks(true), NOW_UNIX);
    // A video call rings only the device that takes video.
    assert_eq!(
        drain(&mut c),
        vec![
            Action::OfferDevice {
                session: 1,
                video: true
            },
            Action::WatchPresence
        ]
    );
    c.handle_device(t0, 1, DeviceLegEvent::Delivered);
    c.handle_device(t0, 1, DeviceLegEvent::Answer);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::CallerRinging,
            Action::Answered {
                device: "desk".into(),
                rank: "1"
            },
            Action::Connect(MediaPlan::SipToDevice {
                caller: "127.0.0.1:6000".parse().unwrap(),
                session: 1,
                pt: 0,
                telephone_event: Some(101),
                video: Some(VideoPlan {
                    caller: "127.0.0.1:6002".parse().unwrap(),
                    formats: v.formats
                }),
                video_offered: true,
            })
        ]
    );
    assert_eq!(c.cdr(0, 0).answered_by.as_deref(), Some("desk"));
}

#[test]
fn a_presence_change_asks_for_a_lookup_and_reroutes_from_it() {
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        false,
    );
    drain(&mut c);
    let changed = t0 + Duration::from_millis(300);
    c.handle_presence_changed(changed);
    // Only one lookup in flight, however many changes arrive meanwhile.
    c.handle_presence_changed(changed);
    assert_eq!(drain(&mut c), vec![Action::Lookup]);
    let now = changed + Duration::from_millis(1);
    c.handle_lookup(
        now,
        view(vec![
            dev(1, "desk", Status::DoNotDisturb, false),
            dev(2, "mobile", Status::Available, false),
        ]),
        trunks(false),
        NOW_UNIX,
    );
    assert_eq!(
        drain_all(&mut c),
        vec![
            Action::Observe(Observation::Rerouted {
                route: CallRoute::Im,
                reroutes: 1
            }),
            Action::Withdraw(LegId::Device(1), EndReason::Rerouted),
            Action::OfferDevice {
                session: 2,
                video: false
            },
        ]
    );
    c.handle_device(now, 2, DeviceLegEvent::Delivered);
    let acts = drain_all(&mut c);
    assert!(
        acts.contains(&Action::Observe(Observation::RerouteRinging {
            since: changed
        })),
        "{acts:?}"
    );
    // Once answered, presence changes are no news to the call.
    c.handle_device(now, 2, DeviceLegEvent::Answer);
    drain(&mut c);
    c.handle_presence_changed(now);
    assert_eq!(drain(&mut c), vec![]);
}

#[test]
fn device_events_are_classified() {
    // (event on the only ringing device, how the call ends)
    let rows = [
        (DeviceLegEvent::Reject, Disposition::Rejected, 603),
        (DeviceLegEvent::Hangup, Disposition::Rejected, 603),
        (DeviceLegEvent::Gone, Disposition::Unavailable, 480),
    ];
    for (event, disposition, cause) in rows {
        let (mut c, t0) = routed(
            Origin::Sip,
            vec![dev(1, "desk", Status::Available, false)],
            false,
        );
        drain(&mut c);
        c.handle_device(t0, 1, event);
        assert_eq!(
            drain(&mut c),
            vec![
                Action::RejectCaller(cause),
                Action::Finish { disposition, cause }
            ],
            "{event:?}"
        );
    }
}

#[test]
fn the_media_watchdog_samples_once_a_second_and_ends_an_idle_call() {
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        false,
    );
    c.handle_device(t0, 1, DeviceLegEvent::Answer);
    drain(&mut c);
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(c.poll_timeout(), Some(t1.min(t0 + Duration::from_secs(30))));
    c.handle_timeout(t1);
    assert_eq!(drain(&mut c), vec![Action::SampleMedia]);
    c.handle_media_idle(t1, Duration::from_millis(20));
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    c.handle_timeout(t0 + Duration::from_secs(2));
    assert_eq!(drain(&mut c), vec![Action::SampleMedia]);
    c.handle_media_idle(t0 + Duration::from_secs(2), Duration::from_secs(5));
    assert_eq!(
        drain_all(&mut c),
        vec![
            Action::Observe(Observation::MediaTimedOut {
                idle: Duration::from_secs(5)
            }),
            Action::Hangup(LegId::Device(1), EndReason::MediaTimeout),
            Action::ByeCaller,
            Action::Finish {
                disposition: Disposition::Answered,
                cause: 408
            }
        ]
    );
    assert_eq!(c.poll_timeout(), None, "an ended call has no timer");
}

#[test]
fn a_missing_ack_ends_the_call_with_a_bye_to_the_caller() {
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        false,
    );
    c.handle_device(t0, 1, DeviceLegEvent::Answer);
    drain(&mut c);
    c.handle_sip(t0 + Duration::from_secs(32), SipEvent::CallerAckTimeout);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::Hangup(LegId::Device(1), EndReason::RemoteHangup),
            Action::ByeCaller,
            Action::Finish {
                disposition: Disposition::Failed,
                cause: 408
            }
        ]
    );
}

#[test]
fn a_device_dialling_the_pstn_goes_to_the_trunk_only_when_it_is_up() {
    for (up, want_first) in [(true, true), (false, false)] {
        let t0 = Instant::now();
        let mut s = spec(Origin::Device(3), t0);
        s.pstn_destination = Some("+441632960000".into());
        s.offer = crate::dial::device_offer(false);
        let mut c = CallCore::new(s);
        drain(&mut c);
        c.handle_lookup(t0, CalleeView::default(), trunks(up), NOW_UNIX);
        let acts = drain(&mut c);
        if want_first {
            assert_eq!(
                acts,
                vec![Action::StartTrunk(TrunkOffer {
                    trunk: 0,
                    to: "+441632960000".into(),
                    formats: vec![0, 8],
                    telephone_event: Some(parley_codecs::control::PT_TELEPHONE_EVENT),
                })]
            );
            c.handle_sip(t0, SipEvent::TrunkAnswered(audio(7000)));
            let acts = drain(&mut c);
            assert!(acts.contains(&Action::Connect(MediaPlan::DeviceToTrunk {
                caller: 3,
                trunk: "127.0.0.1:7000".parse().unwrap(),
                pt: 0,
                // The trunk answered telephone-event: the device is told its number.
                telephone_event: Some(101),
            })));
            // The dialling device hangs up: the trunk gets a BYE.
            c.handle_device(t0, 3, DeviceLegEvent::Hangup);
            assert_eq!(
                drain(&mut c),
                vec![
                    Action::Hangup(LegId::Trunk, EndReason::RemoteHangup),
                    Action::Finish {
                        disposition: Disposition::Answered,
                        cause: 200
                    }
                ]
            );
            // The relay counts the trunk (UDP) side first: the CDR swaps.
            let cdr = c.cdr(5, 7);
            assert_eq!(
                (cdr.packets_in, cdr.packets_out, cdr.direction),
                (7, 5, Direction::Out)
            );
        } else {
            assert_eq!(
                acts,
                vec![
                    Action::RejectCaller(480),
                    Action::Finish {
                        disposition: Disposition::Unavailable,
                        cause: 480
                    }
                ]
            );
        }
    }
}

#[test]
fn a_dialling_device_that_hangs_up_while_it_rings_cancels() {
    let (mut c, t0) = routed(
        Origin::Device(3),
        vec![dev(1, "desk", Status::Available, false)],
        false,
    );
    drain(&mut c);
    c.handle_device(t0, 3, DeviceLegEvent::Gone);
    assert_eq!(
        drain(&mut c),
        vec![
            Action::Withdraw(LegId::Device(1), EndReason::Cancelled),
            Action::RejectCaller(487),
            Action::Finish {
                disposition: Disposition::Cancelled,
                cause: 487
            }
        ]
    );
    assert_eq!(EndReason::of_cause(487), EndReason::Cancelled);
}

#[test]
fn media_moves_before_the_answer_are_ignored() {
    let (mut c, t0) = routed(Origin::Sip, vec![], true);
    drain(&mut c);
    let a = "127.0.0.2:9000".parse().unwrap();
    c.handle_sip(t0, SipEvent::CallerMediaMoved(a));
    assert_eq!(drain(&mut c), vec![]);
    c.handle_sip(t0, SipEvent::TrunkAnswered(audio(7000)));
    drain(&mut c);
    c.handle_sip(t0, SipEvent::TrunkMediaMoved(a));
    assert_eq!(drain(&mut c), vec![Action::Repoint(MediaSide::Trunk, a)]);
}

#[test]
fn a_device_that_never_acknowledges_its_offer_is_dropped_and_the_call_routes_on() {
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        true,
    );
    assert_eq!(
        drain(&mut c),
        vec![
            Action::OfferDevice {
                session: 1,
                video: false
            },
            Action::WatchPresence
        ]
    );
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    c.handle_timeout(t0 + Duration::from_secs(3));
    assert_eq!(
        drain_all(&mut c),
        vec![
            Action::Observe(Observation::OfferUnacknowledged { session: 1 }),
            Action::DropDevice(1),
            Action::StartTrunk(TrunkOffer {
                trunk: 0,
                to: "+15550100001".into(),
                formats: vec![0],
                telephone_event: Some(101),
            }),
        ],
        "the PSTN line rings within the offer timeout"
    );
}

#[test]
fn an_offer_deadline_noticed_late_gives_the_device_one_more_second() {
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        true,
    );
    drain(&mut c);
    // The node stalled: the 3 s deadline is noticed at 5 s. The acknowledgement may be
    // queued behind the node's backlog, so the device is not dropped yet...
    let s = Duration::from_secs;
    c.handle_timeout(t0 + s(5));
    assert_eq!(drain_all(&mut c), vec![]);
    assert_eq!(c.poll_timeout(), Some(t0 + s(6)));
    // ...and the acknowledgement, read now, keeps the offer ringing.
    c.handle_device(
        t0 + Duration::from_millis(5200),
        1,
        DeviceLegEvent::Delivered,
    );
    assert_eq!(drain(&mut c), vec![Action::CallerRinging]);
    // Once only: a second late deadline drops the device (another call's offer).
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        true,
    );
    drain(&mut c);
    c.handle_timeout(t0 + s(5));
    c.handle_timeout(t0 + s(8));
    assert_eq!(
        drain_all(&mut c)[..2],
        [
            Action::Observe(Observation::OfferUnacknowledged { session: 1 }),
            Action::DropDevice(1),
        ]
    );
}

#[test]
fn an_offer_due_while_the_node_was_behind_gets_one_more_second() {
    let s = Duration::from_secs;
    // Behind a second after the offer went out (caught up since): the deadline, met on
    // time at 3 s, gives the device one more second, once.
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        true,
    );
    drain(&mut c);
    c.handle_node_behind(t0 + s(1));
    c.handle_timeout(t0 + s(3));
    assert_eq!(drain_all(&mut c), vec![]);
    assert_eq!(c.poll_timeout(), Some(t0 + s(4)));
    c.handle_timeout(t0 + s(4));
    assert_eq!(
        drain_all(&mut c)[..2],
        [
            Action::Observe(Observation::OfferUnacknowledged { session: 1 }),
            Action::DropDevice(1),
        ]
    );
    // Behind only before the offer went out: no grace.
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        true,
    );
    drain(&mut c);
    c.handle_node_behind(t0 - Duration::from_millis(100));
    c.handle_timeout(t0 + s(3));
    assert_eq!(
        drain_all(&mut c)[..2],
        [
            Action::Observe(Observation::OfferUnacknowledged { session: 1 }),
            Action::DropDevice(1),
        ]
    );
}

#[test]
fn an_acknowledged_offer_rings_until_the_ring_timeout() {
    let (mut c, t0) = routed(
        Origin::Sip,
        vec![dev(1, "desk", Status::Available, false)],
        true,
    );
    drain(&mut c);
    c.handle_device(t0 + Duration::from_millis(40), 1, DeviceLegEvent::Delivered);
    assert_eq!(drain(&mut c), vec![Action::CallerRinging]);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    c.handle_timeout(t0 + Duration::from_secs(10));
    assert_eq!(drain(&mut c), vec![]);
}

/// Three trunks for `+1`: `a` and `b` at priority 1 (weights 1 and 0-ish), `backup` at 2;
/// `uk` alone for `+44`.
fn three_trunks(up: [bool; 4]) -> TrunkSnapshot {
    let t = |name: &str, priority, weight| TrunkSpec {
        name: name.into(),
        priority,
        weight,
    };
    TrunkSnapshot {
        plan: Arc::new(NumberPlan::new(
            vec![t("a", 1, 1), t("b", 2, 1), t("backup", 3, 1), t("uk", 1, 1)],
            vec![
                crate::numberplan::NumberRoute {
                    prefix: "+1".into(),
                    trunks: vec![0, 1, 2],
                },
                crate::numberplan::NumberRoute {
                    prefix: "+44".into(),
                    trunks: vec![3],
                },
            ],
        )),
        up: up.to_vec(),
        seed: 5,
    }
}

fn offer_to(trunk: TrunkId) -> Action {
    Action::StartTrunk(TrunkOffer {
        trunk,
        to: "+15550100001".into(),
        formats: vec![0],
        telephone_event: Some(101),
    })
}

#[test]
fn a_trunk_that_fails_with_5xx_or_no_answer_hands_the_call_to_the_next() {
    let t0 = Instant::now();
    let mut c = CallCore::new(spec(Origin::Sip, t0));
    drain(&mut c);
    c.handle_lookup(t0, view(vec![]), three_trunks([true; 4]), NOW_UNIX);
    assert_eq!(drain(&mut c), vec![offer_to(0), Action::WatchPresence]);
    c.handle_sip(t0, SipEvent::TrunkRinging);
    assert_eq!(drain(&mut c), vec![Action::CallerRinging]);
    // a answers 503: counted against a, the call goes to b; the caller keeps ringing.
    c.handle_sip(t0, SipEvent::TrunkFailed(503));
    assert_eq!(
        drain_all(&mut c),
        vec![
            Action::TrunkHealth(0, ProbeOutcome::Answered(503)),
            Action::Observe(Observation::TrunkAttempt {
                trunk: 0,
                code: 503
            }),
            Action::Observe(Observation::TrunkFailover {
                from: 0,
                to: 1,
                code: 503
            }),
            offer_to(1),
        ]
    );
    // b never answers (408): on to the backup, which answers.
    c.handle_sip(t0, SipEvent::TrunkFailed(408));
    assert_eq!(
        drain(&mut c),
        vec![Action::TrunkHealth(1, ProbeOutcome::Timeout), offer_to(2)]
    );
    c.handle_sip(t0, SipEvent::TrunkAnswered(audio(7000)));
    let acts = drain(&mut c);
    assert_eq!(acts[0], Action::TrunkHealth(2, ProbeOutcome::Answered(200)));
    assert!(matches!(acts[1], Action::Connect(_)), "{acts:?}");
    c.handle_sip(t0 + Duration::from_secs(3), SipEvent::CallerBye);
    drain(&mut c);
    assert_eq!(c.cdr(0, 0).answered_by.as_deref(), Some("backup"));
}

#[test]
fn the_callees_own_answer_does_not_fail_over_and_the_last_trunk_ends_the_call() {
    for (code, disposition, cause) in [
        (486, Disposition::Rejected, 486),
        (404, Disposition::Unavailable, 480),
    ] {
        let t0 = Instant::now();
        let mut c = CallCore::new(spec(Origin::Sip, t0));
        drain(&mut c);
        c.handle_lookup(t0, view(vec![]), three_trunks([true; 4]), NOW_UNIX);
        drain(&mut c);
        c.handle_sip(t0, SipEvent::TrunkFailed(code));
        assert_eq!(
            drain(&mut c),
            vec![
                Action::RejectCaller(cause),
                Action::Finish { disposition, cause }
            ],
            "{code}"
        );
    }
    // Only a is up for +1: its 503 ends the call (b and the backup are down).
    let t0 = Instant::now();
    let mut c = CallCore::new(spec(Origin::Sip, t0));
    drain(&mut c);
    c.handle_lookup(
        t0,
        view(vec![]),
        three_trunks([true, false, false, true]),
        NOW_UNIX,
    );
    assert_eq!(drain(&mut c), vec![offer_to(0), Action::WatchPresence]);
    c.handle_sip(t0, SipEvent::TrunkFailed(503));
    assert_eq!(
        drain(&mut c),
        vec![
            Action::TrunkHealth(0, ProbeOutcome::Answered(503)),
            Action::RejectCaller(480),
            Action::Finish {
                disposition: Disposition::Unavailable,
                cause: 480
            }
        ]
    );
}

#[test]
fn the_voice_network_is_down_for_a_number_when_no_trunk_that_reaches_it_is_up() {
    // Every +1 trunk is down, the +44 one is up: a call to a +1 user with a device rings
    // the device (the voice-network-down default), and its PSTN line is not tried.
    let t0 = Instant::now();
    let mut c = CallCore::new(spec(Origin::Sip, t0));
    drain(&mut c);
    c.handle_lookup(
        t0,
        view(vec![dev(1, "desk", Status::Away, false)]),
        three_trunks([false, false, false, true]),
        NOW_UNIX,
    );
    assert_eq!(
        drain(&mut c),
        vec![
            Action::OfferDevice {
                session: 1,
                video: false
            },
            Action::WatchPresence
        ]
    );
    // With no device and no trunk for the number, the call is unavailable at once.
    let mut c = CallCore::new(spec(Origin::Sip, t0));
    drain(&mut c);
    c.handle_lookup(
        t0,
        view(vec![]),
        three_trunks([false, false, false, true]),
        NOW_UNIX,
    );
    assert_eq!(
        drain(&mut c),
        vec![
            Action::RejectCaller(480),
            Action::Finish {
                disposition: Disposition::Unavailable,
                cause: 480
            }
        ]
    );
}

#[test]
fn a_callee_with_too_many_calls_ringing_is_busy() {
    let t0 = Instant::now();
    let mut c = CallCore::new(spec(Origin::Sip, t0));
    drain(&mut c);
    let mut v = view(vec![dev(1, "desk", Status::Available, false)]);
    v.ringing = 2; // the spec's cap
    c.handle_lookup(t0, v, trunks(true), NOW_UNIX);
    assert_eq!(
        drain_all(&mut c),
        vec![
            Action::Observe(Observation::TooManyRinging { ringing: 2 }),
            Action::RejectCaller(486),
            Action::Finish {
                disposition: Disposition::Rejected,
                cause: 486
            }
        ]
    );
    // One below the cap rings as usual.
    let mut c = CallCore::new(spec(Origin::Sip, t0));
    drain(&mut c);
    let mut v = view(vec![dev(1, "desk", Status::Available, false)]);
    v.ringing = 1;
    c.handle_lookup(t0, v, trunks(true), NOW_UNIX);
    assert!(drain(&mut c).contains(&Action::OfferDevice {
        session: 1,
        video: false
    }));
}
