//! A relay port's socket, shared by the worker that receives on it and the worker that
//! sends out of it.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use quinn::udp::UdpSocketState;

/// Keeps the kernel's "UDP GRO in use" state set for the relay's lifetime.
///
/// quinn-udp probes GRO support with a throwaway socket (`[::]:0`, `UDP_GRO` on, closed)
/// for every `UdpSocketState` it creates, i.e. for every relay port. Enabling `UDP_GRO` on
/// the first socket of a kind flips a kernel static key, which patches kernel text on
/// every CPU (IPIs), and closing the last one flips it back: measured on this project's
/// 2-vCPU VMs, holding the key set saved 0.3–0.5 ms of node CPU per call at 400–500
/// calls/s (`perf`:
/// `static_key_slow_inc` under `udp_lib_setsockopt`, `static_key_slow_dec` under
/// `udpv6_destroy_sock`; `docs/BENCHMARKS.md`). One GRO-enabled loopback socket of each
/// family held open keeps the key set, so the probe costs a plain increment. Best effort:
/// a family the host lacks is skipped.
#[derive(Debug)]
pub(crate) struct GroKeeper(#[allow(dead_code)] Vec<UdpSocket>);

impl GroKeeper {
    pub(crate) fn new() -> Self {
        let mut held = Vec::new();
        for addr in ["[::1]:0", "127.0.0.1:0"] {
            let Ok(socket) = UdpSocket::bind(addr) else {
                continue;
            };
            let on = nix::sys::socket::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                nix::sys::socket::sockopt::UdpGroSegment,
                &true,
            );
            if on.is_ok() {
                held.push(socket);
            }
        }
        Self(held)
    }
}

/// The free-port pool (even RTP ports; each reserves the RTCP port above it), shared by
/// the control plane (which takes) and the RTP sockets (which give back when closed).
pub(crate) type FreePorts = Arc<Mutex<VecDeque<u16>>>;

/// One bound relay port.
///
/// A port's socket may be held by two workers (its owner receives on it; the owner of
/// the bridged port sends out of it), so it is reference-counted, and the port goes back
/// to the pool when the last holder drops it: a port is never handed out while a socket
/// still holds it.
pub(crate) struct PortSocket {
    /// `None` only inside `drop`, so the socket is closed before the port is freed.
    socket: Option<UdpSocket>,
    state: UdpSocketState,
    port: u16,
    /// The pool this port returns to (RTP ports; an RTCP port rides on its RTP port).
    free: Option<FreePorts>,
}

impl PortSocket {
    /// Binds `ip:port`, non-blocking, with quinn-udp's options (GRO, packet info), and
    /// `buffer` bytes of receive and send buffer if non-zero.
    pub(crate) fn bind(
        ip: IpAddr,
        port: u16,
        buffer: usize,
        free: Option<FreePorts>,
    ) -> io::Result<Self> {
        let socket = UdpSocket::bind((ip, port))?;
        if buffer > 0 {
            let s = socket2::SockRef::from(&socket);
            s.set_recv_buffer_size(buffer)?;
            s.set_send_buffer_size(buffer)?;
        }
        // Sets non-blocking mode and enables GRO where the kernel has it.
        let state = UdpSocketState::new((&socket).into())?;
        // quinn-udp asks for each datagram's destination address and TOS byte; a relay
        // socket is bound to one address and ignores ECN, so those control messages are
        // pure cost on every read (~4% of the worker's CPU in `perf`). Best effort: only
        // the cost changes if it fails.
        if ip.is_ipv4() {
            let _ = nix::sys::socket::setsockopt(
                socket.as_raw_fd(),
                nix::sys::socket::sockopt::Ipv4PacketInfo,
                &false,
            );
            let _ = socket2::SockRef::from(&socket).set_recv_tos_v4(false);
        }
        Ok(Self {
            socket: Some(socket),
            state,
            port,
            free,
        })
    }

    pub(crate) fn socket(&self) -> &UdpSocket {
        // Cannot fail: `socket` is only taken in `drop`.
        self.socket.as_ref().expect("socket is present until drop")
    }

    pub(crate) fn state(&self) -> &UdpSocketState {
        &self.state
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// From now on the port goes back to `pool` when the socket closes.
    pub(crate) fn return_to(&mut self, pool: FreePorts) {
        self.free = Some(pool);
    }
}

impl Drop for PortSocket {
    fn drop(&mut self) {
        drop(self.socket.take());
        if let Some(Ok(mut free)) = self.free.as_ref().map(|f| f.lock()) {
            free.push_back(self.port);
        }
    }
}
