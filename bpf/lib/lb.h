/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service load balancing for traffic that arrives from outside the node
 * (NodePorts on the node address, external IPs, load-balancer IPs): the
 * socket programs (bpf/service.c) never see it, so it is translated per
 * packet here, on the uplink's ingress (masq_ingress calls lb_ingress).
 *
 * A new flow's backend comes from the frontend's Maglev table (filled by
 * pkg/datapath from the agent's service controller): a hash of the 5-tuple
 * indexes LB_MAGLEV_M slots, so a backend set change moves few flows. Then:
 *   - a backend on this node: destination rewritten only (the client's
 *     address is kept, for externalTrafficPolicy Local and Cluster alike);
 *     its replies are translated back on the pod's host veth (host_route
 *     calls lb_reply_local) before any routing decision;
 *   - a backend on another node (externalTrafficPolicy Cluster): source
 *     rewritten too, to the node address and a port of the masquerading
 *     range, so the reply comes back here (plain, from the backend to the
 *     node address) and masq_ingress calls lb_reply_remote, which sends it
 *     back out of the uplink.
 * The forward entry keeps a flow on its backend. Both entries carry the
 * flags seen each way and when; the agent's conntrack GC expires them like
 * masquerading's (pkg/datapath: gcLB), so the NAT ports of closed flows
 * come back.
 * Only with the eBPF datapath's host routing and masquerading
 * (route_out_enabled): replies of local backends must pass host_route.
 */
#ifndef SINABRO_LB_H
#define SINABRO_LB_H

#include "common.h"
#include "host.h"
#include "nat.h"

#define LB_MAGLEV_M 1021 /* prime; a frontend's table size */

#define LB_SCOPE_ADDR 0     /* external IP, load-balancer IP */
#define LB_SCOPE_NODEPORT 1 /* the node address */

struct lb_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 scope;
};

struct lb_backend {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

#define LB_F_AFFINITY 1 /* sessionAffinity ClientIP: the slot from the client address alone */

struct lb_service {
	__u32 count; /* backends; 0 answers ICMP port unreachable */
	__u32 flags; /* LB_F_* */
	struct lb_backend slots[LB_MAGLEV_M];
};

/* One map update replaces a frontend's whole table: a reader sees the old
 * one or the new one. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct lb_key);
	__type(value, struct lb_service);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_lb_services SEC(".maps");

/* [0]: how many frontends sb_lb_services holds, written by the agent: with
 * none (most nodes without NodePorts from outside, or next to kube-proxy)
 * every packet skips the lookups below for one array read. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_lb_active SEC(".maps");

static __always_inline bool lb_active(void)
{
	__u32 k = 0;
	__u32 *n = bpf_map_lookup_elem(&sb_lb_active, &k);

	return route_out_enabled && n && *n;
}

#define LB_FWD 0
#define LB_REV 1

struct lb_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

/* Forward {client -> frontend}: to = backend, from = the source to write
 * (the node and a NAT port, or the client itself). Reverse {backend ->
 * node:natport or client}: to = the client, from = the frontend. */
struct lb_ct {
	__be32 to_addr;
	__be32 from_addr;
	__be16 to_port;
	__be16 from_port;
	__u32 pad;
	__u64 last_seen; /* bpf_ktime_get_ns, refreshed at most every TOUCH_NS */
	__u8 flags;      /* CT_* seen in this entry's direction */
	__u8 pad2[7];
};

/* lb_touch records a packet of direction e (writing only on a change, or a
 * second after the last write). */
static __always_inline void lb_touch(struct lb_ct *e, __u8 flags, __u64 now)
{
	if ((e->flags | flags) != e->flags || now - e->last_seen > TOUCH_NS) {
		e->flags |= flags;
		e->last_seen = now;
	}
}

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct lb_ct_key);
	__type(value, struct lb_ct);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_lb_ct SEC(".maps");

