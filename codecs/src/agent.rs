//! The protocol between a node and the auth agents of federated tenants (`docs/auth.md`).
//!
//! An agent runs inside an enterprise network and opens the connection outbound: QUIC with
//! TLS 1.3, ALPN [`ALPN`], the agent presenting the certificate the node's agent CA issued
//! at enrolment and pinning the node's certificate. Every exchange is one bidirectional
//! stream carrying one request frame and one answer frame; a directory sync carries
//! several [`AgentRequest::SyncPage`] frames before its answer. Frames are a 4-byte
//! big-endian length and a JSON body of at most [`MAX_FRAME`] bytes.
//!
//! Who asks what:
//! - the node asks an agent to [`NodeRequest::Authenticate`] a login (the agent binds to
//!   its directory as the user) or to [`NodeRequest::Check`] that an account is still in
//!   good standing (a device reconnecting with a session token; no password);
//! - an agent asks the node to [`AgentRequest::Enroll`] it (the only request on a
//!   connection without a client certificate), to [`AgentRequest::Renew`] its
//!   certificate, and sends the tenant's users as [`AgentRequest::SyncPage`]s.
//!
//! Nothing here names a tenant except the node's enrolment answer: the node knows an
//! agent's tenant from its certificate, never from what the agent says.

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::CodecError;

/// ALPN of the agent protocol (distinct from the device protocol's).
pub const ALPN: &[u8] = b"parley-agent/1";

/// Largest frame body, bytes (a sync page of [`SYNC_PAGE_USERS`] users fits with room).
pub const MAX_FRAME: usize = 1024 * 1024;

/// Users per directory sync page.
pub const SYNC_PAGE_USERS: usize = 500;

/// Longest user id, display name, number, mail or group name the node keeps, bytes.
pub const MAX_FIELD_BYTES: usize = 256;

/// Most numbers and groups per user the node keeps.
pub const MAX_LIST_ITEMS: usize = 16;

/// Requests from the node to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeRequest {
    /// Verify a password: search the user as the service account, then bind as them.
    Authenticate {
        /// The login name the device gave.
        user: String,
        /// The password the device gave; the agent passes it to the directory's bind and
        /// forgets it.
        password: String,
    },
    /// Whether the account still exists and is in good standing (no bind).
    Check {
        /// The login name.
        user: String,
    },
}

/// An account's standing in the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    /// May log in.
    #[default]
    Active,
    /// Locked (OpenLDAP ppolicy `pwdAccountLockedTime`, AD `lockoutTime`).
    Locked,
    /// Disabled (AD `userAccountControl` ACCOUNTDISABLE).
    Disabled,
}

/// One user as the directory describes them; never a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DirectoryUser {
    /// The login name (the mapped user id attribute, e.g. `uid` or `sAMAccountName`).
    pub user: String,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Telephone numbers as the directory writes them, office numbers first, then mobile
    /// (the node normalises them to E.164 with the tenant's region).
    #[serde(default)]
    pub numbers: Vec<String>,
    /// Mail address.
    #[serde(default)]
    pub mail: Option<String>,
    /// Groups (DNs or names, as the directory gives them).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Standing.
    #[serde(default)]
    pub state: AccountState,
    /// Changes whenever the password changes (`pwdChangedTime`, AD `pwdLastSet`), so the
    /// node can end session tokens issued before a change; `None` when the directory does
    /// not say.
    #[serde(default)]
    pub password_stamp: Option<String>,
}

