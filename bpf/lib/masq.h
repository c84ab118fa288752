/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Masquerading for pod traffic leaving the cluster, attached with tcx to the
 * node's uplink: egress rewrites the source of pod packets to the node
 * address and a port from a configured range; ingress rewrites replies
 * (and ICMP errors about our flows) back to the pod.
 *
 * Conntrack is one LRU hash holding two entries per flow:
 *   forward  {pod, pod_port -> dst, dst_port, FWD} = {node, nat_port}
 *   reverse  {dst, dst_port -> node, nat_port, REV} = {pod, pod_port}
 * ICMP echo uses the identifier as the port: forward {sport=id, dport=0},
 * reverse {sport=0, dport=nat_id}.
 *
 * Each entry has its own last-seen time and the flags seen in its
 * direction; the agent's GC combines both halves to decide expiry.
 *
 * Fragments: a fragmented pod packet that needs masquerading is dropped
 * (counted as DROP_FRAGMENT): non-first fragments carry no ports, so they
 * cannot be matched to a flow without reassembly state. Fragments arriving
 * for the node are left to the host stack. TCP sets DF, so this only
 * affects UDP datagrams larger than the path MTU.
 */
#ifndef SINABRO_MASQ_H
#define SINABRO_MASQ_H

#include "common.h"
#include "host.h"
#include "lb.h"
#include "nat.h"

#define CT_FWD 0
#define CT_REV 1

#define PORT_TRIES 32

struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

