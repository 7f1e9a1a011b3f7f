//! Who may try to log in, and how often: failed-login throttling per source address and
//! per user name, and a cap on connections per source that have not logged in yet.
//!
//! Pure and sans-IO: time comes in as an argument. Failed logins drain a token bucket per
//! source IP and one per (tenant, user) — the name as asked, whether or not that user
//! exists, so throttling tells nothing about who exists. An empty bucket refuses further
//! attempts (even with the right password) until it refills; successes cost nothing, so a
//! NAT full of users who type their passwords right is never throttled. Memory is bounded:
//! a bucket that has refilled is forgotten, and past `max_keys` entries the stalest goes.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Limits of a [`LoginGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failed logins from one source address before it is throttled (the bucket size; it
    /// refills at this many per `window`).
    pub failures_per_source: u32,
    /// Failed logins for one user name (any source) before it is throttled.
    pub failures_per_user: u32,
    /// The refill period of both buckets.
    pub window: Duration,
    /// Connections from one source address that have not logged in yet.
    pub pending_per_source: u32,
    /// Connections from all sources that have not logged in yet.
    pub pending_total: u32,
    /// Most buckets of each kind kept.
    pub max_keys: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            failures_per_source: 20,
            failures_per_user: 5,
            window: Duration::from_secs(60),
            pending_per_source: 16,
            pending_total: 1024,
            max_keys: 100_000,
        }
    }
}

/// Why a connection or a login attempt is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failed logins from this source address; retry after this long.
    SourceThrottled(Duration),
    /// Too many failed logins for this user name; retry after this long.
    UserThrottled(Duration),
    /// Too many connections from this address have not logged in yet.
    PendingPerSource,
    /// Too many connections have not logged in yet.
    PendingTotal,
}

impl Refusal {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::SourceThrottled(_) => "source_throttled",
            Refusal::UserThrottled(_) => "user_throttled",
            Refusal::PendingPerSource => "pending_per_source",
            Refusal::PendingTotal => "pending_total",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
#[derive(Debug)]
struct Buckets<K> {
    size: f64,
    window: Duration,
    max_keys: usize,
    map: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(size: u32, window: Duration, max_keys: usize) -> Self {
        Self {
            size: f64::from(size.max(1)),
            window,
            max_keys: max_keys.max(1),
            map: HashMap::new(),
        }
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        let refill = now.saturating_duration_since(b.at).as_secs_f64()
            / self.window.as_secs_f64().max(1e-3)
            * self.size;
        (b.tokens + refill).min(self.size)
    }

    /// `None` when `key` may try; else how long until it may.
    fn blocked(&self, key: &K, now: Instant) -> Option<Duration> {
        let b = self.map.get(key)?;
        let level = self.level(b, now);
        if level >= 1.0 {
            return None;
        }
        let per_token = self.window.as_secs_f64() / self.size;
        Some(Duration::from_secs_f64((1.0 - level) * per_token).max(Duration::from_secs(1)))
    }

    fn take(&mut self, key: &K, now: Instant) {
        let level = match self.map.get(key) {
            Some(b) => self.level(b, now),
            None => self.size,
        };
        if !self.map.contains_key(key) && self.map.len() >= self.max_keys {
            self.make_room(now);
        }
        self.map.insert(
            key.clone(),
            Bucket {
                tokens: (level - 1.0).max(0.0),
                at: now,
            },
        );
    }

