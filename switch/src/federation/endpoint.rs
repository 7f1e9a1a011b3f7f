//! The agent endpoint: QUIC, ALPN `parley-agent/1`, the node's certificate (agents pin
//! it), client certificates from the node's agent CA.
//!
//! The client verifier accepts a connection with no certificate (an agent enrolling; it
//! may make only the `enroll` request) or with a certificate that chains to the agent CA
//! *and* whose fingerprint is one the node issued to an agent that is not revoked.
//! Anything else — a foreign CA, a revoked agent, a certificate the store never issued —
//! fails the TLS handshake itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use parley_codecs::agent::{self, AgentRequest, NodeAnswer};
use quinn::{RecvStream, SendStream};
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use super::{CertEntry, Federation, Fingerprint, fingerprint};
use crate::metrics as m;

/// How long an enrolling connection has to send its request.
const ENROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Agent-initiated streams open at once per connection.
const AGENT_STREAMS: u32 = 8;

/// Connections without a client certificate (enrolling) handled at once; more are closed
/// at once, so a flood of anonymous handshakes cannot hold the endpoint.
const MAX_ENROLLING: usize = 32;

/// Bytes of sync pages one sync may carry (the user count is bounded separately).
const MAX_SYNC_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug)]
struct AgentVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    accepted: Arc<DashMap<Fingerprint, CertEntry>>,
}

