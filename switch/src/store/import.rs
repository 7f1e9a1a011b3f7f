//! Importing carrier CDR files into the users' address books.
//!
//! A file is read row by row on a blocking thread (`parley_codecs::cdr_csv`, from any
//! `Read`, e.g. an HTTP body bridged with `tokio_util::io::SyncIoBridge`), which also
//! normalises the numbers and matches them to users; batches of [`BATCH`] matched rows go
//! through a bounded channel to the writer, one transaction each: memory holds a few
//! batches whatever the file's size, and reading the next batch overlaps writing this one.
//!
//! The writer of an SQLite file is [`sqlite`]: rusqlite on a blocking thread, one prepared
//! statement per row. sqlx's SQLite driver runs each statement on its worker thread and
//! hands every returned row back across a channel; at the import's rate those hand-offs,
//! and its `Any` driver's conversions, cost more than SQLite's own work (measured in
//! `docs/BENCHMARKS.md`). PostgreSQL (and an in-memory SQLite, which a second connection
//! cannot open) go through the pool with multi-row statements.
//!
//! For each row of tenant `T` (numbers normalised to E.164 with `T`'s region, or kept as
//! they are when they are not numbers): a destination that is the number of a user of
//! `T` makes the row that user's incoming call; a source that is one makes it that user's
//! outgoing call; both, for a call between two users. Users of other tenants are never
//! touched, whatever numbers a file holds. Each row has a stable key (the file's call id,
//! else a SHA-256 of its fields) in `carrier_cdrs`: importing a file again adds nothing.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::time::SystemTime;

use parley_actors::registry::Registry;
use parley_codecs::cdr_csv::{CarrierCdr, CdrReader, Format};
use serde::Serialize;

use sqlx::Row;

use super::{BookChange, CallKind, Contact, ContactSum, Store, StoreError, add_contacts, unix_ms};

mod sqlite;

/// Rows per transaction. A batch's book upserts land on random pages of ~1,000-entry
/// books; what an import costs is mostly pages written (to the WAL, then the file), and a
/// page a transaction dirties is written once whatever number of rows it took. 50,000
/// rows a transaction imported 1.9× the rows per second of 10,000 (`docs/BENCHMARKS.md`);
/// 100,000 were no faster and held more memory.
pub const BATCH: usize = 50_000;

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
    /// Why reading ended before the end of the file (a row past the longest a row may
    /// be: an unterminated quote); what was read before it is imported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
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

/// What the reader hands the writer: a batch's matched rows, and what it counted of the
/// rows it read (everything but `imported` and `duplicates`).
struct Prepared {
    matched: Vec<Matched>,
    counts: ImportReport,
}

/// What [`import`] needs to know of the tenant: its name and the region its numbers are
/// read in.
pub type TenantRegion<'a> = (&'a str, &'a str);

