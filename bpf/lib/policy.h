/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Kubernetes NetworkPolicy, enforced where a packet leaves a pod (egress:
 * host_route, on the pod's host veth ingress) and where it is handed to one
 * (ingress: route_local for every eBPF delivery path, pol_to_pod on the host
 * veth's egress for what the stack delivers; bpf_redirect_peer skips that
 * hook, so each fast path checks for itself).
 *
 * The agent (pkg/policy compiles, pkg/datapath/policy.go writes) keeps:
 *  - sb_pol_endpoints: this node's pods, whether policy isolates them per
 *    direction, and which policy to blame for a default-deny drop;
 *  - sb_pol_ipcache: every known address (pods of all nodes, this node's
 *    addresses, the CIDRs of ipBlocks) → an identity, a number this node
 *    gives to a set of peers no rule tells apart (same namespace, labels,
 *    named ports, and ipBlock CIDRs containing them);
 *  - sb_pol_rules: (pod, identity, direction, protocol, port prefix) → the
 *    rule that allows it. Port ranges become port prefixes; "any protocol"
 *    rules stop their prefix before the protocol byte.
 *
 * sb_pol_ct remembers allowed flows: their replies always pass, and their
 * later packets skip the lookups until sb_pol_gen moves (the agent bumps it
 * after every change, so a new policy applies to established flows too).
 */
#ifndef SINABRO_POLICY_H
#define SINABRO_POLICY_H

#include "common.h"
#include "nat.h"

/* Set by the loader: without it every check passes at once. */
volatile const bool policy_enabled = false;

enum pol_dir {
	POL_INGRESS = 0,
	POL_EGRESS = 1,
};

/* Flags or-ed into policy_check's dir for the egress check in host_route,
 * where a pod's packet has just left it: only from the pod's own veth, and
 * a packet for a Service address (kube-proxy translates it in the stack
 * after this hook) is judged after translation, on the way out (pol_to_pod
 * on a host veth or the vxlan device, masq_egress on the uplink). */
#define POL_FROM_VETH 0x2
#define POL_DEFER_SERVICE 0x4

/* The identity of Service addresses (ClusterIPs, external and load
 * balancer IPs) in sb_pol_ipcache. */
#define POL_SERVICE_IDENTITY 2

#define POL_ISOLATED_INGRESS 0x1
#define POL_ISOLATED_EGRESS 0x2

struct pol_endpoint {
	__u32 flags;
	__u32 ifindex;        /* the pod's host veth (the CNI plugin waits for it) */
	__u32 deny_policy[2]; /* per pol_dir: a policy selecting the pod, blamed for drops */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __be32); /* pod IPv4 address */
	__type(value, struct pol_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_pol_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__type(key, struct lpm_v4_key);
	__type(value, __u32); /* identity; no entry: 0, the world */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_pol_ipcache SEC(".maps");

/* The trie matches bits in this order: pod, identity, direction, protocol,
 * port (network order, so a port prefix is a range). */
struct pol_rule_key {
	__u32 prefixlen;
	__be32 pod;
	__u32 identity;
	__u8 dir;
	__u8 proto;
	__be16 port;
};

#define POL_RULE_KEY_BITS 96
#define POL_ANY_IDENTITY 0xffffffff

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1048576);
	__type(key, struct pol_rule_key);
	__type(value, __u32); /* the rule, as the agent numbered it */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_pol_rules SEC(".maps");

/* One entry per flow for both directions: the lower address (then port)
 * first, so that a packet and its reply find the same entry with one
 * lookup; the entry remembers which end opened the flow. */
struct pol_ct_key {
	__be32 addr[2];
	__be16 port[2];
	__u8 proto;
	__u8 pad[3];
};

struct pol_ct {
	__u64 last_seen;  /* bpf_ktime_get_ns, refreshed at most every TOUCH_NS */
	/* Per pol_dir, at this node: the sb_pol_gen the flow's opening end was
	 * last allowed in (0: never). A reply passes where the check of its
	 * direction's mirror (the opening packet's check of the same pod)
	 * allowed the flow in the current generation. */
	__u32 gen[2];
	__be32 init_addr; /* the end that opened the flow */
	__be16 init_port;
	__u8 flags[2];    /* CT_* (lib/nat.h) seen from the opening end [0] and the other [1] */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct pol_ct_key);
	__type(value, struct pol_ct);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_pol_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32); /* the policy generation; starts at 1 */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_pol_gen SEC(".maps");

