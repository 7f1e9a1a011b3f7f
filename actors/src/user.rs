//! The user actor: the live presence of one user across their devices, the users watching
//! it, and chat delivery to the user's devices.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use actix::{WeakAddr, WeakRecipient};
use parley_codecs::control::{AddressBookEntry, ServerMsg, Status};

use crate::messages::SessionId;
use crate::metrics as m;
use crate::router::DeviceState;
use crate::rules::Preferences;

/// Answer history halves in weight every week: recent habits count more.
pub const HISTORY_HALF_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where changed preferences are persisted (implemented by the switch's store).
pub trait PreferencesSink: Send + Sync + 'static {
    /// Saves a user's preferences (asynchronously; failures are logged by the sink).
    fn save(&self, user: &str, prefs: &Preferences);
}
use crate::session::{PresenceSession, Push};

/// One user.
#[derive(Debug)]
pub struct UserActor {
    name: String,
    devices: BTreeMap<SessionId, (DeviceState, Addr<PresenceSession>)>,
    /// Ringing calls that re-route on presence changes.
    watchers: Vec<WeakRecipient<PresenceChanged>>,
    /// Device sessions of other users subscribed to this user's presence.
    subscribers: Vec<(SessionId, WeakAddr<PresenceSession>)>,
    /// The aggregate last published to subscribers.
    published: Option<Aggregate>,
    prefs: Arc<Preferences>,
    prefs_sink: Option<Arc<dyn PreferencesSink>>,
    /// Decaying count of answered calls per device name, and when it was last updated.
    history: HashMap<String, (f64, SystemTime)>,
    /// Addresses in the user's address book.
    known: HashSet<String>,
    /// Where each device connects from (network location, for operators).
    locations: HashMap<SessionId, std::net::SocketAddr>,
}

impl std::fmt::Debug for dyn PreferencesSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreferencesSink")
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

impl UserActor {
    /// A user with no device online.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            devices: BTreeMap::new(),
            watchers: Vec::new(),
            subscribers: Vec::new(),
            published: None,
            prefs: Arc::default(),
            prefs_sink: None,
            history: HashMap::new(),
            known: HashSet::new(),
            locations: HashMap::new(),
        }
    }

    /// Persists preference changes through `sink`.
    pub fn with_preferences(mut self, prefs: Preferences, sink: Arc<dyn PreferencesSink>) -> Self {
        self.prefs = Arc::new(prefs);
        self.prefs_sink = Some(sink);
        self
    }

    fn record_answer(&mut self, device: String, at: SystemTime) {
        let (score, last) = self.history.get(&device).copied().unwrap_or((0.0, at));
        self.history
            .insert(device, (decay(score, last, at) + 1.0, at.max(last)));
    }

    fn history_now(&self) -> HashMap<String, f64> {
        let now = SystemTime::now();
        self.history
            .iter()
            .map(|(d, (score, at))| (d.clone(), decay(*score, *at, now)))
            .collect()
    }

    fn current(&self) -> Aggregate {
        aggregate(self.devices.values().map(|(d, _)| d))
    }

    fn update_msg(&self, a: &Aggregate) -> ServerMsg {
        ServerMsg::PresenceUpdate {
            user: self.name.clone(),
            status: a.status,
            note: a.note.clone(),
            devices: a.devices,
        }
    }

    /// Tells every live watcher (ringing calls) that presence changed, and subscribers what
    /// the user's aggregate presence now is if it changed; drops dead ones.
    fn changed(&mut self) {
        let at = Instant::now();
        self.watchers.retain(|w| match w.upgrade() {
            Some(r) => {
                r.do_send(PresenceChanged { at });
                true
            }
            None => false,
        });
        let now = self.current();
        if self.published.as_ref() == Some(&now) {
            return;
        }
        let msg = self.update_msg(&now);
        self.published = Some(now);
        let mut sent = 0u64;
        self.subscribers.retain(|(_, w)| match w.upgrade() {
            Some(a) => {
                a.do_send(Push(msg.clone()));
                sent += 1;
                true
            }
            None => false,
        });
        metrics::counter!(m::PRESENCE_FANOUT_TOTAL).increment(sent);
    }
}

impl Actor for UserActor {
    type Context = Context<Self>;
}

/// `score` as of `at`, seen from `now`: halves every [`HISTORY_HALF_LIFE`].
fn decay(score: f64, at: SystemTime, now: SystemTime) -> f64 {
    let age = now.duration_since(at).unwrap_or_default().as_secs_f64();
    score * 0.5f64.powf(age / HISTORY_HALF_LIFE.as_secs_f64())
}

