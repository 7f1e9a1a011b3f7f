//! `parley auth-agent`: the auth agent of a federated tenant (`docs/auth.md`).
//!
//! Runs inside the enterprise network. `enroll` presents a one-time token to the node,
//! generates the agent's key pair and keeps the certificate the node's agent CA signs;
//! `run` then connects outbound to the node (QUIC, mutual TLS, ALPN `parley-agent/1`,
//! the node's certificate pinned from the token), answers the node's login requests by
//! binding to the directory as the user ([`ldap`]), sends the tenant's users every
//! `sync_interval_secs`, renews its certificate when a quarter of its validity is left, and
//! reconnects with backoff (0.5 s doubling to 30 s, jittered) whenever the connection
//! drops. The directory's service password and users' passwords stay here.

pub mod ldap;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parley_codecs::agent::{self, AgentRequest, AuthOutcome, NodeAnswer, NodeRequest, sync_pages};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

use crate::federation::endpoint::{read_frame, write_frame};
use crate::federation::{fingerprint, hex, parse_fingerprint, pem_cert};

/// The agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The node's agent endpoint, `host:port`.
    pub node: String,
    /// Where `enroll` wrote the key, certificate and node pin.
    pub state_dir: PathBuf,
    /// Logins handled at once; more are answered `busy` at once (the node asks another
    /// agent) instead of queueing behind a slow directory.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Seconds between directory syncs (0: never).
    #[serde(default = "default_sync_interval")]
    pub sync_interval_secs: u64,
    /// The directory.
    pub directory: ldap::DirectoryConfig,
}

fn default_max_concurrent() -> usize {
    64
}

fn default_sync_interval() -> u64 {
    300
}

impl AgentConfig {
    /// Reads a configuration file; errors name the key and the line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// What enrolment left in the state directory (`agent.json`; the key, mode 0600, and
/// the certificate beside it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// The agent's id on the node.
    pub agent_id: String,
    /// The tenant it serves.
    pub tenant: String,
    /// Hex SHA-256 of the node's certificate.
    pub node_pin: String,
    /// Which key and certificate files are current (`agent-key-N.der`,
    /// `agent-cert-N.pem`): a renewal writes the next pair, then switches this file
    /// atomically, so a crash never leaves a key with another key's certificate.
    #[serde(default)]
    pub generation: u64,
}

fn state_files(dir: &Path, generation: u64) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("agent.json"),
        dir.join(format!("agent-key-{generation}.der")),
        dir.join(format!("agent-cert-{generation}.pem")),
    )
}

fn write_state(dir: &Path, state: &AgentState) -> anyhow::Result<()> {
    let json = dir.join("agent.json");
    let tmp = dir.join("agent.json.new");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, &json)?;
    Ok(())
}

/// Accepts exactly the node certificate whose SHA-256 is the pin.
#[derive(Debug)]
struct Pinned {
    pin: crate::federation::Fingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(
    pin: crate::federation::Fingerprint,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }));
    let mut tls = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![agent::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    transport.max_concurrent_uni_streams(0u32.into());
    // The node opens one stream per login: this bounds the logins in flight to one agent.
    transport.max_concurrent_bidi_streams(1024u32.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

async fn resolve(node: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(node)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("node {node}: no address"))
}

fn endpoint(node: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = if node.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    Ok(quinn::Endpoint::client(bind)?)
}

/// A fresh key pair and a CSR for it.
fn key_and_csr() -> anyhow::Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    Ok((key, csr))
}

