//! Users' own edits of their address books, from devices (the session's [`BookService`]
//! channel) and from the admin API: each done in the store, then told to the user actor,
//! which updates routing (known and blocked callers) and sends the change to every device
//! of the user, as a call's CDR does.
//!
//! Requests are served one at a time, in the order they came: a device's edits apply in
//! the order it sent them.

use std::sync::Arc;

use parley_actors::book::{BookError, BookOp, BookReply, BookRequest, BookService};
use parley_actors::registry::Registry;
use parley_actors::user::AddressBookChanged;
use tokio::sync::mpsc;

use crate::federation::Federation;
use crate::metrics as m;
use crate::store::book::{BookEdit, BookEditError, EditOutcome, book_address};
use crate::store::{CdrCursor, Store};

/// The protocol message an operation label stands for.
fn request(label: &str) -> &'static str {
    match label {
        "set" => "book_set",
        "delete" => "book_delete",
        _ => "book_block",
    }
}

/// Requests waiting for the book task at most (then devices are answered `busy`).
const QUEUE: usize = 1024;

/// The address book service.
#[derive(Clone)]
pub struct Books {
    store: Store,
    registry: Arc<Registry>,
    federation: Arc<Federation>,
    default_region: String,
}

impl Books {
    /// The service over `store`; numbers are read with each tenant's region
    /// (`default_region` for tenants without a row).
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        federation: Arc<Federation>,
        default_region: String,
    ) -> Self {
        Self {
            store,
            registry,
            federation,
            default_region,
        }
    }

    /// Starts the task that serves devices; returns the sessions' channel.
    pub fn start(&self) -> BookService {
        let (tx, mut rx) = mpsc::channel::<BookRequest>(QUEUE);
        let books = self.clone();
        actix_rt::spawn(async move {
            while let Some(r) = rx.recv().await {
                let res = books.apply((&r.tenant, &r.user), r.op).await;
                let _ = r.reply.send(res);
            }
        });
        tx
    }

    fn region(&self, tenant: &str) -> String {
        self.federation
            .tenant(tenant)
            .map(|t| t.row.region.clone())
            .unwrap_or_else(|| self.default_region.clone())
    }

    /// Performs one request on `tenant`/`user`'s book.
    pub async fn apply(
        &self,
        (tenant, user): (&str, &str),
        op: BookOp,
    ) -> Result<BookReply, BookError> {
        let region = self.region(tenant);
        let owner = (tenant, user);
        let (label, outcome) = match op {
            BookOp::Search { query, limit } => {
                let found = self.store.book_search(owner, &query, limit).await;
                let result = if found.is_ok() { "ok" } else { "unavailable" };
                metrics::counter!(m::ADDRESS_BOOK_EDITS_TOTAL, "op" => "search", "result" => result)
                    .increment(1);
                return found.map(BookReply::Results).map_err(|e| {
                    tracing::error!(%tenant, %user, error = %e, "address book search failed");
                    BookError::new(
                        "unavailable",
                        "book_search: the address book could not be read",
                    )
                });
            }
            BookOp::History { before, limit } => {
                let before = match before.as_deref().map(CdrCursor::decode) {
                    None => None,
                    Some(Some(c)) => Some(c),
                    Some(None) => {
                        return Err(BookError::new(
                            "bad_message",
                            "call_history: `before` is not a cursor this node gave",
                        ));
                    }
                };
                let page = self
                    .store
                    .call_history(owner, before, i64::from(limit))
                    .await;
                return page
                    .map(|(calls, next)| {
                        BookReply::Calls(
                            calls.into_iter().map(|(c, k)| (c, k.encode())).collect(),
                            next.map(CdrCursor::encode),
                        )
                    })
                    .map_err(|e| {
                        tracing::error!(%tenant, %user, error = %e, "call history read failed");
                        BookError::new("unavailable", "call_history: the CDRs could not be read")
                    });
            }
            BookOp::Set {
                address,
                name,
                note,
                favourite,
            } => (
                "set",
                match book_address(&address, &region) {
                    Ok(a) => {
                        let edit = BookEdit {
                            name,
                            note,
                            favourite,
                        };
                        self.store.book_set(owner, &a, edit).await
                    }
                    Err(e) => Err(e),
                },
            ),
            BookOp::Delete { address } => (
                "delete",
                match book_address(&address, &region) {
                    Ok(a) => self.store.book_delete(owner, &a).await,
                    Err(e) => Err(e),
                },
            ),
            BookOp::Block { address, blocked } => (
                if blocked { "block" } else { "unblock" },
                match book_address(&address, &region) {
                    Ok(a) => self.store.book_block(owner, &a, blocked).await,
                    Err(e) => Err(e),
                },
            ),
        };
        let result = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        metrics::counter!(m::ADDRESS_BOOK_EDITS_TOTAL, "op" => label, "result" => result)
            .increment(1);
        match outcome {
            Ok(done) => {
                tracing::info!(%tenant, %user, op = label, "address book edited by its user");
                self.tell(owner, &done);
                Ok(BookReply::Entry(done.entry))
            }
            Err(BookEditError::Store(e)) => {
                tracing::error!(%tenant, %user, op = label, error = %e, "address book edit failed");
                Err(BookError::new(
                    "unavailable",
                    format!("{}: the address book could not be written", request(label)),
                ))
            }
            Err(e) => Err(BookError::new(e.code(), format!("{}: {e}", request(label)))),
        }
    }

    /// Tells the user's actor (routing, devices) what an edit changed.
    fn tell(&self, (tenant, user): (&str, &str), done: &EditOutcome) {
        if let Some(u) = self.registry.user_by_name(tenant, user) {
            u.addr.do_send(AddressBookChanged {
                upserted: done.entry.iter().cloned().collect(),
                removed: done.removed.clone(),
            });
        }
    }
}
