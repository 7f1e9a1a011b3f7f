//! The user actor: the shell around one user's [`UserPresence`]. It keeps the addresses
//! behind the session ids and call handles the core speaks of, performs the core's
//! fan-out, and answers calls' lookups and chat delivery.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix::WeakRecipient;
use actix::prelude::*;
use parley_codecs::control::{AddressBookEntry, ServerMsg, Status};
use parley_core::ids::CallHandle;
use parley_core::presence::{CalleeView, PresenceOutput, PresenceView, UserPresence};
use parley_core::rules::Preferences;

use crate::messages::{Push, SessionId, ToDevice};
use crate::metrics as m;
use crate::remote::DeviceBoard;

/// Where changed preferences are persisted (implemented by the switch's store).
pub trait PreferencesSink: Send + Sync + 'static {
    /// Saves a user's preferences (asynchronously; failures are logged by the sink).
    fn save(&self, user: &str, prefs: &Preferences);
}

impl std::fmt::Debug for dyn PreferencesSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreferencesSink")
    }
}

/// One user.
#[derive(Debug)]
pub struct UserActor {
    core: UserPresence,
    devices: BTreeMap<SessionId, DeviceLink>,
    /// Ringing calls watching presence, by handle.
    watchers: HashMap<CallHandle, WeakRecipient<PresenceChanged>>,
    /// Sessions of other users subscribed to this user's presence.
    /// Subscribers, with the name each knows this user by (`user@tenant` across tenants).
    subscribers: HashMap<SessionId, (WeakRecipient<Push>, Option<String>)>,
    prefs_sink: Option<Arc<dyn PreferencesSink>>,
    /// The user's devices on other nodes of the cluster: where their offers go.
    remote: BTreeMap<SessionId, Recipient<ToDevice>>,
    /// Where this node's devices of the user are published to the cluster, and the tenant.
    board: Option<(Arc<dyn DeviceBoard>, String)>,
}

impl UserActor {
    /// A user with no device online.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            core: UserPresence::new(name, Preferences::default()),
            devices: BTreeMap::new(),
            watchers: HashMap::new(),
            subscribers: HashMap::new(),
            prefs_sink: None,
            remote: BTreeMap::new(),
            board: None,
        }
    }

    /// Publishes this node's devices of the user (of `tenant`) to the cluster through `board`.
    pub fn with_board(mut self, board: Arc<dyn DeviceBoard>, tenant: impl Into<String>) -> Self {
        self.board = Some((board, tenant.into()));
        self
    }

    /// Tells the cluster how a local device is now.
    fn publish(&self, session: SessionId) {
        let Some((board, tenant)) = &self.board else {
            return;
        };
        match (self.core.device(session), self.devices.get(&session)) {
            (Some(state), Some(link)) => {
                board.device_changed(tenant, self.core.name(), state, &link.calls)
            }
            _ => board.device_gone(session),
        }
    }

    /// Persists preference changes through `sink`.
    pub fn with_preferences(mut self, prefs: Preferences, sink: Arc<dyn PreferencesSink>) -> Self {
        self.core.handle_preferences(prefs);
        self.prefs_sink = Some(sink);
        self
    }

    /// Forgets watching calls that ended (their actors are gone), so a user who is called
    /// often but never changes presence holds no dead watchers.
    fn prune_watchers(&mut self) {
        let core = &mut self.core;
        self.watchers.retain(|h, w| {
            let live = w.upgrade().is_some();
            if !live {
                core.handle_unwatch(*h);
            }
            live
        });
    }

    /// Performs what the core decided; forgets watchers and subscribers that are gone.
    fn fan_out(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                PresenceOutput::NotifyCalls(calls) => {
                    let at = Instant::now();
                    for h in calls {
                        match self.watchers.get(&h).and_then(WeakRecipient::upgrade) {
                            Some(r) => r.do_send(PresenceChanged { at }),
                            None => {
                                self.watchers.remove(&h);
                                self.core.handle_unwatch(h);
                            }
                        }
                    }
                }
                PresenceOutput::Publish { sessions, update } => {
                    let mut sent = 0u64;
                    for s in sessions {
                        let sub = self
                            .subscribers
                            .get(&s)
                            .and_then(|(w, alias)| Some((w.upgrade()?, alias)));
                        match sub {
                            Some((a, alias)) => {
                                a.do_send(Push(aliased(update.clone(), alias.as_deref())));
                                sent += 1;
                            }
                            None => {
                                self.subscribers.remove(&s);
                                self.core.handle_unsubscribe(s);
                            }
                        }
                    }
                    metrics::counter!(m::PRESENCE_FANOUT_TOTAL).increment(sent);
                }
            }
        }
    }
}

