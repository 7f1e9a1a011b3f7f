//! Storage: users, CDRs and address books.
//!
//! SQLite through `sqlx` is the embedded default, PostgreSQL the store of larger
//! deployments (`[store] url`). `sqlx` was chosen because one set of queries serves both
//! through its `Any` driver (the backend picked at start-up from the URL), it is async (no
//! blocking the actor thread), and it is the best-maintained SQL toolkit in Rust.
//!
//! The queries are written in the SQL both servers speak: `$N` placeholders (sqlx's SQLite
//! driver binds `$N` by number), `ON CONFLICT … DO UPDATE … RETURNING`, no `rowid` outside
//! [`Backend::row_id`]. Where the dialects part ([`Backend`]: two-argument `MAX`/`GREATEST`,
//! `LIKE`/`ILIKE`, `BEGIN IMMEDIATE`, SQLite's `INDEXED BY`, the column types of the
//! schema), the difference is spelled out in one place. Passwords are stored as Argon2id
//! PHC strings (the `argon2` crate, RustCrypto), never in clear.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use parley_codecs::control::{AddressBookEntry, CallRecord};
use parley_core::cdr::{CdrRecord, Disposition};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool};

/// Runs a store test on both backends: `NAME::sqlite` on a file in a temporary
/// directory, `NAME::postgres` on a fresh PostgreSQL database ([`test_pg`]).
#[cfg(test)]
macro_rules! both_backends {
    ($(#[$attr:meta])* async fn $name:ident($store:ident: $ty:ty) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($store: $ty) $body

            #[tokio::test]
            async fn sqlite() {
                let t = $crate::store::testing::sqlite().await;
                run(t.store.clone()).await
            }

            #[tokio::test]
            async fn postgres() {
                let t = $crate::store::testing::postgres().await;
                run(t.store.clone()).await
            }
        }
    };
}

/// PostgreSQL for tests: the integration tests' helper, shared.
#[cfg(test)]
#[path = "../../tests/common/pg.rs"]
pub(crate) mod test_pg;

/// Stores for tests, one per backend.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Store, StoreUrl};

    /// A store and what keeps its database alive.
    pub(crate) struct TestStore {
        pub(crate) store: Store,
        _dir: Option<tempfile::TempDir>,
        _pg: Option<super::test_pg::TestPostgres>,
    }

    /// SQLite in a temporary directory.
    pub(crate) async fn sqlite() -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        TestStore {
            store: Store::open(dir.path()).await.unwrap(),
            _dir: Some(dir),
            _pg: None,
        }
    }

    /// A fresh PostgreSQL database.
    pub(crate) async fn postgres() -> TestStore {
        let pg = super::test_pg::database().await;
        let url = StoreUrl::parse(&pg.url).unwrap();
        TestStore {
            store: Store::connect(&url).await.unwrap(),
            _dir: None,
            _pg: Some(pg),
        }
    }
}

pub mod book;
pub mod cdr_writer;
pub mod chat;
pub mod import;
pub mod tenants;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The SQLite file failed (bulk writes that bypass the pool: imports).
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Hashing failed.
    #[error("password hashing: {0}")]
    Hash(String),
    /// A task of the store's (a blocking writer) died.
    #[error("{0}")]
    Task(String),
}

/// Which database server the store talks to; where their SQL parts, the difference is
/// spelled out here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file (the embedded default).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The name of a row's id in the tables without a key of their own, `cdrs` and
    /// `users` (SQLite's implicit `rowid`; PostgreSQL's `id`, in insertion order too).
    fn row_id(self) -> &'static str {
        match self {
            Backend::Sqlite => "rowid",
            Backend::Postgres => "id",
        }
    }

    /// The larger of two values (SQLite's scalar `MAX(a, b)` is PostgreSQL's `GREATEST`).
    fn greatest(self) -> &'static str {
        match self {
            Backend::Sqlite => "MAX",
            Backend::Postgres => "GREATEST",
        }
    }

    /// The smaller of two values.
    fn least(self) -> &'static str {
        match self {
            Backend::Sqlite => "MIN",
            Backend::Postgres => "LEAST",
        }
    }

    /// Case-insensitive `LIKE` (SQLite's `LIKE` is, for ASCII; PostgreSQL's is not).
    fn ilike(self) -> &'static str {
        match self {
            Backend::Sqlite => "LIKE",
            Backend::Postgres => "ILIKE",
        }
    }

    /// A statement of many parameters, `$1`, `$2`, … each once and in order, as this
    /// backend binds it fastest: SQLite gets anonymous `?`s, because sqlx's SQLite driver
    /// asks for every parameter's name, and SQLite finds a name by a linear scan: a
    /// multi-row statement of 6,000 named parameters spent 75% of an import there.
    fn positional(self, sql: String) -> String {
        match self {
            Backend::Postgres => sql,
            Backend::Sqlite => {
                let mut out = String::with_capacity(sql.len());
                let mut chars = sql.chars().peekable();
                while let Some(c) = chars.next() {
                    if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                        while chars.peek().is_some_and(char::is_ascii_digit) {
                            chars.next();
                        }
                        out.push('?');
                    } else {
                        out.push(c);
                    }
                }
                out
            }
        }
    }

    /// How a transaction that reads before it writes begins: SQLite takes the write lock
    /// at once (a deferred transaction that finds another writer got in between fails
    /// at once: SQLite does not wait for a lock it would have to upgrade); PostgreSQL
    /// locks rows as it goes.
    fn begin_write(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }
}

/// Where the store lives: `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`
/// (`[store] url`). The URL's password never reaches a log: [`StoreUrl`]'s `Display` and
/// `Debug` leave it out.
#[derive(Clone)]
pub struct StoreUrl {
    url: Secret,
    backend: Backend,
    /// Connections in the pool.
    pub max_connections: u32,
}

/// A string that is not printed.
#[derive(Clone)]
struct Secret(String);

impl Secret {
    fn expose(&self) -> &str {
        &self.0
    }
}

impl StoreUrl {
    /// Reads a URL; the error says what is wrong with it (without the password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        let (backend, max_connections) = match scheme {
            "sqlite" => (Backend::Sqlite, 4),
            "postgres" | "postgresql" => (Backend::Postgres, 8),
            _ => {
                return Err(
                    "must start with sqlite:// (a file) or postgres:// (a server)".to_owned(),
                );
            }
        };
        Ok(Self {
            url: Secret(url.to_owned()),
            backend,
            max_connections,
        })
    }

    /// `parley.db` in a data directory.
    pub fn sqlite_in(dir: &Path) -> Self {
        Self {
            url: Secret(format!(
                "sqlite://{}?mode=rwc",
                dir.join("parley.db").display()
            )),
            backend: Backend::Sqlite,
            max_connections: 4,
        }
    }

    /// Which server.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The SQLite file the URL names (`None` for a server or an in-memory database).
    fn sqlite_file(&self) -> Option<PathBuf> {
        let url = self.url.expose();
        if self.backend != Backend::Sqlite
            || url.contains(":memory:")
            || url.contains("mode=memory")
        {
            return None;
        }
        let options: sqlx::sqlite::SqliteConnectOptions = url.parse().ok()?;
        Some(options.get_filename().to_path_buf())
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = self.url.expose();
        // scheme://user:password@host… → scheme://user:***@host…
        match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                let userinfo = &url[s + 3..at];
                let user = userinfo.split(':').next().unwrap_or("");
                let hidden = if userinfo.contains(':') { ":***" } else { "" };
                write!(f, "{}{user}{hidden}{}", &url[..s + 3], &url[at..])
            }
            _ => f.write_str(url),
        }
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

/// A user of the built-in store.
#[derive(Debug, Clone, Serialize)]
pub struct UserRow {
    /// Tenant.
    pub tenant: String,
    /// User name.
    pub user: String,
    /// E.164 number.
    pub number: String,
}

/// A CDR as the admin API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct CdrRow {
    /// Parley call id.
    pub call_id: String,
    /// Gateway Call-ID.
    pub sip_call_id: String,
    /// Tenant.
    pub tenant: String,
    /// Called user.
    pub user: String,
    /// Caller number or URI.
    pub caller: String,
    /// Caller display name.
    pub caller_name: Option<String>,
    /// Dialled number.
    pub called: String,
    /// `im`, `pstn`, `none`.
    pub route: String,
    /// RFC 3339.
    pub start_time: String,
    /// RFC 3339, if answered.
    pub answer_time: Option<String>,
    /// RFC 3339.
    pub end_time: String,
    /// Seconds from answer to end (0 if unanswered).
    pub duration_secs: f64,
    /// Disposition.
    pub disposition: String,
    /// SIP cause.
    pub sip_cause: i64,
    /// Packets caller → callee.
    pub packets_in: i64,
    /// Packets callee → caller.
    pub packets_out: i64,
    /// Who answered: the device name, or `pstn`.
    pub answered_by: Option<String>,
    /// `in` (a call to `user`) or `out` (`user` dialled `called`).
    pub direction: String,
    /// The user whose device dialled the call, when one did (and `user` is the callee).
    pub dialled_by: Option<String>,
}

