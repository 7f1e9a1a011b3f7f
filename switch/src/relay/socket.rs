//! A relay port's socket, shared by the worker that receives on it and the worker that
//! sends out of it.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

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
pub(crate) type FreePorts = Arc<PortPool>;

/// Free RTP ports, and how many released ones are still on their way back.
///
/// Signalling releases a call's ports at once, but a port returns only when the worker
/// holding its socket drops it, a moment later. A call placed in that moment on a full
/// range would be refused although the range is not full; [`PortPool::closing`] lets the
/// allocator wait for those ports briefly instead ([`PortPool::wait_returned`]).
#[derive(Debug)]
pub(crate) struct PortPool {
    pub(crate) free: Mutex<VecDeque<u16>>,
    /// Free RTP ports whose sockets stay bound (`RelaySettings::warm_ports`), oldest
    /// first: given back by their worker once it has reset and drained them.
    pub(crate) warm: Mutex<VecDeque<u16>>,
    /// Length of `warm`, read without its lock.
    pub(crate) warm_len: AtomicUsize,
    returned: Condvar,
    /// RTP ports released by signalling that are not back yet (closing, or parking).
    closing: AtomicUsize,
}

impl PortPool {
    pub(crate) fn new(ports: impl IntoIterator<Item = u16>) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(ports.into_iter().collect()),
            warm: Mutex::new(VecDeque::new()),
            warm_len: AtomicUsize::new(0),
            returned: Condvar::new(),
            closing: AtomicUsize::new(0),
        })
    }

    /// Signalling released `n` RTP ports; they come back when their sockets close.
    pub(crate) fn closing(&self, n: usize) {
        self.closing.fetch_add(n, Ordering::Relaxed);
    }

    /// With no port free, waits (until `deadline`) for a released one to come back;
    /// returns the guard and whether waiting was worth it (ports were on their way).
    pub(crate) fn wait_returned<'a>(
        &self,
        guard: MutexGuard<'a, VecDeque<u16>>,
        deadline: Instant,
    ) -> (MutexGuard<'a, VecDeque<u16>>, bool) {
        let now = Instant::now();
        if self.closing.load(Ordering::Relaxed) == 0 || now >= deadline {
            return (guard, false);
        }
        match self.returned.wait_timeout(guard, deadline - now) {
            Ok((guard, _)) => (guard, true),
            Err(poisoned) => (poisoned.into_inner().0, false),
        }
    }

    /// A worker parked `port` (reset, drained, still bound): a new call may take it.
    pub(crate) fn give_back_warm(&self, port: u16) {
        if let Ok(mut warm) = self.warm.lock() {
            warm.push_back(port);
            self.warm_len.store(warm.len(), Ordering::Relaxed);
        }
        let _ = self
            .closing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
        // Under the free list's lock: an allocator deciding to wait holds it.
        let _guard = self.free.lock();
        self.returned.notify_all();
    }

    fn give_back(&self, port: u16) {
        if let Ok(mut free) = self.free.lock() {
            free.push_back(port);
        }
        // A port dropped without a release (a failed allocation) was never counted.
        let _ = self
            .closing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
        self.returned.notify_all();
    }
}

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

    /// The pool an RTP port goes back to (`None` for an RTCP port).
    pub(crate) fn pool(&self) -> Option<&FreePorts> {
        self.free.as_ref()
    }
}

impl Drop for PortSocket {
    fn drop(&mut self) {
        drop(self.socket.take());
        if let Some(pool) = &self.free {
            pool.give_back(self.port);
        }
    }
}
