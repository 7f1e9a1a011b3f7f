//! Control messages of the Parley IM protocol (`docs/protocol.md`).
//!
//! One JSON object per frame; a frame is a 4-byte big-endian length followed by that many
//! bytes of UTF-8 JSON. Every object has a `"type"` field naming the message.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::CodecError;

/// Largest control frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// The dynamic RTP payload type of Opus on a device's flow (the one browsers use):
/// Parley's flows between devices carry Opus under this number; a browser whose peer
/// connection negotiated another number is mapped at the node.
pub const PT_OPUS: u8 = 111;

/// The telephone-event (RFC 4733) payload type on flows between devices, and in the
/// offers Parley makes for device-dialled calls.
pub const PT_TELEPHONE_EVENT: u8 = 101;

/// Presence status of a device, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Signed in and reachable.
    #[default]
    Available,
    /// Signed in, user away from the device.
    Away,
    /// Signed in, user busy (may still be rung when nothing else can take the call).
    Busy,
    /// Do not disturb: never rung.
    DoNotDisturb,
    /// Appears offline (the connection may still be up).
    Offline,
}

/// One payload format of a call's video stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoFormat {
    /// RTP payload type on the video flow.
    pub pt: u8,
    /// Encoding name, upper case as in SDP (`VP8`, `VP9`, `H264`, `AV1`).
    pub name: String,
}