impl Store {
    /// Closes the rows of calls that were up when the node stopped or crashed:
    /// disposition `INTERRUPTED`, ended at `end` (shutdown: now) or, when the end is
    /// unknown (after a crash), at their start. Returns how many.
    pub async fn close_interrupted(&self, end: Option<SystemTime>) -> Result<u64, StoreError> {
        let (end_ms, end_time) = match end {
            Some(t) => (Some(unix_ms(t)), Some(rfc3339(t))),
            None => (None, None),
        };
        let done = sqlx::query(
            "UPDATE cdrs SET disposition = 'INTERRUPTED', \
             end_ms = COALESCE($1, start_ms), end_time = COALESCE($2, start_time), \
             duration_secs = CASE WHEN answer_ms IS NULL OR $1 IS NULL THEN 0 ELSE ($1 - answer_ms) / 1000.0 END \
             WHERE disposition = 'IN_PROGRESS' AND node = $3",
        )
        .bind(end_ms)
        .bind(end_time)
        .bind(&*self.node)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes the `INTERRUPTED` row of call `call_id` (with `sip_call_id`, started
    /// between `from_ms` and `to_ms`): a cluster node's own row of a call another node
    /// wrote the CDR of (`switch::cluster`). Returns how many rows went.
    pub async fn drop_interrupted_cdr(
        &self,
        call_id: &str,
        sip_call_id: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<u64, StoreError> {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let done = sqlx::query(
            "DELETE FROM cdrs WHERE call_id = $1 AND sip_call_id = $2 \
             AND disposition = 'INTERRUPTED' AND start_ms >= $3 AND start_ms <= $4 AND node = $5",
        )
        .bind(call_id)
        .bind(sip_call_id)
        .bind(clamp(from_ms))
        .bind(clamp(to_ms))
        .bind(&*self.node)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// The node's database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// An Argon2id hash of a random password, with the parameters of real ones: a login
    /// for a user that does not exist is verified against it, so that the work (and the
    /// time) of the answer is the same as for a wrong password.
    decoy: std::sync::Arc<str>,
    /// Most entries one user's address book holds (`[address_book] max_entries`).
    book_limit: i64,
    /// The node whose calls this store writes (`[cluster] node_id`; empty on a single
    /// node): CDR rows carry it, and a node opens, completes and closes only its own, so
    /// nodes of a cluster may share one database.
    node: std::sync::Arc<str>,
    /// `[cdrs] retention_days`: imports skip rows older than this.
    retention: Option<std::time::Duration>,
    /// The SQLite file (`None` on PostgreSQL or an in-memory SQLite): imports write it
    /// through a connection of their own ([`import`]).
    sqlite_file: Option<std::sync::Arc<Path>>,
}

/// Default of `[address_book] max_entries`.
pub const DEFAULT_BOOK_LIMIT: usize = 1000;

/// What one batch of CDRs changed in one user's address book.
#[derive(Debug, Clone, PartialEq)]
pub struct BookChange {
    /// Tenant of the book's owner.
    pub tenant: String,
    /// The book's owner.
    pub user: String,
    /// Entries added or updated, newest first (each address once).
    pub upserted: Vec<AddressBookEntry>,
    /// Addresses evicted to keep the book within its limit.
    pub removed: Vec<String>,
}

impl BookChange {
    fn upsert(&mut self, e: AddressBookEntry) {
        self.removed.retain(|a| *a != e.address);
        self.upserted.retain(|o| o.address != e.address);
        self.upserted.insert(0, e);
    }

    fn remove(&mut self, address: String) {
        self.upserted.retain(|o| o.address != address);
        if !self.removed.contains(&address) {
            self.removed.push(address);
        }
    }
}

fn cdr_row(r: &AnyRow) -> CdrRow {
    CdrRow {
        call_id: r.get("call_id"),
        sip_call_id: r.get("sip_call_id"),
        tenant: r.get("tenant"),
        user: r.get("username"),
        caller: r.get("caller"),
        caller_name: r.get("caller_name"),
        called: r.get("called"),
        route: r.get("route"),
        start_time: r.get("start_time"),
        answer_time: r.get("answer_time"),
        end_time: r.get("end_time"),
        duration_secs: r.get("duration_secs"),
        disposition: r.get("disposition"),
        sip_cause: r.get("sip_cause"),
        packets_in: r.get("packets_in"),
        packets_out: r.get("packets_out"),
        answered_by: r.get("answered_by"),
        direction: r.get("direction"),
        dialled_by: r.get("dialled_by"),
    }
}

/// Which CDRs an operator asks for; every field narrows.
#[derive(Debug, Clone, Default)]
pub struct CdrFilter {
    /// Tenant.
    pub tenant: Option<String>,
    /// A user: calls to them (the CDR's user) and calls their devices dialled.
    pub user: Option<String>,
    /// Caller or called number (E.164) or URI.
    pub number: Option<String>,
    /// `ANSWERED`, `NO ANSWER`, …
    pub disposition: Option<String>,
    /// `im`, `pstn`, `forward`, `none`.
    pub route: Option<String>,
    /// Ended at or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Ended before (Unix ms).
    pub to_ms: Option<i64>,
}

/// Where the next page of CDRs starts (the last row of a page: its end and row id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdrCursor {
    /// End of the last row, Unix ms.
    pub end_ms: i64,
    /// Its row id (rows ending in the same millisecond).
    pub rowid: i64,
}

impl CdrCursor {
    /// The opaque form handed to clients.
    pub fn encode(self) -> String {
        format!("{}.{}", self.end_ms, self.rowid)
    }

    /// Reads [`CdrCursor::encode`]'s form.
    pub fn decode(s: &str) -> Option<Self> {
        let (e, r) = s.split_once('.')?;
        Some(Self {
            end_ms: e.parse().ok()?,
            rowid: r.parse().ok()?,
        })
    }
}

fn book_entry(r: &AnyRow) -> AddressBookEntry {
    BookRow {
        address: r.get("address"),
        name: r.get("name"),
        note: r.get("note"),
        call_count: r.get("call_count"),
        last_seen_ms: r.get("last_seen_ms"),
        first_seen_ms: r.get("first_seen_ms"),
        known_calls: r.get("known_calls"),
        incoming_calls: r.get("incoming_calls"),
        outgoing_calls: r.get("outgoing_calls"),
        missed_calls: r.get("missed_calls"),
        favourite: r.get("favourite"),
        blocked: r.get("blocked"),
        added: r.get("added"),
    }
    .into()
}

/// A row of [`BOOK_COLUMNS`] as stored, whichever driver read it.
pub(crate) struct BookRow {
    pub(crate) address: String,
    pub(crate) name: Option<String>,
    pub(crate) note: Option<String>,
    pub(crate) call_count: i64,
    pub(crate) last_seen_ms: i64,
    pub(crate) first_seen_ms: Option<i64>,
    pub(crate) known_calls: i64,
    pub(crate) incoming_calls: i64,
    pub(crate) outgoing_calls: i64,
    pub(crate) missed_calls: i64,
    pub(crate) favourite: i64,
    pub(crate) blocked: i64,
    pub(crate) added: i64,
}

impl From<BookRow> for AddressBookEntry {
    fn from(r: BookRow) -> Self {
        let count = |n: i64| n.max(0) as u64;
        let at = |ms: i64| rfc3339(UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64));
        AddressBookEntry {
            address: r.address,
            name: r.name,
            call_count: count(r.call_count),
            last_seen: at(r.last_seen_ms),
            known: r.known_calls > 0 || r.added > 0,
            incoming: count(r.incoming_calls),
            outgoing: count(r.outgoing_calls),
            missed: count(r.missed_calls),
            first_seen: at(r.first_seen_ms.unwrap_or(r.last_seen_ms)),
            note: r.note,
            favourite: r.favourite > 0,
            blocked: r.blocked > 0,
            user: None,
        }
    }
}

/// Where an address book name came from; a name replaces one of a lower rank, and a
/// newer one of the same rank (people's caller ids change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NameSource {
    /// A caller id (CLID, SIP display name) or a directory.
    CallerId = 1,
    /// The user named the entry: nothing a call carries replaces it.
    User = 2,
}

/// One call with a party, as an address book counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// The party called the user.
    Incoming {
        /// Someone answered.
        answered: bool,
    },
    /// The user called the party.
    Outgoing,
}

/// A party to add to a book.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Contact<'a> {
    pub(crate) address: &'a str,
    pub(crate) name: Option<&'a str>,
    pub(crate) when: SystemTime,
    pub(crate) kind: CallKind,
}

const BOOK_COLUMNS: &str = "address, name, call_count, last_seen_ms, known_calls, incoming_calls, outgoing_calls, missed_calls, first_seen_ms, note, favourite, blocked, added";

/// A display name cut to [`MAX_BOOK_NAME_BYTES`](parley_codecs::control::MAX_BOOK_NAME_BYTES)
/// at a character boundary.
fn book_name(name: &str) -> &str {
    let max = parley_codecs::control::MAX_BOOK_NAME_BYTES;
    if name.len() <= max {
        return name;
    }
    let mut end = max;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Adds what [`add_contact`] changed in one book to the batch's changes.
pub(crate) fn note_change(
    changes: &mut Vec<BookChange>,
    (tenant, user): (&str, &str),
    (entry, evicted): (Option<AddressBookEntry>, Vec<String>),
) {
    if entry.is_none() && evicted.is_empty() {
        return;
    }
    let at = match changes
        .iter()
        .position(|b| b.tenant == tenant && b.user == user)
    {
        Some(i) => i,
        None => {
            changes.push(BookChange {
                tenant: tenant.to_owned(),
                user: user.to_owned(),
                upserted: Vec::new(),
                removed: Vec::new(),
            });
            changes.len() - 1
        }
    };
    if let Some(entry) = entry {
        changes[at].upsert(entry);
    }
    for address in evicted {
        changes[at].remove(address);
    }
}

/// `($1, …, $cols), ($cols+1, …), …`: the placeholders of a multi-row `VALUES`.
pub(crate) fn value_rows(rows: usize, cols: usize) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        s.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            let sep = if c == 0 { "" } else { ", " };
            let _ = write!(s, "{sep}${}", r * cols + c + 1);
        }
        s.push(')');
    }
    s
}

