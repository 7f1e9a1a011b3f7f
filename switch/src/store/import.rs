//! Importing carrier CDR files into the users' address books.
//!
//! A file is read row by row on a blocking thread (`parley_codecs::cdr_csv`, from any
//! `Read`, e.g. an HTTP body bridged with `tokio_util::io::SyncIoBridge`), and applied in
//! batches of [`BATCH`] rows, one transaction each, through a bounded channel: memory
//! holds a few batches whatever the file's size.
//!
//! For each row of tenant `T` (numbers normalised to E.164 with `T`'s region, or kept as
//! they are when they are not numbers): a destination that is the number of a user of
//! `T` makes the row that user's incoming call; a source that is one makes it that user's
//! outgoing call; both, for a call between two users. Users of other tenants are never
//! touched, whatever numbers a file holds. Each row has a stable key (the file's call id,
//! else a SHA-256 of its fields) in `carrier_cdrs`: importing a file again adds nothing.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::time::SystemTime;

use parley_actors::registry::Registry;
use parley_codecs::cdr_csv::{CarrierCdr, CdrReader, Format};
use serde::Serialize;

use sqlx::Row;

use super::{BookChange, CallKind, Contact, ContactSum, Store, StoreError, add_contacts, unix_ms};

/// Rows per transaction.
pub const BATCH: usize = 10_000;

/// Rejections listed in a report (all are counted).
pub const MAX_LISTED: usize = 1000;

/// A row that was not imported.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    /// Line in the file (1-based).
    pub line: u64,
    /// Why.
    pub reason: String,
}

/// What an import did.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Rows read (blank lines aside).
    pub rows: u64,
    /// Rows that added calls to at least one book.
    pub imported: u64,
    /// Rows already imported before (same key).
    pub duplicates: u64,
    /// Rows involving no user of the tenant (kept out of every book).
    pub unmatched: u64,
    /// Rows of calls older than `[cdrs] retention_days` (not imported: retention would
    /// delete them).
    pub expired: u64,
    /// Rows that could not be read.
    pub rejected: u64,
    /// The first [`MAX_LISTED`] rejections.
    pub rejections: Vec<Rejection>,
    /// Users whose books changed.
    pub users_touched: u64,
}

/// Progress callback's view: rows read so far.
pub type Progress = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// Why an import stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The header of a generic file does not fit the mapping.
    #[error("{0}")]
    Header(String),
    /// The database failed (rows of earlier batches are in).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the file failed.
    #[error("reading the file: {0}")]
    Read(String),
}

/// Rows with their line and key (the fields the key was made of are dropped at once).
type Batch = Vec<(u64, Result<(String, CarrierCdr), String>)>;

/// Imports a file for `tenant` (whose numbers are normalised with `region`). Book
/// changes go to the users' actors (online devices get the new entries).
pub async fn import(
    store: &Store,
    registry: &Registry,
    (tenant, region): (&str, &str),
    format: Format,
    reader: impl Read + Send + 'static,
) -> Result<ImportReport, ImportError> {
    let label = match &format {
        Format::Asterisk => "asterisk",
        Format::FreeSwitch => "freeswitch",
        Format::Generic(_) => "generic",
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Batch, ImportError>>(4);
    let reader_task = tokio::task::spawn_blocking(move || {
        let mut file = match CdrReader::new(format, reader) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(ImportError::Header(e.to_string())));
                return;
            }
        };
        let mut batch = Vec::with_capacity(BATCH);
        while let Some((line, row)) = file.next() {
            if let Err(e) = &row
                && e.0.starts_with("read error")
            {
                let _ = tx.blocking_send(Err(ImportError::Read(e.0.clone())));
                return;
            }
            let row = row.map(|mut r| {
                let key = row_key(&r);
                r.fields = Vec::new();
                (key, r)
            });
            batch.push((line, row.map_err(|e| e.0)));
            if batch.len() == BATCH
                && tx
                    .blocking_send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))
                    .is_err()
            {
                return;
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(Ok(batch));
        }
    });
    let mut report = ImportReport::default();
    let mut touched: HashSet<String> = HashSet::new();
    let mut numbers = Numbers::new(region);
    let mut book_sizes: HashMap<String, i64> = HashMap::new();
    let result = async {
        while let Some(batch) = rx.recv().await {
            let changes = apply(
                store,
                registry,
                tenant,
                label,
                batch?,
                &mut report,
                (&mut numbers, &mut book_sizes),
            )
            .await?;
            for change in changes {
                touched.insert(change.user.clone());
                if let Some(u) = registry.user_by_name(&change.tenant, &change.user) {
                    u.addr.do_send(parley_actors::user::AddressBookChanged {
                        upserted: change.upserted,
                        removed: change.removed,
                    });
                }
            }
        }
        Ok::<(), ImportError>(())
    }
    .await;
    drop(rx);
    let reader = reader_task.await;
    report.users_touched = touched.len() as u64;
    result?;
    // A reader that died (it never should) must not pass for the end of the file.
    reader.map_err(|e| ImportError::Read(format!("the CSV reader failed: {e}")))?;
    Ok(report)
}

