//! What every IM transport shares: the login (session token, directory, built-in store),
//! its throttling, and the driver that feeds one logged-in device's control messages to
//! its [`PresenceSession`] actor and writes what the actor queues back.
//!
//! A transport brings three things: a [`FrameRx`] (the device's messages, one JSON body
//! each), a [`FrameTx`] (writes one [`ServerMsg`]) and a [`Link`] (closes the connection
//! and carries the device's media, if it can). QUIC (`super::quic`: a length-prefixed
//! control stream, RoQ datagrams) and WebSocket (`crate::web`: one text message per
//! control message) differ only there, so every rule of the protocol (login first,
//! limits, errors, fatal closes) is written once.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::Actor;
use parley_actors::registry::Registry;
use parley_actors::session::{Disconnected, FromClient, PresenceSession, SessionOwner};
use parley_codecs::control::{self, ClientMsg, ServerMsg};
use parley_core::admission::{LoginGuard, Refusal};
use tokio::sync::mpsc;

use crate::federation::{Federation, LoginFailure};
use crate::metrics as m;
use crate::relay::Relay;
use crate::store::Store;

/// Shared state of the IM endpoints (QUIC and WebSocket alike).
pub struct ImContext {
    /// Users.
    pub store: Store,
    /// Live user actors.
    pub registry: Arc<Registry>,
    /// The relay.
    pub relay: Arc<Relay>,
    /// Seconds to log in.
    pub login_timeout: Duration,
    /// Session id source.
    pub next_session: AtomicU64,
    /// What calls dialled from devices need.
    pub calls: Option<Arc<parley_actors::CallEnv>>,
    /// Where devices' chats go (archive, delivery, offline inbox).
    pub chats: parley_actors::chat::ChatService,
    /// The runtime QUIC runs on (see [`super::quic::QuicRuntime`]); device datagram
    /// readers run there.
    pub quic: tokio::runtime::Handle,
    /// Login throttling and the cap on connections not logged in yet.
    pub guard: std::sync::Mutex<LoginGuard>,
    /// Tenants with directories, their agents, session tokens.
    pub federation: Arc<Federation>,
    /// Where devices' address book requests go.
    pub books: parley_actors::book::BookService,
    /// Set when the node drains: new logins are refused (`draining`).
    pub draining: std::sync::atomic::AtomicBool,
}

/// Who a login proved to be.
#[derive(Debug)]
struct LoggedIn {
    tenant: String,
    user: String,
    display_name: Option<String>,
    /// The directory's password stamp (session tokens end when it changes).
    stamp: Option<String>,
    /// Authenticated by the tenant's directory.
    directory: bool,
}

/// Checks a login: a session token, the tenant's directory through an agent, or the
/// built-in store.
async fn authenticate(
    ctx: &ImContext,
    tenant: &str,
    user: &str,
    password: &str,
    token: Option<&str>,
) -> Result<LoggedIn, LoginFailure> {
    let fed = &ctx.federation;
    let directory = fed.directory_tenant(tenant);
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        return match fed.redeem(tenant, user, token).await? {
            Some(d) => Ok(LoggedIn {
                tenant: d.row.tenant,
                user: d.row.user,
                display_name: d.row.display_name,
                stamp: d.stamp,
                directory: true,
            }),
            // A built-in user, or a directory tenant with no agent (within the grace).
            None => Ok(LoggedIn {
                tenant: tenant.to_owned(),
                user: user.to_owned(),
                display_name: None,
                stamp: None,
                directory: directory.is_some(),
            }),
        };
    }
    if let Some(t) = directory {
        let d = fed.login(&t, user, password).await?;
        return Ok(LoggedIn {
            tenant: d.row.tenant,
            user: d.row.user,
            display_name: d.row.display_name,
            stamp: d.stamp,
            directory: true,
        });
    }
    match ctx.store.verify(tenant, user, password).await {
        Ok(Some(row)) => Ok(LoggedIn {
            tenant: row.tenant,
            user: row.user,
            display_name: None,
            stamp: None,
            directory: false,
        }),
        Ok(None) => Err(LoginFailure::Denied),
        Err(e) => {
            tracing::error!(error = %e, "user store failed during login");
            Err(LoginFailure::StoreUnavailable)
        }
    }
}