/// `$first, $first+1, …`: `n` placeholders of an `IN (…)` list.
pub(crate) fn placeholder_list(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) `parley.db` in `dir`: the embedded SQLite store.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::connect(&StoreUrl::sqlite_in(dir)).await
    }

    /// Connects to the store `url` names (SQLite file or PostgreSQL server), creating
    /// the schema and adding what newer versions added.
    pub async fn connect(url: &StoreUrl) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = url.backend;
        let pool = AnyPoolOptions::new()
            .max_connections(url.max_connections)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers do not wait for the writer. 32 MiB of page cache
                        // per connection (SQLite's default is 2 MiB): address books are
                        // updated in key order of (tenant, user, address), i.e. all over
                        // the table, and an import of a large carrier file otherwise
                        // spends its time re-reading pages from the OS.
                        sqlx::Executor::execute(
                            &mut *conn,
                            "PRAGMA journal_mode = WAL; PRAGMA cache_size = -32768; PRAGMA busy_timeout = 5000",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(url.url.expose())
            .await?;
        migrate(&pool, backend).await?;
        let decoy = tokio::task::spawn_blocking(|| {
            let mut raw = [0u8; 16];
            rand::Rng::fill(&mut rand::rng(), &mut raw);
            let salt = SaltString::encode_b64(&raw)?;
            argon2::Argon2::default()
                .hash_password(&raw, &salt)
                .map(|h| h.to_string())
        })
        .await
        .map_err(|e| StoreError::Hash(e.to_string()))?
        .map_err(|e| StoreError::Hash(e.to_string()))?;
        Ok(Self {
            pool,
            backend,
            decoy: decoy.into(),
            book_limit: DEFAULT_BOOK_LIMIT as i64,
            node: "".into(),
            retention: None,
            sqlite_file: url.sqlite_file().map(Into::into),
        })
    }

    /// Sets how long CDRs are kept (`None`: forever): imports then skip older rows, which
    /// retention would delete (and a later import of the file would count again).
    pub fn with_retention(mut self, keep: Option<std::time::Duration>) -> Self {
        self.retention = keep;
        self
    }

    /// The backend and the book limit, as the address book's upserts need them.
    pub(crate) fn book(&self) -> (Backend, i64) {
        (self.backend, self.book_limit)
    }

    /// Which database server this store is on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Sets the node whose calls' CDR rows this store writes and closes (cluster mode).
    pub fn with_node(mut self, node: &str) -> Self {
        self.node = node.into();
        self
    }

    /// Sets the most entries one user's address book holds.
    pub fn with_book_limit(mut self, max_entries: usize) -> Self {
        self.book_limit = i64::try_from(max_entries.max(1)).unwrap_or(i64::MAX);
        self
    }

    /// Adds a user if absent (the password is hashed only then).
    pub async fn ensure_user(
        &self,
        tenant: &str,
        user: &str,
        number: &str,
        password: &str,
    ) -> Result<(), StoreError> {
        let exists = sqlx::query("SELECT 1 FROM users WHERE tenant = $1 AND username = $2")
            .bind(tenant)
            .bind(user)
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        if exists {
            sqlx::query("UPDATE users SET number = $1 WHERE tenant = $2 AND username = $3")
                .bind(number)
                .bind(tenant)
                .bind(user)
                .execute(&self.pool)
                .await?;
            return Ok(());
        }
        let pw = password.to_owned();
        let hash = tokio::task::spawn_blocking(move || {
            let mut raw = [0u8; 16];
            rand::Rng::fill(&mut rand::rng(), &mut raw);
            let salt = SaltString::encode_b64(&raw)?;
            argon2::Argon2::default()
                .hash_password(pw.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await
        .map_err(|e| StoreError::Hash(e.to_string()))?
        .map_err(|e| StoreError::Hash(e.to_string()))?;
        sqlx::query(
            "INSERT INTO users (tenant, username, number, password_hash) VALUES ($1, $2, $3, $4)",
        )
        .bind(tenant)
        .bind(user)
        .bind(number)
        .bind(hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// All users.
    pub async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows =
            sqlx::query("SELECT tenant, username, number FROM users ORDER BY tenant, username")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| UserRow {
                tenant: r.get("tenant"),
                user: r.get("username"),
                number: r.get("number"),
            })
            .collect())
    }

    /// Checks a password; `Ok(None)` for an unknown tenant, an unknown user or a wrong
    /// password — after the same Argon2 work in all three cases (an unknown user's
    /// password is checked against a decoy hash), so neither the answer nor its timing
    /// tells which users exist.
    pub async fn verify(
        &self,
        tenant: &str,
        user: &str,
        password: &str,
    ) -> Result<Option<UserRow>, StoreError> {
        let row = sqlx::query(
            "SELECT tenant, username, number, password_hash FROM users WHERE tenant = $1 AND username = $2",
        )
        .bind(tenant)
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        let hash: String = match &row {
            Some(r) => r.get("password_hash"),
            None => self.decoy.to_string(),
        };
        let pw = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(pw.as_bytes(), &h)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(ok.then(|| UserRow {
            tenant: row.get("tenant"),
            user: row.get("username"),
            number: row.get("number"),
        }))
    }

    /// Writes finished calls in one transaction: each CDR, and each other party into the
    /// user's address book; returns what changed in each book. One commit per batch keeps
    /// SQLite's fsyncs and the driver's thread hand-offs off the per-call path.
    pub async fn record_calls(&self, cdrs: &[CdrRecord]) -> Result<Vec<BookChange>, StoreError> {
        self.record_calls_named(cdrs, |_, _| None).await
    }

    /// [`Store::record_calls`], with `directory_name(tenant, number)` naming parties that
    /// are users of the book owner's own tenant (a directory's display name is preferred
    /// to whatever name the call carried).
    pub async fn record_calls_named(
        &self,
        cdrs: &[CdrRecord],
        directory_name: impl Fn(&str, &str) -> Option<String>,
    ) -> Result<Vec<BookChange>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut changes: Vec<BookChange> = Vec::new();
        for c in cdrs {
            if c.disposition == Disposition::InProgress {
                insert_cdr(&mut *tx, c, &self.node).await?;
                continue;
            }
            // The call's opening row (same call id and start) is completed; a call that
            // never had one (written by an older node) gets its row now.
            if complete_cdr(&mut *tx, c, &self.node).await? == 0 {
                insert_cdr(&mut *tx, c, &self.node).await?;
            }
            let (party, carried) = c.other_party();
            let directory = directory_name(&c.tenant, party);
            let name = directory.as_deref().or(carried);
            let kind = match c.direction {
                parley_core::cdr::Direction::Out => CallKind::Outgoing,
                parley_core::cdr::Direction::In => CallKind::Incoming {
                    answered: c.answer.is_some(),
                },
            };
            let contact = Contact {
                address: party,
                name,
                when: c.end,
                kind,
            };
            let change = add_contact(&mut tx, self.book(), (&c.tenant, &c.user), contact).await?;
            note_change(&mut changes, (&c.tenant, &c.user), change);
            // A call one user's device placed to another is the caller's outgoing call.
            if let Some(caller) = &c.dialled_by {
                let callee_name = if caller.tenant == c.tenant {
                    directory_name(&c.tenant, &c.called).unwrap_or_else(|| c.user.clone())
                } else {
                    format!("{}@{}", c.user, c.tenant)
                };
                let contact = Contact {
                    address: &c.called,
                    name: Some(&callee_name),
                    when: c.end,
                    kind: CallKind::Outgoing,
                };
                let change = add_contact(
                    &mut tx,
                    self.book(),
                    (&caller.tenant, &caller.user),
                    contact,
                )
                .await?;
                note_change(&mut changes, (&caller.tenant, &caller.user), change);
            }
        }
        tx.commit().await?;
        Ok(changes)
    }

    /// CDRs, newest first, optionally for one tenant/user.
    pub async fn cdrs(
        &self,
        tenant: Option<&str>,
        user: Option<&str>,
        limit: i64,
    ) -> Result<Vec<CdrRow>, StoreError> {
        let filter = CdrFilter {
            tenant: tenant.map(str::to_owned),
            user: user.map(str::to_owned),
            ..CdrFilter::default()
        };
        Ok(self.cdr_page(&filter, None, limit).await?.0)
    }

    /// One page of finished CDRs matching `filter`, newest first, after `cursor` (from
    /// the previous page); with the cursor of the next page when there may be one.
    pub async fn cdr_page(
        &self,
        filter: &CdrFilter,
        cursor: Option<CdrCursor>,
        limit: i64,
    ) -> Result<(Vec<CdrRow>, Option<CdrCursor>), StoreError> {
        let (end_before, rowid_before) =
            cursor.map_or((i64::MAX, i64::MAX), |c| (c.end_ms, c.rowid));
        let sql = format!(
            "SELECT {id} AS row_id, * FROM cdrs WHERE disposition != 'IN_PROGRESS' \
             AND ($1 IS NULL OR tenant = $1) AND ($2 IS NULL OR username = $2 OR dialled_by = $2) \
             AND ($3 IS NULL OR caller = $3 OR called = $3) AND ($4 IS NULL OR disposition = $4) \
             AND ($5 IS NULL OR route = $5) AND ($6 IS NULL OR end_ms >= $6) AND ($7 IS NULL OR end_ms < $7) \
             AND (end_ms < $8 OR (end_ms = $8 AND {id} < $9)) \
             ORDER BY end_ms DESC, {id} DESC LIMIT $10",
            id = self.backend.row_id()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&filter.tenant)
            .bind(&filter.user)
            .bind(&filter.number)
            .bind(&filter.disposition)
            .bind(&filter.route)
            .bind(filter.from_ms)
            .bind(filter.to_ms)
            .bind(end_before)
            .bind(rowid_before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let next = (rows.len() as i64 == limit)
            .then(|| rows.last())
            .flatten()
            .map(|r| CdrCursor {
                end_ms: r.get("end_ms"),
                rowid: r.get("row_id"),
            });
        Ok((rows.iter().map(cdr_row).collect(), next))
    }

    /// A page of `user`'s own calls (their CDRs: calls to them and calls they dialled),
    /// newest first, older than `before`; each with its cursor, and the next page's
    /// cursor when there may be one.
    pub async fn call_history(
        &self,
        (tenant, user): (&str, &str),
        before: Option<CdrCursor>,
        limit: i64,
    ) -> Result<(Vec<(CallRecord, CdrCursor)>, Option<CdrCursor>), StoreError> {
        let (end_before, rowid_before) =
            before.map_or((i64::MAX, i64::MAX), |c| (c.end_ms, c.rowid));
        let sql = format!(
            "SELECT {id} AS row_id, call_id, caller, caller_name, called, start_ms, answer_ms, end_ms, \
             duration_secs, disposition, answered_by, direction, dialled_by FROM cdrs \
             WHERE tenant = $1 AND (username = $2 OR dialled_by = $2) AND disposition != 'IN_PROGRESS' \
             AND (end_ms < $3 OR (end_ms = $3 AND {id} < $4)) \
             ORDER BY end_ms DESC, {id} DESC LIMIT $5",
            id = self.backend.row_id()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(user)
            .bind(end_before)
            .bind(rowid_before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let calls: Vec<(CallRecord, CdrCursor)> = rows
            .iter()
            .map(|r| {
                let outgoing = r.get::<String, _>("direction") == "out"
                    || r.get::<Option<String>, _>("dialled_by").as_deref() == Some(user);
                let record = CallRecord {
                    call_id: r.get("call_id"),
                    direction: if outgoing { "outgoing" } else { "incoming" }.into(),
                    peer: r.get(if outgoing { "called" } else { "caller" }),
                    peer_name: if outgoing { None } else { r.get("caller_name") },
                    start_ms: r.get("start_ms"),
                    answered: r.get::<Option<i64>, _>("answer_ms").is_some(),
                    duration_s: r.get::<f64, _>("duration_secs").max(0.0).round() as u64,
                    disposition: r.get("disposition"),
                    answered_by: r.get("answered_by"),
                };
                let cursor = CdrCursor {
                    end_ms: r.get("end_ms"),
                    rowid: r.get("row_id"),
                };
                (record, cursor)
            })
            .collect();
        let next = (calls.len() as i64 == limit)
            .then(|| calls.last().map(|(_, c)| *c))
            .flatten();
        Ok((calls, next))
    }

    /// Deletes finished CDRs and imported carrier rows whose call ended before `before`,
    /// at most `chunk` rows a statement (short write locks); returns how many went.
    /// Address books are not touched.
    pub async fn expire_cdrs(&self, before: SystemTime, chunk: i64) -> Result<u64, StoreError> {
        let cutoff = unix_ms(before);
        let mut gone = 0;
        let id = self.backend.row_id();
        for sql in [
            format!("DELETE FROM cdrs WHERE {id} IN (SELECT {id} FROM cdrs WHERE end_ms < $1 AND disposition != 'IN_PROGRESS' LIMIT $2)"),
            "DELETE FROM carrier_cdrs WHERE key IN (SELECT key FROM carrier_cdrs WHERE end_ms < $1 LIMIT $2)".to_owned(),
        ] {
            loop {
                let n = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(cutoff)
                    .bind(chunk)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                gone += n;
                if n < chunk as u64 {
                    break;
                }
            }
        }
        Ok(gone)
    }

    /// A user's stored routing preferences (JSON), if any.
    pub async fn preferences(
        &self,
        tenant: &str,
        user: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT json FROM preferences WHERE tenant = $1 AND username = $2")
            .bind(tenant)
            .bind(user)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get("json")))
    }

    /// Stores a user's routing preferences (JSON, already validated).
    pub async fn save_preferences(
        &self,
        tenant: &str,
        user: &str,
        json: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO preferences (tenant, username, json, updated_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant, username) DO UPDATE SET json = excluded.json, updated_ms = excluded.updated_ms",
        )
        .bind(tenant)
        .bind(user)
        .bind(json)
        .bind(unix_ms(SystemTime::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Which device answered the user's recent calls, oldest first (at most `limit`).
    pub async fn answer_history(
        &self,
        tenant: &str,
        user: &str,
        limit: i64,
    ) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let rows = sqlx::query(
            "SELECT answered_by, end_ms FROM (SELECT answered_by, end_ms FROM cdrs WHERE tenant = $1 AND username = $2 \
             AND answered_by IS NOT NULL AND answered_by != 'pstn' ORDER BY end_ms DESC LIMIT $3) AS recent ORDER BY end_ms",
        )
        .bind(tenant)
        .bind(user)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let ms: i64 = r.get("end_ms");
                (
                    r.get("answered_by"),
                    UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
                )
            })
            .collect())
    }

    /// A user's address book, most recent first.
    pub async fn address_book(
        &self,
        tenant: &str,
        user: &str,
    ) -> Result<Vec<AddressBookEntry>, StoreError> {
        let sql = format!(
            "SELECT {BOOK_COLUMNS} FROM address_book WHERE tenant = $1 AND username = $2 AND deleted = 0 \
             ORDER BY last_seen_ms DESC, address"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(book_entry).collect())
    }
}

