//! The presence session actor: one per logged-in IM device connection.
//!
//! The switch's QUIC driver authenticates the device, starts this actor, feeds it the
//! device's control messages ([`FromClient`]) and writes what the actor pushes to the
//! bounded `out` queue. The actor keeps the calls offered to the device so that its
//! answers reach the right call actor, and tells them when the device goes away.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use parley_codecs::control::{self, AddressBookEntry, ClientMsg, ServerMsg};
use parley_core::call::{CallSpec, Origin};
use parley_core::dial::{self, DialTarget};
use parley_core::directory::UserIdentity;
use parley_core::ids::call_id;
use parley_core::rules::{Preferences, RulesError};
use tokio::sync::mpsc;

use crate::book::{BookError, BookOp, BookReply, BookRequest, BookService};
use crate::chat::{ChatError, ChatOp, ChatReply, ChatRequest, ChatService};
use crate::messages::{DeviceLegEvent, FromDevice, Push, SessionId, ToDevice};
use crate::metrics as m;
use crate::registry::Registry;
use crate::user::{
    Attach, Detach, DeviceLink, GetPreferences, PresenceUpdate, SetCapabilities, SetPreferences,
    Subscribe, Unsubscribe, UserActor,
};
use crate::{CallActor, CallEnv, CallSetup};

/// Who a session belongs to and where it can find other users (same tenant only).
#[derive(Clone, Debug)]
pub struct SessionOwner {
    /// The user (tenant, name, own E.164 number presented as the caller of dialled calls).
    pub id: UserIdentity,
    /// The user's actor.
    pub addr: Addr<UserActor>,
    /// Every live user (lookups are restricted to the user's tenant).
    pub registry: Arc<Registry>,
    /// What calls dialled from this device need; `None` disables dialling.
    pub calls: Option<Arc<CallEnv>>,
    /// Where chats are archived, delivered and kept for offline users.
    pub chats: ChatService,
    /// Where the device connects from.
    pub remote: Option<std::net::SocketAddr>,
    /// Closes the device's connection (the session asks for it when the device is
    /// presumed lost).
    pub close: Arc<tokio::sync::Notify>,
    /// Where the user's address book is edited and searched; `None`: not on this node.
    pub book: Option<BookService>,
}

/// A device session.
pub struct PresenceSession {
    id: SessionId,
    device: String,
    owner: SessionOwner,
    user: Addr<UserActor>,
    out: mpsc::Sender<ServerMsg>,
    calls: HashMap<String, Recipient<FromDevice>>,
    /// Users the device subscribed to.
    watching: HashSet<String>,
    /// Book entries that are Parley users of the tenant: address → user.
    book_users: HashMap<String, String>,
    /// Users watched because the book holds them, with how many entries do.
    book_watch: HashMap<String, usize>,
    /// The users in the book as it stood at login, (address, user), watched when the
    /// session starts.
    login_book: Option<Vec<(String, String)>>,
    /// Book requests sent and not answered yet.
    book_pending: usize,
    /// Chat requests sent and not answered yet.
    chat_pending: usize,
    /// Chats pushed while the inbox was being delivered: they follow it.
    held: Option<Vec<ServerMsg>>,
    /// The `id` of the request being handled.
    request: Option<u64>,
    /// The device declared Opus (`capabilities`): its calls offer it.
    opus: bool,
}

/// Sets `user` on the entries whose address is the number of a user of `tenant` (and
/// clears it on the others).
pub fn mark_users(registry: &Registry, tenant: &str, entries: &mut [AddressBookEntry]) {
    for e in entries {
        e.user = registry
            .user_by_number(&e.address)
            .filter(|r| r.id.tenant == tenant)
            .map(|r| r.id.user);
    }
}

/// Chat requests one device may have outstanding (more are answered `busy`).
const MAX_CHAT_PENDING: usize = 64;

