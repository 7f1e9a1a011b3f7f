//! The QUIC endpoint for IM devices.
//!
//! Per connection: accept the control stream, require `login` within the login timeout,
//! verify the password, then start a `PresenceSession` actor and run three loops — control
//! frames in, control frames out (from the session's bounded queue), RoQ datagrams in
//! (straight to the relay, never through an actor).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::Actor;
use bytes::BytesMut;
use parley_actors::registry::Registry;
use parley_actors::session::{Disconnected, FromClient, PresenceSession, SessionOwner};
use parley_codecs::control::{self, ClientMsg, ServerMsg};
use parley_codecs::roq;
use parley_core::admission::{LoginGuard, Refusal};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::federation::{Federation, LoginFailure};
use crate::metrics as m;
use crate::relay::Relay;
use crate::store::Store;

/// ALPN of the Parley IM protocol.
pub const ALPN: &[u8] = b"parley/1";

/// Shared state of the endpoint.
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
    /// The runtime QUIC runs on (see [`QuicRuntime`]); device datagram readers run there.
    pub quic: tokio::runtime::Handle,
    /// Login throttling and the cap on connections not logged in yet.
    pub guard: std::sync::Mutex<LoginGuard>,
    /// Tenants with directories, their agents, session tokens.
    pub federation: Arc<Federation>,
    /// Where devices' address book requests go.
    pub books: parley_actors::book::BookService,
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
    fn guard(&self) -> std::sync::MutexGuard<'_, LoginGuard> {
        // The guard's state stays consistent whatever panicked while holding it.
        self.guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection counted as not logged in yet; settled once, when it logs in or goes.
struct Pending {
    ctx: Arc<ImContext>,
    ip: std::net::IpAddr,
    settled: bool,
}

impl Pending {
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

/// Runs quinn's drivers — the endpoint's socket I/O and every connection's packet
/// encryption, decryption and timers — on a dedicated tokio runtime (`parley-quic`
/// threads) instead of the actix thread that runs the actors. Device media then never
/// touches the control thread: datagrams are decrypted and handed to the relay there.
#[derive(Debug)]
pub struct QuicRuntime(pub tokio::runtime::Handle);

impl quinn::Runtime for QuicRuntime {
    fn new_timer(&self, i: std::time::Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        let _ctx = self.0.enter();
        quinn::TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        t: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        // The socket registers with the reactor of the runtime it is created in.
        let _ctx = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(t)
    }
}

/// Builds the server config. `idle` is the QUIC idle timeout: a device silent that long
/// is gone. The node PINGs every third of it, so a live but quiet device never reaches it.
pub fn server_config(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    idle: Duration,
) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle.try_into()?));
    transport.keep_alive_interval(Some(idle / 3));
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_concurrent_bidi_streams(1u32.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Binds the QUIC endpoint on `listen` with `buffer` bytes of socket buffer (0: the
/// kernel's default). Every device's media arrives on this one socket, so its receive
/// buffer is what absorbs bursts while the control thread is busy.
pub fn bind_endpoint(
    server: quinn::ServerConfig,
    listen: std::net::SocketAddr,
    buffer: usize,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(listen)?;
    if buffer > 0 {
        let s = socket2::SockRef::from(&socket);
        s.set_recv_buffer_size(buffer)?;
        s.set_send_buffer_size(buffer)?;
        // Linux reports twice what it grants (bookkeeping overhead included).
        let granted = s.recv_buffer_size()? / 2;
        if granted < buffer {
            tracing::warn!(
                asked = buffer,
                granted,
                "QUIC socket receive buffer capped by net.core.rmem_max; raise it (sysctl) for many devices"
            );
        }
    }
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(QuicRuntime(runtime)),
    )
}

/// Accepts connections until the endpoint closes. Must run on the actix arbiter
/// (`actix_rt::spawn`): sessions are actors.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<ImContext>) {
    while let Some(incoming) = endpoint.accept().await {
        let ip = incoming.remote_address().ip();
        // Refused before the handshake costs any crypto.
        if let Err(r) = ctx.guard().handle_connect(ip) {
            metrics::counter!(m::IM_CONNECTIONS_REFUSED_TOTAL, "reason" => r.as_str()).increment(1);
            tracing::debug!(%ip, reason = r.as_str(), "QUIC connection refused");
            incoming.refuse();
            continue;
        }
        let pending = Pending {
            ctx: ctx.clone(),
            ip,
            settled: false,
        };
        let ctx = ctx.clone();
        actix_rt::spawn(async move {
            match incoming.await {
                Ok(conn) => handle_connection(conn, ctx, pending).await,
                Err(e) => tracing::debug!(error = %e, "QUIC handshake failed"),
            }
        });
    }
}