struct ct_entry {
	__u64 created;
	__u64 last_seen;
	__be32 addr; /* forward: NAT address; reverse: pod address */
	__be16 port; /* forward: NAT port;    reverse: pod port */
	__u8 flags;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* replaced by the loader */
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_ct SEC(".maps");

/* Prefixes that matter to masquerading. The loader stores, for each
 * prefix, the union of the flags of every configured prefix containing it,
 * so the longest match carries all that apply. */
#define CIDR_POD 0x1    /* pod addresses: sources we masquerade */
#define CIDR_NO_MASQ 0x2 /* destinations never masqueraded */

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__type(key, struct lpm_v4_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_masq_cidrs SEC(".maps");

static __always_inline __u32 cidr_flags(__be32 addr)
{
	struct lpm_v4_key k = {.prefixlen = 32, .addr = addr};
	__u32 *f = bpf_map_lookup_elem(&sb_masq_cidrs, &k);

	return f ? *f : 0;
}

/* ct_touch records a packet on an entry, writing only when something changed
 * to keep the cache line shared between CPUs. Returns true when it wrote. */
static __always_inline bool ct_touch(struct ct_entry *e, __u8 flags, __u64 now)
{
	bool changed = (e->flags | flags) != e->flags;

	if (changed)
		e->flags |= flags;
	if (changed || now - e->last_seen > TOUCH_NS) {
		e->last_seen = now;
		return true;
	}
	return false;
}

static __always_inline void rev_key(struct ct_key *rk, const struct ct_key *fk, __be16 nat_port)
{
	__builtin_memset(rk, 0, sizeof(*rk));
	rk->saddr = fk->daddr;
	rk->daddr = node_ip;
	rk->sport = fk->dport;
	rk->dport = nat_port;
	rk->proto = fk->proto;
	rk->dir = CT_REV;
}

/* ct_create allocates a NAT port for a new flow and inserts both halves.
 * Returns 0 or the drop reason; on success *nat_port is set. */
static __always_inline int ct_create(const struct ct_key *fk, __u8 flags, __u64 now, __be16 *nat_port)
{
	struct ct_entry rv = {}, fv = {};
	struct ct_key rk;
	__u32 size = (__u32)port_max - (__u32)port_min + 1;
	__u32 off = bpf_get_prandom_u32() % size;
	long err;
	int i;

	rev_key(&rk, fk, 0);
	rv.created = now;
	rv.last_seen = now;
	rv.addr = fk->saddr;
	rv.port = fk->sport;

	/* Bounded search from a random start: a collision is a reverse key
	 * (same remote, same NAT port) already taken by another flow. */
	for (i = 0; i < PORT_TRIES; i++) {
		rk.dport = bpf_htons((__u16)(port_min + (off + i) % size));
		err = bpf_map_update_elem(&sb_ct, &rk, &rv, BPF_NOEXIST);
		if (err == 0)
			goto reserved;
		if (err != -EEXIST)
			return REASON_DROP_CT_FULL;
		/* A reverse half whose forward half was evicted: reuse it. */
		struct ct_entry *old = bpf_map_lookup_elem(&sb_ct, &rk);
		if (old && old->addr == fk->saddr && old->port == fk->sport) {
			old->last_seen = now;
			old->flags = 0;
			goto reserved;
		}
	}
	return REASON_DROP_NO_PORT;

reserved:
	fv.created = now;
	fv.last_seen = now;
	fv.addr = node_ip;
	fv.port = rk.dport;
	fv.flags = flags;
	err = bpf_map_update_elem(&sb_ct, fk, &fv, BPF_NOEXIST);
	if (err == -EEXIST) {
		/* Another CPU created this flow meanwhile: keep its port. */
		struct ct_entry *e = bpf_map_lookup_elem(&sb_ct, fk);
		if (!e)
			return REASON_DROP_CT_FULL;
		if (e->port != rk.dport)
			bpf_map_delete_elem(&sb_ct, &rk);
		*nat_port = e->port;
		return 0;
	}
	if (err) {
		bpf_map_delete_elem(&sb_ct, &rk);
		return REASON_DROP_CT_FULL;
	}
	*nat_port = rk.dport;
	return 0;
}

/* ct_refresh keeps the reverse half alive (LRU) and recreates it if it was
 * evicted, so replies keep working for one-way flows. */
static __always_inline void ct_refresh_rev(const struct ct_key *fk, const struct ct_entry *fe, __u64 now, bool reset)
{
	struct ct_key rk;
	struct ct_entry rv = {};
	struct ct_entry *e;

	rev_key(&rk, fk, fe->port);
	e = bpf_map_lookup_elem(&sb_ct, &rk);
	if (e) {
		if (reset) {
			e->flags = 0;
			e->last_seen = now;
		}
		return;
	}
	rv.created = now;
	rv.last_seen = now;
	rv.addr = fk->saddr;
	rv.port = fk->sport;
	bpf_map_update_elem(&sb_ct, &rk, &rv, BPF_NOEXIST);
}

/* nat_icmp_error translates an ICMP error whose embedded packet belongs to
 * a NATed flow. dir is CT_REV on ingress (error about a packet we sent with
 * the node address; embedded source becomes the pod again) and CT_FWD on
 * egress (error from a pod about a reply it received; embedded destination
 * becomes the node). The embedded L4 checksum is left alone: receivers do
 * not check it, and it may not even be complete in the quote. */
static __always_inline int nat_icmp_error(struct __sk_buff *skb, __u32 l4off, __u8 dir, __u64 now)
{
	struct iphdr outer_ip, ip;
	struct ct_key k;
	struct l4 l4 = {};
	struct ct_entry *e;
	__u32 icmp_csum = l4off + 2;
	__u32 inner = l4off + 8, inner_l4;
	__u32 addr_off = dir == CT_REV ? 12 : 16;
	__u32 outer_addr_off = dir == CT_REV ? 16 : 12;
	__u32 port_off;
	__be32 old_addr, new_addr;
	__be16 old_port, new_port;
	__sum16 old_csum, new_csum;

	if (bpf_skb_load_bytes(skb, inner, &ip, sizeof(ip)))
		return REASON_DROP_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return REASON_DROP_MALFORMED;
	inner_l4 = inner + ip.ihl * 4;
	if (ip.protocol == IPPROTO_ICMP && dir != CT_REV)
		return REASON_DROP_UNSUPPORTED;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP && ip.protocol != IPPROTO_ICMP)
		return REASON_DROP_UNSUPPORTED;
	/* The quote holds at least 8 bytes of L4: ports or the echo id, but
	 * maybe not TCP flags, so TCP is read like UDP. */
	if (load_l4(skb, ip.protocol == IPPROTO_TCP ? IPPROTO_UDP : ip.protocol, inner_l4, &l4))
		return REASON_DROP_MALFORMED;

	/* The embedded packet travelled the other way: swap to get our key. */
	__builtin_memset(&k, 0, sizeof(k));
	k.saddr = ip.daddr;
	k.daddr = ip.saddr;
	k.sport = l4.dport;
	k.dport = l4.sport;
	k.proto = ip.protocol;
	k.dir = dir;
	e = bpf_map_lookup_elem(&sb_ct, &k);
	if (!e)
		return -1;
	ct_touch(e, 0, now);

	if (dir == CT_REV) {
		old_addr = ip.saddr;
		old_port = l4.sport;
		port_off = ip.protocol == IPPROTO_ICMP ? 4 : 0;
	} else {
		old_addr = ip.daddr;
		old_port = l4.dport;
		port_off = 2;
	}
	new_addr = e->addr;
	new_port = e->port;

	/* Outer header: the node address becomes the pod's (or back). */
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &outer_ip, sizeof(outer_ip)))
		return REASON_DROP_MALFORMED;
	__be32 outer_old = dir == CT_REV ? outer_ip.daddr : outer_ip.saddr;
	__be32 outer_new = dir == CT_REV ? e->addr : node_ip;
	if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, outer_old, outer_new, 4) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + outer_addr_off, &outer_new, 4, 0))
		return REASON_DROP_REWRITE;

	/* Embedded header: address, its IP checksum, and port; every change
	 * is mirrored in the ICMP checksum, which covers the quote. */
	old_csum = ip.check;
	if (bpf_l3_csum_replace(skb, inner + 10, old_addr, new_addr, 4) ||
	    bpf_skb_store_bytes(skb, inner + addr_off, &new_addr, 4, 0) ||
	    bpf_l4_csum_replace(skb, icmp_csum, old_addr, new_addr, 4))
		return REASON_DROP_REWRITE;
	if (bpf_skb_load_bytes(skb, inner + 10, &new_csum, 2) ||
	    bpf_l4_csum_replace(skb, icmp_csum, old_csum, new_csum, 2))
		return REASON_DROP_REWRITE;
	if (bpf_skb_store_bytes(skb, inner_l4 + port_off, &new_port, 2, 0) ||
	    bpf_l4_csum_replace(skb, icmp_csum, old_port, new_port, 2))
		return REASON_DROP_REWRITE;
	return 0;
}

