//! A simulated Parley IM device: one QUIC connection, one control stream, RTP over QUIC
//! datagrams.
//!
//! [`Device::connect`] logs in and then runs three background tasks on the current tokio
//! runtime:
//!
//! - the *control reader* decodes [`ServerMsg`] frames, keeps the latest address book,
//!   copies every message to the event queue read by [`Device::next_event`] and hands it to
//!   the behaviour task;
//! - the *behaviour* task keeps the per-call state (call id → flow id), answers or rejects
//!   offered calls, hangs up connected calls after [`DeviceConfig::hangup_after`] and starts
//!   a tone generator per call in [`MediaMode::Tone`];
//! - the *datagram reader* validates every RoQ datagram, counts RTP packets and, in
//!   [`MediaMode::Echo`], sends each RTP datagram straight back (no copy: the received
//!   `Bytes` is re-sent as is).
//!
//! Writes to the control stream are serialised by a mutex around the send stream, so the
//! behaviour task and callers of [`Device::send`] can both write.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parley_codecs::control::{self, AddressBookEntry, AddressBookMirror, ClientMsg, ServerMsg};
use parley_codecs::g711;
use parley_codecs::roq;
use parley_codecs::rtp::{self, Kind, RTP_HEADER_LEN, RtpView};
use serde::Serialize;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

/// ALPN protocol id of the Parley IM protocol.
pub const ALPN: &[u8] = b"parley/1";
/// TLS server name the client expects in the node's certificate.
pub const SERVER_NAME: &str = "localhost";
/// How long [`Device::connect`] waits for the handshake and `login_ok`.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC keep-alive interval of device connections.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Frequency of the tone sent in [`MediaMode::Tone`].
const TONE_HZ: f64 = 440.0;
/// 20 ms packetisation.
const PTIME: Duration = Duration::from_millis(20);

/// What the device does with media on a connected call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MediaMode {
    /// Send nothing; received datagrams are only counted.
    #[default]
    None,
    /// Send every received RTP datagram back on the same flow id.
    Echo,
    /// Send a 440 Hz tone, 20 ms G.711 packets (PCMU or PCMA per the call's payload type)
    /// at 50 packets per second; received packets are counted.
    Tone,
}

impl std::str::FromStr for MediaMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "echo" => Ok(Self::Echo),
            "tone" => Ok(Self::Tone),
            other => Err(format!(
                "unknown media mode `{other}` (expected none, echo or tone)"
            )),
        }
    }
}

/// How to connect a device and how it behaves.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The node's QUIC address.
    pub target: SocketAddr,
    /// The node's self-signed certificate (DER); the only certificate the client trusts.
    pub cert_der: Vec<u8>,
    /// Tenant name.
    pub tenant: String,
    /// User name within the tenant.
    pub user: String,
    /// The user's password.
    pub password: String,
    /// Device name, unique per user.
    pub device: String,
    /// Answer each offered call after this delay; `None` never answers automatically.
    pub answer_after: Option<Duration>,
    /// Reject every offered call at once (takes precedence over `answer_after`).
    pub reject: bool,
    /// Hang up each connected call this long after `call_connected`; `None` never does.
    pub hangup_after: Option<Duration>,
    /// What to do with media on connected calls.
    pub media: MediaMode,
}

/// Counters of one device (or, shared, of many).
///
/// A call counts in `calls_ended` once, whether the node ended it (`call_ended`) or the
/// device did (`hangup` / `reject`, which the node does not confirm).
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// `incoming_call` messages received.
    pub calls_offered: AtomicU64,
    /// `answer` messages sent (automatic or through [`Device::send`]).
    pub calls_answered: AtomicU64,
    /// `call_connected` messages received.
    pub calls_connected: AtomicU64,
    /// Calls that ended (see the type's documentation).
    pub calls_ended: AtomicU64,
    /// RTP packets received in datagrams (RTCP is not counted).
    pub rtp_received: AtomicU64,
    /// RTP datagrams sent (echoed or generated).
    pub rtp_sent: AtomicU64,
    /// Datagrams that were not a RoQ flow id followed by a valid RTP/RTCP packet.
    pub bad_datagrams: AtomicU64,
    /// RTP packets whose SSRC differed from the previous packet's on the same flow: the
    /// stream restarted under the receiver (what a relay must hide when a source changes).
    pub rtp_ssrc_changes: AtomicU64,
    /// RTP packets, same SSRC, whose sequence number was not the previous one + 1 or whose
    /// timestamp went backwards (loss, reordering, or a stream spliced without rewriting).
    pub rtp_discontinuities: AtomicU64,
    /// RTP packets with the call's telephone-event payload type (DTMF, RFC 4733, as
    /// `call_connected` named it); also counted in `rtp_received`.
    pub dtmf_received: AtomicU64,
    /// The DTMF events received, one per event (a new RTP timestamp starts one), in
    /// order: event codes 0–9 are digits, 10 `*`, 11 `#`. The first 64 are kept.
    pub dtmf_events: StdMutex<Vec<u8>>,
}

