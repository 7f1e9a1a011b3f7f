//! The chat archive: every message, per conversation, with when a device of the recipient
//! got it and when the recipient read it. Messages not yet delivered are the recipient's
//! inbox (the partial index `messages_inbox`), handed over at their next login.
//!
//! A conversation is keyed by its two parties whichever way the message went
//! ([`conversation`]), so a page of history is one index range.

use sqlx::Row;

use super::{Store, StoreError};

/// A user as the archive names one: (tenant, user).
pub type Party<'a> = (&'a str, &'a str);

/// A message to archive: (from, to, text).
pub type ChatRow<'a> = (Party<'a>, Party<'a>, &'a str);

/// One archived message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChat {
    /// Message id: increasing, never reused.
    pub id: u64,
    /// Sender (tenant, user).
    pub from: (String, String),
    /// Recipient (tenant, user).
    pub to: (String, String),
    /// The text.
    pub text: String,
    /// Accepted at, ms since the Unix epoch.
    pub sent_ms: u64,
    /// A device of the recipient got it.
    pub delivered: bool,
    /// The recipient read it.
    pub read: bool,
}

/// The key of the conversation between two users, the same from either side; each part
/// is length-prefixed, so no two pairs of names share a key.
pub fn conversation(a: Party<'_>, b: Party<'_>) -> String {
    let part = |(t, u): Party<'_>| format!("{}:{t}/{}:{u}", t.len(), u.len());
    let (x, y) = (part(a), part(b));
    if x <= y {
        format!("{x}|{y}")
    } else {
        format!("{y}|{x}")
    }
}

fn stored(r: &sqlx::any::AnyRow) -> StoredChat {
    let ms = |c: &str| r.get::<Option<i64>, _>(c);
    StoredChat {
        id: r.get::<i64, _>("id").max(0) as u64,
        from: (r.get("from_tenant"), r.get("from_user")),
        to: (r.get("to_tenant"), r.get("to_user")),
        text: r.get("text"),
        sent_ms: ms("sent_ms").unwrap_or(0).max(0) as u64,
        delivered: ms("delivered_ms").is_some(),
        read: ms("read_ms").is_some(),
    }
}

const COLUMNS: &str =
    "id, from_tenant, from_user, to_tenant, to_user, text, sent_ms, delivered_ms, read_ms";

impl Store {
    /// Messages waiting for `to` (not delivered, sent at or after `since_ms`).
    pub async fn chat_waiting(&self, to: Party<'_>, since_ms: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages WHERE to_tenant = $1 AND to_user = $2 \
             AND delivered_ms IS NULL AND sent_ms >= $3",
        )
        .bind(to.0)
        .bind(to.1)
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The oldest `limit` messages waiting for `to` (sent at or after `since_ms`), oldest
    /// first.
    pub async fn chat_inbox(
        &self,
        to: Party<'_>,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<StoredChat>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM messages WHERE to_tenant = $1 AND to_user = $2 \
             AND delivered_ms IS NULL AND sent_ms >= $3 ORDER BY id LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(to.0)
            .bind(to.1)
            .bind(since_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(stored).collect())
    }

    /// Marks messages to `to` delivered; returns those that were not before (for
    /// receipts). Ids of other users' messages are ignored.
    pub async fn chat_delivered(
        &self,
        to: Party<'_>,
        ids: &[u64],
        at_ms: i64,
    ) -> Result<Vec<StoredChat>, StoreError> {
        let mut done = Vec::new();
        let mut tx = self.pool.begin_with(self.backend.begin_write()).await?;
        for chunk in ids.chunks(500) {
            let sql = self.backend.positional(format!(
                "UPDATE messages SET delivered_ms = $1 WHERE delivered_ms IS NULL AND to_tenant = $2 \
                 AND to_user = $3 AND id IN ({}) RETURNING {COLUMNS}",
                super::placeholder_list(4, chunk.len())
            ));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(at_ms)
                .bind(to.0)
                .bind(to.1);
            for id in chunk {
                q = q.bind(*id as i64);
            }
            let rows = q.persistent(false).fetch_all(&mut *tx).await?;
            done.extend(rows.iter().map(stored));
        }
        tx.commit().await?;
        done.sort_by_key(|m| m.id);
        Ok(done)
    }