/// What a call needs to know about its callee.
#[derive(Debug, Clone, Default)]
pub struct UserView {
    /// Connected devices and their session actors.
    pub devices: Vec<(DeviceState, Addr<PresenceSession>)>,
    /// Routing preferences.
    pub prefs: Arc<Preferences>,
    /// Answer-history score per device name, now.
    pub history: HashMap<String, f64>,
    /// Whether the caller is in the user's address book.
    pub caller_known: bool,
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
    pub address: Option<std::net::SocketAddr>,
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

/// Ask for [`PresenceView`].
#[derive(Message)]
#[rtype(result = "PresenceView")]
pub struct GetPresence;

impl Handler<GetPresence> for UserActor {
    type Result = MessageResult<GetPresence>;
    fn handle(&mut self, _: GetPresence, _: &mut Context<Self>) -> Self::Result {
        let a = self.current();
        let devices = self
            .devices
            .values()
            .map(|(d, _)| DevicePresence {
                device: d.device.clone(),
                status: d.status,
                idle_ms: d.idle_ms,
                note: d.note.clone(),
                video: d.video,
                address: self.locations.get(&d.session).copied(),
            })
            .collect();
        MessageResult(PresenceView {
            status: a.status,
            note: a.note,
            devices,
        })
    }
}

/// A device declared what it can do.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetCapabilities {
    /// Session id.
    pub session: SessionId,
    /// Video capable.
    pub video: bool,
}

impl Handler<SetCapabilities> for UserActor {
    type Result = ();
    fn handle(&mut self, m: SetCapabilities, _: &mut Context<Self>) {
        if let Some((state, _)) = self.devices.get_mut(&m.session) {
            state.video = m.video;
        }
    }
}

/// Ask for the user's devices, preferences and history, as a call for `caller` sees them.
#[derive(Message)]
#[rtype(result = "UserView")]
pub struct Lookup {
    /// The caller's address (E.164 or URI).
    pub caller: String,
}

impl Handler<Lookup> for UserActor {
    type Result = MessageResult<Lookup>;
    fn handle(&mut self, m: Lookup, _: &mut Context<Self>) -> Self::Result {
        MessageResult(UserView {
            devices: self.devices.values().cloned().collect(),
            prefs: self.prefs.clone(),
            history: self.history_now(),
            caller_known: self.known.contains(&m.caller),
        })
    }
}

/// A device of this user answered a call (prediction learns from it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Answered {
    /// Device name.
    pub device: String,
    /// When.
    pub at: SystemTime,
}

impl Handler<Answered> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Answered, _: &mut Context<Self>) {
        self.record_answer(m.device, m.at);
    }
}

/// Past answers, oldest first (from the CDR store at start-up).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SeedHistory(pub Vec<(String, SystemTime)>);

impl Handler<SeedHistory> for UserActor {
    type Result = ();
    fn handle(&mut self, m: SeedHistory, _: &mut Context<Self>) {
        for (device, at) in m.0 {
            self.record_answer(device, at);
        }
    }
}

/// Replace the user's preferences (already validated); persisted through the sink.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPreferences(pub Preferences);

impl Handler<SetPreferences> for UserActor {
    type Result = ();
    fn handle(&mut self, m: SetPreferences, _: &mut Context<Self>) {
        if let Some(sink) = &self.prefs_sink {
            sink.save(&self.name, &m.0);
        }
        self.prefs = Arc::new(m.0);
    }
}

/// Read the user's preferences.
#[derive(Message)]
#[rtype(result = "Arc<Preferences>")]
pub struct GetPreferences;

impl Handler<GetPreferences> for UserActor {
    type Result = MessageResult<GetPreferences>;
    fn handle(&mut self, _: GetPreferences, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.prefs.clone())
    }
}

/// The user's presence changed (a device came, went, or changed status).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct PresenceChanged {
    /// When the change reached the user actor.
    pub at: Instant,
}

/// Watch this user's presence until the watcher goes away (calls watch while they ring).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch(pub WeakRecipient<PresenceChanged>);

/// A device session of another user subscribes to this user's presence.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// The subscriber's session id.
    pub session: SessionId,
    /// The subscriber's session actor.
    pub addr: WeakAddr<PresenceSession>,
}

/// Ends a [`Subscribe`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub SessionId);