/// Messages from an IM device to Parley.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Must be the first message on a connection.
    Login {
        /// Enterprise / tenant name.
        tenant: String,
        /// User name within the tenant.
        user: String,
        /// Password (sent over the TLS 1.3 QUIC connection; verified against a hash, or,
        /// for a tenant with a directory, by the tenant's auth agent). Empty with `token`.
        #[serde(default)]
        password: String,
        /// A name for this device, unique per user (e.g. `desktop`).
        device: String,
        /// A session token from an earlier `login_ok`, instead of the password.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Presence of this device.
    Presence {
        /// New status.
        status: Status,
        /// Milliseconds since the last user input on the device.
        #[serde(default)]
        idle_ms: u64,
        /// Free text note.
        #[serde(default)]
        note: Option<String>,
    },
    /// The device got an `incoming_call` and is ringing; every offer must be acknowledged
    /// this way within the node's offer timeout, or the node treats the device as lost.
    Ringing {
        /// The call id from `incoming_call`.
        call_id: String,
    },
    /// Answer an incoming call offered to this device.
    Answer {
        /// The call id from `incoming_call`.
        call_id: String,
    },
    /// Decline an incoming call.
    Reject {
        /// The call id from `incoming_call`.
        call_id: String,
    },
    /// Hang up an answered call.
    Hangup {
        /// The call id.
        call_id: String,
    },
    /// What this device can do; sent after login (before it, a device is audio-only and
    /// G.711-only).
    Capabilities {
        /// The device can send and receive video.
        #[serde(default)]
        video: bool,
        /// Audio codecs beyond G.711 the device sends and receives, by name: `"opus"`
        /// (48 kHz, stereo signalling, RFC 7587). A call between two devices that both
        /// declare Opus carries Opus ([`PT_OPUS`]); every other call stays G.711. Unknown
        /// names are ignored.
        #[serde(default)]
        codecs: Vec<String>,
    },
    /// Liveness probe; answered with `pong`.
    Ping {
        /// Echoed back.
        #[serde(default)]
        id: u64,
    },
    /// Watch these users' presence (users of the same tenant); answered with one
    /// `presence_update` per user now and one per change later.
    Subscribe {
        /// User names.
        users: Vec<String>,
    },
    /// Stop watching these users.
    Unsubscribe {
        /// User names.
        users: Vec<String>,
    },
    /// Call another user (by user name in the same tenant, or by a Parley user's E.164
    /// number); answered with `dialing`, then `call_ringing`, `call_connected` and
    /// `call_ended` as the call progresses. `hangup` with the call id cancels or ends it.
    Dial {
        /// User name or E.164 number.
        to: String,
    },
    /// Read this user's routing preferences; answered with `preferences`.
    GetPreferences,
    /// Replace this user's routing preferences (`docs/routing.md`); answered with
    /// `preferences`, or a non-fatal `bad_preferences` error naming the faulty rule.
    SetPreferences {
        /// The preferences object.
        preferences: serde_json::Value,
    },
    /// Add an entry to the user's address book, or change one: fields left out stay as
    /// they are. Adding an address the user deleted brings it back. Answered with
    /// `book_ok`; every device of the user gets the change as `address_book_update`.
    BookSet {
        /// E.164 number (written any way the tenant's region reads) or SIP URI.
        address: String,
        /// The user's name for the entry (beats every caller id); `""` clears it.
        #[serde(default)]
        name: Option<String>,
        /// A note; `""` clears it.
        #[serde(default)]
        note: Option<String>,
        /// Favourite or not.
        #[serde(default)]
        favourite: Option<bool>,
    },
    /// Delete an entry: it stays deleted (later calls do not bring it back) until the
    /// user adds it again with `book_set`. Answered with `book_ok`.
    BookDelete {
        /// The entry's address.
        address: String,
    },
    /// Block (or unblock) calls from an address: routing refuses them (603) and still
    /// records them. Blocking an address not in the book adds it. Answered with `book_ok`.
    BookBlock {
        /// E.164 number or SIP URI.
        address: String,
        /// `true` blocks, `false` unblocks.
        blocked: bool,
    },
    /// Search the user's book (address, name and note, case-insensitive); answered with
    /// `book_results`.
    BookSearch {
        /// Text to look for.
        query: String,
        /// Most results (at most [`MAX_BOOK_SEARCH_RESULTS`], the default).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Send a chat message to a user of the same tenant (or a federated one): handed to
    /// every online device of the recipient, or kept until one logs in; archived for both.
    Chat {
        /// Recipient user name.
        to: String,
        /// The message, at most [`MAX_CHAT_BYTES`] bytes of UTF-8.
        text: String,
        /// The client's id for this message, echoed in `chat_ack`.
        #[serde(default)]
        id: u64,
    },
    /// The user read this message (and every earlier one from the same sender); the
    /// sender's devices get a `chat_receipt` with status `read`.
    ChatRead {
        /// The server's message id (`chat`'s `id`).
        message: u64,
    },
    /// A page of the conversation with a user, from the archive; answered with
    /// `chat_history`.
    ChatHistory {
        /// The other user (as for `chat`).
        with: String,
        /// Only messages older than this message id.
        #[serde(default)]
        before: Option<u64>,
        /// Only messages newer than this message id.
        #[serde(default)]
        after: Option<u64>,
        /// Most messages (at most [`MAX_HISTORY_PAGE`], the default).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// The browser's WebRTC offer (SDP) for its media: one peer connection per session,
    /// audio, G.711; answered with `webrtc_answer` (or a non-fatal `bad_offer` error). A
    /// later offer replaces the peer connection. WebSocket transport only (QUIC devices
    /// carry media as RoQ datagrams): on QUIC it is refused with `unsupported`.
    WebrtcOffer {
        /// The offer, as `RTCPeerConnection.createOffer` made it (ICE candidates gathered).
        sdp: String,
    },
    /// A page of this user's calls from their CDRs, newest first; answered with
    /// `call_history`.
    CallHistory {
        /// Only calls older than this cursor (`call_history`'s `next`).
        #[serde(default)]
        before: Option<String>,
        /// Most calls (at most [`MAX_CALL_HISTORY_PAGE`], the default).
        #[serde(default)]
        limit: Option<u32>,
    },
}

/// Most calls one `call_history` page holds (fewer when they would not fit a frame).
pub const MAX_CALL_HISTORY_PAGE: u32 = 50;

/// One call of the user's, as `call_history` gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Parley's call id.
    pub call_id: String,
    /// `incoming` (a call to the user) or `outgoing` (one the user dialled).
    pub direction: String,
    /// The other party: number (E.164) or SIP URI.
    pub peer: String,
    /// The other party's name, where the call gave one.
    pub peer_name: Option<String>,
    /// When the call started, ms since the Unix epoch.
    pub start_ms: i64,
    /// Answered (by a device of the user, the PSTN line, or the callee).
    pub answered: bool,
    /// Seconds from answer to end.
    pub duration_s: u64,
    /// The CDR's disposition (`ANSWERED`, `NO ANSWER`, `BUSY`, `CANCELLED`, …).
    pub disposition: String,
    /// Who answered: the device name, or `pstn`.
    pub answered_by: Option<String>,
}

/// Most messages one `chat_history` page holds (fewer when they would not fit a frame).
pub const MAX_HISTORY_PAGE: u32 = 50;

/// What a receipt says about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    /// A device of the recipient got it.
    Delivered,
    /// The recipient read it.
    Read,
}