/// Why a control frame could not be read.
#[derive(Debug)]
enum FrameError {
    /// The length prefix is over the protocol limit: the client's fault, answered with a
    /// fatal `bad_message` (protocol §2).
    Framing(String),
    /// The stream broke (reset, connection lost): nothing to answer.
    Stream(String),
}

async fn read_frame(recv: &mut RecvStream) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameError::Stream(e.to_string())),
    }
    let len = control::frame_len(header).map_err(|e| FrameError::Framing(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| FrameError::Stream(e.to_string()))?;
    Ok(Some(body))
}

async fn write_msg(send: &mut SendStream, msg: &ServerMsg) -> Result<(), quinn::WriteError> {
    let mut buf = BytesMut::new();
    if let Err(e) = control::encode(msg, &mut buf) {
        // The device would take an over-long frame for a protocol violation: it is not
        // sent. Pages and length limits keep every message the node builds within it.
        metrics::counter!(m::IM_FRAMES_REFUSED_TOTAL).increment(1);
        tracing::error!(error = %e, kind = msg_kind(msg), "message to device not sent");
        return Ok(());
    }
    send.write_all(&buf).await
}

/// The `type` of a server message, for logs.
fn msg_kind(msg: &ServerMsg) -> &'static str {
    match msg {
        ServerMsg::AddressBook { .. } => "address_book",
        ServerMsg::AddressBookUpdate { .. } => "address_book_update",
        ServerMsg::Chat { .. } => "chat",
        ServerMsg::Preferences { .. } => "preferences",
        ServerMsg::Error { .. } => "error",
        _ => "other",
    }
}

async fn fatal(conn: &quinn::Connection, send: &mut SendStream, code: &str, message: String) {
    metrics::counter!(m::IM_PROTOCOL_ERRORS_TOTAL, "kind" => "fatal").increment(1);
    let _ = write_msg(
        send,
        &ServerMsg::Error {
            code: code.into(),
            message,
            fatal: true,
            id: None,
        },
    )
    .await;
    let _ = send.finish();
    // Give the peer a moment to read the error before the close frame overtakes it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.close(1u32.into(), code.as_bytes());
}

