//! The relay's kernel fast path: latched UDP flows forwarded by an eBPF program
//! (`switch/bpf/relay.bpf.c`, a TC classifier in direct-action mode), as rtpengine's
//! kernel module forwards them — without a module, which these machines cannot load.
//!
//! Userspace stays in charge: the relay latches a port's peer as always, then installs the
//! port's flow here ([`KernelPath::install`]: the latched source the program accepts, the
//! bridged relay port and peer it rewrites to); from then on the kernel forwards that
//! direction's packets without waking the relay. A re-point, a hang-up or a media timeout
//! removes the flow ([`KernelPath::remove`]) and the port is the relay's again. The
//! program counts packets and bytes per flow ([`KernelPath::stats`]) so that metrics, CDR
//! packet counts and the idle check can read the same numbers in both modes. (The relay
//! workers do not drive this module yet: issue #16, `docs/architecture.md`.)
//!
//! Why `aya`: it loads a clang-built object on stable Rust with no C library (libbpf-rs
//! builds libbpf and links libelf and zlib), and its typed maps and TC attachment
//! (TCX links on kernels ≥ 6.6, netlink `clsact` before) are what the relay needs. The
//! program is C because aya's Rust programs (`aya-ebpf`) need nightly's `rust-src`.
//!
//! Without the capability (no clang at build time, not root, an old kernel) [`KernelPath::load`]
//! says why, and the relay runs exactly as without it.

use std::net::SocketAddrV4;

/// Why the fast path is not there.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Built without clang: there is no program to load.
    #[error("the eBPF program was not built (no clang at build time)")]
    NotBuilt,
    /// Loading or attaching the program failed (not root, no BPF, an old kernel).
    #[error("{0}")]
    Load(String),
    /// A map update failed (full, or the program is gone).
    #[error("flow map: {0}")]
    Map(String),
}

/// The relay port a packet arrives at (`struct flow_key`): address and port in network
/// order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowKey {
    addr: u32,
    port: u16,
    pad: u16,
}

/// A flow (`struct flow`): the latched source it accepts, what it rewrites to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flow {
    src_addr: u32,
    src_port: u16,
    pad0: u16,
    out_saddr: u32,
    out_sport: u16,
    pad1: u16,
    out_daddr: u32,
    out_dport: u16,
    pad2: u16,
    /// 0: the destination is on this host (up the stack); else the egress interface.
    out_ifindex: u32,
    pad3: u32,
    /// Counted by the program (zero when installed).
    stats: FlowStats,
}

/// What the program counted for a flow (`struct flow_stats`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowStats {
    /// Packets forwarded.
    pub packets: u64,
    /// Their bytes (at L2, as the classifier sees them).
    pub bytes: u64,
    /// `CLOCK_MONOTONIC` of the last one, ns (0: none yet).
    pub last_ns: u64,
    rtp_ssrc: u32,
    rtp_ts: u32,
    rtp_seq: u16,
    rtp_seen: u16,
    pad: u32,
}

/// The last RTP packet a flow forwarded: where userspace picks the stream up when the
/// port is its again (continuity across a re-point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPosition {
    /// Its SSRC.
    pub ssrc: u32,
    /// Its sequence number.
    pub seq: u16,
    /// Its timestamp.
    pub ts: u32,
}

impl FlowStats {
    /// The last RTP packet forwarded (`None`: none yet, or only RTCP).
    pub fn rtp(&self) -> Option<RtpPosition> {
        (self.rtp_seen != 0).then(|| RtpPosition {
            ssrc: u32::from_be(self.rtp_ssrc),
            seq: u16::from_be(self.rtp_seq),
            ts: u32::from_be(self.rtp_ts),
        })
    }
}

// SAFETY: plain `repr(C)` integers with explicit padding fields: every bit pattern is
// valid and there are no implicit padding bytes (aya copies them to and from the maps).
#[cfg(parley_bpf)]
#[allow(unsafe_code)]
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
#[cfg(parley_bpf)]
#[allow(unsafe_code)]
unsafe impl aya::Pod for Flow {}
// SAFETY: as above.
#[cfg(parley_bpf)]
#[allow(unsafe_code)]
unsafe impl aya::Pod for FlowStats {}

