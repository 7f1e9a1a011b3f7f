//! The message task: serves devices' [`ChatRequest`]s one at a time (a sender's messages
//! keep their order), with the archive in the store.
//!
//! - `chat`: the message is archived first (its id is the archive's), then handed to the
//!   recipient's online devices; with none online it waits in the recipient's inbox, up to
//!   `[chat] offline_max_messages` (then `mailbox_full`). The sender's other devices get a
//!   copy (`own`), and every device of the sender a `delivered` receipt once a device of
//!   the recipient has it.
//! - at login the session asks for the inbox; once it has queued the messages for its
//!   device it reports them delivered (at-least-once: a device lost in between gets them
//!   again, with the same ids), and the senders get their receipts.
//! - `chat_read` marks messages read and sends the sender a `read` receipt.
//! - `chat_history` pages through the conversation of the session's own user.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parley_actors::chat::{ChatError, ChatOp, ChatReply, ChatRequest, ChatService, name_for};
use parley_actors::metrics as am;
use parley_actors::registry::{Registry, UserRef};
use parley_actors::user::{Deliver, Online};
use parley_codecs::control::{ChatRecord, ReceiptStatus, ServerMsg};
use parley_core::directory::UserIdentity;
use tokio::sync::mpsc;

use crate::config::ChatConfig;
use crate::metrics as m;
use crate::store::Store;
use crate::store::chat::{ChatRow, StoredChat};

/// Requests waiting for the task at most (then devices are answered `busy`).
const QUEUE: usize = 4096;

/// Chats archived in one transaction at most.
const BATCH: usize = 256;

/// The message service.
#[derive(Clone)]
pub struct Chats {
    store: Store,
    registry: Arc<Registry>,
    cfg: ChatConfig,
}

/// Messages waiting per recipient, as the task counted them: counted once from the store,
/// then kept up as chats are stored and delivered (a count per chat would read the whole
/// inbox each time). Messages past `[chat] offline_days` stay in the count until it is
/// taken again, which happens whenever it says the mailbox is full.
#[derive(Default)]
struct Waiting(std::collections::HashMap<(String, String), i64>);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn unavailable(e: impl std::fmt::Display, what: &str) -> ChatError {
    tracing::error!(error = %e, "{what} failed");
    ChatError::new("unavailable", format!("{what}: the message archive failed"))
}

impl Chats {
    /// The service over `store`.
    pub fn new(store: Store, registry: Arc<Registry>, cfg: ChatConfig) -> Self {
        Self {
            store,
            registry,
            cfg,
        }
    }

