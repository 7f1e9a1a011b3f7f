//! SIP over connections (RFC 3261 §18): TCP, and TLS (rustls through `tokio-rustls`,
//! RFC 3261 §26.2, hop by hop) the same way.
//!
//! Each connection is a task on the SIP thread's runtime: it frames messages off the byte
//! stream with `sipx-sip`'s [`StreamParser`] (Content-Length framing, size limits checked
//! before allocation) and hands each parsed message to the SIP driver actor (through a [`Sink`]), and it
//! writes what the driver queues for it. The driver keeps the table of live connections
//! by remote address, so a response goes back over the connection its request came on and
//! later requests to that peer reuse it (RFC 3261 §18.2.2); a message to a peer with no
//! connection (a trunk over TCP) opens one.
//!
//! Defences: a connection idle for `idle_timeout` is closed; one that has sent part of a
//! message and not finished it within `message_timeout` is closed (slow-loris); a framing
//! or parse error closes the connection (framing cannot be recovered on a stream,
//! RFC 4475 §3.1.2.3); at most `max_connections` are open at once; each connection's
//! outgoing queue is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use sipx_sip::{Limits, Message, StreamParser};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::transport::Transport;
use crate::metrics as m;

/// Parse limits on a connection: the datagram ones (64 KiB a message). `sipx-sip`'s
/// stream defaults allow 1 MiB, which over `max_connections` connections each holding a
/// partial message would let peers pin a GiB; no SIP message a gateway or trunk sends
/// comes near 64 KiB.
pub fn limits() -> Limits {
    Limits::datagram()
}

/// Limits and timeouts of SIP connections.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// A connection with no traffic this long is closed.
    pub idle_timeout: Duration,
    /// A message begun must be complete within this long.
    pub message_timeout: Duration,
    /// Most connections open at once (inbound and outbound).
    pub max_connections: usize,
    /// Messages queued for one connection before further ones are dropped.
    pub queue: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(600),
            message_timeout: Duration::from_secs(5),
            max_connections: 1024,
            queue: 1024,
        }
    }
}

/// A message framed off a connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StreamMessage {
    /// The connection's remote end.
    pub peer: SocketAddr,
    /// Its transport.
    pub transport: Transport,
    /// The message.
    pub msg: Message,
}

/// An inbound connection is up: where to queue what goes out on it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StreamOpened {
    /// The connection's remote end.
    pub peer: SocketAddr,
    /// Its transport.
    pub transport: Transport,
    /// Its id (to tell it from a later connection from the same address).
    pub id: u64,
    /// Its outgoing queue.
    pub tx: mpsc::Sender<Bytes>,
}

/// A connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StreamClosed {
    /// The connection's remote end.
    pub peer: SocketAddr,
    /// Its transport.
    pub transport: Transport,
    /// Its id.
    pub id: u64,
}

/// Where connections report to (the SIP driver's recipients; recipients rather than its
/// address, so this module does not depend on the driver's).
#[derive(Clone)]
pub struct Sink {
    /// Messages framed off a connection.
    pub msg: Recipient<StreamMessage>,
    /// Connections accepted.
    pub opened: Recipient<StreamOpened>,
    /// Connections ended.
    pub closed: Recipient<StreamClosed>,
}

/// Counts open connections against the cap.
#[derive(Debug, Default)]
pub struct ConnectionCount(AtomicUsize);

impl ConnectionCount {
    /// Takes a slot if one is free.
    pub fn try_take(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let mut n = self.0.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match self
                .0
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    metrics::gauge!(m::SIP_CONNECTIONS).increment(1.0);
                    return Some(Slot(self.clone()));
                }
                Err(now) => n = now,
            }
        }
    }
}

/// One connection's place under the cap, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<ConnectionCount>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(m::SIP_CONNECTIONS).decrement(1.0);
    }
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A fresh connection id.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// The next connection on `listener` that fits under the cap (others are closed at once).
async fn accept_one(
    listener: &tokio::net::TcpListener,
    transport: Transport,
    settings: StreamSettings,
    count: &Arc<ConnectionCount>,
) -> (tokio::net::TcpStream, SocketAddr, Slot) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, transport = transport.as_str(), "SIP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = count.try_take(settings.max_connections) else {
            metrics::counter!(m::SIP_CONNECTIONS_REFUSED_TOTAL, "transport" => transport.as_str())
                .increment(1);
            tracing::warn!(%peer, transport = transport.as_str(), "SIP connection refused: too many connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        return (stream, peer, slot);
    }
}

/// Accepts TCP connections on `listener` for `driver`.
pub async fn accept_tcp(
    listener: tokio::net::TcpListener,
    driver: Sink,
    settings: StreamSettings,
    count: Arc<ConnectionCount>,
) {
    loop {
        let (stream, peer, slot) = accept_one(&listener, Transport::Tcp, settings, &count).await;
        let id = next_id();
        let (tx, rx) = mpsc::channel(settings.queue);
        driver.opened.do_send(StreamOpened {
            peer,
            transport: Transport::Tcp,
            id,
            tx,
        });
        actix_rt::spawn(serve(
            stream,
            peer,
            Transport::Tcp,
            id,
            rx,
            driver.clone(),
            settings,
            slot,
        ));
    }
}

