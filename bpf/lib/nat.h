/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Packet rewriting shared by masquerading (masq.h) and Service load
 * balancing for traffic from outside (lb.h): reading ports and replacing an
 * address and a port with their checksums fixed.
 */
#ifndef SINABRO_NAT_H
#define SINABRO_NAT_H

#include "common.h"

/* Flags seen in one direction of a flow (masquerading's sb_ct and Service
 * load balancing's sb_lb_ct): with last_seen, what conntrack GC in
 * pkg/datapath (conntrack.go) expires flows by. */
#define CT_SEEN 0x01
#define CT_SYN 0x02
#define CT_FIN 0x04
#define CT_RST 0x08

#define TOUCH_NS 1000000000ULL /* refresh last_seen at most once a second */

static __always_inline __u8 tcp_ct_flags(__u8 tcpflags)
{
	__u8 f = CT_SEEN;

	if (tcpflags & TCP_FLAG_SYN)
		f |= CT_SYN;
	if (tcpflags & TCP_FLAG_FIN)
		f |= CT_FIN;
	if (tcpflags & TCP_FLAG_RST)
		f |= CT_RST;
	return f;
}

/* flow_flags reads the flags of the packet at l4off: TCP's, or CT_SEEN. */
static __always_inline __u8 flow_flags(struct __sk_buff *skb, __u8 proto, __u32 l4off)
{
	__u8 tcpflags;

	if (proto != IPPROTO_TCP || bpf_skb_load_bytes(skb, l4off + 13, &tcpflags, 1))
		return CT_SEEN;
	return tcp_ct_flags(tcpflags);
}

/* rewrite replaces the IPv4 address at ETH_HLEN+addr_off and the 16-bit
 * L4 field at l4off+port_off, fixing the IP and L4 checksums. ICMP has no
 * pseudo header, so its checksum only covers the identifier. */
static __always_inline int rewrite(struct __sk_buff *skb, __u8 proto, __u32 l4off, __u32 addr_off,
				   __be32 old_addr, __be32 new_addr, __u32 port_off, __be16 old_port,
				   __be16 new_port)
{
	__u32 csum_off;
	__u64 mangled = 0;

	switch (proto) {
	case IPPROTO_TCP:
		csum_off = l4off + 16;
		break;
	case IPPROTO_UDP:
		csum_off = l4off + 6;
		mangled = BPF_F_MARK_MANGLED_0; /* a zero UDP checksum stays zero */
		break;
	default:
		csum_off = l4off + 2;
		break;
	}

	if (old_addr != new_addr) {
		if (proto != IPPROTO_ICMP &&
		    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, BPF_F_PSEUDO_HDR | mangled | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, old_addr, new_addr, 4))
			return -1;
		if (bpf_skb_store_bytes(skb, ETH_HLEN + addr_off, &new_addr, 4, 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | 2))
			return -1;
		if (bpf_skb_store_bytes(skb, l4off + port_off, &new_port, 2, 0))
			return -1;
	}
	return 0;
}

struct l4 {
	__be16 sport; /* ICMP echo: the identifier */
	__be16 dport;
	__u8 tcpflags;
	__u8 icmp_type;
};

/* load_l4 reads ports (or the ICMP type and echo identifier) at off. */
static __always_inline int load_l4(struct __sk_buff *skb, __u8 proto, __u32 off, struct l4 *l4)
{
	__be16 ports[2];
	struct icmphdr icmp;

	switch (proto) {
	case IPPROTO_TCP:
		if (bpf_skb_load_bytes(skb, off + 13, &l4->tcpflags, 1))
			return -1;
		/* fallthrough */
	case IPPROTO_UDP:
		if (bpf_skb_load_bytes(skb, off, ports, 4))
			return -1;
		l4->sport = ports[0];
		l4->dport = ports[1];
		return 0;
	case IPPROTO_ICMP:
		if (bpf_skb_load_bytes(skb, off, &icmp, sizeof(icmp)))
			return -1;
		l4->icmp_type = icmp.type;
		l4->sport = icmp.id;
		l4->dport = 0;
		return 0;
	}
	return -1;
}

#endif
