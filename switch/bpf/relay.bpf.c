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

// The relay port a packet arrives at.
struct flow_key { __u32 addr; __u16 port; __u16 pad; };
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
	__u32 out_ifindex; __u32 pad3;
	// The stream it carries (userspace's continuity mapping): RTP of this SSRC
	// (network order) only; another SSRC is a new source, which userspace maps. When
	// `mapped`, sequence numbers and timestamps are shifted by the deltas (host order,
	// wrapping) and the SSRC becomes `out_ssrc`; RTCP then goes to userspace too (its
	// SSRCs need the same rewrite).
	__u32 in_ssrc; __u32 out_ssrc; __u32 ts_delta; __u16 seq_delta; __u16 mapped;
	struct flow_stats stats;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow);
} parley_flows SEC(".maps");

#define IP_OFF ETH_HLEN
#define IP_CSUM (IP_OFF + offsetof(struct iphdr, check))
#define IP_SRC (IP_OFF + offsetof(struct iphdr, saddr))
#define IP_DST (IP_OFF + offsetof(struct iphdr, daddr))
#define UDP_OFF (IP_OFF + sizeof(struct iphdr))
#define UDP_CSUM (UDP_OFF + offsetof(struct udphdr, check))
#define UDP_SRC (UDP_OFF + offsetof(struct udphdr, source))
#define UDP_DST (UDP_OFF + offsetof(struct udphdr, dest))
#define RTP_OFF (UDP_OFF + sizeof(struct udphdr))
#define RTP_SEQ (RTP_OFF + 2)
#define RTP_TS (RTP_OFF + 4)
#define RTP_SSRC (RTP_OFF + 8)
// The largest frame forwarded: the relay's largest packet (2048) and its headers.
#define MAX_FRAME (2048 + RTP_OFF)

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
	struct flow_key key = { .addr = ip->daddr, .port = udp->dest };
	struct flow *f = bpf_map_lookup_elem(&parley_flows, &key);
	if (!f)
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
	__u32 old_s = ip->saddr, old_d = ip->daddr;
	__u16 old_sp = udp->source, old_dp = udp->dest;
	__u32 new_s = f->out_saddr, new_d = f->out_daddr;
	__u16 new_sp = f->out_sport, new_dp = f->out_dport;
	int has_csum = udp->check != 0;
	__u64 len = skb->len;
	__u16 out_seq = seq;
	__u32 out_ts = ts, out_ssrc = ssrc;
	if (!rtcp && f->mapped) {
		out_seq = bpf_htons(bpf_ntohs(seq) + f->seq_delta);
		out_ts = bpf_htonl(bpf_ntohl(ts) + f->ts_delta);
		out_ssrc = f->out_ssrc;
		if (has_csum) {
			bpf_l4_csum_replace(skb, UDP_CSUM, seq, out_seq, BPF_F_MARK_MANGLED_0 | 2);
			bpf_l4_csum_replace(skb, UDP_CSUM, ts, out_ts, BPF_F_MARK_MANGLED_0 | 4);
			bpf_l4_csum_replace(skb, UDP_CSUM, ssrc, out_ssrc, BPF_F_MARK_MANGLED_0 | 4);
		}
		bpf_skb_store_bytes(skb, RTP_SEQ, &out_seq, 2, 0);
		bpf_skb_store_bytes(skb, RTP_TS, &out_ts, 4, 0);
		bpf_skb_store_bytes(skb, RTP_SSRC, &out_ssrc, 4, 0);
	}

	if (has_csum) {
		bpf_l4_csum_replace(skb, UDP_CSUM, old_s, new_s, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4);
		bpf_l4_csum_replace(skb, UDP_CSUM, old_d, new_d, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4);
		bpf_l4_csum_replace(skb, UDP_CSUM, old_sp, new_sp, BPF_F_MARK_MANGLED_0 | 2);
		bpf_l4_csum_replace(skb, UDP_CSUM, old_dp, new_dp, BPF_F_MARK_MANGLED_0 | 2);
	}
	bpf_l3_csum_replace(skb, IP_CSUM, old_s, new_s, 4);
	bpf_l3_csum_replace(skb, IP_CSUM, old_d, new_d, 4);
	bpf_skb_store_bytes(skb, IP_SRC, &new_s, 4, 0);
	bpf_skb_store_bytes(skb, IP_DST, &new_d, 4, 0);
	bpf_skb_store_bytes(skb, UDP_SRC, &new_sp, 2, 0);
	bpf_skb_store_bytes(skb, UDP_DST, &new_dp, 2, 0);

	struct flow_stats *st = &f->stats;
	__sync_fetch_and_add(&st->packets, 1);
	__sync_fetch_and_add(&st->bytes, len);
	st->last_ns = bpf_ktime_get_ns();
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