    /// Starts the task; returns the sessions' channel. Also keeps the archive within
    /// `[chat] history_days` (hourly) and its size metric current.
    pub fn start(&self) -> ChatService {
        let (tx, mut rx) = mpsc::channel::<ChatRequest>(QUEUE);
        let chats = self.clone();
        actix_rt::spawn(async move {
            if let Ok(n) = chats.store.chat_count().await {
                metrics::gauge!(m::CHAT_ARCHIVE_MESSAGES).set(n as f64);
            }
            let mut waiting = Waiting::default();
            let mut next = None;
            loop {
                let Some(r) = next.take().or(rx.recv().await) else {
                    break;
                };
                if !matches!(r.op, ChatOp::Send { .. }) {
                    let res = chats.handle(&r.me, r.op, &mut waiting).await;
                    let _ = r.reply.send(res);
                    continue;
                }
                // The chats queued behind this one, up to the first other request.
                let mut sends = vec![r];
                while sends.len() < BATCH {
                    match rx.try_recv() {
                        Ok(r) if matches!(r.op, ChatOp::Send { .. }) => sends.push(r),
                        Ok(r) => {
                            next = Some(r);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                chats.send_batch(sends, &mut waiting).await;
            }
        });
        if self.cfg.history_days > 0 {
            let (store, days) = (self.store.clone(), self.cfg.history_days);
            actix_rt::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    tick.tick().await;
                    let before = now_ms() - i64::from(days) * 86_400_000;
                    match store.chat_expire(before, 10_000).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(
                                messages = n,
                                days,
                                "chat messages past [chat] history_days deleted"
                            )
                        }
                        Err(e) => tracing::error!(error = %e, "chat retention failed"),
                    }
                    if let Ok(n) = store.chat_count().await {
                        metrics::gauge!(m::CHAT_ARCHIVE_MESSAGES).set(n as f64);
                    }
                }
            });
        }
        tx
    }

    /// Oldest send time an inbox message may have to be handed over.
    fn offline_since(&self) -> i64 {
        now_ms() - i64::from(self.cfg.offline_days) * 86_400_000
    }

    /// Every request but `chat` (see [`Chats::send_batch`]).
    async fn handle(
        &self,
        me: &UserIdentity,
        op: ChatOp,
        waiting: &mut Waiting,
    ) -> Result<ChatReply, ChatError> {
        let my = (me.tenant.as_str(), me.user.as_str());
        match op {
            ChatOp::Send { .. } => Err(ChatError::new("unavailable", "chat: misrouted")),
            ChatOp::Inbox => {
                let kept = self
                    .store
                    .chat_inbox(
                        my,
                        self.offline_since(),
                        i64::from(self.cfg.offline_max_messages),
                    )
                    .await
                    .map_err(|e| unavailable(e, "inbox"))?;
                let msgs = kept
                    .into_iter()
                    .map(|c| {
                        let from = identity(&c.from);
                        ServerMsg::Chat {
                            from: name_for(&me.tenant, &from),
                            text: c.text,
                            id: c.id,
                            sent_at_ms: c.sent_ms,
                            to: me.user.clone(),
                            own: false,
                        }
                    })
                    .collect();
                Ok(ChatReply::Inbox(msgs))
            }
            ChatOp::Delivered(ids) => {
                let done = self
                    .store
                    .chat_delivered(my, &ids, now_ms())
                    .await
                    .map_err(|e| unavailable(e, "delivery"))?;
                if let Some(n) = waiting.0.get_mut(&(me.tenant.clone(), me.user.clone())) {
                    *n = (*n - done.len() as i64).max(0);
                }
                for c in done {
                    self.receipt(&c.from, c.id, ReceiptStatus::Delivered, me, None);
                }
                Ok(ChatReply::Done)
            }
            ChatOp::Read { message } => {
                let sender = self
                    .store
                    .chat_read(my, message, now_ms())
                    .await
                    .map_err(|e| unavailable(e, "chat_read"))?
                    .ok_or_else(|| {
                        ChatError::new(
                            "unknown_message",
                            format!("chat_read: no message {message} to you"),
                        )
                    })?;
                self.receipt(&sender, message, ReceiptStatus::Read, me, None);
                Ok(ChatReply::Done)
            }
            ChatOp::History {
                peer,
                before,
                after,
                limit,
            } => {
                let (page, more) = self
                    .store
                    .chat_history(my, (&peer.tenant, &peer.user), (before, after), limit)
                    .await
                    .map_err(|e| unavailable(e, "chat_history"))?;
                let messages = page.into_iter().map(|c| record(&me.tenant, c)).collect();
                Ok(ChatReply::History { messages, more })
            }
        }
    }

    /// Checks a chat before it is stored: the recipient exists, and if none of their
    /// devices is online, has room in their inbox (counted in `waiting`). Returns the
    /// recipient and how many devices they have online.
    async fn admit(
        &self,
        (to, to_name): (&UserIdentity, &str),
        waiting: &mut Waiting,
    ) -> Result<(UserRef, u32), ChatError> {
        let recipient = self
            .registry
            .user_by_name(&to.tenant, &to.user)
            .ok_or_else(|| {
                ChatError::new(
                    "unknown_user",
                    format!("chat: no user {to_name} you can reach"),
                )
            })?;
        let online = recipient.addr.send(Online).await.unwrap_or(0);
        if online > 0 {
            return Ok((recipient, online));
        }
        let max = i64::from(self.cfg.offline_max_messages);
        let key = (to.tenant.clone(), to.user.clone());
        let n = match waiting.0.get(&key).copied() {
            Some(n) if n < max => n,
            // Not counted yet, or full by the count: ask the store (expired messages no
            // longer count).
            _ => self
                .store
                .chat_waiting((&to.tenant, &to.user), self.offline_since())
                .await
                .map_err(|e| unavailable(e, "chat"))?,
        };
        if n >= max {
            waiting.0.insert(key, n);
            return Err(ChatError::new(
                "mailbox_full",
                format!(
                    "chat: {to_name} is offline and already has {n} messages waiting (the most kept)"
                ),
            ));
        }
        waiting.0.insert(key, n + 1);
        Ok((recipient, 0))
    }

    /// Consecutive `chat`s (already taken off the queue together): checked one by one,
    /// archived in one transaction (one commit for the lot, not one each), then handed on,
    /// copied, marked delivered in one statement, receipted and answered, in order.
    async fn send_batch(&self, requests: Vec<ChatRequest>, waiting: &mut Waiting) {
        struct Admitted {
            me: UserIdentity,
            session: u64,
            reply: tokio::sync::oneshot::Sender<Result<ChatReply, ChatError>>,
            to: UserIdentity,
            to_name: String,
            text: String,
            recipient: UserRef,
            online: u32,
        }
        let mut admitted = Vec::with_capacity(requests.len());
        for r in requests {
            let ChatRequest {
                me,
                session,
                op: ChatOp::Send { to, to_name, text },
                reply,
            } = r
            else {
                continue;
            };
            match self.admit((&to, &to_name), waiting).await {
                Ok((recipient, online)) => admitted.push(Admitted {
                    me,
                    session,
                    reply,
                    to,
                    to_name,
                    text,
                    recipient,
                    online,
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if admitted.is_empty() {
            return;
        }
        let sent_ms = now_ms();
        let rows: Vec<ChatRow<'_>> = admitted
            .iter()
            .map(|a| {
                (
                    (a.me.tenant.as_str(), a.me.user.as_str()),
                    (a.to.tenant.as_str(), a.to.user.as_str()),
                    a.text.as_str(),
                )
            })
            .collect();
        let ids = match self.store.chat_insert_many(&rows, sent_ms).await {
            Ok(ids) => ids,
            Err(e) => {
                let err = unavailable(e, "chat");
                for a in admitted {
                    let _ = a.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        metrics::gauge!(m::CHAT_ARCHIVE_MESSAGES).increment(ids.len() as f64);
        let sent_at_ms = sent_ms.max(0) as u64;
        let mut outcomes = Vec::with_capacity(admitted.len());
        for (a, id) in admitted.into_iter().zip(ids) {
            let me = &a.me;
            let delivered = if a.online > 0 {
                let chat = ServerMsg::Chat {
                    from: name_for(&a.to.tenant, me),
                    text: a.text.clone(),
                    id,
                    sent_at_ms,
                    to: a.to.user.clone(),
                    own: false,
                };
                a.recipient
                    .addr
                    .send(Deliver {
                        msg: chat,
                        except: None,
                    })
                    .await
                    .unwrap_or(0)
            } else {
                0
            };
            // The sender's other devices see what this one sent.
            if let Some(sender) = self.registry.user_by_name(&me.tenant, &me.user) {
                sender.addr.do_send(Deliver {
                    msg: ServerMsg::Chat {
                        from: me.user.clone(),
                        text: a.text,
                        id,
                        sent_at_ms,
                        to: a.to_name,
                        own: true,
                    },
                    except: Some(a.session),
                });
            }
            if a.online > 0 && delivered == 0 {
                // Gone offline since: the message waits like any other.
                let key = (a.to.tenant.clone(), a.to.user.clone());
                if let Some(n) = waiting.0.get_mut(&key) {
                    *n += 1;
                }
            }
            outcomes.push((a.me, a.session, a.reply, a.to, id, delivered));
        }
        let delivered_ids: Vec<u64> = outcomes.iter().filter(|o| o.5 > 0).map(|o| o.4).collect();
        if let Err(e) = self
            .store
            .chat_mark_delivered(&delivered_ids, now_ms())
            .await
        {
            // The messages were handed on; only their delivered mark is missing.
            tracing::error!(error = %e, messages = delivered_ids.len(), "marking chats delivered failed");
        }
        for (me, session, reply, to, id, delivered) in outcomes {
            if delivered > 0 {
                // The sending device learns it from its `chat_ack` (a receipt could
                // overtake the ack and name an id it does not know yet); its other
                // devices, which got the copy, from a receipt.
                self.receipt(
                    &(me.tenant, me.user),
                    id,
                    ReceiptStatus::Delivered,
                    &to,
                    Some(session),
                );
            }
            let _ = reply.send(Ok(ChatReply::Sent {
                message: id,
                delivered,
            }));
        }
    }

    /// Tells every device of `sender` (but `except`) that `by` got or read `message`.
    fn receipt(
        &self,
        sender: &(String, String),
        message: u64,
        status: ReceiptStatus,
        by: &UserIdentity,
        except: Option<u64>,
    ) {
        let label = match status {
            ReceiptStatus::Delivered => "delivered",
            ReceiptStatus::Read => "read",
        };
        metrics::counter!(am::CHAT_RECEIPTS_TOTAL, "status" => label).increment(1);
        if let Some(s) = self.registry.user_by_name(&sender.0, &sender.1) {
            s.addr.do_send(Deliver {
                msg: ServerMsg::ChatReceipt {
                    message,
                    status,
                    by: name_for(&sender.0, by),
                    at_ms: now_ms().max(0) as u64,
                },
                except,
            });
        }
    }
}

/// A (tenant, user) pair as an identity (the number is not needed for names).
fn identity((tenant, user): &(String, String)) -> UserIdentity {
    UserIdentity {
        tenant: tenant.clone(),
        user: user.clone(),
        number: String::new(),
    }
}

/// An archived message as `viewer_tenant`'s user sees it.
fn record(viewer_tenant: &str, c: StoredChat) -> ChatRecord {
    ChatRecord {
        id: c.id,
        from: name_for(viewer_tenant, &identity(&c.from)),
        to: name_for(viewer_tenant, &identity(&c.to)),
        text: c.text,
        sent_at_ms: c.sent_ms,
        delivered: c.delivered,
        read: c.read,
    }
}
