//! The Parley node: SIP B2BUA toward gateways and trunks, QUIC endpoint for IM devices,
//! media relay, storage, HTTP admin API and Prometheus metrics.
//!
//! The control plane is [`parley_actors`]; this crate holds the I/O around it:
//! [`sip`] (sans-IO B2BUA core + socket driver actor), [`im`] (QUIC), [`relay`] (the data
//! plane, on its own thread), [`store`] (SQLite through sqlx), [`http`] (axum), and
//! [`node`] which starts it all from a [`config::Config`].
//!
//! ```no_run
//! let cfg = parley_switch::config::Config::demo();
//! actix_rt::System::new().block_on(parley_switch::node::run(cfg)).unwrap();
//! ```

pub mod agent;
pub mod books;
pub mod chats;
pub mod cluster;
pub mod config;
pub mod federation;
pub mod http;
pub mod im;
pub mod metrics;
pub mod node;
pub mod numbers;
pub mod relay;
pub mod sip;
pub mod sockets;
pub mod store;
pub mod web;
pub mod webrtc;

/// A random alphanumeric token (admin tokens, SIP tags).
pub fn sip_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}
