//! The CDR writer: takes finished calls from call actors, writes the CDR, grows the
//! user's address book and sends what changed in it to the user actor (routing's known
//! callers, and `address_book_update` frames to the user's devices).
//!
//! The queue is unbounded on purpose: a CDR is never dropped; the writer is the only
//! consumer and SQLite keeps up with thousands of rows a second.

use std::sync::Arc;

use parley_actors::messages::{CdrRecord, CdrSink};
use parley_actors::registry::Registry;
use parley_actors::user::AddressBookChanged;
use tokio::sync::mpsc;

use super::Store;
use crate::metrics as m;

/// What the writer's queue carries.
#[derive(Debug)]
enum Item {
    Cdr(Box<CdrRecord>),
    /// Answered once everything queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The sending half handed to call actors.
#[derive(Clone, Debug)]
pub struct CdrQueue(mpsc::UnboundedSender<Item>);

impl CdrQueue {
    /// Waits until every CDR submitted before this call is written (or the writer is
    /// gone). Used at shutdown, once no call can end any more.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.0.send(Item::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl CdrSink for CdrQueue {
    fn submit(&self, cdr: CdrRecord) {
        if self.0.send(Item::Cdr(Box::new(cdr))).is_err() {
            tracing::error!("CDR writer is gone; CDR lost");
            metrics::counter!(m::CDR_WRITES_TOTAL, "result" => "error").increment(1);
        }
    }
}

/// Most CDRs written in one transaction.
const BATCH: usize = 256;

/// Starts the writer task; returns the queue and the task (which ends when every sender is gone).
pub fn start(store: Store, registry: Arc<Registry>) -> (CdrQueue, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
    let task = tokio::spawn(async move {
        let mut items = Vec::with_capacity(BATCH);
        let mut batch = Vec::with_capacity(BATCH);
        // Whatever has queued up while the last batch was written goes into the next one:
        // one row per transaction at low load, hundreds under a storm.
        while rx.recv_many(&mut items, BATCH).await > 0 {
            let mut flushes = Vec::new();
            for item in items.drain(..) {
                match item {
                    Item::Cdr(cdr) => batch.push(*cdr),
                    Item::Flush(done) => flushes.push(done),
                }
            }
            if !batch.is_empty() {
                write_batch(&store, &registry, &batch).await;
                batch.clear();
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    });
    (CdrQueue(tx), task)
}

async fn write_batch(store: &Store, registry: &Registry, batch: &[CdrRecord]) {
    // Counted are finished calls' CDRs (a call's opening row is not a CDR yet).
    let is_final = |c: &CdrRecord| c.disposition != parley_core::cdr::Disposition::InProgress;
    // Parties that are users of the owner's tenant take their directory name.
    let name = |tenant: &str, number: &str| {
        let u = registry.user_by_number(number)?;
        (u.id.tenant == tenant)
            .then(|| registry.display_name_by_number(number))
            .flatten()
    };
    let (written, changes) = match store.record_calls_named(batch, name).await {
        Ok(changes) => (batch.iter().filter(|c| is_final(c)).count(), changes),
        Err(e) => {
            // One bad row must not take the batch with it: write the rest one by one.
            tracing::warn!(error = %e, rows = batch.len(), "CDR batch failed; retrying row by row");
            let mut ok = 0;
            let mut changes = Vec::new();
            for cdr in batch {
                match store
                    .record_calls_named(std::slice::from_ref(cdr), name)
                    .await
                {
                    Ok(c) => {
                        ok += usize::from(is_final(cdr));
                        changes.extend(c);
                    }
                    Err(e) => {
                        metrics::counter!(m::CDR_WRITES_TOTAL, "result" => "error").increment(1);
                        tracing::error!(call = %cdr.call_id, sip_call_id = %cdr.sip_call_id, error = %e, "CDR write failed: {cdr:?}");
                    }
                }
            }
            (ok, changes)
        }
    };
    metrics::counter!(m::CDR_WRITES_TOTAL, "result" => "ok").increment(written as u64);
    // Each changed book learns its change once per batch (row-by-row retries may name a
    // book more than once; the deltas then simply follow each other).
    for change in changes {
        metrics::counter!(m::ADDRESS_BOOK_UPDATES_TOTAL).increment(change.upserted.len() as u64);
        let Some(u) = registry.user_by_name(&change.tenant, &change.user) else {
            continue;
        };
        u.addr.do_send(AddressBookChanged {
            upserted: change.upserted,
            removed: change.removed,
        });
    }
}
