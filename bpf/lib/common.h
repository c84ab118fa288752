/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef SINABRO_COMMON_H
#define SINABRO_COMMON_H

#include "uapi.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flow.h"

/* Node configuration, set by the loader before the programs are loaded
 * (read-only data: the verifier sees them as constants). */
volatile const __be32 node_ip = 0;
volatile const __u16 port_min = 61000;
volatile const __u16 port_max = 65535;
/* Host routing hands pod traffic for the outside straight to the uplink
 * (set when masquerading, if any, happens in eBPF on the uplink: an
 * nftables masquerade in the stack would be skipped). */
volatile const bool route_out_enabled = false;

/* Programs, the first index of the counters map. pkg/datapath reads the
 * names from the object's BTF (PROG_MASQ_EGRESS is "masq_egress"). */
enum prog_id {
	PROG_MASQ_EGRESS = 0,
	PROG_MASQ_INGRESS = 1,
	PROG_HOST_ROUTE = 2,
	PROG_POL_TO_POD = 3,
	PROG_MAX = 4,
};

/* Why a packet took the path it took: the second index of the counters
 * map. DROP_* reasons are drops; everything else is a pass. The names are
 * the metrics' reason labels (REASON_SNAT_NEW is "snat_new"), read by
 * pkg/datapath from the object's BTF: renaming one renames a metric. */
enum reason {
	REASON_PASS_NOT_IPV4 = 0,
	REASON_PASS_NOT_POD = 1,     /* egress: source is not a pod address */
	REASON_PASS_NO_MASQ = 2,     /* egress: destination exempt from masquerading */
	REASON_PASS_NOT_OURS = 3,    /* ingress: no NAT entry, the host's own traffic */
	REASON_PASS_FRAGMENT = 4,    /* ingress: fragment left to the host stack */
	REASON_SNAT = 5,             /* egress: source translated */
	REASON_SNAT_NEW = 6,         /* egress: a NAT entry was created (also counted as SNAT) */
	REASON_RNAT = 7,             /* ingress: destination translated back */
	REASON_ICMP_ERROR_NAT = 8,   /* an ICMP error carrying a NATed flow was translated */
	REASON_REDIRECT_LOCAL = 9,   /* host routing: redirected to a local pod */
	REASON_REDIRECT_NEIGH = 10,  /* host routing: pod traffic for the outside sent out of the uplink */
	REASON_PASS_STACK = 11,      /* host routing: left to the kernel stack */
	REASON_REDIRECT_TUNNEL = 12, /* host routing: redirected to the vxlan device (another node's pod) */
	REASON_DECAP = 13,           /* ingress: VXLAN for a local pod decapsulated in eBPF */
	REASON_ENCAP = 14,           /* host routing: encapsulated in eBPF and sent out of the uplink */
	REASON_PASS_KERNEL_NAT = 15, /* left to the stack: the kernel's conntrack translated this flow (lib/kct.h) */
	REASON_DROP_MALFORMED = 16,
	REASON_DROP_FRAGMENT = 17,   /* egress: fragmented pod packet that needs masquerading */
	REASON_DROP_UNSUPPORTED = 18,/* egress: a protocol we cannot masquerade */
	REASON_DROP_NO_PORT = 19,    /* egress: no free source port for this destination */
	REASON_DROP_CT_FULL = 20,    /* egress: the conntrack table refused a new entry */
	REASON_DROP_REWRITE = 21,    /* a packet rewrite helper failed */
	REASON_DROP_VXLAN_UNKNOWN_PEER = 22, /* ingress: VXLAN for our port and VNI from an address that is no peer node */
	REASON_PASS_INBOUND_REPLY = 23,    /* egress: a pod's answer to a connection opened from outside (TCP without our entry and no SYN, ICMP echo reply): left as is */
	REASON_LB_NEW = 24,          /* ingress: a flow from outside to a Service frontend got its backend (lib/lb.h) */
	REASON_LB_FORWARD = 25,      /* ingress: a packet from outside translated to its Service backend */
	REASON_LB_REPLY = 26,        /* a Service backend's reply translated back to the frontend */
	REASON_DROP_LB_NO_BACKEND = 27, /* ingress: a Service frontend without (local) backends: answered with ICMP port unreachable */
	REASON_DROP_POLICY = 28,     /* NetworkPolicy denies it (lib/policy.h; per policy in sb_pol_drops) */
	REASON_POLICY_ALLOW = 29,    /* a new flow (or one after a policy change) allowed by a NetworkPolicy rule */
	REASON_POLICY_REPLY = 30,    /* a reply of a flow NetworkPolicy allowed the other way (or an ICMP error about one) */
	REASON_DROP_POLICY_SPOOF = 31, /* a pod's packet from an address not its own (NetworkPolicy's source check) */
	REASON_MAX = 32,
};

/* Key of the IPv4 LPM tries (sb_masq_cidrs, sb_remote_cidrs). */
struct lpm_v4_key {
	__u32 prefixlen;
	__be32 addr;
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PROG_MAX * REASON_MAX);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_counters SEC(".maps");

/* is_icmp_error reports whether an ICMP type quotes a packet it is about. */
static __always_inline bool is_icmp_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

static __always_inline void count_only(struct __sk_buff *skb, __u32 prog, __u32 reason)
{
	__u32 key = prog * REASON_MAX + reason;
	struct counter *c = bpf_map_lookup_elem(&sb_counters, &key);

	if (c) { /* per-CPU slot: no atomics needed */
		c->packets++;
		c->bytes += skb->len;
	}
}

