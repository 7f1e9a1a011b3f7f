//! The relay's kernel fast path: latched UDP flows forwarded by an eBPF program
//! (`switch/bpf/relay.bpf.c`, a TC classifier in direct-action mode), as rtpengine's
//! kernel module forwards them — without a module, which these machines cannot load.
//!
//! Userspace stays in charge: a relay worker latches a port's peer as always, then
//! installs the port's flow ([`KernelFlows::install`]: the latched source the program
//! accepts, the bridged relay port and peer it rewrites to, the stream's continuity
//! mapping); from then on the kernel forwards that direction's packets without waking the
//! relay. A re-point, a hang-up or a media timeout (which hangs up) removes the flow
//! ([`KernelFlows::remove`]) and the port is the relay's again. The program counts packets
//! and bytes per flow, which [`KernelFlows`] folds into the call's stats and the relay
//! metrics, so `/metrics`, CDR packet counts and the idle check read the same numbers in
//! both modes. `[relay] kernel` (`super::KernelMode`) turns it on; `docs/architecture.md`
//! has the whole picture.
//!
//! Why `aya`: it loads a clang-built object on stable Rust with no C library (libbpf-rs
//! builds libbpf and links libelf and zlib), and its typed maps and TC attachment
//! (TCX links on kernels ≥ 6.6, netlink `clsact` before) are what the relay needs. The
//! program is C because aya's Rust programs (`aya-ebpf`) need nightly's `rust-src`.
//!
//! Without the capability (no clang at build time, not root, an old kernel) [`KernelPath::load`]
//! says why, and the relay runs exactly as without it.

use std::net::SocketAddrV4;

pub use parley_codecs::rtp::Mapping;

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
    /// The flow's destination has no route (or the interface it leaves by is unknown).
    #[error("no route to {0}: {1}")]
    Route(SocketAddrV4, std::io::Error),
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
    /// The relay port's own address (the map is indexed by port number; 0: no flow).
    port_addr: u32,
    /// The SSRC forwarded (network order); others go to userspace.
    in_ssrc: u32,
    /// What it becomes, when `mapped` (network order).
    out_ssrc: u32,
    /// Added to timestamps, when `mapped`.
    ts_delta: u32,
    /// Added to sequence numbers, when `mapped`.
    seq_delta: u16,
    /// 1: rewrite SSRC, sequence and timestamp (userspace's continuity mapping).
    mapped: u16,
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

/// The map index of relay port `port`: its number.
#[cfg_attr(not(parley_bpf), allow(dead_code))]
fn index(port: SocketAddrV4) -> u32 {
    u32::from(port.port())
}

