/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * VXLAN in eBPF: the header work behind host routing's shortcuts across
 * nodes (lib/host.h). A packet for another node's pod is encapsulated on
 * the pod's host veth and sent straight out of the uplink; a VXLAN packet
 * for a local pod is decapsulated on the uplink's ingress and handed to
 * the pod. Both skip the vxlan device: its transmit path (FDB, route
 * lookup) one way, and the UDP socket lookup, the vxlan receive path and
 * the extra softirq pass of its GRO cells the other way, the bulk of what
 * a request/response across nodes pays over the underlay.
 *
 * GSO packets (aggregated bulk) take them too, keeping their segment size
 * (BPF_F_ADJ_ROOM_FIXED_GSO: the pod MTU already leaves room for the
 * headers): were they left to the vxlan device, whose GRO cells queue
 * them for a later softirq pass, the single packets of the same flow
 * sent here directly would overtake them, and TCP would see reordering.
 * The headers written are the ones the kernel's vxlan device (learning
 * off, no UDP checksum, TTL 64) writes, so either end may use either path.
 */
#ifndef SINABRO_TUNNEL_H
#define SINABRO_TUNNEL_H

#include "common.h"

/* Set by the loader; a zero port disables both paths. */
volatile const __u16 vxlan_port = 0;
volatile const __u32 vxlan_vni = 0;
volatile const __u32 uplink_ifindex = 0;

#define VXLAN_FLAG_VNI 0x08000000 /* the I flag: VNI is valid */
/* Source ports spread flows over the underlay's ECMP paths, from the
 * range Linux's own vxlan device uses by default. */
#define VXLAN_SPORT_MIN 32768
#define VXLAN_SPORT_SPAN 28232

/* Everything between the outer Ethernet header and the inner IPv4 header. */
struct vxlan_encap {
	struct iphdr ip;
	__be16 sport;
	__be16 dport;
	__be16 len;
	__sum16 check;
	__be32 vx_flags;
	__be32 vx_vni; /* VNI << 8 */
	struct ethhdr inner_eth;
} __attribute__((packed));

#define VXLAN_ENCAP_LEN ((__s32)sizeof(struct vxlan_encap))

/* The underlay addresses of the peer nodes the agent accepted: the only
 * sources whose VXLAN packets the uplink lets in (value unused). Kept
 * across agent restarts, so a restart never drops a peer's traffic. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __be32);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_vtep_peers SEC(".maps");

/* vxlan_ours reports whether the packet, whose outer IPv4 header is outer,
 * is addressed to our VXLAN port and VNI (a whole packet or a first
 * fragment: a later one cannot be reassembled without it). */
static __always_inline bool vxlan_ours(struct __sk_buff *skb, const struct iphdr *outer)
{
	struct {
		__be16 sport;
		__be16 dport;
		__be16 len;
		__sum16 check;
		__be32 vx_flags;
		__be32 vx_vni;
	} h;

	if (!vxlan_port || outer->protocol != IPPROTO_UDP || (outer->frag_off & bpf_htons(IP_OFFSET)))
		return false;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + outer->ihl * 4, &h, sizeof(h)))
		return false;
	return h.dport == bpf_htons(vxlan_port) && h.vx_vni == bpf_htonl(vxlan_vni << 8);
}

/* vxlan_inner reports whether the packet, whose outer IPv4 header is
 * outer, is a VXLAN packet of ours carrying IPv4, and loads the inner
 * IPv4 header. */
static __always_inline bool vxlan_inner(struct __sk_buff *skb, const struct iphdr *outer, struct iphdr *inner)
{
	struct vxlan_encap h;

	if (!vxlan_port || outer->protocol != IPPROTO_UDP || outer->ihl != 5 ||
	    (outer->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return false;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &h, sizeof(h)) ||
	    h.dport != bpf_htons(vxlan_port) || h.vx_flags != bpf_htonl(VXLAN_FLAG_VNI) ||
	    h.vx_vni != bpf_htonl(vxlan_vni << 8) || h.inner_eth.h_proto != bpf_htons(ETH_P_IP))
		return false;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + VXLAN_ENCAP_LEN, inner, sizeof(*inner)))
		return false;
	return inner->version == 4 && inner->ihl >= 5;
}

#define ECN_MASK 0x3
#define ECN_ECT_0 0x2
#define ECN_CE 0x3

