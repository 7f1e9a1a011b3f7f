// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// Parley's relay in the kernel: a TC classifier (direct action) on the relay's
// interfaces. For a UDP packet to a relay port whose flow userspace installed (the port's
// peer has latched, and the bridged port's peer is known), from exactly the latched
// source: rewrite source and destination (the bridged relay port, the bridged peer),
// fix the IP and UDP checksums, count the packet in the flow's stats, and send it on
// (`bpf_redirect_neigh` toward the egress interface userspace chose; for a destination
// on this host, on up the stack, which delivers it). Everything else (no flow, another
// source, another SSRC, not IPv4/UDP, IP options, fragments, not RTP/RTCP) passes on
// untouched (`TC_ACT_UNSPEC`: to the next program on the interface, if any, then up the
// stack to the userspace relay, which latches, maps a new source, drops what it must and
// counts it).
//
// The map layouts are `switch/src/relay/kernel.rs`'s `FlowKey`, `Flow`, `FlowStats`
// (addresses and ports in network order).
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Counted by the program, read by userspace (metrics, CDR counts, the media timeout),
// with the last RTP packet's header fields (network order): what userspace needs to keep
// the stream continuous when it takes the port back (a re-point).
struct flow_stats {
	__u64 packets; __u64 bytes; __u64 last_ns;
	__u32 rtp_ssrc; __u32 rtp_ts; __u16 rtp_seq; __u16 rtp_seen; __u32 pad;
};
// What its flow does: the latched source it accepts, the source and destination it
// leaves with; and its counters, in the same entry (one lookup a packet: a second map
// for them cost a second hash lookup, measured).
struct flow {
	__u32 src_addr; __u16 src_port; __u16 pad0;
	__u32 out_saddr; __u16 out_sport; __u16 pad1;
	__u32 out_daddr; __u16 out_dport; __u16 pad2;
	// Where it leaves: 0 for a destination on this host (delivered by this host's
	// stack), else the egress interface (the neighbour's address filled in by the kernel).
	__u32 out_ifindex;
	// The relay port's own address (0: no flow on this port).
	__u32 port_addr;
	// The stream it carries (userspace's continuity mapping): RTP of this SSRC
	// (network order) only; another SSRC is a new source, which userspace maps. When
	// `mapped`, sequence numbers and timestamps are shifted by the deltas (host order,
	// wrapping) and the SSRC becomes `out_ssrc`; RTCP then goes to userspace too (its
	// SSRCs need the same rewrite).
	__u32 in_ssrc; __u32 out_ssrc; __u32 ts_delta; __u16 seq_delta; __u16 mapped;
	struct flow_stats stats;
};

// A flow per relay port, indexed by the port number (host order): an array, so that the
// lookup is an address computation the JIT inlines, and the flows of ports allocated
// together lie together (a hash table of 65,536 buckets cost ~360 ns of lookup a packet
// here, in cache and TLB misses, measured with perf).
// Mappable: userspace reads the counters from shared memory (its periodic sweep of every
// flow is then no system call at all), and installs and clears entries by system call.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct flow);
} parley_flows SEC(".maps");

#define IP_OFF ETH_HLEN
#define UDP_OFF (IP_OFF + sizeof(struct iphdr))
#define UDP_CSUM (UDP_OFF + offsetof(struct udphdr, check))
#define RTP_OFF (UDP_OFF + sizeof(struct udphdr))
// The largest frame forwarded: the relay's largest packet (2048) and its headers.
#define MAX_FRAME (2048 + RTP_OFF)

// A one's-complement sum folded to 16 bits.
static __always_inline __u16 fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