/// Seconds from answer to end (0 for unanswered calls).
fn talk_secs(c: &CdrRecord) -> f64 {
    c.answer
        .and_then(|a| c.end.duration_since(a).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Completes a call's opening row; the number of rows changed (0 or 1).
async fn complete_cdr<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    c: &CdrRecord,
    node: &str,
) -> Result<u64, StoreError> {
    let duration = talk_secs(c);
    let done = sqlx::query(
        "UPDATE cdrs SET route = $1, answer_ms = $2, end_ms = $3, answer_time = $4, end_time = $5, \
         duration_secs = $6, disposition = $7, sip_cause = $8, packets_in = $9, packets_out = $10, answered_by = $11 \
         WHERE call_id = $12 AND start_ms = $13 AND disposition = 'IN_PROGRESS' AND node = $14",
    )
    .bind(c.route.as_str())
    .bind(c.answer.map(unix_ms))
    .bind(unix_ms(c.end))
    .bind(c.answer.map(rfc3339))
    .bind(rfc3339(c.end))
    .bind(duration)
    .bind(c.disposition.as_str())
    .bind(i64::from(c.cause))
    .bind(c.packets_in as i64)
    .bind(c.packets_out as i64)
    .bind(&c.answered_by)
    .bind(&c.call_id)
    .bind(unix_ms(c.start))
    .bind(node)
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}

async fn insert_cdr<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    c: &CdrRecord,
    node: &str,
) -> Result<(), StoreError> {
    let duration = talk_secs(c);
    sqlx::query(
        "INSERT INTO cdrs (call_id, sip_call_id, tenant, username, caller, caller_name, called, route, start_ms, answer_ms, end_ms, \
         start_time, answer_time, end_time, duration_secs, disposition, sip_cause, packets_in, packets_out, answered_by, direction, dialled_by, node) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)",
    )
    .bind(&c.call_id)
    .bind(&c.sip_call_id)
    .bind(&c.tenant)
    .bind(&c.user)
    .bind(&c.caller)
    .bind(&c.caller_name)
    .bind(&c.called)
    .bind(c.route.as_str())
    .bind(unix_ms(c.start))
    .bind(c.answer.map(unix_ms))
    .bind(unix_ms(c.end))
    .bind(rfc3339(c.start))
    .bind(c.answer.map(rfc3339))
    .bind(rfc3339(c.end))
    .bind(duration)
    .bind(c.disposition.as_str())
    .bind(i64::from(c.cause))
    .bind(c.packets_in as i64)
    .bind(c.packets_out as i64)
    .bind(&c.answered_by)
    .bind(c.direction.as_str())
    // The user of the CDR's tenant who dialled the call from a device (their history
    // has it as an outgoing call).
    .bind(
        c.dialled_by
            .as_ref()
            .filter(|d| d.tenant == c.tenant)
            .map(|d| d.user.as_str()),
    )
    .bind(node)
    .execute(ex)
    .await?;
    Ok(())
}

/// Adds a party to a user's address book, or bumps its call count; when that makes the
/// book exceed `limit`, evicts the least valuable entries (never-known ones first, then
/// the least called, then the oldest). Returns the entry as it now stands and the evicted
/// addresses; no entry for a party too long to keep, or one that was itself the least
/// valuable in a full book.
/// Adds one call with a party to a user's book: counts by kind, first and last seen, the
/// better name (a caller id beats none, a newer caller id an older one, a name the user
/// set beats all).
pub(crate) async fn add_contact(
    tx: &mut AnyConnection,
    (backend, limit): (Backend, i64),
    (tenant, user): (&str, &str),
    c: Contact<'_>,
) -> Result<(Option<AddressBookEntry>, Vec<String>), StoreError> {
    let address = c.address;
    if address.is_empty() || address.len() > parley_codecs::control::MAX_BOOK_ADDRESS_BYTES {
        metrics::counter!(crate::metrics::ADDRESS_BOOK_REFUSED_TOTAL).increment(1);
        return Ok((None, Vec::new()));
    }
    // A party becomes known when the user called it or took its call; a caller that was
    // rejected, missed or cancelled stays unknown however often it calls.
    let (known, incoming, outgoing, missed) = match c.kind {
        CallKind::Outgoing => (1, 0, 1, 0),
        CallKind::Incoming { answered: true } => (1, 1, 0, 0),
        CallKind::Incoming { answered: false } => (0, 1, 0, 1),
    };
    let at = unix_ms(c.when);
    let sql = format!(
        "INSERT INTO address_book ({BOOK_INSERT_COLUMNS}) VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8, $9, $10, $11) {}",
        book_upsert_tail(backend)
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(user)
        .bind(address)
        .bind(c.name.map(book_name))
        .bind(at)
        .bind(known)
        .bind(incoming)
        .bind(outgoing)
        .bind(missed)
        .bind(at)
        .bind(if c.name.is_some() {
            NameSource::CallerId as i64
        } else {
            0
        })
        .fetch_optional(&mut *tx)
        .await?;
    // No row: the user deleted this party, and calls do not bring it back.
    let Some(row) = row else {
        return Ok((None, Vec::new()));
    };
    let entry = book_entry(&row);
    let mut evicted = Vec::new();
    if entry.call_count == 1 {
        // A new entry: the book may now be over its limit.
        let size = book_size(&mut *tx, (tenant, user)).await?;
        if size > limit {
            evicted = evict(tx, backend, (tenant, user), size - limit).await?;
        }
    }
    if evicted.contains(&entry.address) {
        // The new party was itself the least valuable: it is not in the book.
        evicted.retain(|a| *a != entry.address);
        return Ok((None, evicted));
    }
    Ok((Some(entry), evicted))
}

/// The columns an address book upsert binds, in order.
const BOOK_INSERT_COLUMNS: &str = "tenant, username, address, name, call_count, last_seen_ms, known_calls, \
     incoming_calls, outgoing_calls, missed_calls, first_seen_ms, name_source";

/// What an upsert into `address_book` does with an existing entry: counts add up, the
/// better name wins (a higher [`NameSource`], or a newer one of the same caller-id rank),
/// first and last seen widen. Returns the entry.
fn book_upsert_tail(backend: Backend) -> String {
    let (greatest, least) = (backend.greatest(), backend.least());
    let better = "excluded.name IS NOT NULL AND (excluded.name_source > address_book.name_source \
                  OR (excluded.name_source = address_book.name_source AND excluded.name_source < 2 \
                  AND excluded.last_seen_ms >= address_book.last_seen_ms))";
    format!(
        "ON CONFLICT (tenant, username, address) DO UPDATE SET call_count = address_book.call_count + excluded.call_count, \
         name = CASE WHEN {better} THEN excluded.name ELSE address_book.name END, \
         name_source = CASE WHEN {better} THEN excluded.name_source ELSE address_book.name_source END, \
         last_seen_ms = {greatest}(address_book.last_seen_ms, excluded.last_seen_ms), \
         first_seen_ms = {least}(COALESCE(address_book.first_seen_ms, address_book.last_seen_ms), excluded.first_seen_ms), \
         known_calls = address_book.known_calls + excluded.known_calls, \
         incoming_calls = address_book.incoming_calls + excluded.incoming_calls, \
         outgoing_calls = address_book.outgoing_calls + excluded.outgoing_calls, \
         missed_calls = address_book.missed_calls + excluded.missed_calls \
         WHERE address_book.deleted = 0 \
         RETURNING username, {BOOK_COLUMNS}"
    )
}

/// Entries in a user's book (deleted ones, kept as tombstones, do not count).
async fn book_size(
    tx: &mut AnyConnection,
    (tenant, user): (&str, &str),
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM address_book WHERE tenant = $1 AND username = $2 AND deleted = 0",
    )
    .bind(tenant)
    .bind(user)
    .fetch_one(&mut *tx)
    .await?)
}

