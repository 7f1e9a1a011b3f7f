//! Messages between actors and their drivers, and the small traits through which actors
//! reach the data plane and storage without depending on sockets or databases.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use actix::prelude::*;

pub use parley_core::call::DeviceLegEvent;
pub use parley_core::cdr::CdrRecord;
pub use parley_core::ids::{CallHandle, SessionId};
pub use parley_core::sip::{SipEvent, SipLegCmd};

/// From a call actor to a device session.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum ToDevice {
    /// Ring the device.
    Offer {
        /// Parley call id.
        call_id: String,
        /// Caller's number or URI.
        from: String,
        /// Caller's display name.
        from_name: Option<String>,
        /// Dialled number.
        to: String,
        /// Whether the call offers video.
        video: bool,
        /// The gateway's SIP Call-ID (empty for a call a device placed): carried to a
        /// device on another node, whose node then names it in a CDR it writes for the
        /// call if the call's own node dies.
        sip_call_id: String,
        /// Where the device's answer/reject/hang-up go.
        call: Recipient<FromDevice>,
    },
    /// The call this device dialled is ringing at the callee.
    Ringing {
        /// Parley call id.
        call_id: String,
    },
    /// The device's answer was accepted; media runs on `flow_id`.
    Connected {
        /// Parley call id.
        call_id: String,
        /// RoQ flow id.
        flow_id: u64,
        /// RTP payload type.
        payload_type: u8,
        /// RoQ flow id of the video stream, if the call has one for this device.
        video_flow_id: Option<u64>,
        /// Telephone-event payload type on the audio flow, when the other side takes it.
        telephone_event: Option<u8>,
        /// The video stream's formats (empty without video).
        video_formats: Vec<parley_codecs::control::VideoFormat>,
    },
    /// The device left an offer unacknowledged: it is presumed lost; close its session.
    Unresponsive,
    /// The offer is withdrawn or the call is over.
    Ended {
        /// Parley call id.
        call_id: String,
        /// Why (see `docs/protocol.md`).
        reason: &'static str,
    },
}

/// Send this message to the device as is.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Push(pub parley_codecs::control::ServerMsg);

/// From a device session to a call actor.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct FromDevice {
    /// Which device.
    pub session: SessionId,
    /// What happened.
    pub event: DeviceLegEvent,
}

/// From a call actor to the SIP driver.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SipCommand {
    /// The call.
    pub call: CallHandle,
    /// What to do.
    pub cmd: SipLegCmd,
    /// Where this call's SIP events go, given with the first command of a call the
    /// driver did not start (calls dialled from IM devices start with a trunk INVITE).
    pub events: Option<Recipient<ToCall>>,
}

/// From the SIP driver to a call actor.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ToCall(pub SipEvent);

/// Packet counters of one bridged media stream, bumped by the relay once per batch.
///
/// The call [closes](FlowStats::close) them when it ends: it gets the final counts for
/// its CDR, and the relay forwards nothing of the stream after that (a batch counted
/// after the close is dropped, not sent), so the CDR holds exactly what was relayed even
/// while packets still arrive in the moment between the call's release of its ports and
/// the relay workers' letting go of them. Read the counts with [`FlowStats::packets`].
#[derive(Debug, Default)]
pub struct FlowStats {
    /// Packets from the caller side relayed toward the callee side (top bit: closed).
    pub caller_to_callee: AtomicU64,
    /// Packets from the callee side relayed toward the caller side (top bit: closed).
    pub callee_to_caller: AtomicU64,
    /// When a packet last crossed this stream, in [`flow_clock_ms`] (0: never).
    pub last_activity_ms: AtomicU64,
}

/// Milliseconds on a process-wide monotonic clock (since its first use); the relay stamps
/// [`FlowStats::last_activity_ms`] with it and calls compare against it.
pub fn flow_clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    // +1 so that a stamp is never 0 ("never").
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// The closed bit of a [`FlowStats`] counter.
const CLOSED: u64 = 1 << 63;

impl FlowStats {
    /// Counts `n` packets about to be relayed from one side (once per batch on the hot
    /// path) and stamps the stream as active. `false`: the call has closed the stream,
    /// nothing was counted and the packets must not be sent.
    #[must_use]
    pub fn count(&self, from_caller: bool, n: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let c = if from_caller {
            &self.caller_to_callee
        } else {
            &self.callee_to_caller
        };
        // One read-modify-write decides: before the close's, the packets are in its
        // counts; after it, they are taken back out.
        if c.fetch_add(n, Relaxed) & CLOSED != 0 {
            c.fetch_sub(n, Relaxed);
            return false;
        }
        self.last_activity_ms.store(flow_clock_ms(), Relaxed);
        true
    }

