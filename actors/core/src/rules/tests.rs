//! The rules of `docs/routing.md` ("Preferences as rules"), one table row per case.

use std::collections::HashMap;
use std::time::Duration;

use parley_codecs::control::Status::{self, *};

use super::*;
use crate::plan::LegId::{Device, Trunk};

fn dev(session: u64, name: &str, status: Status, idle_ms: u64) -> DeviceState {
    DeviceState {
        session,
        device: name.into(),
        status,
        idle_ms,
        note: None,
        video: name == "desk",
        opus: false,
    }
}

/// 2026-11-30 is a Monday; 09:30 and 23:30 UTC.
const MON_0930: u64 = 1_796_031_000;
const MON_2330: u64 = MON_0930 + 14 * 3600;

struct Case {
    name: &'static str,
    prefs: &'static str,
    devices: Vec<DeviceState>,
    history: Vec<(&'static str, f64)>,
    caller: &'static str,
    known: bool,
    trunk_up: bool,
    now: u64,
    want: Plan,
    rule: Option<&'static str>,
}

fn case(
    name: &'static str,
    prefs: &'static str,
    devices: Vec<DeviceState>,
    want: Plan,
    rule: Option<&'static str>,
) -> Case {
    Case {
        name,
        prefs,
        devices,
        history: vec![],
        caller: "+15557770001",
        known: false,
        trunk_up: true,
        now: MON_0930,
        want,
        rule,
    }
}

fn ring(steps: &[(&[LegId], Option<u64>)]) -> Plan {
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
fn table() {
    let desk = || dev(1, "desk", Available, 5_000);
    let mobile = || dev(2, "mobile", Available, 100);
    let seq = r#"{"rules":[{"name":"desk then all","then":{"action":"ring","steps":[
        {"targets":[{"device":"desk"}],"timeout_secs":15},{"targets":["all_available","pstn"]}]}}]}"#;
    let predicted = r#"{"rules":[{"name":"predicted first","then":{"action":"ring","steps":[
        {"targets":["predicted"],"timeout_secs":10},{"targets":["all_online"]}]}}]}"#;
    let nights = r#"{"utc_offset_minutes":60,"rules":[{"name":"nights","when":{"time":{"from":"22:00","to":"07:00"}},
        "then":{"action":"reject","code":480}}]}"#;
    let weekdays = r#"{"rules":[{"name":"office hours","when":{"time":{"from":"09:00","to":"17:00","days":["mon","tue","wed","thu","fri"]}},
        "then":{"action":"ring","steps":[{"targets":[{"device":"desk"}]}]}}]}"#;
    let dnd = r#"{"rules":[{"name":"dnd forwards","when":{"status":["do_not_disturb"]},"then":{"action":"forward","number":"+15550199999"}}]}"#;
    let vip = r#"{"rules":[{"name":"vip","when":{"callers":["+15557770001"]},"then":{"action":"ring","steps":[{"targets":["all_online","pstn"]}]}},
        {"name":"strangers","when":{"caller_known":false},"then":{"action":"reject"}}]}"#;
    let trunk_down = r#"{"rules":[{"name":"no voice network","when":{"voice_network":"down"},"then":{"action":"ring","steps":[{"targets":["all_online"]}]}}]}"#;
    let mut rows = vec![
        case(
            "no rules: default policy",
            "{}",
            vec![desk(), mobile()],
            ring(&[(&[Device(2), Device(1)], None)]),
            None,
        ),
        case(
            "sequential: desk for 15 s, then everything",
            seq,
            vec![desk(), mobile()],
            ring(&[
                (&[Device(1)], Some(15)),
                (&[Device(2), Device(1), Trunk], None),
            ]),
            Some("desk then all"),
        ),
        case(
            "a step naming an offline device is skipped",
            seq,
            vec![mobile()],
            ring(&[(&[Device(2), Trunk], None)]),
            Some("desk then all"),
        ),
        case(
            "nights reject in local time (23:30 UTC is 00:30 at +01:00)",
            nights,
            vec![desk()],
            Plan::Reject(480),
            Some("nights"),
        ),
        case(
            "weekday office hours ring the desk only",
            weekdays,
            vec![desk(), mobile()],
            ring(&[(&[Device(1)], None)]),
            Some("office hours"),
        ),
        case(
            "DND on every device forwards",
            dnd,
            vec![dev(1, "desk", DoNotDisturb, 0)],
            Plan::Forward("+15550199999".into()),
            Some("dnd forwards"),
        ),
        case(
            "not DND: forwarding rule does not match",
            dnd,
            vec![desk()],
            ring(&[(&[Device(1)], None)]),
            None,
        ),
        case(
            "a listed caller rings everything",
            vip,
            vec![dev(1, "desk", Away, 0)],
            ring(&[(&[Device(1), Trunk], None)]),
            Some("vip"),
        ),
        case(
            "voice network up: the down-rule does not match, PSTN line",
            trunk_down,
            vec![dev(3, "laptop", Busy, 0)],
            ring(&[(&[Trunk], None)]),
            None,
        ),
        case(
            "rule ring resolves to nothing: default policy",
            r#"{"rules":[{"then":{"action":"ring","steps":[{"targets":[{"device":"tablet"}]}]}}]}"#,
            vec![desk()],
            ring(&[(&[Device(1)], None)]),
            None,
        ),
        case(
            "no rule, nobody reachable, PSTN disabled",
            r#"{"pstn_fallback":false}"#,
            vec![],
            Plan::Unavailable,
            None,
        ),
    ];
    let mut r = case(
        "nights: daytime does not match",
        nights,
        vec![desk()],
        ring(&[(&[Device(1)], None)]),
        None,
    );
    r.now = MON_0930;
    rows.push(r);
    rows[3].now = MON_2330;
    let mut r = case(
        "weekend: office-hours rule does not match",
        weekdays,
        vec![desk(), mobile()],
        ring(&[(&[Device(2), Device(1)], None)]),
        None,
    );
    r.now = MON_0930 - 2 * 86_400; // Saturday
    rows.push(r);
    let mut r = case(
        "voice network down: ring online devices",
        trunk_down,
        vec![dev(3, "laptop", Busy, 0)],
        ring(&[(&[Device(3)], None)]),
        Some("no voice network"),
    );
    r.trunk_up = false;
    rows.push(r);
    let mut r = case(
        "unknown caller rejected 486",
        vip,
        vec![desk()],
        Plan::Reject(486),
        Some("strangers"),
    );
    r.caller = "+15550000000";
    rows.push(r);
    let mut r = case(
        "known caller, not listed: default",
        vip,
        vec![desk()],
        ring(&[(&[Device(1)], None)]),
        None,
    );
    (r.caller, r.known) = ("+15550000000", true);
    rows.push(r);
    let mut r = case(
        "trunk down: forward is skipped, default rings the device",
        dnd,
        vec![dev(1, "desk", DoNotDisturb, 0), dev(2, "mobile", Away, 0)],
        ring(&[(&[Device(2)], None)]),
        None,
    );
    // Aggregate is away (mobile), so the DND rule does not match; with the trunk down the
    // default policy rings the away device over the packet network.
    r.trunk_up = false;
    rows.push(r);
    let mut r = case(
        "prediction: the device that answers most rings first",
        predicted,
        vec![desk(), mobile()],
        ring(&[(&[Device(1)], Some(10)), (&[Device(1), Device(2)], None)]),
        Some("predicted first"),
    );
    r.history = vec![("desk", 3.5), ("mobile", 0.4)];
    rows.push(r);
    let mut r = case(
        "prediction without history: most recent input first",
        predicted,
        vec![desk(), mobile()],
        ring(&[(&[Device(2)], Some(10)), (&[Device(2), Device(1)], None)]),
        Some("predicted first"),
    );
    r.history = vec![];
    rows.push(r);

    for c in rows {
        check(c, Media::Audio);
    }
}