/// Deletes a book's `n` least valuable entries (never-known parties first, then the
/// fewest calls, then the oldest; favourites only after every other entry, blocked ones
/// never, as their block would go with them); returns their addresses.
async fn evict(
    tx: &mut AnyConnection,
    backend: Backend,
    (tenant, user): (&str, &str),
    n: i64,
) -> Result<Vec<String>, StoreError> {
    let evicted: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(evict_sql(backend)))
        .bind(tenant)
        .bind(user)
        .bind(n)
        .fetch_all(&mut *tx)
        .await?;
    metrics::counter!(crate::metrics::ADDRESS_BOOK_EVICTIONS_TOTAL).increment(evicted.len() as u64);
    Ok(evicted)
}

/// Deletes the `$3` least valuable entries of book (`$1`, `$2`), returning their addresses.
fn evict_sql(backend: Backend) -> String {
    // The order is the partial index `address_book_evictable`'s, named for SQLite: without
    // stats, SQLite 3.51's planner preferred the primary key and sorted the whole book.
    let index = match backend {
        Backend::Sqlite => "INDEXED BY address_book_evictable",
        Backend::Postgres => "",
    };
    format!(
        "DELETE FROM address_book WHERE tenant = $1 AND username = $2 AND address IN \
         (SELECT address FROM address_book {index} \
         WHERE tenant = $1 AND username = $2 AND deleted = 0 AND blocked = 0 \
         ORDER BY favourite, (known_calls > 0 OR added > 0), call_count, last_seen_ms, address LIMIT $3) RETURNING address"
    )
}

/// Several calls with one party of one book, summed up ([`add_contacts`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct ContactSum {
    pub(crate) name: Option<String>,
    /// End of the latest call that carried `name`.
    pub(crate) name_at: i64,
    pub(crate) first_ms: i64,
    pub(crate) last_ms: i64,
    pub(crate) calls: i64,
    pub(crate) known: i64,
    pub(crate) incoming: i64,
    pub(crate) outgoing: i64,
    pub(crate) missed: i64,
}

impl ContactSum {
    /// The rank of the name it carries ([`NameSource`]).
    pub(crate) fn name_source(&self) -> i64 {
        if self.name.is_some() {
            NameSource::CallerId as i64
        } else {
            0
        }
    }

    /// Counts one more call.
    pub(crate) fn add(&mut self, c: Contact<'_>) {
        let at = unix_ms(c.when);
        if self.calls == 0 {
            (self.first_ms, self.last_ms) = (at, at);
        }
        self.first_ms = self.first_ms.min(at);
        self.last_ms = self.last_ms.max(at);
        self.calls += 1;
        match c.kind {
            CallKind::Outgoing => (self.known, self.outgoing) = (self.known + 1, self.outgoing + 1),
            CallKind::Incoming { answered: true } => {
                (self.known, self.incoming) = (self.known + 1, self.incoming + 1)
            }
            CallKind::Incoming { answered: false } => {
                (self.incoming, self.missed) = (self.incoming + 1, self.missed + 1)
            }
        }
        // The newest caller id of the batch, as one call at a time would leave it.
        if let Some(n) = c.name
            && (self.name.is_none() || at >= self.name_at)
        {
            self.name = Some(book_name(n).to_owned());
            self.name_at = at;
        }
    }
}

/// Rows per multi-row statement (12 parameters each: well inside SQLite's 32,766).
/// Multi-row statements are not kept prepared (`persistent(false)`): each size of one
/// is another statement of thousands of parameters, and sqlx would cache up to 100 of
/// them per connection.
const BOOK_ROWS_PER_STATEMENT: usize = 500;

/// [`add_contact`] for many calls of one tenant at once: one multi-row upsert per
/// [`BOOK_ROWS_PER_STATEMENT`] parties, one size check per user with new entries: a few
/// statements per batch instead of two per call (each sqlx statement is a hand-off to its
/// thread). Counts, names and times come out as one call at a time would leave them; a
/// book over its limit loses its least valuable entries as they stand after the batch.
///
/// `sizes` remembers book sizes across calls (an import's batches): a book is counted
/// once, then its new entries are added up. Entries the CDR writer adds meanwhile are not
/// in it, so a book can pass its limit by those until the next eviction of either.
pub(crate) async fn add_contacts(
    tx: &mut AnyConnection,
    (backend, limit): (Backend, i64),
    tenant: &str,
    sums: &[((String, String), ContactSum)],
    sizes: &mut HashMap<String, i64>,
) -> Result<Vec<BookChange>, StoreError> {
    let mut batch = BookBatch::new(tenant, limit);
    let tail = book_upsert_tail(backend);
    let sums = BookBatch::valid(sums);
    for chunk in sums.chunks(BOOK_ROWS_PER_STATEMENT) {
        let sql = backend.positional(format!(
            "INSERT INTO address_book ({BOOK_INSERT_COLUMNS}) VALUES {} {tail}",
            value_rows(chunk.len(), 12)
        ));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((user, address), c) in chunk.iter() {
            q = q
                .bind(tenant)
                .bind(user.as_str())
                .bind(address.as_str())
                .bind(c.name.as_deref())
                .bind(c.calls)
                .bind(c.last_ms)
                .bind(c.known)
                .bind(c.incoming)
                .bind(c.outgoing)
                .bind(c.missed)
                .bind(c.first_ms)
                .bind(c.name_source());
        }
        let rows = q.persistent(false).fetch_all(&mut *tx).await?;
        // RETURNING gives one row per party, in no promised order: match by key.
        let counts: HashMap<(&str, &str), i64> = chunk
            .iter()
            .map(|((u, a), c)| ((u.as_str(), a.as_str()), c.calls))
            .collect();
        for r in &rows {
            let user: String = r.get("username");
            let entry = book_entry(r);
            let calls = counts
                .get(&(user.as_str(), entry.address.as_str()))
                .copied();
            batch.upserted(user, entry, calls);
        }
    }
    let uncounted = batch.uncounted(sizes);
    for chunk in uncounted.chunks(BOOK_ROWS_PER_STATEMENT) {
        let sql = backend.positional(format!(
            "SELECT username, COUNT(*) AS n FROM address_book WHERE deleted = 0 AND tenant = $1 \
             AND username IN ({}) GROUP BY username",
            placeholder_list(2, chunk.len())
        ));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant);
        for u in chunk {
            q = q.bind(u.as_str());
        }
        for r in q.persistent(false).fetch_all(&mut *tx).await? {
            sizes.insert(r.get("username"), r.get("n"));
        }
    }
    let mut evicted: HashMap<String, Vec<String>> = HashMap::new();
    for (user, over) in batch.over_limit(sizes, &uncounted) {
        let gone = evict(tx, backend, (tenant, &user), over).await?;
        evicted.insert(user, gone);
    }
    Ok(batch.changes(evicted))
}

/// What [`add_contacts`] and the import's SQLite writer (`import::sqlite`) decide without
/// the database: which parties are fit for a book, which entries are new, which books
/// passed their limit, and the changes to push.
pub(crate) struct BookBatch<'a> {
    tenant: &'a str,
    limit: i64,
    /// Users with new entries, and how many.
    grown: HashMap<String, i64>,
    /// Entries as the upserts left them, in upsert order.
    returned: Vec<(String, AddressBookEntry)>,
}

impl<'a> BookBatch<'a> {
    pub(crate) fn new(tenant: &'a str, limit: i64) -> Self {
        Self {
            tenant,
            limit,
            grown: HashMap::new(),
            returned: Vec::new(),
        }
    }

    /// The parties a book can hold (an empty or over-long address is counted and left out).
    pub(crate) fn valid(
        sums: &[((String, String), ContactSum)],
    ) -> Vec<&((String, String), ContactSum)> {
        sums.iter()
            .filter(|((_, address), _)| {
                let ok = !address.is_empty()
                    && address.len() <= parley_codecs::control::MAX_BOOK_ADDRESS_BYTES;
                if !ok {
                    metrics::counter!(crate::metrics::ADDRESS_BOOK_REFUSED_TOTAL).increment(1);
                }
                ok
            })
            .collect()
    }

    /// An entry an upsert returned; `calls`: how many calls this batch added to it.
    pub(crate) fn upserted(&mut self, user: String, entry: AddressBookEntry, calls: Option<i64>) {
        if calls == Some(entry.call_count as i64) {
            // Every call of this entry is from this batch: it is new.
            *self.grown.entry(user.clone()).or_default() += 1;
        }
        self.returned.push((user, entry));
    }

    /// Users with new entries whose book size is not known yet: count them (after this
    /// batch's upserts) into `sizes`.
    pub(crate) fn uncounted(&self, sizes: &HashMap<String, i64>) -> Vec<String> {
        self.grown
            .keys()
            .filter(|u| !sizes.contains_key(*u))
            .cloned()
            .collect()
    }

    /// Books over the limit once this batch is in, and by how many entries; `sizes` is
    /// brought up to date (books counted before this batch get its new entries added).
    pub(crate) fn over_limit(
        &self,
        sizes: &mut HashMap<String, i64>,
        counted_now: &[String],
    ) -> Vec<(String, i64)> {
        let counted_now: HashSet<&String> = counted_now.iter().collect();
        let mut over = Vec::new();
        for (user, new) in &self.grown {
            let Some(size) = sizes.get_mut(user) else {
                continue;
            };
            if !counted_now.contains(user) {
                *size += new;
            }
            if *size > self.limit {
                over.push((user.clone(), *size - self.limit));
                *size = self.limit;
            }
        }
        over
    }