    /// Packets relayed so far: (caller to callee, callee to caller).
    pub fn packets(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.caller_to_callee.load(Relaxed) & !CLOSED,
            self.callee_to_caller.load(Relaxed) & !CLOSED,
        )
    }

    /// Closes the stream: its final counts (caller to callee, callee to caller); the relay
    /// sends none of its packets after this.
    pub fn close(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.caller_to_callee.fetch_or(CLOSED, Relaxed) & !CLOSED,
            self.callee_to_caller.fetch_or(CLOSED, Relaxed) & !CLOSED,
        )
    }

    /// Milliseconds since a packet last crossed the stream (or since `since_ms` if none
    /// has yet).
    pub fn idle_ms(&self, since_ms: u64) -> u64 {
        let last = self
            .last_activity_ms
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(since_ms);
        flow_clock_ms().saturating_sub(last)
    }
}

/// Errors from the data plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// Every relay port is in use.
    #[error("relay port range exhausted")]
    PortsExhausted,
    /// The relay worker is gone.
    #[error("relay unavailable")]
    Unavailable,
}

impl MediaError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PortsExhausted => "ports_exhausted",
            Self::Unavailable => "unavailable",
        }
    }
}

/// The media relay as the control plane sees it. Implemented by the switch's relay.
pub trait MediaPlane: Send + Sync + 'static {
    /// The address the relay's sockets listen on (goes into SDP).
    fn local_ip(&self) -> IpAddr;
    /// Reserves a relay port.
    fn allocate_port(&self) -> Result<u16, MediaError>;
    /// Reserves a relay port for the other leg of the call that holds `near`: where the
    /// relay can, one served by the same worker thread (a call's two legs then never
    /// cross threads), else any.
    fn allocate_port_near(&self, near: u16) -> Result<u16, MediaError> {
        let _ = near;
        self.allocate_port()
    }
    /// A fresh RoQ flow id.
    fn next_flow_id(&self) -> u64;
    /// Bridges two relay ports: what arrives on `caller.0` goes to `callee.1` from
    /// `callee.0`, and back.
    fn bridge_udp(
        &self,
        caller: (u16, SocketAddr),
        callee: (u16, SocketAddr),
        stats: Arc<FlowStats>,
    ) -> Result<(), MediaError>;
    /// Bridges a relay port with a RoQ flow on a device session.
    fn bridge_roq(
        &self,
        caller: (u16, SocketAddr),
        session: SessionId,
        flow_id: u64,
        stats: Arc<FlowStats>,
    ) -> Result<(), MediaError>;
    /// Bridges two RoQ flows (device to device): what the caller's device sends on its flow
    /// goes to the callee's device on the callee's flow, and back.
    fn bridge_roq_roq(
        &self,
        caller: (SessionId, u64),
        callee: (SessionId, u64),
        stats: Arc<FlowStats>,
    ) -> Result<(), MediaError>;
    /// Signalling moved the media address of the peer on relay port `port` (re-INVITE):
    /// the port latches afresh (never onto its previous source), the bridged side sends to
    /// `peer`, and the stream relayed out of the port stays continuous (SSRC, sequence,
    /// timestamp) across the change.
    fn repoint(&self, port: u16, peer: SocketAddr) -> Result<(), MediaError>;
    /// Removes every flow on these ports and these RoQ flows, and frees the ports.
    fn release(&self, ports: &[u16], roq: &[(SessionId, u64)]);
}

/// Where finished calls go. Must not lose a record.
pub trait CdrSink: Send + Sync + 'static {
    /// Hands over one record.
    fn submit(&self, cdr: CdrRecord);
}

#[cfg(test)]
mod tests {
    use super::FlowStats;

    /// A closed stream's counts are final: a batch counted after the close is refused
    /// (the relay drops it) and leaves the counts as the CDR has them.
    #[test]
    fn a_closed_streams_counts_are_final_and_later_batches_are_refused() {
        let s = FlowStats::default();
        assert!(s.count(true, 3));
        assert!(s.count(false, 2));
        assert_eq!(s.packets(), (3, 2));
        assert_eq!(s.close(), (3, 2));
        assert!(!s.count(true, 5));
        assert!(!s.count(false, 1));
        assert_eq!(s.packets(), (3, 2));
        // Closing again changes nothing.
        assert_eq!(s.close(), (3, 2));
    }
}