/// Deliver a chat message to every device of this user; replies with how many got it.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct Deliver {
    /// Sender user name.
    pub from: String,
    /// The text.
    pub text: String,
    /// Server message id.
    pub id: u64,
    /// Accepted at, ms since the Unix epoch.
    pub sent_at_ms: u64,
}

/// A device session logged in as this user.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach {
    /// Session id.
    pub session: SessionId,
    /// Device name.
    pub device: String,
    /// The session actor.
    pub addr: Addr<PresenceSession>,
    /// Where the device connects from.
    pub remote: Option<std::net::SocketAddr>,
}

/// A device session ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach(pub SessionId);

/// A device reported presence.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceUpdate {
    /// Session id.
    pub session: SessionId,
    /// New status.
    pub status: Status,
    /// Idle time in ms.
    pub idle_ms: u64,
    /// Note.
    pub note: Option<String>,
}

/// The user's address book changed; push it to every device.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddressBookChanged(pub Vec<AddressBookEntry>);

impl Handler<Watch> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Watch, _: &mut Context<Self>) {
        self.watchers.retain(|w| w.upgrade().is_some());
        self.watchers.push(m.0);
    }
}

impl Handler<Subscribe> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Subscribe, _: &mut Context<Self>) {
        self.subscribers
            .retain(|(s, w)| *s != m.session && w.upgrade().is_some());
        if let Some(a) = m.addr.upgrade() {
            let now = self.current();
            a.do_send(Push(self.update_msg(&now)));
            self.subscribers.push((m.session, m.addr));
        }
    }
}

impl Handler<Unsubscribe> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Unsubscribe, _: &mut Context<Self>) {
        self.subscribers.retain(|(s, _)| *s != m.0);
    }
}

impl Handler<Deliver> for UserActor {
    type Result = u32;
    fn handle(&mut self, m: Deliver, _: &mut Context<Self>) -> u32 {
        let msg = ServerMsg::Chat {
            from: m.from,
            text: m.text,
            id: m.id,
            sent_at_ms: m.sent_at_ms,
        };
        for (_, addr) in self.devices.values() {
            addr.do_send(Push(msg.clone()));
        }
        self.devices.len() as u32
    }
}

impl Handler<Attach> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Attach, _: &mut Context<Self>) {
        let state = DeviceState {
            session: m.session,
            device: m.device,
            status: Status::Available,
            idle_ms: 0,
            note: None,
            video: false,
        };
        self.devices.insert(m.session, (state, m.addr));
        if let Some(r) = m.remote {
            self.locations.insert(m.session, r);
        }
        self.changed();
    }
}

impl Handler<Detach> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Detach, _: &mut Context<Self>) {
        self.locations.remove(&m.0);
        if self.devices.remove(&m.0).is_some() {
            self.changed();
        }
    }
}

impl Handler<PresenceUpdate> for UserActor {
    type Result = ();
    fn handle(&mut self, m: PresenceUpdate, _: &mut Context<Self>) {
        if let Some((state, _)) = self.devices.get_mut(&m.session) {
            let moved = state.status != m.status || state.note != m.note;
            state.status = m.status;
            state.idle_ms = m.idle_ms;
            state.note = m.note;
            // Idle time alone only reorders devices; status and note changes are news.
            if moved {
                self.changed();
            }
        }
    }
}

impl Handler<AddressBookChanged> for UserActor {
    type Result = ();
    fn handle(&mut self, m: AddressBookChanged, _: &mut Context<Self>) {
        self.known = m.0.iter().map(|e| e.address.clone()).collect();
        for (_, addr) in self.devices.values() {
            addr.do_send(Push(ServerMsg::AddressBook {
                entries: m.0.clone(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_decays_with_a_one_week_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!((decay(4.0, t0, t0 + HISTORY_HALF_LIFE) - 2.0).abs() < 1e-9);
        assert!((decay(4.0, t0, t0 + HISTORY_HALF_LIFE * 2) - 1.0).abs() < 1e-9);
        let mut u = UserActor::new("alice");
        u.record_answer("desk".into(), t0);
        u.record_answer("desk".into(), t0 + HISTORY_HALF_LIFE);
        let (score, _) = u.history["desk"];
        assert!((score - 1.5).abs() < 1e-9, "{score}");
    }

    fn d(session: u64, status: Status, note: Option<&str>) -> DeviceState {
        DeviceState {
            session,
            device: format!("d{session}"),
            status,
            idle_ms: 0,
            note: note.map(str::to_owned),
            video: false,
        }
    }

    #[test]
    fn aggregate_takes_the_best_device() {
        use Status::*;
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
}