/// Book requests one device may have outstanding (more are answered `busy`): the book
/// task serves every device in turn, and one device must not fill its queue.
const MAX_BOOK_PENDING: usize = 16;

impl PresenceSession {
    /// A session for an authenticated device; `out` is the device's send queue.
    pub fn new(
        id: SessionId,
        device: String,
        owner: SessionOwner,
        out: mpsc::Sender<ServerMsg>,
    ) -> Self {
        Self {
            id,
            device,
            user: owner.addr.clone(),
            owner,
            out,
            calls: HashMap::new(),
            watching: HashSet::new(),
            book_users: HashMap::new(),
            book_watch: HashMap::new(),
            login_book: None,
            book_pending: 0,
            chat_pending: 0,
            held: Some(Vec::new()),
            request: None,
            opus: false,
        }
    }

    /// The entries of the book the device got at login that are users of the tenant, as
    /// (address, user) (the driver sends the pages right after `login_ok`, marked with
    /// [`mark_users`]): the session watches those users' presence as it starts.
    pub fn with_book(mut self, users: Vec<(String, String)>) -> Self {
        self.login_book = Some(users);
        self
    }

    /// Marks entries that are Parley users of the own tenant (`user`), and watches those
    /// users' presence for the device; forgets watches for entries that are gone.
    fn annotate(
        &mut self,
        entries: &mut [AddressBookEntry],
        removed: &[String],
        ctx: &mut Context<Self>,
    ) {
        mark_users(&self.owner.registry, &self.owner.id.tenant, entries);
        let marked = entries
            .iter()
            .map(|e| (e.address.as_str(), e.user.as_deref()));
        self.track(marked, removed, ctx);
    }