    /// One change per user, found by name (a batch touches up to thousands of books),
    /// entries pushed as they are (each party is once in the batch), newest first;
    /// evicted entries are only removed.
    pub(crate) fn changes(self, evicted: HashMap<String, Vec<String>>) -> Vec<BookChange> {
        let mut changes: Vec<BookChange> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        let tenant = self.tenant;
        let mut change_of = |changes: &mut Vec<BookChange>, user: String| -> usize {
            *at.entry(user).or_insert_with_key(|user| {
                changes.push(BookChange {
                    tenant: tenant.to_owned(),
                    user: user.clone(),
                    upserted: Vec::new(),
                    removed: Vec::new(),
                });
                changes.len() - 1
            })
        };
        for (user, entry) in self.returned.into_iter().rev() {
            if evicted
                .get(&user)
                .is_some_and(|g| g.contains(&entry.address))
            {
                continue;
            }
            let i = change_of(&mut changes, user);
            changes[i].upserted.push(entry);
        }
        for (user, gone) in evicted {
            let i = change_of(&mut changes, user);
            changes[i].removed = gone;
        }
        changes
    }
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS users (tenant TEXT NOT NULL, username TEXT NOT NULL, number TEXT NOT NULL, password_hash TEXT NOT NULL, display_name TEXT, numbers TEXT, source TEXT NOT NULL DEFAULT 'local', PRIMARY KEY (tenant, username))",
    "CREATE TABLE IF NOT EXISTS cdrs (call_id TEXT NOT NULL, sip_call_id TEXT NOT NULL, tenant TEXT NOT NULL, username TEXT NOT NULL, caller TEXT NOT NULL, caller_name TEXT, called TEXT NOT NULL, route TEXT NOT NULL, start_ms INTEGER NOT NULL, answer_ms INTEGER, end_ms INTEGER NOT NULL, start_time TEXT NOT NULL, answer_time TEXT, end_time TEXT NOT NULL, duration_secs REAL NOT NULL, disposition TEXT NOT NULL, sip_cause INTEGER NOT NULL, packets_in INTEGER NOT NULL, packets_out INTEGER NOT NULL, answered_by TEXT, direction TEXT NOT NULL DEFAULT 'in', dialled_by TEXT)",
    "CREATE TABLE IF NOT EXISTS address_book (tenant TEXT NOT NULL, username TEXT NOT NULL, address TEXT NOT NULL, name TEXT, call_count INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL, known_calls INTEGER NOT NULL DEFAULT 0, incoming_calls INTEGER NOT NULL DEFAULT 0, outgoing_calls INTEGER NOT NULL DEFAULT 0, missed_calls INTEGER NOT NULL DEFAULT 0, first_seen_ms INTEGER, name_source INTEGER NOT NULL DEFAULT 0, note TEXT, favourite INTEGER NOT NULL DEFAULT 0, blocked INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0, added INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, username, address)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS carrier_cdrs (key TEXT PRIMARY KEY, tenant TEXT NOT NULL, src TEXT NOT NULL, src_name TEXT, dst TEXT NOT NULL, start_ms INTEGER NOT NULL, answer_ms INTEGER, end_ms INTEGER NOT NULL, disposition TEXT NOT NULL, format TEXT NOT NULL, imported_ms INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS preferences (tenant TEXT NOT NULL, username TEXT NOT NULL, json TEXT NOT NULL, updated_ms INTEGER NOT NULL, PRIMARY KEY (tenant, username))",
    "CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, region TEXT NOT NULL, directory INTEGER NOT NULL, created_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tenant_federation (tenant TEXT NOT NULL, peer TEXT NOT NULL, PRIMARY KEY (tenant, peer))",
    "CREATE TABLE IF NOT EXISTS enrolment_tokens (hash TEXT PRIMARY KEY, tenant TEXT NOT NULL, expires_ms INTEGER NOT NULL, used INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS agents (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, revoked INTEGER NOT NULL, enrolled_ms INTEGER NOT NULL)",
    // AUTOINCREMENT: message ids are never reused, even after retention empties the table
    // (devices tell messages apart by id).
    "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conv TEXT NOT NULL, from_tenant TEXT NOT NULL, from_user TEXT NOT NULL, to_tenant TEXT NOT NULL, to_user TEXT NOT NULL, text TEXT NOT NULL, sent_ms INTEGER NOT NULL, delivered_ms INTEGER, read_ms INTEGER)",
    "CREATE TABLE IF NOT EXISTS agent_certs (fingerprint TEXT PRIMARY KEY, agent_id TEXT NOT NULL, not_after_ms INTEGER NOT NULL)",
];

/// Columns added after a table was first created: (table, column, type). Added at start-up
/// when missing, so databases from older versions keep working.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("cdrs", "answered_by", "TEXT"),
    ("cdrs", "direction", "TEXT NOT NULL DEFAULT 'in'"),
    ("cdrs", "dialled_by", "TEXT"),
    ("cdrs", "node", "TEXT NOT NULL DEFAULT ''"),
    ("address_book", "known_calls", "INTEGER NOT NULL DEFAULT 0"),
    (
        "address_book",
        "incoming_calls",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "address_book",
        "outgoing_calls",
        "INTEGER NOT NULL DEFAULT 0",
    ),
    ("address_book", "missed_calls", "INTEGER NOT NULL DEFAULT 0"),
    ("address_book", "first_seen_ms", "INTEGER"),
    ("address_book", "name_source", "INTEGER NOT NULL DEFAULT 0"),
    ("address_book", "note", "TEXT"),
    ("address_book", "favourite", "INTEGER NOT NULL DEFAULT 0"),
    ("address_book", "blocked", "INTEGER NOT NULL DEFAULT 0"),
    ("address_book", "deleted", "INTEGER NOT NULL DEFAULT 0"),
    ("address_book", "added", "INTEGER NOT NULL DEFAULT 0"),
    ("users", "display_name", "TEXT"),
    ("users", "numbers", "TEXT"),
    ("users", "source", "TEXT NOT NULL DEFAULT 'local'"),
];

/// Indexes, created after [`ADDED_COLUMNS`] and [`RENAMED_COLUMNS`] (which they may name).
const INDEXES: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS cdrs_user ON cdrs (tenant, username, end_ms)",
    "CREATE INDEX IF NOT EXISTS cdrs_dialled ON cdrs (tenant, dialled_by, end_ms) WHERE dialled_by IS NOT NULL",
    // A call's opening row, found again when the call ends (`complete_cdr`): without it
    // every call's end scanned the whole table. Partial, so it holds only calls in
    // progress and costs nothing once they end.
    "CREATE INDEX IF NOT EXISTS cdrs_open ON cdrs (call_id, start_ms) WHERE disposition = 'IN_PROGRESS'",
    "CREATE INDEX IF NOT EXISTS messages_conv ON messages (conv, id)",
    "CREATE INDEX IF NOT EXISTS messages_inbox ON messages (to_tenant, to_user, id) WHERE delivered_ms IS NULL",
    "CREATE INDEX IF NOT EXISTS messages_sent ON messages (sent_ms)",
    // Replaced by `address_book_evictable` (tombstones, blocks and favourites).
    "DROP INDEX IF EXISTS address_book_value",
    // Eviction's order (least valuable first) without sorting the book; only entries
    // eviction may take.
    "CREATE INDEX IF NOT EXISTS address_book_evictable ON address_book \
     (tenant, username, favourite, (known_calls > 0 OR added > 0), call_count, last_seen_ms, address) \
     WHERE deleted = 0 AND blocked = 0",
];

/// Columns renamed since a table was first created: (table, old, new). `user` became
/// `username` when PostgreSQL joined (there `user` is a reserved word); SQLite databases of
/// older versions are renamed in place at start-up.
const RENAMED_COLUMNS: &[(&str, &str, &str)] = &[
    ("users", "user", "username"),
    ("cdrs", "user", "username"),
    ("address_book", "user", "username"),
    ("preferences", "user", "username"),
];

/// Columns only PostgreSQL's tables have: the row ids of `cdrs` and `users` (SQLite's
/// are their `rowid`s).
const POSTGRES_COLUMNS: &[(&str, &str, &str)] =
    &[("cdrs", "id", "BIGSERIAL"), ("users", "id", "BIGSERIAL")];

/// A schema statement (written in SQLite's types) in `backend`'s types: integers are
/// 64-bit, reals double precision, an `AUTOINCREMENT` key a sequence (which never reuses
/// an id either).
fn ddl(backend: Backend, stmt: &str) -> String {
    match backend {
        Backend::Sqlite => stmt.to_owned(),
        Backend::Postgres => stmt
            .replace(" WITHOUT ROWID", "")
            .replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
            .replace(" INTEGER", " BIGINT")
            .replace(" REAL", " DOUBLE PRECISION"),
    }
}

/// Whether `table` has `column`.
async fn has_column(
    pool: &AnyPool,
    backend: Backend,
    table: &str,
    column: &str,
) -> Result<bool, StoreError> {
    let sql = match backend {
        Backend::Sqlite => "SELECT 1 FROM pragma_table_info($1) WHERE name = $2",
        Backend::Postgres => {
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() \
             AND table_name = $1 AND column_name = $2"
        }
    };
    Ok(sqlx::query(sql)
        .bind(table)
        .bind(column)
        .fetch_optional(pool)
        .await?
        .is_some())
}

/// Creates the schema, or brings one of an older version up to date: tables, renamed
/// and added columns, then indexes. Every step is idempotent: a node restarted on a
/// database it migrated changes nothing.
async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    let run = |stmt: String| async move {
        // Fixed schema strings compiled into the binary, not user input.
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt)).execute(pool).await
    };
    for stmt in SCHEMA {
        run(ddl(backend, stmt)).await?;
    }
    for (table, old, new) in RENAMED_COLUMNS {
        if has_column(pool, backend, table, old).await? {
            tracing::info!(table, old, new, "renaming a column of an existing database");
            run(format!("ALTER TABLE {table} RENAME COLUMN {old} TO {new}")).await?;
        }
    }
    let extra: &[(&str, &str, &str)] = match backend {
        Backend::Sqlite => &[],
        Backend::Postgres => POSTGRES_COLUMNS,
    };
    for (table, column, ty) in ADDED_COLUMNS.iter().chain(extra) {
        if !has_column(pool, backend, table, column).await? {
            tracing::info!(table, column, "adding column to an existing database");
            let stmt = match backend {
                Backend::Sqlite => format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"),
                // Two nodes starting at once: the second finds it there.
                Backend::Postgres => format!(
                    "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {}",
                    ddl(backend, &format!(" {ty}")).trim_start()
                ),
            };
            run(stmt).await?;
        }
    }
    if backend == Backend::Sqlite {
        for table in CLUSTERED {
            cluster(pool, table).await?;
        }
    }
    for stmt in INDEXES {
        run(ddl(backend, stmt)).await?;
    }
    Ok(())
}