impl Actor for UserActor {
    type Context = Context<Self>;
}

/// What a call needs to know about its callee: the core's view, and where each device's
/// session actor is.
#[derive(Debug, Clone, Default)]
pub struct UserView {
    /// Devices, preferences, history, whether the caller is known.
    pub callee: CalleeView,
    /// Where each device's call messages go.
    pub sessions: HashMap<SessionId, Recipient<ToDevice>>,
}

/// Where a device session takes messages.
#[derive(Debug, Clone)]
pub struct DeviceLink {
    /// Messages sent to the device as they are (chat, presence, address book).
    pub push: Recipient<Push>,
    /// Call offers and their outcome.
    pub calls: Recipient<ToDevice>,
}

/// Ask for [`PresenceView`].
#[derive(Message)]
#[rtype(result = "PresenceView")]
pub struct GetPresence;

impl Handler<GetPresence> for UserActor {
    type Result = MessageResult<GetPresence>;
    fn handle(&mut self, _: GetPresence, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.core.presence_view())
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
    /// Takes Opus.
    pub opus: bool,
}

impl Handler<SetCapabilities> for UserActor {
    type Result = ();
    fn handle(&mut self, m: SetCapabilities, _: &mut Context<Self>) {
        self.core.handle_capabilities(m.session, m.video, m.opus);
        self.publish(m.session);
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
        // The view counts the calls ringing this user: forget those that ended.
        self.prune_watchers();
        MessageResult(UserView {
            callee: self.core.callee_view(&m.caller, SystemTime::now()),
            sessions: self
                .devices
                .iter()
                .map(|(s, l)| (*s, l.calls.clone()))
                .chain(self.remote.iter().map(|(s, r)| (*s, r.clone())))
                .collect(),
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
        self.core.handle_answer(m.device, m.at);
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
            self.core.handle_answer(device, at);
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
            sink.save(self.core.name(), &m.0);
        }
        self.core.handle_preferences(m.0);
    }
}

/// Read the user's preferences.
#[derive(Message)]
#[rtype(result = "Arc<Preferences>")]
pub struct GetPreferences;

impl Handler<GetPreferences> for UserActor {
    type Result = MessageResult<GetPreferences>;
    fn handle(&mut self, _: GetPreferences, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.core.preferences())
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
pub struct Watch {
    /// The call.
    pub call: CallHandle,
    /// Where changes go.
    pub to: WeakRecipient<PresenceChanged>,
}

/// The call stopped ringing (it was answered): it no longer watches, nor counts as
/// ringing this user.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unwatch {
    /// The call.
    pub call: CallHandle,
}

/// A device session of another user subscribes to this user's presence.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// The subscriber's session id.
    pub session: SessionId,
    /// Where the subscriber's updates go.
    pub addr: WeakRecipient<Push>,
    /// The name the subscriber knows this user by, when not the plain user name (a user
    /// of another tenant is `user@tenant`): its presence updates carry that name.
    pub alias: Option<String>,
}

/// A presence update as a subscriber that knows the user as `alias` sees it.
fn aliased(
    mut update: parley_codecs::control::ServerMsg,
    alias: Option<&str>,
) -> parley_codecs::control::ServerMsg {
    if let (Some(a), parley_codecs::control::ServerMsg::PresenceUpdate { user, .. }) =
        (alias, &mut update)
    {
        *user = a.to_owned();
    }
    update
}

/// Ends a [`Subscribe`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub SessionId);

/// Hand a message (a chat, a copy of the user's own chat, a receipt) to every device of
/// this user but `except`; replies with how many got it.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct Deliver {
    /// The message.
    pub msg: ServerMsg,
    /// The device session not to send it to (the one that sent the original).
    pub except: Option<SessionId>,
}

/// How many devices of this user are online.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct Online;

/// A device session logged in as this user.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach {
    /// Session id.
    pub session: SessionId,
    /// Device name.
    pub device: String,
    /// Where the session takes messages.
    pub link: DeviceLink,
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

/// The user's whole address book as stored (at start-up): it tells routing which callers
/// are known. Devices get it at login.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddressBookLoaded(pub Vec<AddressBookEntry>);

/// A change to the user's address book; routing learns it and every device gets it as
/// `address_book_update` frames.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddressBookChanged {
    /// Entries added or updated, newest first.
    pub upserted: Vec<AddressBookEntry>,
    /// Addresses evicted.
    pub removed: Vec<String>,
}

impl Handler<Watch> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Watch, _: &mut Context<Self>) {
        self.prune_watchers();
        self.watchers.insert(m.call, m.to);
        self.core.handle_watch(m.call);
    }
}

impl Handler<Unwatch> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Unwatch, _: &mut Context<Self>) {
        self.watchers.remove(&m.call);
        self.core.handle_unwatch(m.call);
    }
}