/// A plain copy of [`DeviceStats`], for printing and arithmetic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// See [`DeviceStats::calls_offered`].
    pub calls_offered: u64,
    /// See [`DeviceStats::calls_answered`].
    pub calls_answered: u64,
    /// See [`DeviceStats::calls_connected`].
    pub calls_connected: u64,
    /// See [`DeviceStats::calls_ended`].
    pub calls_ended: u64,
    /// See [`DeviceStats::rtp_received`].
    pub rtp_received: u64,
    /// See [`DeviceStats::rtp_sent`].
    pub rtp_sent: u64,
    /// See [`DeviceStats::bad_datagrams`].
    pub bad_datagrams: u64,
    /// See [`DeviceStats::rtp_ssrc_changes`].
    pub rtp_ssrc_changes: u64,
    /// See [`DeviceStats::rtp_discontinuities`].
    pub rtp_discontinuities: u64,
    /// See [`DeviceStats::dtmf_received`].
    pub dtmf_received: u64,
}

impl DeviceStats {
    /// Reads all counters (each atomically; the set is not one atomic snapshot).
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            calls_offered: r(&self.calls_offered),
            calls_answered: r(&self.calls_answered),
            calls_connected: r(&self.calls_connected),
            calls_ended: r(&self.calls_ended),
            rtp_received: r(&self.rtp_received),
            rtp_sent: r(&self.rtp_sent),
            bad_datagrams: r(&self.bad_datagrams),
            rtp_ssrc_changes: r(&self.rtp_ssrc_changes),
            rtp_discontinuities: r(&self.rtp_discontinuities),
            dtmf_received: r(&self.dtmf_received),
        }
    }

    /// The DTMF events received so far, as keypad characters.
    pub fn dtmf_digits(&self) -> String {
        let events = self.dtmf_events.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .map(|e| match e {
                0..=9 => char::from(b'0' + e),
                10 => '*',
                11 => '#',
                _ => '?',
            })
            .collect()
    }
}

impl std::fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "offered={} answered={} connected={} ended={} rtp_rx={} rtp_tx={} bad={} ssrc_changes={} discontinuities={} dtmf_rx={}",
            self.calls_offered,
            self.calls_answered,
            self.calls_connected,
            self.calls_ended,
            self.rtp_received,
            self.rtp_sent,
            self.bad_datagrams,
            self.rtp_ssrc_changes,
            self.rtp_discontinuities,
            self.dtmf_received
        )
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why a device could not connect or talk to the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// QUIC/TLS setup or handshake failed.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The node refused the login.
    #[error("login refused: {0}")]
    Auth(String),
    /// The node sent something the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The handshake or login took longer than [`LOGIN_TIMEOUT`].
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The connection or control stream is closed.
    #[error("connection closed")]
    Closed,
}

/// Aborts the task when dropped, so per-call tasks die with their call state.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The write half of the control stream.
struct Writer {
    send: quinn::SendStream,
    buf: BytesMut,
}

type SharedWriter = Arc<Mutex<Writer>>;

async fn write_msg(writer: &SharedWriter, msg: &ClientMsg) -> Result<(), DeviceError> {
    let mut w = writer.lock().await;
    let Writer { send, buf } = &mut *w;
    buf.clear();
    control::encode(msg, buf).map_err(|e| DeviceError::Protocol(e.to_string()))?;
    send.write_all(buf).await.map_err(|_| DeviceError::Closed)
}

/// Input of the behaviour task.
enum Cmd {
    /// A message from the node.
    Server(ServerMsg),
    /// The application sent this message through [`Device::send`].
    Sent(ClientMsg),
    /// The answer delay of a call elapsed.
    AnswerDue(String),
    /// The hang-up delay of a call elapsed.
    HangupDue(String),
}

/// A connected, logged-in device.
///
/// Dropping it closes the connection and stops its tasks.
pub struct Device {
    number: String,
    session: u64,
    stats: Arc<DeviceStats>,
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
    writer: SharedWriter,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<ServerMsg>,
    book: Arc<StdMutex<AddressBookMirror>>,
    tasks: Vec<AbortOnDrop>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("number", &self.number)
            .field("session", &self.session)
            .field("remote", &self.conn.remote_address())
            .finish_non_exhaustive()
    }
}

