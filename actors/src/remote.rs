//! Devices on other nodes of a cluster, as the actors see them: two traits the switch's
//! cluster layer implements (`switch::cluster`), so that this crate stays free of NATS.
//!
//! A user's actor on every node holds the user's devices on the other nodes beside its
//! own ([`crate::user::RemoteDevice`]); a call rings such a device like a local one (its
//! `Recipient<ToDevice>` is a proxy that carries the offer to the device's node), and when
//! it is answered the call bridges its relay port to the device's node over UDP
//! ([`RemoteLegs`]) instead of to a device connection.

use std::net::SocketAddr;

use actix::Recipient;
use parley_core::router::DeviceState;

use crate::messages::{SessionId, ToDevice};

/// Where a user actor reports its own (local) devices, so that other nodes learn them.
pub trait DeviceBoard: Send + Sync + 'static {
    /// A local device logged in or changed presence or capabilities.
    fn device_changed(
        &self,
        tenant: &str,
        user: &str,
        state: &DeviceState,
        calls: &Recipient<ToDevice>,
    );
    /// A local device's session ended.
    fn device_gone(&self, session: SessionId);
}

impl std::fmt::Debug for dyn DeviceBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceBoard")
    }
}

/// The media side of a leg to a device on another node.
pub trait RemoteLegs: Send + Sync + 'static {
    /// Where the device's node receives this call's media, once the device answered;
    /// `None` for a local session.
    fn answer_media(&self, session: SessionId, call_id: &str) -> Option<SocketAddr>;
    /// Tells the device's node that the call is connected: media for the device comes from
    /// (and goes to) `media`, this node's relay port.
    fn connect(
        &self,
        session: SessionId,
        call_id: &str,
        media: SocketAddr,
        payload_type: u8,
        telephone_event: Option<u8>,
    );
    /// The address other nodes reach this node's relay at.
    fn media_ip(&self) -> std::net::IpAddr;
}
