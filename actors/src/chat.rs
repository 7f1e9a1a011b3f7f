//! Chat requests from a device session, served by the switch's message task (the archive
//! lives in its store, which this crate does not see).
//!
//! The task keeps every chat in the archive, hands it to the recipient's online devices
//! (or keeps it for their next login), copies it to the sender's other devices and sends
//! receipts; it serves one request at a time, so that a sender's messages keep their
//! order. A request always names the session's own user as `me`: a device reads only its
//! own user's conversations and inbox.

use parley_codecs::control::{ChatRecord, ServerMsg};
use parley_core::directory::UserIdentity;
use tokio::sync::{mpsc, oneshot};

use crate::messages::SessionId;

/// What a device asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatOp {
    /// Send `text` to `to` (already found reachable by the session).
    Send {
        /// The recipient.
        to: UserIdentity,
        /// The recipient as the sender named it (`bob`, `gina@beta`).
        to_name: String,
        /// The message.
        text: String,
    },
    /// The messages kept for this user while no device was online, oldest first.
    Inbox,
    /// The session handed these inbox messages to its device: they are delivered.
    Delivered(Vec<u64>),
    /// The user read `message` (and every earlier one from its sender).
    Read {
        /// Server message id.
        message: u64,
    },
    /// A page of the conversation with `peer`.
    History {
        /// The other user.
        peer: UserIdentity,
        /// Older than this id.
        before: Option<u64>,
        /// Newer than this id.
        after: Option<u64>,
        /// Most messages.
        limit: u32,
    },
}

/// A done request.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatReply {
    /// The chat is archived as `message`; `delivered` devices got it (0: kept for later).
    Sent {
        /// Server message id.
        message: u64,
        /// Devices of the recipient it was handed to.
        delivered: u32,
    },
    /// The inbox, as `chat` messages.
    Inbox(Vec<ServerMsg>),
    /// Done (delivered, read).
    Done,
    /// A page, oldest first; `more`: the archive has more beyond it.
    History {
        /// Messages.
        messages: Vec<ChatRecord>,
        /// More in the direction asked.
        more: bool,
    },
}

/// A refused request: the IM error `code` and a message naming the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatError {
    /// `mailbox_full`, `unknown_message`, `unknown_user`, `unavailable`.
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
}

impl ChatError {
    /// An error with this code.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One request of the device session `session` of user `me`.
#[derive(Debug)]
pub struct ChatRequest {
    /// The session's user.
    pub me: UserIdentity,
    /// The session (its own copy of a sent chat is not echoed back to it).
    pub session: SessionId,
    /// What to do.
    pub op: ChatOp,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<ChatReply, ChatError>>,
}

/// Where sessions send chat requests (bounded: a full queue answers `busy`).
pub type ChatService = mpsc::Sender<ChatRequest>;

/// How `who` appears to a user of `viewer_tenant`: the bare name in the own tenant,
/// `user@tenant` across tenants.
pub fn name_for(viewer_tenant: &str, who: &UserIdentity) -> String {
    if who.tenant == viewer_tenant {
        who.user.clone()
    } else {
        format!("{}@{}", who.user, who.tenant)
    }
}