/// `parley auth-agent enroll`: presents `token` to the node, writes the state directory.
pub async fn enroll(
    node: &str,
    token: &str,
    state_dir: &Path,
    name: &str,
) -> anyhow::Result<AgentState> {
    let (secret, pin_hex) = token
        .rsplit_once('.')
        .ok_or_else(|| anyhow::anyhow!("enrolment token: expected <secret>.<node pin>"))?;
    let pin = parse_fingerprint(pin_hex)
        .ok_or_else(|| anyhow::anyhow!("enrolment token: the node pin is not a SHA-256 hex"))?;
    let (key, csr_pem) = key_and_csr()?;
    let addr = resolve(node).await?;
    let ep = endpoint(addr)?;
    let conn = ep
        .connect_with(client_config(pin, None)?, addr, "parley-node")?
        .await
        .map_err(|e| anyhow::anyhow!("node {node}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(
        &mut send,
        &AgentRequest::Enroll {
            token: secret.to_owned(),
            csr_pem,
            name: name.to_owned(),
        },
    )
    .await?;
    let _ = send.finish();
    let body = read_frame(&mut recv)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the node closed the enrolment without an answer"))?;
    conn.close(0u32.into(), b"enrolled");
    let (agent_id, tenant, cert_pem) = match agent::decode::<NodeAnswer>(&body)? {
        NodeAnswer::Enrolled {
            agent_id,
            tenant,
            cert_pem,
        } => (agent_id, tenant, cert_pem),
        NodeAnswer::Refused { code, message } => {
            anyhow::bail!("enrolment refused ({code}): {message}")
        }
        other => anyhow::bail!("unexpected answer: {other:?}"),
    };
    std::fs::create_dir_all(state_dir)?;
    let (_, key_path, cert_path) = state_files(state_dir, 0);
    crate::im::cert::write_private(&key_path, &key.serialize_der())?;
    std::fs::write(&cert_path, &cert_pem)?;
    let state = AgentState {
        agent_id,
        tenant,
        node_pin: hex(&pin),
        generation: 0,
    };
    write_state(state_dir, &state)?;
    Ok(state)
}

struct Identity {
    state: AgentState,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn load_identity(dir: &Path) -> anyhow::Result<Identity> {
    let json = dir.join("agent.json");
    let state: AgentState = serde_json::from_slice(&std::fs::read(&json).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (run `parley auth-agent enroll` first)",
            json.display()
        )
    })?)?;
    let (_, key_path, cert_path) = state_files(dir, state.generation);
    let cert = pem_cert(&std::fs::read_to_string(&cert_path)?)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(std::fs::read(&key_path)?));
    Ok(Identity { state, cert, key })
}

/// Seconds of validity left in a certificate, and its total lifetime.
fn validity(cert: &CertificateDer<'_>) -> Option<(Duration, Duration)> {
    use x509_parser::prelude::FromDer;
    let (_, x) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let nb = x.validity().not_before.timestamp();
    let na = x.validity().not_after.timestamp();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((
        Duration::from_secs(u64::try_from(na - now).unwrap_or(0)),
        Duration::from_secs(u64::try_from(na - nb).unwrap_or(0)),
    ))
}

/// `parley auth-agent run`: serves until killed.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let directory = Arc::new(ldap::Directory::new(cfg.directory.clone())?);
    let limit = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent.max(1)));
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = std::time::Instant::now();
        match session(&cfg, &directory, &limit).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(node = %cfg.node, error = %format!("{e:#}"), "connection to the node failed")
            }
        }
        // A connection that lasted resets the backoff.
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tracing::info!(
            retry_in_ms = (backoff + jitter).as_millis() as u64,
            "reconnecting to the node"
        );
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One connection to the node, until it ends.
async fn session(
    cfg: &AgentConfig,
    directory: &Arc<ldap::Directory>,
    limit: &Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let id = load_identity(&cfg.state_dir)?;
    let pin = parse_fingerprint(&id.state.node_pin)
        .ok_or_else(|| anyhow::anyhow!("agent.json: bad node_pin"))?;
    let addr = resolve(&cfg.node).await?;
    let ep = endpoint(addr)?;
    let conn = ep
        .connect_with(
            client_config(pin, Some((id.cert.clone(), id.key.clone_key())))?,
            addr,
            "parley-node",
        )?
        .await?;
    tracing::info!(node = %cfg.node, tenant = %id.state.tenant, agent = %id.state.agent_id, "connected to the node");

    // Renewal when a quarter of the certificate's validity is left (checked every sixth
    // of it, at most once a minute).
    let renew_conn = conn.clone();
    let state_dir = cfg.state_dir.clone();
    let renewer = tokio::spawn(async move {
        loop {
            let (left, total) = validity(&id.cert).unwrap_or((Duration::MAX, Duration::MAX));
            let every = (total / 6).clamp(Duration::from_secs(1), Duration::from_secs(60));
            if left < total / 4 {
                match renew(&renew_conn, &state_dir).await {
                    Ok(()) => {
                        tracing::info!("certificate renewed; reconnecting with it");
                        renew_conn.close(0u32.into(), b"renewed");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed")
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    });

    let sync_conn = conn.clone();
    let sync_dir = directory.clone();
    let interval = cfg.sync_interval_secs;
    let syncer = tokio::spawn(async move {
        if interval == 0 {
            return;
        }
        loop {
            match sync(&sync_conn, &sync_dir).await {
                Ok((users, refused)) => {
                    tracing::info!(users, numbers_refused = refused, "directory sync sent");
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "directory sync failed"),
            }
            tokio::time::sleep(Duration::from_secs(interval)).await;
        }
    });

    let result = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let directory = directory.clone();
                let permit = limit.clone().try_acquire_owned().ok();
                tokio::spawn(async move {
                    if let Err(e) = answer(send, recv, &directory, permit.is_some()).await {
                        tracing::debug!(error = %e, "request stream failed");
                    }
                    drop(permit);
                });
            }
            Err(e) => break e,
        }
    };
    renewer.abort();
    syncer.abort();
    anyhow::bail!("connection closed: {result}")
}

/// Answers one node request.
async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    directory: &ldap::Directory,
    admitted: bool,
) -> anyhow::Result<()> {
    let Some(body) = read_frame(&mut recv).await? else {
        return Ok(());
    };
    let req: NodeRequest = agent::decode(&body)?;
    let outcome = if !admitted {
        AuthOutcome::Busy
    } else {
        match &req {
            NodeRequest::Authenticate { user, password } => {
                directory.authenticate(user, password).await
            }
            NodeRequest::Check { user } => directory.check(user).await,
        }
    };
    let (kind, user) = match &req {
        NodeRequest::Authenticate { user, .. } => ("login", user),
        NodeRequest::Check { user } => ("check", user),
    };
    tracing::info!(kind, %user, result = outcome_name(&outcome), "request answered");
    write_frame(&mut send, &outcome).await?;
    let _ = send.finish();
    // Take the request's end too: a stream dropped before its FIN was read is stopped
    // (STOP_SENDING), which the node would have to tell apart from a refusal.
    let _ = recv.read_to_end(0).await;
    Ok(())
}