/* Reasons that drop the packet, and those naming where it went (the path
 * of a FLOW_NEW event). Constant masks: count() with a constant reason
 * compiles to one of the branches below or to none. */
#define REASON_BIT(r) (1ULL << (r))
#define DROP_REASONS                                                                                          \
	(REASON_BIT(REASON_DROP_MALFORMED) | REASON_BIT(REASON_DROP_FRAGMENT) | REASON_BIT(REASON_DROP_UNSUPPORTED) | \
	 REASON_BIT(REASON_DROP_NO_PORT) | REASON_BIT(REASON_DROP_CT_FULL) | REASON_BIT(REASON_DROP_REWRITE) |     \
	 REASON_BIT(REASON_DROP_VXLAN_UNKNOWN_PEER) | REASON_BIT(REASON_DROP_LB_NO_BACKEND) |                     \
	 REASON_BIT(REASON_DROP_POLICY) | REASON_BIT(REASON_DROP_POLICY_SPOOF))
#define PATH_REASONS                                                                                            \
	(REASON_BIT(REASON_REDIRECT_LOCAL) | REASON_BIT(REASON_REDIRECT_NEIGH) | REASON_BIT(REASON_PASS_STACK) |      \
	 REASON_BIT(REASON_REDIRECT_TUNNEL) | REASON_BIT(REASON_ENCAP) | REASON_BIT(REASON_PASS_KERNEL_NAT))

/* flow_drop_inline sends a FLOW_DROP event for the packet in skb (its
 * IPv4 header at ETH_HLEN, when it has one); policy, when set, is the
 * policy denying it in direction dir. */
static __always_inline void flow_drop_inline(struct __sk_buff *skb, __u32 prog, __u32 reason, __u32 policy, __u32 dir)
{
	struct flow_event *ev;
	__u8 vihl = 0;
	__be16 frag = 0;

	flow_forget_pending(); /* the drop is the packet's report, whatever it opened */
	ev = flow_reserve(FLOW_CLASS_DROP, FLOW_DROP);
	if (!ev)
		return;
	ev->prog = prog;
	ev->reason = reason;
	ev->ifindex = skb->ifindex;
	ev->bytes = skb->len;
	if (policy) {
		ev->rule[dir & 1] = policy;
		ev->verdict[dir & 1] = VERDICT_DENIED;
	}
	/* Read in pieces straight into the event: host_route's stack is
	 * nearly full. */
	if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) || (vihl >> 4) != 4 ||
	    (vihl & 0xf) < 5 || bpf_skb_load_bytes(skb, ETH_HLEN + 6, &frag, 2) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + 9, &ev->proto, 1) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + 12, &ev->saddr, 8)) {
		flow_submit(ev);
		return;
	}
	if ((ev->proto == IPPROTO_TCP || ev->proto == IPPROTO_UDP || ev->proto == IPPROTO_SCTP) &&
	    !(frag & bpf_htons(IP_OFFSET)) &&
	    bpf_skb_load_bytes(skb, ETH_HLEN + (vihl & 0xf) * 4, &ev->sport, 4))
		ev->sport = 0, ev->dport = 0;
	flow_submit(ev);
}

/* flow_drop is flow_drop_inline as a subprogram, for count(): drops are
 * counted in many places. (policy_check, itself a subprogram, inlines
 * it: three frames deep, host_route's stack would overflow.) */
static __noinline void flow_drop(struct __sk_buff *skb, __u32 prog, __u32 reason, __u32 policy, __u32 dir)
{
	flow_drop_inline(skb, prog, reason, policy, dir);
}

/* flow_path records where the packet holding a FLOW_NEW event went. */
static __always_inline void flow_path(__u32 reason, __be32 node)
{
	struct flow_event *pending = flow_pending();

	if (pending) {
		pending->reason = reason;
		if (node)
			pending->node = node;
	}
}

/* count counts a packet under its program and reason, and reports drops
 * and paths to flow telemetry. */
static __always_inline void count(struct __sk_buff *skb, __u32 prog, __u32 reason)
{
	count_only(skb, prog, reason);
	if (reason < 64 && (REASON_BIT(reason) & DROP_REASONS))
		flow_drop(skb, prog, reason, 0, 0);
	else if (reason < 64 && (REASON_BIT(reason) & PATH_REASONS))
		flow_path(reason, 0);
}

/* flow_translate sends a FLOW_TRANSLATE event: a NAT entry was created
 * (reason snat_new or lb_new) for the flow o, translated to x. */
static __always_inline void flow_translate(__u32 prog, __u32 reason, __u8 proto, __be32 osaddr, __be32 odaddr,
					   __be16 osport, __be16 odport, __be32 xsaddr, __be32 xdaddr, __be16 xsport,
					   __be16 xdport)
{
	struct flow_event *ev = flow_reserve(FLOW_CLASS_FLOW, FLOW_TRANSLATE);

	if (!ev)
		return;
	ev->prog = prog;
	ev->reason = reason;
	ev->proto = proto;
	ev->saddr = osaddr, ev->daddr = odaddr, ev->sport = osport, ev->dport = odport;
	ev->xsaddr = xsaddr, ev->xdaddr = xdaddr, ev->xsport = xsport, ev->xdport = xdport;
	flow_submit(ev);
}

#endif
