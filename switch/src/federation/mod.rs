//! Federated authentication, the node's side (`docs/auth.md`).
//!
//! A tenant created with `directory: true` has no passwords on the node: its users log in
//! through the tenant's auth agents, processes inside the enterprise network that hold the
//! directory credentials, connect outbound to the node's agent endpoint ([`endpoint`]) over
//! QUIC with mutual TLS, and answer [`NodeRequest`]s by binding to LDAP as the user. This
//! module keeps, per tenant, the agents connected now and sends each login to one of them
//! (round robin; retried on another agent only when the first provably never received it);
//! it issues and redeems enrolment tokens, agent certificates ([`ca`]) and device session
//! tokens, and applies directory syncs to the node's users through a [`UserSink`].
//!
//! What an agent is comes from its certificate alone (fingerprint → agent → tenant, from
//! the store); nothing an agent sends names a tenant, so an agent of one tenant can neither
//! answer for nor learn about another.

pub mod ca;
pub mod endpoint;
pub mod tokens;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use dashmap::DashMap;
use parley_codecs::agent::{self, AuthOutcome, DirectoryUser, NodeRequest};
use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;

use crate::metrics as m;
use crate::store::Store;
use crate::store::tenants::{AgentRow, DirectoryUserRow, TenantRow, TokenUse, directory_row};

/// SHA-256 of a certificate's DER.
pub type Fingerprint = [u8; 32];

/// The fingerprint of a certificate.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a hex fingerprint.
pub fn parse_fingerprint(s: &str) -> Option<Fingerprint> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The first certificate of a PEM text.
pub fn pem_cert(pem: &str) -> anyhow::Result<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("bad certificate PEM: {e}"))
}

/// Settings (`[federation]`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a login waits for an agent's answer.
    pub request_timeout: Duration,
    /// Logins of one tenant in progress at once; more are refused `directory_busy`.
    pub max_pending_per_tenant: usize,
    /// After a tenant's last agent went away, how long devices may still reconnect with
    /// a session token (existing sessions are never cut for it).
    pub no_agent_grace: Duration,
    /// Validity of the certificates issued to agents.
    pub agent_cert_lifetime: Duration,
    /// Validity of device session tokens.
    pub session_token_lifetime: Duration,
    /// Most users one tenant's directory may list.
    pub max_directory_users: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            max_pending_per_tenant: 256,
            no_agent_grace: Duration::from_secs(300),
            agent_cert_lifetime: Duration::from_secs(30 * 86_400),
            session_token_lifetime: Duration::from_secs(12 * 3600),
            max_directory_users: 100_000,
        }
    }
}

/// Why a login was refused. Each has its own device error code and metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginFailure {
    /// The directory refused the password.
    WrongPassword,
    /// The directory has no such user.
    UnknownUser,
    /// The account is locked.
    Locked,
    /// The account is disabled.
    Disabled,
    /// The agent reached no directory server.
    DirectoryUnavailable(String),
    /// The tenant has no agent connected.
    NoAgent,
    /// The agent did not answer in time.
    Timeout,
    /// Too many logins of the tenant in progress, or every agent busy.
    Busy,
    /// A session token that is unknown, expired, or was ended by the directory.
    BadToken,
    /// Built-in store: unknown tenant or user, or wrong password.
    Denied,
    /// Built-in store: the database failed.
    StoreUnavailable,
}