static __always_inline __u32 lb_hash(__be32 saddr, __be32 daddr, __be16 sport, __be16 dport, __u8 proto)
{
	/* murmur3's finalizer over the tuple: the same flow hashes the same on
	 * every node and after restarts (no per-boot seed). */
	__u32 h = saddr ^ (daddr * 0x9e3779b1) ^ ((__u32)sport << 16 | dport) ^ ((__u32)proto << 24);

	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline bool lb_is_local(__be32 addr)
{
	struct endpoint *ep = bpf_map_lookup_elem(&sb_endpoints, &addr);

	return ep && (ep->flags & EP_LOCAL);
}

/* lb_snat_port reserves a NAT port for the reverse key rk (its dport is
 * set) holding rv. Returns 0 or a drop reason. */
static __always_inline int lb_snat_port(struct lb_ct_key *rk, const struct lb_ct *rv)
{
	__u32 size = (__u32)port_max - (__u32)port_min + 1;
	__u32 off = bpf_get_prandom_u32() % size;

	for (int i = 0; i < 32; i++) {
		rk->dport = bpf_htons((__u16)(port_min + (off + i) % size));
		long err = bpf_map_update_elem(&sb_lb_ct, rk, rv, BPF_NOEXIST);
		if (err == 0)
			return 0;
		if (err != -EEXIST)
			return REASON_DROP_CT_FULL;
	}
	return REASON_DROP_NO_PORT;
}

#define ICMP_PORT_UNREACH 3

/* An ICMP port unreachable with its quote: the offending packet's IPv4
 * header and the first 8 bytes of its L4 header. */
struct lb_unreach {
	struct icmphdr icmp;
	struct iphdr quoted_ip;
	__u8 quoted_l4[8];
};

static __always_inline __sum16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__sum16)~s;
}

/* lb_reject answers a packet for a frontend without backends as
 * kube-proxy's REJECT does: with an ICMP port unreachable (a TCP client's
 * connect() fails with ECONNREFUSED at once, a UDP client's next recv),
 * sent back out of the interface the packet came in on. The packet is
 * rewritten in place into the answer. Packets with IP options are only
 * dropped. */
static __always_inline int lb_reject(struct __sk_buff *skb, struct iphdr *ip, __u32 l4off)
{
	struct ethhdr eth;
	struct lb_unreach u = {};
	struct iphdr out = {};
	__u8 mac[ETH_ALEN];

	if (ip->ihl != 5 || bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, l4off, u.quoted_l4, sizeof(u.quoted_l4)))
		return TCX_DROP;
	u.quoted_ip = *ip;
	u.icmp.type = ICMP_DEST_UNREACH;
	u.icmp.code = ICMP_PORT_UNREACH;
	u.icmp.checksum = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&u, sizeof(u), 0));

	out.version = 4;
	out.ihl = 5;
	out.tot_len = bpf_htons(sizeof(out) + sizeof(u));
	out.frag_off = bpf_htons(IP_DF);
	out.ttl = 64;
	out.protocol = IPPROTO_ICMP;
	out.saddr = ip->daddr;
	out.daddr = ip->saddr;
	out.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&out, sizeof(out), 0));

	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(out) + sizeof(u), 0) ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &out, sizeof(out), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(out), &u, sizeof(u), 0))
		return TCX_DROP;
	return bpf_redirect(skb->ifindex, 0);
}

/* lb_route sends a translated packet on to a pod, of this node
 * (route_local) or of another (route_remote); -1 when it is for neither. */
static __always_inline int lb_route(struct __sk_buff *skb, struct iphdr *ip, __u32 prog)
{
	int r = route_local(skb, ip, prog);

	if (r >= 0)
		return r;
	return route_remote(skb, ip, prog);
}

/* lb_ingress translates a packet from outside for a Service frontend and
 * sends it on to its backend. It returns -1 when the packet is not for a
 * frontend (untouched), else a tc verdict. */