    /// Follows what marked entries (address, user) and removed addresses change in the
    /// set of users the book watches.
    fn track<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
        removed: &[String],
        ctx: &mut Context<Self>,
    ) {
        for address in removed {
            if let Some(user) = self.book_users.remove(address) {
                self.unwatch_book_user(&user);
            }
        }
        for (address, user) in entries {
            let before = match user {
                Some(u) => self.book_users.insert(address.to_owned(), u.to_owned()),
                None => self.book_users.remove(address),
            };
            if before.as_deref() == user {
                continue;
            }
            if let Some(old) = before {
                self.unwatch_book_user(&old);
            }
            if let Some(new) = user {
                let n = self.book_watch.entry(new.to_owned()).or_default();
                *n += 1;
                if *n == 1 && !self.watching.contains(new) {
                    self.watch(new, ctx);
                }
            }
        }
    }

    fn unwatch_book_user(&mut self, user: &str) {
        if let Entry::Occupied(mut n) = self.book_watch.entry(user.to_owned()) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
                if !self.watching.contains(user)
                    && let Some(r) = self.find_user(user)
                {
                    r.addr.do_send(Unsubscribe(self.id));
                }
            }
        }
    }

    /// Subscribes this session to a user's presence.
    fn watch(&self, user: &str, ctx: &mut Context<Self>) -> bool {
        let Some(r) = self.find_user(user) else {
            return false;
        };
        let alias = (r.id.tenant != self.owner.id.tenant).then(|| user.to_owned());
        r.addr.do_send(Subscribe {
            session: self.id,
            addr: ctx.address().recipient::<Push>().downgrade(),
            alias,
        });
        true
    }

    /// An address book change for the device: annotated, then in frames.
    fn send_book_update(
        &mut self,
        mut entries: Vec<AddressBookEntry>,
        removed: Vec<String>,
        ctx: &mut Context<Self>,
    ) {
        self.annotate(&mut entries, &removed, ctx);
        for frame in control::address_book_update_frames(entries, removed) {
            self.send(frame);
        }
    }

    /// Sends a request to the book task; the reply comes back through `done`.
    fn book_request(
        &mut self,
        op: BookOp,
        ctx: &mut Context<Self>,
        done: impl FnOnce(&mut Self, BookReply, &mut Context<Self>) + 'static,
    ) {
        let id = self.request;
        let Some(service) = self.owner.book.clone() else {
            return self.error(
                "unavailable",
                "the address book is not kept on this node".into(),
            );
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = BookRequest {
            tenant: self.owner.id.tenant.clone(),
            user: self.owner.id.user.clone(),
            op,
            reply,
        };
        if self.book_pending >= MAX_BOOK_PENDING || service.try_send(request).is_err() {
            return self.error("busy", "the address book is busy; retry".into());
        }
        self.book_pending += 1;
        ctx.spawn(answer.into_actor(self).map(move |res, act, ctx| {
            act.book_pending -= 1;
            let res = res.unwrap_or_else(|_| {
                Err(BookError::new(
                    "unavailable",
                    "the address book task is gone",
                ))
            });
            match res {
                Ok(r) => done(act, r, ctx),
                Err(e) => act.error_for(id, e.code, e.message),
            }
        }));
    }

    fn book_entry_done(&mut self, op: BookOp, ctx: &mut Context<Self>) {
        let id = self.request;
        self.book_request(op, ctx, move |act, reply, ctx| {
            let mut entry = match reply {
                BookReply::Entry(e) => e,
                BookReply::Results(_) | BookReply::Calls(..) => None,
            };
            if let Some(e) = entry.as_mut() {
                act.annotate(std::slice::from_mut(e), &[], ctx);
            }
            act.send(ServerMsg::BookOk { id, entry });
        });
    }

    fn book_search(&mut self, query: String, limit: Option<u32>, ctx: &mut Context<Self>) {
        if query.len() > control::MAX_BOOK_NAME_BYTES {
            return self.error(
                "bad_message",
                format!(
                    "book_search: the query must be at most {} bytes",
                    control::MAX_BOOK_NAME_BYTES
                ),
            );
        }
        let id = self.request;
        let limit = limit
            .unwrap_or(control::MAX_BOOK_SEARCH_RESULTS)
            .clamp(1, control::MAX_BOOK_SEARCH_RESULTS);
        let op = BookOp::Search {
            query: query.clone(),
            limit,
        };
        self.book_request(op, ctx, move |act, reply, _| {
            let mut entries = match reply {
                BookReply::Results(r) => r,
                BookReply::Entry(e) => e.into_iter().collect(),
                BookReply::Calls(..) => Vec::new(),
            };
            // Annotated for the `user` field only: results are not the book, so they
            // do not change which users the book watches.
            for e in &mut entries {
                e.user = act.book_users.get(&e.address).cloned();
            }
            act.send(control::book_results_frame(id, query, entries));
        });
    }

    fn call_history(
        &mut self,
        before: Option<String>,
        limit: Option<u32>,
        ctx: &mut Context<Self>,
    ) {
        let id = self.request;
        let limit = limit
            .unwrap_or(control::MAX_CALL_HISTORY_PAGE)
            .clamp(1, control::MAX_CALL_HISTORY_PAGE);
        self.book_request(
            BookOp::History { before, limit },
            ctx,
            move |act, reply, _| {
                let (calls, next) = match reply {
                    BookReply::Calls(calls, next) => (calls, next),
                    _ => (Vec::new(), None),
                };
                act.send(control::call_history_frame(id, calls, next));
            },
        );
    }

    /// A non-fatal error answering the request being handled (its `id`, if it had one).
    fn error(&self, code: &str, message: String) {
        self.error_for(self.request, code, message);
    }

    /// A non-fatal error answering request `id` (for answers that come later).
    fn error_for(&self, id: Option<u64>, code: &str, message: String) {
        self.send(ServerMsg::Error {
            code: code.into(),
            message,
            fatal: false,
            id,
        });
    }

    fn subscribe(&mut self, users: Vec<String>, ctx: &mut Context<Self>) {
        for u in users {
            if self.watch(&u, ctx) {
                self.watching.insert(u);
            } else {
                self.error("unknown_user", format!("no user {u} you can reach"));
            }
        }
    }

    /// A user named by a device: `user` of the own tenant, or `user@tenant` of a tenant
    /// both sides federate with (`None` for anyone else, whether they exist or not).
    fn find_user(&self, name: &str) -> Option<crate::registry::UserRef> {
        let own = &self.owner.id.tenant;
        let (tenant, user) = parley_core::directory::split_name(own, name);
        if !self.owner.registry.federated(own, tenant) {
            return None;
        }
        self.owner.registry.user_by_name(tenant, user)
    }

    fn unsubscribe(&mut self, users: Vec<String>) {
        for u in users {
            // A user the book holds stays watched: the book shows their presence.
            if self.watching.remove(&u)
                && !self.book_watch.contains_key(&u)
                && let Some(r) = self.find_user(&u)
            {
                r.addr.do_send(Unsubscribe(self.id));
            }
        }
    }

    fn dial(&mut self, to: String, ctx: &mut Context<Self>) {
        let Some(env) = self.owner.calls.clone() else {
            return self.error("unavailable", "dialling is not enabled on this node".into());
        };
        let target = dial::resolve(
            &self.owner.id,
            &to,
            &*self.owner.registry,
            !env.trunks.is_empty(),
        );
        let (user, called, pstn_destination, dialled_by) = match target {
            Ok(DialTarget::User(u)) => {
                let number = u.number.clone();
                (u, number, None, Some(self.owner.id.clone()))
            }
            Ok(DialTarget::Pstn(n)) => (self.owner.id.clone(), n.clone(), Some(n), None),
            Err(e) => return self.error(e.code(), e.to_string()),
        };
        // The callee's actor, for its presence; the caller's own for a PSTN number.
        let Some(callee) = self.owner.registry.actor(&user) else {
            return self.error(
                "unavailable",
                format!("{} is not active on this node", user.user),
            );
        };
        let handle = env.handles.next();
        let call_id = call_id(handle);
        let spec = CallSpec {
            handle,
            sip_call_id: call_id.clone(),
            user,
            origin: Origin::Device(self.id),
            dialled_by,
            caller: self.owner.id.number.clone(),
            caller_name: Some(self.owner.id.user.clone()),
            called,
            pstn_destination,
            offer: dial::device_offer(self.opus),
            video_offer: None,
            ring_timeout: env.ring_timeout,
            media_timeout: env.media_timeout,
            offer_ack_timeout: env.offer_ack_timeout,
            max_ringing: env.max_ringing,
            started: std::time::Instant::now(),
            started_wall: std::time::SystemTime::now(),
        };
        tracing::info!(session = self.id, user = %self.owner.id.user, %to, call = %call_id, "device dials");
        let call = CallActor::new(CallSetup {
            spec,
            callee,
            caller_device: Some(ctx.address().recipient()),
            env,
        })
        .start();
        self.calls.insert(call_id.clone(), call.recipient());
        self.send(ServerMsg::Dialing { call_id, to });
    }

    fn get_preferences(&mut self, ctx: &mut Context<Self>) {
        let id = self.request;
        ctx.spawn(self.user.send(GetPreferences).into_actor(self).map(
            move |res, act, _| match res {
                Ok(p) => act.send(ServerMsg::Preferences {
                    preferences: serde_json::to_value(p.as_ref()).unwrap_or_default(),
                }),
                Err(_) => act.error_for(id, "unavailable", "user actor unavailable".into()),
            },
        ));
    }

    fn set_preferences(&mut self, value: serde_json::Value, ctx: &mut Context<Self>) {
        let id = self.request;
        let prefs = serde_json::from_value::<Preferences>(value)
            .map_err(|e| RulesError::Syntax(e.to_string()))
            .and_then(|p| p.validate().map(|()| p));
        match prefs {
            Ok(p) => {
                tracing::info!(session = self.id, user = %self.owner.id.user, rules = p.rules.len(), "preferences changed by the user");
                let reply = ServerMsg::Preferences {
                    preferences: serde_json::to_value(&p).unwrap_or_default(),
                };
                ctx.spawn(self.user.send(SetPreferences(p)).into_actor(self).map(
                    move |res, act, _| match res {
                        Ok(()) => act.send(reply),
                        Err(_) => act.error_for(id, "unavailable", "user actor unavailable".into()),
                    },
                ));
            }
            Err(e) => self.error("bad_preferences", e.to_string()),
        }
    }

    fn chat(&mut self, to: String, text: String, client_id: u64, ctx: &mut Context<Self>) {
        if text.is_empty() || text.len() > parley_codecs::control::MAX_CHAT_BYTES {
            metrics::counter!(m::CHAT_MESSAGES_TOTAL, "result" => "rejected").increment(1);
            return self.error(
                "bad_message",
                format!(
                    "chat text must be 1 to {} bytes",
                    parley_codecs::control::MAX_CHAT_BYTES
                ),
            );
        }
        // Control characters other than tab and line breaks are refused: besides being no
        // text, each one takes six bytes in JSON, so they could make the delivered frame
        // larger than the protocol limit.
        if text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        {
            metrics::counter!(m::CHAT_MESSAGES_TOTAL, "result" => "rejected").increment(1);
            return self.error(
                "bad_message",
                "chat text must not hold control characters (other than tab and line breaks)"
                    .into(),
            );
        }
        let Some(r) = self.find_user(&to) else {
            metrics::counter!(m::CHAT_MESSAGES_TOTAL, "result" => "unknown_user").increment(1);
            return self.error("unknown_user", format!("no user {to} you can reach"));
        };
        let op = ChatOp::Send {
            to: r.id,
            to_name: to,
            text,
        };
        self.chat_request(op, ctx, move |act, reply, _| {
            if let ChatReply::Sent { message, delivered } = reply {
                let result = if delivered > 0 { "delivered" } else { "stored" };
                metrics::counter!(m::CHAT_MESSAGES_TOTAL, "result" => result).increment(1);
                act.send(ServerMsg::ChatAck {
                    id: client_id,
                    delivered,
                    message,
                    stored: delivered == 0,
                });
            }
        });
    }

    /// Sends a request to the message task; the reply comes back through `done`.
    fn chat_request(
        &mut self,
        op: ChatOp,
        ctx: &mut Context<Self>,
        done: impl FnOnce(&mut Self, ChatReply, &mut Context<Self>) + 'static,
    ) {
        let id = self.request;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = ChatRequest {
            me: self.owner.id.clone(),
            session: self.id,
            op,
            reply,
        };
        if self.chat_pending >= MAX_CHAT_PENDING || self.owner.chats.try_send(request).is_err() {
            metrics::counter!(m::CHAT_MESSAGES_TOTAL, "result" => "busy").increment(1);
            return self.error("busy", "the message service is busy; retry".into());
        }
        self.chat_pending += 1;
        ctx.spawn(answer.into_actor(self).map(move |res, act, ctx| {
            act.chat_pending -= 1;
            let res = res
                .unwrap_or_else(|_| Err(ChatError::new("unavailable", "the message task is gone")));
            match res {
                Ok(r) => done(act, r, ctx),
                Err(e) => {
                    if e.code == "mailbox_full" {
                        metrics::counter!(m::CHAT_MESSAGES_TOTAL, "result" => "mailbox_full")
                            .increment(1);
                    }
                    act.error_for(id, e.code, e.message)
                }
            }
        }));
    }

    /// Asks for the messages kept while the user was offline; live chats wait behind them.
    fn fetch_inbox(&mut self, ctx: &mut Context<Self>) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = ChatRequest {
            me: self.owner.id.clone(),
            session: self.id,
            op: ChatOp::Inbox,
            reply,
        };
        if self.owner.chats.try_send(request).is_err() {
            // They stay kept, for the next login.
            tracing::warn!(
                session = self.id,
                "message task busy: inbox not delivered now"
            );
            return self.release_held();
        }
        ctx.spawn(answer.into_actor(self).map(|res, act, ctx| {
            let inbox = match res {
                Ok(Ok(ChatReply::Inbox(msgs))) => msgs,
                _ => Vec::new(),
            };
            if inbox.is_empty() {
                return act.release_held();
            }
            // Queued with back-pressure (an inbox can be larger than the send queue), then
            // reported delivered; a device lost meanwhile gets them again at its next login.
            let ids: Vec<u64> = inbox
                .iter()
                .filter_map(|m| match m {
                    ServerMsg::Chat { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            let out = act.out.clone();
            let queued = async move {
                for m in inbox {
                    if out.send(m).await.is_err() {
                        return false;
                    }
                }
                true
            };
            ctx.spawn(queued.into_actor(act).map(move |all, act, _| {
                if all {
                    metrics::counter!(m::CHAT_OFFLINE_DELIVERED_TOTAL).increment(ids.len() as u64);
                    let (reply, _) = tokio::sync::oneshot::channel();
                    let _ = act.owner.chats.try_send(ChatRequest {
                        me: act.owner.id.clone(),
                        session: act.id,
                        op: ChatOp::Delivered(ids),
                        reply,
                    });
                }
                act.release_held();
            }));
        }));
    }

    fn release_held(&mut self) {
        for m in self.held.take().unwrap_or_default() {
            self.send(m);
        }
    }

    fn chat_read(&mut self, message: u64, ctx: &mut Context<Self>) {
        self.chat_request(ChatOp::Read { message }, ctx, |_, _, _| {});
    }

    fn chat_history(
        &mut self,
        with: String,
        (before, after, limit): (Option<u64>, Option<u64>, Option<u32>),
        ctx: &mut Context<Self>,
    ) {
        let id = self.request;
        let Some(peer) = self.find_user(&with) else {
            return self.error("unknown_user", format!("no user {with} you can reach"));
        };
        if before.is_some() && after.is_some() {
            return self.error(
                "bad_message",
                "chat_history takes `before` or `after`, not both".into(),
            );
        }
        let limit = limit
            .unwrap_or(parley_codecs::control::MAX_HISTORY_PAGE)
            .clamp(1, parley_codecs::control::MAX_HISTORY_PAGE);
        let op = ChatOp::History {
            peer: peer.id,
            before,
            after,
            limit,
        };
        self.chat_request(op, ctx, move |act, reply, _| {
            if let ChatReply::History { messages, more } = reply {
                let older = after.is_none();
                act.send(control::chat_history_frame(id, with, messages, older, more));
            }
        });
    }

    fn send(&self, msg: ServerMsg) {
        if self.out.try_send(msg).is_err() {
            metrics::counter!(m::DEVICE_QUEUE_DROPS_TOTAL).increment(1);
            tracing::warn!(
                session = self.id,
                "device send queue full or closed; message dropped"
            );
        }
    }

    fn forward_to_call(&mut self, call_id: &str, event: DeviceLegEvent, keep: bool) {
        let rec = if keep {
            self.calls.get(call_id).cloned()
        } else {
            self.calls.remove(call_id)
        };
        match rec {
            Some(r) => r.do_send(FromDevice {
                session: self.id,
                event,
            }),
            None => self.error("unknown_call", format!("no call {call_id} on this device")),
        }
    }
}

impl Actor for PresenceSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics::gauge!(m::PRESENCE_SESSIONS_ACTIVE).increment(1.0);
        self.user.do_send(Attach {
            session: self.id,
            device: self.device.clone(),
            link: DeviceLink {
                push: ctx.address().recipient(),
                calls: ctx.address().recipient(),
            },
            remote: self.owner.remote,
        });
        if let Some(users) = self.login_book.take() {
            let marked = users.iter().map(|(a, u)| (a.as_str(), Some(u.as_str())));
            self.track(marked, &[], ctx);
        }
        self.fetch_inbox(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        metrics::gauge!(m::PRESENCE_SESSIONS_ACTIVE).decrement(1.0);
        self.user.do_send(Detach(self.id));
        let watching: HashSet<String> = self
            .watching
            .drain()
            .chain(self.book_watch.drain().map(|(u, _)| u))
            .collect();
        for u in watching {
            if let Some(r) = self.find_user(&u) {
                r.addr.do_send(Unsubscribe(self.id));
            }
        }
        for (_, call) in self.calls.drain() {
            call.do_send(FromDevice {
                session: self.id,
                event: DeviceLegEvent::Gone,
            });
        }
    }
}

/// A control message from the device (after login), with the request `id` it carried.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromClient {
    /// The message.
    pub msg: ClientMsg,
    /// Its request id, echoed by any `error` that answers it.
    pub id: Option<u64>,
}