/// Builds the QUIC client configuration trusting exactly `cert_der`.
pub fn client_config(cert_der: &[u8]) -> Result<quinn::ClientConfig, DeviceError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .map_err(|e| DeviceError::Connect(format!("bad server certificate: {e}")))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| DeviceError::Connect(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| DeviceError::Connect(format!("QUIC TLS setup: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// A client endpoint on an ephemeral port of the unspecified address of `target`'s family.
pub fn client_endpoint(target: SocketAddr) -> Result<quinn::Endpoint, DeviceError> {
    let bind: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let err = |e: std::io::Error| DeviceError::Connect(format!("bind {bind}: {e}"));
    let socket = std::net::UdpSocket::bind(bind).map_err(err)?;
    // A storm's devices share one endpoint: a large receive buffer keeps a busy moment of
    // the generator from dropping their media (best effort, capped by net.core.rmem_max).
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(err)?;
    let _ = state.set_recv_buffer_size((&socket).into(), CLIENT_SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), CLIENT_SOCKET_BUFFER);
    let runtime =
        quinn::default_runtime().ok_or_else(|| DeviceError::Connect("no async runtime".into()))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).map_err(err)
}

/// Socket buffer of a device endpoint, bytes.
const CLIENT_SOCKET_BUFFER: usize = 4 << 20;

async fn read_frame(recv: &mut quinn::RecvStream, body: &mut Vec<u8>) -> Result<(), DeviceError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|_| DeviceError::Closed)?;
    let len = control::frame_len(header).map_err(|e| DeviceError::Protocol(e.to_string()))?;
    body.resize(len, 0);
    recv.read_exact(body).await.map_err(|_| DeviceError::Closed)
}

impl Device {
    /// Connects on a new endpoint of its own, logs in and starts the device's tasks.
    ///
    /// Fails on a handshake error, an `error` reply, a closed connection or when the
    /// handshake and login take longer than [`LOGIN_TIMEOUT`].
    pub async fn connect(cfg: DeviceConfig) -> Result<Device, DeviceError> {
        let endpoint = client_endpoint(cfg.target)?;
        Self::connect_on(&endpoint, cfg).await
    }

    /// Like [`Self::connect`], but on an existing client endpoint (many devices may share
    /// one UDP socket).
    pub async fn connect_on(
        endpoint: &quinn::Endpoint,
        cfg: DeviceConfig,
    ) -> Result<Device, DeviceError> {
        match tokio::time::timeout(LOGIN_TIMEOUT, Self::login(endpoint, &cfg)).await {
            Ok(Ok((conn, writer, recv, number, session))) => Ok(Self::start(
                endpoint.clone(),
                cfg,
                conn,
                writer,
                recv,
                number,
                session,
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DeviceError::Timeout("login_ok")),
        }
    }

    #[allow(clippy::type_complexity)]
    async fn login(
        endpoint: &quinn::Endpoint,
        cfg: &DeviceConfig,
    ) -> Result<
        (
            quinn::Connection,
            SharedWriter,
            quinn::RecvStream,
            String,
            u64,
        ),
        DeviceError,
    > {
        let client = client_config(&cfg.cert_der)?;
        let conn = endpoint
            .connect_with(client, cfg.target, SERVER_NAME)
            .map_err(|e| DeviceError::Connect(e.to_string()))?
            .await
            .map_err(|e| DeviceError::Connect(e.to_string()))?;
        let (send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| DeviceError::Connect(format!("open control stream: {e}")))?;
        let writer = Arc::new(Mutex::new(Writer {
            send,
            buf: BytesMut::with_capacity(512),
        }));
        write_msg(
            &writer,
            &ClientMsg::Login {
                tenant: cfg.tenant.clone(),
                user: cfg.user.clone(),
                password: cfg.password.clone(),
                device: cfg.device.clone(),
                token: None,
            },
        )
        .await?;
        let mut body = Vec::new();
        read_frame(&mut recv, &mut body).await?;
        match control::decode::<ServerMsg>(&body) {
            Ok(ServerMsg::LoginOk {
                number, session, ..
            }) => Ok((conn, writer, recv, number, session)),
            Ok(ServerMsg::Error { code, message, .. }) => {
                Err(DeviceError::Auth(format!("{code}: {message}")))
            }
            Ok(other) => Err(DeviceError::Protocol(format!(
                "expected login_ok, got {other:?}"
            ))),
            Err(e) => Err(DeviceError::Protocol(e.to_string())),
        }
    }

    fn start(
        endpoint: quinn::Endpoint,
        cfg: DeviceConfig,
        conn: quinn::Connection,
        writer: SharedWriter,
        recv: quinn::RecvStream,
        number: String,
        session: u64,
    ) -> Device {
        let stats = Arc::new(DeviceStats::default());
        let book = Arc::new(StdMutex::new(AddressBookMirror::default()));
        let (ev_tx, events) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();

        let reader = tokio::spawn(control_reader(
            recv,
            ev_tx,
            cmd_tx.clone(),
            book.clone(),
            conn.clone(),
        ));
        let dtmf: DtmfTypes = Arc::default();
        let datagrams = tokio::spawn(datagram_reader(
            conn.clone(),
            stats.clone(),
            cfg.media == MediaMode::Echo,
            dtmf.clone(),
        ));
        let behaviour = tokio::spawn(
            Behaviour {
                cfg,
                conn: conn.clone(),
                writer: writer.clone(),
                stats: stats.clone(),
                cmd_tx: cmd_tx.clone(),
                calls: HashMap::new(),
                dtmf,
            }
            .run(cmd_rx),
        );

        Device {
            number,
            session,
            stats,
            conn,
            _endpoint: endpoint,
            writer,
            cmd_tx,
            events,
            book,
            tasks: vec![
                AbortOnDrop(reader),
                AbortOnDrop(datagrams),
                AbortOnDrop(behaviour),
            ],
        }
    }

    /// The user's E.164 number from `login_ok`.
    pub fn number(&self) -> &str {
        &self.number
    }

    /// The device session id from `login_ok`.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The device's counters (live; shared with its tasks).
    pub fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }

