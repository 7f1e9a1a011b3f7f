//! What a call takes in and gives out: its birth certificate ([`CallSpec`]), device
//! events, and the actions and observations the driver performs.

use std::time::{Duration, Instant, SystemTime};

use parley_codecs::sdp::MediaDescription;

use super::media::{MediaPlan, Origin};
use crate::cdr::{CallRoute, Disposition};
use crate::directory::UserIdentity;
use crate::ids::{CallHandle, SessionId};
use crate::numberplan::TrunkId;
use crate::plan::LegId;
use crate::trunk::ProbeOutcome;

/// What a device did about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceLegEvent {
    /// The offer reached the device: it is ringing.
    Delivered,
    /// The user answered.
    Answer,
    /// The user declined.
    Reject,
    /// The user hung up.
    Hangup,
    /// The device disconnected.
    Gone,
}

/// The INVITE toward the trunk, as the call decides it; the driver adds the relay port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrunkOffer {
    /// The trunk to send it to.
    pub trunk: TrunkId,
    /// Number to call: the user's own line or a forwarding/dialled number.
    pub to: String,
    /// G.711 payload types to offer.
    pub formats: Vec<u8>,
    /// Telephone-event payload type to offer.
    pub telephone_event: Option<u8>,
}

/// Something the driver should record (metrics, logs); never changes the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The callee's rules (or the default policy) decided.
    Routed {
        /// `ring`, `forward`, `reject` or `none` ([`Plan::label`]).
        plan: &'static str,
        /// The rule that decided; `None`: the default policy.
        rule: Option<String>,
    },
    /// A presence change re-routed the ringing call.
    Rerouted {
        /// Where it rings now.
        route: CallRoute,
        /// Re-routes so far.
        reroutes: u32,
    },
    /// A leg started by a re-route rings; `since` is when the presence change happened.
    RerouteRinging {
        /// The presence change.
        since: Instant,
    },
    /// The caller hears ringback; `after` the INVITE.
    CallerRinging {
        /// Time since the call started.
        after: Duration,
    },
    /// The call was answered `after` the INVITE.
    Connected {
        /// Time since the call started.
        after: Duration,
    },
    /// No media crossed the answered call for this long: it ends.
    MediaTimedOut {
        /// How long the media was idle.
        idle: Duration,
    },
    /// A trunk gave its final answer to this call's INVITE (`code` 200 when it answered;
    /// 408 when it never answered).
    TrunkAttempt {
        /// The trunk.
        trunk: TrunkId,
        /// Its final status.
        code: u16,
    },
    /// The call moved on from a trunk that failed (408, 5xx) to the next one.
    TrunkFailover {
        /// The trunk that failed.
        from: TrunkId,
        /// The trunk tried now.
        to: TrunkId,
        /// How `from` failed.
        code: u16,
    },
    /// The callee already had `ringing` calls ringing: this one was refused 486.
    TooManyRinging {
        /// Calls ringing the callee.
        ringing: usize,
    },
    /// A device never acknowledged its offer: presumed lost, the call routes on.
    OfferUnacknowledged {
        /// The device.
        session: SessionId,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch the callee's [`CalleeView`] and the trunks' state ([`TrunkSnapshot`]), then
    /// call [`CallCore::handle_lookup`].
    Lookup,
    /// Tell the callee's presence that this ringing call watches it (presence changes
    /// then come in as [`CallCore::handle_presence_changed`]).
    WatchPresence,
    /// Offer the call to a device (with video when both ends take it).
    OfferDevice {
        /// The device.
        session: SessionId,
        /// Whether the offer carries video.
        video: bool,
    },
    /// Reserve a relay port (or keep the one this call's trunk leg already has: after a
    /// failover) and send this INVITE to the offer's trunk; a port shortage comes back as
    /// [`CallCore::handle_trunk_unavailable`].
    StartTrunk(TrunkOffer),
    /// Send 180 Ringing to the caller (a device caller hears `call_ringing`).
    CallerRinging,
    /// Wire the answered call's media as planned, answer the caller and tell the devices;
    /// a failure comes back as [`CallCore::handle_connect_failed`].
    Connect(MediaPlan),
    /// Send a final error response to the caller (a device caller gets `call_ended` with
    /// [`EndReason::of_cause`]).
    RejectCaller(u16),
    /// Send BYE to the caller (a device caller gets `call_ended`, `remote_hangup`).
    ByeCaller,
    /// Stop a ringing leg (device: withdraw the offer; trunk: CANCEL).
    Withdraw(LegId, EndReason),
    /// End an answered leg (device: call ended; trunk: BYE).
    Hangup(LegId, EndReason),
    /// Feed a trunk's health with what this call learned.
    TrunkHealth(TrunkId, ProbeOutcome),
    /// A device of the callee answered: the answer history learns it. `rank` is where
    /// prediction had put it (`1`, `2`, `3+`, `unranked`).
    Answered {
        /// Device name.
        device: String,
        /// Prediction rank label.
        rank: &'static str,
    },
    /// A SIP peer moved its media (re-INVITE): re-point that relay port.
    Repoint(MediaSide, std::net::SocketAddr),
    /// Report how long the answered call's media has been idle through
    /// [`CallCore::handle_media_idle`].
    SampleMedia,
    /// Record this.
    Observe(Observation),
    /// A device did not acknowledge an offer within the offer timeout: its connection is
    /// presumed lost (a phone that lost its network sends no close). Close it, so that its
    /// presence goes and no later call rings it; this call has already routed on.
    DropDevice(SessionId),
    /// The call is over: release media, write [`CallCore::cdr`], stop.
    Finish {
        /// CDR disposition.
        disposition: Disposition,
        /// SIP cause code sent to or received from the caller.
        cause: u16,
    },
}

