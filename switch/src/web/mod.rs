//! Browsers: the web client (`/`, plain HTML, CSS and JavaScript compiled into the binary,
//! no build step) and the IM protocol over WebSocket (`/ws`), on a listener of its own
//! (`[web]`), so that the admin API and `/metrics` never face browsers.
//!
//! The WebSocket is a second transport of the same protocol (`docs/protocol.md` §8): one
//! JSON message per text message, at most [`control::MAX_FRAME`] bytes, and everything
//! after the upgrade — login first, throttling, limits, errors, fatal closes — is the
//! QUIC path's own code ([`crate::im::device::run_device`]). What is WebSocket's own:
//! the `Origin` check (a page of another site must not talk to the node through a
//! user's browser), pings every third of the idle timeout with the connection dropped
//! when the browser stays silent past it, and TLS (HTTPS/WSS) on any address but
//! loopback.
//!
//! axum's WebSocket support (tokio-tungstenite underneath) rather than a hand-written
//! upgrade: the node's HTTP API is axum already.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parley_codecs::control::{self, ServerMsg};
use tokio::sync::Mutex;

use crate::im::device::{
    FrameRx, FrameTx, ImContext, Inbound, Link, Pending, frame_of, run_device,
};
use crate::metrics as m;

/// What the web listener needs.
pub struct WebState {
    /// The IM endpoint's state, shared with QUIC (users, login guard, session ids).
    pub im: Arc<ImContext>,
    /// The actix arbiter sessions run on (the WebSocket is accepted on a plain tokio
    /// task; the device driver starts actors).
    pub arbiter: actix_rt::ArbiterHandle,
    /// `[web] allowed_origins`.
    pub allowed_origins: Vec<String>,
    /// A browser silent this long is gone (`[quic] idle_timeout_secs`, as for devices).
    pub idle: Duration,
    /// The listener speaks TLS (the page's own origin is `https://…`).
    pub tls: bool,
    /// Browser media (`None`: sessions get `bad_offer`, and calls cannot connect).
    pub webrtc: Option<Arc<crate::webrtc::WebRtc>>,
}

/// The web listener's routes.
pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
        .route("/ws", get(upgrade))
        .with_state(state)
}

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");

/// A page or asset with headers that keep it to itself: no framing by other sites, no
/// script but its own, no sniffing.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

/// Whether a page of `origin` may open the WebSocket: the node's own page (same scheme,
/// host and port as the request's `Host`), or an origin the configuration allows.
/// Requests without `Origin` are not from a page (browsers always send it on a
/// WebSocket handshake) and need the login like any device.
fn origin_allowed(headers: &HeaderMap, allowed: &[String], tls: bool) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|host| format!("{}://{host}", if tls { "https" } else { "http" }));
    own.is_some_and(|own| own.eq_ignore_ascii_case(origin))
}

async fn upgrade(
    State(state): State<Arc<WebState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&headers, &state.allowed_origins, state.tls) {
        metrics::counter!(m::WEB_SESSIONS_REFUSED_TOTAL, "reason" => "origin").increment(1);
        tracing::info!(%remote, origin = ?headers.get(header::ORIGIN), "WebSocket refused: origin not allowed");
        return (
            StatusCode::FORBIDDEN,
            "this origin may not open the Parley WebSocket (see [web] allowed_origins)\n",
        )
            .into_response();
    }
    // The same cap on connections not logged in yet as for QUIC, before any work.
    if let Err(r) = state.im.guard().handle_connect(remote.ip()) {
        metrics::counter!(m::WEB_SESSIONS_REFUSED_TOTAL, "reason" => r.as_str()).increment(1);
        tracing::debug!(%remote, reason = r.as_str(), "WebSocket refused");
        let mut resp = (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections not logged in yet; retry later\n",
        )
            .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return resp;
    }
    let pending = Pending::new(state.im.clone(), remote.ip());
    ws.max_message_size(control::MAX_FRAME)
        .max_frame_size(control::MAX_FRAME)
        .on_upgrade(move |socket| async move {
            metrics::counter!(m::WEB_SESSIONS_TOTAL).increment(1);
            let (sink, stream) = socket.split();
            let shared = Arc::new(Shared {
                sink: Arc::new(Mutex::new(sink)),
                session: std::sync::OnceLock::new(),
                webrtc: state.webrtc.clone(),
                relay: state.im.relay.clone(),
            });
            let link = WsLink {
                shared: shared.clone(),
                idle: state.idle,
            };
            let rx = WsRx {
                stream,
                idle: state.idle,
                shared: shared.clone(),
            };
            let im = state.im.clone();
            state.arbiter.spawn_fn(move || {
                actix_rt::spawn(async move {
                    let _live = LiveSession::new();
                    run_device(im, remote, (rx, WsTx(shared), link), pending).await;
                });
            });
        })
}

