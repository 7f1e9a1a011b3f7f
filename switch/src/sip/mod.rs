//! SIP toward gateways and trunks: a B2BUA over UDP, TCP and TLS.
//!
//! - [`core::SipCore`] is sans-IO: datagrams, commands and time go in; datagrams to send,
//!   call events and new calls come out. Transactions (RFC 3261 §17 with RFC 6026) are
//!   `sipx-sip`'s `TransactionLayer`; dialogs, 2xx retransmission and the B2BUA glue are
//!   ours.
//! - [`driver::SipDriver`] is the actor that owns the socket and the clock and performs
//!   what the core asks; [`stream`] runs its TCP connections (framing by Content-Length
//!   with `sipx-sip`'s `StreamParser`, connection reuse, idle and slow-sender timeouts) and
//!   TLS ([`tls`]: rustls through `tokio-rustls`, chosen as the TLS stack QUIC already
//!   uses here, so one crypto provider and one certificate format serve both).
//!
//! Why `sipx-sip`: a sans-IO SIP parser and transaction layer with parse limits and the RFC
//! 4475 torture corpus in its tests; it matches our architecture (no socket, no clock), so
//! the transaction timers are testable on a virtual clock. `rsip` is unmaintained and
//! rejects valid RFC 4475 messages.

pub mod core;
pub mod driver;
pub mod error;
mod msg;
pub mod shard;
pub mod stream;
pub mod tls;
pub mod transport;
pub mod validate;

#[cfg(test)]
mod core_tests;
#[cfg(test)]
mod dialog_tests;
#[cfg(test)]
mod rfc4475_tests;