/// One archived chat message, as `chat_history` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRecord {
    /// Server message id.
    pub id: u64,
    /// Sender (user name, `user@tenant` across tenants).
    pub from: String,
    /// Recipient, named the same way.
    pub to: String,
    /// The message.
    pub text: String,
    /// When the node accepted it, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// A device of the recipient got it.
    pub delivered: bool,
    /// The recipient read it.
    pub read: bool,
}

/// Longest chat message accepted.
pub const MAX_CHAT_BYTES: usize = 16 * 1024;

/// One address book entry as the device sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AddressBookEntry {
    /// E.164 number, or a SIP URI when the party had no telephone number.
    pub address: String,
    /// Display name where known.
    pub name: Option<String>,
    /// Calls seen with this party.
    pub call_count: u64,
    /// Last call, RFC 3339.
    pub last_seen: String,
    /// The party counts as known for routing rules (`caller_known`): the user placed a
    /// call to it or answered one from it. Calls it made that were rejected, missed or
    /// cancelled do not make it known.
    #[serde(default)]
    pub known: bool,
    /// Calls from this party to the user (answered or not).
    #[serde(default)]
    pub incoming: u64,
    /// Calls the user placed to this party.
    #[serde(default)]
    pub outgoing: u64,
    /// Calls from this party nobody answered.
    #[serde(default)]
    pub missed: u64,
    /// First call, RFC 3339.
    #[serde(default)]
    pub first_seen: String,
    /// The user's note on this entry.
    #[serde(default)]
    pub note: Option<String>,
    /// The user marked this entry a favourite.
    #[serde(default)]
    pub favourite: bool,
    /// Calls from this address are refused (and still recorded).
    #[serde(default)]
    pub blocked: bool,
    /// The Parley user of the book owner's tenant this address belongs to: the device gets
    /// `presence_update` for that user without subscribing.
    #[serde(default)]
    pub user: Option<String>,
}

/// Longest address an address book keeps, bytes (longer parties are not added: no real
/// number or SIP URI comes near it, and it bounds every entry's size in a frame).
pub const MAX_BOOK_ADDRESS_BYTES: usize = 256;
/// Longest display name an address book keeps, bytes (longer ones are cut at a character
/// boundary).
pub const MAX_BOOK_NAME_BYTES: usize = 128;
/// Longest note on an address book entry, bytes.
pub const MAX_BOOK_NOTE_BYTES: usize = 1024;
/// Most entries one `book_search` answers with.
pub const MAX_BOOK_SEARCH_RESULTS: u32 = 50;

