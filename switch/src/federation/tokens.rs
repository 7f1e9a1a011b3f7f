//! Device session tokens: a device that logged in with its password may reconnect with
//! the token from `login_ok` instead, until it expires or the directory ends it.
//!
//! Kept in memory only, as SHA-256 hashes (a restart ends them all: devices then send the
//! password once more). Bounded: at most [`PER_USER`] per user (the oldest goes) and
//! [`TOTAL`] in all (expired ones are swept first; beyond that no token is issued).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Tokens one user holds at most.
pub const PER_USER: usize = 8;
/// Tokens the node holds at most.
pub const TOTAL: usize = 200_000;

/// What a token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// Tenant.
    pub tenant: String,
    /// User.
    pub user: String,
    /// The directory's password stamp when it was issued.
    pub stamp: Option<String>,
    expires: Instant,
}

/// The tokens.
#[derive(Debug)]
pub struct SessionTokens {
    lifetime: Duration,
    by_hash: HashMap<[u8; 32], TokenEntry>,
    by_user: HashMap<(String, String), VecDeque<[u8; 32]>>,
}

impl SessionTokens {
    /// Tokens valid for `lifetime`.
    pub fn new(lifetime: Duration) -> Self {
        Self {
            lifetime,
            by_hash: HashMap::new(),
            by_user: HashMap::new(),
        }
    }

    /// A new token for a user (empty when the node holds [`TOTAL`] live ones).
    pub fn issue(&mut self, tenant: &str, user: &str, stamp: Option<String>) -> String {
        if self.by_hash.len() >= TOTAL {
            self.sweep();
            if self.by_hash.len() >= TOTAL {
                return String::new();
            }
        }
        let token = crate::sip_token(40);
        let hash = super::fingerprint(token.as_bytes());
        let key = (tenant.to_owned(), user.to_owned());
        let list = self.by_user.entry(key).or_default();
        while list.len() >= PER_USER {
            if let Some(old) = list.pop_front() {
                self.by_hash.remove(&old);
            }
        }
        list.push_back(hash);
        self.by_hash.insert(
            hash,
            TokenEntry {
                tenant: tenant.to_owned(),
                user: user.to_owned(),
                stamp,
                expires: Instant::now() + self.lifetime,
            },
        );
        token
    }

    /// The entry of a live token of this user (a token of someone else is no token).
    pub fn redeem(&mut self, tenant: &str, user: &str, token: &str) -> Option<TokenEntry> {
        let hash = super::fingerprint(token.as_bytes());
        let e = self.by_hash.get(&hash)?;
        if e.tenant != tenant || e.user != user {
            return None;
        }
        if e.expires <= Instant::now() {
            self.remove(&hash);
            return None;
        }
        Some(e.clone())
    }

    /// Ends every token of a user.
    pub fn revoke_user(&mut self, tenant: &str, user: &str) {
        if let Some(list) = self.by_user.remove(&(tenant.to_owned(), user.to_owned())) {
            for h in list {
                self.by_hash.remove(&h);
            }
        }
    }

    fn remove(&mut self, hash: &[u8; 32]) {
        if let Some(e) = self.by_hash.remove(hash) {
            let key = (e.tenant, e.user);
            if let Some(list) = self.by_user.get_mut(&key) {
                list.retain(|h| h != hash);
                if list.is_empty() {
                    self.by_user.remove(&key);
                }
            }
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let dead: Vec<[u8; 32]> = self
            .by_hash
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(h, _)| *h)
            .collect();
        for h in dead {
            self.remove(&h);
        }
    }

    /// Live tokens.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_belong_to_their_user_and_are_bounded() {
        let mut t = SessionTokens::new(Duration::from_secs(60));
        let a = t.issue("acme", "alice", Some("s1".into()));
        assert_eq!(
            t.redeem("acme", "alice", &a).unwrap().stamp.as_deref(),
            Some("s1")
        );
        assert!(t.redeem("acme", "bob", &a).is_none());
        assert!(t.redeem("globex", "alice", &a).is_none());
        assert!(t.redeem("acme", "alice", "guess").is_none());
        for _ in 0..PER_USER {
            t.issue("acme", "alice", None);
        }
        assert_eq!(t.len(), PER_USER);
        assert!(t.redeem("acme", "alice", &a).is_none(), "the oldest went");
        t.revoke_user("acme", "alice");
        assert!(t.is_empty());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let mut t = SessionTokens::new(Duration::ZERO);
        let a = t.issue("acme", "alice", None);
        assert!(t.redeem("acme", "alice", &a).is_none());
        assert!(t.is_empty());
    }
}