/// SQLite tables stored in their primary key's order (`WITHOUT ROWID`): one B-tree a row
/// instead of a table and a key index. Each book upsert and each imported row's key
/// touched both; clustered, a 1 M-row import ran 6–13% faster (alternated A/B runs,
/// `docs/BENCHMARKS.md`). Databases of older versions have them as rowid tables and are
/// rebuilt at start-up ([`cluster`]).
const CLUSTERED: &[&str] = &["address_book", "carrier_cdrs"];

/// Rebuilds `table` as a `WITHOUT ROWID` table (SQLite cannot alter that in place) when it
/// is not one yet: a copy in the schema's layout, filled from the old one by column name,
/// then put in its place, in one transaction. Its indexes go with the old table and
/// [`INDEXES`] creates them again.
async fn cluster(pool: &AnyPool, table: &str) -> Result<(), StoreError> {
    let sql: Option<String> =
        sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = $1")
            .bind(table)
            .fetch_optional(pool)
            .await?;
    if sql.is_none_or(|s| s.contains("WITHOUT ROWID")) {
        return Ok(());
    }
    let create = SCHEMA
        .iter()
        .find_map(|s| s.strip_prefix(&*format!("CREATE TABLE IF NOT EXISTS {table} (")))
        .ok_or_else(|| StoreError::Task(format!("no schema for table {table}")))?;
    let rows: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(pool)
            .await?;
    tracing::info!(
        table,
        rows,
        "rebuilding a table of an older database in its key's order"
    );
    let mut tx = pool.begin().await?;
    // Names compiled into the binary and columns of the schema, not user input.
    let copy = format!("{table}_clustered");
    for stmt in [
        format!("DROP TABLE IF EXISTS {copy}"),
        format!("CREATE TABLE {copy} ({create}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .execute(&mut *tx)
            .await?;
    }
    // The columns both have (an older table has every column of the schema once
    // `ADDED_COLUMNS` ran; one the schema dropped would stay behind).
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pragma_table_info($1) WHERE name IN (SELECT name FROM pragma_table_info($2))",
    )
    .bind(table)
    .bind(&copy)
    .fetch_all(&mut *tx)
    .await?;
    let columns = columns.join(", ");
    for stmt in [
        format!("INSERT INTO {copy} ({columns}) SELECT {columns} FROM {table}"),
        format!("DROP TABLE {table}"),
        format!("ALTER TABLE {copy} RENAME TO {table}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Store;

    both_backends! {
    /// A batch of calls summed by `add_contacts` leaves each book as one call at a time
    /// through `add_contact` does: counts, names, first/last seen (and here, evictions).
    async fn summed_contacts_leave_the_book_one_call_at_a_time_would(store: Store) {
        use crate::store::{CallKind, Contact, ContactSum, add_contact, add_contacts};
        use std::time::{Duration, UNIX_EPOCH};
        let store = store.with_book_limit(4);
        let calls: Vec<(&str, Option<&str>, u64, CallKind)> = vec![
            (
                "+1",
                Some("Old Name"),
                10,
                CallKind::Incoming { answered: true },
            ),
            ("+2", None, 11, CallKind::Incoming { answered: false }),
            (
                "+1",
                Some("New Name"),
                12,
                CallKind::Incoming { answered: false },
            ),
            ("+3", None, 13, CallKind::Outgoing),
            ("+1", None, 14, CallKind::Outgoing),
            (
                "+4",
                Some("Four"),
                15,
                CallKind::Incoming { answered: true },
            ),
            ("+5", None, 16, CallKind::Incoming { answered: false }),
            ("+6", None, 9, CallKind::Incoming { answered: true }),
        ];
        let contact =
            |(a, n, t, k): &(&'static str, Option<&'static str>, u64, CallKind)| Contact {
                address: a,
                name: *n,
                when: UNIX_EPOCH + Duration::from_secs(*t),
                kind: *k,
            };
        let mut tx = store.pool.begin().await.unwrap();
        for c in &calls {
            add_contact(&mut tx, (store.backend(), 4), ("t", "one"), contact(c))
                .await
                .unwrap();
        }
        let mut sums: Vec<((String, String), ContactSum)> = Vec::new();
        for c in &calls {
            let k = ("many".to_owned(), c.0.to_owned());
            match sums.iter_mut().find(|(key, _)| *key == k) {
                Some((_, s)) => s.add(contact(c)),
                None => {
                    let mut s = ContactSum::default();
                    s.add(contact(c));
                    sums.push((k, s));
                }
            }
        }
        let changes = add_contacts(&mut tx, (store.backend(), 4), "t", &sums, &mut Default::default())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let one = store.address_book("t", "one").await.unwrap();
        let many = store.address_book("t", "many").await.unwrap();
        assert_eq!(one.len(), 4, "{one:#?}");
        assert_eq!(one, many);
        let first = one.iter().find(|e| e.address == "+1").unwrap();
        assert_eq!(first.name.as_deref(), Some("New Name"));
        assert_eq!((first.incoming, first.outgoing, first.missed), (2, 1, 1));
        // What changed is what the book now holds.
        assert_eq!(changes.len(), 1);
        let mut sent: Vec<_> = changes[0]
            .upserted
            .iter()
            .map(|e| e.address.clone())
            .collect();
        sent.sort();
        let mut held: Vec<_> = many.iter().map(|e| e.address.clone()).collect();
        held.sort();
        assert_eq!(sent, held);
    }
    }

    both_backends! {
    async fn unknown_tenant_unknown_user_and_wrong_password_look_the_same(store: Store) {
        store
            .ensure_user("demo", "alice", "+15550100001", "right")
            .await
            .unwrap();
        assert!(
            store
                .verify("demo", "alice", "right")
                .await
                .unwrap()
                .is_some()
        );
        for (tenant, user, pw) in [
            ("demo", "alice", "wrong"),
            ("demo", "mallory", "right"),
            ("nowhere", "alice", "right"),
        ] {
            assert!(
                store.verify(tenant, user, pw).await.unwrap().is_none(),
                "{tenant}/{user}"
            );
        }
        // The decoy an unknown user is checked against is a real Argon2id hash with the
        // parameters of stored ones, so the work is the same.
        let stored: String = sqlx::query_scalar("SELECT password_hash FROM users")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        let params = |h: &str| h.split('$').take(4).collect::<Vec<_>>().join("$");
        assert_eq!(params(&store.decoy), params(&stored));
        assert!(store.decoy.starts_with("$argon2id$"));
    }
    }

    #[test]
    fn many_parameter_statements_are_positional_on_sqlite() {
        use super::{Backend, placeholder_list, value_rows};
        let sql = format!(
            "INSERT INTO t VALUES {} WHERE x IN ({})",
            value_rows(2, 2),
            placeholder_list(5, 2)
        );
        assert_eq!(
            sql,
            "INSERT INTO t VALUES ($1, $2), ($3, $4) WHERE x IN ($5, $6)"
        );
        assert_eq!(
            Backend::Sqlite.positional(sql.clone()),
            "INSERT INTO t VALUES (?, ?), (?, ?) WHERE x IN (?, ?)"
        );
        assert_eq!(Backend::Postgres.positional(sql.clone()), sql);
    }

    /// A database of the version before PostgreSQL (columns named `user`, no
    /// `address_book_evictable` yet) opens: its columns are renamed in place and every row
    /// reads as before.
    #[tokio::test]
    async fn an_older_sqlite_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let url = super::StoreUrl::sqlite_in(dir.path());
        {
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(url.url.expose()).await.unwrap();
            for stmt in [
                "CREATE TABLE users (tenant TEXT NOT NULL, user TEXT NOT NULL, number TEXT NOT NULL, password_hash TEXT NOT NULL, PRIMARY KEY (tenant, user))",
                "CREATE TABLE cdrs (call_id TEXT NOT NULL, sip_call_id TEXT NOT NULL, tenant TEXT NOT NULL, user TEXT NOT NULL, caller TEXT NOT NULL, caller_name TEXT, called TEXT NOT NULL, route TEXT NOT NULL, start_ms INTEGER NOT NULL, answer_ms INTEGER, end_ms INTEGER NOT NULL, start_time TEXT NOT NULL, answer_time TEXT, end_time TEXT NOT NULL, duration_secs REAL NOT NULL, disposition TEXT NOT NULL, sip_cause INTEGER NOT NULL, packets_in INTEGER NOT NULL, packets_out INTEGER NOT NULL)",
                "CREATE INDEX cdrs_user ON cdrs (tenant, user, end_ms)",
                "CREATE TABLE address_book (tenant TEXT NOT NULL, user TEXT NOT NULL, address TEXT NOT NULL, name TEXT, call_count INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL, PRIMARY KEY (tenant, user, address))",
                "CREATE TABLE preferences (tenant TEXT NOT NULL, user TEXT NOT NULL, json TEXT NOT NULL, updated_ms INTEGER NOT NULL, PRIMARY KEY (tenant, user))",
                "INSERT INTO users VALUES ('demo', 'alice', '+15550100001', 'x')",
                "INSERT INTO cdrs VALUES ('c-1', 'c-1@gw', 'demo', 'alice', '+15557770001', NULL, '+15550100001', 'im', 1000, 2000, 5000, 't0', 't1', 't2', 3.0, 'ANSWERED', 200, 1, 2)",
                "INSERT INTO address_book VALUES ('demo', 'alice', '+15557770001', 'Old Friend', 3, 5000)",
                "INSERT INTO preferences VALUES ('demo', 'alice', '{}', 1)",
                // The layout before it was clustered (a rowid table and a key index).
                "CREATE TABLE carrier_cdrs (key TEXT PRIMARY KEY, tenant TEXT NOT NULL, src TEXT NOT NULL, src_name TEXT, dst TEXT NOT NULL, start_ms INTEGER NOT NULL, answer_ms INTEGER, end_ms INTEGER NOT NULL, disposition TEXT NOT NULL, format TEXT NOT NULL, imported_ms INTEGER NOT NULL)",
                "INSERT INTO carrier_cdrs VALUES ('demo:asterisk:id:1', 'demo', '+15557770001', NULL, '+15550100001', 1000, NULL, 2000, 'NO ANSWER', 'asterisk', 3000)",
            ] {
                sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            pool.close().await;
        }
        let store = Store::open(dir.path()).await.unwrap();
        let users = store.users().await.unwrap();
        assert_eq!(
            (users[0].user.as_str(), users[0].number.as_str()),
            ("alice", "+15550100001")
        );
        let cdrs = store.cdrs(Some("demo"), Some("alice"), 10).await.unwrap();
        assert_eq!(
            (cdrs[0].call_id.as_str(), cdrs[0].direction.as_str()),
            ("c-1", "in")
        );
        let book = store.address_book("demo", "alice").await.unwrap();
        assert_eq!(book[0].name.as_deref(), Some("Old Friend"));
        assert_eq!(book[0].call_count, 3);
        assert_eq!(
            store.preferences("demo", "alice").await.unwrap().as_deref(),
            Some("{}")
        );
        // The book and the carrier keys are clustered now, with their rows, and the
        // key still refuses a second copy of the row.
        for table in ["address_book", "carrier_cdrs"] {
            let sql: String = sqlx::query_scalar(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = $1",
            )
            .bind(table)
            .fetch_one(&store.pool)
            .await
            .unwrap();
            assert!(sql.ends_with("WITHOUT ROWID"), "{sql}");
        }
        let again = sqlx::query(
            "INSERT INTO carrier_cdrs (key, tenant, src, dst, start_ms, end_ms, disposition, format, imported_ms) \
             VALUES ('demo:asterisk:id:1', 'demo', '+1', '+2', 1, 2, 'ANSWERED', 'asterisk', 4) ON CONFLICT (key) DO NOTHING",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        assert_eq!(again.rows_affected(), 0);
        let kept: (String, i64) = sqlx::query_as(
            "SELECT disposition, imported_ms FROM carrier_cdrs WHERE key = 'demo:asterisk:id:1'",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!(kept, ("NO ANSWER".to_owned(), 3000));
        // The book's indexes are there again (eviction names one).
        let evictable: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'address_book_evictable'",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!(evictable, 1);
        // Opening it again changes nothing.
        drop(store);
        let again = Store::open(dir.path()).await.unwrap();
        assert_eq!(again.address_book("demo", "alice").await.unwrap(), book);
    }

    fn cdr(call: &str, disposition: parley_core::cdr::Disposition) -> parley_core::cdr::CdrRecord {
        use parley_core::cdr::{CallRoute, CdrRecord, Direction};
        let start =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        CdrRecord {
            call_id: call.into(),
            sip_call_id: format!("{call}@gw"),
            tenant: "demo".into(),
            user: "alice".into(),
            caller: "+15557770001".into(),
            caller_name: None,
            called: "+15550100001".into(),
            route: CallRoute::Im,
            start,
            answer: Some(start + std::time::Duration::from_secs(1)),
            end: start + std::time::Duration::from_secs(5),
            disposition,
            cause: 200,
            packets_in: 10,
            packets_out: 11,
            answered_by: Some("desk".into()),
            direction: Direction::In,
            dialled_by: None,
        }
    }

    both_backends! {
    /// A user's call history (what a device reads with `call_history`) holds their own
    /// calls and the calls they dialled, never another user's, nor a namesake's of another
    /// tenant.
    async fn call_history_is_the_users_own(store: Store) {
        use parley_core::cdr::Disposition::Answered;
        let alice_in = cdr("alice-in", Answered);
        let mut bob_in = cdr("bob-in", Answered);
        bob_in.user = "bob".into();
        let mut alice_to_bob = cdr("alice-to-bob", Answered);
        alice_to_bob.user = "bob".into();
        alice_to_bob.dialled_by = Some(parley_core::directory::UserIdentity {
            tenant: "demo".into(),
            user: "alice".into(),
            number: "+15550100001".into(),
        });
        let mut namesake = cdr("other-alice", Answered);
        namesake.tenant = "other".into();
        store
            .record_calls(&[alice_in, bob_in, alice_to_bob, namesake])
            .await
            .unwrap();
        let ids = |tenant: &'static str, user: &'static str| {
            let store = store.clone();
            async move {
                let (calls, _) = store.call_history((tenant, user), None, 100).await.unwrap();
                let mut ids: Vec<String> = calls.into_iter().map(|(c, _)| c.call_id).collect();
                ids.sort();
                ids
            }
        };
        assert_eq!(ids("demo", "alice").await, ["alice-in", "alice-to-bob"]);
        assert_eq!(ids("demo", "bob").await, ["alice-to-bob", "bob-in"]);
        assert_eq!(ids("other", "alice").await, ["other-alice"]);
        assert!(ids("demo", "carol").await.is_empty());
    }
    }

    both_backends! {
    /// Retention deletes CDRs that ended before the cut (in chunks), keeps newer ones and
    /// calls still in progress, and leaves the address book as it was.
    async fn expired_cdrs_go_and_the_address_book_stays(store: Store) {
        use parley_core::cdr::Disposition::{Answered, InProgress};
        use std::time::Duration;
        let mut rows: Vec<_> = (0..5).map(|i| cdr(&format!("old-{i}"), Answered)).collect();
        let mut new = cdr("new", Answered);
        new.end += Duration::from_secs(86_400);
        new.caller = "+15557770002".into();
        rows.push(new);
        let mut open = cdr("open", InProgress);
        open.end = open.start;
        rows.push(open);
        store.record_calls(&rows).await.unwrap();
        let book = store.address_book("demo", "alice").await.unwrap();
        assert_eq!(book.len(), 2);
        let cut = rows[0].end + Duration::from_secs(1);
        assert_eq!(store.expire_cdrs(cut, 2).await.unwrap(), 5);
        let left = store.cdrs(None, None, 100).await.unwrap();
        assert_eq!(
            left.iter().map(|c| c.call_id.as_str()).collect::<Vec<_>>(),
            ["new"]
        );
        let open_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM cdrs WHERE call_id = 'open'")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(open_rows, 1, "a call in progress is not expired");
        assert_eq!(store.address_book("demo", "alice").await.unwrap(), book);
        assert_eq!(store.expire_cdrs(cut, 2).await.unwrap(), 0);
    }
    }

    both_backends! {
    async fn a_calls_opening_row_is_completed_once_or_closed_as_interrupted(store: Store) {
        use parley_core::cdr::Disposition::{Answered, InProgress};
        let opening = |call| parley_core::cdr::CdrRecord {
            disposition: InProgress,
            answer: None,
            ..cdr(call, InProgress)
        };
        store
            .record_calls(&[opening("c-1"), opening("c-2")])
            .await
            .unwrap();
        assert!(
            store.cdrs(None, None, 10).await.unwrap().is_empty(),
            "open rows are not listed"
        );
        // c-1 ends: its row is completed, not duplicated; the caller joins the book once.
        store.record_calls(&[cdr("c-1", Answered)]).await.unwrap();
        let rows = store.cdrs(None, None, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].disposition.as_str(), rows[0].packets_out),
            ("ANSWERED", 11)
        );
        assert_eq!(store.address_book("demo", "alice").await.unwrap().len(), 1);
        // c-2 was up when the node died: the next start closes it.
        assert_eq!(store.close_interrupted(None).await.unwrap(), 1);
        assert_eq!(
            store.close_interrupted(None).await.unwrap(),
            0,
            "closed once"
        );
        let rows = store.cdrs(None, None, 10).await.unwrap();
        let c2 = rows.iter().find(|r| r.call_id == "c-2").unwrap();
        assert_eq!(c2.disposition, "INTERRUPTED");
        assert_eq!(
            c2.end_time, c2.start_time,
            "after a crash the end is unknown"
        );
        // Another cluster node wrote c-2's CDR: this row goes, and only this one (by call
        // id, SIP Call-ID, start window, INTERRUPTED).
        let start_ms = 1_800_000_000_000;
        let drop = |call: &'static str, sip: &'static str, from: u64, to: u64| {
            let store = store.clone();
            async move { store.drop_interrupted_cdr(call, sip, from, to).await.unwrap() }
        };
        assert_eq!(drop("c-2", "other@gw", 0, u64::MAX).await, 0);
        assert_eq!(drop("c-2", "c-2@gw", start_ms + 1, u64::MAX).await, 0);
        assert_eq!(drop("c-1", "c-1@gw", 0, u64::MAX).await, 0, "answered rows stay");
        assert_eq!(drop("c-2", "c-2@gw", start_ms - 60_000, start_ms).await, 1);
        let rows = store.cdrs(None, None, 10).await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.call_id.as_str()).collect::<Vec<_>>(),
            ["c-1"]
        );

        // Two cluster nodes on one database, both with a call c-9 up: a restart of one
        // closes its own row only, and the other's call still completes its own row.
        let (a, b) = (store.clone().with_node("a"), store.clone().with_node("b"));
        a.record_calls(&[opening("c-9")]).await.unwrap();
        b.record_calls(&[opening("c-9")]).await.unwrap();
        assert_eq!(a.close_interrupted(None).await.unwrap(), 1, "a's own row");
        b.record_calls(&[cdr("c-9", Answered)]).await.unwrap();
        let rows = store.cdrs(None, None, 10).await.unwrap();
        let mut c9: Vec<&str> = rows
            .iter()
            .filter(|r| r.call_id == "c-9")
            .map(|r| r.disposition.as_str())
            .collect();
        c9.sort_unstable();
        assert_eq!(c9, ["ANSWERED", "INTERRUPTED"], "one row per node's call");
        assert_eq!(b.drop_interrupted_cdr("c-9", "c-9@gw", 0, u64::MAX).await.unwrap(), 0);
        assert_eq!(a.drop_interrupted_cdr("c-9", "c-9@gw", 0, u64::MAX).await.unwrap(), 1);
    }
    }
}