/// Messages from Parley to an IM device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Login accepted.
    LoginOk {
        /// The user's E.164 number.
        number: String,
        /// Id of this device session.
        session: u64,
        /// A session token: `login` with it (and no password) reconnects until it expires
        /// or the directory ends it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The user's display name, when the directory gives one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        display_name: Option<String>,
    },
    /// A request failed; `fatal` errors close the connection.
    Error {
        /// Machine-readable code (`auth_failed`, `not_logged_in`, `bad_message`, `unknown_call`).
        code: String,
        /// Human-readable explanation.
        message: String,
        /// Whether the connection is closed after this.
        fatal: bool,
        /// The `id` of the request this error answers, when it carried one.
        #[serde(default)]
        id: Option<u64>,
    },
    /// A call is ringing this device.
    IncomingCall {
        /// Parley's id for the call.
        call_id: String,
        /// Caller's number (E.164) or SIP URI.
        from: String,
        /// Caller's display name, if any.
        from_name: Option<String>,
        /// The number that was dialled.
        to: String,
        /// Whether the call offers video (the device answers with video if it declared it).
        #[serde(default)]
        video: bool,
    },
    /// The call is connected; media flows on the given RoQ flow id.
    CallConnected {
        /// The call id.
        call_id: String,
        /// RoQ flow id for the audio stream, both directions.
        flow_id: u64,
        /// RTP payload type in use (0 PCMU, 8 PCMA, [`PT_OPUS`] Opus).
        payload_type: u8,
        /// RoQ flow id of the video stream, when the call has one.
        #[serde(default)]
        video_flow_id: Option<u64>,
        /// RFC 4733 telephone-event (DTMF) payload type on the audio flow, at the audio
        /// codec's clock rate, when the other side takes it.
        #[serde(default)]
        telephone_event: Option<u8>,
        /// The video stream's payload types with their encoding names, as the caller
        /// offered them (passed through: the device sends one of these); empty without
        /// video.
        #[serde(default)]
        video_formats: Vec<VideoFormat>,
    },
    /// The call ended (or the offer to this device was withdrawn).
    CallEnded {
        /// The call id.
        call_id: String,
        /// Why (`remote_hangup`, `answered_elsewhere`, `cancelled`, `timeout`, `media_unavailable`, `rerouted`).
        reason: String,
    },
    /// The user's address book, in pages that each fit a frame: the page at `offset` 0
    /// replaces the device's book, later pages append; the book is complete once `total`
    /// entries have arrived.
    AddressBook {
        /// Entries, most recent first.
        entries: Vec<AddressBookEntry>,
        /// Position of this page's first entry in the book.
        #[serde(default)]
        offset: u64,
        /// Entries in the whole book.
        #[serde(default)]
        total: u64,
    },
    /// A change to the address book: entries added or updated (newest first), and
    /// addresses removed (evicted to keep the book within its limit).
    AddressBookUpdate {
        /// Entries added or changed, replacing any entry with the same address.
        entries: Vec<AddressBookEntry>,
        /// Addresses no longer in the book.
        removed: Vec<String>,
    },
    /// The node is draining (shutting down, or taken out of a cluster): connect to another
    /// node. Calls in progress go on until they end; no new call is offered to this
    /// connection and the node refuses new logins (`draining`).
    Reconnect {
        /// Why (`draining`).
        reason: String,
        /// Seconds after which this node may take connections again (it restarts).
        retry_after_secs: u32,
    },
    /// Reply to `ping`.
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// The call this device dialled exists; its id is for `hangup` and the events below.
    Dialing {
        /// Parley's id for the call.
        call_id: String,
        /// As dialled.
        to: String,
    },
    /// The call this device dialled rings at the callee.
    CallRinging {
        /// The call id.
        call_id: String,
    },
    /// The user's routing preferences (reply to `get_preferences` / `set_preferences`).
    Preferences {
        /// The preferences object.
        preferences: serde_json::Value,
    },
    /// A watched user's presence (aggregated over their devices).
    PresenceUpdate {
        /// User name.
        user: String,
        /// The best status of any of their devices (`offline` when none is connected).
        status: Status,
        /// The note of that device, if any.
        note: Option<String>,
        /// Connected devices.
        devices: u32,
    },
    /// A chat message from another user, or (`own`) one this user sent from another
    /// device.
    Chat {
        /// Sender user name.
        from: String,
        /// The message.
        text: String,
        /// Server-assigned message id.
        id: u64,
        /// When the node accepted it, milliseconds since the Unix epoch.
        sent_at_ms: u64,
        /// Recipient (this user, or for `own` copies the user it was sent to).
        #[serde(default)]
        to: String,
        /// A copy of a message this user sent from another device.
        #[serde(default)]
        own: bool,
    },
    /// A message this user sent was delivered to, or read by, its recipient.
    ChatReceipt {
        /// The server's message id.
        message: u64,
        /// Delivered or read.
        status: ReceiptStatus,
        /// The recipient.
        by: String,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// A page of a conversation (reply to `chat_history`), oldest first.
    ChatHistory {
        /// The request's `id`.
        id: Option<u64>,
        /// The other user, as asked.
        with: String,
        /// Messages.
        messages: Vec<ChatRecord>,
        /// More messages exist beyond this page in the direction asked.
        more: bool,
    },
    /// The node accepted a `chat` and handed it to this many devices of the recipient.
    ChatAck {
        /// The client's id from `chat`.
        id: u64,
        /// Devices it was delivered to (0: the recipient is offline).
        delivered: u32,
        /// The server's message id (as the recipient sees it in `chat`).
        #[serde(default)]
        message: u64,
        /// Kept for the recipient's next login (no device of theirs was online).
        #[serde(default)]
        stored: bool,
    },
    /// A `book_set`, `book_delete` or `book_block` was done.
    BookOk {
        /// The request's `id`.
        id: Option<u64>,
        /// The entry as it now stands (`null` after `book_delete`).
        entry: Option<AddressBookEntry>,
    },
    /// The node's answer to `webrtc_offer` (ICE-lite: its one host candidate is in it).
    WebrtcAnswer {
        /// The request's `id`.
        id: Option<u64>,
        /// The answer SDP.
        sdp: String,
    },
    /// A page of the user's calls (reply to `call_history`), newest first.
    CallHistory {
        /// The request's `id`.
        id: Option<u64>,
        /// Calls.
        calls: Vec<CallRecord>,
        /// The cursor of the next (older) page, when there may be one.
        next: Option<String>,
    },
    /// The answer to `book_search`: matching entries, favourites first, then most recent.
    BookResults {
        /// The request's `id`.
        id: Option<u64>,
        /// The query.
        query: String,
        /// Matches.
        entries: Vec<AddressBookEntry>,
    },
}