static __always_inline int do_masq_egress(struct __sk_buff *skb)
{
	struct iphdr ip;
	struct l4 l4 = {};
	struct ct_key fk;
	struct ct_entry *e;
	__u32 l4off;
	__u64 now;
	__u8 flags = CT_SEEN;
	__be16 nat_port;
	int r = -1;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		count(skb, PROG_MASQ_EGRESS, REASON_PASS_NOT_IPV4);
		return TCX_NEXT;
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl < 5) {
		count(skb, PROG_MASQ_EGRESS, REASON_DROP_MALFORMED);
		return TCX_DROP;
	}
	/* A pod's egress policy for what the stack forwarded (kube-proxy's
	 * translations, judged on the backend), before masquerading hides
	 * the pod. A flow host routing judged passes on its entry. */
	if (policy_check(skb, &ip, ETH_HLEN + ip.ihl * 4, POL_EGRESS, PROG_MASQ_EGRESS))
		return TCX_DROP;
	if (!(cidr_flags(ip.saddr) & CIDR_POD)) {
		count(skb, PROG_MASQ_EGRESS, REASON_PASS_NOT_POD);
		return TCX_NEXT;
	}
	if (cidr_flags(ip.daddr) || ip.daddr == node_ip) {
		count(skb, PROG_MASQ_EGRESS, REASON_PASS_NO_MASQ);
		return TCX_NEXT;
	}
	if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)) {
		count(skb, PROG_MASQ_EGRESS, REASON_DROP_FRAGMENT);
		return TCX_DROP;
	}

	l4off = ETH_HLEN + ip.ihl * 4;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP && ip.protocol != IPPROTO_ICMP) {
		count(skb, PROG_MASQ_EGRESS, REASON_DROP_UNSUPPORTED);
		return TCX_DROP;
	}
	if (load_l4(skb, ip.protocol, l4off, &l4)) {
		count(skb, PROG_MASQ_EGRESS, REASON_DROP_MALFORMED);
		return TCX_DROP;
	}
	now = bpf_ktime_get_ns();
	if (ip.protocol == IPPROTO_ICMP && l4.icmp_type == ICMP_ECHOREPLY) {
		/* An answer to a ping from outside (routed to the pod's own
		 * address): it must leave with that address. */
		count(skb, PROG_MASQ_EGRESS, REASON_PASS_INBOUND_REPLY);
		return TCX_NEXT;
	}
	if (ip.protocol == IPPROTO_ICMP && l4.icmp_type != ICMP_ECHO) {
		if (is_icmp_error(l4.icmp_type)) {
			r = nat_icmp_error(skb, l4off, CT_FWD, now);
			if (r == 0) {
				count(skb, PROG_MASQ_EGRESS, REASON_ICMP_ERROR_NAT);
				return TCX_NEXT;
			}
		}
		/* Anything else would leave with a pod address nobody can answer. */
		count(skb, PROG_MASQ_EGRESS, r > 0 ? r : REASON_DROP_UNSUPPORTED);
		return TCX_DROP;
	}
	if (ip.protocol == IPPROTO_TCP)
		flags = tcp_ct_flags(l4.tcpflags);

	__builtin_memset(&fk, 0, sizeof(fk));
	fk.saddr = ip.saddr;
	fk.daddr = ip.daddr;
	fk.sport = l4.sport;
	fk.dport = l4.dport;
	fk.proto = ip.protocol;
	fk.dir = CT_FWD;

	e = bpf_map_lookup_elem(&sb_ct, &fk);
	if (e) {
		/* A fresh SYN on a closed flow: the pod reuses the port. */
		bool reopen = (l4.tcpflags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN &&
			      (e->flags & (CT_FIN | CT_RST));
		if (reopen)
			e->flags = flags;
		if (ct_touch(e, flags, now) || reopen)
			ct_refresh_rev(&fk, e, now, reopen);
		nat_port = e->port;
	} else if (ip.protocol == IPPROTO_TCP && (l4.tcpflags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN) {
		/* Only a SYN opens a flow to masquerade. Anything else without an
		 * entry answers a connection opened from outside to the pod's own
		 * address (a router or a control plane with routes to pod CIDRs):
		 * translated, it would reach the client from an address it never
		 * talked to. */
		count(skb, PROG_MASQ_EGRESS, REASON_PASS_INBOUND_REPLY);
		return TCX_NEXT;
	} else if (ip.protocol == IPPROTO_UDP && kct_answer(skb, &ip, ETH_HLEN)) {
		/* The same for UDP, which has no SYN: the kernel's conntrack saw
		 * the flow come in from its peer (with kube-proxy coexistence). */
		count(skb, PROG_MASQ_EGRESS, REASON_PASS_INBOUND_REPLY);
		return TCX_NEXT;
	} else {
		r = ct_create(&fk, flags, now, &nat_port);
		if (r) {
			count(skb, PROG_MASQ_EGRESS, r);
			return TCX_DROP;
		}
		count(skb, PROG_MASQ_EGRESS, REASON_SNAT_NEW);
		flow_translate(PROG_MASQ_EGRESS, REASON_SNAT_NEW, ip.protocol, ip.saddr, ip.daddr, l4.sport, l4.dport,
			       node_ip, ip.daddr, nat_port, l4.dport);
	}

	if (rewrite(skb, ip.protocol, l4off, 12, ip.saddr, node_ip, ip.protocol == IPPROTO_ICMP ? 4 : 0,
		    l4.sport, nat_port)) {
		count(skb, PROG_MASQ_EGRESS, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	count(skb, PROG_MASQ_EGRESS, REASON_SNAT);
	return TCX_NEXT;
}

static __always_inline int do_masq_ingress(struct __sk_buff *skb)
{
	struct iphdr ip;
	struct l4 l4 = {};
	struct ct_key rk;
	struct ct_entry *e;
	__u32 l4off;
	__u64 now;
	__u8 flags = CT_SEEN;
	int r;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		count(skb, PROG_MASQ_INGRESS, REASON_PASS_NOT_IPV4);
		return TCX_NEXT;
	}
	/* Anything odd that is not ours is the host stack's business. */
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl < 5) {
		count(skb, PROG_MASQ_INGRESS, REASON_PASS_NOT_OURS);
		return TCX_NEXT;
	}
	/* Overlay packets from anything but a peer node would be delivered
	 * into pods past the node's firewall (decap_local below, or the
	 * vxlan device): spoofed inner sources, injected traffic. */
	bool vxlan = vxlan_ours(skb, &ip);
	if (vxlan && !bpf_map_lookup_elem(&sb_vtep_peers, &ip.saddr)) {
		count(skb, PROG_MASQ_INGRESS, REASON_DROP_VXLAN_UNKNOWN_PEER);
		return TCX_DROP;
	}
	/* Services reached from outside: NodePorts, external and
	 * load-balancer IPs (lib/lb.h). */
	if (!vxlan) {
		r = lb_ingress(skb, &ip);
		if (r >= 0)
			return r;
	}
	if (ip.daddr != node_ip) {
		count(skb, PROG_MASQ_INGRESS, REASON_PASS_NOT_OURS);
		return TCX_NEXT;
	}
	/* Overlay traffic for a local pod skips the vxlan device. */
	r = decap_local(skb, &ip, PROG_MASQ_INGRESS);
	if (r >= 0)
		return r;
	if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)) {
		count(skb, PROG_MASQ_INGRESS, REASON_PASS_FRAGMENT);
		return TCX_NEXT;
	}
	/* A Service backend on another node answering a client outside. */
	r = lb_reply_remote(skb, &ip);
	if (r >= 0)
		return r;
	l4off = ETH_HLEN + ip.ihl * 4;
	if ((ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP && ip.protocol != IPPROTO_ICMP) ||
	    load_l4(skb, ip.protocol, l4off, &l4)) {
		count(skb, PROG_MASQ_INGRESS, REASON_PASS_NOT_OURS);
		return TCX_NEXT;
	}
	now = bpf_ktime_get_ns();
	if (ip.protocol == IPPROTO_ICMP) {
		if (is_icmp_error(l4.icmp_type)) {
			r = nat_icmp_error(skb, l4off, CT_REV, now);
			if (r == 0) {
				count(skb, PROG_MASQ_INGRESS, REASON_ICMP_ERROR_NAT);
			} else if (r > 0 && r == REASON_DROP_REWRITE) {
				count(skb, PROG_MASQ_INGRESS, r);
				return TCX_DROP;
			} else {
				count(skb, PROG_MASQ_INGRESS, REASON_PASS_NOT_OURS);
			}
			return TCX_NEXT;
		}
		if (l4.icmp_type != ICMP_ECHOREPLY) {
			count(skb, PROG_MASQ_INGRESS, REASON_PASS_NOT_OURS);
			return TCX_NEXT;
		}
		/* Reverse ICMP keys mirror the forward {id, 0}. */
		l4.dport = l4.sport;
		l4.sport = 0;
	} else if (ip.protocol == IPPROTO_TCP) {
		flags = tcp_ct_flags(l4.tcpflags) & ~CT_SYN;
	}
	/* No shortcut on the port range: flows NATed before an upgrade that
	 * changed the range must keep working. */
	__builtin_memset(&rk, 0, sizeof(rk));
	rk.saddr = ip.saddr;
	rk.daddr = ip.daddr;
	rk.sport = l4.sport;
	rk.dport = l4.dport;
	rk.proto = ip.protocol;
	rk.dir = CT_REV;
	e = bpf_map_lookup_elem(&sb_ct, &rk);
	if (!e) {
		count(skb, PROG_MASQ_INGRESS, REASON_PASS_NOT_OURS);
		return TCX_NEXT;
	}
	ct_touch(e, flags, now);

	if (ip.protocol == IPPROTO_ICMP)
		r = rewrite(skb, ip.protocol, l4off, 16, ip.daddr, e->addr, 4, l4.dport, e->port);
	else
		r = rewrite(skb, ip.protocol, l4off, 16, ip.daddr, e->addr, 2, l4.dport, e->port);
	if (r) {
		count(skb, PROG_MASQ_INGRESS, REASON_DROP_REWRITE);
		return TCX_DROP;
	}
	count(skb, PROG_MASQ_INGRESS, REASON_RNAT);
	/* A reply for a pod on this node goes straight to it, unless the
	 * stack translated the flow too (a pod's connection to a Service
	 * whose backend is outside: kube-proxy's DNAT must be undone). */
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) == 0) {
		if (kct_lookup(skb, &ip, ETH_HLEN) == KCT_NAT) {
			count(skb, PROG_MASQ_INGRESS, REASON_PASS_KERNEL_NAT);
			return TCX_NEXT;
		}
		r = route_local(skb, &ip, PROG_MASQ_INGRESS);
		if (r >= 0)
			return r;
	}
	return TCX_NEXT;
}

SEC("tc")
int masq_egress(struct __sk_buff *skb)
{
	return flow_end(do_masq_egress(skb));
}

SEC("tc")
int masq_ingress(struct __sk_buff *skb)
{
	return flow_end(do_masq_ingress(skb));
}

#endif