#[test]
fn video_calls_ring_video_devices_unless_audio_fallback_is_allowed() {
    // `dev()` marks the device named "desk" as video-capable.
    let desk = || dev(1, "desk", Available, 5_000);
    let mobile = || dev(2, "mobile", Available, 100);
    let rows = vec![
        case(
            "video: only the video device rings",
            "{}",
            vec![desk(), mobile()],
            ring(&[(&[Device(1)], None)]),
            None,
        ),
        case(
            "video: audio-only devices are not rung",
            "{}",
            vec![mobile()],
            Plan::Unavailable,
            None,
        ),
        case(
            "video with audio fallback: everything as usual",
            r#"{"video_audio_fallback":true}"#,
            vec![desk(), mobile()],
            ring(&[(&[Device(2), Device(1)], None)]),
            None,
        ),
        case(
            "video: the PSTN line is audio-only",
            "{}",
            vec![],
            Plan::Unavailable,
            None,
        ),
        case(
            "video with fallback: the PSTN line",
            r#"{"video_audio_fallback":true}"#,
            vec![],
            ring(&[(&[Trunk], None)]),
            None,
        ),
    ];
    for c in rows {
        check(c, Media::Video);
    }
}

fn check(c: Case, media: Media) {
    let prefs = Preferences::from_json(c.prefs).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let history: HashMap<String, f64> =
        c.history.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let ctx = CallContext {
        devices: &c.devices,
        history: &history,
        caller: c.caller,
        caller_known: c.known,
        media,
        voice_network_up: c.trunk_up,
        now_unix: c.now,
    };
    let (got, rule) = plan(&prefs, &ctx);
    assert_eq!(got, c.want, "{}", c.name);
    assert_eq!(rule.as_deref(), c.rule, "{}", c.name);
}