/// Bytes of an address as they lie in the packet, read as a native `u32`.
fn be_addr(a: &SocketAddrV4) -> u32 {
    u32::from_ne_bytes(a.ip().octets())
}

/// A port as it lies in the packet, read as a native `u16`.
fn be_port(a: &SocketAddrV4) -> u16 {
    u16::from_ne_bytes(a.port().to_be_bytes())
}

impl FlowKey {
    /// The key of relay port `port`.
    pub fn of(port: SocketAddrV4) -> Self {
        Self {
            addr: be_addr(&port),
            port: be_port(&port),
            pad: 0,
        }
    }
}

impl Flow {
    /// Packets from `latched` are sent from `out_src` (the bridged relay port) to
    /// `out_dst` (the bridged port's peer), through interface `out_ifindex` (0: on this
    /// host, [`egress`]).
    pub fn new(
        latched: SocketAddrV4,
        out_src: SocketAddrV4,
        out_dst: SocketAddrV4,
        out_ifindex: u32,
    ) -> Self {
        Self {
            out_ifindex,
            src_addr: be_addr(&latched),
            src_port: be_port(&latched),
            out_saddr: be_addr(&out_src),
            out_sport: be_port(&out_src),
            out_daddr: be_addr(&out_dst),
            out_dport: be_port(&out_dst),
            ..Self::default()
        }
    }
}

/// The interface packets to `dst` leave by, as the flow wants it: 0 when `dst` is on this
/// host (a loopback address or one of the host's own, delivered by the host's stack), else the
/// index of the interface whose address the kernel would send from (a UDP socket
/// connected to `dst` tells which).
pub fn egress(dst: std::net::Ipv4Addr) -> std::io::Result<u32> {
    use nix::ifaddrs::getifaddrs;
    let own = |want: std::net::Ipv4Addr| -> std::io::Result<Option<String>> {
        Ok(getifaddrs()?.find_map(|i| {
            let a = i.address?.as_sockaddr_in()?.ip();
            (std::net::Ipv4Addr::from(a) == want).then_some(i.interface_name)
        }))
    };
    if dst.is_loopback() || own(dst)?.is_some() {
        return Ok(0);
    }
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect((dst, 9))?;
    let std::net::SocketAddr::V4(src) = probe.local_addr()? else {
        return Err(std::io::Error::other("not an IPv4 route"));
    };
    let name = own(*src.ip())?.ok_or_else(|| {
        std::io::Error::other(format!("no interface has the source address {}", src.ip()))
    })?;
    Ok(nix::net::if_::if_nametoindex(name.as_str())?)
}

/// The loaded, attached program and its maps.
pub struct KernelPath {
    #[cfg(parley_bpf)]
    inner: imp::Loaded,
}

impl KernelPath {
    /// Loads the program and attaches it to the ingress of each of `interfaces` (e.g.
    /// `["lo"]`, or the interfaces the relay's addresses are on).
    pub fn load(interfaces: &[&str]) -> Result<Self, KernelError> {
        #[cfg(parley_bpf)]
        {
            Ok(Self {
                inner: imp::Loaded::load(interfaces)?,
            })
        }
        #[cfg(not(parley_bpf))]
        {
            let _ = interfaces;
            Err(KernelError::NotBuilt)
        }
    }

    /// Installs (or re-points) the flow of relay port `port`: packets from `latched` to
    /// it leave from `out_src` to `out_dst`. Its counters start at zero.
    pub fn install(
        &mut self,
        port: SocketAddrV4,
        latched: SocketAddrV4,
        out_src: SocketAddrV4,
        out_dst: SocketAddrV4,
    ) -> Result<(), KernelError> {
        #[cfg(parley_bpf)]
        {
            let out = egress(*out_dst.ip())
                .map_err(|e| KernelError::Map(format!("no route to {out_dst}: {e}")))?;
            self.inner
                .install(FlowKey::of(port), Flow::new(latched, out_src, out_dst, out))
        }
        #[cfg(not(parley_bpf))]
        {
            let _ = (port, latched, out_src, out_dst);
            Err(KernelError::NotBuilt)
        }
    }

    /// Removes port `port`'s flow (its packets go to userspace again); what it counted
    /// (read just before the delete: a packet counted in between is not in it).
    pub fn remove(&mut self, port: SocketAddrV4) -> Option<FlowStats> {
        #[cfg(parley_bpf)]
        {
            self.inner.remove(FlowKey::of(port))
        }
        #[cfg(not(parley_bpf))]
        {
            let _ = port;
            None
        }
    }

