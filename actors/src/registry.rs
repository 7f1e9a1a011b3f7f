//! The registry of live user actors: who owns which number.
//!
//! Read from the SIP driver's thread and the QUIC accept path; `dashmap` shards it so
//! lookups never contend on one lock, and no guard is ever held across an `.await`.

use actix::Addr;
use dashmap::DashMap;

use crate::user::UserActor;

/// A user's live actor and identity.
#[derive(Clone, Debug)]
pub struct UserRef {
    /// Tenant.
    pub tenant: String,
    /// User name.
    pub user: String,
    /// E.164 number.
    pub number: String,
    /// The actor.
    pub addr: Addr<UserActor>,
}

/// Live users, by number and by (tenant, user).
#[derive(Default, Debug)]
pub struct Registry {
    by_number: DashMap<String, UserRef>,
    by_name: DashMap<(String, String), UserRef>,
}

impl Registry {
    /// Adds a user.
    pub fn insert(&self, user: UserRef) {
        self.by_number.insert(user.number.clone(), user.clone());
        self.by_name
            .insert((user.tenant.clone(), user.user.clone()), user);
    }

    /// The user owning an E.164 number.
    pub fn by_number(&self, number: &str) -> Option<UserRef> {
        self.by_number.get(number).map(|r| r.clone())
    }

    /// A user by tenant and name.
    pub fn by_name(&self, tenant: &str, user: &str) -> Option<UserRef> {
        self.by_name
            .get(&(tenant.to_owned(), user.to_owned()))
            .map(|r| r.clone())
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
