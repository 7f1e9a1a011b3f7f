//! The import's writer for an SQLite store: a rusqlite connection of its own to the
//! store's file, driven on a blocking thread, one prepared statement per row.
//!
//! Why not the pool: sqlx's SQLite driver runs every statement on the connection's worker
//! thread and sends each returned row back over a channel, and its `Any` driver converts
//! every bound value and returned row. An import writes a key and upserts a book entry
//! per row; through the pool that was a third of SQLite's own work
//! (`docs/BENCHMARKS.md`). Here a statement is prepared once per import and each row is
//! a bind and a step on this thread, inside one `BEGIN IMMEDIATE` transaction per batch.
//! The SQL is the pool's (`$N` parameters, which SQLite numbers in order of first use).
//!
//! The file is the pool's: WAL (set by the pool, kept in the file), the same busy
//! timeout, so the CDR writer and the import take turns at SQLite's write lock.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OpenFlags, Row, Transaction, TransactionBehavior, params};

use super::{CARRIER_COLUMNS, Matched, sum_fresh};
use crate::store::{
    AddressBookEntry, BOOK_INSERT_COLUMNS, Backend, BookBatch, BookChange, BookRow, ContactSum,
    book_upsert_tail, evict_sql, unix_ms, value_rows,
};

/// An open import connection and what it remembers between batches.
pub(super) struct SqliteWriter {
    conn: Connection,
    /// Most entries a book holds.
    limit: i64,
    /// Book sizes counted so far ([`BookBatch::over_limit`]).
    sizes: HashMap<String, i64>,
    /// The statements, written once.
    sql: Statements,
}

struct Statements {
    insert_key: String,
    upsert: String,
    size: &'static str,
    evict: String,
}

impl SqliteWriter {
    /// Opens the store's file (which the pool created and migrated).
    pub(super) fn open(path: &Path, limit: i64) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // As the pool's connections (`Store::connect`).
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "cache_size", -32768)?;
        Ok(Self {
            conn,
            limit,
            sizes: HashMap::new(),
            sql: Statements {
                insert_key: format!(
                    "INSERT INTO carrier_cdrs ({CARRIER_COLUMNS}) VALUES {} ON CONFLICT (key) DO NOTHING",
                    value_rows(1, 11)
                ),
                upsert: format!(
                    "INSERT INTO address_book ({BOOK_INSERT_COLUMNS}) VALUES {} {}",
                    value_rows(1, 12),
                    book_upsert_tail(Backend::Sqlite)
                ),
                size: "SELECT COUNT(*) FROM address_book WHERE deleted = 0 AND tenant = $1 AND username = $2",
                evict: evict_sql(Backend::Sqlite),
            },
        })
    }

    /// Writes one batch in one transaction: whether each row was new, and the books'
    /// changes.
    pub(super) fn apply(
        &mut self,
        tenant: &str,
        format: &str,
        matched: &[Matched],
    ) -> rusqlite::Result<(Vec<bool>, Vec<BookChange>)> {
        let now = unix_ms(SystemTime::now());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut fresh = Vec::with_capacity(matched.len());
        {
            let mut insert = tx.prepare_cached(&self.sql.insert_key)?;
            for m in matched {
                let added = insert.execute(params![
                    m.key,
                    tenant,
                    m.src,
                    m.row.src_name,
                    m.dst,
                    unix_ms(m.row.start),
                    m.row.answer.map(unix_ms),
                    unix_ms(m.row.end),
                    m.row.disposition,
                    format,
                    now,
                ])?;
                // A repeat within the file is a duplicate like one from an earlier import.
                fresh.push(added == 1);
            }
        }
        let mut sums = sum_fresh(matched, &fresh);
        // In the book's key order: a book's entries are upserted one after the other,
        // so consecutive rows find their pages in the cache.
        sums.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let changes = add_contacts(&tx, &self.sql, (tenant, self.limit), &sums, &mut self.sizes)?;
        tx.commit()?;
        Ok((fresh, changes))
    }
}