/// Appends one framed message; refuses (and appends nothing) when its body would exceed
/// [`MAX_FRAME`], which the peer would take for a protocol violation.
pub fn encode<T: Serialize>(msg: &T, out: &mut BytesMut) -> Result<(), CodecError> {
    encode_within(msg, out, MAX_FRAME)
}

/// [`encode`] with another body limit (the agent protocol's frames are larger).
pub(crate) fn encode_within<T: Serialize>(
    msg: &T,
    out: &mut BytesMut,
    limit: usize,
) -> Result<(), CodecError> {
    // Serialising these plain data enums cannot fail (no maps with non-string keys).
    let json = serde_json::to_vec(msg).map_err(|e| CodecError::Control(e.to_string()))?;
    if json.len() > limit {
        return Err(CodecError::FrameTooLarge(json.len()));
    }
    out.reserve(4 + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    Ok(())
}

/// Bytes of a frame kept for the envelope around a page's items (type, offsets, commas).
const PAGE_ENVELOPE: usize = 512;

/// Splits `items` into runs whose JSON fits one frame next to the envelope.
fn pages<T: Serialize>(items: Vec<T>) -> Vec<Vec<T>> {
    let budget = MAX_FRAME - PAGE_ENVELOPE;
    let mut out = Vec::new();
    let mut page = Vec::new();
    let mut used = 0;
    for item in items {
        let size = serde_json::to_vec(&item).map_or(budget, |j| j.len()) + 1;
        if !page.is_empty() && used + size > budget {
            out.push(std::mem::take(&mut page));
            used = 0;
        }
        used += size;
        page.push(item);
    }
    if !page.is_empty() {
        out.push(page);
    }
    out
}

/// The whole book as `address_book` frames, each within [`MAX_FRAME`] (one empty page for
/// an empty book).
pub fn address_book_frames(entries: Vec<AddressBookEntry>) -> Vec<ServerMsg> {
    let total = entries.len() as u64;
    let mut offset = 0;
    let mut frames: Vec<ServerMsg> = pages(entries)
        .into_iter()
        .map(|entries| {
            let page = ServerMsg::AddressBook {
                offset,
                total,
                entries,
            };
            if let ServerMsg::AddressBook { entries, .. } = &page {
                offset += entries.len() as u64;
            }
            page
        })
        .collect();
    if frames.is_empty() {
        frames.push(ServerMsg::AddressBook {
            entries: Vec::new(),
            offset: 0,
            total: 0,
        });
    }
    frames
}

/// A change to the book as `address_book_update` frames, each within [`MAX_FRAME`].
pub fn address_book_update_frames(
    entries: Vec<AddressBookEntry>,
    removed: Vec<String>,
) -> Vec<ServerMsg> {
    let mut frames: Vec<ServerMsg> = pages(removed)
        .into_iter()
        .map(|removed| ServerMsg::AddressBookUpdate {
            entries: Vec::new(),
            removed,
        })
        .collect();
    frames.extend(
        pages(entries)
            .into_iter()
            .map(|entries| ServerMsg::AddressBookUpdate {
                entries,
                removed: Vec::new(),
            }),
    );
    frames
}

/// The `chat_history` frame for a page: the messages nearest the cursor that fit one frame
/// (`older` says which end is nearest: the page asked for messages before a cursor, or
/// the latest ones). `more` is set when some were left out, or the store had more.
pub fn chat_history_frame(
    id: Option<u64>,
    with: String,
    mut messages: Vec<ChatRecord>,
    older: bool,
    more: bool,
) -> ServerMsg {
    let with_bytes = serde_json::to_vec(&with).map_or(MAX_FRAME, |w| w.len());
    let budget = (MAX_FRAME - PAGE_ENVELOPE).saturating_sub(with_bytes);
    let mut used = 0;
    let fits = |m: &ChatRecord, used: &mut usize| {
        *used += serde_json::to_vec(m).map_or(budget, |j| j.len()) + 1;
        *used <= budget
    };
    let n = if older {
        messages
            .iter()
            .rev()
            .take_while(|m| fits(m, &mut used))
            .count()
    } else {
        messages.iter().take_while(|m| fits(m, &mut used)).count()
    };
    let cut = n < messages.len();
    if older {
        messages.drain(..messages.len() - n);
    } else {
        messages.truncate(n);
    }
    ServerMsg::ChatHistory {
        id,
        with,
        messages,
        more: more || cut,
    }
}

/// The `call_history` frame for a page: the newest of `calls` that fit one frame; `next`
/// then points after the last one sent (`cursor_of` gives a call's cursor).
pub fn call_history_frame(
    id: Option<u64>,
    calls: Vec<(CallRecord, String)>,
    next: Option<String>,
) -> ServerMsg {
    let budget = MAX_FRAME - PAGE_ENVELOPE;
    let mut used = 0;
    let total = calls.len();
    let kept: Vec<(CallRecord, String)> = calls
        .into_iter()
        .take_while(|(c, _)| {
            used += serde_json::to_vec(c).map_or(budget, |j| j.len()) + 1;
            used <= budget
        })
        .collect();
    let next = if kept.len() < total {
        kept.last().map(|(_, cursor)| cursor.clone())
    } else {
        next
    };
    ServerMsg::CallHistory {
        id,
        calls: kept.into_iter().map(|(c, _)| c).collect(),
        next,
    }
}

/// The `book_results` frame for a search: as many of `entries` as fit one frame (a
/// search is a question, not a copy of the book; the device narrows it for more).
pub fn book_results_frame(
    id: Option<u64>,
    query: String,
    entries: Vec<AddressBookEntry>,
) -> ServerMsg {
    let query_bytes = serde_json::to_vec(&query).map_or(MAX_FRAME, |q| q.len());
    let budget = (MAX_FRAME - PAGE_ENVELOPE).saturating_sub(query_bytes);
    let mut used = 0;
    let entries = entries
        .into_iter()
        .take_while(|e| {
            used += serde_json::to_vec(e).map_or(budget, |j| j.len()) + 1;
            used <= budget
        })
        .collect();
    ServerMsg::BookResults { id, query, entries }
}

/// A client's copy of its address book, kept from `address_book` pages and
/// `address_book_update` frames.
#[derive(Debug, Clone, Default)]
pub struct AddressBookMirror {
    entries: Vec<AddressBookEntry>,
    total: u64,
}

impl AddressBookMirror {
    /// Applies a server message; `false` when it is not about the address book.
    pub fn apply(&mut self, msg: &ServerMsg) -> bool {
        match msg {
            ServerMsg::AddressBook {
                entries,
                offset,
                total,
            } => {
                if *offset == 0 {
                    self.entries.clear();
                }
                self.entries.extend(entries.iter().cloned());
                self.total = *total;
                true
            }
            ServerMsg::AddressBookUpdate { entries, removed } => {
                self.entries.retain(|e| {
                    !removed.contains(&e.address) && !entries.iter().any(|n| n.address == e.address)
                });
                self.entries.extend(entries.iter().cloned());
                // The book's order: most recent first (RFC 3339 UTC times of one width
                // sort as text), then by address.
                self.entries.sort_by(|a, b| {
                    b.last_seen
                        .cmp(&a.last_seen)
                        .then_with(|| a.address.cmp(&b.address))
                });
                self.total = self.entries.len() as u64;
                true
            }
            _ => false,
        }
    }

    /// The entries, most recent first.
    pub fn entries(&self) -> &[AddressBookEntry] {
        &self.entries
    }

    /// Whether every page of the last full book has arrived.
    pub fn is_complete(&self) -> bool {
        self.entries.len() as u64 >= self.total
    }
}

/// Reads the frame length from a 4-byte header, enforcing [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, CodecError> {
    frame_len_within(header, MAX_FRAME)
}

