//! Identifiers handed out by the node, never by a process-wide counter: each node (and
//! each test) owns its [`CallHandles`], so two nodes in one process, or two tests in one
//! test binary, never see each other's numbering.

use std::sync::atomic::{AtomicU64, Ordering};

/// Id of a device session (one IM connection after login).
pub type SessionId = u64;

/// Handle of a call (in the SIP core and in call ids `c-N`).
pub type CallHandle = u64;

/// Hands out ids from 1 up for one node: call handles (SIP- and IM-originated calls draw
/// from the same one, so call ids never collide), chat message ids. Shared behind an
/// `Arc` by whoever needs ids of that kind.
#[derive(Debug)]
pub struct Sequence(AtomicU64);

/// The node's call handles.
pub type CallHandles = Sequence;

impl Sequence {
    /// Ids from 1 up.
    pub fn new() -> Self {
        Self(AtomicU64::new(1))
    }

    /// The next id.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for Sequence {
    fn default() -> Self {
        Self::new()
    }
}

/// The Parley call id shown to devices and written in CDRs for a handle.
pub fn call_id(handle: CallHandle) -> String {
    format!("c-{handle}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_allocator_counts_on_its_own() {
        let (a, b) = (CallHandles::new(), CallHandles::new());
        assert_eq!((a.next(), a.next(), b.next()), (1, 2, 1));
        assert_eq!(call_id(7), "c-7");
    }
}