    /// Sends any control message.
    ///
    /// `answer`, `hangup` and `reject` sent this way also update the device's call state
    /// (a hung-up or rejected call stops its media and counts as ended).
    pub async fn send(&self, msg: ClientMsg) -> Result<(), DeviceError> {
        write_msg(&self.writer, &msg).await?;
        if matches!(
            msg,
            ClientMsg::Answer { .. } | ClientMsg::Hangup { .. } | ClientMsg::Reject { .. }
        ) {
            // Fails only when the behaviour task is gone, i.e. the connection is closing.
            let _ = self.cmd_tx.send(Cmd::Sent(msg));
        }
        Ok(())
    }

    /// Sends a control message carrying the request `id` (`docs/protocol.md` §2), which the
    /// node's answer (`book_ok`, `book_results`, or an `error`) echoes.
    pub async fn send_request(&self, msg: ClientMsg, id: u64) -> Result<(), DeviceError> {
        let mut value =
            serde_json::to_value(&msg).map_err(|e| DeviceError::Protocol(e.to_string()))?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("id".into(), id.into());
        }
        let mut w = self.writer.lock().await;
        let Writer { send, buf } = &mut *w;
        buf.clear();
        control::encode(&value, buf).map_err(|e| DeviceError::Protocol(e.to_string()))?;
        send.write_all(buf).await.map_err(|_| DeviceError::Closed)
    }

    /// The next message the node sent after `login_ok`, or `None` after `timeout` or once
    /// the control stream has closed and every message was read.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<ServerMsg> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Skips events until one matches `f` and returns it; `None` if none did within
    /// `timeout` (in total) or the control stream closed.
    pub async fn wait_for<F: Fn(&ServerMsg) -> bool>(
        &mut self,
        timeout: Duration,
        f: F,
    ) -> Option<ServerMsg> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self.next_event(left).await?;
            if f(&msg) {
                return Some(msg);
            }
        }
    }

    /// The address book as the node's pages and updates built it (empty before the first).
    pub fn address_book(&self) -> Vec<AddressBookEntry> {
        self.book
            .lock()
            .map(|b| b.entries().to_vec())
            .unwrap_or_default()
    }

    /// Whether every page of the book sent at login has arrived.
    pub fn address_book_complete(&self) -> bool {
        self.book.lock().is_ok_and(|b| b.is_complete())
    }

    /// Closes the QUIC connection abruptly (no hang-ups first), as a crashing device would.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.close_reason().map(|e| e.to_string())
    }

    /// Whether the control stream has ended and every event received was read, so
    /// [`Self::next_event`] will return `None` from now on.
    pub fn events_closed(&self) -> bool {
        self.events.is_closed() && self.events.is_empty()
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.tasks.clear();
        self.conn.close(0u32.into(), b"dropped");
    }
}

async fn control_reader(
    mut recv: quinn::RecvStream,
    events: mpsc::UnboundedSender<ServerMsg>,
    cmds: mpsc::UnboundedSender<Cmd>,
    book: Arc<StdMutex<AddressBookMirror>>,
    conn: quinn::Connection,
) {
    let mut body = Vec::with_capacity(1024);
    loop {
        match read_frame(&mut recv, &mut body).await {
            Ok(()) => {}
            Err(DeviceError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad control frame; closing");
                conn.close(1u32.into(), b"bad frame");
                return;
            }
        }
        let msg = match control::decode::<ServerMsg>(&body) {
            Ok(m) => m,
            Err(e) => {
                // An unknown message type from a newer node: skip it.
                tracing::warn!(error = %e, "undecodable control message ignored");
                continue;
            }
        };
        if let Ok(mut b) = book.lock() {
            b.apply(&msg);
        }
        let _ = cmds.send(Cmd::Server(msg.clone()));
        // The application may have stopped reading events; that is fine.
        let _ = events.send(msg);
    }
}

