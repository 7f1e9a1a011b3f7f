//! The user actor: the live presence of one user across their devices.

use std::collections::BTreeMap;

use actix::WeakRecipient;
use actix::prelude::*;
use parley_codecs::control::{AddressBookEntry, ServerMsg, Status};

use crate::messages::SessionId;
use crate::router::DeviceState;
use crate::session::{PresenceSession, Push};

/// One user.
#[derive(Debug)]
pub struct UserActor {
    devices: BTreeMap<SessionId, (DeviceState, Addr<PresenceSession>)>,
    watchers: Vec<WeakRecipient<PresenceChanged>>,
}

impl UserActor {
    /// A user with no device online.
    pub fn new() -> Self {
        Self {
            devices: BTreeMap::new(),
            watchers: Vec::new(),
        }
    }
}

impl Default for UserActor {
    fn default() -> Self {
        Self::new()
    }
}

impl Actor for UserActor {
    type Context = Context<Self>;
}

impl UserActor {
    /// Tells every live watcher (ringing calls) that presence changed; drops dead ones.
    fn changed(&mut self) {
        let at = std::time::Instant::now();
        self.watchers.retain(|w| match w.upgrade() {
            Some(r) => {
                r.do_send(PresenceChanged { at });
                true
            }
            None => false,
        });
    }
}

/// The user's presence changed (a device came, went, or changed status).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct PresenceChanged {
    /// When the change reached the user actor.
    pub at: std::time::Instant,
}

/// Watch this user's presence until the watcher goes away (calls watch while they ring).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch(pub WeakRecipient<PresenceChanged>);

impl Handler<Watch> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Watch, _: &mut Context<Self>) {
        self.watchers.retain(|w| w.upgrade().is_some());
        self.watchers.push(m.0);
    }
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
}

/// Ask for the user's devices and their presence.
#[derive(Message)]
#[rtype(result = "Vec<(DeviceState, Addr<PresenceSession>)>")]
pub struct Snapshot;

/// The user's address book changed; push it to every device.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddressBookChanged(pub Vec<AddressBookEntry>);

impl Handler<Attach> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Attach, _: &mut Context<Self>) {
        let state = DeviceState {
            session: m.session,
            device: m.device,
            status: Status::Available,
            idle_ms: 0,
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
            let moved = state.status != m.status;
            state.status = m.status;
            state.idle_ms = m.idle_ms;
            // Idle time alone only reorders devices; a status change can change the route.
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
