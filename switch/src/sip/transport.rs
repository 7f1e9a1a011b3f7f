//! SIP transports and peers (RFC 3261 §18): which transport a message came over or goes
//! over, and the address at the other end.

use std::net::SocketAddr;

use sipx_sip::Reliability;

/// A SIP transport (RFC 3261 §18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// Datagrams: the core retransmits.
    #[default]
    Udp,
    /// A TCP connection: reliable, framed by Content-Length.
    Tcp,
    /// TLS over TCP (RFC 3261 §26.2, hop by hop).
    Tls,
}

impl Transport {
    /// The Via transport token.
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// The metric/config label.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Whether the transport delivers reliably (no retransmission by transactions).
    pub fn is_reliable(self) -> bool {
        self != Transport::Udp
    }

    /// How the transaction layer treats it.
    pub fn reliability(self) -> Reliability {
        if self.is_reliable() {
            Reliability::Reliable
        } else {
            Reliability::Unreliable
        }
    }
}

/// Where a message came from or goes: an address and the transport to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The remote address (for a connection, its remote end).
    pub addr: SocketAddr,
    /// The transport.
    pub transport: Transport,
}

impl Peer {
    /// A UDP peer.
    pub fn udp(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Udp,
        }
    }

    /// Whether a request from `self` comes from the peer a dialog was set up from: the
    /// same address and port on UDP; on a connection the same host and transport (a peer
    /// may open a new connection, from a new port, for a later request).
    pub fn same_origin(&self, other: &Peer) -> bool {
        match (self.transport, other.transport) {
            (Transport::Udp, Transport::Udp) => self.addr == other.addr,
            (a, b) => a == b && self.addr.ip() == other.addr.ip(),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.transport.as_str(), self.addr)
    }
}