impl LoginFailure {
    /// The `error` code sent to the device. Wrong password and unknown user share one, so
    /// that a login does not tell which users exist.
    pub fn code(&self) -> &'static str {
        match self {
            Self::WrongPassword
            | Self::UnknownUser
            | Self::BadToken
            | Self::Denied
            | Self::StoreUnavailable => "auth_failed",
            Self::Locked => "account_locked",
            Self::Disabled => "account_disabled",
            Self::DirectoryUnavailable(_) => "directory_unavailable",
            Self::NoAgent => "no_agent",
            Self::Timeout => "directory_timeout",
            Self::Busy => "directory_busy",
        }
    }

    /// The `result` label of `parley_auth_results_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Self::WrongPassword => "wrong_password",
            Self::UnknownUser => "unknown_user",
            Self::Locked => "locked",
            Self::Disabled => "disabled",
            Self::DirectoryUnavailable(_) => "directory_unavailable",
            Self::NoAgent => "no_agent",
            Self::Timeout => "timeout",
            Self::Busy => "busy",
            Self::BadToken => "bad_token",
            Self::Denied => "denied",
            Self::StoreUnavailable => "error",
        }
    }

    /// For the device.
    pub fn message(&self) -> String {
        match self {
            Self::WrongPassword | Self::UnknownUser | Self::Denied => {
                "bad tenant, user or password".into()
            }
            Self::StoreUnavailable => "user store unavailable".into(),
            Self::BadToken => {
                "session token unknown, expired or ended; log in with the password".into()
            }
            Self::Locked => "the directory says this account is locked".into(),
            Self::Disabled => "the directory says this account is disabled".into(),
            Self::DirectoryUnavailable(_) => {
                "your organisation's directory cannot be reached; try again later".into()
            }
            Self::NoAgent => "no authentication agent of your organisation is connected".into(),
            Self::Timeout => "your organisation's directory did not answer in time".into(),
            Self::Busy => "too many logins in progress for your organisation; retry".into(),
        }
    }

    /// Whether it counts toward login throttling (a guess that may be brute force).
    pub fn is_guess(&self) -> bool {
        matches!(
            self,
            Self::WrongPassword | Self::UnknownUser | Self::BadToken | Self::Denied
        )
    }
}

/// Who logged in through a directory.
#[derive(Debug, Clone)]
pub struct DirectoryLogin {
    /// The user as the node now keeps them.
    pub row: DirectoryUserRow,
    /// The password stamp at login (session tokens end when it changes).
    pub stamp: Option<String>,
}

/// Where directory users become node users (the registry and its user actors; see
/// `node.rs`). Called on the actix arbiter.
pub trait UserSink: Send + Sync {
    /// Adds or updates a user; returns the numbers not taken because another user
    /// already has them.
    fn upsert(&self, user: &DirectoryUserRow) -> Vec<String>;
    /// Removes the directory users of `tenant` not in `keep`.
    fn retain(&self, tenant: &str, keep: &std::collections::HashSet<String>);
    /// Sets the federation rules (one-sided allowances).
    fn set_federation(&self, pairs: &[(String, String)]);
}

/// An agent connected now.
#[derive(Debug, Clone)]
struct LiveAgent {
    id: String,
    conn: quinn::Connection,
    /// When it last answered a request (or connected).
    last_answer: Arc<std::sync::Mutex<Instant>>,
}

/// A tenant and its agents.
#[derive(Debug)]
pub struct Tenant {
    /// Name, region, kind.
    pub row: TenantRow,
    agents: std::sync::Mutex<Vec<LiveAgent>>,
    next: AtomicUsize,
    pending: AtomicUsize,
    /// When the last agent left (or the node started, before any came).
    alone_since: std::sync::Mutex<Option<Instant>>,
}