/// Counts a live WebSocket session in the gauge while it exists.
struct LiveSession;

impl LiveSession {
    fn new() -> Self {
        metrics::gauge!(m::WEB_SESSIONS).increment(1.0);
        Self
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        metrics::gauge!(m::WEB_SESSIONS).decrement(1.0);
    }
}

type Sink = Arc<Mutex<SplitSink<WebSocket, Message>>>;

/// What the three halves of one WebSocket session share.
struct Shared {
    sink: Sink,
    /// The session id, once logged in.
    session: std::sync::OnceLock<u64>,
    webrtc: Option<Arc<crate::webrtc::WebRtc>>,
    relay: Arc<crate::relay::Relay>,
}

impl Shared {
    async fn send_text(&self, msg: &ServerMsg) -> Result<(), ()> {
        let Some(frame) = frame_of(msg) else {
            return Ok(());
        };
        // The body after the length prefix is serde_json output: UTF-8.
        let text = String::from_utf8(frame[4..].to_vec()).map_err(|_| ())?;
        self.sink
            .lock()
            .await
            .send(Message::Text(text.into()))
            .await
            .map_err(|_| ())
    }

    /// Answers a logged-in session's `webrtc_offer`; from then on the relay reaches the
    /// session's flows through its peer connection.
    async fn offer(&self, session: u64, sdp: String, id: Option<u64>) {
        let answer = match &self.webrtc {
            None => Err("browser media is not enabled on this node".to_owned()),
            Some(w) => w.offer(session, sdp).await.inspect(|_| {
                self.relay.register_session(
                    session,
                    crate::relay::DeviceConn::Sink(Arc::new(w.sink(session))),
                );
            }),
        };
        let msg = match answer {
            Ok(sdp) => ServerMsg::WebrtcAnswer { id, sdp },
            Err(e) => {
                tracing::info!(session, error = %e, "browser WebRTC offer refused");
                ServerMsg::Error {
                    code: "bad_offer".into(),
                    message: format!("webrtc_offer: {e}"),
                    fatal: false,
                    id,
                }
            }
        };
        let _ = self.send_text(&msg).await;
    }
}

/// The browser's messages.
struct WsRx {
    stream: SplitStream<WebSocket>,
    idle: Duration,
    shared: Arc<Shared>,
}

impl WsRx {
    /// A logged-in session's `webrtc_offer`, answered here (the transport's business, not
    /// the session actor's); `None` for every other message.
    async fn transport_request(&self, text: &str) -> Option<()> {
        let session = *self.shared.session.get()?;
        if !text.contains("webrtc_offer") {
            return None;
        }
        match control::decode_request(text.as_bytes()) {
            (Ok(control::ClientMsg::WebrtcOffer { sdp }), id) => {
                self.shared.offer(session, sdp, id).await;
                Some(())
            }
            _ => None,
        }
    }
}

