//! The routing policy: where a call for a user should ring.
//!
//! A pure function of the user's presence snapshot, preferences and trunk state, so that
//! every rule is a table row in a unit test (`docs/routing.md` has the table).

use parley_codecs::control::Status;

/// One connected device as presence sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Session id of the device's connection.
    pub session: u64,
    /// Device name chosen by the client.
    pub device: String,
    /// Reported status.
    pub status: Status,
    /// Milliseconds since the last input on the device, as last reported.
    pub idle_ms: u64,
    /// Free-text note, as last reported.
    pub note: Option<String>,
    /// Whether the device declared it can take video.
    pub video: bool,
    /// Whether the device declared Opus (calls between two such devices carry Opus).
    pub opus: bool,
}

/// The user's routing preferences (grows into rules in the routing issue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preferences {
    /// Ring the PSTN line through the trunk when no IM device can take the call.
    pub pstn_fallback: bool,
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            pstn_fallback: true,
        }
    }
}

/// A user's presence as others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// Best device status.
    pub status: Status,
    /// That device's note.
    pub note: Option<String>,
    /// Connected devices.
    pub devices: u32,
}

fn rank(s: Status) -> u8 {
    match s {
        Status::Available => 4,
        Status::Busy => 3,
        Status::Away => 2,
        Status::DoNotDisturb => 1,
        Status::Offline => 0,
    }
}

/// Aggregates device presence: the best status wins (available > busy > away > do not
/// disturb > offline); no device means offline.
pub fn aggregate<'a>(devices: impl Iterator<Item = &'a DeviceState>) -> Aggregate {
    let mut best: Option<&DeviceState> = None;
    let mut n = 0;
    for d in devices {
        n += 1;
        if best.is_none_or(|b| rank(d.status) > rank(b.status)) {
            best = Some(d);
        }
    }
    Aggregate {
        status: best.map_or(Status::Offline, |b| b.status),
        note: best.and_then(|b| b.note.clone()),
        devices: n,
    }
}

/// Where to ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Ring these device sessions in parallel, most recently active first.
    Devices(Vec<u64>),
    /// Ring the user's PSTN line through the trunk.
    Trunk,
    /// Nowhere to ring (SIP 480).
    Unavailable,
}

impl Route {
    /// Label for metrics and CDRs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Devices(_) => "im",
            Route::Trunk => "pstn",
            Route::Unavailable => "none",
        }
    }
}

/// Decides the route.
///
/// 1. Ring every `available` device, most recently active first.
/// 2. Otherwise ring the PSTN line, when the trunk is up and the user allows it.
/// 3. Otherwise (the voice network is down, or the user does not want the PSTN line) go
///    over the packet network: ring the devices that are signed in but `away` or `busy`.
/// 4. Otherwise nowhere (480). `do_not_disturb` and `offline` devices are never rung.
pub fn route(devices: &[DeviceState], prefs: &Preferences, trunk_up: bool) -> Route {
    let ready = ranked(devices, |s| s == Status::Available);
    if !ready.is_empty() {
        return Route::Devices(ready);
    }
    if fallback(prefs, trunk_up) == Route::Trunk {
        return Route::Trunk;
    }
    let reachable = ranked(devices, |s| matches!(s, Status::Away | Status::Busy));
    if reachable.is_empty() {
        Route::Unavailable
    } else {
        Route::Devices(reachable)
    }
}

fn ranked(devices: &[DeviceState], pick: impl Fn(Status) -> bool) -> Vec<u64> {
    let mut ds: Vec<&DeviceState> = devices.iter().filter(|d| pick(d.status)).collect();
    ds.sort_by_key(|d| (d.idle_ms, d.session));
    ds.into_iter().map(|d| d.session).collect()
}

/// The route once IM devices are out of the picture (none available, or all gone while
/// ringing).
pub fn fallback(prefs: &Preferences, trunk_up: bool) -> Route {
    if prefs.pstn_fallback && trunk_up {
        Route::Trunk
    } else {
        Route::Unavailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(session: u64, status: Status, idle_ms: u64) -> DeviceState {
        DeviceState {
            session,
            device: format!("d{session}"),
            status,
            idle_ms,
            note: None,
            video: false,
            opus: false,
        }
    }

    #[test]
    fn table() {
        use Status::*;
        let on = Preferences::default();
        let off = Preferences {
            pstn_fallback: false,
        };
        let rows: Vec<(&str, Vec<DeviceState>, &Preferences, bool, Route)> = vec![
            (
                "one available device rings",
                vec![dev(1, Available, 0)],
                &on,
                true,
                Route::Devices(vec![1]),
            ),
            (
                "available devices, most recently used first",
                vec![dev(1, Available, 9000), dev(2, Available, 10)],
                &on,
                true,
                Route::Devices(vec![2, 1]),
            ),
            (
                "away and busy devices are skipped",
                vec![dev(1, Away, 0), dev(2, Busy, 0), dev(3, Available, 50)],
                &on,
                true,
                Route::Devices(vec![3]),
            ),
            ("no device: PSTN line", vec![], &on, true, Route::Trunk),
            (
                "only away devices: PSTN line",
                vec![dev(1, Away, 0)],
                &on,
                true,
                Route::Trunk,
            ),
            (
                "invisible (offline status) counts as not there",
                vec![dev(1, Offline, 0)],
                &on,
                true,
                Route::Trunk,
            ),
            (
                "no device and trunk down: unavailable",
                vec![],
                &on,
                false,
                Route::Unavailable,
            ),
            (
                "no device and PSTN fallback disabled",
                vec![],
                &off,
                true,
                Route::Unavailable,
            ),
            (
                "voice network down: away and busy devices ring over the packet network",
                vec![
                    dev(1, Away, 500),
                    dev(2, Busy, 20),
                    dev(3, DoNotDisturb, 0),
                    dev(4, Offline, 0),
                ],
                &on,
                false,
                Route::Devices(vec![2, 1]),
            ),
            (
                "voice network up: away devices do not ring, the PSTN line does",
                vec![dev(1, Away, 0), dev(2, Busy, 0)],
                &on,
                true,
                Route::Trunk,
            ),
            (
                "do not disturb is never rung, even with the voice network down",
                vec![dev(1, DoNotDisturb, 0)],
                &on,
                false,
                Route::Unavailable,
            ),
            (
                "PSTN fallback disabled: away devices ring rather than nothing",
                vec![dev(1, Away, 0)],
                &off,
                true,
                Route::Devices(vec![1]),
            ),
            (
                "device available even when trunk is down",
                vec![dev(4, Available, 0)],
                &on,
                false,
                Route::Devices(vec![4]),
            ),
        ];
        for (name, devices, prefs, trunk_up, want) in rows {
            assert_eq!(route(&devices, prefs, trunk_up), want, "{name}");
        }
    }
}
