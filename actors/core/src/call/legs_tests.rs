//! The leg machine on a virtual clock, one behaviour per test.

use super::*;
use crate::cdr::CallRoute;
use Out::*;

fn devs(s: &[u64]) -> Vec<LegId> {
    s.iter().map(|s| LegId::Device(*s)).collect()
}

fn drain(c: &mut Legs) -> Vec<Out> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

fn start(route: Route, fallback: bool) -> (Legs, Instant) {
    let t0 = Instant::now();
    let mut c = Legs::new(Duration::from_secs(30));
    c.handle_route(t0, route, fallback);
    (c, t0)
}

#[test]
fn device_answers() {
    let (mut c, _) = start(Route::Devices(vec![1, 2]), true);
    assert_eq!(drain(&mut c), vec![Offer(1), Offer(2)]);
    c.handle_leg_ringing(LegId::Device(1));
    c.handle_leg_ringing(LegId::Device(2));
    assert_eq!(drain(&mut c), vec![CallerRinging], "180 once");
    c.handle_leg_answered(LegId::Device(2));
    assert_eq!(
        drain(&mut c),
        vec![
            Withdraw(LegId::Device(1), EndReason::AnsweredElsewhere),
            Connect(LegId::Device(2))
        ]
    );
    // A second answer from the loser is ended.
    c.handle_leg_answered(LegId::Device(1));
    assert_eq!(
        drain(&mut c),
        vec![Hangup(LegId::Device(1), EndReason::AnsweredElsewhere)]
    );
    c.handle_caller_gone(Disposition::Answered, 200);
    assert_eq!(
        drain(&mut c),
        vec![
            Hangup(LegId::Device(2), EndReason::RemoteHangup),
            Finish {
                disposition: Disposition::Answered,
                cause: 200
            }
        ]
    );
    assert!(c.is_ended());
}

#[test]
fn device_hangs_up_first() {
    let (mut c, _) = start(Route::Devices(vec![7]), true);
    c.handle_leg_answered(LegId::Device(7));
    drain(&mut c);
    c.handle_leg_hangup(Instant::now(), LegId::Device(7));
    assert_eq!(
        drain(&mut c),
        vec![
            ByeCaller,
            Finish {
                disposition: Disposition::Answered,
                cause: 200
            }
        ]
    );
}

#[test]
fn cancel_while_ringing() {
    let (mut c, _) = start(Route::Devices(vec![1]), true);
    drain(&mut c);
    c.handle_caller_cancel();
    assert_eq!(
        drain(&mut c),
        vec![
            Withdraw(LegId::Device(1), EndReason::Cancelled),
            RejectCaller(487),
            Finish {
                disposition: Disposition::Cancelled,
                cause: 487
            }
        ]
    );
    // Late answer after cancel gets hung up, no second finish.
    c.handle_leg_answered(LegId::Device(1));
    assert_eq!(
        drain(&mut c),
        vec![Hangup(LegId::Device(1), EndReason::AnsweredElsewhere)]
    );
}

#[test]
fn device_vanishes_then_trunk_fallback() {
    let (mut c, _) = start(Route::Devices(vec![1]), true);
    drain(&mut c);
    c.handle_leg_failed(Instant::now(), LegId::Device(1), LegFailure::Failed(480));
    assert_eq!(drain(&mut c), vec![StartTrunk(None)]);
    assert_eq!(c.route(), CallRoute::Pstn);
    c.handle_leg_failed(Instant::now(), LegId::Trunk, LegFailure::Failed(503));
    assert_eq!(
        drain(&mut c),
        vec![
            RejectCaller(480),
            Finish {
                disposition: Disposition::Unavailable,
                cause: 480
            }
        ]
    );
}

#[test]
fn decline_on_last_device_rejects() {
    let (mut c, _) = start(Route::Devices(vec![1, 2]), true);
    drain(&mut c);
    c.handle_leg_failed(Instant::now(), LegId::Device(1), LegFailure::Declined(603));
    assert_eq!(drain(&mut c), vec![]);
    c.handle_leg_failed(Instant::now(), LegId::Device(2), LegFailure::Failed(480));
    assert_eq!(
        drain(&mut c),
        vec![
            RejectCaller(603),
            Finish {
                disposition: Disposition::Rejected,
                cause: 603
            }
        ]
    );
}

#[test]
fn no_route() {
    let (mut c, _) = start(Route::Unavailable, false);
    assert_eq!(
        drain(&mut c),
        vec![
            RejectCaller(480),
            Finish {
                disposition: Disposition::Unavailable,
                cause: 480
            }
        ]
    );
}

