//! IM endpoints over QUIC (`docs/protocol.md`): TLS certificate handling, login, and the
//! per-connection driver that feeds a [`parley_actors::session::PresenceSession`].

pub mod cert;
pub mod quic;