/// Each connected call's telephone-event payload type, by flow: written by the
/// behaviour task at `call_connected`, read per datagram (a sharded map: no lock shared
/// by a load test's thousands of flows).
type DtmfTypes = Arc<dashmap::DashMap<u64, u8>>;

async fn datagram_reader(
    conn: quinn::Connection,
    stats: Arc<DeviceStats>,
    echo: bool,
    dtmf: DtmfTypes,
) {
    // Per flow: (SSRC, sequence, timestamp) of the last RTP packet.
    let mut last: HashMap<u64, (u32, u16, u32)> = HashMap::new();
    // Per flow: the timestamp of the last DTMF event seen.
    let mut event_ts: HashMap<u64, u32> = HashMap::new();
    while let Ok(datagram) = conn.read_datagram().await {
        let is_rtp = match roq::decode(&datagram) {
            Ok((flow, packet)) => match RtpView::parse(packet) {
                Ok(v) if v.kind() == Kind::Rtp => {
                    if dtmf.get(&flow).is_some_and(|pt| *pt == v.payload_type()) {
                        bump(&stats.dtmf_received);
                        if event_ts.get(&flow) != Some(&v.timestamp())
                            && let Some(&code) = v.payload().first()
                        {
                            if event_ts.len() >= 4096 && !event_ts.contains_key(&flow) {
                                event_ts.clear(); // ended calls' flows
                            }
                            event_ts.insert(flow, v.timestamp());
                            let mut events =
                                stats.dtmf_events.lock().unwrap_or_else(|e| e.into_inner());
                            if events.len() < 64 {
                                events.push(code);
                            }
                        }
                    }
                    let now = (v.ssrc(), v.sequence(), v.timestamp());
                    if last.len() >= 4096 && !last.contains_key(&flow) {
                        last.clear(); // ended calls' flows; bounded memory on long runs
                    }
                    if let Some((ssrc, seq, ts)) = last.insert(flow, now) {
                        if ssrc != now.0 {
                            bump(&stats.rtp_ssrc_changes);
                        } else if now.1 != seq.wrapping_add(1)
                            || now.2.wrapping_sub(ts) >= 0x8000_0000
                        {
                            bump(&stats.rtp_discontinuities);
                        }
                    }
                    true
                }
                Ok(_) => false,
                Err(_) => {
                    bump(&stats.bad_datagrams);
                    continue;
                }
            },
            Err(_) => {
                bump(&stats.bad_datagrams);
                continue;
            }
        };
        if !is_rtp {
            continue;
        }
        bump(&stats.rtp_received);
        if echo {
            // Same flow id, same packet: the datagram goes back unchanged.
            match conn.send_datagram(datagram) {
                Ok(()) => bump(&stats.rtp_sent),
                Err(quinn::SendDatagramError::ConnectionLost(_)) => return,
                Err(e) => tracing::debug!(error = %e, "echo datagram not sent"),
            }
        }
    }
}

/// State of one call offered to this device.
#[derive(Default)]
struct Call {
    /// Flow id once connected.
    flow_id: Option<u64>,
    answer_timer: Option<AbortOnDrop>,
    hangup_timer: Option<AbortOnDrop>,
    tone: Option<AbortOnDrop>,
}

struct Behaviour {
    cfg: DeviceConfig,
    conn: quinn::Connection,
    writer: SharedWriter,
    stats: Arc<DeviceStats>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    calls: HashMap<String, Call>,
    dtmf: DtmfTypes,
}