/// Accepts TLS connections on `listener` for `driver` (the handshake bounded by the
/// message timeout).
pub async fn accept_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    driver: Sink,
    settings: StreamSettings,
    count: Arc<ConnectionCount>,
) {
    loop {
        let (stream, peer, slot) = accept_one(&listener, Transport::Tls, settings, &count).await;
        let acceptor = acceptor.clone();
        let driver = driver.clone();
        actix_rt::spawn(async move {
            let tls = match tokio::time::timeout(settings.message_timeout, acceptor.accept(stream))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "SIP TLS handshake failed");
                    ended("handshake", Transport::Tls);
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "SIP TLS handshake timed out");
                    ended("handshake", Transport::Tls);
                    return;
                }
            };
            let id = next_id();
            let (tx, rx) = mpsc::channel(settings.queue);
            driver.opened.do_send(StreamOpened {
                peer,
                transport: Transport::Tls,
                id,
                tx,
            });
            serve(tls, peer, Transport::Tls, id, rx, driver, settings, slot).await;
        });
    }
}

/// Where and how to open a TLS connection: the client configuration (trusted roots) and
/// the name the peer's certificate must carry.
#[derive(Clone, Debug)]
pub struct TlsClient {
    /// rustls client configuration.
    pub config: Arc<rustls::ClientConfig>,
    /// The server name (or IP address) to verify.
    pub name: rustls::pki_types::ServerName<'static>,
}

/// Opens an outbound TLS connection to `peer` and serves it.
pub async fn connect_tls(
    peer: SocketAddr,
    client: TlsClient,
    id: u64,
    rx: mpsc::Receiver<Bytes>,
    driver: Sink,
    settings: StreamSettings,
    slot: Slot,
) {
    let connector = tokio_rustls::TlsConnector::from(client.config);
    let opened = tokio::time::timeout(settings.message_timeout, async {
        let tcp = tokio::net::TcpStream::connect(peer).await?;
        let _ = tcp.set_nodelay(true);
        connector.connect(client.name, tcp).await
    })
    .await;
    match opened {
        Ok(Ok(tls)) => {
            tracing::debug!(%peer, "SIP TLS connection opened");
            serve(tls, peer, Transport::Tls, id, rx, driver, settings, slot).await;
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "SIP TLS connect failed");
            ended("handshake", Transport::Tls);
            driver.closed.do_send(StreamClosed {
                peer,
                transport: Transport::Tls,
                id,
            });
        }
        Err(_) => {
            tracing::warn!(%peer, "SIP TLS connect timed out");
            ended("handshake", Transport::Tls);
            driver.closed.do_send(StreamClosed {
                peer,
                transport: Transport::Tls,
                id,
            });
        }
    }
}

/// Opens an outbound connection to `peer` and serves it; what the driver queued on `rx`
/// meanwhile goes out once it is up.
#[allow(clippy::too_many_arguments)]
pub async fn connect_tcp(
    peer: SocketAddr,
    id: u64,
    rx: mpsc::Receiver<Bytes>,
    driver: Sink,
    settings: StreamSettings,
    slot: Slot,
) {
    let connected = tokio::time::timeout(
        settings.message_timeout,
        tokio::net::TcpStream::connect(peer),
    )
    .await;
    match connected {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            tracing::debug!(%peer, "SIP TCP connection opened");
            serve(stream, peer, Transport::Tcp, id, rx, driver, settings, slot).await;
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "SIP TCP connect failed");
            driver.closed.do_send(StreamClosed {
                peer,
                transport: Transport::Tcp,
                id,
            });
        }
        Err(_) => {
            tracing::warn!(%peer, "SIP TCP connect timed out");
            driver.closed.do_send(StreamClosed {
                peer,
                transport: Transport::Tcp,
                id,
            });
        }
    }
}

/// Why a connection ended (log field).
fn ended(reason: &'static str, transport: Transport) {
    metrics::counter!(m::SIP_CONNECTIONS_CLOSED_TOTAL, "transport" => transport.as_str(), "reason" => reason)
        .increment(1);
}

/// Reads and writes one connection until it ends, then tells the driver.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    id: u64,
    mut rx: mpsc::Receiver<Bytes>,
    driver: Sink,
    settings: StreamSettings,
    _slot: Slot,
) {
    let (mut read, mut write) = tokio::io::split(stream);
    let mut parser = StreamParser::new(limits());
    let mut buf = vec![0u8; 16 * 1024];
    // When the partial message now buffered began arriving.
    let mut partial_since: Option<tokio::time::Instant> = None;
    let reason = loop {
        let idle = tokio::time::sleep(settings.idle_timeout);
        let slow = async {
            match partial_since {
                Some(t) => tokio::time::sleep_until(t + settings.message_timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = read.read(&mut buf) => {
                let n = match n {
                    Ok(0) => break "closed",
                    Ok(n) => n,
                    Err(_) => break "error",
                };
                match parser.push(&buf[..n]) {
                    Ok(msgs) => {
                        for msg in msgs {
                            driver.msg.do_send(StreamMessage { peer, transport, msg });
                        }
                    }
                    Err(e) => {
                        metrics::counter!(m::SIP_PARSE_ERRORS_TOTAL, "reason" => "framing").increment(1);
                        tracing::info!(%peer, error = %e, "SIP stream framing lost: closing the connection");
                        break "framing";
                    }
                }
                let _ = parser.take_keepalives();
                partial_since = match (parser.pending(), partial_since) {
                    (0, _) => None,
                    (_, Some(t)) => Some(t),
                    (_, None) => Some(tokio::time::Instant::now()),
                };
            }
            out = rx.recv() => {
                let Some(data) = out else { break "dropped" };
                if write.write_all(&data).await.is_err() {
                    break "error";
                }
            }
            () = idle => break "idle",
            () = slow => {
                tracing::info!(%peer, pending = parser.pending(), "SIP message not completed in time: closing the connection");
                break "slow";
            }
        }
    };
    ended(reason, transport);
    let _ = write.shutdown().await;
    driver.closed.do_send(StreamClosed {
        peer,
        transport,
        id,
    });
}
