//! Routing preferences as rules, and the plan they produce.
//!
//! A user's [`Preferences`] hold an ordered list of [`Rule`]s: the first rule whose
//! conditions all hold decides what happens to the call; with no matching rule (or when a
//! rule's ring steps resolve to nothing reachable) the default policy of
//! [`crate::router::route`] applies. Evaluation is a pure function of the call context —
//! devices with their presence and answer history, caller, time, voice-network state — so
//! every row of `docs/routing.md` is a unit test.
//!
//! Rules are JSON (stored per user, edited through the admin API and the IM protocol):
//!
//! ```json
//! {"time_zone": "Europe/Paris", "rules": [
//!   {"name": "nights", "when": {"time": {"from": "22:00", "to": "07:00"}},
//!    "then": {"action": "reject", "code": 480}},
//!   {"name": "known callers", "when": {"caller_known": true},
//!    "then": {"action": "ring", "steps": [
//!       {"targets": ["predicted"], "timeout_secs": 10},
//!       {"targets": ["all_available", "pstn"]}]}}]}
//! ```

use std::collections::HashMap;
use std::time::Duration;

use parley_codecs::control::Status;
use serde::{Deserialize, Serialize};

pub use crate::plan::{LegId, Plan, Step};
use crate::router::{self, DeviceState, Route};

/// Most rules per user.
pub const MAX_RULES: usize = 32;

/// A user's routing preferences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    /// Rules, first match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// The user's time zone, an IANA name (`Europe/Paris`): time windows are local time
    /// there, daylight saving included. Takes precedence over `utc_offset_minutes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// A fixed offset from UTC, in minutes, for users without a `time_zone`.
    #[serde(default)]
    pub utc_offset_minutes: i32,
    /// Whether the default policy may ring the PSTN line.
    #[serde(default = "yes")]
    pub pstn_fallback: bool,
    /// Whether a video call may ring devices (and the PSTN line) that take audio only.
    #[serde(default)]
    pub video_audio_fallback: bool,
}

fn yes() -> bool {
    true
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            time_zone: None,
            utc_offset_minutes: 0,
            pstn_fallback: true,
            video_audio_fallback: false,
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A label for logs.
    #[serde(default)]
    pub name: String,
    /// Conditions, all of which must hold (an empty set always holds).
    #[serde(default)]
    pub when: Conditions,
    /// What to do.
    pub then: Action,
}

/// Conditions of a rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    /// The user's aggregate presence is one of these.
    #[serde(default)]
    pub status: Vec<Status>,
    /// At least one of these devices (by name) is connected.
    #[serde(default)]
    pub devices_online: Vec<String>,
    /// Local time window.
    #[serde(default)]
    pub time: Option<TimeWindow>,
    /// The caller is one of these numbers (E.164) or URIs.
    #[serde(default)]
    pub callers: Vec<String>,
    /// The caller is (`true`) or is not (`false`) in the user's address book.
    #[serde(default)]
    pub caller_known: Option<bool>,
    /// The call's media.
    #[serde(default)]
    pub media: Option<Media>,
    /// The voice network (the trunk to the user's PSTN line) is up or down.
    #[serde(default)]
    pub voice_network: Option<Network>,
}

/// A daily window in the user's local time, `from` inclusive, `to` exclusive; a window
/// whose `to` is before `from` wraps midnight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    /// `HH:MM`.
    pub from: String,
    /// `HH:MM`.
    pub to: String,
    /// Days the window applies on (`mon` … `sun`); empty means every day.
    #[serde(default)]
    pub days: Vec<Weekday>,
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// Media of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Media {
    /// Audio only.
    Audio,
    /// Audio and video.
    Video,
}

/// Network state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Up.
    Up,
    /// Down.
    Down,
}

/// What a rule does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Ring targets, step by step; each step rings its targets in parallel.
    Ring {
        /// Steps in order.
        steps: Vec<RingStep>,
    },
    /// Forward the call to another number through the trunk.
    Forward {
        /// E.164 number.
        number: String,
    },
    /// Refuse the call with this SIP status (default 486 Busy Here).
    Reject {
        /// SIP status, 400–699.
        #[serde(default = "busy")]
        code: u16,
    },
}

fn busy() -> u16 {
    486
}

/// One step of a ring action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingStep {
    /// What to ring.
    pub targets: Vec<Target>,
    /// Move to the next step after this long (the last step rings until the call's ring
    /// timeout).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Something a step rings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The device most likely to be answered (prediction).
    Predicted,
    /// Every `available` device.
    AllAvailable,
    /// Every connected device that is not `do_not_disturb` or `offline`.
    AllOnline,
    /// A device by name (if connected and not `do_not_disturb`/`offline`).
    Device(String),
    /// The user's PSTN line (if the voice network is up).
    Pstn,
}