/// [`frame_len`] with another body limit.
pub(crate) fn frame_len_within(header: [u8; 4], limit: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(CodecError::FrameTooLarge(len));
    }
    Ok(len)
}

/// Decodes one message body (without the length header).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, CodecError> {
    serde_json::from_slice(body).map_err(|e| CodecError::Control(e.to_string()))
}

/// Decodes a client request and the `id` it carries, if any: every request may carry an
/// integer `id`, which the server's `error` for that request echoes. (`chat` and `ping`
/// have an `id` of their own that is also their request id.) On failure the `id` is still
/// returned when it could be read, so the `bad_message` can name the request too.
pub fn decode_request(body: &[u8]) -> (Result<ClientMsg, CodecError>, Option<u64>) {
    let mut value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return (Err(CodecError::Control(e.to_string())), None),
    };
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    if let Some(obj) = value.as_object_mut() {
        let own = matches!(
            obj.get("type").and_then(serde_json::Value::as_str),
            Some("chat" | "ping")
        );
        if !own && id.is_some() {
            obj.remove("id");
        }
    }
    let msg = serde_json::from_value(value).map_err(|e| CodecError::Control(e.to_string()));
    (msg, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_documented_json() {
        let m: ClientMsg = decode(
            br#"{"type":"login","tenant":"demo","user":"alice","password":"demo","device":"desk"}"#,
        )
        .unwrap();
        assert!(matches!(m, ClientMsg::Login { ref user, .. } if user == "alice"));
        let p: ClientMsg = decode(br#"{"type":"presence","status":"away"}"#).unwrap();
        assert_eq!(
            p,
            ClientMsg::Presence {
                status: Status::Away,
                idle_ms: 0,
                note: None
            }
        );
        let s = serde_json::to_string(&ServerMsg::CallConnected {
            call_id: "c1".into(),
            flow_id: 4,
            payload_type: 0,
            video_flow_id: None,
            telephone_event: Some(PT_TELEPHONE_EVENT),
            video_formats: Vec::new(),
        })
        .unwrap();
        assert_eq!(
            s,
            r#"{"type":"call_connected","call_id":"c1","flow_id":4,"payload_type":0,"video_flow_id":null,"telephone_event":101,"video_formats":[]}"#
        );
        // A device that declares Opus; one from before `codecs` existed.
        let c: ClientMsg = decode(br#"{"type":"capabilities","codecs":["opus"]}"#).unwrap();
        assert_eq!(
            c,
            ClientMsg::Capabilities {
                video: false,
                codecs: vec!["opus".into()]
            }
        );
        let old: ClientMsg = decode(br#"{"type":"capabilities","video":true}"#).unwrap();
        assert!(
            matches!(old, ClientMsg::Capabilities { video: true, ref codecs } if codecs.is_empty())
        );
    }

    #[test]
    fn every_request_may_carry_an_id() {
        let rows: Vec<(&str, Option<u64>, bool)> = vec![
            (
                r#"{"type":"subscribe","users":["bob"],"id":42}"#,
                Some(42),
                true,
            ),
            (r#"{"type":"subscribe","users":["bob"]}"#, None, true),
            (r#"{"type":"ping","id":7}"#, Some(7), true),
            (
                r#"{"type":"chat","to":"bob","text":"hi","id":9}"#,
                Some(9),
                true,
            ),
            // A bad request still names itself when its id can be read.
            (r#"{"type":"subscribe","id":5}"#, Some(5), false),
            (r#"{"type":"nonsense","id":6}"#, Some(6), false),
            (r#"not json"#, None, false),
        ];
        for (json, id, ok) in rows {
            let (msg, got) = decode_request(json.as_bytes());
            assert_eq!((msg.is_ok(), got), (ok, id), "{json}");
        }
        let (msg, _) = decode_request(br#"{"type":"ping","id":7}"#);
        assert_eq!(msg.unwrap(), ClientMsg::Ping { id: 7 });
    }

    #[test]
    fn framing_roundtrip_and_limits() {
        let mut buf = BytesMut::new();
        encode(&ClientMsg::Ping { id: 9 }, &mut buf).unwrap();
        let len = frame_len(buf[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, buf.len() - 4);
        assert_eq!(
            decode::<ClientMsg>(&buf[4..]).unwrap(),
            ClientMsg::Ping { id: 9 }
        );
        assert!(frame_len((MAX_FRAME as u32 + 1).to_be_bytes()).is_err());
        assert!(decode::<ClientMsg>(b"{\"type\":\"nope\"}").is_err());
        assert!(decode::<ClientMsg>(b"\xff\xfe").is_err());
    }

    fn entry(address: String, name: Option<String>) -> AddressBookEntry {
        AddressBookEntry {
            address,
            name,
            call_count: 1,
            last_seen: "2026-12-02T05:00:00Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn encode_refuses_a_frame_over_the_limit() {
        let mut buf = BytesMut::new();
        let big = ServerMsg::AddressBook {
            entries: (0..2000)
                .map(|i| entry(format!("+1555{i:07}"), Some("x".repeat(100))))
                .collect(),
            offset: 0,
            total: 2000,
        };
        assert!(matches!(
            encode(&big, &mut buf),
            Err(CodecError::FrameTooLarge(n)) if n > MAX_FRAME
        ));
        assert!(buf.is_empty(), "nothing is appended");
    }

    #[test]
    fn a_large_book_goes_in_pages_that_each_fit_a_frame_and_rebuild_it() {
        // Worst case for escaping: names of control characters (6 bytes each in JSON) at
        // the name limit, addresses at the address limit.
        let book: Vec<AddressBookEntry> = (0..1500)
            .map(|i| {
                let mut address = format!("sip:{i}@");
                address.push_str(&"a".repeat(MAX_BOOK_ADDRESS_BYTES - address.len()));
                entry(address, Some("\u{1}".repeat(MAX_BOOK_NAME_BYTES)))
            })
            .collect();
        let frames = address_book_frames(book.clone());
        assert!(frames.len() > 10, "{} frames", frames.len());
        let mut mirror = AddressBookMirror::default();
        for (n, f) in frames.iter().enumerate() {
            let mut buf = BytesMut::new();
            encode(f, &mut buf).unwrap_or_else(|e| panic!("frame {n}: {e}"));
            assert!(buf.len() - 4 <= MAX_FRAME);
            let back: ServerMsg = decode(&buf[4..]).unwrap();
            assert!(mirror.apply(&back));
            assert_eq!(
                mirror.is_complete(),
                n + 1 == frames.len(),
                "after frame {n}"
            );
        }
        assert_eq!(mirror.entries(), &book[..]);
        // An empty book is one empty page.
        assert_eq!(
            address_book_frames(Vec::new()),
            vec![ServerMsg::AddressBook {
                entries: Vec::new(),
                offset: 0,
                total: 0
            }]
        );
        // A new full book replaces the old one.
        assert!(mirror.apply(&address_book_frames(vec![entry("+1".into(), None)])[0]));
        assert_eq!(mirror.entries().len(), 1);
    }

    #[test]
    fn updates_replace_remove_and_keep_the_books_order() {
        let mut mirror = AddressBookMirror::default();
        mirror.apply(
            &address_book_frames(vec![
                entry("+1".into(), None),
                entry("+2".into(), None),
                entry("+3".into(), None),
            ])[0],
        );
        let mut bumped = entry("+3".into(), Some("Carol".into()));
        bumped.call_count = 2;
        bumped.last_seen = "2026-12-02T06:00:00.000Z".into();
        let mut new = entry("+4".into(), None);
        new.last_seen = "2026-12-02T05:30:00.000Z".into();
        // An edit of an old entry: it keeps its place.
        let mut renamed = entry("+0".into(), Some("Zed".into()));
        renamed.last_seen = "2026-12-01T00:00:00.000Z".into();
        let frames =
            address_book_update_frames(vec![new, renamed, bumped.clone()], vec!["+2".into()]);
        for f in &frames {
            let mut buf = BytesMut::new();
            encode(f, &mut buf).unwrap();
            assert!(mirror.apply(f));
        }
        let got: Vec<&str> = mirror
            .entries()
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        // Most recent first, then by address.
        assert_eq!(got, ["+3", "+4", "+1", "+0"]);
        assert_eq!(mirror.entries()[0], bumped);
        assert!(mirror.is_complete());
        // Many removals still fit frames.
        let removed: Vec<String> = (0..5000)
            .map(|i| format!("sip:{i}@{}", "b".repeat(200)))
            .collect();
        let frames = address_book_update_frames(Vec::new(), removed);
        assert!(frames.len() > 1);
        for f in &frames {
            encode(f, &mut BytesMut::new()).unwrap();
        }
        assert!(!mirror.apply(&ServerMsg::Pong { id: 1 }));
    }

    #[test]
    fn optional_fields_the_server_sends_are_present_as_null() {
        // protocol.md §2: "Optional fields sent by the server are always present, with
        // `null` when absent."
        let connected = ServerMsg::CallConnected {
            call_id: "c1".into(),
            flow_id: 1,
            payload_type: 0,
            video_flow_id: None,
            telephone_event: None,
            video_formats: Vec::new(),
        };
        let rows = [
            (connected.clone(), "video_flow_id"),
            (connected, "telephone_event"),
            (
                ServerMsg::IncomingCall {
                    call_id: "c1".into(),
                    from: "+1".into(),
                    from_name: None,
                    to: "+2".into(),
                    video: false,
                },
                "from_name",
            ),
            (
                ServerMsg::Error {
                    code: "x".into(),
                    message: "y".into(),
                    fatal: false,
                    id: None,
                },
                "id",
            ),
            (
                ServerMsg::AddressBookUpdate {
                    entries: vec![entry("+1".into(), None)],
                    removed: Vec::new(),
                },
                "name",
            ),
        ];
        for (msg, field) in rows {
            let json = serde_json::to_string(&msg).unwrap();
            assert!(json.contains(&format!("\"{field}\":null")), "{json}");
        }
    }
}
