//! One user's presence across their devices, as a sans-IO state machine.
//!
//! The user actor feeds it what devices report (`handle_*`) and performs what it decides
//! ([`UserPresence::poll_output`]): which ringing calls must re-evaluate their route, and
//! which subscribers get a new aggregate presence. It also holds what routing reads about
//! the user — devices, preferences, the decaying answer history, the address book's
//! addresses — and answers with a [`CalleeView`]. Subscribers are session ids and calls
//! are call handles: the actor maps them to addresses and reports the dead ones.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parley_codecs::control::{ServerMsg, Status};

use crate::ids::{CallHandle, SessionId};
pub use crate::router::{Aggregate, DeviceState, aggregate};
use crate::rules::Preferences;

/// Answer history halves in weight every week: recent habits count more.
pub const HISTORY_HALF_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);

/// `score` as of `at`, seen from `now`: halves every [`HISTORY_HALF_LIFE`].
pub fn decay(score: f64, at: SystemTime, now: SystemTime) -> f64 {
    let age = now.duration_since(at).unwrap_or_default().as_secs_f64();
    score * 0.5f64.powf(age / HISTORY_HALF_LIFE.as_secs_f64())
}

/// What a call needs to know about its callee.
#[derive(Debug, Clone, Default)]
pub struct CalleeView {
    /// Connected devices.
    pub devices: Vec<DeviceState>,
    /// Routing preferences.
    pub prefs: Arc<Preferences>,
    /// Answer-history score per device name, now.
    pub history: HashMap<String, f64>,
    /// Whether the caller is in the user's address book.
    pub caller_known: bool,
    /// Whether the user blocked the caller: the call is refused before any rule.
    pub caller_blocked: bool,
    /// Calls ringing this user now (watching their presence).
    pub ringing: usize,
}

/// One device's presence as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DevicePresence {
    /// Device name.
    pub device: String,
    /// Status.
    pub status: Status,
    /// Idle time, ms.
    pub idle_ms: u64,
    /// Note.
    pub note: Option<String>,
    /// Video capable.
    pub video: bool,
    /// Network location: the address the device connects from.
    pub address: Option<SocketAddr>,
}

/// The user's presence: aggregate and per device (admin API).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PresenceView {
    /// Best status over the devices.
    pub status: Status,
    /// Note of that device.
    pub note: Option<String>,
    /// Devices.
    pub devices: Vec<DevicePresence>,
}

/// What the user actor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum PresenceOutput {
    /// Presence changed: these ringing calls re-evaluate where they ring.
    NotifyCalls(Vec<CallHandle>),
    /// The aggregate changed: push `update` to these subscribed sessions.
    Publish {
        /// Subscribers, by session.
        sessions: Vec<SessionId>,
        /// The `presence_update` message.
        update: ServerMsg,
    },
}

/// One user's presence.
#[derive(Debug)]
pub struct UserPresence {
    name: String,
    devices: BTreeMap<SessionId, DeviceState>,
    locations: HashMap<SessionId, SocketAddr>,
    /// Ringing calls that re-route on presence changes.
    watchers: Vec<CallHandle>,
    /// Sessions of other users subscribed to this user's presence.
    subscribers: Vec<SessionId>,
    /// The aggregate last published to subscribers.
    published: Option<Aggregate>,
    prefs: Arc<Preferences>,
    /// Decaying count of answered calls per device name, and when it was last updated.
    history: HashMap<String, (f64, SystemTime)>,
    /// Addresses in the user's address book.
    known: HashSet<String>,
    /// Addresses the user blocked.
    blocked: HashSet<String>,
    out: VecDeque<PresenceOutput>,
}

impl UserPresence {
    /// A user with no device online.
    pub fn new(name: impl Into<String>, prefs: Preferences) -> Self {
        Self {
            name: name.into(),
            devices: BTreeMap::new(),
            locations: HashMap::new(),
            watchers: Vec::new(),
            subscribers: Vec::new(),
            published: None,
            prefs: Arc::new(prefs),
            history: HashMap::new(),
            known: HashSet::new(),
            blocked: HashSet::new(),
            out: VecDeque::new(),
        }
    }

    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The aggregate presence now.
    pub fn aggregate(&self) -> Aggregate {
        aggregate(self.devices.values())
    }