    /// Forgets refilled buckets; if none has, the stalest one.
    fn make_room(&mut self, now: Instant) {
        let size = self.size;
        let window = self.window;
        let full = |b: &Bucket| {
            b.tokens
                + now.saturating_duration_since(b.at).as_secs_f64() / window.as_secs_f64().max(1e-3)
                    * size
                >= size
        };
        self.map.retain(|_, b| !full(b));
        if self.map.len() >= self.max_keys
            && let Some(k) = self
                .map
                .iter()
                .min_by_key(|(_, b)| b.at)
                .map(|(k, _)| k.clone())
        {
            self.map.remove(&k);
        }
    }
}

/// Admission of IM logins (see the module docs).
#[derive(Debug)]
pub struct LoginGuard {
    limits: LoginLimits,
    sources: Buckets<IpAddr>,
    users: Buckets<(String, String)>,
    pending: HashMap<IpAddr, u32>,
    pending_total: u32,
}

impl LoginGuard {
    /// A guard with these limits.
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            sources: Buckets::new(limits.failures_per_source, limits.window, limits.max_keys),
            users: Buckets::new(limits.failures_per_user, limits.window, limits.max_keys),
            pending: HashMap::new(),
            pending_total: 0,
            limits,
        }
    }

    /// A connection from `ip` arrives (before its handshake): admitted unless too many
    /// connections from it, or in all, have not logged in. An admitted connection is
    /// counted until [`LoginGuard::handle_settled`].
    pub fn handle_connect(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.pending_total >= self.limits.pending_total {
            return Err(Refusal::PendingTotal);
        }
        let n = self.pending.entry(ip).or_insert(0);
        if *n >= self.limits.pending_per_source {
            return Err(Refusal::PendingPerSource);
        }
        *n += 1;
        self.pending_total += 1;
        Ok(())
    }

    /// A connection admitted by [`LoginGuard::handle_connect`] logged in or went away.
    pub fn handle_settled(&mut self, ip: IpAddr) {
        if let Some(n) = self.pending.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(&ip);
            }
            self.pending_total = self.pending_total.saturating_sub(1);
        }
    }

    /// Whether a login from `ip` as `tenant`/`user` may be tried now.
    pub fn check_login(
        &self,
        now: Instant,
        ip: IpAddr,
        tenant: &str,
        user: &str,
    ) -> Result<(), Refusal> {
        if let Some(after) = self.sources.blocked(&ip, now) {
            return Err(Refusal::SourceThrottled(after));
        }
        if let Some(after) = self
            .users
            .blocked(&(tenant.to_owned(), user.to_owned()), now)
        {
            return Err(Refusal::UserThrottled(after));
        }
        Ok(())
    }

    /// A login attempt failed (unknown tenant or user, or wrong password: all alike).
    pub fn handle_failure(&mut self, now: Instant, ip: IpAddr, tenant: &str, user: &str) {
        self.sources.take(&ip, now);
        self.users.take(&(tenant.to_owned(), user.to_owned()), now);
    }

    /// Buckets held (sources, users), for tests and metrics.
    pub fn tracked(&self) -> (usize, usize) {
        (self.sources.map.len(), self.users.map.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn guard() -> LoginGuard {
        LoginGuard::new(LoginLimits {
            failures_per_source: 4,
            failures_per_user: 2,
            window: Duration::from_secs(60),
            pending_per_source: 2,
            pending_total: 3,
            max_keys: 8,
        })
    }

    #[test]
    fn a_user_name_is_throttled_after_its_failures_whoever_tries_and_whether_or_not_it_exists() {
        let mut g = guard();
        let t0 = Instant::now();
        for (n, name) in [(1, "alice"), (2, "alice")] {
            assert_eq!(g.check_login(t0, ip(n), "demo", name), Ok(()));
            g.handle_failure(t0, ip(n), "demo", name);
        }
        // From a third address, even with the right password: refused, with a retry time.
        assert!(matches!(
            g.check_login(t0, ip(3), "demo", "alice"),
            Err(Refusal::UserThrottled(d)) if d >= Duration::from_secs(1) && d <= Duration::from_secs(30)
        ));
        // The same for a name nobody has.
        g.handle_failure(t0, ip(3), "demo", "nobody");
        g.handle_failure(t0, ip(4), "demo", "nobody");
        assert!(matches!(
            g.check_login(t0, ip(5), "demo", "nobody"),
            Err(Refusal::UserThrottled(_))
        ));
        // Other users are not affected; the bucket refills with time.
        assert_eq!(g.check_login(t0, ip(5), "demo", "bob"), Ok(()));
        assert_eq!(
            g.check_login(t0 + Duration::from_secs(30), ip(5), "demo", "alice"),
            Ok(())
        );
    }

    #[test]
    fn a_source_is_throttled_after_its_failures_over_any_names() {
        let mut g = guard();
        let t0 = Instant::now();
        for name in ["a", "b", "c", "d"] {
            assert_eq!(g.check_login(t0, ip(1), "demo", name), Ok(()));
            g.handle_failure(t0, ip(1), "demo", name);
        }
        assert!(matches!(
            g.check_login(t0, ip(1), "demo", "bob"),
            Err(Refusal::SourceThrottled(_))
        ));
        assert_eq!(g.check_login(t0, ip(2), "demo", "bob"), Ok(()));
        // One token back after a quarter of the window.
        assert_eq!(
            g.check_login(t0 + Duration::from_secs(15), ip(1), "demo", "bob"),
            Ok(())
        );
    }

    #[test]
    fn connections_not_logged_in_are_capped_per_source_and_in_all() {
        let mut g = guard();
        assert_eq!(g.handle_connect(ip(1)), Ok(()));
        assert_eq!(g.handle_connect(ip(1)), Ok(()));
        assert_eq!(g.handle_connect(ip(1)), Err(Refusal::PendingPerSource));
        assert_eq!(g.handle_connect(ip(2)), Ok(()));
        assert_eq!(g.handle_connect(ip(3)), Err(Refusal::PendingTotal));
        g.handle_settled(ip(1));
        assert_eq!(g.handle_connect(ip(3)), Ok(()));
        // Settling what was never admitted changes nothing.
        g.handle_settled(ip(9));
        assert_eq!(g.handle_connect(ip(4)), Err(Refusal::PendingTotal));
    }

    #[test]
    fn memory_is_bounded_by_max_keys() {
        let mut g = guard();
        let t0 = Instant::now();
        for i in 0..100u32 {
            g.handle_failure(t0, ip((i % 250) as u8), "demo", &format!("u{i}"));
        }
        let (sources, users) = g.tracked();
        assert!(sources <= 8 && users <= 8, "{sources} {users}");
        // Refilled buckets are dropped first when room is needed.
        g.handle_failure(t0 + Duration::from_secs(3600), ip(200), "demo", "late");
        assert!(g.tracked().1 <= 8);
    }
}
