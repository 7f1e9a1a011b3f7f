//! The registry of live user actors: who owns which number, and where their actor is.
//!
//! Read from the SIP driver's thread and the QUIC accept path; `dashmap` shards it so
//! lookups never contend on one lock, and no guard is ever held across an `.await`. The
//! cores see it only as a [`Directory`] of plain identities; actor addresses stay here.

use std::collections::HashSet;

use actix::Addr;
use dashmap::DashMap;
use parley_core::directory::{Directory, UserIdentity};

use crate::user::UserActor;

/// A user's identity and live actor.
#[derive(Clone, Debug)]
pub struct UserRef {
    /// Who.
    pub id: UserIdentity,
    /// The actor.
    pub addr: Addr<UserActor>,
}

/// Live users, by number and by (tenant, user).
#[derive(Default, Debug)]
pub struct Registry {
    by_number: DashMap<String, UserRef>,
    by_name: DashMap<(String, String), UserRef>,
    /// Every number a user is reached at (directory users may have several).
    numbers_of: DashMap<(String, String), Vec<String>>,
    /// Display names (from directories).
    names: DashMap<(String, String), String>,
    /// Federation allowances: tenant → tenants its users may reach (one side of a rule).
    peers: DashMap<String, HashSet<String>>,
}

impl Registry {
    /// Adds a user reached at their one number.
    pub fn insert(&self, user: UserRef) {
        let number = user.id.number.clone();
        self.upsert(user, &[number], None);
    }

    /// Adds or updates a user reached at `numbers` (the first is `user.id.number`); a
    /// number that already belongs to another user stays theirs and is returned.
    pub fn upsert(
        &self,
        user: UserRef,
        numbers: &[String],
        display_name: Option<String>,
    ) -> Vec<String> {
        let key = (user.id.tenant.clone(), user.id.user.clone());
        let mut refused = Vec::new();
        let mut kept = Vec::new();
        for n in numbers.iter().filter(|n| !n.is_empty()) {
            let taken = self
                .by_number
                .get(n)
                .is_some_and(|o| o.id.tenant != key.0 || o.id.user != key.1);
            if taken {
                refused.push(n.clone());
            } else {
                self.by_number.insert(n.clone(), user.clone());
                kept.push(n.clone());
            }
        }
        if let Some(old) = self.numbers_of.insert(key.clone(), kept.clone()) {
            for n in old.iter().filter(|n| !kept.contains(n)) {
                self.by_number
                    .remove_if(n, |_, o| o.id.tenant == key.0 && o.id.user == key.1);
            }
        }
        match display_name {
            Some(name) => {
                self.names.insert(key.clone(), name);
            }
            None => {
                self.names.remove(&key);
            }
        }
        self.by_name.insert(key, user);
        refused
    }

    /// Removes a user and their numbers.
    pub fn remove(&self, tenant: &str, user: &str) -> Option<UserRef> {
        let key = (tenant.to_owned(), user.to_owned());
        for n in self
            .numbers_of
            .remove(&key)
            .map(|(_, v)| v)
            .unwrap_or_default()
        {
            self.by_number
                .remove_if(&n, |_, o| o.id.tenant == key.0 && o.id.user == key.1);
        }
        self.names.remove(&key);
        self.by_name.remove(&key).map(|(_, u)| u)
    }

    /// Every number of a user.
    pub fn numbers(&self, tenant: &str, user: &str) -> Vec<String> {
        self.numbers_of
            .get(&(tenant.to_owned(), user.to_owned()))
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Every live user actor.
    pub fn all_users(&self) -> Vec<UserRef> {
        self.by_name.iter().map(|e| e.value().clone()).collect()
    }

    /// The users of a tenant.
    pub fn users_of(&self, tenant: &str) -> Vec<String> {
        self.by_name
            .iter()
            .filter(|e| e.key().0 == tenant)
            .map(|e| e.key().1.clone())
            .collect()
    }

    /// The display name of the user owning `number`, when a directory gave one.
    pub fn display_name_by_number(&self, number: &str) -> Option<String> {
        let u = self.by_number.get(number)?;
        self.names
            .get(&(u.id.tenant.clone(), u.id.user.clone()))
            .map(|n| n.clone())
    }

    /// Replaces the federation allowances: (tenant, peer) pairs, each one side of a rule.
    pub fn set_federation(&self, pairs: &[(String, String)]) {
        self.peers.clear();
        for (t, p) in pairs {
            self.peers.entry(t.clone()).or_default().insert(p.clone());
        }
    }

    /// Whether users of `from` may reach users of `to`: the same tenant, or both tenants
    /// allow each other.
    pub fn federated(&self, from: &str, to: &str) -> bool {
        from == to
            || (self.peers.get(from).is_some_and(|p| p.contains(to))
                && self.peers.get(to).is_some_and(|p| p.contains(from)))
    }

    /// The user owning an E.164 number.
    pub fn user_by_number(&self, number: &str) -> Option<UserRef> {
        self.by_number.get(number).map(|r| r.clone())
    }

    /// A user by tenant and name.
    pub fn user_by_name(&self, tenant: &str, user: &str) -> Option<UserRef> {
        self.by_name
            .get(&(tenant.to_owned(), user.to_owned()))
            .map(|r| r.clone())
    }

    /// The actor of a user.
    pub fn actor(&self, id: &UserIdentity) -> Option<Addr<UserActor>> {
        self.user_by_name(&id.tenant, &id.user).map(|u| u.addr)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl Directory for Registry {
    fn by_number(&self, number: &str) -> Option<UserIdentity> {
        self.by_number.get(number).map(|r| r.id.clone())
    }

    fn by_name(&self, tenant: &str, user: &str) -> Option<UserIdentity> {
        self.by_name
            .get(&(tenant.to_owned(), user.to_owned()))
            .map(|r| r.id.clone())
    }

    fn federated(&self, from: &str, to: &str) -> bool {
        Registry::federated(self, from, to)
    }
}