/// Which relay port a SIP peer's media move concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaSide {
    /// The caller's audio.
    Caller,
    /// The caller's video.
    CallerVideo,
    /// The trunk's audio.
    Trunk,
}

/// Why a device's part in a call ended: the `reason` of `call_ended` (`docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Another leg answered first.
    AnsweredElsewhere,
    /// A presence change or the next step of the plan moved the call elsewhere.
    Rerouted,
    /// The caller cancelled.
    Cancelled,
    /// Nobody answered in time.
    Timeout,
    /// The other side hung up.
    RemoteHangup,
    /// No media crossed the call for the media timeout.
    MediaTimeout,
    /// The relay could not carry the call's media.
    MediaUnavailable,
    /// The callee declined (a dialled call).
    Rejected,
    /// The callee cannot be reached now (a dialled call).
    Unavailable,
    /// Signalling failed (a dialled call).
    Failed,
}

impl EndReason {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::AnsweredElsewhere => "answered_elsewhere",
            EndReason::Rerouted => "rerouted",
            EndReason::Cancelled => "cancelled",
            EndReason::Timeout => "timeout",
            EndReason::RemoteHangup => "remote_hangup",
            EndReason::MediaTimeout => "media_timeout",
            EndReason::MediaUnavailable => "media_unavailable",
            EndReason::Rejected => "rejected",
            EndReason::Unavailable => "unavailable",
            EndReason::Failed => "failed",
        }
    }

    /// What a device caller hears when its call ends with a SIP-style cause.
    pub fn of_cause(code: u16) -> Self {
        match code {
            486 | 600 | 603 => EndReason::Rejected,
            487 => EndReason::Cancelled,
            408 | 480 => EndReason::Unavailable,
            _ => EndReason::Failed,
        }
    }
}

/// Everything a call knows at birth.
#[derive(Debug, Clone)]
pub struct CallSpec {
    /// The call's handle (its Parley call id is `c-<handle>`).
    pub handle: CallHandle,
    /// The gateway's Call-ID (the Parley call id for dialled calls).
    pub sip_call_id: String,
    /// The user who owns the CDR: the callee, or for a PSTN number dialled by a device,
    /// the caller's own user.
    pub user: UserIdentity,
    /// Who placed the call.
    pub origin: Origin,
    /// The Parley user whose device dialled another user (their book records the call as
    /// outgoing; `user` records it as incoming). `None` for gateway calls and for PSTN
    /// numbers dialled by a device (`user` is then the caller).
    pub dialled_by: Option<UserIdentity>,
    /// Caller number (E.164) or URI.
    pub caller: String,
    /// Caller display name.
    pub caller_name: Option<String>,
    /// Dialled number (E.164).
    pub called: String,
    /// For a device dialling a PSTN number: that number.
    pub pstn_destination: Option<String>,
    /// The caller's audio offer.
    pub offer: MediaDescription,
    /// The caller's video offer.
    pub video_offer: Option<MediaDescription>,
    /// Give up ringing after this long.
    pub ring_timeout: Duration,
    /// End an answered call when no media crosses it for this long.
    pub media_timeout: Option<Duration>,
    /// How long a device has to acknowledge an offer (`ringing`) before the call treats
    /// it as gone (`None`: wait for the ring timeout).
    pub offer_ack_timeout: Option<Duration>,
    /// Calls already ringing the callee beyond which this one is refused 486 Busy Here
    /// (`None`: unbounded): a flood of calls to one user cannot pile up on their devices.
    pub max_ringing: Option<usize>,
    /// When the call started.
    pub started: Instant,
    /// The same instant on the wall clock (CDR times are `started_wall` plus elapsed
    /// monotonic time, so a clock step mid-call cannot make a negative duration).
    pub started_wall: SystemTime,
}