    /// The devices online, by session.
    pub fn sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.devices.keys().copied()
    }

    /// One device's state.
    pub fn device(&self, session: SessionId) -> Option<&DeviceState> {
        self.devices.get(&session)
    }

    /// The `presence_update` message for an aggregate.
    pub fn update_msg(&self, a: &Aggregate) -> ServerMsg {
        ServerMsg::PresenceUpdate {
            user: self.name.clone(),
            status: a.status,
            note: a.note.clone(),
            devices: a.devices,
        }
    }

    /// A device logged in (it starts `available`).
    pub fn handle_attach(
        &mut self,
        session: SessionId,
        device: String,
        remote: Option<SocketAddr>,
    ) {
        let state = DeviceState {
            session,
            device,
            status: Status::Available,
            idle_ms: 0,
            note: None,
            video: false,
            opus: false,
        };
        self.devices.insert(session, state);
        if let Some(r) = remote {
            self.locations.insert(session, r);
        }
        self.changed();
    }

    /// A device's session ended.
    pub fn handle_detach(&mut self, session: SessionId) {
        self.locations.remove(&session);
        if self.devices.remove(&session).is_some() {
            self.changed();
        }
    }

    /// A device reported presence. Idle time alone only reorders devices (no news for
    /// ringing calls or subscribers); status and note changes are news.
    pub fn handle_presence(
        &mut self,
        session: SessionId,
        status: Status,
        idle_ms: u64,
        note: Option<String>,
    ) {
        if let Some(state) = self.devices.get_mut(&session) {
            let moved = state.status != status || state.note != note;
            state.status = status;
            state.idle_ms = idle_ms;
            state.note = note;
            if moved {
                self.changed();
            }
        }
    }

    /// A device declared whether it takes video and Opus.
    pub fn handle_capabilities(&mut self, session: SessionId, video: bool, opus: bool) {
        if let Some(state) = self.devices.get_mut(&session) {
            state.video = video;
            state.opus = opus;
        }
    }

    /// A ringing call watches this user's presence.
    pub fn handle_watch(&mut self, call: CallHandle) {
        if !self.watchers.contains(&call) {
            self.watchers.push(call);
        }
    }

    /// A call stopped watching (it ended, or it stopped ringing).
    pub fn handle_unwatch(&mut self, call: CallHandle) {
        self.watchers.retain(|c| *c != call);
    }

    /// A session of another user subscribes; returns the update to send it at once.
    pub fn handle_subscribe(&mut self, session: SessionId) -> ServerMsg {
        if !self.subscribers.contains(&session) {
            self.subscribers.push(session);
        }
        self.update_msg(&self.aggregate())
    }

    /// A subscription ended (or its session is gone).
    pub fn handle_unsubscribe(&mut self, session: SessionId) {
        self.subscribers.retain(|s| *s != session);
    }

    /// A device of this user answered a call at `at` (prediction learns from it).
    pub fn handle_answer(&mut self, device: String, at: SystemTime) {
        let (score, last) = self.history.get(&device).copied().unwrap_or((0.0, at));
        self.history
            .insert(device, (decay(score, last, at) + 1.0, at.max(last)));
    }

    /// The user's whole address book, as (address, known, blocked): only known parties
    /// (called by the user, or answered) make `caller_known` true, and blocked ones are
    /// refused.
    pub fn handle_address_book(&mut self, entries: impl IntoIterator<Item = (String, bool, bool)>) {
        self.known.clear();
        self.blocked.clear();
        self.handle_address_book_change(entries, std::iter::empty());
    }

    /// A change to the address book: entries added or updated as (address, known,
    /// blocked), and addresses removed.
    pub fn handle_address_book_change(
        &mut self,
        upserted: impl IntoIterator<Item = (String, bool, bool)>,
        removed: impl IntoIterator<Item = String>,
    ) {
        for a in removed {
            self.known.remove(&a);
            self.blocked.remove(&a);
        }
        for (a, known, blocked) in upserted {
            if blocked {
                self.blocked.insert(a.clone());
            } else {
                self.blocked.remove(&a);
            }
            if known {
                self.known.insert(a);
            } else {
                self.known.remove(&a);
            }
        }
    }

    /// New preferences (already validated).
    pub fn handle_preferences(&mut self, prefs: Preferences) {
        self.prefs = Arc::new(prefs);
    }

    /// The preferences.
    pub fn preferences(&self) -> Arc<Preferences> {
        self.prefs.clone()
    }

    /// What a call from `caller` sees of this user at wall-clock `now`.
    pub fn callee_view(&self, caller: &str, now: SystemTime) -> CalleeView {
        CalleeView {
            devices: self.devices.values().cloned().collect(),
            prefs: self.prefs.clone(),
            history: self
                .history
                .iter()
                .map(|(d, (score, at))| (d.clone(), decay(*score, *at, now)))
                .collect(),
            caller_known: self.known.contains(caller),
            caller_blocked: self.blocked.contains(caller),
            ringing: self.watchers.len(),
        }
    }

    /// Presence per device, for operators.
    pub fn presence_view(&self) -> PresenceView {
        let a = self.aggregate();
        PresenceView {
            status: a.status,
            note: a.note,
            devices: self
                .devices
                .values()
                .map(|d| DevicePresence {
                    device: d.device.clone(),
                    status: d.status,
                    idle_ms: d.idle_ms,
                    note: d.note.clone(),
                    video: d.video,
                    address: self.locations.get(&d.session).copied(),
                })
                .collect(),
        }
    }

    /// Next thing to do.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<PresenceOutput> {
        self.out.pop_front()
    }

    fn changed(&mut self) {
        if !self.watchers.is_empty() {
            self.out
                .push_back(PresenceOutput::NotifyCalls(self.watchers.clone()));
        }
        let now = self.aggregate();
        if self.published.as_ref() == Some(&now) {
            return;
        }
        let update = self.update_msg(&now);
        self.published = Some(now);
        if !self.subscribers.is_empty() {
            self.out.push_back(PresenceOutput::Publish {
                sessions: self.subscribers.clone(),
                update,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    fn d(session: u64, status: Status, note: Option<&str>) -> DeviceState {
        DeviceState {
            session,
            device: format!("d{session}"),
            status,
            idle_ms: 0,
            note: note.map(str::to_owned),
            video: false,
            opus: false,
        }
    }

    fn drain(p: &mut UserPresence) -> Vec<PresenceOutput> {
        std::iter::from_fn(|| p.poll_output()).collect()
    }

    fn update(status: Status, note: Option<&str>, devices: u32) -> ServerMsg {
        ServerMsg::PresenceUpdate {
            user: "alice".into(),
            status,
            note: note.map(str::to_owned),
            devices,
        }
    }

    #[test]
    fn history_decays_with_a_one_week_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!((decay(4.0, t0, t0 + HISTORY_HALF_LIFE) - 2.0).abs() < 1e-9);
        assert!((decay(4.0, t0, t0 + HISTORY_HALF_LIFE * 2) - 1.0).abs() < 1e-9);
        let mut u = UserPresence::new("alice", Preferences::default());
        u.handle_answer("desk".into(), t0);
        u.handle_answer("desk".into(), t0 + HISTORY_HALF_LIFE);
        let score = u.callee_view("x", t0 + HISTORY_HALF_LIFE).history["desk"];
        assert!((score - 1.5).abs() < 1e-9, "{score}");
    }

    #[test]
    fn aggregate_takes_the_best_device() {
        assert_eq!(
            aggregate([].iter()),
            Aggregate {
                status: Offline,
                note: None,
                devices: 0
            }
        );
        let ds = [
            d(1, Away, Some("lunch")),
            d(2, Busy, Some("meeting")),
            d(3, DoNotDisturb, None),
        ];
        assert_eq!(
            aggregate(ds.iter()),
            Aggregate {
                status: Busy,
                note: Some("meeting".into()),
                devices: 3
            }
        );
        let ds = [d(1, Offline, None), d(2, Available, None)];
        assert_eq!(aggregate(ds.iter()).status, Available);
    }

    /// Each row: an input, then what the actor must do.
    #[test]
    fn fan_out_tells_ringing_calls_every_change_and_subscribers_only_news() {
        let mut p = UserPresence::new("alice", Preferences::default());
        assert_eq!(p.handle_subscribe(20), update(Offline, None, 0));
        p.handle_watch(7);
        p.handle_watch(7);

        p.handle_attach(1, "desk".into(), None);
        assert_eq!(
            drain(&mut p),
            vec![
                PresenceOutput::NotifyCalls(vec![7]),
                PresenceOutput::Publish {
                    sessions: vec![20],
                    update: update(Available, None, 1)
                }
            ]
        );
        // Idle time alone reorders devices: nobody is told.
        p.handle_presence(1, Available, 5_000, None);
        assert_eq!(drain(&mut p), vec![]);
        // A second device: calls re-route, and the aggregate's device count changed.
        p.handle_attach(2, "mobile".into(), None);
        assert_eq!(drain(&mut p).len(), 2);
        // The mobile goes away: calls re-evaluate, but the aggregate (available, 2) stands.
        p.handle_presence(2, Away, 0, None);
        assert_eq!(drain(&mut p), vec![PresenceOutput::NotifyCalls(vec![7])]);
        // Once the call stops watching and the subscriber leaves, changes go nowhere.
        p.handle_unwatch(7);
        p.handle_unsubscribe(20);
        p.handle_detach(1);
        assert_eq!(drain(&mut p), vec![]);
        assert_eq!(
            p.aggregate(),
            Aggregate {
                status: Away,
                note: None,
                devices: 1
            }
        );
        // Detaching a session that is not there changes nothing.
        p.handle_watch(8);
        p.handle_detach(99);
        assert_eq!(drain(&mut p), vec![]);
    }

    #[test]
    fn callee_view_knows_the_caller_from_the_address_book() {
        let mut p = UserPresence::new("alice", Preferences::default());
        p.handle_address_book([
            ("+15557770001".to_owned(), true, false),
            ("+15557770003".to_owned(), false, false),
            ("+15557770004".to_owned(), false, true),
        ]);
        p.handle_attach(3, "desk".into(), Some("127.0.0.1:4000".parse().unwrap()));
        p.handle_capabilities(3, true, false);
        let now = SystemTime::UNIX_EPOCH;
        assert!(p.callee_view("+15557770001", now).caller_known);
        assert!(!p.callee_view("+15557770002", now).caller_known);
        // In the book after a rejected or missed call only: still not known.
        assert!(!p.callee_view("+15557770003", now).caller_known);
        assert!(p.callee_view("+15557770004", now).caller_blocked);
        assert!(!p.callee_view("+15557770003", now).caller_blocked);
        p.handle_address_book_change(
            [
                ("+15557770003".to_owned(), true, true),
                ("+15557770004".to_owned(), false, false),
            ],
            ["+15557770001".to_owned()],
        );
        assert!(p.callee_view("+15557770003", now).caller_known);
        assert!(p.callee_view("+15557770003", now).caller_blocked);
        assert!(!p.callee_view("+15557770004", now).caller_blocked);
        assert!(!p.callee_view("+15557770001", now).caller_known);
        let v = p.callee_view("x", now);
        assert_eq!(v.devices.len(), 1);
        assert!(v.devices[0].video);
        let pv = p.presence_view();
        assert_eq!(
            pv.devices[0].address,
            Some("127.0.0.1:4000".parse().unwrap())
        );
    }
}