impl DirectoryUser {
    /// Cuts every field to the limits the node keeps ([`MAX_FIELD_BYTES`],
    /// [`MAX_LIST_ITEMS`]); returns `false` when the user id itself is empty or too long
    /// (such a user cannot log in and is dropped).
    pub fn bound(&mut self) -> bool {
        fn cut(s: &mut String) {
            if s.len() > MAX_FIELD_BYTES {
                let mut end = MAX_FIELD_BYTES;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
            }
        }
        if self.user.is_empty() || self.user.len() > MAX_FIELD_BYTES {
            return false;
        }
        for s in self.display_name.iter_mut().chain(self.mail.iter_mut()) {
            cut(s);
        }
        for list in [&mut self.numbers, &mut self.groups] {
            list.retain(|s| !s.is_empty() && s.len() <= MAX_FIELD_BYTES);
            list.truncate(MAX_LIST_ITEMS);
        }
        if let Some(s) = &mut self.password_stamp {
            cut(s);
        }
        true
    }
}

/// An agent's answer to [`NodeRequest::Authenticate`] or [`NodeRequest::Check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthOutcome {
    /// The password is right (or, for a check, the account is in good standing).
    Ok {
        /// The user's directory entry.
        profile: DirectoryUser,
    },
    /// The directory refused the bind.
    WrongPassword,
    /// No entry matched the login name (or more than one did).
    UnknownUser,
    /// The account is locked.
    Locked,
    /// The account is disabled.
    Disabled,
    /// No directory server answered (every configured server was tried).
    Unavailable {
        /// What the last server did, for the node's log.
        reason: String,
    },
    /// The agent has as many requests in progress as it allows; nothing was sent to the
    /// directory, so the node may ask another agent.
    Busy,
}

/// Requests from an agent to the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentRequest {
    /// Enrol with a one-time token (the only request a connection without a client
    /// certificate may make).
    Enroll {
        /// The secret part of the enrolment token.
        token: String,
        /// A PKCS#10 certificate signing request (PEM) for the agent's new key pair.
        csr_pem: String,
        /// A name for this agent (host name), shown to operators.
        name: String,
    },
    /// Issue a fresh certificate for a new key pair before the current one expires.
    Renew {
        /// A PKCS#10 certificate signing request (PEM).
        csr_pem: String,
    },
    /// A page of the tenant's users; the stream's last page has `last: true`. The pages
    /// of one stream are the whole directory: users the node knew from an earlier sync
    /// and not listed are gone.
    SyncPage {
        /// Users.
        users: Vec<DirectoryUser>,
        /// Whether this page ends the sync.
        last: bool,
    },
}

/// The node's answers to [`AgentRequest`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeAnswer {
    /// Enrolled: the agent's certificate and who it now is.
    Enrolled {
        /// The agent's id on the node (the certificate's CN).
        agent_id: String,
        /// The tenant (the certificate's O).
        tenant: String,
        /// The certificate (PEM), signed by the node's agent CA.
        cert_pem: String,
    },
    /// A renewed certificate (PEM).
    Renewed {
        /// The certificate.
        cert_pem: String,
        /// Seconds it is valid for.
        valid_secs: u64,
    },
    /// The sync was applied.
    Synced {
        /// Users now known for the tenant.
        users: u64,
        /// Directory numbers not taken because another user already has them.
        numbers_refused: u64,
    },
    /// The request was refused.
    Refused {
        /// Machine-readable reason (`bad_token`, `bad_csr`, `too_many_users`, ...).
        code: String,
        /// For the operator.
        message: String,
    },
}

/// The whole directory as [`AgentRequest::SyncPage`]s, each at most [`SYNC_PAGE_USERS`]
/// users and within [`MAX_FRAME`]; the last one says `last` (one empty page for an empty
/// directory). Users are cut to the node's limits first ([`DirectoryUser::bound`]).
pub fn sync_pages(users: Vec<DirectoryUser>) -> Vec<AgentRequest> {
    let budget = MAX_FRAME - 512;
    let mut pages = Vec::new();
    let mut page = Vec::new();
    let mut used = 0;
    for mut u in users {
        if !u.bound() {
            continue;
        }
        let size = serde_json::to_vec(&u).map_or(budget, |j| j.len()) + 1;
        if !page.is_empty() && (used + size > budget || page.len() == SYNC_PAGE_USERS) {
            pages.push(std::mem::take(&mut page));
            used = 0;
        }
        used += size;
        page.push(u);
    }
    pages.push(page);
    let n = pages.len();
    pages
        .into_iter()
        .enumerate()
        .map(|(i, users)| AgentRequest::SyncPage {
            users,
            last: i + 1 == n,
        })
        .collect()
}

