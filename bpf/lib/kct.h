/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The kernel's own connection tracking, asked from the fast paths so that
 * they never hand a packet past a translation the kernel made: kube-proxy's
 * Service DNAT and masquerade (iptables or nftables), portmap's hostPort
 * DNAT, or any admin's netfilter NAT. The reverse translation of such a
 * flow happens in the stack's conntrack, which bpf_redirect_peer, eBPF
 * decapsulation and route_out all skip; a reply delivered past it reaches
 * the client from the wrong address and the connection hangs.
 *
 * Uses the conntrack kfuncs (Linux >= 6.0 with nf_conntrack); the loader
 * turns kernel_ct_enabled off where they are missing (the agent then keeps
 * the fast paths off when the kernel translates flows: see pkg/agent).
 */
#ifndef SINABRO_KCT_H
#define SINABRO_KCT_H

#include "common.h"

/* Set by the loader: ask the kernel's conntrack (kfuncs present). */
volatile const bool kernel_ct_enabled = false;
/* sizeof(struct bpf_ct_opts) as this kernel declares it (12 before 6.10's
 * zone fields, 16 since): the kfunc insists on an exact size. */
volatile const __u32 kernel_ct_opts_size = 12;

#define BPF_F_CURRENT_NETNS (-1)
#define KCT_ENOENT 2 /* opts.error of a lookup that found no entry is -ENOENT */
#define IPS_SRC_NAT (1 << 4)
#define IPS_DST_NAT (1 << 5)

struct bpf_sock_tuple {
	union {
		struct {
			__be32 saddr;
			__be32 daddr;
			__be16 sport;
			__be16 dport;
		} ipv4;
		struct {
			__be32 saddr[4];
			__be32 daddr[4];
			__be16 sport;
			__be16 dport;
		} ipv6;
	};
};

struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u16 ct_zone_id;
	__u8 ct_zone_dir;
	__u8 reserved[3];
};

/* Only the field read here; CO-RE finds it in the kernel's layout. */
union nf_inet_addr {
	__be32 ip;
} __attribute__((preserve_access_index));

struct nf_conntrack_man {
	union nf_inet_addr u3;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple {
	struct nf_conntrack_man src;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple_hash {
	struct nf_conntrack_tuple tuple;
} __attribute__((preserve_access_index));

struct nf_conn {
	unsigned long status;
	struct nf_conntrack_tuple_hash tuplehash[2]; /* [IP_CT_DIR_ORIGINAL], [IP_CT_DIR_REPLY] */
} __attribute__((preserve_access_index));

extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *bpf_tuple, __u32 tuple__sz,
					 struct bpf_ct_opts *opts, __u32 opts__sz) __ksym __weak;
extern void bpf_ct_release(struct nf_conn *ct) __ksym __weak;

/* What the kernel's conntrack knows of a packet's flow. */
enum kct {
	KCT_PLAIN = 0, /* tracked without NAT, or not asked (disabled, not TCP/UDP) */
	KCT_NONE = 1,  /* no entry: the flow's first packet, or never seen by the stack */
	KCT_NAT = 2,   /* translated by the kernel (or unknown: a fragment, a failed lookup), the stack's to carry */
};

/* kct_lookup tells how the kernel's conntrack sees the IPv4 packet whose
 * header (at l3off) is ip, in the current network namespace. The tuple
 * matches either direction of an entry. */
/* kct_get looks the packet's TCP or UDP flow up in the kernel's conntrack:
 * the entry (to release with bpf_ct_release), or NULL with *none set when
 * the lookup found nothing; NULL without *none means nothing is known (a
 * later fragment, an unreadable header, a refused lookup). */
static __always_inline struct nf_conn *kct_get(struct __sk_buff *skb, const struct iphdr *ip, __u32 l3off, bool *none)
{
	struct bpf_sock_tuple t = {};
	struct bpf_ct_opts opts = {.netns_id = BPF_F_CURRENT_NETNS};
	struct nf_conn *ct;

	*none = false;
	/* A later fragment has no ports to look up. */
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return NULL;
	if (bpf_skb_load_bytes(skb, l3off + ip->ihl * 4, &t.ipv4.sport, 4))
		return NULL;
	t.ipv4.saddr = ip->saddr;
	t.ipv4.daddr = ip->daddr;
	opts.l4proto = ip->protocol;
	ct = bpf_skb_ct_lookup(skb, &t, sizeof(t.ipv4), &opts, kernel_ct_opts_size);
	/* Only a lookup that found nothing says "no entry"; one that failed
	 * (the kernel refused the arguments) knows nothing. */
	if (!ct)
		*none = opts.error == -KCT_ENOENT;
	return ct;
}

static __always_inline enum kct kct_lookup(struct __sk_buff *skb, const struct iphdr *ip, __u32 l3off)
{
	struct nf_conn *ct;
	enum kct ret = KCT_PLAIN;
	bool none;

	if (!kernel_ct_enabled)
		return KCT_PLAIN;
	/* An ICMP error (fragmentation needed, unreachable, time exceeded)
	 * may be about a translated flow, which the stack's conntrack
	 * translates as related traffic: it always takes the stack (they are
	 * rare). Echo and other ICMP are not translated by kube-proxy. */
	if (ip->protocol == IPPROTO_ICMP) {
		__u8 type;

		if (ip->frag_off & bpf_htons(IP_OFFSET) ||
		    bpf_skb_load_bytes(skb, l3off + ip->ihl * 4, &type, 1))
			return KCT_NAT;
		return is_icmp_error(type) ? KCT_NAT : KCT_PLAIN;
	}
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return KCT_PLAIN;
	/* Unknown (a later fragment, a refused lookup): the stack decides. */
	ct = kct_get(skb, ip, l3off, &none);
	if (!ct)
		return none ? KCT_NONE : KCT_NAT;
	if (ct->status & (IPS_SRC_NAT | IPS_DST_NAT))
		ret = KCT_NAT;
	bpf_ct_release(ct);
	return ret;
}

/* kct_answer reports whether the kernel's conntrack holds this UDP or TCP
 * packet's flow as opened by the packet's destination: the packet answers
 * a connection from outside (the original direction's source is not ours).
 * False when the check is off or nothing is known (the kernel tracks a
 * namespace's connections only once a rule needs it, as kube-proxy's do). */
static __always_inline bool kct_answer(struct __sk_buff *skb, const struct iphdr *ip, __u32 l3off)
{
	struct nf_conn *ct;
	bool answer, none;

	if (!kernel_ct_enabled || (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP))
		return false;
	ct = kct_get(skb, ip, l3off, &none);
	if (!ct)
		return false;
	answer = ct->tuplehash[0].tuple.src.u3.ip != ip->saddr;
	bpf_ct_release(ct);
	return answer;
}

#endif