#[test]
fn bad_rules_are_refused_with_the_rule_index() {
    let bad = [
        (r#"{"rules":[{"then":{"action":"explode"}}]}"#, "rules:"),
        (r#"{"rulez":[]}"#, "rules:"),
        (
            r#"{"rules":[{"then":{"action":"reject"}},{"then":{"action":"reject","code":200}}]}"#,
            "rules[1]",
        ),
        (
            r#"{"rules":[{"when":{"time":{"from":"25:00","to":"07:00"}},"then":{"action":"reject"}}]}"#,
            "rules[0]",
        ),
        (
            r#"{"rules":[{"then":{"action":"ring","steps":[]}}]}"#,
            "rules[0]",
        ),
        (
            r#"{"rules":[{"then":{"action":"forward","number":"12"}}]}"#,
            "rules[0]",
        ),
    ];
    for (json, want) in bad {
        let e = Preferences::from_json(json).unwrap_err().to_string();
        assert!(e.starts_with(want), "{json}: {e}");
    }
}

#[test]
fn time_windows_follow_the_users_zone_across_daylight_saving_changes() {
    let office = |zone: &str| {
        format!(
            r#"{{{zone}"rules":[{{"name":"office","when":{{"time":{{"from":"09:00","to":"17:00","days":["mon","tue","wed","thu","fri"]}}}},
            "then":{{"action":"reject","code":486}}}}]}}"#
        )
    };
    let paris = Preferences::from_json(&office(r#""time_zone":"Europe/Paris","#)).unwrap();
    let fixed = Preferences::from_json(&office(r#""utc_offset_minutes":60,"#)).unwrap();
    let at = |prefs: &Preferences, now_unix: u64| {
        let devices = [dev(1, "desk", Available, 0)];
        let history = HashMap::new();
        let ctx = CallContext {
            devices: &devices,
            history: &history,
            caller: "+15557770001",
            caller_known: false,
            media: Media::Audio,
            voice_network_up: true,
            now_unix,
        };
        plan(prefs, &ctx).1.is_some()
    };
    // Paris leaves summer time on Sunday 2026-10-25 (UTC+2 → UTC+1).
    // Friday 07:30 UTC is 09:30 in Paris (summer): in office hours.
    const FRI_0730_UTC: u64 = 1_792_740_600;
    // Monday 07:30 UTC is 08:30 in Paris (winter): not yet; 08:30 UTC is 09:30: in.
    const MON_0730_UTC: u64 = 1_792_999_800;
    const MON_0830_UTC: u64 = 1_793_003_400;
    assert!(at(&paris, FRI_0730_UTC));
    assert!(!at(&paris, MON_0730_UTC));
    assert!(at(&paris, MON_0830_UTC));
    // A fixed +01:00 is an hour wrong all summer.
    assert!(!at(&fixed, FRI_0730_UTC));
    // And into summer time, Sunday 2026-03-29: Friday 08:30 UTC is 09:30 (winter), Monday
    // 07:30 UTC is 09:30 (summer).
    assert!(at(&paris, 1_774_600_200));
    assert!(at(&paris, 1_774_855_800));
    assert!(!at(&fixed, 1_774_855_800));
    assert_eq!(local_offset_minutes(&paris, MON_0730_UTC), 60);
    assert_eq!(local_offset_minutes(&paris, FRI_0730_UTC), 120);
    // Unknown zones are refused by name.
    let e = Preferences::from_json(&office(r#""time_zone":"Mars/Olympus","#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Mars/Olympus"), "{e}");
}