static __always_inline int lb_ingress(struct __sk_buff *skb, struct iphdr *ip)
{
	struct lb_ct_key fk = {}, rk = {};
	struct lb_ct fv = {}, rv = {};
	struct lb_ct *e;
	__be16 ports[2];
	__u32 l4off;
	int r;

	if (!lb_active() || (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP) ||
	    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return -1;
	l4off = ETH_HLEN + ip->ihl * 4;
	if (bpf_skb_load_bytes(skb, l4off, ports, 4))
		return -1;
	/* The frontend first: one hash lookup (two for the node address) is
	 * all other traffic pays. */
	struct lb_key key = {.addr = ip->daddr, .port = ports[1], .proto = ip->protocol, .scope = LB_SCOPE_ADDR};
	struct lb_service *svc = bpf_map_lookup_elem(&sb_lb_services, &key);

	if (!svc && ip->daddr == node_ip) {
		key.addr = 0;
		key.scope = LB_SCOPE_NODEPORT;
		svc = bpf_map_lookup_elem(&sb_lb_services, &key);
	}
	if (!svc)
		return -1;
	fk.saddr = ip->saddr;
	fk.daddr = ip->daddr;
	fk.sport = ports[0];
	fk.dport = ports[1];
	fk.proto = ip->protocol;
	fk.dir = LB_FWD;
	__u8 flags = flow_flags(skb, ip->protocol, l4off);
	__u64 now = bpf_ktime_get_ns();

	e = bpf_map_lookup_elem(&sb_lb_ct, &fk);
	if (e) {
		lb_touch(e, flags, now);
		fv = *e;
	} else {
		if (svc->count == 0) {
			count(skb, PROG_MASQ_INGRESS, REASON_DROP_LB_NO_BACKEND);
			return lb_reject(skb, ip, l4off);
		}
		/* With ClientIP affinity every flow of a client hashes alike, so
		 * it stays on one backend while the set does not change (longer
		 * than kube-proxy's timeout, which only bounds the stickiness). */
		__u32 slot = (svc->flags & LB_F_AFFINITY) ? lb_hash(fk.saddr, 0, 0, 0, 0) % LB_MAGLEV_M
							  : lb_hash(fk.saddr, fk.daddr, fk.sport, fk.dport, fk.proto) % LB_MAGLEV_M;
		/* The verifier loses the modulo's bound: hide the value from
		 * the compiler so the check it would drop stays. */
		asm volatile("" : "+r"(slot));
		if (slot >= LB_MAGLEV_M)
			return -1;
		struct lb_backend b = svc->slots[slot];

		fv.to_addr = b.addr;
		fv.to_port = b.port;
		/* Replies of a backend elsewhere must come back through here. */
		rk.saddr = b.addr;
		rk.sport = b.port;
		rk.proto = ip->protocol;
		rk.dir = LB_REV;
		rv.to_addr = ip->saddr;
		rv.to_port = ports[0];
		rv.from_addr = ip->daddr;
		rv.from_port = ports[1];
		rv.last_seen = now;
		fv.last_seen = now;
		fv.flags = flags;
		if (lb_is_local(b.addr)) {
			fv.from_addr = ip->saddr;
			fv.from_port = ports[0];
			rk.daddr = ip->saddr;
			rk.dport = ports[0];
			if (bpf_map_update_elem(&sb_lb_ct, &rk, &rv, BPF_ANY)) {
				count(skb, PROG_MASQ_INGRESS, REASON_DROP_CT_FULL);
				return TCX_DROP;
			}
		} else {
			rk.daddr = node_ip;
			r = lb_snat_port(&rk, &rv);
			if (r) {
				count(skb, PROG_MASQ_INGRESS, r);
				return TCX_DROP;
			}
			fv.from_addr = node_ip;
			fv.from_port = rk.dport;
		}
		if (bpf_map_update_elem(&sb_lb_ct, &fk, &fv, BPF_ANY)) {
			bpf_map_delete_elem(&sb_lb_ct, &rk);
			count(skb, PROG_MASQ_INGRESS, REASON_DROP_CT_FULL);
			return TCX_DROP;
		}
		count(skb, PROG_MASQ_INGRESS, REASON_LB_NEW);
		flow_translate(PROG_MASQ_INGRESS, REASON_LB_NEW, ip->protocol, ip->saddr, ip->daddr, ports[0], ports[1],
			       fv.from_addr, fv.to_addr, fv.from_port, fv.to_port);
	}
	if (rewrite(skb, ip->protocol, l4off, 16, ip->daddr, fv.to_addr, 2, ports[1], fv.to_port) ||
	    rewrite(skb, ip->protocol, l4off, 12, ip->saddr, fv.from_addr, 0, ports[0], fv.from_port) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, ip, sizeof(*ip))) {
		count(skb, PROG_MASQ_INGRESS, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	count(skb, PROG_MASQ_INGRESS, REASON_LB_FORWARD);
	r = lb_route(skb, ip, PROG_MASQ_INGRESS);
	if (r >= 0)
		return r;
	/* A local backend the endpoint map does not list yet: the stack
	 * routes it (the source is still the client's). */
	return TCX_NEXT;
}

/* lb_reply translates a backend's packet of a translated flow back to the
 * frontend (source) and the client (destination). It returns false when
 * the packet belongs to no such flow. */
static __always_inline bool lb_reply(struct __sk_buff *skb, struct iphdr *ip, __u32 prog, int *verdict)
{
	struct lb_ct_key rk = {};
	struct lb_ct *e;
	__be16 ports[2];
	__u32 l4off;

	if (!lb_active() || (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP) ||
	    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return false;
	l4off = ETH_HLEN + ip->ihl * 4;
	if (bpf_skb_load_bytes(skb, l4off, ports, 4))
		return false;
	rk.saddr = ip->saddr;
	rk.daddr = ip->daddr;
	rk.sport = ports[0];
	rk.dport = ports[1];
	rk.proto = ip->protocol;
	rk.dir = LB_REV;
	e = bpf_map_lookup_elem(&sb_lb_ct, &rk);
	if (!e)
		return false;
	lb_touch(e, flow_flags(skb, ip->protocol, l4off), bpf_ktime_get_ns());
	struct lb_ct v = *e;
	if (rewrite(skb, ip->protocol, l4off, 12, ip->saddr, v.from_addr, 0, ports[0], v.from_port) ||
	    rewrite(skb, ip->protocol, l4off, 16, ip->daddr, v.to_addr, 2, ports[1], v.to_port) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, ip, sizeof(*ip))) {
		count(skb, prog, REASON_DROP_REWRITE);
		*verdict = TCX_DROP;
		return true;
	}
	count(skb, prog, REASON_LB_REPLY);
	*verdict = -1;
	return true;
}

/* lb_reply_local: host_route's part, for backends on this node: the
 * translated reply is routed here (its source is now a node address,
 * which the stack would take for a martian coming from a pod). Returns -1
 * when the packet is no such reply. */
static __always_inline int lb_reply_local(struct __sk_buff *skb, struct iphdr *ip)
{
	int verdict = -1;
	int r;

	if (!lb_reply(skb, ip, PROG_HOST_ROUTE, &verdict))
		return -1;
	if (verdict >= 0)
		return verdict;
	r = lb_route(skb, ip, PROG_HOST_ROUTE);
	if (r >= 0)
		return r;
	r = route_out(skb, ip, PROG_HOST_ROUTE);
	if (r >= 0)
		return r;
	return TCX_NEXT;
}

/* lb_reply_remote: masq_ingress's part, for replies of backends on other
 * nodes to the node's NAT port, sent on to the client: a pod of another
 * node (it reached this node's address, not masqueraded) over the overlay,
 * a pod here to it, anything else back out of the uplink. Returns -1 when
 * the packet is not such a reply. */
static __always_inline int lb_reply_remote(struct __sk_buff *skb, struct iphdr *ip)
{
	int verdict = -1;
	int r;

	if (!lb_reply(skb, ip, PROG_MASQ_INGRESS, &verdict))
		return -1;
	if (verdict >= 0)
		return verdict;
	r = lb_route(skb, ip, PROG_MASQ_INGRESS);
	if (r >= 0)
		return r;
	return bpf_redirect_neigh(uplink_ifindex, NULL, 0, 0);
}

#endif
