//! Control messages of the Parley IM protocol (`docs/protocol.md`).
//!
//! One JSON object per frame; a frame is a 4-byte big-endian length followed by that many
//! bytes of UTF-8 JSON. Every object has a `"type"` field naming the message.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::CodecError;

/// Largest control frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;

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
        /// Password (sent over the TLS 1.3 QUIC connection, verified against a hash).
        password: String,
        /// A name for this device, unique per user (e.g. `desktop`).
        device: String,
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
    /// What this device can do; sent after login (before it, a device is audio-only).
    Capabilities {
        /// The device can send and receive video.
        #[serde(default)]
        video: bool,
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
    /// Send a chat message to every online device of a user of the same tenant.
    Chat {
        /// Recipient user name.
        to: String,
        /// The message, at most [`MAX_CHAT_BYTES`] bytes of UTF-8.
        text: String,
        /// The client's id for this message, echoed in `chat_ack`.
        #[serde(default)]
        id: u64,
    },
}

/// Longest chat message accepted.
pub const MAX_CHAT_BYTES: usize = 16 * 1024;

/// One address book entry as the device sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressBookEntry {
    /// E.164 number, or a SIP URI when the party had no telephone number.
    pub address: String,
    /// Display name where known.
    pub name: Option<String>,
    /// Calls seen with this party.
    pub call_count: u64,
    /// Last call, RFC 3339.
    pub last_seen: String,
}

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
        /// RTP payload type in use (0 PCMU, 8 PCMA).
        payload_type: u8,
        /// RoQ flow id of the video stream, when the call has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        video_flow_id: Option<u64>,
    },
    /// The call ended (or the offer to this device was withdrawn).
    CallEnded {
        /// The call id.
        call_id: String,
        /// Why (`remote_hangup`, `answered_elsewhere`, `cancelled`, `timeout`, `media_unavailable`, `rerouted`).
        reason: String,
    },
    /// The whole address book of the user.
    AddressBook {
        /// Entries, most recent first.
        entries: Vec<AddressBookEntry>,
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
    /// A chat message from another user.
    Chat {
        /// Sender user name.
        from: String,
        /// The message.
        text: String,
        /// Server-assigned message id.
        id: u64,
        /// When the node accepted it, milliseconds since the Unix epoch.
        sent_at_ms: u64,
    },
    /// The node accepted a `chat` and handed it to this many devices of the recipient.
    ChatAck {
        /// The client's id from `chat`.
        id: u64,
        /// Devices it was delivered to (0: the recipient is offline; not stored).
        delivered: u32,
    },
}

/// Appends one framed message.
pub fn encode<T: Serialize>(msg: &T, out: &mut BytesMut) {
    // Serialising these plain data enums cannot fail (no maps with non-string keys).
    let json = serde_json::to_vec(msg).unwrap_or_default();
    out.reserve(4 + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
}

/// Reads the frame length from a 4-byte header, enforcing [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
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
        })
        .unwrap();
        assert_eq!(
            s,
            r#"{"type":"call_connected","call_id":"c1","flow_id":4,"payload_type":0}"#
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
        encode(&ClientMsg::Ping { id: 9 }, &mut buf);
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
}