/// Why preferences were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// Not valid JSON of the documented shape.
    #[error("rules: {0}")]
    Syntax(String),
    /// Valid shape, unusable value.
    #[error("rules[{index}]: {message}")]
    Invalid {
        /// Which rule.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

impl Preferences {
    /// Parses and validates preferences JSON.
    pub fn from_json(json: &str) -> Result<Self, RulesError> {
        let p: Preferences =
            serde_json::from_str(json).map_err(|e| RulesError::Syntax(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), RulesError> {
        if self.rules.len() > MAX_RULES {
            return Err(RulesError::Invalid {
                index: MAX_RULES,
                message: format!("at most {MAX_RULES} rules"),
            });
        }
        if self.utc_offset_minutes.abs() > 14 * 60 {
            return Err(RulesError::Syntax(
                "utc_offset_minutes must be within ±840".into(),
            ));
        }
        if let Some(tz) = &self.time_zone
            && jiff::tz::TimeZone::get(tz).is_err()
        {
            return Err(RulesError::Syntax(format!(
                "time_zone {tz:?} is not an IANA time zone name (e.g. Europe/Paris)"
            )));
        }
        for (index, r) in self.rules.iter().enumerate() {
            let bad = |message: &str| {
                Err(RulesError::Invalid {
                    index,
                    message: message.into(),
                })
            };
            if let Some(t) = &r.when.time
                && (minutes(&t.from).is_none() || minutes(&t.to).is_none())
            {
                return bad("time window needs HH:MM from and to");
            }
            match &r.then {
                Action::Ring { steps }
                    if steps.is_empty() || steps.iter().any(|s| s.targets.is_empty()) =>
                {
                    return bad("ring needs at least one step, each with at least one target");
                }
                Action::Ring { steps } if steps.iter().any(|s| s.timeout_secs == Some(0)) => {
                    return bad("step timeout_secs must be at least 1");
                }
                Action::Reject { code } if !(400..=699).contains(code) => {
                    return bad("reject code must be 400-699");
                }
                Action::Forward { number } if !number.starts_with('+') || number.len() < 4 => {
                    return bad("forward number must be E.164 (+ and digits)");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// What rules see of a call.
#[derive(Debug, Clone)]
pub struct CallContext<'a> {
    /// The callee's connected devices.
    pub devices: &'a [DeviceState],
    /// Answer-history score per device name (higher: answered more, more recently).
    pub history: &'a HashMap<String, f64>,
    /// Caller number or URI.
    pub caller: &'a str,
    /// Whether the caller is in the callee's address book.
    pub caller_known: bool,
    /// The call's media.
    pub media: Media,
    /// Whether the trunk to the PSTN line is up.
    pub voice_network_up: bool,
    /// Now, seconds since the Unix epoch (UTC).
    pub now_unix: u64,
}

/// The plan for a call, and which rule made it (`None`: the default policy).
///
/// A video call rings only devices that declared video, unless the user allows audio
/// fallback (`video_audio_fallback`); the PSTN line counts as audio-only.
pub fn plan(prefs: &Preferences, ctx: &CallContext<'_>) -> (Plan, Option<String>) {
    let (p, rule) = plan_any_media(prefs, ctx);
    if ctx.media == Media::Video && !prefs.video_audio_fallback {
        return (video_only(p, ctx.devices), rule);
    }
    (p, rule)
}

fn video_only(plan: Plan, devices: &[DeviceState]) -> Plan {
    let takes_video = |l: &LegId| match l {
        LegId::Device(s) => devices.iter().any(|d| d.session == *s && d.video),
        LegId::Trunk => false,
    };
    match plan {
        Plan::Ring(steps) => {
            let steps: Vec<Step> = steps
                .into_iter()
                .map(|mut s| {
                    s.legs.retain(takes_video);
                    s
                })
                .filter(|s| !s.legs.is_empty())
                .collect();
            if steps.is_empty() {
                Plan::Unavailable
            } else {
                Plan::Ring(steps)
            }
        }
        Plan::Forward(_) | Plan::Dial(_) => Plan::Unavailable,
        other => other,
    }
}

/// The user's offset from UTC at `now_unix`, minutes: their time zone's (daylight saving
/// included), or the fixed offset.
pub fn local_offset_minutes(prefs: &Preferences, now_unix: u64) -> i32 {
    let zone = prefs
        .time_zone
        .as_deref()
        .and_then(|name| jiff::tz::TimeZone::get(name).ok());
    match (zone, i64::try_from(now_unix).ok()) {
        (Some(tz), Some(secs)) => jiff::Timestamp::from_second(secs)
            .map(|t| tz.to_offset(t).seconds() / 60)
            .unwrap_or(prefs.utc_offset_minutes),
        _ => prefs.utc_offset_minutes,
    }
}

fn plan_any_media(prefs: &Preferences, ctx: &CallContext<'_>) -> (Plan, Option<String>) {
    let offset = local_offset_minutes(prefs, ctx.now_unix);
    for r in &prefs.rules {
        if !matches(&r.when, offset, ctx) {
            continue;
        }
        let p = match &r.then {
            Action::Reject { code } => Plan::Reject(*code),
            Action::Forward { number } if ctx.voice_network_up => Plan::Forward(number.clone()),
            Action::Forward { .. } => continue,
            Action::Ring { steps } => {
                let steps: Vec<Step> = steps
                    .iter()
                    .map(|s| Step {
                        legs: resolve(&s.targets, ctx),
                        timeout: s.timeout_secs.map(Duration::from_secs),
                    })
                    .filter(|s| !s.legs.is_empty())
                    .collect();
                if steps.is_empty() {
                    continue; // nothing this rule names is reachable: next rule
                }
                Plan::Ring(steps)
            }
        };
        return (p, Some(r.name.clone()));
    }
    let default = router::route(
        ctx.devices,
        &router::Preferences {
            pstn_fallback: prefs.pstn_fallback,
        },
        ctx.voice_network_up,
    );
    let plan = match default {
        Route::Devices(s) => Plan::Ring(vec![Step {
            legs: s.into_iter().map(LegId::Device).collect(),
            timeout: None,
        }]),
        Route::Trunk => Plan::Ring(vec![Step {
            legs: vec![LegId::Trunk],
            timeout: None,
        }]),
        Route::Unavailable => Plan::Unavailable,
    };
    (plan, None)
}

fn reachable(s: Status) -> bool {
    matches!(s, Status::Available | Status::Away | Status::Busy)
}

/// Devices ranked by prediction: status (available first), answer history, then recency of
/// input.
pub fn predict<'a>(
    devices: &'a [DeviceState],
    history: &HashMap<String, f64>,
) -> Vec<&'a DeviceState> {
    let mut ds: Vec<&DeviceState> = devices.iter().filter(|d| reachable(d.status)).collect();
    ds.sort_by(|a, b| {
        let avail = |d: &DeviceState| d.status == Status::Available;
        let score = |d: &DeviceState| history.get(&d.device).copied().unwrap_or(0.0);
        avail(b)
            .cmp(&avail(a))
            .then(score(b).total_cmp(&score(a)))
            .then(a.idle_ms.cmp(&b.idle_ms))
            .then(a.session.cmp(&b.session))
    });
    ds
}

fn resolve(targets: &[Target], ctx: &CallContext<'_>) -> Vec<LegId> {
    let ranked = predict(ctx.devices, ctx.history);
    let mut legs = Vec::new();
    let mut add = |l: LegId| {
        if !legs.contains(&l) {
            legs.push(l);
        }
    };
    for t in targets {
        match t {
            Target::Predicted => {
                if let Some(d) = ranked.first() {
                    add(LegId::Device(d.session));
                }
            }
            Target::AllAvailable => ranked
                .iter()
                .filter(|d| d.status == Status::Available)
                .for_each(|d| add(LegId::Device(d.session))),
            Target::AllOnline => ranked.iter().for_each(|d| add(LegId::Device(d.session))),
            Target::Device(name) => ranked
                .iter()
                .filter(|d| &d.device == name)
                .for_each(|d| add(LegId::Device(d.session))),
            Target::Pstn if ctx.voice_network_up => add(LegId::Trunk),
            Target::Pstn => {}
        }
    }
    legs
}

fn matches(c: &Conditions, offset_min: i32, ctx: &CallContext<'_>) -> bool {
    if !c.status.is_empty()
        && !c
            .status
            .contains(&router::aggregate(ctx.devices.iter()).status)
    {
        return false;
    }
    if !c.devices_online.is_empty()
        && !ctx
            .devices
            .iter()
            .any(|d| c.devices_online.contains(&d.device))
    {
        return false;
    }
    if !c.callers.is_empty() && !c.callers.iter().any(|n| n == ctx.caller) {
        return false;
    }
    if c.caller_known.is_some_and(|k| k != ctx.caller_known) {
        return false;
    }
    if c.media.is_some_and(|m| m != ctx.media) {
        return false;
    }
    if let Some(n) = c.voice_network
        && (n == Network::Up) != ctx.voice_network_up
    {
        return false;
    }
    if let Some(t) = &c.time
        && !in_window(t, offset_min, ctx.now_unix)
    {
        return false;
    }
    true
}

fn in_window(t: &TimeWindow, offset_min: i32, now_unix: u64) -> bool {
    let (Some(from), Some(to)) = (minutes(&t.from), minutes(&t.to)) else {
        return false;
    };
    let local = now_unix as i64 + i64::from(offset_min) * 60;
    let day_minute = (local.rem_euclid(86_400) / 60) as u32;
    // 1970-01-01 was a Thursday.
    let weekday = |days_since_epoch: i64| {
        [
            Weekday::Thu,
            Weekday::Fri,
            Weekday::Sat,
            Weekday::Sun,
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
        ][days_since_epoch.rem_euclid(7) as usize]
    };
    let today = local.div_euclid(86_400);
    let day_ok = |d: i64| t.days.is_empty() || t.days.contains(&weekday(d));
    if from <= to {
        (from..to).contains(&day_minute) && day_ok(today)
    } else if day_minute >= from {
        day_ok(today) // evening part: the window started today
    } else {
        day_minute < to && day_ok(today - 1) // morning part: it started yesterday
    }
}

#[cfg(test)]
mod tests;
