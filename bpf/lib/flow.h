/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Flow telemetry: events for `sinabro observe`, sent through one BPF ring
 * buffer that the datapath, the socket load balancer and the sockmap
 * objects share (pinned once in <bpf root>/shared, and handed to every
 * loader: pkg/bpffs LoadPinnedShared).
 *
 * What is reported, and when:
 *  - FLOW_NEW: the first packet of a flow of a pod of this node (the one
 *    that creates NetworkPolicy's conntrack entry), with the verdict of
 *    each direction checked here and where the packet went (its path
 *    reason, and the peer node's address when it was encapsulated). The
 *    event is held per CPU while the program runs (flow_path fills in the
 *    path) and sent when the program returns (flow_end).
 *  - FLOW_DROP: every dropped packet, with its reason (and the policy).
 *  - FLOW_TRANSLATE: a NAT entry created: masquerading (snat_new) or a
 *    Service reached from outside (lb_new), original and translated tuple.
 *  - FLOW_SERVICE: a socket connected to a Service got its backend.
 *  - FLOW_ACCEL_END: an accelerated connection closed, with the bytes its
 *    sockets redirected (bytes that never crossed tc).
 *
 * Cost is bounded per CPU: at most rate[class] events per second for
 * flows and for drops each (a flood of drops cannot push flows out), the
 * rest counted as sampled out; an event the full ring refuses is counted
 * as lost. Nothing is sent until the agent turns sb_flow_cfg on.
 */
#ifndef SINABRO_FLOW_H
#define SINABRO_FLOW_H

#include "uapi.h"
#include <bpf/bpf_helpers.h>

enum flow_type {
	FLOW_NEW = 1,
	FLOW_DROP = 2,
	FLOW_TRANSLATE = 3,
	FLOW_SERVICE = 4,
	FLOW_ACCEL_END = 5,
};

/* A direction's NetworkPolicy verdict in a FLOW_NEW or FLOW_DROP event
 * (index 0 ingress, 1 egress, as POL_INGRESS and POL_EGRESS). */
enum flow_verdict {
	VERDICT_NONE = 0,     /* not judged here (no pod of this node at that end, policy off) */
	VERDICT_OPEN = 1,     /* the pod is not isolated in this direction */
	VERDICT_ALLOWED = 2,  /* allowed by the rule in rule[dir] */
	VERDICT_DENIED = 3,   /* denied: rule[dir] is the policy blamed */
	VERDICT_DEFERRED = 4, /* to a Service address kube-proxy translates: judged after it */
};

enum flow_class {
	FLOW_CLASS_FLOW = 0, /* every event but drops */
	FLOW_CLASS_DROP = 1,
	FLOW_CLASS_MAX = 2,
};

struct flow_event {
	__u64 ts;     /* bpf_ktime_get_ns() */
	__u64 bytes;  /* FLOW_ACCEL_END: bytes redirected; FLOW_DROP: the packet's length */
	__u64 cookie; /* the socket's cookie (FLOW_SERVICE, FLOW_ACCEL_END) */
	__be32 saddr, daddr;
	__be32 xsaddr, xdaddr; /* translated addresses (FLOW_TRANSLATE, FLOW_SERVICE) */
	__be32 node;           /* FLOW_NEW: the peer node's underlay address when sent through the overlay */
	__u32 rule[2];         /* per direction: the allowing rule, or the denying policy */
	__u32 ifindex;
	__u32 suppressed;      /* events of this class this CPU sampled out just before this one */
	__be16 sport, dport;
	__be16 xsport, xdport;
	__u8 type;  /* enum flow_type */
	__u8 prog;  /* enum prog_id of the datapath program (0 elsewhere) */
	__u8 reason;/* FLOW_DROP: why; FLOW_NEW: the path taken; FLOW_TRANSLATE: snat_new or lb_new */
	__u8 proto;
	__u8 verdict[2];
	__u8 pad[2];
};

struct flow_cfg {
	__u32 enabled;
	__u32 rate[FLOW_CLASS_MAX]; /* events per second per CPU; 0: unlimited */
	__u32 pad;
};

/* Per CPU: the rate limiter, the counters the agent reports, and the
 * FLOW_NEW event of the packet being handled. */
struct flow_state {
	__u64 window; /* start of the current second */
	__u32 sent[FLOW_CLASS_MAX];
	__u32 suppressed[FLOW_CLASS_MAX];
	__u64 sampled[FLOW_CLASS_MAX]; /* sampled out, in total */
	__u64 lost;                    /* refused by the full ring */
	__u32 has_pending;
	__u32 pad;
	struct flow_event pending;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_flow_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_flow_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_flow_state SEC(".maps");

#define FLOW_RB_AVAIL_DATA 0
#define FLOW_RB_NO_WAKEUP (1ULL << 0)
#define FLOW_RB_FORCE_WAKEUP (1ULL << 1)
/* Wake the agent when the events waiting in the ring cross this much (it
 * also reads every 100 ms): a wakeup per event past the mark costs an
 * irq_work each (a flow's first packet took +1.4 us with it, +0.7 us
 * with one wakeup per crossing: TestFlowEventsCost). */
#define FLOW_WAKEUP_BYTES (64 * 1024)
#define FLOW_RECORD_BYTES (sizeof(struct flow_event) + 8) /* with the ring's header */

static __always_inline __u64 flow_wakeup(void)
{
	__u64 avail = bpf_ringbuf_query(&sb_flow_events, FLOW_RB_AVAIL_DATA);

	return avail < FLOW_WAKEUP_BYTES && avail + FLOW_RECORD_BYTES >= FLOW_WAKEUP_BYTES ? FLOW_RB_FORCE_WAKEUP
											     : FLOW_RB_NO_WAKEUP;
}

/* flow_submit sends an event flow_reserve returned. */
static __always_inline void flow_submit(struct flow_event *ev)
{
	bpf_ringbuf_submit(ev, flow_wakeup());
}

/* flow_begin returns this CPU's state when events are on, else NULL. */
static __always_inline struct flow_state *flow_begin(const struct flow_cfg **cfg)
{
	__u32 zero = 0;

	*cfg = bpf_map_lookup_elem(&sb_flow_cfg, &zero);
	if (!*cfg || !(*cfg)->enabled)
		return NULL;
	return bpf_map_lookup_elem(&sb_flow_state, &zero);
}

/* flow_admit reports whether one more event of class fits this second's
 * budget, and hands the count of those sampled out before it over. */
static __always_inline bool flow_admit(struct flow_state *st, const struct flow_cfg *cfg, __u32 class, __u32 *suppressed)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 c = class & 1;

	if (now - st->window >= 1000000000ULL) {
		st->window = now;
		st->sent[0] = 0;
		st->sent[1] = 0;
	}
	if (cfg->rate[c] && st->sent[c] >= cfg->rate[c]) {
		st->suppressed[c]++;
		st->sampled[c]++;
		return false;
	}
	st->sent[c]++;
	*suppressed = st->suppressed[c];
	st->suppressed[c] = 0;
	return true;
}

/* flow_reserve takes room for one event of class in the ring, zeroed, or
 * returns NULL (off, over budget, ring full: counted). */
static __always_inline struct flow_event *flow_reserve(__u32 class, __u8 type)
{
	const struct flow_cfg *cfg;
	struct flow_state *st = flow_begin(&cfg);
	struct flow_event *ev;
	__u32 suppressed = 0;

	if (!st || !flow_admit(st, cfg, class, &suppressed))
		return NULL;
	ev = bpf_ringbuf_reserve(&sb_flow_events, sizeof(*ev), 0);
	if (!ev) {
		st->lost++;
		return NULL;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts = bpf_ktime_get_ns();
	ev->type = type;
	ev->suppressed = suppressed;
	return ev;
}

/* flow_pending returns the FLOW_NEW event held for this packet, if any. */
static __always_inline struct flow_event *flow_pending(void)
{
	__u32 zero = 0;
	struct flow_state *st = bpf_map_lookup_elem(&sb_flow_state, &zero);

	return st && st->has_pending ? &st->pending : NULL;
}

/* flow_forget_pending drops the FLOW_NEW event held for this packet. */
static __always_inline void flow_forget_pending(void)
{
	__u32 zero = 0;
	struct flow_state *st = bpf_map_lookup_elem(&sb_flow_state, &zero);

	if (st)
		st->has_pending = 0;
}

/* flow_end sends the FLOW_NEW event held for the packet a program is
 * done with (every datapath program returns through it). */
static __always_inline int flow_end(int ret)
{
	const struct flow_cfg *cfg;
	__u32 zero = 0, suppressed = 0;
	struct flow_state *st = bpf_map_lookup_elem(&sb_flow_state, &zero);

	if (!st || !st->has_pending)
		return ret;
	st->has_pending = 0;
	cfg = bpf_map_lookup_elem(&sb_flow_cfg, &zero);
	if (!cfg || !cfg->enabled || !flow_admit(st, cfg, FLOW_CLASS_FLOW, &suppressed))
		return ret;
	st->pending.suppressed = suppressed;
	if (bpf_ringbuf_output(&sb_flow_events, &st->pending, sizeof(st->pending), flow_wakeup()))
		st->lost++;
	return ret;
}

#endif
