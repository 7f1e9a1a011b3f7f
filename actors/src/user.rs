//! The user actor: the live presence of one user across their devices, the users watching
//! it, and chat delivery to the user's devices.

use std::collections::BTreeMap;
use std::time::Instant;

use actix::prelude::*;
use actix::{WeakAddr, WeakRecipient};
use parley_codecs::control::{AddressBookEntry, ServerMsg, Status};

use crate::messages::SessionId;
use crate::metrics as m;
use crate::router::DeviceState;
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
        }
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

/// Ask for the user's devices and their presence.
#[derive(Message)]
#[rtype(result = "Vec<(DeviceState, Addr<PresenceSession>)>")]
pub struct Snapshot;

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
        };
        self.devices.insert(m.session, (state, m.addr));
        self.changed();
    }
}

impl Handler<Detach> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Detach, _: &mut Context<Self>) {
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

impl Handler<Snapshot> for UserActor {
    type Result = MessageResult<Snapshot>;
    fn handle(&mut self, _: Snapshot, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.devices.values().cloned().collect())
    }
}

impl Handler<AddressBookChanged> for UserActor {
    type Result = ();
    fn handle(&mut self, m: AddressBookChanged, _: &mut Context<Self>) {
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

    fn d(session: u64, status: Status, note: Option<&str>) -> DeviceState {
        DeviceState {
            session,
            device: format!("d{session}"),
            status,
            idle_ms: 0,
            note: note.map(str::to_owned),
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