/// Appends one framed message; refuses (appending nothing) a body over [`MAX_FRAME`].
pub fn encode<T: Serialize>(msg: &T, out: &mut BytesMut) -> Result<(), CodecError> {
    crate::control::encode_within(msg, out, MAX_FRAME)
}

/// Reads a frame length from its 4-byte header, enforcing [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, CodecError> {
    crate::control::frame_len_within(header, MAX_FRAME)
}

/// Decodes one frame body (JSON, as the device protocol).
pub use crate::control::decode;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_tagged_json() {
        let ok = AuthOutcome::Ok {
            profile: DirectoryUser {
                user: "alice".into(),
                numbers: vec!["+33 1 23 45 67 89".into()],
                ..Default::default()
            },
        };
        let json = serde_json::to_string(&ok).unwrap();
        assert!(
            json.starts_with(r#"{"result":"ok","profile":{"user":"alice""#),
            "{json}"
        );
        assert_eq!(decode::<AuthOutcome>(json.as_bytes()).unwrap(), ok);
        assert_eq!(
            decode::<AuthOutcome>(br#"{"result":"wrong_password"}"#).unwrap(),
            AuthOutcome::WrongPassword
        );
        assert!(decode::<NodeRequest>(br#"{"type":"authenticate","user":"a"}"#).is_err());
    }

    #[test]
    fn frames_are_bounded() {
        let mut out = BytesMut::new();
        let big = AgentRequest::Renew {
            csr_pem: "x".repeat(MAX_FRAME),
        };
        assert!(matches!(
            encode(&big, &mut out),
            Err(CodecError::FrameTooLarge(_))
        ));
        assert!(out.is_empty());
        assert!(frame_len((MAX_FRAME as u32 + 1).to_be_bytes()).is_err());
        assert_eq!(frame_len(7u32.to_be_bytes()), Ok(7));
    }

    #[test]
    fn a_full_sync_page_fits_a_frame() {
        let long = "9".repeat(MAX_FIELD_BYTES);
        let user = DirectoryUser {
            user: "u".repeat(MAX_FIELD_BYTES),
            display_name: Some(long.clone()),
            numbers: vec![long.clone(); MAX_LIST_ITEMS],
            mail: Some(long.clone()),
            groups: vec![long.clone(); MAX_LIST_ITEMS],
            state: AccountState::Active,
            password_stamp: Some(long),
        };
        // The worst case is far over a frame at 500 a page: pages are cut by size too.
        let pages = sync_pages(vec![user; 1200]);
        assert!(pages.len() > 3, "{}", pages.len());
        let mut total = 0;
        for (i, p) in pages.iter().enumerate() {
            let mut out = BytesMut::new();
            encode(p, &mut out).unwrap();
            let AgentRequest::SyncPage { users, last } = p else {
                panic!()
            };
            assert_eq!(*last, i + 1 == pages.len());
            total += users.len();
        }
        assert_eq!(total, 1200);
        assert!(matches!(
            sync_pages(Vec::new()).as_slice(),
            [AgentRequest::SyncPage { users, last: true }] if users.is_empty()
        ));
    }

    #[test]
    fn bound_cuts_fields_and_drops_bad_ids() {
        let mut u = DirectoryUser {
            user: "bob".into(),
            display_name: Some("é".repeat(200)),
            numbers: vec![String::new(), "1".into()],
            ..Default::default()
        };
        assert!(u.bound());
        assert!(u.display_name.as_ref().unwrap().len() <= MAX_FIELD_BYTES);
        assert_eq!(u.numbers, vec!["1".to_owned()]);
        let mut empty = DirectoryUser::default();
        assert!(!empty.bound());
    }
}
