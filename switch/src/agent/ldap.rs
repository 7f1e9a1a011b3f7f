//! The agent's directory: LDAP / Active Directory through `ldap3` (async, rustls).
//!
//! `ldap3` is the maintained pure-Rust LDAP client (StartTLS, LDAPS, paged results, filter
//! escaping); it has no pooling or failover of its own, so this module adds both: the
//! servers are tried in the configured order, starting from the last one that answered,
//! and one service-bound connection is kept for searches (re-opened when it breaks).
//!
//! A login is a search as the service account (the login name escaped into the filter),
//! then a bind as the entry found, on a connection of its own, with the given password.
//! The password is passed to that bind and dropped; it is never logged or kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use parley_codecs::agent::{AccountState, AuthOutcome, DirectoryUser};
use serde::Deserialize;

/// Which directory flavour the defaults follow.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// OpenLDAP / generic LDAP (`inetOrgPerson`, `uid`, ppolicy).
    #[default]
    Openldap,
    /// Active Directory (`sAMAccountName`, `userAccountControl`, `lockoutTime`).
    ActiveDirectory,
}

/// Attribute mapping (`[directory.attributes]`); unset keys take the kind's defaults.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Attributes {
    /// Login name (`uid`; AD: `sAMAccountName`).
    pub user: Option<String>,
    /// Display name (`cn`; AD: `displayName`).
    pub display_name: Option<String>,
    /// Office telephone numbers (`telephoneNumber`).
    pub telephone: Option<String>,
    /// Mobile number (`mobile`).
    pub mobile: Option<String>,
    /// Mail (`mail`).
    pub mail: Option<String>,
    /// Group membership (`memberOf`).
    pub groups: Option<String>,
    /// Changes with the password (`pwdChangedTime`; AD: `pwdLastSet`).
    pub password_changed: Option<String>,
}

/// The resolved mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    user: String,
    display_name: String,
    telephone: String,
    mobile: String,
    mail: String,
    groups: String,
    password_changed: String,
}

/// `[directory]` of the agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Flavour for the defaults: `openldap` or `active_directory`.
    #[serde(default)]
    pub kind: Kind,
    /// Servers in failover order: `ldap://host:389` or `ldaps://host:636`.
    pub servers: Vec<String>,
    /// Upgrade `ldap://` connections with StartTLS.
    #[serde(default)]
    pub starttls: bool,
    /// PEM file of the CA that signed the directory servers' certificates (LDAPS and
    /// StartTLS); without it the system roots are used.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// DN of the service account the agent searches as.
    pub bind_dn: String,
    /// Its password (prefer `bind_password_file`).
    #[serde(default)]
    pub bind_password: Option<String>,
    /// A file holding the service account's password (first line).
    #[serde(default)]
    pub bind_password_file: Option<std::path::PathBuf>,
    /// Search base.
    pub base: String,
    /// Filter finding one user; `{user}` is replaced by the escaped login name.
    #[serde(default)]
    pub user_filter: Option<String>,
    /// Filter listing every user for the directory sync.
    #[serde(default)]
    pub sync_filter: Option<String>,
    /// Attribute mapping.
    #[serde(default)]
    pub attributes: Attributes,
    /// Timeout of one LDAP connection attempt or operation, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    3000
}

/// Why the directory could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// No configured server could be reached (or each failed).
    #[error("no directory server answered: {0}")]
    Unavailable(String),
}

/// The directory client.
pub struct Directory {
    cfg: DirectoryConfig,
    map: Mapping,
    password: String,
    user_filter: String,
    sync_filter: String,
    settings: LdapConnSettings,
    /// Index of the server that last answered.
    preferred: AtomicUsize,
    /// A service-bound connection for searches.
    service: tokio::sync::Mutex<Option<(usize, Ldap)>>,
    timeout: Duration,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("servers", &self.cfg.servers)
            .finish_non_exhaustive()
    }
}