#[test]
fn ring_timeout_on_virtual_clock() {
    let (mut c, t0) = start(Route::Trunk, false);
    assert_eq!(drain(&mut c), vec![StartTrunk(None)]);
    c.handle_timeout(t0 + Duration::from_secs(29));
    assert_eq!(drain(&mut c), vec![]);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    c.handle_timeout(t0 + Duration::from_secs(30));
    assert_eq!(
        drain(&mut c),
        vec![
            Withdraw(LegId::Trunk, EndReason::Timeout),
            RejectCaller(480),
            Finish {
                disposition: Disposition::NoAnswer,
                cause: 480
            }
        ]
    );
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn trunk_answers_then_hangs_up() {
    let (mut c, _) = start(Route::Trunk, false);
    drain(&mut c);
    c.handle_leg_ringing(LegId::Trunk);
    c.handle_leg_answered(LegId::Trunk);
    assert_eq!(drain(&mut c), vec![CallerRinging, Connect(LegId::Trunk)]);
    c.handle_leg_hangup(Instant::now(), LegId::Trunk);
    assert_eq!(
        drain(&mut c),
        vec![
            ByeCaller,
            Finish {
                disposition: Disposition::Answered,
                cause: 200
            }
        ]
    );
}

#[test]
fn reroute_moves_the_offer_and_keeps_ringback() {
    let (mut c, _) = start(Route::Devices(vec![1]), true);
    drain(&mut c);
    c.handle_leg_ringing(LegId::Device(1));
    assert_eq!(drain(&mut c), vec![CallerRinging]);
    // Device 1 went away, device 2 became available.
    assert!(c.handle_reroute(devs(&[2])));
    assert_eq!(
        drain(&mut c),
        vec![Withdraw(LegId::Device(1), EndReason::Rerouted), Offer(2)]
    );
    c.handle_leg_ringing(LegId::Device(2));
    assert_eq!(drain(&mut c), vec![], "no second 180");
    // The same presence again: nothing to do.
    assert!(!c.handle_reroute(devs(&[2])));
    c.handle_leg_answered(LegId::Device(2));
    assert_eq!(drain(&mut c), vec![Connect(LegId::Device(2))]);
    assert_eq!(c.reroutes(), 1);
    assert!(!c.handle_reroute(devs(&[1])), "answered calls stay put");
}

#[test]
fn reroute_adds_a_device_and_cancels_the_trunk() {
    let (mut c, _) = start(Route::Trunk, true);
    assert_eq!(drain(&mut c), vec![StartTrunk(None)]);
    assert!(c.handle_reroute(devs(&[5])));
    assert_eq!(
        drain(&mut c),
        vec![Withdraw(LegId::Trunk, EndReason::Rerouted), Offer(5)]
    );
    assert_eq!(c.route(), CallRoute::Im);
    // The trunk is not tried a second time; with nothing else to ring the call keeps
    // ringing the device.
    assert!(!c.handle_reroute(vec![LegId::Trunk]));
    assert_eq!(drain(&mut c), vec![]);
}

#[test]
fn reroute_to_nowhere_fails_the_call_and_declined_devices_are_not_reoffered() {
    let (mut c, _) = start(Route::Devices(vec![1, 2]), false);
    drain(&mut c);
    c.handle_leg_failed(Instant::now(), LegId::Device(1), LegFailure::Declined(603));
    assert!(!c.handle_reroute(devs(&[1, 2])), "1 declined: still just 2");
    assert!(c.handle_reroute(vec![]));
    assert_eq!(
        drain(&mut c),
        vec![
            Withdraw(LegId::Device(2), EndReason::Rerouted),
            RejectCaller(480),
            Finish {
                disposition: Disposition::Unavailable,
                cause: 480
            }
        ]
    );
}

#[test]
fn reroutes_are_bounded() {
    let (mut c, _) = start(Route::Devices(vec![0]), false);
    drain(&mut c);
    let mut changes = 0;
    for i in 1..100u64 {
        if c.handle_reroute(devs(&[i])) {
            changes += 1;
        }
    }
    assert_eq!(changes, MAX_REROUTES);
    assert!(c.is_ringing());
}

fn plan_steps(steps: &[(&[LegId], Option<u64>)]) -> Plan {
    Plan::Ring(
        steps
            .iter()
            .map(|(l, t)| Step {
                legs: l.to_vec(),
                timeout: t.map(Duration::from_secs),
            })
            .collect(),
    )
}

#[test]
fn sequential_steps_advance_on_their_timeout() {
    let t0 = Instant::now();
    let mut c = Legs::new(Duration::from_secs(60));
    c.handle_plan(
        t0,
        plan_steps(&[
            (&[LegId::Device(1)], Some(10)),
            (&[LegId::Device(2), LegId::Trunk], None),
        ]),
        true,
    );
    assert_eq!(drain(&mut c), vec![Offer(1)]);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    c.handle_leg_ringing(LegId::Device(1));
    drain(&mut c);
    c.handle_timeout(t0 + Duration::from_secs(10));
    assert_eq!(
        drain(&mut c),
        vec![
            Withdraw(LegId::Device(1), EndReason::Rerouted),
            Offer(2),
            StartTrunk(None)
        ]
    );
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + Duration::from_secs(60)),
        "the last step rings until the ring timeout"
    );
    c.handle_leg_answered(LegId::Trunk);
    assert_eq!(
        drain(&mut c),
        vec![
            Withdraw(LegId::Device(2), EndReason::AnsweredElsewhere),
            Connect(LegId::Trunk)
        ]
    );
}

