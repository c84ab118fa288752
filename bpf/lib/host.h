/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Host routing, attached with tcx to the ingress of each pod's host-side
 * veth (packets leaving the pod). A packet for another pod on this node is
 * routed here: TTL decremented, MACs rewritten, and handed straight to the
 * destination pod's eth0 with bpf_redirect_peer, skipping the host stack.
 * A packet for a pod of another node (a prefix of sb_remote_cidrs) is
 * encapsulated in VXLAN to that node's underlay address and sent out of
 * the uplink (lib/tunnel.h); when that cannot be done (no VTEP address
 * known, tunnelling off) it gets the same rewrite towards the node's VTEP
 * MAC and is handed to the egress of the vxlan device, whose FDB maps it
 * to the peer: what the stack's route, neighbour and forwarding would do.
 * decap_local, run by the uplink's ingress program, is the other end.
 * A packet for the outside that the kernel's FIB routes through the uplink
 * is sent out of it directly (route_out; the uplink's masquerading still
 * translates it). Everything else (the node itself, other interfaces) is
 * left to the kernel's routing.
 */
#ifndef SINABRO_HOST_H
#define SINABRO_HOST_H

#include "common.h"
#include "kct.h"
#include "policy.h"
#include "tunnel.h"

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

/* A pod prefix of another node, reached through the vxlan device or, for
 * packets lib/tunnel.h encapsulates itself, straight over the uplink. */
struct remote_cidr {
	__u32 ifindex;            /* the vxlan device */
	__u8 dst_mac[ETH_ALEN];   /* the peer's VTEP (vxlan device) MAC */
	__u8 src_mac[ETH_ALEN];   /* the local vxlan device's MAC */
	__be32 vtep_ip;           /* the peer's underlay address; 0: unknown */
	__be32 nexthop;           /* the underlay's next hop to it; 0: route lookup */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__type(key, struct lpm_v4_key);
	__type(value, struct remote_cidr);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_remote_cidrs SEC(".maps");

/* decrement_ttl lowers the TTL of the IPv4 header at ETH_HLEN, fixing its
 * checksum. ip is the packet's header, already loaded, with ttl > 1. */
static __always_inline int decrement_ttl(struct __sk_buff *skb, const struct iphdr *ip)
{
	/* TTL shares a 16-bit checksum word with the protocol. */
	__u8 ttl = ip->ttl - 1;
	__be16 old_ttl = bpf_htons((__u16)ip->ttl << 8 | ip->protocol);
	__be16 new_ttl = bpf_htons((__u16)ttl << 8 | ip->protocol);

	if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, old_ttl, new_ttl, 2) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + 8, &ttl, 1, 0))
		return -1;
	return 0;
}

/* set_macs writes the Ethernet destination and source addresses. */
static __always_inline int set_macs(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	return bpf_skb_store_bytes(skb, 0, dst, ETH_ALEN, 0) || bpf_skb_store_bytes(skb, ETH_ALEN, src, ETH_ALEN, 0);
}

/* route_local delivers an IPv4 packet to a pod on this node, or returns
 * -1 to leave it to the stack. ip is the packet's header, already loaded. */