/// Numbers as written → E.164 with the tenant's region (or as written when they are not
/// numbers), remembered: carrier files name the same parties over and over, and parsing
/// a number is most of the cost of a row that is already imported.
struct Numbers {
    region: String,
    seen: HashMap<String, String>,
}

/// Numbers remembered per import (then forgotten, and remembered again).
const NUMBERS_REMEMBERED: usize = 1 << 20;

impl Numbers {
    fn new(region: &str) -> Self {
        Self {
            region: region.to_owned(),
            seen: HashMap::new(),
        }
    }

    fn e164(&mut self, n: &str) -> String {
        if let Some(e) = self.seen.get(n) {
            return e.clone();
        }
        let e = crate::numbers::to_e164(n, &self.region).unwrap_or_else(|| n.to_owned());
        if self.seen.len() >= NUMBERS_REMEMBERED {
            self.seen.clear();
        }
        self.seen.insert(n.to_owned(), e.clone());
        e
    }
}

/// The user of `tenant` whose number `n` is.
fn user_of(registry: &Registry, tenant: &str, n: &str) -> Option<String> {
    registry
        .user_by_number(n)
        .filter(|u| u.id.tenant == tenant)
        .map(|u| u.id.user)
}

/// A row that names a user of the tenant, normalised.
struct Matched {
    key: String,
    row: CarrierCdr,
    src: String,
    dst: String,
    callee: Option<String>,
    caller: Option<String>,
}

/// Keys per multi-row insert into `carrier_cdrs` (11 parameters each).
const KEYS_PER_STATEMENT: usize = 500;