impl FrameRx for WsRx {
    async fn next(&mut self) -> Inbound {
        loop {
            let next = match tokio::time::timeout(self.idle, self.stream.next()).await {
                Ok(n) => n,
                Err(_) => return Inbound::Broken("silent past the idle timeout".into()),
            };
            return match next {
                None | Some(Ok(Message::Close(_))) => Inbound::End,
                Some(Ok(Message::Text(t))) => {
                    if self.transport_request(&t).await.is_some() {
                        continue;
                    }
                    Inbound::Frame(t.as_bytes().to_vec())
                }
                Some(Ok(Message::Binary(_))) => Inbound::Framing(
                    "binary WebSocket messages are not part of the protocol: send each message as text".into(),
                ),
                // Answered by tungstenite; they only show the browser is there.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Err(e)) => {
                    let e = e.to_string();
                    if e.contains("Space limit exceeded") {
                        Inbound::Framing(format!(
                            "message over the protocol limit of {} bytes",
                            control::MAX_FRAME
                        ))
                    } else {
                        Inbound::Broken(e)
                    }
                }
            };
        }
    }
}

/// Writes to the browser; a connected call's flow goes to the peer connection first.
struct WsTx(Arc<Shared>);

impl FrameTx for WsTx {
    async fn send(&mut self, msg: &ServerMsg) -> Result<(), ()> {
        if let (Some(w), Some(&session)) = (&self.0.webrtc, self.0.session.get()) {
            match msg {
                ServerMsg::CallConnected {
                    call_id,
                    flow_id,
                    payload_type,
                    telephone_event,
                    video_flow_id,
                    video_formats,
                } => w.connect_flow(
                    session,
                    call_id.clone(),
                    *flow_id,
                    crate::webrtc::CallFormat {
                        pt: *payload_type,
                        telephone_event: *telephone_event,
                        video: video_flow_id.map(|v| (v, video_formats.clone())),
                    },
                ),
                ServerMsg::CallEnded { call_id, .. } => w.end_flow(session, call_id.clone()),
                _ => {}
            }
        }
        self.0.send_text(msg).await
    }

    async fn finish(&mut self) {
        let _ = self.0.sink.lock().await.flush().await;
    }
}

/// The WebSocket connection.
struct WsLink {
    shared: Arc<Shared>,
    idle: Duration,
}

impl Link for WsLink {
    fn close(&self, code: &str) {
        let sink = self.shared.sink.clone();
        // 1000: normal closure; 1008: policy violation (every fatal error).
        let (n, reason) = match code {
            "bye" | "closed" => (1000, "bye".to_owned()),
            c => (1008, c.to_owned()),
        };
        tokio::spawn(async move {
            let mut s = sink.lock().await;
            let _ = s
                .send(Message::Close(Some(CloseFrame {
                    code: n,
                    reason: reason.into(),
                })))
                .await;
            let _ = s.close().await;
        });
    }

    /// Keep-alive: a ping every third of the idle timeout, which browsers answer. Media
    /// waits for the session's `webrtc_offer`.
    fn start(&self, _: &ImContext, session: u64) -> Option<tokio::task::JoinHandle<()>> {
        let _ = self.shared.session.set(session);
        let sink = self.shared.sink.clone();
        let every = self.idle / 3;
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                if sink
                    .lock()
                    .await
                    .send(Message::Ping(Vec::new().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }))
    }

    fn stop(&self, ctx: &ImContext, session: u64) {
        if let Some(w) = &self.shared.webrtc {
            ctx.relay.unregister_session(session);
            w.close(session);
        }
    }

    fn transport(&self) -> &'static str {
        "websocket"
    }
}

