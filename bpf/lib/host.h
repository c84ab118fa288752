/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Host routing, attached with tcx to the ingress of each pod's host-side
 * veth (packets leaving the pod). A packet for another pod on this node is
 * routed here: TTL decremented, MACs rewritten, and handed straight to the
 * destination pod's eth0 with bpf_redirect_peer, skipping the host stack.
 * Everything else (other nodes, the outside, the node itself) is left to
 * the kernel's routing, which the uplink's masquerading then sees.
 */
#ifndef SINABRO_HOST_H
#define SINABRO_HOST_H

#include "common.h"

#define EP_LOCAL 0x1 /* the pod runs on this node */

struct endpoint {
	__u32 ifindex;        /* host-side veth */
	__u32 flags;
	__u8 pod_mac[ETH_ALEN];  /* the pod's eth0 */
	__u8 host_mac[ETH_ALEN]; /* the host-side veth */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __be32); /* pod IPv4 address */
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_endpoints SEC(".maps");

/* route_local delivers an IPv4 packet to a pod on this node, or returns
 * -1 to leave it to the stack. ip is the packet's header, already loaded. */
static __always_inline int route_local(struct __sk_buff *skb, const struct iphdr *ip, __u32 prog)
{
	struct endpoint *ep;
	__be16 old_ttl, new_ttl;
	__u8 ttl;

	ep = bpf_map_lookup_elem(&sb_endpoints, &ip->daddr);
	if (!ep || !(ep->flags & EP_LOCAL))
		return -1;
	/* An expiring packet needs an ICMP time exceeded: the stack's job. */
	if (ip->ttl <= 1)
		return -1;

	/* TTL shares a 16-bit checksum word with the protocol. */
	ttl = ip->ttl - 1;
	old_ttl = bpf_htons((__u16)ip->ttl << 8 | ip->protocol);
	new_ttl = bpf_htons((__u16)ttl << 8 | ip->protocol);
	if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, old_ttl, new_ttl, 2) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + 8, &ttl, 1, 0) ||
	    bpf_skb_store_bytes(skb, 0, ep->pod_mac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, ep->host_mac, ETH_ALEN, 0)) {
		count(skb, prog, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	count(skb, prog, REASON_REDIRECT_LOCAL);
	return bpf_redirect_peer(ep->ifindex, 0);
}

SEC("tc")
int host_route(struct __sk_buff *skb)
{
	struct iphdr ip;
	int ret;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		count(skb, PROG_HOST_ROUTE, REASON_PASS_NOT_IPV4);
		return TCX_NEXT;
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl < 5) {
		count(skb, PROG_HOST_ROUTE, REASON_PASS_STACK);
		return TCX_NEXT;
	}
	ret = route_local(skb, &ip, PROG_HOST_ROUTE);
	if (ret >= 0)
		return ret;
	count(skb, PROG_HOST_ROUTE, REASON_PASS_STACK);
	return TCX_NEXT;
}

#endif
