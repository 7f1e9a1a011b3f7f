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