/// The device's connection closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected;

impl Handler<FromClient> for PresenceSession {
    type Result = ();
    fn handle(&mut self, msg: FromClient, ctx: &mut Context<Self>) {
        self.request = msg.id;
        match msg.msg {
            ClientMsg::Subscribe { users } => self.subscribe(users, ctx),
            ClientMsg::Unsubscribe { users } => self.unsubscribe(users),
            ClientMsg::Chat { to, text, id } => self.chat(to, text, id, ctx),
            ClientMsg::ChatRead { message } => self.chat_read(message, ctx),
            ClientMsg::ChatHistory {
                with,
                before,
                after,
                limit,
            } => self.chat_history(with, (before, after, limit), ctx),
            ClientMsg::GetPreferences => self.get_preferences(ctx),
            ClientMsg::Dial { to } => self.dial(to, ctx),
            ClientMsg::Capabilities { video, codecs } => {
                self.opus = codecs.iter().any(|c| c.eq_ignore_ascii_case("opus"));
                self.user.do_send(SetCapabilities {
                    session: self.id,
                    video,
                    opus: self.opus,
                });
            }
            ClientMsg::SetPreferences { preferences } => self.set_preferences(preferences, ctx),
            ClientMsg::Presence {
                status,
                idle_ms,
                note,
            } => {
                let label = match status {
                    parley_codecs::control::Status::Available => "available",
                    parley_codecs::control::Status::Away => "away",
                    parley_codecs::control::Status::Busy => "busy",
                    parley_codecs::control::Status::DoNotDisturb => "do_not_disturb",
                    parley_codecs::control::Status::Offline => "offline",
                };
                metrics::counter!(m::PRESENCE_UPDATES_TOTAL, "status" => label).increment(1);
                self.user.do_send(PresenceUpdate {
                    session: self.id,
                    status,
                    idle_ms,
                    note,
                });
            }
            ClientMsg::Ringing { call_id } => {
                self.forward_to_call(&call_id, DeviceLegEvent::Delivered, true)
            }
            ClientMsg::Answer { call_id } => {
                self.forward_to_call(&call_id, DeviceLegEvent::Answer, true)
            }
            ClientMsg::Reject { call_id } => {
                self.forward_to_call(&call_id, DeviceLegEvent::Reject, false)
            }
            ClientMsg::Hangup { call_id } => {
                self.forward_to_call(&call_id, DeviceLegEvent::Hangup, false)
            }
            ClientMsg::Ping { id } => self.send(ServerMsg::Pong { id }),
            ClientMsg::BookSet {
                address,
                name,
                note,
                favourite,
            } => self.book_entry_done(
                BookOp::Set {
                    address,
                    name,
                    note,
                    favourite,
                },
                ctx,
            ),
            ClientMsg::BookDelete { address } => {
                self.book_entry_done(BookOp::Delete { address }, ctx)
            }
            ClientMsg::BookBlock { address, blocked } => {
                self.book_entry_done(BookOp::Block { address, blocked }, ctx)
            }
            ClientMsg::BookSearch { query, limit } => self.book_search(query, limit, ctx),
            ClientMsg::CallHistory { before, limit } => self.call_history(before, limit, ctx),
            // The WebSocket transport answers offers itself; here the device is on QUIC.
            ClientMsg::WebrtcOffer { .. } => self.error(
                "unsupported",
                "webrtc_offer: this connection carries media as RoQ datagrams".into(),
            ),
            ClientMsg::Login { .. } => self.error(
                "already_logged_in",
                "login is accepted once per connection".into(),
            ),
        }
    }
}