impl Handler<Subscribe> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Subscribe, _: &mut Context<Self>) {
        if let Some(a) = m.addr.upgrade() {
            let update = self.core.handle_subscribe(m.session);
            a.do_send(Push(aliased(update, m.alias.as_deref())));
            self.subscribers.insert(m.session, (m.addr, m.alias));
        }
    }
}

impl Handler<Unsubscribe> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Unsubscribe, _: &mut Context<Self>) {
        self.subscribers.remove(&m.0);
        self.core.handle_unsubscribe(m.0);
    }
}

impl Handler<Deliver> for UserActor {
    type Result = u32;
    fn handle(&mut self, m: Deliver, _: &mut Context<Self>) -> u32 {
        let mut sent = 0;
        for (session, link) in &self.devices {
            if Some(*session) != m.except {
                link.push.do_send(Push(m.msg.clone()));
                sent += 1;
            }
        }
        sent
    }
}

impl Handler<Online> for UserActor {
    type Result = u32;
    fn handle(&mut self, _: Online, _: &mut Context<Self>) -> u32 {
        self.devices.len() as u32
    }
}

impl Handler<Attach> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Attach, _: &mut Context<Self>) {
        self.devices.insert(m.session, m.link);
        self.core.handle_attach(m.session, m.device, m.remote);
        self.publish(m.session);
        self.fan_out();
    }
}

impl Handler<Detach> for UserActor {
    type Result = ();
    fn handle(&mut self, m: Detach, _: &mut Context<Self>) {
        if self.devices.remove(&m.0).is_some() {
            self.core.handle_detach(m.0);
            self.publish(m.0);
            self.fan_out();
        }
    }
}

impl Handler<PresenceUpdate> for UserActor {
    type Result = ();
    fn handle(&mut self, m: PresenceUpdate, _: &mut Context<Self>) {
        let before = self
            .core
            .device(m.session)
            .map(|d| (d.status, d.note.clone()));
        self.core
            .handle_presence(m.session, m.status, m.idle_ms, m.note);
        // Idle time alone is not news for other nodes either.
        if before
            != self
                .core
                .device(m.session)
                .map(|d| (d.status, d.note.clone()))
        {
            self.publish(m.session);
        }
        self.fan_out();
    }
}

impl Handler<AddressBookLoaded> for UserActor {
    type Result = ();
    fn handle(&mut self, m: AddressBookLoaded, _: &mut Context<Self>) {
        self.core.handle_address_book(
            m.0.into_iter()
                .filter(|e| e.known || e.blocked)
                .map(|e| (e.address, e.known, e.blocked)),
        );
    }
}

impl Handler<AddressBookChanged> for UserActor {
    type Result = ();
    fn handle(&mut self, m: AddressBookChanged, _: &mut Context<Self>) {
        self.core.handle_address_book_change(
            m.upserted
                .iter()
                .map(|e| (e.address.clone(), e.known, e.blocked)),
            m.removed.iter().cloned(),
        );
        if self.devices.is_empty() {
            return;
        }
        // One unframed update per device: each session adds what its device sees (the
        // Parley user behind an entry) and splits it into frames.
        let update = ServerMsg::AddressBookUpdate {
            entries: m.upserted,
            removed: m.removed,
        };
        for link in self.devices.values() {
            link.push.do_send(Push(update.clone()));
        }
    }
}

/// A device of this user on another node of the cluster appeared, changed, or went
/// (`state: None`). Calls ring it through `calls`, which carries offers to its node;
/// chats and address-book changes are not pushed to it (its own node does that).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteDevice {
    /// The node-local id this node gave the remote device.
    pub session: SessionId,
    /// Its state now, or `None`: gone.
    pub state: Option<parley_core::router::DeviceState>,
    /// Where its call offers go (the proxy to its node).
    pub calls: Recipient<ToDevice>,
}

impl Handler<RemoteDevice> for UserActor {
    type Result = ();
    fn handle(&mut self, m: RemoteDevice, _: &mut Context<Self>) {
        // A local session id is never a remote one; refuse to touch a local device.
        if self.devices.contains_key(&m.session) {
            return;
        }
        match m.state {
            Some(state) => {
                if self.remote.insert(m.session, m.calls).is_none() {
                    self.core
                        .handle_attach(m.session, state.device.clone(), None);
                }
                self.core
                    .handle_capabilities(m.session, state.video, state.opus);
                self.core
                    .handle_presence(m.session, state.status, state.idle_ms, state.note);
            }
            None => {
                if self.remote.remove(&m.session).is_some() {
                    self.core.handle_detach(m.session);
                }
            }
        }
        self.fan_out();
    }
}