fn outcome_name(o: &AuthOutcome) -> &'static str {
    match o {
        AuthOutcome::Ok { .. } => "ok",
        AuthOutcome::WrongPassword => "wrong_password",
        AuthOutcome::UnknownUser => "unknown_user",
        AuthOutcome::Locked => "locked",
        AuthOutcome::Disabled => "disabled",
        AuthOutcome::Unavailable { .. } => "directory_unavailable",
        AuthOutcome::Busy => "busy",
    }
}

async fn sync(conn: &quinn::Connection, directory: &ldap::Directory) -> anyhow::Result<(u64, u64)> {
    let users = directory.all_users().await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    for page in sync_pages(users) {
        write_frame(&mut send, &page).await?;
    }
    let _ = send.finish();
    let body = read_frame(&mut recv)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no answer to the sync"))?;
    match agent::decode::<NodeAnswer>(&body)? {
        NodeAnswer::Synced {
            users,
            numbers_refused,
        } => Ok((users, numbers_refused)),
        NodeAnswer::Refused { code, message } => anyhow::bail!("sync refused ({code}): {message}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

async fn renew(conn: &quinn::Connection, dir: &Path) -> anyhow::Result<()> {
    let (key, csr_pem) = key_and_csr()?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &AgentRequest::Renew { csr_pem }).await?;
    let _ = send.finish();
    let body = read_frame(&mut recv)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no answer to the renewal"))?;
    let cert_pem = match agent::decode::<NodeAnswer>(&body)? {
        NodeAnswer::Renewed { cert_pem, .. } => cert_pem,
        NodeAnswer::Refused { code, message } => {
            anyhow::bail!("renewal refused ({code}): {message}")
        }
        other => anyhow::bail!("unexpected answer: {other:?}"),
    };
    pem_cert(&cert_pem)?;
    let mut state = load_identity(dir)?.state;
    let old = state.generation;
    state.generation += 1;
    let (_, key_path, cert_path) = state_files(dir, state.generation);
    crate::im::cert::write_private(&key_path, &key.serialize_der())?;
    std::fs::write(&cert_path, &cert_pem)?;
    write_state(dir, &state)?;
    let (_, old_key, old_cert) = state_files(dir, old);
    let _ = std::fs::remove_file(old_key);
    let _ = std::fs::remove_file(old_cert);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_parses() {
        let text = include_str!("../../../auth-agent.example.toml");
        let cfg: AgentConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg.directory.kind, ldap::Kind::ActiveDirectory);
        assert_eq!(cfg.directory.servers.len(), 2);
    }

    #[test]
    fn config_errors_name_the_key_and_the_line() {
        let text = "node = \"x:1\"\nstate_dir = \"/s\"\nbogus = 1\n[directory]\nservers = []\nbind_dn = \"\"\nbase = \"\"\n";
        let e = toml::from_str::<AgentConfig>(text).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
    }
}
