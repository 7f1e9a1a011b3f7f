//! The QUIC endpoint for IM devices.
//!
//! Per connection: accept the control stream (length-prefixed JSON frames, protocol §2),
//! then [`super::device::run_device`] does the rest — login, the `PresenceSession` actor,
//! control frames both ways — while RoQ datagrams go straight to the relay on the QUIC
//! runtime, never through an actor.

use std::sync::Arc;
use std::time::Duration;

use parley_codecs::control::{self, ServerMsg};
use parley_codecs::roq;
use quinn::{RecvStream, SendStream};

use super::device::{FrameRx, FrameTx, Inbound, Link, Pending, run_device};
use crate::metrics as m;

pub use super::device::ImContext;

/// ALPN of the Parley IM protocol.
pub const ALPN: &[u8] = b"parley/1";

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
    crate::sockets::size_buffers(socket2::SockRef::from(&socket), buffer, "quic")?;
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
        let pending = Pending::new(ctx.clone(), ip);
        let ctx = ctx.clone();
        actix_rt::spawn(async move {
            match incoming.await {
                Ok(conn) => handle_connection(conn, ctx, pending).await,
                Err(e) => tracing::debug!(error = %e, "QUIC handshake failed"),
            }
        });
    }
}

/// The control stream's receiving half.
struct QuicRx(RecvStream);

impl FrameRx for QuicRx {
    async fn next(&mut self) -> Inbound {
        let mut header = [0u8; 4];
        match self.0.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Inbound::End,
            Err(e) => return Inbound::Broken(e.to_string()),
        }
        let len = match control::frame_len(header) {
            Ok(len) => len,
            Err(e) => return Inbound::Framing(e.to_string()),
        };
        let mut body = vec![0u8; len];
        match self.0.read_exact(&mut body).await {
            Ok(()) => Inbound::Frame(body),
            Err(e) => Inbound::Broken(e.to_string()),
        }
    }
}

/// The control stream's sending half.
struct QuicTx(SendStream);

impl FrameTx for QuicTx {
    async fn send(&mut self, msg: &ServerMsg) -> Result<(), ()> {
        let Some(frame) = super::device::frame_of(msg) else {
            return Ok(());
        };
        self.0.write_all(&frame).await.map_err(|_| ())
    }

    async fn finish(&mut self) {
        let _ = self.0.finish();
    }
}

/// The connection: closes it, carries RoQ.
struct QuicLink(quinn::Connection);

impl Link for QuicLink {
    fn close(&self, code: &str) {
        let (n, reason): (u32, &[u8]) = match code {
            "bye" => (0, b"bye"),
            "closed" => (2, b"control stream closed"),
            c => (1, c.as_bytes()),
        };
        self.0.close(n.into(), reason);
    }

    fn start(&self, ctx: &ImContext, session: u64) -> Option<tokio::task::JoinHandle<()>> {
        ctx.relay
            .register_session(session, crate::relay::DeviceConn::Quic(self.0.clone()));
        let conn = self.0.clone();
        let relay = ctx.relay.clone();
        // On the QUIC runtime, next to the connection's driver: media stays off the
        // control thread.
        Some(ctx.quic.spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                match roq::decode(&d) {
                    Ok((flow, pkt)) => {
                        let offset = d.len() - pkt.len();
                        relay.roq_in(session, flow, d.slice(offset..));
                    }
                    Err(_) => metrics::counter!(m::IM_PROTOCOL_ERRORS_TOTAL, "kind" => "datagram")
                        .increment(1),
                }
            }
        }))
    }

    fn stop(&self, ctx: &ImContext, session: u64) {
        ctx.relay.unregister_session(session);
    }

    fn transport(&self) -> &'static str {
        "quic"
    }
}

async fn handle_connection(conn: quinn::Connection, ctx: Arc<ImContext>, pending: Pending) {
    let remote = conn.remote_address();
    let accepted = tokio::time::timeout(ctx.login_timeout, conn.accept_bi()).await;
    let Ok(Ok((send, recv))) = accepted else {
        conn.close(2u32.into(), b"no control stream");
        return;
    };
    run_device(
        ctx,
        remote,
        (QuicRx(recv), QuicTx(send), QuicLink(conn)),
        pending,
    )
    .await;
}