impl ImContext {
    pub(crate) fn guard(&self) -> std::sync::MutexGuard<'_, LoginGuard> {
        // The guard's state stays consistent whatever panicked while holding it.
        self.guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection counted as not logged in yet; settled once, when it logs in or goes.
pub(crate) struct Pending {
    ctx: Arc<ImContext>,
    ip: std::net::IpAddr,
    settled: bool,
}

impl Pending {
    /// A connection from `ip`, admitted by the guard's `handle_connect`.
    pub(crate) fn new(ctx: Arc<ImContext>, ip: std::net::IpAddr) -> Self {
        Self {
            ctx,
            ip,
            settled: false,
        }
    }

    fn settle(&mut self) {
        if !std::mem::replace(&mut self.settled, true) {
            self.ctx.guard().handle_settled(self.ip);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.settle();
    }
}

/// What a device's next control message is.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// One message body (JSON).
    Frame(Vec<u8>),
    /// The device closed its side cleanly.
    End,
    /// The message breaks the transport's framing (over the size limit, not text): the
    /// device's fault, answered with a fatal `bad_message` (protocol §2).
    Framing(String),
    /// The connection broke (reset, lost, silent past the idle timeout): nothing to
    /// answer.
    Broken(String),
}

/// The device's messages.
pub(crate) trait FrameRx: Send {
    /// The next one (cancel-safe enough to race against the session's close).
    fn next(&mut self) -> impl Future<Output = Inbound> + Send;
}

/// Writes to the device.
pub(crate) trait FrameTx: Send + 'static {
    /// Writes one message; `Err` once the connection is gone.
    fn send(&mut self, msg: &ServerMsg) -> impl Future<Output = Result<(), ()>> + Send;
    /// No more messages (the error before a fatal close has been written).
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// The connection itself.
pub(crate) trait Link: Send + 'static {
    /// Closes it, `code` naming why (fatal error codes, `bye`).
    fn close(&self, code: &str);
    /// The device logged in as `session`: start the transport's own work (QUIC: RoQ
    /// datagrams to the relay; WebSocket: keep-alive pings). Returns the task to stop when
    /// the session ends.
    fn start(&self, ctx: &ImContext, session: u64) -> Option<tokio::task::JoinHandle<()>>;
    /// The session ended: what `start` set up goes (the relay forgets its RoQ flows).
    fn stop(&self, ctx: &ImContext, session: u64);
    /// Transport label for logs and metrics (`quic`, `websocket`).
    fn transport(&self) -> &'static str;
}

/// Encodes `msg` as one framed message (4-byte length, then the JSON body), or counts and
/// logs why it is not sent: the device would take an over-long message for a protocol
/// violation, and pages and length limits keep every message the node builds within it.
pub(crate) fn frame_of(msg: &ServerMsg) -> Option<bytes::BytesMut> {
    let mut buf = bytes::BytesMut::new();
    match control::encode(msg, &mut buf) {
        Ok(()) => Some(buf),
        Err(e) => {
            metrics::counter!(m::IM_FRAMES_REFUSED_TOTAL).increment(1);
            tracing::error!(error = %e, kind = msg_kind(msg), "message to device not sent");
            None
        }
    }
}

/// The `type` of a server message, for logs.
pub(crate) fn msg_kind(msg: &ServerMsg) -> &'static str {
    match msg {
        ServerMsg::AddressBook { .. } => "address_book",
        ServerMsg::AddressBookUpdate { .. } => "address_book_update",
        ServerMsg::Chat { .. } => "chat",
        ServerMsg::Preferences { .. } => "preferences",
        ServerMsg::Error { .. } => "error",
        _ => "other",
    }
}

