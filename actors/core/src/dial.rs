//! Where a call dialled from an IM device goes: a user of the caller's tenant by name (or
//! `user@tenant` of a tenant both sides federate with),
//! any Parley user by number (numbers are public), or a PSTN number through the trunk.

use std::net::Ipv4Addr;

use parley_codecs::sdp::{Format, MediaDescription, MediaKind};

use crate::directory::{Directory, UserIdentity};

/// The callee of a dialled call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialTarget {
    /// A Parley user: routed by that user's rules.
    User(UserIdentity),
    /// A telephone number that belongs to no user: out through the trunk.
    Pstn(String),
}

/// Why a dial is refused; [`DialError::code`] is the IM protocol's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// Neither a user of the tenant, nor a Parley number, nor (with a trunk) E.164.
    #[error("{0} is neither a user of your tenant nor an E.164 number")]
    UnknownDestination(String),
    /// A device dialled its own user.
    #[error("a device cannot call its own user")]
    OwnUser,
}

impl DialError {
    /// The `error` code sent to the device.
    pub fn code(&self) -> &'static str {
        match self {
            DialError::UnknownDestination(_) | DialError::OwnUser => "unknown_destination",
        }
    }
}

/// Resolves what a device of `me` dialled. `pstn` says whether the node has a trunk.
pub fn resolve(
    me: &UserIdentity,
    to: &str,
    directory: &dyn Directory,
    pstn: bool,
) -> Result<DialTarget, DialError> {
    let (tenant, name) = crate::directory::split_name(&me.tenant, to);
    let callee = directory
        .federated(&me.tenant, tenant)
        .then(|| directory.by_name(tenant, name))
        .flatten()
        .or_else(|| directory.by_number(to));
    match callee {
        Some(c) if c.tenant == me.tenant && c.user == me.user => Err(DialError::OwnUser),
        Some(c) => Ok(DialTarget::User(c)),
        None if pstn && is_e164(to) => Ok(DialTarget::Pstn(to.to_owned())),
        None => Err(DialError::UnknownDestination(to.to_owned())),
    }
}

/// `+` followed by 4 to 15 digits.
pub fn is_e164(s: &str) -> bool {
    s.strip_prefix('+')
        .is_some_and(|d| (4..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

/// What a Parley device offers: G.711 over RoQ (the address is unused; media is RoQ),
/// Opus after it when the device declared it, and telephone-event (DTMF, RFC 4733) at
/// Parley's own payload type.
pub fn device_offer(opus: bool) -> MediaDescription {
    let format = |pt: u8, name: &str, clock: u32| Format {
        pt,
        name: name.into(),
        clock,
    };
    let mut formats = vec![
        format(parley_codecs::g711::PT_PCMU, "PCMU", 8000),
        format(parley_codecs::g711::PT_PCMA, "PCMA", 8000),
    ];
    if opus {
        formats.push(format(parley_codecs::control::PT_OPUS, "OPUS", 48000));
    }
    formats.push(format(
        parley_codecs::control::PT_TELEPHONE_EVENT,
        "TELEPHONE-EVENT",
        8000,
    ));
    MediaDescription {
        kind: MediaKind::Audio,
        addr: Ipv4Addr::UNSPECIFIED.into(),
        port: 0,
        formats,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::StaticDirectory;

    fn who(tenant: &str, user: &str, number: &str) -> UserIdentity {
        UserIdentity {
            tenant: tenant.into(),
            user: user.into(),
            number: number.into(),
        }
    }

    #[test]
    fn dialled_calls_resolve_per_the_table() {
        let alice = who("demo", "alice", "+15550100001");
        let bob = who("demo", "bob", "+15550100002");
        let eve = who("other", "eve", "+15550100009");
        let dir = StaticDirectory(vec![alice.clone(), bob.clone(), eve.clone()]);
        let rows: Vec<(&str, bool, Result<DialTarget, DialError>)> = vec![
            ("bob", true, Ok(DialTarget::User(bob.clone()))),
            ("+15550100002", false, Ok(DialTarget::User(bob))),
            // Names are looked up in the caller's tenant only; numbers are public.
            (
                "eve",
                true,
                Err(DialError::UnknownDestination("eve".into())),
            ),
            ("+15550100009", true, Ok(DialTarget::User(eve))),
            ("alice", true, Err(DialError::OwnUser)),
            ("+15550100001", true, Err(DialError::OwnUser)),
            (
                "+441632960000",
                true,
                Ok(DialTarget::Pstn("+441632960000".into())),
            ),
            // Without a trunk a foreign number goes nowhere; a non-number never does.
            (
                "+441632960000",
                false,
                Err(DialError::UnknownDestination("+441632960000".into())),
            ),
            (
                "12345",
                true,
                Err(DialError::UnknownDestination("12345".into())),
            ),
            (
                "+12",
                true,
                Err(DialError::UnknownDestination("+12".into())),
            ),
        ];
        for (to, pstn, want) in rows {
            assert_eq!(resolve(&alice, to, &dir, pstn), want, "{to} pstn={pstn}");
        }
    }
}