impl Tenant {
    fn new(row: TenantRow) -> Self {
        Self {
            row,
            agents: std::sync::Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            alone_since: std::sync::Mutex::new(Some(Instant::now())),
        }
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, Vec<LiveAgent>> {
        self.agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Agents connected now.
    pub fn connected(&self) -> usize {
        self.agents().len()
    }

    /// The connected agents, starting at the next in round-robin order.
    fn rotation(&self) -> Vec<LiveAgent> {
        let agents = self.agents();
        if agents.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % agents.len();
        agents[start..]
            .iter()
            .chain(agents[..start].iter())
            .cloned()
            .collect()
    }

    fn within_grace(&self, grace: Duration) -> bool {
        if self.connected() > 0 {
            return true;
        }
        let since = self
            .alone_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        since.is_none_or(|t| t.elapsed() < grace)
    }
}

/// An agent certificate the node accepts.
#[derive(Debug, Clone)]
pub struct CertEntry {
    /// The agent.
    pub agent_id: String,
    /// Its tenant.
    pub tenant: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// How an exchange with one agent went.
#[derive(Debug)]
enum Exchange {
    Answer(AuthOutcome),
    /// The agent never received the request: another may be asked.
    NotDelivered(String),
    /// Received but not answered in time (or the connection died after delivery): not
    /// retried, the agent may have bound to the directory already.
    TimedOut,
}

/// Live device sessions of directory users: (tenant, user) → (session id, its closer).
type LiveSessions = HashMap<(String, String), Vec<(u64, Arc<Notify>)>>;

/// The node's federation state.
pub struct Federation {
    settings: Settings,
    store: Store,
    ca: ca::AgentCa,
    /// Hex SHA-256 of the node's certificate, part of every enrolment token.
    node_pin: String,
    tenants: DashMap<String, Arc<Tenant>>,
    certs: Arc<DashMap<Fingerprint, CertEntry>>,
    tokens: std::sync::Mutex<tokens::SessionTokens>,
    sessions: std::sync::Mutex<LiveSessions>,
    users: Arc<dyn UserSink>,
    /// Directory users per tenant (from syncs and logins) with their password stamps.
    stamps: DashMap<(String, String), Option<String>>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("tenants", &self.tenants.len())
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// Loads tenants and agent certificates from the store.
    pub async fn load(
        settings: Settings,
        store: Store,
        ca: ca::AgentCa,
        node_cert: &CertificateDer<'_>,
        users: Arc<dyn UserSink>,
    ) -> anyhow::Result<Arc<Self>> {
        let fed = Self {
            tokens: std::sync::Mutex::new(tokens::SessionTokens::new(
                settings.session_token_lifetime,
            )),
            settings,
            ca,
            node_pin: hex(&fingerprint(node_cert)),
            tenants: DashMap::new(),
            certs: Arc::new(DashMap::new()),
            sessions: std::sync::Mutex::new(HashMap::new()),
            users,
            stamps: DashMap::new(),
            store,
        };
        for t in fed.store.tenants().await? {
            fed.tenants.insert(t.name.clone(), Arc::new(Tenant::new(t)));
        }
        fed.reload_certs().await?;
        fed.publish_agent_gauges();
        fed.users.set_federation(&fed.store.federation().await?);
        Ok(Arc::new(fed))
    }

    async fn reload_certs(&self) -> anyhow::Result<()> {
        let rows = self.store.agent_certs().await?;
        self.certs.clear();
        for r in rows.into_iter().filter(|r| !r.revoked) {
            if let Some(fp) = parse_fingerprint(&r.fingerprint) {
                let not_after = SystemTime::UNIX_EPOCH
                    + Duration::from_millis(u64::try_from(r.not_after_ms).unwrap_or(0));
                self.certs.insert(
                    fp,
                    CertEntry {
                        agent_id: r.agent_id,
                        tenant: r.tenant,
                        not_after,
                    },
                );
            }
        }
        Ok(())
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The certificates accepted now (the endpoint's client verifier reads it).
    pub fn accepted_certs(&self) -> Arc<DashMap<Fingerprint, CertEntry>> {
        self.certs.clone()
    }

    /// The agent CA.
    pub fn ca(&self) -> &ca::AgentCa {
        &self.ca
    }

    /// A tenant by name.
    pub fn tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.tenants.get(name).map(|t| t.clone())
    }

    /// The tenant if its users authenticate through agents.
    pub fn directory_tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.tenant(name).filter(|t| t.row.directory)
    }

    /// Every tenant with its connected agent count.
    pub fn tenants(&self) -> Vec<(TenantRow, usize)> {
        let mut out: Vec<_> = self
            .tenants
            .iter()
            .map(|t| (t.row.clone(), t.connected()))
            .collect();
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }

    /// Creates (or updates) a tenant.
    pub async fn upsert_tenant(&self, row: TenantRow) -> anyhow::Result<()> {
        self.store.upsert_tenant(&row).await?;
        match self.tenants.get(&row.name) {
            Some(t) if t.row == row => {}
            Some(t) => {
                // Keep its live agents; only the row changes.
                let fresh = Tenant::new(row.clone());
                *fresh.agents() = t.agents().clone();
                drop(t);
                self.tenants.insert(row.name.clone(), Arc::new(fresh));
            }
            None => {
                self.tenants
                    .insert(row.name.clone(), Arc::new(Tenant::new(row)));
            }
        }
        Ok(())
    }

    /// Sets the tenants `tenant` allows its users to reach.
    pub async fn set_federation(&self, tenant: &str, peers: &[String]) -> anyhow::Result<()> {
        self.store.set_federation(tenant, peers).await?;
        self.users.set_federation(&self.store.federation().await?);
        Ok(())
    }

    /// A new enrolment token for `tenant`: `<secret>.<node pin>`. Only its hash is stored.
    pub async fn enrolment_token(
        &self,
        tenant: &str,
        lifetime: Duration,
    ) -> anyhow::Result<(String, SystemTime)> {
        let secret = crate::sip_token(32);
        let expires = SystemTime::now() + lifetime;
        self.store
            .add_enrolment_token(&token_hash(&secret), tenant, expires)
            .await?;
        Ok((format!("{secret}.{}", self.node_pin), expires))
    }

    /// Enrols an agent: redeems the token and issues its certificate.
    pub async fn enroll(
        &self,
        secret: &str,
        csr_pem: &str,
        name: &str,
    ) -> Result<(AgentRow, ca::Issued), (&'static str, String)> {
        let tenant = match self.store.redeem_enrolment_token(&token_hash(secret)).await {
            Ok(TokenUse::Tenant(t)) => t,
            Ok(TokenUse::Refused) => {
                return Err((
                    "bad_token",
                    "enrolment token unknown, expired or used".into(),
                ));
            }
            Err(e) => return Err(("store", e.to_string())),
        };
        let agent = AgentRow {
            id: format!("agent-{}", crate::sip_token(12).to_lowercase()),
            tenant: tenant.clone(),
            name: name.chars().take(64).collect(),
            revoked: false,
            enrolled_ms: i64::try_from(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(0),
        };
        let issued = self
            .ca
            .issue(
                csr_pem,
                &tenant,
                &agent.id,
                self.settings.agent_cert_lifetime,
            )
            .map_err(|e| ("bad_csr", e.to_string()))?;
        self.store
            .add_agent(&agent, &hex(&issued.fingerprint), issued.not_after)
            .await
            .map_err(|e| ("store", e.to_string()))?;
        self.certs.insert(
            issued.fingerprint,
            CertEntry {
                agent_id: agent.id.clone(),
                tenant,
                not_after: issued.not_after,
            },
        );
        Ok((agent, issued))
    }

    /// Issues a renewed certificate to a connected agent.
    pub async fn renew(&self, who: &CertEntry, csr_pem: &str) -> anyhow::Result<ca::Issued> {
        let issued = self.ca.issue(
            csr_pem,
            &who.tenant,
            &who.agent_id,
            self.settings.agent_cert_lifetime,
        )?;
        self.store
            .add_agent_cert(&who.agent_id, &hex(&issued.fingerprint), issued.not_after)
            .await?;
        self.certs.insert(
            issued.fingerprint,
            CertEntry {
                agent_id: who.agent_id.clone(),
                tenant: who.tenant.clone(),
                not_after: issued.not_after,
            },
        );
        Ok(issued)
    }

    /// Revokes an agent: refused at every later handshake, its connections closed now.
    /// `false` when there is no such agent.
    pub async fn revoke(&self, agent_id: &str) -> anyhow::Result<bool> {
        if !self.store.revoke_agent(agent_id).await? {
            return Ok(false);
        }
        self.certs.retain(|_, e| e.agent_id != agent_id);
        for t in self.tenants.iter() {
            let mut agents = t.agents();
            agents.retain(|a| {
                if a.id == agent_id {
                    a.conn.close(3u32.into(), b"revoked");
                    false
                } else {
                    true
                }
            });
        }
        self.publish_agent_gauges();
        tracing::warn!(agent = agent_id, "auth agent revoked");
        Ok(true)
    }

    /// Agents of a tenant (or all), with whether each is connected now.
    pub async fn agents(&self, tenant: Option<&str>) -> anyhow::Result<Vec<(AgentRow, bool)>> {
        let rows = self.store.agents(tenant).await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let live = self
                    .tenant(&r.tenant)
                    .is_some_and(|t| t.agents().iter().any(|a| a.id == r.id));
                (r, live)
            })
            .collect())
    }

    /// An authenticated agent connected.
    pub fn agent_connected(&self, who: &CertEntry, conn: quinn::Connection) {
        let Some(t) = self.tenant(&who.tenant) else {
            conn.close(4u32.into(), b"unknown tenant");
            return;
        };
        t.agents().push(LiveAgent {
            id: who.agent_id.clone(),
            conn,
            last_answer: Arc::new(std::sync::Mutex::new(Instant::now())),
        });
        *t.alone_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.publish_agent_gauges();
    }

    /// An agent's connection ended.
    pub fn agent_disconnected(&self, who: &CertEntry, conn: &quinn::Connection) {
        let Some(t) = self.tenant(&who.tenant) else {
            return;
        };
        let mut agents = t.agents();
        agents.retain(|a| a.conn.stable_id() != conn.stable_id());
        if agents.is_empty() {
            *t.alone_since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        }
        drop(agents);
        self.publish_agent_gauges();
    }

    fn publish_agent_gauges(&self) {
        for t in self.tenants.iter().filter(|t| t.row.directory) {
            metrics::gauge!(m::AUTH_AGENTS_CONNECTED, "tenant" => t.row.name.clone())
                .set(t.connected() as f64);
        }
    }

    /// Authenticates a password login of a directory tenant's user through an agent.
    pub async fn login(
        &self,
        tenant: &Tenant,
        user: &str,
        password: &str,
    ) -> Result<DirectoryLogin, LoginFailure> {
        // An empty password is an LDAP "unauthenticated bind", which succeeds: never ask.
        if password.is_empty() {
            return Err(LoginFailure::WrongPassword);
        }
        let req = NodeRequest::Authenticate {
            user: user.to_owned(),
            password: password.to_owned(),
        };
        let profile = self.ask(tenant, &req).await?;
        self.learn(tenant, profile).await
    }

    /// Redeems a session token; for a directory tenant the agent confirms the account is
    /// still in good standing with the same password stamp (no agent: accepted within
    /// the grace period).
    pub async fn redeem(
        &self,
        tenant_name: &str,
        user: &str,
        token: &str,
    ) -> Result<Option<DirectoryLogin>, LoginFailure> {
        let entry = self
            .tokens()
            .redeem(tenant_name, user, token)
            .ok_or(LoginFailure::BadToken)?;
        let Some(tenant) = self.directory_tenant(tenant_name) else {
            return Ok(None);
        };
        let req = NodeRequest::Check {
            user: user.to_owned(),
        };
        match self.ask(&tenant, &req).await {
            Ok(profile) => {
                if profile.password_stamp != entry.stamp {
                    self.end_user(tenant_name, user, false);
                    return Err(LoginFailure::BadToken);
                }
                self.learn(&tenant, profile).await.map(Some)
            }
            Err(LoginFailure::NoAgent) if tenant.within_grace(self.settings.no_agent_grace) => {
                Ok(None)
            }
            Err(
                f @ (LoginFailure::UnknownUser | LoginFailure::Locked | LoginFailure::Disabled),
            ) => {
                self.end_user(tenant_name, user, false);
                Err(if f == LoginFailure::UnknownUser {
                    LoginFailure::BadToken
                } else {
                    f
                })
            }
            Err(f) => Err(f),
        }
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, tokens::SessionTokens> {
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Issues a session token for a user who just logged in.
    pub fn issue_token(&self, tenant: &str, user: &str, stamp: Option<String>) -> String {
        self.tokens().issue(tenant, user, stamp)
    }

    /// Ends a user's session tokens and, with `sessions`, their live device sessions.
    pub fn end_user(&self, tenant: &str, user: &str, sessions: bool) {
        self.tokens().revoke_user(tenant, user);
        if sessions {
            let live = self
                .sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&(tenant.to_owned(), user.to_owned()))
                .unwrap_or_default();
            for (id, close) in live {
                tracing::info!(%tenant, %user, session = id, "directory ended the account: closing the device session");
                close.notify_one();
            }
        }
    }

    /// Tracks a live device session of a directory user (closed if the directory locks,
    /// disables or removes the account); untracked when the guard drops.
    pub fn track_session(
        self: &Arc<Self>,
        tenant: &str,
        user: &str,
        id: u64,
        close: Arc<Notify>,
    ) -> SessionGuard {
        let key = (tenant.to_owned(), user.to_owned());
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .push((id, close));
        SessionGuard {
            fed: self.clone(),
            key,
            id,
        }
    }

    /// Sends a request to one of the tenant's agents and maps its answer.
    async fn ask(&self, tenant: &Tenant, req: &NodeRequest) -> Result<DirectoryUser, LoginFailure> {
        let pending = tenant.pending.fetch_add(1, Ordering::AcqRel);
        let _pending = PendingGuard(&tenant.pending);
        if pending >= self.settings.max_pending_per_tenant {
            return Err(LoginFailure::Busy);
        }
        let agents = tenant.rotation();
        if agents.is_empty() {
            return Err(LoginFailure::NoAgent);
        }
        let started = Instant::now();
        let deadline = started + self.settings.request_timeout;
        let mut busy = false;
        // An agent that has not acknowledged a request by then is taken for dead.
        let ack_wait = (self.settings.request_timeout / 4).max(Duration::from_millis(250));
        for (i, a) in agents.iter().enumerate() {
            let last_answer = || {
                *a.last_answer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            // Busy, not dead: it answered other requests while this one waited.
            let alive = || last_answer().elapsed() < ack_wait;
            // The last agent to try has nobody to hand the request to: while it keeps
            // answering others, this request waits for it until the deadline.
            let last = i + 1 == agents.len();
            let outcome = exchange(&a.conn, req, deadline, ack_wait, || last && alive()).await;
            metrics::histogram!(m::AUTH_AGENT_REQUEST_SECONDS, "tenant" => tenant.row.name.clone())
                .record(started.elapsed().as_secs_f64());
            if matches!(outcome, Exchange::Answer(_)) {
                *a.last_answer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
            }
            match outcome {
                Exchange::Answer(AuthOutcome::Busy) => busy = true,
                Exchange::Answer(AuthOutcome::Ok { profile }) => return Ok(profile),
                Exchange::Answer(AuthOutcome::WrongPassword) => {
                    return Err(LoginFailure::WrongPassword);
                }
                Exchange::Answer(AuthOutcome::UnknownUser) => {
                    return Err(LoginFailure::UnknownUser);
                }
                Exchange::Answer(AuthOutcome::Locked) => return Err(LoginFailure::Locked),
                Exchange::Answer(AuthOutcome::Disabled) => return Err(LoginFailure::Disabled),
                Exchange::Answer(AuthOutcome::Unavailable { reason }) => {
                    tracing::warn!(tenant = %tenant.row.name, agent = %a.id, %reason, "agent reached no directory server");
                    return Err(LoginFailure::DirectoryUnavailable(reason));
                }
                Exchange::NotDelivered(why) if a.conn.close_reason().is_none() && alive() => {
                    // It answered others lately: busy, not dead. Its connection (and the
                    // requests on it) stay; this one goes to the next agent.
                    tracing::info!(tenant = %tenant.row.name, agent = %a.id, %why, "agent slow to take the request; trying the next");
                }
                Exchange::NotDelivered(why) => {
                    tracing::warn!(tenant = %tenant.row.name, agent = %a.id, %why, "agent did not receive the request and answered nothing meanwhile; closing its connection and trying the next");
                    // Dead or hung (SIGKILL leaves the connection to the idle timeout): out
                    // of the rotation now; a live agent reconnects at once.
                    a.conn.close(5u32.into(), b"unresponsive");
                    tenant
                        .agents()
                        .retain(|x| x.conn.stable_id() != a.conn.stable_id());
                    self.publish_agent_gauges();
                }
                Exchange::TimedOut => {
                    tracing::warn!(tenant = %tenant.row.name, agent = %a.id, "agent did not answer in time");
                    return Err(LoginFailure::Timeout);
                }
            }
            if Instant::now() >= deadline {
                return Err(LoginFailure::Timeout);
            }
        }
        Err(if busy {
            LoginFailure::Busy
        } else {
            LoginFailure::NoAgent
        })
    }

    /// Makes a directory user a node user (store, registry) from a login or check.
    async fn learn(
        &self,
        tenant: &Tenant,
        mut profile: DirectoryUser,
    ) -> Result<DirectoryLogin, LoginFailure> {
        if !profile.bound() {
            return Err(LoginFailure::UnknownUser);
        }
        let row = directory_row(&tenant.row, &profile);
        if let Err(e) = self.store.upsert_directory_user(&row).await {
            tracing::error!(error = %e, "storing a directory user failed");
        }
        let refused = self.users.upsert(&row);
        if !refused.is_empty() {
            tracing::warn!(tenant = %row.tenant, user = %row.user, numbers = ?refused, "directory numbers already belong to another user; not routed to this one");
        }
        self.stamps.insert(
            (row.tenant.clone(), row.user.clone()),
            profile.password_stamp.clone(),
        );
        Ok(DirectoryLogin {
            row,
            stamp: profile.password_stamp,
        })
    }

    /// Applies a directory sync of `tenant` (from one of its agents): the listed users are
    /// the tenant's directory users from now on. Returns (users, numbers refused).
    pub async fn apply_sync(
        &self,
        tenant_name: &str,
        users: Vec<DirectoryUser>,
    ) -> anyhow::Result<(u64, u64)> {
        let Some(tenant) = self.directory_tenant(tenant_name) else {
            anyhow::bail!("tenant {tenant_name} does not use a directory");
        };
        if users.len() > self.settings.max_directory_users {
            anyhow::bail!(
                "{} users is over federation.max_directory_users ({})",
                users.len(),
                self.settings.max_directory_users
            );
        }
        let mut rows = Vec::with_capacity(users.len());
        let mut keep = std::collections::HashSet::new();
        let mut refused = 0u64;
        for mut u in users {
            if !u.bound() || !keep.insert(u.user.clone()) {
                continue;
            }
            let key = (tenant_name.to_owned(), u.user.clone());
            if u.state != agent::AccountState::Active {
                self.end_user(tenant_name, &u.user, true);
            } else if let Some(old) = self.stamps.get(&key).map(|s| s.clone())
                && old != u.password_stamp
            {
                // A password change ends the tokens issued before it.
                self.tokens().revoke_user(tenant_name, &u.user);
            }
            self.stamps.insert(key, u.password_stamp.clone());
            let row = directory_row(&tenant.row, &u);
            refused += self.users.upsert(&row).len() as u64;
            rows.push(row);
        }
        // Users gone from the directory lose their sessions and tokens.
        let gone: Vec<String> = self
            .stamps
            .iter()
            .filter(|e| e.key().0 == tenant_name && !keep.contains(&e.key().1))
            .map(|e| e.key().1.clone())
            .collect();
        for u in gone {
            self.stamps.remove(&(tenant_name.to_owned(), u.clone()));
            self.end_user(tenant_name, &u, true);
        }
        self.users.retain(tenant_name, &keep);
        self.store
            .replace_directory_users(tenant_name, &rows)
            .await?;
        metrics::gauge!(m::DIRECTORY_USERS, "tenant" => tenant_name.to_owned())
            .set(rows.len() as f64);
        metrics::gauge!(m::DIRECTORY_NUMBERS_REFUSED, "tenant" => tenant_name.to_owned())
            .set(refused as f64);
        Ok((rows.len() as u64, refused))
    }
}

impl Tenant {
    /// Whether the tenant's logins go through agents.
    pub fn is_directory(&self) -> bool {
        self.row.directory
    }
}

/// Untracks a device session when dropped.
pub struct SessionGuard {
    fed: Arc<Federation>,
    key: (String, String),
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut sessions = self
            .fed
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(list) = sessions.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                sessions.remove(&self.key);
            }
        }
    }
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// SHA-256 of an enrolment token's secret, hex.
fn token_hash(secret: &str) -> String {
    hex(&fingerprint(secret.as_bytes()))
}

/// One request on its own stream: written and finished; delivered once the agent's QUIC
/// stack acknowledged the whole stream or the agent stopped it (`stopped()`, within `ack_wait`, or
/// until `deadline` when `keep_waiting()` says so then); then the answer, until
/// `deadline`.
async fn exchange(
    conn: &quinn::Connection,
    req: &NodeRequest,
    deadline: Instant,
    ack_wait: Duration,
    keep_waiting: impl Fn() -> bool,
) -> Exchange {
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let mut buf = BytesMut::new();
    if let Err(e) = agent::encode(req, &mut buf) {
        return Exchange::NotDelivered(e.to_string());
    }
    let opened = tokio::time::timeout(remaining(), conn.open_bi()).await;
    let (mut send, mut recv) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Exchange::NotDelivered(e.to_string()),
        Err(_) => return Exchange::NotDelivered("no stream credit in time".into()),
    };
    if let Err(e) = send.write_all(&buf).await {
        return Exchange::NotDelivered(e.to_string());
    }
    let _ = send.finish();
    let mut acked = tokio::time::timeout(remaining().min(ack_wait), send.stopped()).await;
    if acked.is_err() && keep_waiting() {
        acked = tokio::time::timeout(remaining(), send.stopped()).await;
    }
    match acked {
        // Stopped by the agent: its application had the stream (an agent that read the
        // request and answered before our acknowledgement came drops it with code 0), so
        // the request was delivered: read the answer, never retry it elsewhere.
        Ok(Ok(None | Some(_))) => {}
        Ok(Err(e)) => return Exchange::NotDelivered(e.to_string()),
        Err(_) => return Exchange::NotDelivered("not acknowledged in time".into()),
    }
    match tokio::time::timeout(remaining(), endpoint::read_frame(&mut recv)).await {
        Ok(Ok(Some(body))) => match agent::decode::<AuthOutcome>(&body) {
            Ok(o) => Exchange::Answer(o),
            Err(e) => Exchange::Answer(AuthOutcome::Unavailable {
                reason: format!("agent answered nonsense: {e}"),
            }),
        },
        Ok(Ok(None) | Err(_)) | Err(_) => Exchange::TimedOut,
    }
}
