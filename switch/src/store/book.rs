//! What a user does to their own address book: add or rename an entry, note it, mark it a
//! favourite, delete it (a tombstone), block it, search the book.
//!
//! Calls and imports fill the book ([`super::add_contact`], [`super::add_contacts`]); the
//! user's edits live in the same rows, so the rules meet in one place:
//! - a name the user set ranks above every caller id (`name_source` 2);
//! - a deleted entry stays as a tombstone (`deleted` 1, counts and the user's words
//!   cleared): the upsert of a call skips it, so calls do not bring it back, until the user
//!   adds the address again;
//! - a blocked entry is never evicted (its block would go with it), a favourite only after
//!   every other entry; an entry the user added or edited counts as known;
//! - tombstones do not count against the book's limit, and at most as many tombstones as
//!   the limit are kept (the oldest go first).
//!
//! Edits begin with [`Backend::begin_write`](super::Backend): on SQLite `BEGIN IMMEDIATE`,
//! as they read before they write, and a deferred transaction that finds another writer
//! got in between fails at once (SQLite does not wait for a lock it would have to
//! upgrade); on PostgreSQL a plain transaction, its row locks ordering the writers.

use super::{BOOK_COLUMNS, NameSource, Store, StoreError, book_entry, book_size, evict, unix_ms};
use parley_codecs::control::{AddressBookEntry, MAX_BOOK_NAME_BYTES, MAX_BOOK_NOTE_BYTES};

/// Why an edit was refused (the IM error codes of `docs/protocol.md`).
#[derive(Debug, thiserror::Error)]
pub enum BookEditError {
    /// The address, name or note is not acceptable.
    #[error("{0}")]
    BadEntry(String),
    /// No such entry in the book.
    #[error("no entry {0} in your address book")]
    UnknownEntry(String),
    /// A blocked entry cannot be deleted (that would lift the block unseen).
    #[error("{0} is blocked: unblock it before deleting it")]
    EntryBlocked(String),
    /// As many entries are blocked as the book holds.
    #[error("the address book holds at most {0} blocked entries")]
    BookFull(i64),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BookEditError {
    /// The IM error code.
    pub fn code(&self) -> &'static str {
        match self {
            BookEditError::BadEntry(_) => "bad_entry",
            BookEditError::UnknownEntry(_) => "unknown_entry",
            BookEditError::EntryBlocked(_) => "entry_blocked",
            BookEditError::BookFull(_) => "book_full",
            BookEditError::Store(_) => "unavailable",
        }
    }
}

impl From<sqlx::Error> for BookEditError {
    fn from(e: sqlx::Error) -> Self {
        BookEditError::Store(e.into())
    }
}

/// An address as a user writes it, as the book keeps it: a telephone number in E.164
/// (read with the tenant's `region`), or a SIP URI (`sip:`/`sips:`, scheme lower-cased).
pub fn book_address(raw: &str, region: &str) -> Result<String, BookEditError> {
    let raw = raw.trim();
    let max = parley_codecs::control::MAX_BOOK_ADDRESS_BYTES;
    if raw.is_empty() || raw.len() > max {
        return Err(BookEditError::BadEntry(format!(
            "an address must be 1 to {max} bytes"
        )));
    }
    let lower = raw.to_ascii_lowercase();
    for scheme in ["sip:", "sips:"] {
        if lower.starts_with(scheme) {
            let rest = &raw[scheme.len()..];
            if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(BookEditError::BadEntry(format!("{raw:?} is not a SIP URI")));
            }
            return Ok(format!("{scheme}{rest}"));
        }
    }
    crate::numbers::to_e164(raw, region).ok_or_else(|| {
        BookEditError::BadEntry(format!(
            "{raw:?} is neither a telephone number (region {region}) nor a sip: URI"
        ))
    })
}

fn checked(
    what: &str,
    v: Option<String>,
    max: usize,
) -> Result<Option<Option<String>>, BookEditError> {
    match v {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(Some(None)),
        Some(s) if s.len() > max => Err(BookEditError::BadEntry(format!(
            "a {what} must be at most {max} bytes"
        ))),
        Some(s) if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => Err(
            BookEditError::BadEntry(format!("a {what} must not hold control characters")),
        ),
        Some(s) => Ok(Some(Some(s))),
    }
}

/// A `book_set`: the fields to change (`None`: unchanged; `Some(None)`: cleared).
#[derive(Debug, Clone, Default)]
pub struct BookEdit {
    /// The user's name for the entry.
    pub name: Option<String>,
    /// A note.
    pub note: Option<String>,
    /// Favourite.
    pub favourite: Option<bool>,
}