    /// What port `port`'s flow counted so far.
    pub fn stats(&self, port: SocketAddrV4) -> Option<FlowStats> {
        #[cfg(parley_bpf)]
        {
            self.inner.stats(FlowKey::of(port))
        }
        #[cfg(not(parley_bpf))]
        {
            let _ = port;
            None
        }
    }
}

#[cfg(parley_bpf)]
mod imp {
    use aya::maps::{HashMap, MapData};
    use aya::programs::{SchedClassifier, TcAttachType, tc};

    use super::{Flow, FlowKey, FlowStats, KernelError};

    /// The object clang built (`build.rs`), aligned as aya's ELF parser wants it.
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

    pub(super) struct Loaded {
        /// Owns the program (and its links: dropping it detaches).
        _ebpf: aya::Ebpf,
        flows: HashMap<MapData, FlowKey, Flow>,
    }

    fn load_err(what: &str, e: impl std::fmt::Display) -> KernelError {
        KernelError::Load(format!("{what}: {e}"))
    }

    impl Loaded {
        pub(super) fn load(interfaces: &[&str]) -> Result<Self, KernelError> {
            let mut ebpf = aya::Ebpf::load(OBJECT).map_err(|e| load_err("loading", e))?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut("parley_relay")
                .ok_or_else(|| KernelError::Load("no program parley_relay".into()))?
                .try_into()
                .map_err(|e| load_err("program type", e))?;
            prog.load().map_err(|e| load_err("verifying", e))?;
            for iface in interfaces {
                // Kernels before 6.6 attach through a clsact qdisc; one already there is
                // fine.
                let _ = tc::qdisc_add_clsact(iface);
                prog.attach(iface, TcAttachType::Ingress)
                    .map_err(|e| load_err(&format!("attaching to {iface}"), e))?;
            }
            let flows = ebpf
                .take_map("parley_flows")
                .ok_or_else(|| KernelError::Load("no map parley_flows".into()))?;
            Ok(Self {
                flows: HashMap::try_from(flows).map_err(|e| load_err("parley_flows", e))?,
                _ebpf: ebpf,
            })
        }

        pub(super) fn install(&mut self, key: FlowKey, flow: Flow) -> Result<(), KernelError> {
            self.flows
                .insert(key, flow, 0)
                .map_err(|e| KernelError::Map(e.to_string()))
        }

        pub(super) fn remove(&mut self, key: FlowKey) -> Option<FlowStats> {
            let last = self.stats(key);
            let _ = self.flows.remove(&key);
            last
        }

        pub(super) fn stats(&self, key: FlowKey) -> Option<FlowStats> {
            self.flows.get(&key, 0).ok().map(|f| f.stats)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Flow, FlowKey};
    use std::net::SocketAddrV4;

    /// The maps hold addresses and ports as the packet does (network order).
    #[test]
    fn keys_and_flows_are_in_network_order() {
        let port: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        let k = FlowKey::of(port);
        assert_eq!(k.addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0x9c, 0x40]);
        let f = Flow::new(
            "10.0.0.1:5004".parse().unwrap(),
            "127.0.0.1:40002".parse().unwrap(),
            "10.0.0.2:6000".parse().unwrap(),
            3,
        );
        assert_eq!(f.out_ifindex, 3);
        assert_eq!(
            (f.src_addr.to_ne_bytes(), f.src_port.to_ne_bytes()),
            ([10, 0, 0, 1], [0x13, 0x8c])
        );
        assert_eq!(
            (f.out_saddr.to_ne_bytes(), f.out_sport.to_ne_bytes()),
            ([127, 0, 0, 1], [0x9c, 0x42])
        );
        assert_eq!(
            (f.out_daddr.to_ne_bytes(), f.out_dport.to_ne_bytes()),
            ([10, 0, 0, 2], [0x17, 0x70])
        );
        // The C layouts: no implicit padding.
        assert_eq!(std::mem::size_of::<FlowKey>(), 8);
        assert_eq!(std::mem::size_of::<Flow>(), 72);
        assert_eq!(std::mem::size_of::<super::FlowStats>(), 40);
    }
}