impl ClientCertVerifier for AgentVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            metrics::counter!(m::AUTH_AGENT_HANDSHAKES_REFUSED_TOTAL, "reason" => "untrusted")
                .increment(1);
            return Err(e);
        }
        if !self.accepted.contains_key(&fingerprint(end_entity)) {
            metrics::counter!(m::AUTH_AGENT_HANDSHAKES_REFUSED_TOTAL, "reason" => "revoked")
                .increment(1);
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The endpoint's server config.
pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fed: &Federation,
) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fed.ca().cert().clone())?;
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let verifier = Arc::new(AgentVerifier {
        inner,
        accepted: fed.accepted_certs(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![agent::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Agents keep the connection alive every 10 s; one silent for 30 s is gone.
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_concurrent_bidi_streams(AGENT_STREAMS.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame(recv: &mut RecvStream) -> anyhow::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = agent::frame_len(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Writes one frame.
pub async fn write_frame<T: serde::Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> anyhow::Result<()> {
    let mut buf = BytesMut::new();
    agent::encode(msg, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(())
}

/// Accepts agent connections until the endpoint closes. Runs on the actix arbiter:
/// directory syncs create user actors.
pub async fn serve(endpoint: quinn::Endpoint, fed: Arc<Federation>) {
    let enrolling = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while let Some(incoming) = endpoint.accept().await {
        let (fed, enrolling) = (fed.clone(), enrolling.clone());
        actix_rt::spawn(async move {
            match incoming.await {
                Ok(conn) => handle_connection(conn, fed, &enrolling).await,
                Err(e) => tracing::info!(error = %e, "auth agent handshake failed"),
            }
        });
    }
}

fn peer_cert(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().cloned()
}

async fn handle_connection(
    conn: quinn::Connection,
    fed: Arc<Federation>,
    enrolling: &std::sync::atomic::AtomicUsize,
) {
    use std::sync::atomic::Ordering;
    let remote = conn.remote_address();
    let Some(cert) = peer_cert(&conn) else {
        if enrolling.fetch_add(1, Ordering::AcqRel) >= MAX_ENROLLING {
            enrolling.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(m::AUTH_AGENT_ENROLMENTS_TOTAL, "result" => "busy").increment(1);
            conn.close(6u32.into(), b"too many enrolments at once");
            return;
        }
        enrol(conn, fed).await;
        enrolling.fetch_sub(1, Ordering::AcqRel);
        return;
    };
    let Some(who) = fed
        .accepted_certs()
        .get(&fingerprint(&cert))
        .map(|e| e.clone())
    else {
        // Revoked between the handshake and now.
        conn.close(3u32.into(), b"revoked");
        return;
    };
    tracing::info!(%remote, tenant = %who.tenant, agent = %who.agent_id, "auth agent connected");
    fed.agent_connected(&who, conn.clone());
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let (fed, who) = (fed.clone(), who.clone());
                actix_rt::spawn(async move {
                    if let Err(e) = agent_request(send, recv, &fed, &who).await {
                        tracing::info!(tenant = %who.tenant, agent = %who.agent_id, error = %e, "agent request failed");
                    }
                });
            }
            Err(e) => {
                tracing::info!(%remote, tenant = %who.tenant, agent = %who.agent_id, reason = %e, "auth agent disconnected");
                break;
            }
        }
    }
    fed.agent_disconnected(&who, &conn);
}

/// A connection without a client certificate: one `enroll` request, then closed.
async fn enrol(conn: quinn::Connection, fed: Arc<Federation>) {
    let remote = conn.remote_address();
    let result = tokio::time::timeout(ENROL_TIMEOUT, async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let body = read_frame(&mut recv)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no request"))?;
        let answer = match agent::decode::<AgentRequest>(&body) {
            Ok(AgentRequest::Enroll {
                token,
                csr_pem,
                name,
            }) => match fed.enroll(&token, &csr_pem, &name).await {
                Ok((row, issued)) => {
                    metrics::counter!(m::AUTH_AGENT_ENROLMENTS_TOTAL, "result" => "ok")
                        .increment(1);
                    tracing::info!(%remote, tenant = %row.tenant, agent = %row.id, name = %row.name, "auth agent enrolled");
                    NodeAnswer::Enrolled {
                        agent_id: row.id,
                        tenant: row.tenant,
                        cert_pem: issued.pem,
                    }
                }
                Err((code, message)) => {
                    metrics::counter!(m::AUTH_AGENT_ENROLMENTS_TOTAL, "result" => code)
                        .increment(1);
                    tracing::warn!(%remote, code, %message, "auth agent enrolment refused");
                    NodeAnswer::Refused {
                        code: code.into(),
                        message,
                    }
                }
            },
            Ok(_) => NodeAnswer::Refused {
                code: "not_enrolled".into(),
                message: "connect with the certificate from enrolment".into(),
            },
            Err(e) => NodeAnswer::Refused {
                code: "bad_message".into(),
                message: e.to_string(),
            },
        };
        write_frame(&mut send, &answer).await?;
        let _ = send.finish();
        let _ = send.stopped().await;
        anyhow::Ok(())
    })
    .await;
    if let Ok(Err(e)) | Err(e) = result.map_err(anyhow::Error::from) {
        tracing::info!(%remote, error = %e, "enrolment connection failed");
    }
    conn.close(0u32.into(), b"done");
}

async fn agent_request(
    mut send: SendStream,
    mut recv: RecvStream,
    fed: &Federation,
    who: &CertEntry,
) -> anyhow::Result<()> {
    let Some(body) = read_frame(&mut recv).await? else {
        return Ok(());
    };
    let answer = match agent::decode::<AgentRequest>(&body)? {
        AgentRequest::Renew { csr_pem } => match fed.renew(who, &csr_pem).await {
            Ok(issued) => {
                tracing::info!(tenant = %who.tenant, agent = %who.agent_id, "auth agent certificate renewed");
                NodeAnswer::Renewed {
                    cert_pem: issued.pem,
                    valid_secs: fed.settings().agent_cert_lifetime.as_secs(),
                }
            }
            Err(e) => NodeAnswer::Refused {
                code: "bad_csr".into(),
                message: e.to_string(),
            },
        },
        AgentRequest::SyncPage { users, last } => {
            let mut all = users;
            let mut done = last;
            let mut bytes = body.len();
            while !done {
                let body = read_frame(&mut recv)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("sync ended before its last page"))?;
                bytes += body.len();
                if bytes > MAX_SYNC_BYTES {
                    anyhow::bail!("a sync of more than {MAX_SYNC_BYTES} bytes: dropped");
                }
                match agent::decode::<AgentRequest>(&body)? {
                    AgentRequest::SyncPage { users, last } => {
                        if all.len() + users.len() > fed.settings().max_directory_users {
                            write_frame(
                                &mut send,
                                &NodeAnswer::Refused {
                                    code: "too_many_users".into(),
                                    message: format!(
                                        "more than federation.max_directory_users ({})",
                                        fed.settings().max_directory_users
                                    ),
                                },
                            )
                            .await?;
                            let _ = send.finish();
                            return Ok(());
                        }
                        all.extend(users);
                        done = last;
                    }
                    _ => anyhow::bail!("a sync stream carries sync pages only"),
                }
            }
            match fed.apply_sync(&who.tenant, all).await {
                Ok((users, numbers_refused)) => {
                    tracing::info!(tenant = %who.tenant, agent = %who.agent_id, users, numbers_refused, "directory sync applied");
                    NodeAnswer::Synced {
                        users,
                        numbers_refused,
                    }
                }
                Err(e) => NodeAnswer::Refused {
                    code: "sync_refused".into(),
                    message: e.to_string(),
                },
            }
        }
        AgentRequest::Enroll { .. } => NodeAnswer::Refused {
            code: "already_enrolled".into(),
            message: "this agent is enrolled".into(),
        },
    };
    write_frame(&mut send, &answer).await?;
    let _ = send.finish();
    Ok(())
}