impl Directory {
    /// Builds the client (reads the password file and CA file; connects lazily).
    pub fn new(cfg: DirectoryConfig) -> anyhow::Result<Self> {
        if cfg.servers.is_empty() {
            anyhow::bail!("directory.servers: at least one server is needed");
        }
        for s in &cfg.servers {
            if !(s.starts_with("ldap://") || s.starts_with("ldaps://")) {
                anyhow::bail!("directory.servers: {s}: must start with ldap:// or ldaps://");
            }
        }
        let password = match (&cfg.bind_password, &cfg.bind_password_file) {
            (_, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    anyhow::anyhow!("directory.bind_password_file {}: {e}", path.display())
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            (Some(p), None) => p.clone(),
            (None, None) => {
                anyhow::bail!("directory: bind_password or bind_password_file is needed")
            }
        };
        let ad = cfg.kind == Kind::ActiveDirectory;
        let pick = |v: &Option<String>, ldap: &str, adv: &str| {
            v.clone()
                .unwrap_or_else(|| if ad { adv } else { ldap }.to_owned())
        };
        let a = &cfg.attributes;
        let map = Mapping {
            user: pick(&a.user, "uid", "sAMAccountName"),
            display_name: pick(&a.display_name, "cn", "displayName"),
            telephone: pick(&a.telephone, "telephoneNumber", "telephoneNumber"),
            mobile: pick(&a.mobile, "mobile", "mobile"),
            mail: pick(&a.mail, "mail", "mail"),
            groups: pick(&a.groups, "memberOf", "memberOf"),
            password_changed: pick(&a.password_changed, "pwdChangedTime", "pwdLastSet"),
        };
        let user_filter = cfg.user_filter.clone().unwrap_or_else(|| {
            if ad {
                "(&(objectClass=user)(sAMAccountName={user}))".into()
            } else {
                "(&(objectClass=inetOrgPerson)(uid={user}))".into()
            }
        });
        if !user_filter.contains("{user}") {
            anyhow::bail!("directory.user_filter: must contain {{user}}");
        }
        let sync_filter = cfg.sync_filter.clone().unwrap_or_else(|| {
            if ad {
                "(objectClass=user)".into()
            } else {
                "(objectClass=inetOrgPerson)".into()
            }
        });
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(timeout)
            .set_starttls(cfg.starttls);
        if let Some(ca) = &cfg.ca_file {
            settings = settings.set_config(Arc::new(tls_config(ca)?));
        }
        Ok(Self {
            map,
            password,
            user_filter,
            sync_filter,
            settings,
            preferred: AtomicUsize::new(0),
            service: tokio::sync::Mutex::new(None),
            timeout,
            cfg,
        })
    }

    /// Connects to server `i` and binds as `dn`.
    async fn connect(&self, i: usize, dn: &str, password: &str) -> Result<Ldap, ldap3::LdapError> {
        let (conn, mut ldap) =
            LdapConnAsync::with_settings(self.settings.clone(), &self.cfg.servers[i]).await?;
        ldap3::drive!(conn);
        ldap.with_timeout(self.timeout)
            .simple_bind(dn, password)
            .await?
            .success()?;
        Ok(ldap)
    }

    /// A service-bound connection, failing over across the servers.
    async fn service(&self) -> Result<(usize, Ldap), DirectoryError> {
        let mut slot = self.service.lock().await;
        if let Some((i, ldap)) = slot.as_mut()
            && !ldap.is_closed()
        {
            return Ok((*i, ldap.clone()));
        }
        let n = self.cfg.servers.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for k in 0..n {
            let i = (first + k) % n;
            match self.connect(i, &self.cfg.bind_dn, &self.password).await {
                Ok(ldap) => {
                    if k > 0 {
                        tracing::warn!(server = %self.cfg.servers[i], "directory failover: using this server");
                    }
                    self.preferred.store(i, Ordering::Relaxed);
                    *slot = Some((i, ldap.clone()));
                    return Ok((i, ldap));
                }
                Err(e) => {
                    tracing::warn!(server = %self.cfg.servers[i], error = %e, "directory server unusable");
                    last = format!("{}: {e}", self.cfg.servers[i]);
                }
            }
        }
        Err(DirectoryError::Unavailable(last))
    }

    fn attrs(&self) -> Vec<String> {
        let m = &self.map;
        let mut v = vec![
            m.user.clone(),
            m.display_name.clone(),
            m.telephone.clone(),
            m.mobile.clone(),
            m.mail.clone(),
            m.groups.clone(),
            m.password_changed.clone(),
        ];
        // Account state: OpenLDAP ppolicy (operational, so asked for by name) and AD.
        v.extend(
            ["pwdAccountLockedTime", "userAccountControl", "lockoutTime"]
                .into_iter()
                .map(String::from),
        );
        v
    }

    /// Searches with the service connection; one retry on a fresh connection (the kept
    /// one may have been closed by the server since).
    async fn search(&self, filter: &str, limit: i32) -> Result<Vec<SearchEntry>, DirectoryError> {
        let mut last = String::new();
        for _ in 0..2 {
            let (i, mut ldap) = self.service().await?;
            let attrs = self.attrs();
            let res = ldap
                .with_timeout(self.timeout)
                .with_search_options(ldap3::SearchOptions::new().sizelimit(limit))
                .search(&self.cfg.base, Scope::Subtree, filter, attrs)
                .await;
            match res {
                // sizeLimitExceeded (4) still carries the entries: more than one match.
                Ok(ldap3::SearchResult(entries, r)) if r.rc == 0 || r.rc == 4 => {
                    return Ok(entries.into_iter().filter_map(construct).collect());
                }
                Ok(ldap3::SearchResult(_, r)) => {
                    last = format!("{}: search: {r}", self.cfg.servers[i]);
                }
                Err(e) => last = format!("{}: search: {e}", self.cfg.servers[i]),
            }
            tracing::warn!(error = %last, "directory search failed; reconnecting");
            *self.service.lock().await = None;
            self.preferred.store(i + 1, Ordering::Relaxed);
        }
        Err(DirectoryError::Unavailable(last))
    }

    /// Verifies a password.
    pub async fn authenticate(&self, user: &str, password: &str) -> AuthOutcome {
        // An empty password makes a bind "unauthenticated", which LDAP servers accept.
        if password.is_empty() {
            return AuthOutcome::WrongPassword;
        }
        let (dn, profile) = match self.find(user).await {
            Ok(Some(found)) => found,
            Ok(None) => return AuthOutcome::UnknownUser,
            Err(DirectoryError::Unavailable(reason)) => return AuthOutcome::Unavailable { reason },
        };
        match profile.state {
            AccountState::Locked => return AuthOutcome::Locked,
            AccountState::Disabled => return AuthOutcome::Disabled,
            AccountState::Active => {}
        }
        // The bind runs on a connection of its own to the server that answered the search.
        let i = self.preferred.load(Ordering::Relaxed) % self.cfg.servers.len();
        match self.connect(i, &dn, password).await {
            Ok(mut ldap) => {
                let _ = ldap.unbind().await;
                AuthOutcome::Ok { profile }
            }
            Err(ldap3::LdapError::LdapResult { result }) if result.rc == 49 => {
                AuthOutcome::WrongPassword
            }
            // AD answers 533 (disabled) / 775 (locked) inside a 49's diagnostic; the entry
            // said active, so these are races with an administrator: refuse alike.
            Err(ldap3::LdapError::LdapResult { result }) => AuthOutcome::Unavailable {
                reason: format!("{}: bind: {result}", self.cfg.servers[i]),
            },
            Err(e) => AuthOutcome::Unavailable {
                reason: format!("{}: bind: {e}", self.cfg.servers[i]),
            },
        }
    }

    /// Whether an account exists and is in good standing (for session tokens).
    pub async fn check(&self, user: &str) -> AuthOutcome {
        match self.find(user).await {
            Ok(Some((_, profile))) => match profile.state {
                AccountState::Locked => AuthOutcome::Locked,
                AccountState::Disabled => AuthOutcome::Disabled,
                AccountState::Active => AuthOutcome::Ok { profile },
            },
            Ok(None) => AuthOutcome::UnknownUser,
            Err(DirectoryError::Unavailable(reason)) => AuthOutcome::Unavailable { reason },
        }
    }

    /// The entry of one login name: `None` when none or several match.
    async fn find(&self, user: &str) -> Result<Option<(String, DirectoryUser)>, DirectoryError> {
        if user.is_empty() || user.len() > parley_codecs::agent::MAX_FIELD_BYTES {
            return Ok(None);
        }
        let filter = self
            .user_filter
            .replace("{user}", &ldap3::ldap_escape(user));
        let mut entries = self.search(&filter, 2).await?;
        if entries.len() != 1 {
            if entries.len() > 1 {
                tracing::warn!(%user, "more than one directory entry matches the login name: refused");
            }
            return Ok(None);
        }
        let e = entries.remove(0);
        let profile = self.profile(&e);
        Ok(Some((e.dn, profile)))
    }

    /// Every user, for the directory sync (paged, 500 entries a page).
    pub async fn all_users(&self) -> Result<Vec<DirectoryUser>, DirectoryError> {
        let mut last = String::new();
        for _ in 0..2 {
            let (i, mut ldap) = self.service().await?;
            let attrs = self.attrs();
            let stream = ldap
                .with_timeout(self.timeout)
                .streaming_search_with(
                    ldap3::adapters::PagedResults::new(500),
                    &self.cfg.base,
                    Scope::Subtree,
                    &self.sync_filter,
                    attrs,
                )
                .await;
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    last = format!("{}: sync search: {e}", self.cfg.servers[i]);
                    *self.service.lock().await = None;
                    continue;
                }
            };
            let mut users = Vec::new();
            let mut failed = None;
            loop {
                match stream.next().await {
                    Ok(Some(re)) => {
                        if let Some(e) = construct(re) {
                            let p = self.profile(&e);
                            if !p.user.is_empty() {
                                users.push(p);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let res = stream.finish().await;
            match failed {
                None if res.rc == 0 => return Ok(users),
                None => last = format!("{}: sync search: {res}", self.cfg.servers[i]),
                Some(e) => last = format!("{}: sync search: {e}", self.cfg.servers[i]),
            }
            *self.service.lock().await = None;
        }
        Err(DirectoryError::Unavailable(last))
    }

    fn profile(&self, e: &SearchEntry) -> DirectoryUser {
        let m = &self.map;
        let first = |a: &str| get(&e.attrs, a).first().cloned();
        let mut numbers: Vec<String> = get(&e.attrs, &m.telephone).to_vec();
        numbers.extend(get(&e.attrs, &m.mobile).iter().cloned());
        let locked = !get(&e.attrs, "pwdAccountLockedTime").is_empty()
            || first("lockoutTime").is_some_and(|v| v.trim() != "0");
        let disabled = first("userAccountControl")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|uac| uac & 0x2 != 0);
        DirectoryUser {
            user: first(&m.user).unwrap_or_default(),
            display_name: first(&m.display_name),
            numbers,
            mail: first(&m.mail),
            groups: get(&e.attrs, &m.groups).to_vec(),
            state: if disabled {
                AccountState::Disabled
            } else if locked {
                AccountState::Locked
            } else {
                AccountState::Active
            },
            password_stamp: first(&m.password_changed),
        }
    }
}

/// Attribute values by case-insensitive name (LDAP attribute names are).
fn get<'a>(attrs: &'a HashMap<String, Vec<String>>, name: &str) -> &'a [String] {
    attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or(&[], |(_, v)| v.as_slice())
}

/// `SearchEntry::construct` panics on BER it cannot parse: such an entry is skipped.
fn construct(re: ldap3::ResultEntry) -> Option<SearchEntry> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| SearchEntry::construct(re)))
        .map_err(|_| tracing::warn!("a directory entry could not be parsed: skipped"))
        .ok()
}

fn tls_config(ca: &std::path::Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .map_err(|e| anyhow::anyhow!("directory.ca_file {}: {e}", ca.display()))?
    {
        roots.add(c.map_err(|e| anyhow::anyhow!("directory.ca_file {}: {e}", ca.display()))?)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}