impl Behaviour {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        while let Some(cmd) = rx.recv().await {
            let ok = match cmd {
                Cmd::Server(msg) => self.on_server(msg).await,
                Cmd::Sent(msg) => {
                    self.on_sent(msg);
                    true
                }
                Cmd::AnswerDue(call_id) => self.answer(call_id).await,
                Cmd::HangupDue(call_id) => self.hangup(call_id).await,
            };
            if !ok {
                // The control stream is gone; nothing more to do.
                break;
            }
        }
        // Dropping `calls` stops timers and tone generators.
    }

    /// Returns `false` when the control stream can no longer be written.
    async fn on_server(&mut self, msg: ServerMsg) -> bool {
        match msg {
            ServerMsg::IncomingCall { call_id, .. } => {
                bump(&self.stats.calls_offered);
                // Acknowledge at once: a node withdraws offers a device leaves unacknowledged.
                let ack = ClientMsg::Ringing {
                    call_id: call_id.clone(),
                };
                if write_msg(&self.writer, &ack).await.is_err() {
                    return false;
                }
                if self.cfg.reject {
                    return self.reject(call_id).await;
                }
                let mut call = Call::default();
                match self.cfg.answer_after {
                    Some(d) if d.is_zero() => {
                        self.calls.insert(call_id.clone(), call);
                        return self.answer(call_id).await;
                    }
                    Some(d) => {
                        call.answer_timer = Some(self.timer(d, Cmd::AnswerDue(call_id.clone())));
                    }
                    None => {}
                }
                self.calls.insert(call_id, call);
            }
            ServerMsg::CallConnected {
                call_id,
                flow_id,
                payload_type,
                telephone_event,
                ..
            } => {
                bump(&self.stats.calls_connected);
                if let Some(te) = telephone_event {
                    self.dtmf.insert(flow_id, te);
                }
                let hangup_timer = self
                    .cfg
                    .hangup_after
                    .map(|d| self.timer(d, Cmd::HangupDue(call_id.clone())));
                let tone = (self.cfg.media == MediaMode::Tone).then(|| {
                    AbortOnDrop(tokio::spawn(tone_sender(
                        self.conn.clone(),
                        self.stats.clone(),
                        flow_id,
                        payload_type,
                    )))
                });
                let call = self.calls.entry(call_id).or_default();
                call.flow_id = Some(flow_id);
                call.answer_timer = None;
                call.hangup_timer = hangup_timer;
                call.tone = tone;
            }
            ServerMsg::CallEnded { call_id, .. } => self.end(&call_id),
            _ => {}
        }
        true
    }

    fn on_sent(&mut self, msg: ClientMsg) {
        match msg {
            ClientMsg::Answer { call_id } => {
                bump(&self.stats.calls_answered);
                if let Some(c) = self.calls.get_mut(&call_id) {
                    c.answer_timer = None;
                }
            }
            ClientMsg::Hangup { call_id } | ClientMsg::Reject { call_id } => self.end(&call_id),
            _ => {}
        }
    }

    fn timer(&self, after: Duration, cmd: Cmd) -> AbortOnDrop {
        let tx = self.cmd_tx.clone();
        AbortOnDrop(tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(cmd);
        }))
    }

    /// Forgets a call, stopping its timers and media; counts it as ended once.
    fn end(&mut self, call_id: &str) {
        if let Some(call) = self.calls.remove(call_id) {
            bump(&self.stats.calls_ended);
            if let Some(flow) = call.flow_id {
                self.dtmf.remove(&flow);
            }
        }
    }

    async fn answer(&mut self, call_id: String) -> bool {
        match self.calls.get_mut(&call_id) {
            Some(c) if c.flow_id.is_none() => c.answer_timer = None,
            _ => return true,
        }
        bump(&self.stats.calls_answered);
        write_msg(&self.writer, &ClientMsg::Answer { call_id })
            .await
            .is_ok()
    }

    async fn reject(&mut self, call_id: String) -> bool {
        // Never entered in `calls`, so count the end here.
        self.calls.remove(&call_id);
        bump(&self.stats.calls_ended);
        write_msg(&self.writer, &ClientMsg::Reject { call_id })
            .await
            .is_ok()
    }

    async fn hangup(&mut self, call_id: String) -> bool {
        if self.calls.get(&call_id).is_none_or(|c| c.flow_id.is_none()) {
            return true;
        }
        self.end(&call_id);
        write_msg(&self.writer, &ClientMsg::Hangup { call_id })
            .await
            .is_ok()
    }
}