static __always_inline int route_local(struct __sk_buff *skb, const struct iphdr *ip, __u32 prog)
{
	struct endpoint *ep;

	ep = bpf_map_lookup_elem(&sb_endpoints, &ip->daddr);
	if (!ep || !(ep->flags & EP_LOCAL))
		return -1;
	/* An expiring packet needs an ICMP time exceeded: the stack's job. */
	if (ip->ttl <= 1)
		return -1;
	if (policy_check(skb, ip, ETH_HLEN + ip->ihl * 4, POL_INGRESS, prog))
		return TCX_DROP;

	if (decrement_ttl(skb, ip) || set_macs(skb, ep->pod_mac, ep->host_mac)) {
		count(skb, prog, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	count(skb, prog, REASON_REDIRECT_LOCAL);
	return bpf_redirect_peer(ep->ifindex, 0);
}

/* route_remote hands an IPv4 packet for a pod of another node to the
 * uplink, encapsulated here, or to the vxlan device; or returns -1 to
 * leave it to the stack. */
static __always_inline int route_remote(struct __sk_buff *skb, const struct iphdr *ip, __u32 prog)
{
	struct lpm_v4_key k = {.prefixlen = 32, .addr = ip->daddr};
	struct remote_cidr *rc;
	int ret;

	rc = bpf_map_lookup_elem(&sb_remote_cidrs, &k);
	/* Never back out of the device it came in on (host_route also runs
	 * on the vxlan device's ingress). */
	if (!rc || rc->ifindex == skb->ifindex)
		return -1;
	if (ip->ttl <= 1)
		return -1;
	if (decrement_ttl(skb, ip)) {
		count(skb, prog, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	count(skb, prog, REASON_REDIRECT_TUNNEL);
	flow_path(REASON_REDIRECT_TUNNEL, rc->vtep_ip);
	ret = vxlan_encap(skb, ip->tos, rc->vtep_ip, rc->dst_mac, rc->src_mac);
	if (ret == 0) {
		count(skb, prog, REASON_ENCAP);
		/* The outer MACs come from the underlay's neighbour table, for
		 * the next hop the agent found in the routing table (saving a
		 * route lookup per packet) or, without one, by a lookup. */
		if (rc->nexthop) {
			struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = rc->nexthop};

			return bpf_redirect_neigh(uplink_ifindex, &nh, sizeof(nh), 0);
		}
		return bpf_redirect_neigh(uplink_ifindex, NULL, 0, 0);
	}
	if (ret < -1) {
		count(skb, prog, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	if (set_macs(skb, rc->dst_mac, rc->src_mac)) {
		count(skb, prog, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	return bpf_redirect(rc->ifindex, 0);
}

/* route_out sends a pod's IPv4 packet for the outside (or another node's
 * address) out of the uplink, as the stack's forwarding would: the route
 * comes from the kernel's FIB, the MACs from its neighbour table, and the
 * uplink's masq_egress then translates it. Returns -1 to leave it to the
 * stack: anything not routed through the uplink (the node's own
 * addresses, other interfaces), unreachable destinations, expiring TTLs. */
static __always_inline int route_out(struct __sk_buff *skb, const struct iphdr *ip, __u32 prog)
{
	struct bpf_fib_lookup fib = {};
	long ret;

	if (!route_out_enabled || !uplink_ifindex || ip->ttl <= 1)
		return -1;
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ingress_ifindex;
	/* The MTU check (a packet too big goes to the stack, which fragments
	 * or answers "fragmentation needed") is for single packets: GSO ones
	 * are segmented to the pod's MTU. */
	fib.tot_len = skb->gso_size ? 0 : bpf_ntohs(ip->tot_len);
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if ((ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH) || fib.ifindex != uplink_ifindex)
		return -1;
	if (decrement_ttl(skb, ip)) {
		count(skb, prog, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	count(skb, prog, REASON_REDIRECT_NEIGH);
	if (ret == BPF_FIB_LKUP_RET_SUCCESS) {
		if (set_macs(skb, fib.dmac, fib.smac)) {
			count(skb, prog, REASON_DROP_REWRITE);
			return TCX_DROP;
		}
		return bpf_redirect(uplink_ifindex, 0);
	}
	/* No neighbour entry yet: the kernel resolves it (and queues). */
	{
		struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst};

		return bpf_redirect_neigh(uplink_ifindex, &nh, sizeof(nh), 0);
	}
}

/* decap_local delivers a VXLAN packet for a pod on this node straight to
 * it, or returns -1 (packet untouched) to leave it to the vxlan device.
 * outer is the packet's header, already loaded. */
static __always_inline int decap_local(struct __sk_buff *skb, const struct iphdr *outer, __u32 prog)
{
	struct endpoint *ep;
	struct iphdr inner;
	int ret;

	if (!vxlan_inner(skb, outer, &inner) || inner.ttl <= 1)
		return -1;
	ep = bpf_map_lookup_elem(&sb_endpoints, &inner.daddr);
	if (!ep || !(ep->flags & EP_LOCAL))
		return -1;
	/* A reply of a flow this node's stack translated (a pod's connection
	 * to a Service whose backend runs on the sending node) needs the
	 * reverse translation: the vxlan device hands it to the stack. */
	if (kct_lookup(skb, &inner, ETH_HLEN + VXLAN_ENCAP_LEN) == KCT_NAT) {
		count(skb, prog, REASON_PASS_KERNEL_NAT);
		return -1;
	}
	ret = vxlan_decap(skb, outer, &inner);
	if (ret == -1)
		return -1;
	if (ret < -1) {
		count(skb, prog, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	count(skb, prog, REASON_DECAP);
	return route_local(skb, &inner, prog);
}

/* may_route_out reports whether route_out may take a packet whose flow the
 * kernel's conntrack sees as kct: one the stack tracks untranslated. A
 * flow's first packet (TCP SYN, or any UDP packet without an entry) goes
 * through the stack, where netfilter may translate it (kube-proxy's DNAT
 * of an external IP or a load balancer address); other TCP packets of a
 * flow the stack never saw (its entry expired, no conntrack in this
 * namespace, or a SYN-ACK answering a connection decapsulated straight
 * into the pod, which the stack would find invalid) take the shortcut. */
static __always_inline bool may_route_out(struct __sk_buff *skb, const struct iphdr *ip, enum kct kct)
{
	__u8 flags;

	if (kct == KCT_PLAIN)
		return true;
	if (kct != KCT_NONE || ip->protocol != IPPROTO_TCP ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + ip->ihl * 4 + 13, &flags, 1))
		return false;
	return (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN;
}

/* Replies of Service backends to clients outside (lib/lb.h). */
static __always_inline int lb_reply_local(struct __sk_buff *skb, struct iphdr *ip);

static __always_inline int do_host_route(struct __sk_buff *skb)
{
	struct iphdr ip;
	enum kct kct;
	int ret;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		count(skb, PROG_HOST_ROUTE, REASON_PASS_NOT_IPV4);
		return TCX_NEXT;
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl < 5) {
		count(skb, PROG_HOST_ROUTE, REASON_PASS_STACK);
		return TCX_NEXT;
	}
	/* NetworkPolicy first: the pod's egress rules see its packet as it
	 * left it (a Service address is translated at the socket already). */
	if (policy_check(skb, &ip, ETH_HLEN + ip.ihl * 4, POL_EGRESS | POL_FROM_VETH | POL_DEFER_SERVICE, PROG_HOST_ROUTE))
		return TCX_DROP;
	ret = lb_reply_local(skb, &ip);
	if (ret >= 0)
		return ret;
	/* Translated flows (kube-proxy's Services, hostPorts) take the
	 * stack both ways, where their conntrack entry lives. */
	kct = kct_lookup(skb, &ip, ETH_HLEN);
	if (kct == KCT_NAT) {
		count(skb, PROG_HOST_ROUTE, REASON_PASS_KERNEL_NAT);
		return TCX_NEXT;
	}
	ret = route_local(skb, &ip, PROG_HOST_ROUTE);
	if (ret >= 0)
		return ret;
	ret = route_remote(skb, &ip, PROG_HOST_ROUTE);
	if (ret >= 0)
		return ret;
	if (may_route_out(skb, &ip, kct)) {
		ret = route_out(skb, &ip, PROG_HOST_ROUTE);
		if (ret >= 0)
			return ret;
	}
	count(skb, PROG_HOST_ROUTE, REASON_PASS_STACK);
	return TCX_NEXT;
}

/* pol_to_pod runs on the egress of each pod's host veth (and of the vxlan
 * device) when NetworkPolicy is on: the checks for what the stack delivers
 * (the node's own traffic, kube-proxy's translations, anything host
 * routing left to the stack). The source pod's egress first: a flow judged
 * in host_route passes on its conntrack entry, one kube-proxy translated is
 * judged here on its backend. Packets host routing redirects never pass
 * here. */
static __always_inline int do_pol_to_pod(struct __sk_buff *skb)
{
	struct iphdr ip;

	if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) ||
	    ip.version != 4 || ip.ihl < 5)
		return TCX_NEXT;
	if (policy_check(skb, &ip, ETH_HLEN + ip.ihl * 4, POL_EGRESS, PROG_POL_TO_POD) ||
	    policy_check(skb, &ip, ETH_HLEN + ip.ihl * 4, POL_INGRESS, PROG_POL_TO_POD))
		return TCX_DROP;
	return TCX_NEXT;
}

/* Every program returns through flow_end, which sends the FLOW_NEW event
 * the packet opened (lib/flow.h). */
SEC("tc")
int host_route(struct __sk_buff *skb)
{
	return flow_end(do_host_route(skb));
}

SEC("tc")
int pol_to_pod(struct __sk_buff *skb)
{
	return flow_end(do_pol_to_pod(skb));
}

#endif