    /// Archives several messages (from, to, text) sent at `sent_ms` in one transaction;
    /// returns their ids, in order.
    pub async fn chat_insert_many(
        &self,
        rows: &[ChatRow<'_>],
        sent_ms: i64,
    ) -> Result<Vec<u64>, StoreError> {
        let mut ids = Vec::with_capacity(rows.len());
        let mut tx = self.pool.begin_with(self.backend.begin_write()).await?;
        for (from, to, text) in rows {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO messages (conv, from_tenant, from_user, to_tenant, to_user, text, sent_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(conversation(*from, *to))
            .bind(from.0)
            .bind(from.1)
            .bind(to.0)
            .bind(to.1)
            .bind(*text)
            .bind(sent_ms)
            .fetch_one(&mut *tx)
            .await?;
            ids.push(id.max(0) as u64);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Marks messages the message task itself handed on as delivered (ids it got from
    /// [`Store::chat_insert_many`]).
    pub async fn chat_mark_delivered(&self, ids: &[u64], at_ms: i64) -> Result<(), StoreError> {
        for chunk in ids.chunks(500) {
            let sql = self.backend.positional(format!(
                "UPDATE messages SET delivered_ms = $1 WHERE delivered_ms IS NULL AND id IN ({})",
                super::placeholder_list(2, chunk.len())
            ));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(at_ms);
            for id in chunk {
                q = q.bind(*id as i64);
            }
            q.persistent(false).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// `me` read `message` and every earlier message of its sender to `me`: marks them
    /// read (and delivered). Returns the sender, or `None` when `message` is not a message
    /// to `me`.
    pub async fn chat_read(
        &self,
        me: Party<'_>,
        message: u64,
        at_ms: i64,
    ) -> Result<Option<(String, String)>, StoreError> {
        let mut tx = self.pool.begin_with(self.backend.begin_write()).await?;
        let row = sqlx::query(
            "SELECT from_tenant, from_user, conv FROM messages WHERE id = $1 AND to_tenant = $2 AND to_user = $3",
        )
        .bind(message as i64)
        .bind(me.0)
        .bind(me.1)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let from: (String, String) = (row.get("from_tenant"), row.get("from_user"));
        let conv: String = row.get("conv");
        sqlx::query(
            "UPDATE messages SET read_ms = $1, delivered_ms = COALESCE(delivered_ms, $2) \
             WHERE conv = $3 AND id <= $4 AND to_tenant = $5 AND to_user = $6 AND read_ms IS NULL",
        )
        .bind(at_ms)
        .bind(at_ms)
        .bind(conv)
        .bind(message as i64)
        .bind(me.0)
        .bind(me.1)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(from))
    }

    /// A page of the conversation of `me` with `peer`, oldest first: the `limit` messages
    /// right before `before`, right after `after`, or the latest. `true` when the archive
    /// holds more beyond the page in that direction.
    pub async fn chat_history(
        &self,
        me: Party<'_>,
        peer: Party<'_>,
        (before, after): (Option<u64>, Option<u64>),
        limit: u32,
    ) -> Result<(Vec<StoredChat>, bool), StoreError> {
        let conv = conversation(me, peer);
        let n = i64::from(limit) + 1;
        let rows = match after {
            Some(a) => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM messages WHERE conv = $1 AND id > $2 ORDER BY id LIMIT $3"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(&conv)
                    .bind(a as i64)
                    .bind(n)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM messages WHERE conv = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(&conv)
                    .bind(before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64))
                    .bind(n)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut page: Vec<StoredChat> = rows.iter().map(stored).collect();
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        page.sort_by_key(|m| m.id);
        Ok((page, more))
    }

    /// Deletes messages sent before `before_ms`, `chunk` rows per statement; returns how
    /// many went.
    pub async fn chat_expire(&self, before_ms: i64, chunk: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE sent_ms < $1 LIMIT $2)",
            )
            .bind(before_ms)
            .bind(chunk)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += done;
            if done < chunk as u64 {
                return Ok(total);
            }
        }
    }

    /// Messages in the archive.
    pub async fn chat_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM messages")
            .fetch_one(&self.pool)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_has_one_key_from_either_side_and_names_cannot_collide() {
        let ab = conversation(("demo", "alice"), ("demo", "bob"));
        assert_eq!(ab, conversation(("demo", "bob"), ("demo", "alice")));
        // Separators inside names do not make two pairs meet.
        assert_ne!(
            conversation(("a", "b|1:c/1:d"), ("x", "y")),
            conversation(("a", "b"), ("c", "d|1:x/1:y"))
        );
    }

    async fn insert(store: &Store, from: Party<'_>, to: Party<'_>, text: &str, at: i64) -> u64 {
        store
            .chat_insert_many(&[(from, to, text)], at)
            .await
            .unwrap()[0]
    }

    both_backends! {
    async fn the_inbox_history_and_receipts_keep_to_their_users(store: Store) {
        let (alice, bob, carol) = (("demo", "alice"), ("demo", "bob"), ("demo", "carol"));
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(insert(&store, alice, bob, &format!("a{i}"), 1000 + i).await);
        }
        let from_carol = insert(&store, carol, bob, "c", 2000).await;
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        // Bob's inbox: all six, oldest first; the expiry cut-off drops the oldest two.
        assert_eq!(store.chat_waiting(bob, 0).await.unwrap(), 6);
        let inbox = store.chat_inbox(bob, 1002, 100).await.unwrap();
        assert_eq!(inbox.len(), 4);
        assert_eq!(inbox[0].text, "a2");
        // Alice cannot mark bob's messages delivered or read.
        assert!(
            store
                .chat_delivered(alice, &ids, 5)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.chat_read(alice, ids[0], 5).await.unwrap(), None);
        let done = store.chat_delivered(bob, &ids[..3], 5).await.unwrap();
        assert_eq!(done.len(), 3);
        assert!(
            store
                .chat_delivered(bob, &ids[..3], 6)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.chat_waiting(bob, 0).await.unwrap(), 3);
        // Reading a3 reads a0..a3 (alice's), not carol's.
        let sender = store.chat_read(bob, ids[3], 7).await.unwrap();
        assert_eq!(sender, Some(("demo".into(), "alice".into())));
        let (page, more) = store
            .chat_history(bob, alice, (None, None), 10)
            .await
            .unwrap();
        assert!(!more);
        let read: Vec<bool> = page.iter().map(|m| m.read).collect();
        assert_eq!(read, [true, true, true, true, false]);
        let c = store
            .chat_history(bob, carol, (None, None), 10)
            .await
            .unwrap()
            .0;
        assert_eq!((c.len(), c[0].id, c[0].read), (1, from_carol, false));
        // Paging: latest two, then the two before them, then after the first.
        let (latest, more) = store
            .chat_history(alice, bob, (None, None), 2)
            .await
            .unwrap();
        assert_eq!(
            (
                latest.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
                more
            ),
            (vec!["a3", "a4"], true)
        );
        let (older, _) = store
            .chat_history(alice, bob, (Some(latest[0].id), None), 2)
            .await
            .unwrap();
        assert_eq!(
            older.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["a1", "a2"]
        );
        let (newer, more) = store
            .chat_history(alice, bob, (None, Some(ids[0])), 10)
            .await
            .unwrap();
        assert_eq!((newer.len(), more), (4, false));
        // Carol sees nothing of alice and bob.
        assert!(
            store
                .chat_history(carol, alice, (None, None), 10)
                .await
                .unwrap()
                .0
                .is_empty()
        );
        // Expiry.
        assert_eq!(store.chat_expire(1003, 2).await.unwrap(), 3);
        assert_eq!(store.chat_count().await.unwrap(), 3);
    }
    }
}