/// Sends 20 ms G.711 tone packets on `flow_id` until aborted or the connection is lost.
async fn tone_sender(conn: quinn::Connection, stats: Arc<DeviceStats>, flow_id: u64, pt: u8) {
    // One second of a 440 Hz tone is a whole number of periods, so it loops seamlessly.
    let tone = g711::tone(pt, TONE_HZ, 1.0);
    let frames = tone.len() / g711::SAMPLES_PER_20MS;
    let ssrc: u32 = rand::random();
    let mut seq: u16 = rand::random();
    let ts0: u32 = rand::random();
    let mut head = [0u8; RTP_HEADER_LEN];
    let mut packet = [0u8; RTP_HEADER_LEN + g711::SAMPLES_PER_20MS];
    let mut out = BytesMut::with_capacity(4096);
    let mut ticker = tokio::time::interval(PTIME);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = ticker.tick().await;
    let mut now = start;
    let mut first = true;
    loop {
        // The media clock follows wall time: skipped ticks advance the timestamp, not seq.
        let n = (now.duration_since(start).as_millis() / PTIME.as_millis()) as u64;
        let ts = ts0.wrapping_add((n as u32).wrapping_mul(g711::SAMPLES_PER_20MS as u32));
        rtp::write_header(&mut head, pt, first, seq, ts, ssrc);
        packet[..RTP_HEADER_LEN].copy_from_slice(&head);
        let frame = (n as usize) % frames;
        packet[RTP_HEADER_LEN..].copy_from_slice(
            &tone[frame * g711::SAMPLES_PER_20MS..(frame + 1) * g711::SAMPLES_PER_20MS],
        );
        roq::encode(flow_id, &packet, &mut out);
        let datagram: Bytes = out.split().freeze();
        match conn.send_datagram(datagram) {
            Ok(()) => bump(&stats.rtp_sent),
            Err(quinn::SendDatagramError::ConnectionLost(_)) => return,
            Err(e) => tracing::debug!(error = %e, "tone datagram not sent"),
        }
        first = false;
        seq = seq.wrapping_add(1);
        now = ticker.tick().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_snapshot_and_display() {
        let s = DeviceStats::default();
        bump(&s.calls_offered);
        bump(&s.calls_offered);
        s.rtp_received.fetch_add(50, Ordering::Relaxed);
        let snap = s.snapshot();
        assert_eq!(snap.calls_offered, 2);
        assert_eq!(snap.rtp_received, 50);
        assert_eq!(snap.calls_ended, 0);
        assert!(snap.to_string().contains("offered=2"));
        let json = serde_json::to_value(snap).unwrap();
        assert_eq!(json["rtp_received"], 50);
    }

    #[test]
    fn media_mode_parses() {
        assert_eq!("echo".parse::<MediaMode>(), Ok(MediaMode::Echo));
        assert_eq!("Tone".parse::<MediaMode>(), Ok(MediaMode::Tone));
        assert_eq!("none".parse::<MediaMode>(), Ok(MediaMode::None));
        assert!("loud".parse::<MediaMode>().is_err());
    }

    /// A minimal Parley node: logs one device in, offers one call, sends media and ends it.
    mod mock {
        use super::*;
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

        pub struct Node {
            pub endpoint: quinn::Endpoint,
            pub cert_der: Vec<u8>,
        }

        pub fn node() -> Node {
            let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).unwrap();
            let cert_der = ck.cert.der().to_vec();
            let key =
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
            let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone().into()], key)
            .unwrap();
            tls.alpn_protocols = vec![ALPN.to_vec()];
            let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
            let cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
            let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
            Node { endpoint, cert_der }
        }

        pub async fn send(send: &mut quinn::SendStream, msg: &ServerMsg) {
            let mut buf = BytesMut::new();
            control::encode(msg, &mut buf).unwrap();
            send.write_all(&buf).await.unwrap();
        }

        pub async fn recv(recv: &mut quinn::RecvStream) -> ClientMsg {
            let mut body = Vec::new();
            read_frame(recv, &mut body).await.unwrap();
            control::decode(&body).unwrap()
        }
    }

    fn config(node: &mock::Node, password: &str, media: MediaMode) -> DeviceConfig {
        DeviceConfig {
            target: node.endpoint.local_addr().unwrap(),
            cert_der: node.cert_der.clone(),
            tenant: "demo".into(),
            user: "alice".into(),
            password: password.into(),
            device: "desk".into(),
            answer_after: Some(Duration::from_millis(10)),
            reject: false,
            hangup_after: None,
            media,
        }
    }

    #[tokio::test]
    async fn wrong_password_is_an_auth_error() {
        let node = mock::node();
        let ep = node.endpoint.clone();
        tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let (mut tx, mut rx) = conn.accept_bi().await.unwrap();
            assert!(matches!(mock::recv(&mut rx).await, ClientMsg::Login { .. }));
            let err = ServerMsg::Error {
                code: "auth_failed".into(),
                message: "no".into(),
                fatal: true,
                id: None,
            };
            mock::send(&mut tx, &err).await;
            let _ = tx.finish();
            conn.closed().await;
        });
        let err = Device::connect(config(&node, "bad", MediaMode::None))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DeviceError::Auth(ref m) if m.starts_with("auth_failed")),
            "{err}"
        );
    }

    async fn call_with_media(media: MediaMode) -> (StatsSnapshot, u64, Vec<Bytes>) {
        let node = mock::node();
        let ep = node.endpoint.clone();
        let server = tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let (mut tx, mut rx) = conn.accept_bi().await.unwrap();
            let login = mock::recv(&mut rx).await;
            assert!(matches!(login, ClientMsg::Login { ref password, .. } if password == "demo"));
            mock::send(
                &mut tx,
                &ServerMsg::LoginOk {
                    number: "+15550100001".into(),
                    session: 7,
                    token: None,
                    display_name: None,
                },
            )
            .await;
            let book = ServerMsg::AddressBook {
                entries: vec![AddressBookEntry {
                    address: "+15550100002".into(),
                    name: Some("Bob".into()),
                    call_count: 1,
                    last_seen: "2025-11-28T14:02:11Z".into(),
                    known: true,
                    ..Default::default()
                }],
                offset: 0,
                total: 1,
            };
            mock::send(&mut tx, &book).await;
            let offer = ServerMsg::IncomingCall {
                call_id: "c-1".into(),
                from: "+15550100002".into(),
                from_name: None,
                to: "+15550100001".into(),
                video: false,
            };
            mock::send(&mut tx, &offer).await;
            assert_eq!(
                mock::recv(&mut rx).await,
                ClientMsg::Ringing {
                    call_id: "c-1".into()
                },
                "the offer is acknowledged first"
            );
            assert_eq!(
                mock::recv(&mut rx).await,
                ClientMsg::Answer {
                    call_id: "c-1".into()
                }
            );
            let connected = ServerMsg::CallConnected {
                call_id: "c-1".into(),
                flow_id: 300,
                payload_type: g711::PT_PCMA,
                video_flow_id: None,
                telephone_event: None,
                video_formats: Vec::new(),
            };
            mock::send(&mut tx, &connected).await;
            // Ten packets to the device, one bad datagram.
            let mut buf = BytesMut::new();
            for i in 0..10u16 {
                let mut head = [0u8; RTP_HEADER_LEN];
                rtp::write_header(&mut head, g711::PT_PCMA, i == 0, i, u32::from(i) * 160, 42);
                let mut pkt = head.to_vec();
                pkt.extend_from_slice(&[0xd5; 160]);
                roq::encode(300, &pkt, &mut buf);
                conn.send_datagram(buf.split().freeze()).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            conn.send_datagram(Bytes::from_static(&[0x05, 0x40]))
                .unwrap();
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Ok(d)) = tokio::time::timeout_at(deadline, conn.read_datagram()).await {
                got.push(d);
            }
            let ended = ServerMsg::CallEnded {
                call_id: "c-1".into(),
                reason: "remote_hangup".into(),
            };
            mock::send(&mut tx, &ended).await;
            conn.closed().await;
            got
        });
        let mut dev = Device::connect(config(&node, "demo", media)).await.unwrap();
        assert_eq!((dev.number(), dev.session()), ("+15550100001", 7));
        let ended = dev
            .wait_for(Duration::from_secs(5), |m| {
                matches!(m, ServerMsg::CallEnded { .. })
            })
            .await;
        assert!(ended.is_some());
        assert_eq!(dev.address_book().len(), 1);
        let stats = dev.stats().snapshot();
        // Give the tone task time to notice the end (it is aborted with the call).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent_after_end = dev.stats().snapshot().rtp_sent - stats.rtp_sent;
        dev.close();
        let got = server.await.unwrap();
        (stats, sent_after_end, got)
    }

    #[tokio::test]
    async fn echo_device_answers_and_echoes() {
        let (stats, _, got) = call_with_media(MediaMode::Echo).await;
        assert_eq!(
            (
                stats.calls_offered,
                stats.calls_answered,
                stats.calls_connected,
                stats.calls_ended
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(
            (stats.rtp_received, stats.rtp_sent, stats.bad_datagrams),
            (10, 10, 1)
        );
        assert_eq!(got.len(), 10);
        let (flow, pkt) = roq::decode(&got[3]).unwrap();
        assert_eq!((flow, RtpView::parse(pkt).unwrap().sequence()), (300, 3));
    }

    #[tokio::test]
    async fn tone_device_sends_paced_g711() {
        let (stats, sent_after_end, got) = call_with_media(MediaMode::Tone).await;
        assert_eq!(stats.rtp_received, 10);
        assert_eq!(sent_after_end, 0);
        // About 550 ms of media at 50 pps.
        assert!((10..=40).contains(&got.len()), "{}", got.len());
        let views: Vec<_> = got
            .iter()
            .map(|d| {
                let (flow, pkt) = roq::decode(d).unwrap();
                assert_eq!(flow, 300);
                assert_eq!(pkt.len(), RTP_HEADER_LEN + g711::SAMPLES_PER_20MS);
                RtpView::parse(pkt).unwrap()
            })
            .collect();
        assert!(views[0].marker() && !views[1].marker());
        for w in views.windows(2) {
            assert_eq!(w[0].payload_type(), g711::PT_PCMA);
            assert_eq!(w[1].sequence(), w[0].sequence().wrapping_add(1));
            assert_eq!(w[1].timestamp(), w[0].timestamp().wrapping_add(160));
            assert_eq!(w[1].ssrc(), w[0].ssrc());
        }
    }

    #[test]
    fn client_config_accepts_only_a_certificate() {
        assert!(client_config(b"not a certificate").is_err());
    }
}