impl Flow {
    /// Packets to relay port `port` from `latched` are sent from `out_src` (the bridged
    /// relay port) to `out_dst` (the bridged port's peer), through interface
    /// `out_ifindex` (0: on this host, [`egress`]).
    /// Only RTP of `map.in_ssrc` (and RTCP, unless the mapping rewrites) is forwarded.
    pub fn new(
        port: SocketAddrV4,
        latched: SocketAddrV4,
        out_src: SocketAddrV4,
        out_dst: SocketAddrV4,
        out_ifindex: u32,
        map: Mapping,
    ) -> Self {
        Self {
            out_ifindex,
            port_addr: be_addr(&port),
            in_ssrc: map.in_ssrc.to_be(),
            out_ssrc: map.out_ssrc.to_be(),
            ts_delta: map.ts_delta,
            seq_delta: map.seq_delta,
            mapped: u16::from(map.rewrites()),
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

/// The interface holding address `ip` (`None`: none does).
fn holder(ip: std::net::Ipv4Addr) -> std::io::Result<Option<String>> {
    Ok(nix::ifaddrs::getifaddrs()?.find_map(|i| {
        let a = i.address?.as_sockaddr_in()?.ip();
        (std::net::Ipv4Addr::from(a) == ip).then_some(i.interface_name)
    }))
}

/// The interface holding the relay's address `ip` (`lo` for a loopback address).
pub fn interface_of(ip: std::net::Ipv4Addr) -> std::io::Result<String> {
    if ip.is_loopback() {
        return Ok("lo".into());
    }
    holder(ip)?.ok_or_else(|| std::io::Error::other(format!("no interface has the address {ip}")))
}

/// The interface packets to `dst` leave by, as the flow wants it: 0 when `dst` is on this
/// host (a loopback address or one of the host's own, delivered by the host's stack), else the
/// index of the interface whose address the kernel would send from (a UDP socket
/// connected to `dst` tells which).
pub fn egress(dst: std::net::Ipv4Addr) -> std::io::Result<u32> {
    if dst.is_loopback() || holder(dst)?.is_some() {
        return Ok(0);
    }
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect((dst, 9))?;
    let std::net::SocketAddr::V4(src) = probe.local_addr()? else {
        return Err(std::io::Error::other("not an IPv4 route"));
    };
    let name = holder(*src.ip())?.ok_or_else(|| {
        std::io::Error::other(format!("no interface has the source address {}", src.ip()))
    })?;
    Ok(nix::net::if_::if_nametoindex(name.as_str())?)
}

/// The loaded, attached program and its maps.
pub struct KernelPath {
    #[cfg(parley_bpf)]
    inner: imp::Loaded,
    /// Egress interfaces looked up lately, by destination: a lookup reads the host's
    /// addresses (and, for a remote peer, connects a probe socket), which an install on a
    /// relay worker should not pay for every call to the same gateway.
    #[cfg(parley_bpf)]
    egress: std::collections::HashMap<std::net::Ipv4Addr, (u32, std::time::Instant)>,
}

/// How long a looked-up egress interface is trusted: routes and addresses change rarely,
/// and a change reaches the flows installed after this long.
#[cfg(parley_bpf)]
const EGRESS_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// Most destinations remembered (the table is cleared when it is full).
#[cfg(parley_bpf)]
const EGRESS_CACHE: usize = 4096;

impl KernelPath {
    /// Loads the program and attaches it to the ingress of each of `interfaces` (e.g.
    /// `["lo"]`, or the interfaces the relay's addresses are on).
    pub fn load(interfaces: &[&str]) -> Result<Self, KernelError> {
        #[cfg(parley_bpf)]
        {
            Ok(Self {
                inner: imp::Loaded::load(interfaces)?,
                egress: std::collections::HashMap::new(),
            })
        }
        #[cfg(not(parley_bpf))]
        {
            let _ = interfaces;
            Err(KernelError::NotBuilt)
        }
    }

    /// Installs (or re-points) the flow of relay port `port`: packets from `latched` to
    /// it leave from `out_src` to `out_dst`, RTP of the stream `map` describes mapped by
    /// it. Its counters start at zero.
    pub fn install(
        &mut self,
        port: SocketAddrV4,
        latched: SocketAddrV4,
        (out_src, out_dst): (SocketAddrV4, SocketAddrV4),
        map: Mapping,
    ) -> Result<(), KernelError> {
        #[cfg(parley_bpf)]
        {
            let out = self
                .egress_of(*out_dst.ip())
                .map_err(|e| KernelError::Route(out_dst, e))?;
            self.inner.install(
                index(port),
                Flow::new(port, latched, out_src, out_dst, out, map),
            )
        }
        #[cfg(not(parley_bpf))]
        {
            let _ = (port, latched, out_src, out_dst, map);
            Err(KernelError::NotBuilt)
        }
    }

    /// [`egress`] of `dst`, remembered for [`EGRESS_TTL`].
    #[cfg(parley_bpf)]
    fn egress_of(&mut self, dst: std::net::Ipv4Addr) -> std::io::Result<u32> {
        let now = std::time::Instant::now();
        if let Some(&(out, at)) = self.egress.get(&dst)
            && now.duration_since(at) < EGRESS_TTL
        {
            return Ok(out);
        }
        let out = egress(dst)?;
        if self.egress.len() >= EGRESS_CACHE {
            self.egress.clear();
        }
        self.egress.insert(dst, (out, now));
        Ok(out)
    }

    /// Removes port `port`'s flow (its packets go to userspace again); what it counted
    /// (read just before the delete: a packet counted in between is not in it).
    pub fn remove(&mut self, port: SocketAddrV4) -> Option<FlowStats> {
        #[cfg(parley_bpf)]
        {
            self.inner.remove(index(port), be_addr(&port))
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
            self.inner.stats(index(port), be_addr(&port))
        }
        #[cfg(not(parley_bpf))]
        {
            let _ = port;
            None
        }
    }
}

/// Bytes of a forwarded packet the program counts that the relay's byte counters do not:
/// Ethernet, IPv4 (no options: the program forwards no others) and UDP headers.
const HEADERS: u64 = 14 + 20 + 8;

/// The flows installed in the kernel, shared by the relay workers (which install and
/// remove their ports' flows) and the control plane (which removes a call's flows as it
/// releases them, so its CDR has every packet counted).
///
/// The program's counters are folded into each call's
/// [`parley_actors::messages::FlowStats`] (the CDR's packet counts and the media timeout
/// read those, as in userspace mode) and into the relay metrics: on [`KernelFlows::sweep`]
/// (periodic), on re-install and on removal.
pub struct KernelFlows {
    /// The relay's address (every key's).
    ip: std::net::Ipv4Addr,
    inner: std::sync::Mutex<Installed>,
    packets: metrics::Counter,
    bytes: metrics::Counter,
    kernel_packets: metrics::Counter,
    flows: metrics::Gauge,
}

struct Installed {
    path: KernelPath,
    ports: std::collections::HashMap<u16, Counted>,
}

/// An installed flow, and how much of what the program counted is folded in already.
struct Counted {
    stats: Option<std::sync::Arc<parley_actors::messages::FlowStats>>,
    caller_side: bool,
    packets: u64,
    bytes: u64,
}

impl KernelFlows {
    /// Flows of the relay on `ip` through the loaded `path`.
    pub fn new(path: KernelPath, ip: std::net::Ipv4Addr) -> Self {
        use crate::metrics as m;
        metrics::gauge!(m::RELAY_KERNEL_LOADED).set(1.0);
        Self {
            ip,
            inner: std::sync::Mutex::new(Installed {
                path,
                ports: std::collections::HashMap::new(),
            }),
            packets: metrics::counter!(m::RELAY_PACKETS_TOTAL, "path" => "udp_udp"),
            bytes: metrics::counter!(m::RELAY_BYTES_TOTAL, "path" => "udp_udp"),
            kernel_packets: metrics::counter!(m::RELAY_KERNEL_PACKETS_TOTAL),
            flows: metrics::gauge!(m::RELAY_KERNEL_FLOWS),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Installed> {
        // A panic while holding it leaves plain data behind: carry on with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }

    /// Relay port `port` forwards packets from `latched` out of relay port `out_port` to
    /// `out_dst` in the kernel, RTP of the stream `map` describes; its packets count into
    /// `stats` (`caller_side`: as the caller's). Replaces the flow there (its counts
    /// folded first).
    #[allow(clippy::too_many_arguments)]
    pub fn install(
        &self,
        port: u16,
        latched: SocketAddrV4,
        (out_port, out_dst): (u16, SocketAddrV4),
        map: Mapping,
        stats: Option<std::sync::Arc<parley_actors::messages::FlowStats>>,
        caller_side: bool,
    ) -> Result<(), KernelError> {
        let mut inner = self.lock();
        let Installed { path, ports } = &mut *inner;
        if let Some(c) = ports.get_mut(&port) {
            // Cleared first, then written: an update of an array entry is a copy the
            // program may read mid-way, so a packet in flight meets fields that are old or
            // zero, or zero or new (zero sends nothing anywhere), never old and new mixed.
            let last = path.remove(self.addr(port));
            self.fold(c, last);
        }
        match path.install(
            self.addr(port),
            latched,
            (self.addr(out_port), out_dst),
            map,
        ) {
            Ok(()) => {
                ports.insert(
                    port,
                    Counted {
                        stats,
                        caller_side,
                        packets: 0,
                        bytes: 0,
                    },
                );
                self.flows.set(ports.len() as f64);
                Ok(())
            }
            Err(e) => {
                // The old entry (if any) still forwards for the old peer: take it out.
                if ports.remove(&port).is_some() {
                    path.remove(self.addr(port));
                    self.flows.set(ports.len() as f64);
                }
                Err(e)
            }
        }
    }

    /// Takes port `port`'s flow out of the kernel (its packets are userspace's again),
    /// folding in what it counted; the last RTP packet it forwarded.
    pub fn remove(&self, port: u16) -> Option<RtpPosition> {
        let mut inner = self.lock();
        let Installed { path, ports } = &mut *inner;
        let mut c = ports.remove(&port)?;
        let last = path.remove(self.addr(port));
        self.fold(&mut c, last);
        self.flows.set(ports.len() as f64);
        last.and_then(|s| s.rtp())
    }

    /// The last RTP packet port `port`'s flow forwarded (counts folded in too).
    pub fn position(&self, port: u16) -> Option<RtpPosition> {
        let mut inner = self.lock();
        let Installed { path, ports } = &mut *inner;
        let c = ports.get_mut(&port)?;
        let now = path.stats(self.addr(port));
        self.fold(c, now);
        now.and_then(|s| s.rtp())
    }

    /// Folds what every flow counted since the last time into its call's stats and the
    /// relay metrics.
    pub fn sweep(&self) {
        let mut inner = self.lock();
        let Installed { path, ports } = &mut *inner;
        for (&port, c) in ports.iter_mut() {
            let now = path.stats(self.addr(port));
            self.fold(c, now);
        }
    }

    /// Packets the kernel forwarded for port `port`'s flow since it was installed
    /// (`None`: no flow there).
    pub fn forwarded(&self, port: u16) -> Option<u64> {
        let inner = self.lock();
        inner.ports.get(&port)?;
        inner.path.stats(self.addr(port)).map(|s| s.packets)
    }

    /// Flows installed.
    pub fn len(&self) -> usize {
        self.lock().ports.len()
    }

    /// Whether no flow is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn fold(&self, c: &mut Counted, now: Option<FlowStats>) {
        let Some(now) = now else { return };
        let packets = now.packets.saturating_sub(c.packets);
        let bytes = now.bytes.saturating_sub(c.bytes);
        (c.packets, c.bytes) = (now.packets, now.bytes);
        if packets == 0 {
            return;
        }
        if let Some(s) = &c.stats {
            // Forwarded already: counted in the metrics whatever the call says. (The
            // call closes its stats only after releasing its ports, whose removal from
            // here folds their last counts first.)
            let _ = s.count(c.caller_side, packets);
        }
        self.packets.increment(packets);
        self.kernel_packets.increment(packets);
        self.bytes
            .increment(bytes.saturating_sub(packets * HEADERS));
    }
}

impl Drop for KernelFlows {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::RELAY_KERNEL_LOADED).set(0.0);
        self.flows.set(0.0);
    }
}

#[cfg(parley_bpf)]
mod imp {
    use aya::maps::{Array, MapData};
    use aya::programs::{SchedClassifier, TcAttachType, tc};

    use super::{Flow, FlowStats, KernelError};

    /// The object clang built (`build.rs`), aligned as aya's ELF parser wants it.
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

    pub(super) struct Loaded {
        /// Owns the program (and its links: dropping it detaches).
        _ebpf: aya::Ebpf,
        flows: Array<MapData, Flow>,
        /// The same entries, mapped (read-only) into this process.
        view: View,
    }

    /// Entries of the flow map (`BPF_F_MMAPABLE`), mapped read-only.
    struct View {
        base: std::ptr::NonNull<std::ffi::c_void>,
        len: std::num::NonZeroUsize,
    }

    // SAFETY: the mapping is plain shared memory the process owns until `drop`; it is
    // only read (volatile), from any thread.
    #[allow(unsafe_code)]
    unsafe impl Send for View {}

    /// Entries in the map (`max_entries` in the program).
    const ENTRIES: usize = 65536;

    // The kernel lays an array's values out at their size rounded up to 8 bytes; `View`
    // indexes them at `size_of::<Flow>()`, so the two must agree.
    const _: () = assert!(std::mem::size_of::<Flow>().is_multiple_of(8));

    impl View {
        fn map(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Self> {
            use nix::sys::mman::{MapFlags, ProtFlags, mmap};
            use std::os::fd::AsRawFd;
            // An array map's values, each rounded up to 8 bytes, from offset 0.
            let len = std::num::NonZeroUsize::new(ENTRIES * std::mem::size_of::<Flow>())
                .expect("non-zero");
            // SAFETY: a new shared read-only mapping of the map's fd; nothing aliases it
            // mutably on this side, and it is unmapped once, on drop.
            #[allow(unsafe_code)]
            let base = unsafe {
                mmap(
                    None,
                    len,
                    ProtFlags::PROT_READ,
                    MapFlags::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            }
            .map_err(std::io::Error::from)?;
            let base =
                std::ptr::NonNull::new(base).ok_or_else(|| std::io::Error::other("mmap: null"))?;
            Ok(Self { base, len })
        }

        /// Entry `index` as it is now (the program may be counting into it meanwhile: each
        /// counter is read whole, the entry not atomically as one).
        fn get(&self, index: u32) -> Option<Flow> {
            let i = index as usize;
            if i >= ENTRIES {
                return None;
            }
            // SAFETY: `i` is within the mapping, entries are `Flow`s at 8-byte aligned
            // offsets (88 bytes each), and every bit pattern is a valid `Flow`.
            #[allow(unsafe_code)]
            let f = unsafe { std::ptr::read_volatile(self.base.cast::<Flow>().as_ptr().add(i)) };
            Some(f)
        }
    }

    impl Drop for View {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `map`, unmapped once.
            #[allow(unsafe_code)]
            unsafe {
                let _ = nix::sys::mman::munmap(self.base.as_ptr(), self.len.get());
            }
        }
    }

    /// `e` with its causes (aya's errors keep the system's reason, e.g. EPERM, in them).
    fn load_err(what: &str, e: impl std::error::Error) -> KernelError {
        let mut text = format!("{what}: {e}");
        let mut cause = e.source();
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        if text.contains("Operation not permitted") {
            text.push_str(" (loading needs root, or CAP_BPF and CAP_NET_ADMIN)");
        }
        KernelError::Load(text)
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
            let view = match &flows {
                aya::maps::Map::Array(data) => {
                    use std::os::fd::AsFd;
                    View::map(data.fd().as_fd()).map_err(|e| load_err("mapping parley_flows", e))?
                }
                _ => return Err(KernelError::Load("parley_flows is not an array".into())),
            };
            Ok(Self {
                flows: Array::try_from(flows).map_err(|e| load_err("parley_flows", e))?,
                view,
                _ebpf: ebpf,
            })
        }

        pub(super) fn install(&mut self, index: u32, flow: Flow) -> Result<(), KernelError> {
            self.flows
                .set(index, flow, 0)
                .map_err(|e| KernelError::Map(e.to_string()))
        }

        /// Clears the entry of port `index` (when it is the flow of address `addr`).
        pub(super) fn remove(&mut self, index: u32, addr: u32) -> Option<FlowStats> {
            let last = self.stats(index, addr)?;
            let _ = self.flows.set(index, Flow::default(), 0);
            Some(last)
        }

        pub(super) fn stats(&self, index: u32, addr: u32) -> Option<FlowStats> {
            self.view
                .get(index)
                .filter(|f| f.port_addr == addr && addr != 0)
                .map(|f| f.stats)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Flow;
    use std::net::SocketAddrV4;

    /// The maps hold addresses and ports as the packet does (network order).
    #[test]
    fn keys_and_flows_are_in_network_order() {
        let port: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(super::index(port), 40000);
        let f = Flow::new(
            port,
            "10.0.0.1:5004".parse().unwrap(),
            "127.0.0.1:40002".parse().unwrap(),
            "10.0.0.2:6000".parse().unwrap(),
            3,
            super::Mapping {
                in_ssrc: 0x0102_0304,
                out_ssrc: 0x0506_0708,
                seq_delta: 0x0a0b,
                ts_delta: 7,
            },
        );
        assert_eq!(f.out_ifindex, 3);
        assert_eq!(f.port_addr.to_ne_bytes(), [127, 0, 0, 1]);
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
        // SSRCs as in the packet, deltas as numbers; a mapping that rewrites is marked.
        assert_eq!(
            (f.in_ssrc.to_ne_bytes(), f.out_ssrc.to_ne_bytes()),
            ([1, 2, 3, 4], [5, 6, 7, 8])
        );
        assert_eq!((f.seq_delta, f.ts_delta, f.mapped), (0x0a0b, 7, 1));
        // The C layouts: no implicit padding.
        assert_eq!(std::mem::size_of::<Flow>(), 88);
        assert_eq!(std::mem::size_of::<super::FlowStats>(), 40);
    }
}
