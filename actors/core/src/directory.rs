//! Who owns which number, as the cores see it: plain identities, never actor addresses.
//!
//! The control plane's registry (in `parley-actors`) implements [`Directory`]; a test
//! implements it with a map.

/// A user's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserIdentity {
    /// Tenant.
    pub tenant: String,
    /// User name.
    pub user: String,
    /// E.164 number.
    pub number: String,
}

/// Looks users up by number or by name.
pub trait Directory: Send + Sync + 'static {
    /// The user owning an E.164 number.
    fn by_number(&self, number: &str) -> Option<UserIdentity>;
    /// A user by tenant and name.
    fn by_name(&self, tenant: &str, user: &str) -> Option<UserIdentity>;
    /// Whether users of tenant `from` may reach users of tenant `to` by name (the same
    /// tenant, or a federation rule both tenants set).
    fn federated(&self, from: &str, to: &str) -> bool {
        from == to
    }
}

/// Splits what a device named a user by: `user` (a user of `own` tenant) or
/// `user@tenant` (a user of another tenant, reachable through a federation rule).
pub fn split_name<'a>(own: &'a str, name: &'a str) -> (&'a str, &'a str) {
    match name.rsplit_once('@') {
        Some((u, t)) if !u.is_empty() && !t.is_empty() => (t, u),
        _ => (own, name),
    }
}

/// A fixed directory (tests, tools).
#[derive(Debug, Default, Clone)]
pub struct StaticDirectory(pub Vec<UserIdentity>);

impl Directory for StaticDirectory {
    fn by_number(&self, number: &str) -> Option<UserIdentity> {
        self.0.iter().find(|u| u.number == number).cloned()
    }

    fn by_name(&self, tenant: &str, user: &str) -> Option<UserIdentity> {
        self.0
            .iter()
            .find(|u| u.tenant == tenant && u.user == user)
            .cloned()
    }
}