#[test]
fn a_vanished_step_moves_on_at_once_but_a_decline_ends_the_call() {
    let t0 = Instant::now();
    let plan = || plan_steps(&[(&[LegId::Device(1)], Some(10)), (&[LegId::Device(2)], None)]);
    let mut c = Legs::new(Duration::from_secs(60));
    c.handle_plan(t0, plan(), false);
    drain(&mut c);
    c.handle_leg_failed(t0, LegId::Device(1), LegFailure::Failed(480));
    assert_eq!(drain(&mut c), vec![Offer(2)]);
    let mut c = Legs::new(Duration::from_secs(60));
    c.handle_plan(t0, plan(), false);
    drain(&mut c);
    c.handle_leg_failed(t0, LegId::Device(1), LegFailure::Declined(603));
    assert_eq!(
        drain(&mut c),
        vec![
            RejectCaller(603),
            Finish {
                disposition: Disposition::Rejected,
                cause: 603
            }
        ]
    );
}

#[test]
fn last_step_with_a_timeout_ends_as_no_answer() {
    let t0 = Instant::now();
    let mut c = Legs::new(Duration::from_secs(60));
    c.handle_plan(
        t0,
        plan_steps(&[
            (&[LegId::Device(1)], Some(5)),
            (&[LegId::Device(2)], Some(5)),
        ]),
        false,
    );
    drain(&mut c);
    c.handle_timeout(t0 + Duration::from_secs(5));
    assert_eq!(
        drain(&mut c),
        vec![Withdraw(LegId::Device(1), EndReason::Rerouted), Offer(2)]
    );
    c.handle_timeout(t0 + Duration::from_secs(10));
    assert_eq!(
        drain(&mut c),
        vec![
            Withdraw(LegId::Device(2), EndReason::Timeout),
            RejectCaller(480),
            Finish {
                disposition: Disposition::NoAnswer,
                cause: 480
            }
        ]
    );
}

#[test]
fn forward_and_reject_plans() {
    let t0 = Instant::now();
    let mut c = Legs::new(Duration::from_secs(60));
    c.handle_plan(t0, Plan::Forward("+15550199999".into()), false);
    assert_eq!(drain(&mut c), vec![StartTrunk(Some("+15550199999".into()))]);
    assert_eq!(c.route(), CallRoute::Forward);
    let mut c = Legs::new(Duration::from_secs(60));
    c.handle_plan(t0, Plan::Reject(486), true);
    assert_eq!(
        drain(&mut c),
        vec![
            RejectCaller(486),
            Finish {
                disposition: Disposition::Rejected,
                cause: 486
            }
        ]
    );
}

#[test]
fn media_timeout_ends_an_answered_call_only() {
    let (mut c, _) = start(Route::Devices(vec![1]), false);
    drain(&mut c);
    c.handle_media_timeout();
    assert_eq!(drain(&mut c), vec![], "a ringing call has no media yet");
    c.handle_leg_answered(LegId::Device(1));
    drain(&mut c);
    c.handle_media_timeout();
    assert_eq!(
        drain(&mut c),
        vec![
            Hangup(LegId::Device(1), EndReason::MediaTimeout),
            ByeCaller,
            Finish {
                disposition: Disposition::Answered,
                cause: 408
            }
        ]
    );
}

#[test]
fn an_unacknowledged_answer_ends_both_sides_with_a_bye() {
    let (mut c, _) = start(Route::Devices(vec![1]), false);
    c.handle_leg_answered(LegId::Device(1));
    drain(&mut c);
    c.handle_ack_timeout();
    assert_eq!(
        drain(&mut c),
        vec![
            Hangup(LegId::Device(1), EndReason::RemoteHangup),
            ByeCaller,
            Finish {
                disposition: Disposition::Failed,
                cause: 408
            }
        ]
    );
    assert_eq!(
        (c.disposition(), c.cause()),
        (Some(Disposition::Failed), 408)
    );
}
