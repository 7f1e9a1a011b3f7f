//! The CDR writer: takes finished calls from call actors, writes the CDR, grows the called
//! user's address book and pushes the new book to the user's devices.
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

/// The sending half handed to call actors.
#[derive(Clone, Debug)]
pub struct CdrQueue(mpsc::UnboundedSender<CdrRecord>);

impl CdrSink for CdrQueue {
    fn submit(&self, cdr: CdrRecord) {
        if self.0.send(cdr).is_err() {
            tracing::error!("CDR writer is gone; CDR lost");
            metrics::counter!(m::CDR_WRITES_TOTAL, "result" => "error").increment(1);
        }
    }
}

/// Starts the writer task; returns the queue and the task (which ends when every sender is gone).
pub fn start(store: Store, registry: Arc<Registry>) -> (CdrQueue, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<CdrRecord>();
    let task = tokio::spawn(async move {
        while let Some(cdr) = rx.recv().await {
            write_one(&store, &registry, &cdr).await;
        }
    });
    (CdrQueue(tx), task)
}

async fn write_one(store: &Store, registry: &Registry, cdr: &CdrRecord) {
    match store.insert_cdr(cdr).await {
        Ok(()) => metrics::counter!(m::CDR_WRITES_TOTAL, "result" => "ok").increment(1),
        Err(e) => {
            metrics::counter!(m::CDR_WRITES_TOTAL, "result" => "error").increment(1);
            tracing::error!(call = %cdr.call_id, error = %e, "CDR write failed");
        }
    }
    if let Err(e) = store
        .add_contact(
            &cdr.tenant,
            &cdr.user,
            &cdr.caller,
            cdr.caller_name.as_deref(),
            cdr.end,
        )
        .await
    {
        tracing::error!(call = %cdr.call_id, error = %e, "address book update failed");
        return;
    }
    metrics::counter!(m::ADDRESS_BOOK_UPDATES_TOTAL).increment(1);
    if let Some(user) = registry.by_name(&cdr.tenant, &cdr.user) {
        match store.address_book(&cdr.tenant, &cdr.user).await {
            Ok(book) => user.addr.do_send(AddressBookChanged(book)),
            Err(e) => tracing::error!(error = %e, "address book read failed"),
        }
    }
}