impl Handler<ToDevice> for PresenceSession {
    type Result = ();
    fn handle(&mut self, msg: ToDevice, ctx: &mut Context<Self>) {
        match msg {
            ToDevice::Offer {
                call_id,
                from,
                from_name,
                to,
                video,
                call,
                ..
            } => {
                // The device's `ringing` acknowledges the offer (and tells the call it
                // rings); a device that never sends it is presumed lost. An offer that does
                // not fit in the queue toward the device (it reads slower than calls come)
                // never reached it: that leg is gone at once and the call routes on, and
                // the device is not blamed for an offer it never saw.
                let offer = ServerMsg::IncomingCall {
                    call_id: call_id.clone(),
                    from,
                    from_name,
                    to,
                    video,
                };
                if self.out.try_send(offer).is_err() {
                    metrics::counter!(m::DEVICE_QUEUE_DROPS_TOTAL).increment(1);
                    tracing::warn!(session = self.id, call = %call_id, "device send queue full: call offer not delivered; the call routes on");
                    call.do_send(FromDevice {
                        session: self.id,
                        event: DeviceLegEvent::Gone,
                    });
                    return;
                }
                self.calls.insert(call_id, call);
            }
            ToDevice::Ringing { call_id } => self.send(ServerMsg::CallRinging { call_id }),
            ToDevice::Connected {
                call_id,
                flow_id,
                payload_type,
                video_flow_id,
                telephone_event,
                video_formats,
            } => {
                self.send(ServerMsg::CallConnected {
                    call_id,
                    flow_id,
                    payload_type,
                    video_flow_id,
                    telephone_event,
                    video_formats,
                });
            }
            ToDevice::Unresponsive => {
                tracing::warn!(session = self.id, user = %self.owner.id.user, "device left a call offer unacknowledged: closing its connection");
                self.send(ServerMsg::Error {
                    code: "unresponsive".into(),
                    message: "a call offer was not acknowledged in time".into(),
                    fatal: true,
                    id: None,
                });
                self.owner.close.notify_one();
                ctx.stop();
            }
            ToDevice::Ended { call_id, reason } => {
                self.calls.remove(&call_id);
                self.send(ServerMsg::CallEnded {
                    call_id,
                    reason: reason.into(),
                });
            }
        }
    }
}

impl Handler<Push> for PresenceSession {
    type Result = ();
    fn handle(&mut self, msg: Push, ctx: &mut Context<Self>) {
        match msg.0 {
            // The user actor sends book changes whole; the session annotates and frames.
            ServerMsg::AddressBookUpdate { entries, removed } => {
                self.send_book_update(entries, removed, ctx)
            }
            // Live chats wait until the inbox (older messages) is on its way.
            chat @ ServerMsg::Chat { .. } if self.held.is_some() => {
                if let Some(h) = self.held.as_mut() {
                    h.push(chat);
                }
            }
            other => self.send(other),
        }
    }
}

impl Handler<Disconnected> for PresenceSession {
    type Result = ();
    fn handle(&mut self, _: Disconnected, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