/// What an edit did to the book.
#[derive(Debug, Clone, PartialEq)]
pub struct EditOutcome {
    /// The entry as it now stands (`None` after a delete).
    pub entry: Option<AddressBookEntry>,
    /// Addresses gone from the book: the deleted one, or entries evicted to make room.
    pub removed: Vec<String>,
}

impl Store {
    /// Adds an entry or changes it (`address` already normalised by [`book_address`]);
    /// brings back a deleted one.
    pub async fn book_set(
        &self,
        (tenant, user): (&str, &str),
        address: &str,
        edit: BookEdit,
    ) -> Result<EditOutcome, BookEditError> {
        let name = checked("name", edit.name, MAX_BOOK_NAME_BYTES)?;
        let note = checked("note", edit.note, MAX_BOOK_NOTE_BYTES)?;
        let now = unix_ms(std::time::SystemTime::now());
        let mut tx = self.pool.begin_with(self.backend.begin_write()).await?;
        // `?N` flags say which fields the edit sets. A name the user sets ranks above
        // every caller id; clearing it lets the next caller id name the entry.
        let sql = format!(
            "INSERT INTO address_book (tenant, username, address, name, call_count, last_seen_ms, known_calls, \
             incoming_calls, outgoing_calls, missed_calls, first_seen_ms, name_source, note, favourite, added) \
             VALUES ($1, $2, $3, $4, 0, $5, 0, 0, 0, 0, $5, CASE WHEN $4 IS NULL THEN 0 ELSE {user_rank} END, $6, $7, 1) \
             ON CONFLICT (tenant, username, address) DO UPDATE SET \
             name = CASE WHEN $8 THEN excluded.name ELSE address_book.name END, \
             name_source = CASE WHEN $8 THEN excluded.name_source ELSE address_book.name_source END, \
             note = CASE WHEN $9 THEN excluded.note ELSE address_book.note END, \
             favourite = CASE WHEN $10 THEN excluded.favourite ELSE address_book.favourite END, \
             last_seen_ms = CASE WHEN address_book.deleted = 1 THEN excluded.last_seen_ms ELSE address_book.last_seen_ms END, \
             first_seen_ms = CASE WHEN address_book.deleted = 1 THEN excluded.first_seen_ms ELSE address_book.first_seen_ms END, \
             deleted = 0, added = 1 \
             RETURNING {BOOK_COLUMNS}",
            user_rank = NameSource::User as i64
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(user)
            .bind(address)
            .bind(name.clone().flatten())
            .bind(now)
            .bind(note.clone().flatten())
            .bind(i64::from(edit.favourite.unwrap_or(false)))
            .bind(name.is_some())
            .bind(note.is_some())
            .bind(edit.favourite.is_some())
            .fetch_one(&mut *tx)
            .await?;
        self.within_limit(tx, (tenant, user), book_entry(&row))
            .await
    }

    /// Ends an edit that may have grown the book: evicts what is over the limit, commits.
    async fn within_limit(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        owner: (&str, &str),
        entry: AddressBookEntry,
    ) -> Result<EditOutcome, BookEditError> {
        let size = book_size(&mut tx, owner).await?;
        let mut removed = Vec::new();
        if size > self.book_limit {
            removed = evict(&mut tx, self.backend, owner, size - self.book_limit).await?;
        }
        tx.commit().await?;
        // The entry itself may have been the least valuable (a full book of favourites).
        let entry = (!removed.contains(&entry.address)).then_some(entry);
        Ok(EditOutcome { entry, removed })
    }

    /// Deletes an entry, leaving a tombstone that calls do not undo.
    pub async fn book_delete(
        &self,
        (tenant, user): (&str, &str),
        address: &str,
    ) -> Result<EditOutcome, BookEditError> {
        let now = unix_ms(std::time::SystemTime::now());
        let mut tx = self.pool.begin_with(self.backend.begin_write()).await?;
        let state: Option<(i64, i64)> = sqlx::query_as(
            "SELECT deleted, blocked FROM address_book WHERE tenant = $1 AND username = $2 AND address = $3",
        )
        .bind(tenant)
        .bind(user)
        .bind(address)
        .fetch_optional(&mut *tx)
        .await?;
        match state {
            None | Some((1, _)) => return Err(BookEditError::UnknownEntry(address.to_owned())),
            Some((_, 1)) => return Err(BookEditError::EntryBlocked(address.to_owned())),
            Some(_) => {}
        }
        // The user's words and the counts go; the tombstone remembers when.
        sqlx::query(
            "UPDATE address_book SET deleted = 1, name = NULL, name_source = 0, note = NULL, favourite = 0, \
             added = 0, call_count = 0, known_calls = 0, incoming_calls = 0, outgoing_calls = 0, \
             missed_calls = 0, last_seen_ms = $1, first_seen_ms = $2 \
             WHERE tenant = $3 AND username = $4 AND address = $5",
        )
        .bind(now)
        .bind(now)
        .bind(tenant)
        .bind(user)
        .bind(address)
        .execute(&mut *tx)
        .await?;
        // At most `book_limit` tombstones: the oldest go (their parties may come back).
        sqlx::query(
            "DELETE FROM address_book WHERE tenant = $1 AND username = $2 AND address IN (SELECT address FROM address_book \
             WHERE tenant = $1 AND username = $2 AND deleted = 1 ORDER BY last_seen_ms DESC, address LIMIT $3 OFFSET $4)",
        )
        .bind(tenant)
        .bind(user)
        .bind(i64::MAX)
        .bind(self.book_limit)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(EditOutcome {
            entry: None,
            removed: vec![address.to_owned()],
        })
    }

    /// Blocks or unblocks an address; blocking one not in the book adds it.
    pub async fn book_block(
        &self,
        (tenant, user): (&str, &str),
        address: &str,
        blocked: bool,
    ) -> Result<EditOutcome, BookEditError> {
        let now = unix_ms(std::time::SystemTime::now());
        let mut tx = self.pool.begin_with(self.backend.begin_write()).await?;
        let row = if blocked {
            let already: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM address_book WHERE tenant = $1 AND username = $2 AND blocked = 1 AND address != $3",
            )
            .bind(tenant)
            .bind(user)
            .bind(address)
            .fetch_one(&mut *tx)
            .await?;
            if already >= self.book_limit {
                return Err(BookEditError::BookFull(self.book_limit));
            }
            let sql = format!(
                "INSERT INTO address_book (tenant, username, address, call_count, last_seen_ms, first_seen_ms, blocked) \
                 VALUES ($1, $2, $3, 0, $4, $5, 1) \
                 ON CONFLICT (tenant, username, address) DO UPDATE SET blocked = 1, \
                 last_seen_ms = CASE WHEN address_book.deleted = 1 THEN excluded.last_seen_ms ELSE address_book.last_seen_ms END, \
                 deleted = 0 RETURNING {BOOK_COLUMNS}"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(tenant)
                .bind(user)
                .bind(address)
                .bind(now)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
        } else {
            let sql = format!(
                "UPDATE address_book SET blocked = 0 WHERE tenant = $1 AND username = $2 AND address = $3 AND deleted = 0 \
                 RETURNING {BOOK_COLUMNS}"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(tenant)
                .bind(user)
                .bind(address)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| BookEditError::UnknownEntry(address.to_owned()))?
        };
        self.within_limit(tx, (tenant, user), book_entry(&row))
            .await
    }

    /// Entries whose address, name or note holds `query` (case-insensitive; a query of
    /// digits also matches numbers written with spaces or dashes), favourites first,
    /// then the most recent.
    pub async fn book_search(
        &self,
        (tenant, user): (&str, &str),
        query: &str,
        limit: u32,
    ) -> Result<Vec<AddressBookEntry>, StoreError> {
        let like = |s: &str| {
            let mut p = String::from("%");
            for c in s.chars() {
                if matches!(c, '%' | '_' | '\\') {
                    p.push('\\');
                }
                p.push(c);
            }
            p.push('%');
            p
        };
        let text = like(query.trim());
        // "555 0100-002" finds +15550100002.
        let digits: String = query.chars().filter(char::is_ascii_digit).collect();
        let number = if digits.is_empty() {
            text.clone()
        } else {
            like(&digits)
        };
        let sql = format!(
            "SELECT {BOOK_COLUMNS} FROM address_book WHERE tenant = $1 AND username = $2 AND deleted = 0 AND \
             (address {like} $3 ESCAPE '\\' OR address {like} $4 ESCAPE '\\' OR name {like} $5 ESCAPE '\\' OR note {like} $6 ESCAPE '\\') \
             ORDER BY favourite DESC, last_seen_ms DESC, address LIMIT $7",
            like = self.backend.ilike()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(user)
            .bind(&text)
            .bind(&number)
            .bind(&text)
            .bind(&text)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(book_entry).collect())
    }

    /// One entry of a user's book (not a tombstone).
    pub async fn book_get(
        &self,
        (tenant, user): (&str, &str),
        address: &str,
    ) -> Result<Option<AddressBookEntry>, StoreError> {
        let sql = format!(
            "SELECT {BOOK_COLUMNS} FROM address_book WHERE tenant = $1 AND username = $2 AND address = $3 AND deleted = 0"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(tenant)
            .bind(user)
            .bind(address)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(book_entry))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::store::{CallKind, Contact, ContactSum, add_contact, add_contacts};

    fn call(address: &'static str, secs: u64, kind: CallKind) -> Contact<'static> {
        Contact {
            address,
            name: Some("Caller Id"),
            when: UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs),
            kind,
        }
    }

    const IN: CallKind = CallKind::Incoming { answered: true };
    const MISSED: CallKind = CallKind::Incoming { answered: false };

    async fn one_call(store: &Store, c: Contact<'static>) {
        let mut tx = store.pool.begin().await.unwrap();
        add_contact(&mut tx, store.book(), ("t", "u"), c)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    async fn batch(store: &Store, calls: &[Contact<'static>]) {
        let sums: Vec<((String, String), ContactSum)> = calls
            .iter()
            .map(|c| {
                let mut s = ContactSum::default();
                s.add(*c);
                (("u".to_owned(), c.address.to_owned()), s)
            })
            .collect();
        let mut tx = store.pool.begin().await.unwrap();
        add_contacts(&mut tx, store.book(), "t", &sums, &mut Default::default())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    fn addresses(book: &[AddressBookEntry]) -> Vec<&str> {
        let mut a: Vec<&str> = book.iter().map(|e| e.address.as_str()).collect();
        a.sort();
        a
    }

    #[test]
    fn addresses_are_read_as_the_tenants_region_reads_them() {
        assert_eq!(
            book_address(" (555) 777-0001 ", "US").unwrap(),
            "+15557770001"
        );
        assert_eq!(
            book_address("+33 1 99 99 99 99", "US").unwrap(),
            "+33199999999"
        );
        assert_eq!(
            book_address("SIP:carol@example.net", "US").unwrap(),
            "sip:carol@example.net"
        );
        for bad in ["", "carol", "sip:", "sip:a b", &"9".repeat(300)] {
            assert_eq!(
                book_address(bad, "US").unwrap_err().code(),
                "bad_entry",
                "{bad:?}"
            );
        }
    }

    both_backends! {
    async fn a_deleted_entry_stays_deleted_whatever_the_calls_until_added_again(store: Store) {
        let owner = ("t", "u");
        one_call(&store, call("+1", 1, IN)).await;
        let done = store.book_delete(owner, "+1").await.unwrap();
        assert_eq!(done.removed, vec!["+1"]);
        // A second delete finds nothing.
        assert_eq!(
            store.book_delete(owner, "+1").await.unwrap_err().code(),
            "unknown_entry"
        );
        // Neither a call nor an import brings it back, nor is it searchable.
        one_call(&store, call("+1", 2, IN)).await;
        batch(&store, &[call("+1", 3, MISSED), call("+2", 3, IN)]).await;
        assert_eq!(
            addresses(&store.address_book("t", "u").await.unwrap()),
            ["+2"]
        );
        assert!(store.book_search(owner, "1", 50).await.unwrap().is_empty());
        assert!(store.book_get(owner, "+1").await.unwrap().is_none());
        // Added again: back, counting from there.
        let back = store
            .book_set(owner, "+1", BookEdit::default())
            .await
            .unwrap()
            .entry
            .unwrap();
        assert_eq!((back.call_count, back.known, back.name), (0, true, None));
        one_call(&store, call("+1", 4, MISSED)).await;
        let e = store.book_get(owner, "+1").await.unwrap().unwrap();
        assert_eq!((e.call_count, e.missed), (1, 1));
        // A caller id names an entry the user did not name.
        assert_eq!(e.name.as_deref(), Some("Caller Id"));
    }
    }

    both_backends! {
    async fn the_users_name_beats_caller_ids_and_clearing_it_lets_them_back(store: Store) {
        let owner = ("t", "u");
        one_call(&store, call("+1", 1, MISSED)).await;
        let named = BookEdit {
            name: Some("Mum".into()),
            note: Some("call on Sundays".into()),
            favourite: Some(true),
        };
        store.book_set(owner, "+1", named).await.unwrap();
        one_call(&store, call("+1", 2, MISSED)).await;
        batch(&store, &[call("+1", 3, MISSED)]).await;
        let e = store.book_get(owner, "+1").await.unwrap().unwrap();
        assert_eq!(
            (
                e.name.as_deref(),
                e.note.as_deref(),
                e.favourite,
                e.call_count,
                e.known
            ),
            (Some("Mum"), Some("call on Sundays"), true, 3, true)
        );
        // Only the fields given change; "" clears.
        let cleared = BookEdit {
            name: Some(String::new()),
            ..BookEdit::default()
        };
        let e = store
            .book_set(owner, "+1", cleared)
            .await
            .unwrap()
            .entry
            .unwrap();
        assert_eq!(
            (e.name, e.note.as_deref(), e.favourite),
            (None, Some("call on Sundays"), true)
        );
        one_call(&store, call("+1", 4, MISSED)).await;
        let e = store.book_get(owner, "+1").await.unwrap().unwrap();
        assert_eq!(e.name.as_deref(), Some("Caller Id"));
        // Too long or with control characters: refused, nothing changed.
        for bad in [
            BookEdit {
                name: Some("x".repeat(MAX_BOOK_NAME_BYTES + 1)),
                ..BookEdit::default()
            },
            BookEdit {
                note: Some("a\u{7}b".into()),
                ..BookEdit::default()
            },
        ] {
            assert_eq!(
                store.book_set(owner, "+1", bad).await.unwrap_err().code(),
                "bad_entry"
            );
        }
    }
    }

    both_backends! {
    async fn eviction_spares_blocked_entries_and_takes_favourites_last(store: Store) {
        let store = store.with_book_limit(3);
        let owner = ("t", "u");
        // A blocked stranger and a favourite that was only ever missed: both would be
        // the least valuable by calls.
        store.book_block(owner, "+9", true).await.unwrap();
        one_call(&store, call("+8", 1, MISSED)).await;
        store
            .book_set(
                owner,
                "+8",
                BookEdit {
                    favourite: Some(true),
                    ..BookEdit::default()
                },
            )
            .await
            .unwrap();
        one_call(&store, call("+1", 2, IN)).await;
        // Full (3). New parties push out the others first, never the block.
        one_call(&store, call("+2", 3, IN)).await;
        assert_eq!(
            addresses(&store.address_book("t", "u").await.unwrap()),
            ["+2", "+8", "+9"]
        );
        batch(&store, &[call("+3", 4, IN), call("+4", 5, IN)]).await;
        let book = store.address_book("t", "u").await.unwrap();
        assert_eq!(book.len(), 3, "{book:#?}");
        assert!(
            addresses(&book).contains(&"+9"),
            "the block was evicted: {book:#?}"
        );
        assert!(!addresses(&book).contains(&"+2"), "{book:#?}");
        // The favourite goes only when nothing else can.
        assert!(addresses(&book).contains(&"+8"), "{book:#?}");
        // Blocked entries count: as many as the book holds, then `book_full`.
        store.book_block(owner, "+5", true).await.unwrap();
        store.book_block(owner, "+6", true).await.unwrap();
        assert_eq!(
            store
                .book_block(owner, "+7", true)
                .await
                .unwrap_err()
                .code(),
            "book_full"
        );
        // Deleting a blocked entry is refused; unblocking something unknown too.
        assert_eq!(
            store.book_delete(owner, "+9").await.unwrap_err().code(),
            "entry_blocked"
        );
        assert_eq!(
            store
                .book_block(owner, "+404", false)
                .await
                .unwrap_err()
                .code(),
            "unknown_entry"
        );
    }
    }

    both_backends! {
    async fn tombstones_are_bounded_by_the_book_limit(store: Store) {
        let store = store.with_book_limit(2);
        let owner = ("t", "u");
        for (i, a) in ["+1", "+2", "+3", "+4"].into_iter().enumerate() {
            one_call(&store, call(a, i as u64, IN)).await;
            store.book_delete(owner, a).await.unwrap();
        }
        let tombstones: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM address_book WHERE deleted = 1")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(tombstones, 2);
    }
    }

    #[tokio::test]
    async fn eviction_reads_its_partial_index() {
        // The query of `evict`, whose `INDEXED BY` fails the statement if the index
        // cannot serve it (SQLite 3.51 otherwise picked the primary key and sorted).
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let rows = sqlx::query(
            "EXPLAIN QUERY PLAN SELECT address FROM address_book INDEXED BY address_book_evictable \
             WHERE tenant = 't' AND username = 'u' AND deleted = 0 AND blocked = 0 \
             ORDER BY favourite, (known_calls > 0 OR added > 0), call_count, last_seen_ms, address LIMIT 1",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let detail: Vec<String> = rows
            .iter()
            .map(|r| sqlx::Row::get::<String, _>(r, "detail"))
            .collect();
        let text = detail.join("; ");

        assert!(text.contains("address_book_evictable"), "{text}");
        assert!(
            !text.contains("TEMP B-TREE"),
            "eviction sorts the book: {text}"
        );
    }
}