/// Serves the web listener until the process ends: one task per connection, HTTP/1.1
/// with upgrades (the WebSocket), hyper's header read timeout on its tokio timer, TLS
/// handshakes inside the connection's task, and a cap on open connections taken at TCP
/// accept (before any handshake), which the connection keeps past an upgrade. The same
/// hyper that `axum::serve` drives, which sets no timer (so its header timeout would not
/// apply) and no cap.
pub async fn serve(listener: WebListener, app: Router, limits: WebLimits) {
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut refused_logged = false;
    loop {
        let (stream, remote) = match listener.tcp.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors and the like: wait instead of spinning.
            Err(e) => {
                tracing::warn!(error = %e, "web listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            // Full: closed at once (dropping it), so one client cannot hold the
            // listener's every slot and nobody waits for a slot that may never free.
            metrics::counter!(m::WEB_SESSIONS_REFUSED_TOTAL, "reason" => "connections")
                .increment(1);
            if !refused_logged {
                tracing::warn!(%remote, max = limits.max_connections, "web listener full: connections are closed at once (web.max_connections)");
                refused_logged = true;
            }
            drop(stream);
            continue;
        };
        refused_logged = false;
        let app = app.clone();
        let tls = listener.tls.clone();
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                return serve_connection(
                    Counted {
                        io: stream,
                        _slot: slot,
                    },
                    remote,
                    app,
                    limits,
                )
                .await;
            };
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(io)) => {
                    serve_connection(Counted { io, _slot: slot }, remote, app, limits).await;
                }
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "web TLS handshake failed"),
                Err(_) => tracing::debug!(%remote, "web TLS handshake timed out"),
            }
        });
    }
}

/// Limits of the web listener (`[web] max_connections`, `header_timeout_secs`).
#[derive(Debug, Clone, Copy)]
pub struct WebLimits {
    /// Open connections at most (TLS handshakes in progress included).
    pub max_connections: usize,
    /// Time allowed for a request's headers (and a TLS handshake).
    pub header_timeout: Duration,
}

/// One connection, HTTP/1.1 with upgrades, until it ends.
async fn serve_connection<T>(io: Counted<T>, remote: SocketAddr, app: Router, limits: WebLimits)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            let mut app = app.clone();
            async move {
                use tower_service::Service;
                app.call(req.map(axum::body::Body::new)).await
            }
        });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = http
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%remote, error = %e, "web connection ended");
    }
}

/// A connection holding one of the listener's slots until it is dropped.
struct Counted<T> {
    io: T,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The web listener: TCP, with TLS (HTTPS and WSS) when configured.
pub struct WebListener {
    tcp: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl WebListener {
    /// Binds `listen`, with TLS from `tls` (certificate chain and key, PEM) when given.
    pub async fn bind(
        listen: SocketAddr,
        tls: Option<(&std::path::Path, &std::path::Path)>,
    ) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("web.listen {listen}: {e}"))?;
        let tls = match tls {
            None => None,
            Some((cert, key)) => {
                let mut config = (*crate::sip::tls::server_config(cert, key)
                    .map_err(|e| anyhow::anyhow!("web.tls_cert: {e:#}"))?)
                .clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
        };
        Ok(Self { tcp, tls })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn only_the_nodes_own_page_and_allowed_origins_open_the_socket() {
        let allowed = vec!["https://im.example.com".to_owned()];
        let host = "127.0.0.1:8088";
        assert!(origin_allowed(
            &headers(Some("http://127.0.0.1:8088"), host),
            &[],
            false
        ));
        assert!(!origin_allowed(
            &headers(Some("https://127.0.0.1:8088"), host),
            &[],
            false
        ));
        assert!(origin_allowed(
            &headers(Some("https://127.0.0.1:8088"), host),
            &[],
            true
        ));
        assert!(!origin_allowed(
            &headers(Some("http://evil.example"), host),
            &[],
            false
        ));
        assert!(!origin_allowed(
            &headers(Some("http://127.0.0.1:9999"), host),
            &[],
            false
        ));
        assert!(origin_allowed(
            &headers(Some("https://im.example.com"), host),
            &allowed,
            true
        ));
        assert!(!origin_allowed(
            &headers(Some("null"), host),
            &allowed,
            false
        ));
        // Not a page: the login decides.
        assert!(origin_allowed(&headers(None, host), &[], false));
    }
}