async fn handle_connection(conn: quinn::Connection, ctx: Arc<ImContext>, mut pending: Pending) {
    let remote = conn.remote_address();
    let accepted = tokio::time::timeout(ctx.login_timeout, conn.accept_bi()).await;
    let Ok(Ok((mut send, mut recv))) = accepted else {
        conn.close(2u32.into(), b"no control stream");
        return;
    };
    let login = tokio::time::timeout(ctx.login_timeout, read_frame(&mut recv)).await;
    let body = match login {
        Ok(Ok(Some(b))) => b,
        Ok(Err(FrameError::Framing(e))) => return fatal(&conn, &mut send, "bad_message", e).await,
        Ok(Err(FrameError::Stream(e))) => {
            tracing::debug!(%remote, error = %e, "control stream broke before login");
            conn.close(2u32.into(), b"control stream closed");
            return;
        }
        Ok(Ok(None)) | Err(_) => {
            return fatal(
                &conn,
                &mut send,
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
                &conn,
                &mut send,
                "not_logged_in",
                "the first message must be login".into(),
            )
            .await;
        }
        Err(e) => return fatal(&conn, &mut send, "bad_message", e.to_string()).await,
    };
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
        tracing::info!(%remote, %tenant, %user, reason = refusal.as_str(), "IM login throttled");
        return fatal(
            &conn,
            &mut send,
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
            tracing::info!(%remote, %tenant, %user, result = f.result(), "IM login refused");
            return fatal(&conn, &mut send, f.code(), f.message()).await;
        }
    };
    let Some(user_ref) = ctx.registry.user_by_name(&who.tenant, &who.user) else {
        return fatal(
            &conn,
            &mut send,
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
    tracing::info!(%remote, tenant = %row.tenant, user = %row.user, %device, session = session_id, "IM device logged in");

    let (tx, mut rx) = mpsc::channel::<ServerMsg>(256);
    let session_token = ctx
        .federation
        .issue_token(&row.tenant, &row.user, row.stamp.clone());
    let _ = tx.try_send(ServerMsg::LoginOk {
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
        let _ = tx.try_send(page);
    }
    ctx.relay.register_session(session_id, conn.clone());
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
    let session = PresenceSession::new(session_id, device, owner, tx.clone())
        .with_book(book_users)
        .start();
    // A directory that locks, disables or removes the account closes this session.
    let _tracked = row.directory.then(|| {
        ctx.federation
            .track_session(&row.tenant, &row.user, session_id, close.clone())
    });

    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_msg(&mut send, &msg).await.is_err() {
                break;
            }
        }
    });
    let dconn = conn.clone();
    let relay = ctx.relay.clone();
    // On the QUIC runtime, next to the connection's driver: media stays off this thread.
    let datagrams = ctx.quic.spawn(async move {
        while let Ok(d) = dconn.read_datagram().await {
            match roq::decode(&d) {
                Ok((flow, pkt)) => {
                    let offset = d.len() - pkt.len();
                    relay.roq_in(session_id, flow, d.slice(offset..));
                }
                Err(_) => metrics::counter!(m::IM_PROTOCOL_ERRORS_TOTAL, "kind" => "datagram")
                    .increment(1),
            }
        }
    });

    loop {
        let frame = tokio::select! {
            f = read_frame(&mut recv) => f,
            // The session gave the device up (it left a call offer unacknowledged).
            () = close.notified() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
        };
        match frame {
            Ok(Some(body)) => match control::decode_request(&body) {
                (Ok(msg), id) => session.do_send(FromClient { msg, id }),
                (Err(e), id) => {
                    metrics::counter!(m::IM_PROTOCOL_ERRORS_TOTAL, "kind" => "control")
                        .increment(1);
                    let _ = tx.try_send(ServerMsg::Error {
                        code: "bad_message".into(),
                        message: e.to_string(),
                        fatal: true,
                        id,
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            },
            Ok(None) => break,
            // An over-long length prefix after login is answered like one before it
            // (protocol §2): a fatal `bad_message`, then the close.
            Err(FrameError::Framing(e)) => {
                metrics::counter!(m::IM_PROTOCOL_ERRORS_TOTAL, "kind" => "control").increment(1);
                let _ = tx.try_send(ServerMsg::Error {
                    code: "bad_message".into(),
                    message: e,
                    fatal: true,
                    id: None,
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
            Err(FrameError::Stream(e)) => {
                tracing::debug!(session = session_id, error = %e, "control stream ended");
                break;
            }
        }
    }
    session.do_send(Disconnected);
    ctx.relay.unregister_session(session_id);
    conn.close(0u32.into(), b"bye");
    writer.abort();
    datagrams.abort();
    tracing::info!(session = session_id, "IM device disconnected");
}
