//! HTTPS/WSS for the web listener: an axum [`Listener`] whose connections are TLS streams.
//! Handshakes run on tasks of their own (`[web] header_timeout_secs` each at most), so a
//! client that stalls in its handshake holds up nobody else's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// Handshakes finished and not yet taken by the server, at most.
const READY: usize = 64;

/// A TCP listener that hands out connections once their TLS handshake is done.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ready_tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    handshake_timeout: Duration,
}

impl TlsListener {
    /// Serves TLS with `config` on `tcp`; a handshake takes `handshake_timeout` at most.
    pub fn new(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        handshake_timeout: Duration,
    ) -> Self {
        let (ready_tx, ready) = mpsc::channel(READY);
        Self {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            ready_tx,
            ready,
            handshake_timeout,
        }
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                Some(done) = self.ready.recv() => return done,
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, remote)) => {
                        let acceptor = self.acceptor.clone();
                        let ready = self.ready_tx.clone();
                        let limit = self.handshake_timeout;
                        tokio::spawn(async move {
                            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let _ = ready.send((tls, remote)).await;
                                }
                                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "web TLS handshake failed"),
                                Err(_) => tracing::debug!(%remote, "web TLS handshake timed out"),
                            }
                        });
                    }
                    // Out of file descriptors and the like: wait instead of spinning.
                    Err(e) => {
                        tracing::warn!(error = %e, "web listener accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