async fn apply(
    store: &Store,
    registry: &Registry,
    tenant: &str,
    format: &str,
    batch: Batch,
    report: &mut ImportReport,
    (numbers, book_sizes): (&mut Numbers, &mut HashMap<String, i64>),
) -> Result<Vec<BookChange>, StoreError> {
    let before = report.clone();
    let now = unix_ms(SystemTime::now());
    let oldest = store
        .retention
        .and_then(|keep| SystemTime::now().checked_sub(keep));
    let mut matched: Vec<Matched> = Vec::with_capacity(batch.len());
    for (line, row) in batch {
        report.rows += 1;
        let (key, row) = match row {
            Ok(r) => r,
            Err(reason) => {
                report.rejected += 1;
                if report.rejections.len() < MAX_LISTED {
                    report.rejections.push(Rejection { line, reason });
                }
                continue;
            }
        };
        if oldest.is_some_and(|o| row.end < o) {
            report.expired += 1;
            continue;
        }
        let (src, dst) = (numbers.e164(&row.src), numbers.e164(&row.dst));
        let callee = user_of(registry, tenant, &dst);
        let caller = user_of(registry, tenant, &src);
        if callee.is_none() && caller.is_none() {
            report.unmatched += 1;
            continue;
        }
        let key = format!("{tenant}:{format}:{key}");
        matched.push(Matched {
            key,
            row,
            src,
            dst,
            callee,
            caller,
        });
    }
    let mut tx = store.pool.begin().await?;
    // Rows not imported before: their keys come back from the insert.
    let mut fresh: HashSet<String> = HashSet::with_capacity(matched.len());
    for chunk in matched.chunks(KEYS_PER_STATEMENT) {
        let sql = store.backend.positional(format!(
            "INSERT INTO carrier_cdrs (key, tenant, src, src_name, dst, start_ms, answer_ms, end_ms, disposition, format, imported_ms) \
             VALUES {} ON CONFLICT (key) DO NOTHING RETURNING key",
            super::value_rows(chunk.len(), 11)
        ));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for m in chunk {
            q = q
                .bind(m.key.as_str())
                .bind(tenant)
                .bind(m.src.as_str())
                .bind(m.row.src_name.as_deref())
                .bind(m.dst.as_str())
                .bind(unix_ms(m.row.start))
                .bind(m.row.answer.map(unix_ms))
                .bind(unix_ms(m.row.end))
                .bind(m.row.disposition.as_str())
                .bind(format)
                .bind(now);
        }
        for r in q.persistent(false).fetch_all(&mut *tx).await? {
            fresh.insert(r.get::<String, _>("key"));
        }
    }
    // Each book's calls with each party, summed in file order.
    let mut at: HashMap<(String, String), usize> = HashMap::new();
    let mut sums: Vec<((String, String), ContactSum)> = Vec::new();
    for m in &matched {
        // The first row with a key is the one inserted; a repeat within the file is a
        // duplicate like one from an earlier import.
        if !fresh.remove(&m.key) {
            report.duplicates += 1;
            continue;
        }
        report.imported += 1;
        let mut sides: [Option<(&String, Contact<'_>)>; 2] = [None, None];
        if let Some(user) = &m.callee {
            sides[0] = Some((
                user,
                Contact {
                    address: &m.src,
                    name: m.row.src_name.as_deref(),
                    when: m.row.end,
                    kind: CallKind::Incoming {
                        answered: m.row.answer.is_some(),
                    },
                },
            ));
        }
        if let Some(user) = &m.caller {
            sides[1] = Some((
                user,
                Contact {
                    address: &m.dst,
                    name: None,
                    when: m.row.end,
                    kind: CallKind::Outgoing,
                },
            ));
        }
        for (user, contact) in sides.into_iter().flatten() {
            let k = (user.clone(), contact.address.to_owned());
            let i = *at.entry(k.clone()).or_insert_with(|| {
                sums.push((k, ContactSum::default()));
                sums.len() - 1
            });
            sums[i].1.add(contact);
        }
    }
    let changes = add_contacts(&mut tx, store.book(), tenant, &sums, book_sizes).await?;
    tx.commit().await?;
    for (result, now, then) in [
        ("imported", report.imported, before.imported),
        ("duplicate", report.duplicates, before.duplicates),
        ("unmatched", report.unmatched, before.unmatched),
        ("expired", report.expired, before.expired),
        ("rejected", report.rejected, before.rejected),
    ] {
        metrics::counter!(crate::metrics::CDR_IMPORT_ROWS_TOTAL, "result" => result)
            .increment(now - then);
    }
    Ok(changes)
}

/// The row's own id, or a SHA-256 of its fields (unit separator between them).
fn row_key(row: &CarrierCdr) -> String {
    // Ids are per call leg in some switches (Asterisk's uniqueid is the channel's): with
    // the start and the destination, one row each.
    if let Some(id) = &row.id {
        return format!("id:{id}:{}:{}", unix_ms(row.start), row.dst);
    }
    let joined = row.fields.join("\u{1f}");
    format!(
        "sha256:{}",
        crate::federation::hex(&crate::federation::fingerprint(joined.as_bytes()))
    )
}
