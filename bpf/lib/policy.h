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
	__u32 gen[2];     /* per pol_dir: the sb_pol_gen the flow was last allowed in (0: never judged) */
	__be32 init_addr; /* the end that opened the flow: its packets are judged, */
	__be16 init_port; /* the other end's are replies */
	__u8 flags;       /* CT_* seen in either direction (lib/nat.h) */
	__u8 pad;
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

static __always_inline void pol_touch(struct pol_ct *ct, __u8 flags, __u64 now)
{
	if ((ct->flags | flags) != ct->flags)
		ct->flags |= flags;
	if (now - ct->last_seen > TOUCH_NS)
		ct->last_seen = now;
}

/* policy_check decides whether the IPv4 packet ip (its L4 header at l4off)
 * may leave (POL_EGRESS) or reach (POL_INGRESS) the pod at its source or
 * destination address. Returns 0 to let it go on, -1 to drop it (counted).
 * A subprogram: it is called from several delivery paths. */
static __noinline int policy_check(struct __sk_buff *skb, const struct iphdr *ip, __u32 l4off, __u32 dir, __u32 prog)
{
	struct pol_ct_key k = {.proto = ip->protocol};
	struct pol_rule_key rk = {.prefixlen = POL_RULE_KEY_BITS};
	struct lpm_v4_key ik = {.prefixlen = 32};
	struct pol_endpoint *ep;
	struct pol_ct *ct;
	__be16 ports[2] = {}; /* source, destination */
	__u32 zero = 0, *gen, *id, *rule;
	__be32 pod, peer;
	__u8 flags = CT_SEEN;
	__u64 now;

	bool from_veth = dir & POL_FROM_VETH, defer_service = dir & POL_DEFER_SERVICE;

	if (!policy_enabled || !ip)
		return 0;
	dir &= 1;
	pod = dir == POL_INGRESS ? ip->daddr : ip->saddr;
	peer = dir == POL_INGRESS ? ip->saddr : ip->daddr;
	ep = bpf_map_lookup_elem(&sb_pol_endpoints, &pod);
	/* Not a pod of this node, or one the agent has not compiled yet (the
	 * CNI plugin holds its start until it has). On egress, only packets
	 * that came out of the pod's own veth. */
	if (!ep || (from_veth && ep->ifindex != skb->ifindex))
		return 0;
	gen = bpf_map_lookup_elem(&sb_pol_gen, &zero);
	if (!gen)
		return 0;

	/* Ports, but not for later fragments (their L4 header is elsewhere). */
	if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) &&
	    !(ip->frag_off & bpf_htons(IP_OFFSET))) {
		if (bpf_skb_load_bytes(skb, l4off, ports, 4))
			return 0;
		flags = flow_flags(skb, ip->protocol, l4off);
	}
	if (ip->saddr < ip->daddr || (ip->saddr == ip->daddr && ports[0] <= ports[1])) {
		k.addr[0] = ip->saddr, k.addr[1] = ip->daddr, k.port[0] = ports[0], k.port[1] = ports[1];
	} else {
		k.addr[0] = ip->daddr, k.addr[1] = ip->saddr, k.port[0] = ports[1], k.port[1] = ports[0];
	}
	now = bpf_ktime_get_ns();

	ct = bpf_map_lookup_elem(&sb_pol_ct, &k);
	if (ct) {
		if (ct->init_addr != ip->saddr || ct->init_port != ports[0]) {
			/* A reply of a flow allowed the other way. */
			pol_touch(ct, flags, now);
			count(skb, prog, REASON_POLICY_REPLY);
			return 0;
		}
		if ((dir == POL_INGRESS ? ct->gen[0] : ct->gen[1]) == *gen) {
			pol_touch(ct, flags, now);
			return 0;
		}
	}

	if (ep->flags & (dir == POL_INGRESS ? POL_ISOLATED_INGRESS : POL_ISOLATED_EGRESS)) {
		ik.addr = peer;
		id = bpf_map_lookup_elem(&sb_pol_ipcache, &ik);
		rk.pod = pod;
		rk.identity = id ? *id : 0;
		if (defer_service && rk.identity == POL_SERVICE_IDENTITY) {
			/* Judged after kube-proxy's translation; the entry (never
			 * judged) lets the translated-back replies in. */
			if (!ct) {
				struct pol_ct v = {.last_seen = now, .init_addr = ip->saddr, .init_port = ports[0], .flags = flags};

				bpf_map_update_elem(&sb_pol_ct, &k, &v, BPF_NOEXIST);
			}
			return 0;
		}
		rk.dir = dir;
		rk.proto = k.proto;
		rk.port = ports[1];
		rule = bpf_map_lookup_elem(&sb_pol_rules, &rk);
		if (!rule) {
			/* Rules without peers allow every identity. */
			rk.identity = POL_ANY_IDENTITY;
			rule = bpf_map_lookup_elem(&sb_pol_rules, &rk);
		}
		if (!rule) {
			count(skb, prog, REASON_DROP_POLICY);
			pol_count_drop(skb, dir == POL_INGRESS ? ep->deny_policy[0] : ep->deny_policy[1], dir);
			return -1;
		}
		count(skb, prog, REASON_POLICY_ALLOW);
	}
	if (ct) {
		if (dir == POL_INGRESS)
			ct->gen[0] = *gen;
		else
			ct->gen[1] = *gen;
		pol_touch(ct, flags, now);
	} else {
		struct pol_ct v = {.last_seen = now, .init_addr = ip->saddr, .init_port = ports[0], .flags = flags};

		if (dir == POL_INGRESS)
			v.gen[0] = *gen;
		else
			v.gen[1] = *gen;
		bpf_map_update_elem(&sb_pol_ct, &k, &v, BPF_NOEXIST);
	}
	return 0;
}

#endif
