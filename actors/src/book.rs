//! Address book requests from a device session, served outside the actors.
//!
//! A device edits and searches its own user's book (`book_set`, `book_delete`,
//! `book_block`, `book_search`). The book lives in the switch's store, which this crate
//! does not see: the session sends a [`BookRequest`] on the [`BookService`] channel, the
//! switch's book task performs it, tells the user actor what changed (so routing and every
//! device of the user learn it, as for calls) and answers on the request's `reply`.
//! The request names the session's own user: a device cannot name another book.

use parley_codecs::control::{AddressBookEntry, CallRecord};
use tokio::sync::{mpsc, oneshot};

/// What a device asks of its book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookOp {
    /// Add or change an entry; `None` fields stay as they are, `Some("")` clears.
    Set {
        /// The address as the user wrote it.
        address: String,
        /// The user's name for it.
        name: Option<String>,
        /// A note.
        note: Option<String>,
        /// Favourite.
        favourite: Option<bool>,
    },
    /// Delete an entry (a tombstone later calls do not undo).
    Delete {
        /// The address.
        address: String,
    },
    /// Block or unblock calls from an address.
    Block {
        /// The address.
        address: String,
        /// Block (`true`) or unblock.
        blocked: bool,
    },
    /// Search the book.
    Search {
        /// Text to look for.
        query: String,
        /// Most results.
        limit: u32,
    },
    /// A page of the user's calls, from their CDRs (what fills the book).
    History {
        /// Only calls older than this cursor.
        before: Option<String>,
        /// Most calls.
        limit: u32,
    },
}

/// A done request.
#[derive(Debug, Clone, PartialEq)]
pub enum BookReply {
    /// The entry as it now stands (`None`: deleted).
    Entry(Option<AddressBookEntry>),
    /// Search results.
    Results(Vec<AddressBookEntry>),
    /// Calls, each with its cursor, and the next page's cursor.
    Calls(Vec<(CallRecord, String)>, Option<String>),
}

/// A refused request: the IM error `code` and a message naming the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookError {
    /// `bad_entry`, `unknown_entry`, `entry_blocked`, `book_full`, `unavailable`.
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
}

impl BookError {
    /// An error with this code.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One request, for the book of `tenant`/`user` (the session's own user).
#[derive(Debug)]
pub struct BookRequest {
    /// Tenant of the book's owner.
    pub tenant: String,
    /// The book's owner.
    pub user: String,
    /// What to do.
    pub op: BookOp,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<BookReply, BookError>>,
}

/// Where sessions send book requests (bounded: a full queue answers `busy`).
pub type BookService = mpsc::Sender<BookRequest>;
