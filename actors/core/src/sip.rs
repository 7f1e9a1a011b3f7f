//! The call's interface with its SIP legs: commands a call gives the SIP core, and events
//! the SIP core reports to a call. Plain data, so both cores speak it without an actor.

use std::net::SocketAddr;

use parley_codecs::sdp::MediaDescription;

/// A SIP action on one of the call's dialogs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SipLegCmd {
    /// 180 Ringing to the caller.
    CallerRinging,
    /// 200 OK with this SDP answer to the caller.
    CallerAnswer {
        /// SDP body.
        sdp: String,
    },
    /// Final error response to the caller's INVITE.
    CallerReject(u16),
    /// BYE to the caller.
    CallerBye,
    /// INVITE toward a trunk (again after a failover: a new INVITE to the next trunk
    /// replaces the failed leg).
    TrunkInvite {
        /// Which trunk ([`crate::numberplan::TrunkId`]).
        trunk: crate::numberplan::TrunkId,
        /// Number to call.
        to: String,
        /// Caller number/URI to present.
        from: String,
        /// Caller display name.
        from_name: Option<String>,
        /// SDP offer.
        sdp: String,
    },
    /// CANCEL the trunk INVITE.
    TrunkCancel,
    /// BYE to the trunk.
    TrunkBye,
    /// The call is over; forget its dialogs once their transactions end.
    Done,
}

/// What the SIP core reports to a call.
#[derive(Debug, Clone, PartialEq)]
pub enum SipEvent {
    /// The caller cancelled.
    CallerCancel,
    /// The caller hung up.
    CallerBye,
    /// The caller never acknowledged our 200 OK.
    CallerAckTimeout,
    /// The trunk leg rings (180/183).
    TrunkRinging,
    /// The trunk leg answered with this SDP.
    TrunkAnswered(MediaDescription),
    /// The trunk leg failed with this status (408 for a timeout).
    TrunkFailed(u16),
    /// The trunk hung up.
    TrunkBye,
    /// The caller's re-INVITE moved its media to this address.
    CallerMediaMoved(SocketAddr),
    /// The trunk's re-INVITE moved its media to this address.
    TrunkMediaMoved(SocketAddr),
    /// The caller's re-INVITE moved its video stream to this address.
    CallerVideoMoved(SocketAddr),
}