/* Each local pod's host veth → the pod's address: on egress, a pod sends
 * from its own address only (no spoofing past its policy, or into another
 * pod's allowances). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* ifindex */
	__type(value, __be32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_pol_veths SEC(".maps");

struct pol_drop_key {
	__u32 policy; /* deny_policy of the endpoint */
	__u32 dir;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct pol_drop_key);
	__type(value, struct counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_pol_drops SEC(".maps");

static __always_inline void pol_count_drop(struct __sk_buff *skb, __u32 policy, __u32 dir)
{
	struct pol_drop_key k = {.policy = policy, .dir = dir};
	struct counter *c = bpf_map_lookup_elem(&sb_pol_drops, &k);

	if (!c) {
		struct counter z = {};

		bpf_map_update_elem(&sb_pol_drops, &k, &z, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&sb_pol_drops, &k);
		if (!c)
			return;
	}
	c->packets++;
	c->bytes += skb->len;
}

static __always_inline void pol_touch(struct pol_ct *ct, bool opener, __u8 flags, __u64 now)
{
	if (opener) {
		/* A new SYN on a closed flow's tuple: a new connection. */
		if ((flags & CT_SYN) && ((ct->flags[0] | ct->flags[1]) & (CT_FIN | CT_RST))) {
			ct->flags[0] = 0, ct->flags[1] = 0;
			ct->last_seen = now;
		}
		if ((ct->flags[0] | flags) != ct->flags[0])
			ct->flags[0] |= flags;
	} else if ((ct->flags[1] | flags) != ct->flags[1]) {
		ct->flags[1] |= flags;
	}
	if (now - ct->last_seen > TOUCH_NS)
		ct->last_seen = now;
}

static __always_inline __u32 pol_gen_of(const struct pol_ct *ct, __u32 slot)
{
	return slot == POL_INGRESS ? ct->gen[0] : ct->gen[1];
}

static __always_inline void pol_set_gen(struct pol_ct *ct, __u32 slot, __u32 gen)
{
	if (slot == POL_INGRESS)
		ct->gen[0] = gen;
	else
		ct->gen[1] = gen;
}

/* pol_rule looks the rule allowing pod's traffic with peer up: the peer's
 * identity (its longest prefix in the ipcache, 0 without one), then the
 * rule for it or for every peer. */
static __always_inline __u32 *pol_rule(__be32 pod, __be32 peer, __u32 dir, __u8 proto, __be16 port, __u32 *identity)
{
	struct lpm_v4_key ik = {.prefixlen = 32, .addr = peer};
	struct pol_rule_key rk = {.prefixlen = POL_RULE_KEY_BITS, .pod = pod, .dir = dir, .proto = proto, .port = port};
	__u32 *id, *rule;

	id = bpf_map_lookup_elem(&sb_pol_ipcache, &ik);
	rk.identity = id ? *id : 0;
	*identity = rk.identity;
	rule = bpf_map_lookup_elem(&sb_pol_rules, &rk);
	if (!rule) {
		/* Rules without peers allow every identity. */
		rk.identity = POL_ANY_IDENTITY;
		rule = bpf_map_lookup_elem(&sb_pol_rules, &rk);
	}
	return rule;
}

static __always_inline bool pol_isolated(const struct pol_endpoint *ep, __u32 dir)
{
	return ep->flags & (dir == POL_INGRESS ? POL_ISOLATED_INGRESS : POL_ISOLATED_EGRESS);
}

static __always_inline int pol_deny(struct __sk_buff *skb, const struct pol_endpoint *ep, __u32 dir, __u32 prog)
{
	__u32 policy = dir == POL_INGRESS ? ep->deny_policy[0] : ep->deny_policy[1];

	count_only(skb, prog, REASON_DROP_POLICY);
	flow_drop_inline(skb, prog, REASON_DROP_POLICY, policy, dir);
	pol_count_drop(skb, policy, dir);
	return -1;
}

/* pol_flow_verdict records a direction's verdict in the FLOW_NEW event of
 * this packet: the one this check opens, or one an earlier check of the
 * same packet opened (the egress of a pod of this node, then the ingress
 * of another). */
static __always_inline void pol_flow_verdict(__u32 dir, __u8 verdict, __u32 rule)
{
	struct flow_event *ev = flow_pending();

	if (ev) {
		ev->verdict[dir & 1] = verdict;
		ev->rule[dir & 1] = rule;
	}
}

/* pol_flow_new holds a FLOW_NEW event for the packet opening a flow, sent
 * when the program is done with it (flow_end). */
static __always_inline void pol_flow_new(struct __sk_buff *skb, const struct iphdr *ip, const __be16 *ports, __u32 prog)
{
	const struct flow_cfg *cfg;
	struct flow_state *st = flow_begin(&cfg);

	if (!st)
		return;
	__builtin_memset(&st->pending, 0, sizeof(st->pending));
	st->pending.ts = bpf_ktime_get_ns();
	st->pending.type = FLOW_NEW;
	st->pending.prog = prog;
	st->pending.proto = ip->protocol;
	st->pending.saddr = ip->saddr;
	st->pending.daddr = ip->daddr;
	st->pending.sport = ports[0];
	st->pending.dport = ports[1];
	st->pending.ifindex = skb->ifindex;
	/* Where it goes, unless host routing says otherwise: the stack (the
	 * path of what pol_to_pod and masq_egress see). */
	st->pending.reason = REASON_PASS_STACK;
	st->has_pending = 1;
}

/* pol_ct_key_of fills the flow's key from one of its packets. */
static __always_inline void pol_ct_key_of(struct pol_ct_key *k, __be32 saddr, __be32 daddr, __be16 sport, __be16 dport)
{
	if (saddr < daddr || (saddr == daddr && sport <= dport)) {
		k->addr[0] = saddr, k->addr[1] = daddr, k->port[0] = sport, k->port[1] = dport;
	} else {
		k->addr[0] = daddr, k->addr[1] = saddr, k->port[0] = dport, k->port[1] = sport;
	}
}

static __always_inline bool pol_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* pol_icmp_error_of_flow: an ICMP error about a flow policy allowed (a
 * router's "fragmentation needed" for path MTU discovery, a port
 * unreachable) belongs to that flow. */
static __always_inline bool pol_icmp_error_of_flow(struct __sk_buff *skb, __u32 l4off)
{
	struct pol_ct_key k = {};
	struct iphdr inner;
	__be16 ports[2] = {};
	__u8 type;

	if (bpf_skb_load_bytes(skb, l4off, &type, 1) || !is_icmp_error(type) ||
	    bpf_skb_load_bytes(skb, l4off + 8, &inner, sizeof(inner)) || inner.ihl < 5)
		return false;
	if (pol_has_ports(inner.protocol) &&
	    bpf_skb_load_bytes(skb, l4off + 8 + inner.ihl * 4, ports, 4))
		return false;
	k.proto = inner.protocol;
	pol_ct_key_of(&k, inner.saddr, inner.daddr, ports[0], ports[1]);
	return bpf_map_lookup_elem(&sb_pol_ct, &k) != NULL;
}

/* policy_check decides whether the IPv4 packet ip (its L4 header at l4off)
 * may leave (POL_EGRESS) or reach (POL_INGRESS) the pod at its source or
 * destination address. Returns 0 to let it go on, -1 to drop it (counted).
 * A subprogram: it is called from several delivery paths. */
static __noinline int policy_check(struct __sk_buff *skb, const struct iphdr *ip, __u32 l4off, __u32 dir, __u32 prog)
{
	bool from_veth = dir & POL_FROM_VETH, defer_service = dir & POL_DEFER_SERVICE, opener = true;
	struct pol_ct_key k = {.proto = ip->protocol};
	struct pol_endpoint *ep;
	struct pol_ct *ct;
	__be16 ports[2] = {}; /* source, destination */
	__u32 zero = 0, ifindex = skb->ifindex, identity = 0, rule_id = 0, *gen, *rule;
	__u8 verdict;
	__be32 pod, peer, *own;
	__u8 flags = CT_SEEN;
	__u64 now;

	if (!policy_enabled || !ip)
		return 0;
	dir &= 1;
	if (from_veth) {
		own = bpf_map_lookup_elem(&sb_pol_veths, &ifindex);
		if (own && *own != ip->saddr) {
			count_only(skb, prog, REASON_DROP_POLICY_SPOOF);
			flow_drop_inline(skb, prog, REASON_DROP_POLICY_SPOOF, 0, 0);
			return -1;
		}
	}
	pod = dir == POL_INGRESS ? ip->daddr : ip->saddr;
	peer = dir == POL_INGRESS ? ip->saddr : ip->daddr;
	ep = bpf_map_lookup_elem(&sb_pol_endpoints, &pod);
	/* Not a pod of this node, or one the agent has not compiled yet (the
	 * CNI plugin holds its start until it has). */
	if (!ep)
		return 0;
	if (from_veth && ep->ifindex != ifindex) {
		/* A local pod's address from elsewhere (another node's packet
		 * decapsulated by the vxlan device): never the pod's own. */
		count_only(skb, prog, REASON_DROP_POLICY_SPOOF);
		flow_drop_inline(skb, prog, REASON_DROP_POLICY_SPOOF, 0, 0);
		return -1;
	}
	gen = bpf_map_lookup_elem(&sb_pol_gen, &zero);
	if (!gen)
		return 0;

	/* Ports, but not for later fragments (their L4 header is elsewhere);
	 * a truncated header is judged as port 0. */
	if (pol_has_ports(ip->protocol) && !(ip->frag_off & bpf_htons(IP_OFFSET))) {
		if (bpf_skb_load_bytes(skb, l4off, ports, 4))
			ports[0] = 0, ports[1] = 0;
		flags = flow_flags(skb, ip->protocol, l4off);
	}
	if (ip->protocol == IPPROTO_ICMP && !(ip->frag_off & bpf_htons(IP_OFFSET)) && pol_icmp_error_of_flow(skb, l4off)) {
		count(skb, prog, REASON_POLICY_REPLY);
		return 0;
	}
	pol_ct_key_of(&k, ip->saddr, ip->daddr, ports[0], ports[1]);
	now = bpf_ktime_get_ns();

	ct = bpf_map_lookup_elem(&sb_pol_ct, &k);
	if (ct) {
		opener = ct->init_addr == ip->saddr && ct->init_port == ports[0];
		if (opener && pol_gen_of(ct, dir) == *gen) {
			pol_touch(ct, true, flags, now);
			return 0;
		}
		if (!opener) {
			/* A reply: it passes where this pod's check of the opening
			 * packets (the other direction) allowed the flow. */
			__u32 mirror = dir == POL_INGRESS ? POL_EGRESS : POL_INGRESS, was = pol_gen_of(ct, mirror);

			if (was == *gen) {
				pol_touch(ct, false, flags, now);
				count(skb, prog, REASON_POLICY_REPLY);
				return 0;
			}
			if (was) {
				/* Allowed before a policy change: judge the opening
				 * direction again (a Service address kube-proxy
				 * translates was judged after translation). */
				if (pol_isolated(ep, mirror) &&
				    !pol_rule(pod, peer, mirror, k.proto, ports[0], &identity) &&
				    identity != POL_SERVICE_IDENTITY)
					return pol_deny(skb, ep, mirror, prog);
				pol_set_gen(ct, mirror, *gen);
				pol_touch(ct, false, flags, now);
				count(skb, prog, REASON_POLICY_REPLY);
				return 0;
			}
			/* Not a reply of anything allowed here: judged on its own,
			 * below, leaving the flow's entry as it is. */
		}
	}

	verdict = VERDICT_OPEN;
	if (pol_isolated(ep, dir)) {
		rule = pol_rule(pod, peer, dir, k.proto, ports[1], &identity);
		/* A Service address kube-proxy translates is judged after the
		 * translation, on the way out; the entry recorded here lets the
		 * translated-back replies in. */
		if (defer_service && identity == POL_SERVICE_IDENTITY) {
			verdict = VERDICT_DEFERRED;
		} else {
			if (!rule)
				return pol_deny(skb, ep, dir, prog);
			count(skb, prog, REASON_POLICY_ALLOW);
			verdict = VERDICT_ALLOWED;
			rule_id = *rule;
		}
	}
	if (!ct) {
		struct pol_ct v = {.last_seen = now, .init_addr = ip->saddr, .init_port = ports[0], .flags = {flags}};

		pol_set_gen(&v, dir, *gen);
		if (bpf_map_update_elem(&sb_pol_ct, &k, &v, BPF_NOEXIST) == 0)
			pol_flow_new(skb, ip, ports, prog);
		pol_flow_verdict(dir, verdict, rule_id);
	} else if (opener) {
		pol_flow_verdict(dir, verdict, rule_id);
		pol_set_gen(ct, dir, *gen);
		pol_touch(ct, true, flags, now);
	}
	return 0;
}

#endif
