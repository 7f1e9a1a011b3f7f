//! The registry of live user actors: who owns which number, and where their actor is.
//!
//! Read from the SIP driver's thread and the QUIC accept path; `dashmap` shards it so
//! lookups never contend on one lock, and no guard is ever held across an `.await`. The
//! cores see it only as a [`Directory`] of plain identities; actor addresses stay here.

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
}

impl Registry {
    /// Adds a user.
    pub fn insert(&self, user: UserRef) {
        self.by_number.insert(user.id.number.clone(), user.clone());
        self.by_name
            .insert((user.id.tenant.clone(), user.id.user.clone()), user);
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
}