/// Imports a file for `tenant` (whose numbers are normalised with `region`). Book
/// changes go to the users' actors (online devices get the new entries).
pub async fn import(
    store: &Store,
    registry: &Arc<Registry>,
    (tenant, region): TenantRegion<'_>,
    format: Format,
    reader: impl Read + Send + 'static,
) -> Result<ImportReport, ImportError> {
    let label = match &format {
        Format::Asterisk => "asterisk",
        Format::FreeSwitch => "freeswitch",
        Format::Generic(_) => "generic",
    };
    // One batch waiting while one is written: reading overlaps writing, and memory holds
    // three batches at most (being read, waiting, being written).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Prepared, ImportError>>(1);
    let reading = Reading {
        registry: registry.clone(),
        tenant: tenant.to_owned(),
        format: label,
        numbers: Numbers::new(region),
        retention: store.retention,
        listed: 0,
    };
    let reader_task = tokio::task::spawn_blocking(move || reading.run(format, reader, tx));
    let mut report = ImportReport::default();
    let mut touched: HashSet<String> = HashSet::new();
    let result = async {
        let mut writer = Writer::open(store).await?;
        while let Some(prepared) = rx.recv().await {
            let Prepared { matched, counts } = prepared?;
            report.absorb(counts);
            let (fresh, changes) = writer.apply(store, tenant, label, matched).await?;
            let imported = fresh.iter().filter(|f| **f).count() as u64;
            let duplicates = fresh.len() as u64 - imported;
            report.imported += imported;
            report.duplicates += duplicates;
            metrics::counter!(crate::metrics::CDR_IMPORT_ROWS_TOTAL, "result" => "imported")
                .increment(imported);
            metrics::counter!(crate::metrics::CDR_IMPORT_ROWS_TOTAL, "result" => "duplicate")
                .increment(duplicates);
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

impl ImportReport {
    /// Adds a batch's counts from the reader.
    fn absorb(&mut self, c: ImportReport) {
        self.rows += c.rows;
        self.unmatched += c.unmatched;
        self.expired += c.expired;
        self.rejected += c.rejected;
        self.rejections.extend(c.rejections);
        self.rejections.truncate(MAX_LISTED);
        if self.stopped.is_none() {
            self.stopped = c.stopped;
        }
    }
}

/// The reader thread's state: it reads, keys, normalises and matches rows.
struct Reading {
    registry: Arc<Registry>,
    tenant: String,
    format: &'static str,
    numbers: Numbers,
    retention: Option<std::time::Duration>,
    /// Rejections listed so far (the report lists [`MAX_LISTED`]).
    listed: usize,
}

type Batches = tokio::sync::mpsc::Sender<Result<Prepared, ImportError>>;

impl Reading {
    fn run(mut self, format: Format, reader: impl Read, tx: Batches) {
        let mut file = match CdrReader::new(format, reader) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(ImportError::Header(e.to_string())));
                return;
            }
        };
        let mut batch = self.batch();
        while let Some((line, row)) = file.next() {
            if let Err(e) = &row
                && e.0.starts_with("read error")
            {
                // The file cannot be read on from here: the row is rejected, the batch
                // read so far is imported, and the report says where reading stopped.
                let why = format!("line {line}: {}; the rest of the file was not read", e.0);
                self.add(&mut batch, line, row.map_err(|e| e.0));
                batch.counts.stopped = Some(why);
                let _ = tx.blocking_send(Ok(self.counted(batch)));
                return;
            }
            self.add(&mut batch, line, row.map_err(|e| e.0));
            if batch.matched.len() == BATCH || batch.counts.rows as usize == 4 * BATCH {
                let full = std::mem::replace(&mut batch, self.batch());
                if tx.blocking_send(Ok(self.counted(full))).is_err() {
                    return;
                }
            }
        }
        if batch.counts.rows > 0 {
            let _ = tx.blocking_send(Ok(self.counted(batch)));
        }
    }

    fn batch(&self) -> Prepared {
        Prepared {
            matched: Vec::with_capacity(BATCH),
            counts: ImportReport::default(),
        }
    }

    /// Counts the batch's unreadable, expired and unmatched rows in the metrics.
    fn counted(&self, p: Prepared) -> Prepared {
        for (result, n) in [
            ("unmatched", p.counts.unmatched),
            ("expired", p.counts.expired),
            ("rejected", p.counts.rejected),
        ] {
            metrics::counter!(crate::metrics::CDR_IMPORT_ROWS_TOTAL, "result" => result)
                .increment(n);
        }
        p
    }

    fn add(&mut self, batch: &mut Prepared, line: u64, row: Result<CarrierCdr, String>) {
        let report = &mut batch.counts;
        report.rows += 1;
        let mut row = match row {
            Ok(r) => r,
            Err(reason) => {
                report.rejected += 1;
                if self.listed < MAX_LISTED {
                    self.listed += 1;
                    report.rejections.push(Rejection { line, reason });
                }
                return;
            }
        };
        let oldest = self
            .retention
            .and_then(|keep| SystemTime::now().checked_sub(keep));
        if oldest.is_some_and(|o| row.end < o) {
            report.expired += 1;
            return;
        }
        let (src, dst) = (self.numbers.e164(&row.src), self.numbers.e164(&row.dst));
        let callee = user_of(&self.registry, &self.tenant, &dst);
        let caller = user_of(&self.registry, &self.tenant, &src);
        if callee.is_none() && caller.is_none() {
            report.unmatched += 1;
            return;
        }
        let key = format!("{}:{}:{}", self.tenant, self.format, row_key(&row));
        row.fields = Vec::new();
        batch.matched.push(Matched {
            key,
            row,
            src,
            dst,
            callee,
            caller,
        });
    }
}