/// [`crate::store::add_contacts`], a row at a time on this connection.
fn add_contacts(
    tx: &Transaction<'_>,
    sql: &Statements,
    (tenant, limit): (&str, i64),
    sums: &[((String, String), ContactSum)],
    sizes: &mut HashMap<String, i64>,
) -> rusqlite::Result<Vec<BookChange>> {
    let mut batch = BookBatch::new(tenant, limit);
    {
        let mut upsert = tx.prepare_cached(&sql.upsert)?;
        for ((user, address), c) in BookBatch::valid(sums) {
            let mut rows = upsert.query(params![
                tenant,
                user,
                address,
                c.name,
                c.calls,
                c.last_ms,
                c.known,
                c.incoming,
                c.outgoing,
                c.missed,
                c.first_ms,
                c.name_source(),
            ])?;
            // No row: the entry is a tombstone (deleted by its user), left as it is.
            if let Some(r) = rows.next()? {
                batch.upserted(user.clone(), entry(r)?, Some(c.calls));
            }
        }
    }
    let uncounted = batch.uncounted(sizes);
    {
        let mut size = tx.prepare_cached(sql.size)?;
        for user in &uncounted {
            let n: i64 = size.query_row(params![tenant, user], |r| r.get(0))?;
            sizes.insert(user.clone(), n);
        }
    }
    let mut evicted: HashMap<String, Vec<String>> = HashMap::new();
    let mut evict = tx.prepare_cached(&sql.evict)?;
    for (user, over) in batch.over_limit(sizes, &uncounted) {
        let gone = evict
            .query_map(params![tenant, user, over], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        metrics::counter!(crate::metrics::ADDRESS_BOOK_EVICTIONS_TOTAL)
            .increment(gone.len() as u64);
        evicted.insert(user, gone);
    }
    Ok(batch.changes(evicted))
}

/// The entry an upsert returned (`RETURNING username, BOOK_COLUMNS`).
fn entry(r: &Row<'_>) -> rusqlite::Result<AddressBookEntry> {
    Ok(BookRow {
        address: r.get("address")?,
        name: r.get("name")?,
        note: r.get("note")?,
        call_count: r.get("call_count")?,
        last_seen_ms: r.get("last_seen_ms")?,
        first_seen_ms: r.get("first_seen_ms")?,
        known_calls: r.get("known_calls")?,
        incoming_calls: r.get("incoming_calls")?,
        outgoing_calls: r.get("outgoing_calls")?,
        missed_calls: r.get("missed_calls")?,
        favourite: r.get("favourite")?,
        blocked: r.get("blocked")?,
        added: r.get("added")?,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, UNIX_EPOCH};

    use super::SqliteWriter;
    use crate::store::{BookChange, CallKind, Contact, ContactSum};

    /// Calls summed per party for `user`, as an import's batch sums them.
    fn sums(
        user: &str,
        calls: &[(&'static str, Option<&'static str>, u64, CallKind)],
    ) -> Vec<((String, String), ContactSum)> {
        let mut sums: Vec<((String, String), ContactSum)> = Vec::new();
        for (a, n, t, k) in calls {
            let c = Contact {
                address: a,
                name: *n,
                when: UNIX_EPOCH + Duration::from_secs(*t),
                kind: *k,
            };
            let key = (user.to_owned(), (*a).to_owned());
            match sums.iter_mut().find(|(k, _)| *k == key) {
                Some((_, s)) => s.add(c),
                None => {
                    let mut s = ContactSum::default();
                    s.add(c);
                    sums.push((key, s));
                }
            }
        }
        sums
    }

    /// A change with its user's name taken out, entries in address order.
    fn plain(
        mut changes: Vec<BookChange>,
    ) -> Vec<(Vec<crate::store::AddressBookEntry>, Vec<String>)> {
        changes.sort_by(|a, b| a.user.cmp(&b.user));
        changes
            .into_iter()
            .map(|mut c| {
                c.upserted.sort_by(|a, b| a.address.cmp(&b.address));
                c.removed.sort();
                (c.upserted, c.removed)
            })
            .collect()
    }

    /// The import's SQLite writer leaves books, and reports changes, exactly as the pool's
    /// `add_contacts` does: counts, names, first and last seen, a tombstone that a later
    /// call does not undo, evictions at the limit across batches.
    #[tokio::test]
    async fn the_sqlite_writer_leaves_books_as_the_pools_upserts_do() {
        let t = crate::store::testing::sqlite().await;
        let store = t.store.clone().with_book_limit(4);
        let path = store.sqlite_file.clone().expect("a file store");
        let mut writer = tokio::task::spawn_blocking(move || SqliteWriter::open(&path, 4))
            .await
            .unwrap()
            .unwrap();
        let first = [
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
        ];
        let second = [
            ("+2", Some("Two"), 20, CallKind::Incoming { answered: true }),
            ("+4", None, 21, CallKind::Outgoing),
            (
                "+5",
                Some("Five"),
                22,
                CallKind::Incoming { answered: true },
            ),
            ("+6", None, 23, CallKind::Incoming { answered: false }),
        ];
        let mut pool_sizes = HashMap::new();
        let mut pool_changes = Vec::new();
        let mut direct_changes = Vec::new();
        for (i, calls) in [&first[..], &second[..]].into_iter().enumerate() {
            if i == 1 {
                // The users delete +1 between the batches, and +1 calls again: the
                // entry must stay deleted.
                for user in ["pool", "direct"] {
                    store.book_delete(("t", user), "+1").await.unwrap();
                }
            }
            let second_round = [(
                "+1",
                Some("Back?"),
                30,
                CallKind::Incoming { answered: true },
            )];
            let calls: Vec<_> = calls
                .iter()
                .chain(if i == 1 { &second_round[..] } else { &[] })
                .copied()
                .collect();
            let mut tx = store.pool.begin().await.unwrap();
            let c = crate::store::add_contacts(
                &mut tx,
                store.book(),
                "t",
                &sums("pool", &calls),
                &mut pool_sizes,
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            pool_changes.push(plain(c));
            let direct = sums("direct", &calls);
            let (w, c) = tokio::task::spawn_blocking(move || {
                let mut w = writer;
                let tx = w
                    .conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .unwrap();
                let c = super::add_contacts(&tx, &w.sql, ("t", w.limit), &direct, &mut w.sizes)
                    .unwrap();
                tx.commit().unwrap();
                (w, c)
            })
            .await
            .unwrap();
            writer = w;
            direct_changes.push(plain(c));
        }
        assert_eq!(pool_changes, direct_changes);
        let pool = store.address_book("t", "pool").await.unwrap();
        let direct = store.address_book("t", "direct").await.unwrap();
        assert_eq!(pool, direct);
        // The book is within its limit (the import's sizes do not see the deletion, so it
        // evicts one more than needed, both ways alike), +1 stayed deleted, the names
        // are the newest caller ids.
        let addresses: Vec<&str> = direct.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addresses.len(), 3, "{addresses:?}");
        assert!(!addresses.contains(&"+1"), "{addresses:?}");
        let two = direct.iter().find(|e| e.address == "+2").unwrap();
        assert_eq!(two.name.as_deref(), Some("Two"));
        assert_eq!((two.incoming, two.missed, two.call_count), (2, 1, 2));
        // The second batch evicted to stay at the limit, and said so.
        assert!(!direct_changes[1][0].1.is_empty(), "{direct_changes:#?}");
    }
}