/* vxlan_decap removes the outer IPv4, UDP and VXLAN headers and the inner
 * Ethernet header; the outer Ethernet header stays for the caller to
 * rewrite. Congestion the underlay marked on the outer header (CE) is
 * carried to an ECN-capable inner header, as the kernel's tunnels do
 * (RFC 6040); inner is updated to match. */
static __always_inline int vxlan_decap(struct __sk_buff *skb, const struct iphdr *outer, struct iphdr *inner)
{
	if (bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_DECAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO))
		return -1;
	if ((outer->tos & ECN_MASK) == ECN_CE && (inner->tos & ECN_MASK) &&
	    (inner->tos & ECN_MASK) != ECN_CE) {
		/* TOS shares a 16-bit checksum word with version/IHL. */
		__u8 tos = inner->tos | ECN_CE;
		__be16 old = bpf_htons((__u16)(0x40 | inner->ihl) << 8 | inner->tos);
		__be16 new = bpf_htons((__u16)(0x40 | inner->ihl) << 8 | tos);

		if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, old, new, 2) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 1, &tos, 1, 0))
			return -2;
		inner->tos = tos;
	}
	return 0;
}

/* vxlan_encap wraps the IPv4 packet behind the Ethernet header, whose TOS
 * is tos, in VXLAN to vtep, with inner MACs dst and src. The outer header
 * carries the inner ECN field (CE as ECT(0), RFC 6040's normal mode, as
 * the kernel's tunnels do); its Ethernet addresses are left to
 * bpf_redirect_neigh. Returns 0, -1 (packet untouched) or -2 (half
 * built: drop it). */
static __always_inline int vxlan_encap(struct __sk_buff *skb, __u8 tos, __be32 vtep, const __u8 *dst,
				       const __u8 *src)
{
	const __u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
			    BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN) |
			    BPF_F_ADJ_ROOM_FIXED_GSO;
	__u32 inner_len = skb->len - ETH_HLEN;
	struct vxlan_encap h = {};
	struct iphdr ip = {};
	__u16 *w = (__u16 *)&ip;
	__u32 sum = 0;

	/* A GSO packet too big for one outer IPv4 header (BIG TCP) goes
	 * through the vxlan device. */
	if (!vxlan_port || !vtep || inner_len > 0xffff - VXLAN_ENCAP_LEN)
		return -1;
	/* A single packet that would not fit the uplink once encapsulated (a
	 * pod MTU above the underlay's minus 50) goes through the vxlan
	 * device, which fragments the outer packet. GSO packets pass: their
	 * segments are sized by the pod MTU. */
	{
		__u32 mtu = 0;

		if (bpf_check_mtu(skb, uplink_ifindex, &mtu, VXLAN_ENCAP_LEN, 0))
			return -1;
	}
	ip.version = 4;
	ip.ihl = 5;
	ip.tos = (tos & ECN_MASK) == ECN_CE ? ECN_ECT_0 : tos & ECN_MASK;
	ip.tot_len = bpf_htons(inner_len + VXLAN_ENCAP_LEN);
	ip.id = (__be16)bpf_get_prandom_u32();
	ip.ttl = 64;
	ip.protocol = IPPROTO_UDP;
	ip.saddr = node_ip;
	ip.daddr = vtep;
#pragma unroll
	for (int i = 0; i < (int)sizeof(ip) / 2; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip.check = (__sum16)~sum;
	h.ip = ip;
	h.sport = bpf_htons(VXLAN_SPORT_MIN + bpf_get_hash_recalc(skb) % VXLAN_SPORT_SPAN);
	h.dport = bpf_htons(vxlan_port);
	h.len = bpf_htons(inner_len + VXLAN_ENCAP_LEN - sizeof(struct iphdr));
	h.vx_flags = bpf_htonl(VXLAN_FLAG_VNI);
	h.vx_vni = bpf_htonl(vxlan_vni << 8);
	__builtin_memcpy(h.inner_eth.h_dest, dst, ETH_ALEN);
	__builtin_memcpy(h.inner_eth.h_source, src, ETH_ALEN);
	h.inner_eth.h_proto = bpf_htons(ETH_P_IP);

	if (bpf_skb_adjust_room(skb, VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0)) {
		/* The packet is half built: drop it rather than send it. */
		return -2;
	}
	return 0;
}

#endif