/// Where a batch is written.
enum Writer {
    /// An SQLite file, through a connection of the import's own.
    Sqlite(Option<Box<sqlite::SqliteWriter>>),
    /// The pool (PostgreSQL; an in-memory SQLite).
    Pool {
        /// Book sizes counted so far ([`add_contacts`]).
        sizes: HashMap<String, i64>,
    },
}

impl Writer {
    async fn open(store: &Store) -> Result<Self, StoreError> {
        match &store.sqlite_file {
            Some(path) => {
                let (path, limit) = (path.clone(), store.book_limit);
                let w =
                    tokio::task::spawn_blocking(move || sqlite::SqliteWriter::open(&path, limit))
                        .await
                        .map_err(|e| {
                            StoreError::Task(format!("the import's writer failed: {e}"))
                        })??;
                Ok(Writer::Sqlite(Some(Box::new(w))))
            }
            None => Ok(Writer::Pool {
                sizes: HashMap::new(),
            }),
        }
    }

    /// Writes a batch: whether each row was new (not imported before), and the books'
    /// changes.
    async fn apply(
        &mut self,
        store: &Store,
        tenant: &str,
        format: &'static str,
        matched: Vec<Matched>,
    ) -> Result<(Vec<bool>, Vec<BookChange>), StoreError> {
        match self {
            Writer::Sqlite(slot) => {
                let mut w = slot.take().ok_or_else(|| {
                    StoreError::Task("the import's writer failed on an earlier batch".into())
                })?;
                let tenant = tenant.to_owned();
                let (w, result) = tokio::task::spawn_blocking(move || {
                    let r = w.apply(&tenant, format, &matched);
                    (w, r)
                })
                .await
                .map_err(|e| StoreError::Task(format!("the import's writer failed: {e}")))?;
                *slot = Some(w);
                Ok(result?)
            }
            Writer::Pool { sizes } => apply_pool(store, tenant, format, &matched, sizes).await,
        }
    }
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

/// [`Writer::apply`] through the pool: multi-row statements in one transaction.
async fn apply_pool(
    store: &Store,
    tenant: &str,
    format: &str,
    matched: &[Matched],
    book_sizes: &mut HashMap<String, i64>,
) -> Result<(Vec<bool>, Vec<BookChange>), StoreError> {
    let now = unix_ms(SystemTime::now());
    let mut tx = store.pool.begin().await?;
    // Rows not imported before: their keys come back from the insert.
    let mut inserted: HashSet<String> = HashSet::with_capacity(matched.len());
    for chunk in matched.chunks(KEYS_PER_STATEMENT) {
        let sql = store.backend.positional(format!(
            "INSERT INTO carrier_cdrs ({CARRIER_COLUMNS}) VALUES {} ON CONFLICT (key) DO NOTHING RETURNING key",
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
            inserted.insert(r.get::<String, _>("key"));
        }
    }
    // The first row with a key is the one inserted; a repeat within the file is a
    // duplicate like one from an earlier import.
    let fresh: Vec<bool> = matched.iter().map(|m| inserted.remove(&m.key)).collect();
    let sums = sum_fresh(matched, &fresh);
    let changes = add_contacts(&mut tx, store.book(), tenant, &sums, book_sizes).await?;
    tx.commit().await?;
    Ok((fresh, changes))
}

/// Columns of a `carrier_cdrs` row, in the order the writers bind them.
const CARRIER_COLUMNS: &str = "key, tenant, src, src_name, dst, start_ms, answer_ms, end_ms, disposition, format, imported_ms";

/// Each book's calls with each party in the rows not imported before (`fresh`), summed
/// in file order.
fn sum_fresh(matched: &[Matched], fresh: &[bool]) -> Vec<((String, String), ContactSum)> {
    let mut at: HashMap<(String, String), usize> = HashMap::new();
    let mut sums: Vec<((String, String), ContactSum)> = Vec::new();
    for (m, _) in matched.iter().zip(fresh).filter(|(_, f)| **f) {
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
    sums
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
