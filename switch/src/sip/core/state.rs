//! The state the SIP core keeps per call: the caller's dialog (we are its UAS), the
//! trunk leg (we are its UAC), the media each negotiated, and why each of our client
//! transactions was started. Plain data: the behaviour lives in the file of each concern.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_codecs::sdp;
use sipx_sip::{Request, TransactionKey, Uri};

use crate::sip::transport::Peer;

/// Which dialog of a call a Call-ID names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// The caller's dialog (we are its UAS).
    Caller,
    /// The trunk leg (we are its UAC).
    Trunk,
}

/// Why we started a client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// The INVITE of a trunk leg.
    TrunkInvite,
    /// Its CANCEL.
    TrunkCancel,
    /// A BYE on either dialog.
    Bye,
    /// An OPTIONS health probe, by probe id.
    Probe(u64),
}

/// One call's dialogs.
#[derive(Debug)]
pub(super) struct Call {
    /// `None` for calls dialled from an IM device (only the trunk leg is SIP).
    pub(super) caller: Option<CallerLeg>,
    pub(super) trunk: Option<TrunkLeg>,
    /// The call actor is done with it; kept only to absorb retransmissions.
    pub(super) done: bool,
}

/// Our UAS side of the caller's dialog.
#[derive(Debug)]
pub(super) struct CallerLeg {
    pub(super) invite: Request,
    pub(super) key: TransactionKey,
    pub(super) src: Peer,
    pub(super) local_tag: String,
    pub(super) final_sent: bool,
    pub(super) ok: Option<Bytes>,
    pub(super) acked: bool,
    pub(super) retx_interval: Duration,
    pub(super) retx_deadline: Option<Instant>,
    pub(super) local_cseq: u32,
    pub(super) remote_target: Option<Uri>,
    /// Set once we answered 200 with SDP.
    pub(super) media: Option<MediaState>,
    /// Which 200 is being retransmitted (bumped by each re-INVITE's 200).
    pub(super) retx_gen: u32,
    /// CSeq of the INVITE whose 200 awaits its ACK (a late ACK of an earlier one does
    /// not stop a re-INVITE's 200).
    pub(super) ack_cseq: u32,
}

/// Our UAC side toward the trunk.
#[derive(Debug)]
pub(super) struct TrunkLeg {
    /// Which configured trunk the INVITE went to.
    pub(super) trunk: parley_core::numberplan::TrunkId,
    /// Our From tag: with `call_id`, the leg's dialog key.
    pub(super) local_tag: String,
    pub(super) call_id: String,
    pub(super) invite: Request,
    pub(super) dest: Peer,
    pub(super) to_value: Option<String>,
    pub(super) remote_target: Option<Uri>,
    pub(super) answered: bool,
    pub(super) cancelled: bool,
    /// Whether we already answered a digest challenge (one try per leg, no 401 loops).
    pub(super) auth_tried: bool,
    /// Set once the trunk answered 200 with SDP.
    pub(super) media: Option<MediaState>,
}

/// The media of an established dialog, as re-offers (re-INVITE) see it.
#[derive(Debug, Clone)]
pub(super) struct MediaState {
    /// Our current description (answer or offer); its `o=` line carries the version.
    pub(super) local_sdp: String,
    /// Where the peer last said it receives audio.
    pub(super) remote: Option<SocketAddr>,
    /// Where the peer last said it receives video.
    pub(super) remote_video: Option<SocketAddr>,
}

impl MediaState {
    pub(super) fn new(local_sdp: &str, remote_sdp: &[u8]) -> Self {
        let remote = sdp::parse_offer(&String::from_utf8_lossy(remote_sdp)).ok();
        Self {
            local_sdp: local_sdp.to_owned(),
            remote: remote
                .as_ref()
                .map(|(a, _)| SocketAddr::new(a.addr, a.port)),
            remote_video: remote
                .and_then(|(_, v)| v)
                .map(|v| SocketAddr::new(v.addr, v.port)),
        }
    }

    /// Whether our description relays a video stream (an accepted `m=video`).
    pub(super) fn has_video(&self) -> bool {
        self.local_sdp
            .lines()
            .any(|l| l.starts_with("m=video ") && !l.starts_with("m=video 0 "))
    }
}
