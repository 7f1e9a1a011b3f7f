//! Call detail records: what a finished call leaves, with its route, disposition and
//! direction as enums whose string forms are stable (they are stored, exported as metric
//! labels and documented in `docs/operations.md`).

use std::time::SystemTime;

/// How a call ended, as recorded in the CDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Answered, then hung up by either side.
    Answered,
    /// The caller cancelled while it rang.
    Cancelled,
    /// Nobody answered within the ring timeout.
    NoAnswer,
    /// The callee declined.
    Rejected,
    /// Nowhere to ring, or every leg failed.
    Unavailable,
    /// Signalling failed (e.g. the caller never acknowledged the answer).
    Failed,
    /// The call is still up: the row written when it started, completed when it ends.
    InProgress,
    /// The node stopped (drain deadline) or crashed while the call was up; the row was
    /// closed at shutdown or at the next start.
    Interrupted,
}

impl Disposition {
    /// The CDR/metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Answered => "ANSWERED",
            Disposition::Cancelled => "CANCELLED",
            Disposition::NoAnswer => "NO_ANSWER",
            Disposition::Rejected => "REJECTED",
            Disposition::Unavailable => "UNAVAILABLE",
            Disposition::Failed => "FAILED",
            Disposition::InProgress => "IN_PROGRESS",
            Disposition::Interrupted => "INTERRUPTED",
        }
    }
}

/// Which way the call went, as the CDR's owner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A call to the CDR's user (the caller is the other party).
    In,
    /// The user dialled out (the called number is the other party).
    Out,
}

impl Direction {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// Where the call's legs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallRoute {
    /// IM devices.
    Im,
    /// The PSTN line through the trunk (or a PSTN number a device dialled).
    Pstn,
    /// A forwarding number through the trunk.
    Forward,
    /// Nowhere.
    None,
}

impl CallRoute {
    /// The CDR/metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CallRoute::Im => "im",
            CallRoute::Pstn => "pstn",
            CallRoute::Forward => "forward",
            CallRoute::None => "none",
        }
    }
}

/// A finished call, as written to the CDR store.
#[derive(Debug, Clone, PartialEq)]
pub struct CdrRecord {
    /// Parley call id.
    pub call_id: String,
    /// The gateway's SIP Call-ID.
    pub sip_call_id: String,
    /// Tenant of the called user.
    pub tenant: String,
    /// Called user.
    pub user: String,
    /// Caller's E.164 number, or SIP URI when not a telephone number.
    pub caller: String,
    /// Caller's display name.
    pub caller_name: Option<String>,
    /// Dialled number (E.164).
    pub called: String,
    /// Where the call's legs went.
    pub route: CallRoute,
    /// INVITE received.
    pub start: SystemTime,
    /// Answered, if it was.
    pub answer: Option<SystemTime>,
    /// Ended.
    pub end: SystemTime,
    /// How it ended.
    pub disposition: Disposition,
    /// SIP cause.
    pub cause: u16,
    /// RTP/RTCP packets caller → callee.
    pub packets_in: u64,
    /// RTP/RTCP packets callee → caller.
    pub packets_out: u64,
    /// Who answered: the device name, or `pstn`.
    pub answered_by: Option<String>,
    /// Which way the call went.
    pub direction: Direction,
    /// For a call a user's device placed to another user: the caller, whose address book
    /// records it as outgoing.
    pub dialled_by: Option<crate::directory::UserIdentity>,
}

impl CdrRecord {
    /// The other party, whose address goes into the user's address book: the caller of
    /// a call to the user, the called number of a call the user dialled.
    pub fn other_party(&self) -> (&str, Option<&str>) {
        match self.direction {
            Direction::Out => (&self.called, None),
            Direction::In => (&self.caller, self.caller_name.as_deref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_forms_are_stable() {
        let all = [
            (Disposition::Answered, "ANSWERED"),
            (Disposition::Cancelled, "CANCELLED"),
            (Disposition::NoAnswer, "NO_ANSWER"),
            (Disposition::Rejected, "REJECTED"),
            (Disposition::Unavailable, "UNAVAILABLE"),
            (Disposition::Failed, "FAILED"),
            (Disposition::InProgress, "IN_PROGRESS"),
            (Disposition::Interrupted, "INTERRUPTED"),
        ];
        for (d, s) in all {
            assert_eq!(d.as_str(), s);
        }
        assert_eq!(
            [
                CallRoute::Im,
                CallRoute::Pstn,
                CallRoute::Forward,
                CallRoute::None
            ]
            .map(CallRoute::as_str),
            ["im", "pstn", "forward", "none"]
        );
        assert_eq!(
            [Direction::In, Direction::Out].map(Direction::as_str),
            ["in", "out"]
        );
    }
}
