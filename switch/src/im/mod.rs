//! IM endpoints (`docs/protocol.md`): TLS certificate handling, the login and the
//! per-connection driver that feeds a [`parley_actors::session::PresenceSession`]
//! (`device`, shared by every transport), and the QUIC transport. The WebSocket transport
//! for browsers is in `crate::web`.

pub mod cert;
pub(crate) mod device;
pub mod quic;
