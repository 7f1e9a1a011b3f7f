//! The SIP core's timer table: transaction timers (from `sipx-sip`), 200 OK
//! retransmission and dialog reaping, ordered by deadline. A transaction's timers are
//! indexed by (transaction, timer) so that re-arming or terminating one is a bounded set
//! of lookups, never a scan of every transaction's timers.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use parley_core::ids::CallHandle;
use sipx_sip::{Timer, TransactionKey};

/// What a timer does when it fires.
#[derive(Debug)]
pub(super) enum TimerKind {
    /// A transaction timer.
    Txn(TransactionKey, Timer),
    /// Retransmit the caller leg's 200 (of this generation: a re-INVITE's 200 replaces it).
    Retx200(CallHandle, u32),
    /// Forget a finished call's dialogs.
    Reap(CallHandle),
}

/// Timers by deadline.
#[derive(Debug, Default)]
pub(super) struct TimerTable {
    by_time: BTreeMap<(Instant, u64), TimerKind>,
    index: HashMap<(TransactionKey, Timer), (Instant, u64)>,
    seq: u64,
}

impl TimerTable {
    /// Arms a timer; a transaction timer replaces the same timer of that transaction.
    pub(super) fn set(&mut self, at: Instant, kind: TimerKind) {
        self.seq += 1;
        if let TimerKind::Txn(k, t) = &kind
            && let Some(old) = self.index.insert((k.clone(), *t), (at, self.seq))
        {
            self.by_time.remove(&old);
        }
        self.by_time.insert((at, self.seq), kind);
    }

    /// Disarms one transaction timer.
    pub(super) fn clear(&mut self, key: &TransactionKey, timer: Timer) {
        if let Some(at) = self.index.remove(&(key.clone(), timer)) {
            self.by_time.remove(&at);
        }
    }

    /// Disarms every timer of a terminated transaction.
    pub(super) fn clear_transaction(&mut self, key: &TransactionKey) {
        for t in Timer::ALL {
            self.clear(key, t);
        }
    }

    /// The earliest deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.by_time.keys().next().map(|(t, _)| *t)
    }

    /// Removes and returns the earliest timer due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<TimerKind> {
        let entry = self.by_time.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        let kind = entry.remove();
        if let TimerKind::Txn(key, timer) = &kind {
            self.index.remove(&(key.clone(), *timer));
        }
        Some(kind)
    }
}