/// Writes a fatal error, then closes.
async fn fatal(link: &impl Link, tx: &mut impl FrameTx, code: &str, message: String) {
    metrics::counter!(m::IM_PROTOCOL_ERRORS_TOTAL, "kind" => "fatal").increment(1);
    let _ = tx
        .send(&ServerMsg::Error {
            code: code.into(),
            message,
            fatal: true,
            id: None,
        })
        .await;
    tx.finish().await;
    // Give the peer a moment to read the error before the close overtakes it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    link.close(code);
}

/// Drives one device connection from its first message to its end: the login (within
/// the login timeout, throttled, answered with `login_ok` and the address book), then
/// every message to the session actor and everything it queues to the device. Must run
/// on the actix arbiter (sessions are actors).
pub(crate) async fn run_device(
    ctx: Arc<ImContext>,
    remote: std::net::SocketAddr,
    (mut rx, mut tx, link): (impl FrameRx, impl FrameTx, impl Link),
    mut pending: Pending,
) {
    let transport = link.transport();
    let login = tokio::time::timeout(ctx.login_timeout, rx.next()).await;
    let body = match login {
        Ok(Inbound::Frame(b)) => b,
        Ok(Inbound::Framing(e)) => return fatal(&link, &mut tx, "bad_message", e).await,
        Ok(Inbound::Broken(e)) => {
            tracing::debug!(%remote, %transport, error = %e, "connection broke before login");
            link.close("closed");
            return;
        }
        Ok(Inbound::End) | Err(_) => {
            return fatal(
                &link,
                &mut tx,
                "not_logged_in",
                "login required within the login timeout".into(),
            )
            .await;
        }
    };
    let (tenant, user, password, device, token) = match control::decode_request(&body).0 {
        Ok(ClientMsg::Login {
            tenant,
            user,
            password,
            device,
            token,
        }) => (tenant, user, password, device, token),
        Ok(_) => {
            return fatal(
                &link,
                &mut tx,
                "not_logged_in",
                "the first message must be login".into(),
            )
            .await;
        }
        Err(e) => return fatal(&link, &mut tx, "bad_message", e.to_string()).await,
    };
    if ctx.draining.load(Ordering::Relaxed) {
        return fatal(
            &link,
            &mut tx,
            "draining",
            "this node is draining: connect to another node".into(),
        )
        .await;
    }
    // Throttled before any hashing: the answer is the same whether the user exists.
    let checked = ctx
        .guard()
        .check_login(Instant::now(), remote.ip(), &tenant, &user);
    if let Err(refusal) = checked {
        metrics::counter!(m::AUTH_RESULTS_TOTAL, "tenant" => "unknown", "result" => "throttled")
            .increment(1);
        let (whom, after) = match refusal {
            Refusal::SourceThrottled(d) => ("from your address", d),
            Refusal::UserThrottled(d) => ("for this user", d),
            Refusal::PendingPerSource | Refusal::PendingTotal => ("", Duration::ZERO),
        };
        tracing::info!(%remote, %transport, %tenant, %user, reason = refusal.as_str(), "IM login throttled");
        return fatal(
            &link,
            &mut tx,
            "rate_limited",
            format!(
                "too many failed logins {whom}; retry in {} s",
                after.as_secs().max(1)
            ),
        )
        .await;
    }
    let who = match authenticate(&ctx, &tenant, &user, &password, token.as_deref()).await {
        Ok(who) => who,
        Err(f) => {
            if f.is_guess() {
                ctx.guard()
                    .handle_failure(Instant::now(), remote.ip(), &tenant, &user);
            }
            // Tenant label only for tenants we know, to keep the label set bounded.
            let label = if ctx.federation.tenant(&tenant).is_some()
                || ctx.registry.user_by_name(&tenant, &user).is_some()
            {
                tenant.clone()
            } else {
                "unknown".into()
            };
            metrics::counter!(m::AUTH_RESULTS_TOTAL, "tenant" => label, "result" => f.result())
                .increment(1);
            tracing::info!(%remote, %transport, %tenant, %user, result = f.result(), "IM login refused");
            return fatal(&link, &mut tx, f.code(), f.message()).await;
        }
    };
    let Some(user_ref) = ctx.registry.user_by_name(&who.tenant, &who.user) else {
        return fatal(
            &link,
            &mut tx,
            "auth_failed",
            "user is not active on this node".into(),
        )
        .await;
    };
    let row = who;
    pending.settle();
    metrics::counter!(m::AUTH_RESULTS_TOTAL, "tenant" => row.tenant.clone(), "result" => "ok")
        .increment(1);
    let session_id = ctx.next_session.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%remote, %transport, tenant = %row.tenant, user = %row.user, %device, session = session_id, "IM device logged in");

    let (out, mut queue) = mpsc::channel::<ServerMsg>(256);
    let session_token = ctx
        .federation
        .issue_token(&row.tenant, &row.user, row.stamp.clone());
    let _ = out.try_send(ServerMsg::LoginOk {
        number: user_ref.id.number.clone(),
        session: session_id,
        token: (!session_token.is_empty()).then_some(session_token),
        display_name: row.display_name.clone(),
    });
    // The book right after `login_ok`, before anything else can be queued, with the
    // Parley users in it marked (the session then watches their presence).
    let mut book = ctx
        .store
        .address_book(&row.tenant, &row.user)
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "address book read failed");
            Vec::new()
        });
    parley_actors::session::mark_users(&ctx.registry, &row.tenant, &mut book);
    let book_users: Vec<(String, String)> = book
        .iter()
        .filter_map(|e| Some((e.address.clone(), e.user.clone()?)))
        .collect();
    for page in control::address_book_frames(book) {
        let _ = out.try_send(page);
    }
    let transport_task = link.start(&ctx, session_id);
    let close = Arc::new(tokio::sync::Notify::new());
    let owner = SessionOwner {
        id: user_ref.id.clone(),
        addr: user_ref.addr.clone(),
        registry: ctx.registry.clone(),
        calls: ctx.calls.clone(),
        chats: ctx.chats.clone(),
        remote: Some(remote),
        close: close.clone(),
        book: Some(ctx.books.clone()),
    };
    let session = PresenceSession::new(session_id, device, owner, out.clone())
        .with_book(book_users)
        .start();
    // A directory that locks, disables or removes the account closes this session.
    let _tracked = row.directory.then(|| {
        ctx.federation
            .track_session(&row.tenant, &row.user, session_id, close.clone())
    });

    let writer = tokio::spawn(async move {
        while let Some(msg) = queue.recv().await {
            if tx.send(&msg).await.is_err() {
                break;
            }
        }
    });
    let refuse = |message: String, id: Option<u64>| {
        metrics::counter!(m::IM_PROTOCOL_ERRORS_TOTAL, "kind" => "control").increment(1);
        let _ = out.try_send(ServerMsg::Error {
            code: "bad_message".into(),
            message,
            fatal: true,
            id,
        });
    };
    loop {
        let frame = tokio::select! {
            f = rx.next() => f,
            // The session gave the device up (it left a call offer unacknowledged).
            () = close.notified() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
        };
        match frame {
            Inbound::Frame(body) => match control::decode_request(&body) {
                (Ok(msg), id) => session.do_send(FromClient { msg, id }),
                (Err(e), id) => {
                    refuse(e.to_string(), id);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            },
            Inbound::End => break,
            // A message over the limit after login is answered like one before it
            // (protocol §2): a fatal `bad_message`, then the close.
            Inbound::Framing(e) => {
                refuse(e, None);
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
            Inbound::Broken(e) => {
                tracing::debug!(session = session_id, %transport, error = %e, "control connection ended");
                break;
            }
        }
    }
    session.do_send(Disconnected);
    link.stop(&ctx, session_id);
    link.close("bye");
    writer.abort();
    if let Some(t) = transport_task {
        t.abort();
    }
    tracing::info!(session = session_id, %transport, "IM device disconnected");
}