SEC("classifier")
int parley_relay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP
	    || (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_UNSPEC;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return TC_ACT_UNSPEC;
	__u32 key = bpf_ntohs(udp->dest);
	struct flow *f = bpf_map_lookup_elem(&parley_flows, &key);
	if (!f || f->port_addr != ip->daddr || !f->port_addr)
		return TC_ACT_UNSPEC;
	if (ip->saddr != f->src_addr || udp->source != f->src_port)
		return TC_ACT_UNSPEC;
	// RTP or RTCP as userspace validates it (version 2, no CSRCs to step over, at most
	// the relay's largest packet); anything else is userspace's to drop and count.
	__u8 *rh = (void *)(udp + 1);
	if ((void *)(rh + 12) > end || (rh[0] & 0xc0) != 0x80 || skb->len > MAX_FRAME)
		return TC_ACT_UNSPEC;
	int rtcp = rh[1] >= 192 && rh[1] <= 223;
	if (!rtcp && (rh[0] & 0x0f))
		return TC_ACT_UNSPEC;
	__u32 ssrc = *(__u32 *)(rh + 8);
	__u16 seq = *(__u16 *)(rh + 2);
	__u32 ts = *(__u32 *)(rh + 4);
	if (rtcp ? f->mapped : ssrc != f->in_ssrc)
		return TC_ACT_UNSPEC;
	// Rewrite in place (direct packet access: one unclone at most, no helper call a
	// field), then the checksums by difference: the IP header's here, the UDP one by the
	// two helper calls that know the skb's checksum state (with a checksum the hardware
	// or loopback will finish, only the pseudo-header's part is ours to change). Every
	// changed field is in a 32-bit word at an even offset, so the one's-complement
	// difference is taken a word at a time.
	__u32 *addrs = (__u32 *)&ip->saddr;
	__u32 *ports = (__u32 *)udp;
	__u32 *rtp = (__u32 *)rh;
	__u32 new_ports = (__u32)f->out_sport | ((__u32)f->out_dport << 16);
	__u64 pseudo = (__u32)~addrs[0] + (__u64)(__u32)~addrs[1]
		+ f->out_saddr + f->out_daddr;
	__u64 rest = (__u32)~ports[0] + (__u64)new_ports;
	__u64 len = skb->len;
	__u16 out_seq = seq;
	__u32 out_ts = ts, out_ssrc = ssrc;
	if (!rtcp && f->mapped) {
		out_seq = bpf_htons(bpf_ntohs(seq) + f->seq_delta);
		out_ts = bpf_htonl(bpf_ntohl(ts) + f->ts_delta);
		out_ssrc = f->out_ssrc;
		__u32 w0 = rtp[0];
		__u32 new_w0 = (w0 & bpf_htonl(0xffff0000)) | ((__u32)out_seq << 16);
		rest += (__u32)~w0 + (__u64)new_w0 + (__u32)~ts + (__u64)out_ts
			+ (__u32)~ssrc + (__u64)out_ssrc;
		rtp[0] = new_w0;
		rtp[1] = out_ts;
		rtp[2] = out_ssrc;
	}
	int has_csum = udp->check != 0;
	__u32 d_pseudo = fold(pseudo), d_rest = fold(rest);
	// The IP header checksum is always complete: ~(~check + diff).
	ip->check = (__u16)~fold((__u16)~ip->check + (__u64)d_pseudo);
	addrs[0] = f->out_saddr;
	addrs[1] = f->out_daddr;
	ports[0] = new_ports;
	if (has_csum) {
		bpf_l4_csum_replace(skb, UDP_CSUM, 0, d_pseudo, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
		bpf_l4_csum_replace(skb, UDP_CSUM, 0, d_rest, BPF_F_MARK_MANGLED_0);
	}

	struct flow_stats *st = &f->stats;
	__sync_fetch_and_add(&st->packets, 1);
	__sync_fetch_and_add(&st->bytes, len);
	// Coarse time (the last tick): enough to say when the flow last carried a packet.
	st->last_ns = bpf_ktime_get_coarse_ns();
	if (!rtcp) {
		// Where the stream is, as the peer sees it.
		st->rtp_seq = out_seq;
		st->rtp_ts = out_ts;
		st->rtp_ssrc = out_ssrc;
		st->rtp_seen = 1;
	}
	__u32 out = f->out_ifindex;
	if (out)
		return bpf_redirect_neigh(out, NULL, 0, 0);
	// A destination on this host (loopback, or one of its addresses): the rewritten
	// packet goes on up this host's stack, which delivers it to the destination's
	// socket. (Redirecting it out through lo would send it round loopback a second time:
	// measured, 7 us of machine CPU a packet more.)
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual MIT/GPL";
