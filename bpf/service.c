// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Service load balancing at the socket (pkg/service). Attached to the
 * node's cgroup v2, these programs translate a Service address to one of
 * its backends when a socket names it, so the backend is chosen once per
 * connection and no packet of it is ever rewritten:
 *
 *   connect4      connect() to a frontend (TCP, SCTP, connected UDP)
 *   sendmsg4      sendto() of an unconnected UDP socket to a frontend
 *   recvmsg4      a datagram from a backend is reported as coming from the
 *                 frontend the socket sent to
 *   getpeername4  a connected socket's peer is reported as the frontend
 *
 * A frontend is an address, port and protocol: a ClusterIP, an external
 * IP, a load-balancer ingress IP, or a NodePort (scope SVC_SCOPE_NODEPORT,
 * address 0, matched on every address of the node in sb_svc_node_addrs and
 * on loopback). Its value names a backend set; userspace writes a new set
 * in full and then re-points the frontend in one map update, so a reader
 * sees either the old set or the new one, never an empty or partial one.
 * A frontend with no backend rejects at once (ECONNREFUSED) instead of
 * letting the client time out, as kube-proxy's REJECT does.
 */
#include "uapi.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lib/svc_revnat.h"
#include "lib/flow.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define ECONNREFUSED 111
#define IPPROTO_SCTP 132

struct bpf_sock_addr {
	__u32 user_family;
	__u32 user_ip4;  /* network byte order */
	__u32 user_ip6[4];
	__u32 user_port; /* network byte order, in the lower 16 bits */
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 msg_src_ip4;
	__u32 msg_src_ip6[4];
	__bpf_md_ptr(struct bpf_sock *, sk);
};

/* Why a socket call took the path it took: the index of sb_svc_counters,
 * exported to Go with bpf2go -type (pkg/service/counters.go). */
enum svc_reason {
	SVC_CONNECT = 0,        /* connect() to a frontend translated */
	SVC_SENDMSG = 1,        /* sendmsg() to a frontend translated */
	SVC_RECVMSG = 2,        /* a backend's datagram reported as the frontend's */
	SVC_GETPEERNAME = 3,    /* a peer address reported as the frontend */
	SVC_NO_BACKEND = 4,     /* a frontend without backends: refused */
	SVC_AFFINITY_HIT = 5,   /* sessionAffinity ClientIP: the remembered backend */
	SVC_BACKEND_GONE = 6,   /* a set slot missing (only while a set is rewritten) */
	SVC_REASON_MAX = 8,
};

enum svc_scope {
	SVC_SCOPE_ADDR = 0,     /* ClusterIP, external IP, load-balancer IP */
	SVC_SCOPE_NODEPORT = 1, /* every node address and loopback */
};

enum svc_flags {
	SVC_F_AFFINITY = 1 << 0, /* sessionAffinity: ClientIP (client = network namespace) */
};

struct svc_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 scope;
};

struct svc_frontend {
	__u32 id;               /* stable while the frontend exists: counters, affinity */
	__u32 set;              /* backend set in sb_svc_backends */
	__u16 count;            /* backends in the set; 0 refuses */
	__u16 flags;            /* enum svc_flags */
	__u32 affinity_timeout; /* seconds */
};

struct svc_backend_key {
	__u32 set;
	__u32 slot;
};


struct svc_affinity_key {
	__u64 netns; /* the client's network namespace cookie */
	__u32 id;    /* frontend id */
	__u32 pad;
};

struct svc_affinity {
	__u64 seen;  /* bpf_ktime_get_ns of the last use */
	struct svc_backend backend;
};

struct svc_stat {
	__u64 translated;
	__u64 refused;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, struct svc_key);
	__type(value, struct svc_frontend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_svc_frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__type(key, struct svc_backend_key);
	__type(value, struct svc_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_svc_backends SEC(".maps");

/* The node's own addresses, where NodePorts answer. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __be32);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_svc_node_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct svc_affinity_key);
	__type(value, struct svc_affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_svc_affinity SEC(".maps");

/* Per frontend id (same max as sb_svc_frontends). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 131072);
	__type(key, __u32);
	__type(value, struct svc_stat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SVC_REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_svc_counters SEC(".maps");

/* Frontend id → "namespace/name:port", for `sinabro debug services` only. */
struct svc_name {
	char name[124];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, __u32);
	__type(value, struct svc_name);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_svc_names SEC(".maps");

/* bpf2go -type needs the types used somewhere it can see. */
const enum svc_reason *unused_svc_reason __attribute__((unused));
const enum svc_scope *unused_svc_scope __attribute__((unused));
const enum svc_flags *unused_svc_flags __attribute__((unused));

static __always_inline void count(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&sb_svc_counters, &reason);
	if (c)
		(*c)++;
}

static __always_inline void stat(__u32 id, bool refused)
{
	struct svc_stat *s = bpf_map_lookup_elem(&sb_svc_stats, &id);
	if (!s)
		return;
	if (refused)
		s->refused++;
	else
		s->translated++;
}

static __always_inline bool is_loopback(__be32 addr)
{
	return (bpf_ntohl(addr) >> 24) == 127;
}

static __always_inline struct svc_frontend *lookup_frontend(struct bpf_sock_addr *ctx)
{
	__u8 proto = ctx->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return NULL;
	struct svc_key key = {
		.addr = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
		.proto = proto,
		.scope = SVC_SCOPE_ADDR,
	};
	struct svc_frontend *fe = bpf_map_lookup_elem(&sb_svc_frontends, &key);
	if (fe)
		return fe;
	if (!is_loopback(key.addr) && !bpf_map_lookup_elem(&sb_svc_node_addrs, &key.addr))
		return NULL;
	key.addr = 0;
	key.scope = SVC_SCOPE_NODEPORT;
	return bpf_map_lookup_elem(&sb_svc_frontends, &key);
}

/* pick_backend chooses the backend for one new connection or datagram. */
static __always_inline struct svc_backend *pick_backend(void *ctx, struct svc_frontend *fe,
							struct svc_backend *out)
{
	struct svc_affinity_key akey = {};
	__u64 now = 0;
	if (fe->flags & SVC_F_AFFINITY) {
		akey.netns = bpf_get_netns_cookie(ctx);
		akey.id = fe->id;
		now = bpf_ktime_get_ns();
		struct svc_affinity *a = bpf_map_lookup_elem(&sb_svc_affinity, &akey);
		if (a && now - a->seen < (__u64)fe->affinity_timeout * 1000000000ULL) {
			/* Only while that backend is still in the set. */
			for (__u32 i = 0; i < 256 && i < fe->count; i++) {
				struct svc_backend_key bk = {.set = fe->set, .slot = i};
				struct svc_backend *b = bpf_map_lookup_elem(&sb_svc_backends, &bk);
				if (b && b->addr == a->backend.addr && b->port == a->backend.port) {
					a->seen = now;
					*out = *b;
					count(SVC_AFFINITY_HIT);
					return out;
				}
			}
		}
	}
	struct svc_backend_key bk = {.set = fe->set, .slot = bpf_get_prandom_u32() % fe->count};
	struct svc_backend *b = bpf_map_lookup_elem(&sb_svc_backends, &bk);
	if (!b) {
		count(SVC_BACKEND_GONE);
		return NULL;
	}
	*out = *b;
	if (fe->flags & SVC_F_AFFINITY) {
		struct svc_affinity a = {.seen = now, .backend = *b};
		bpf_map_update_elem(&sb_svc_affinity, &akey, &a, BPF_ANY);
	}
	return out;
}

/* flow_service reports a socket's Service translation (FLOW_SERVICE). */
static __always_inline void flow_service(struct bpf_sock_addr *ctx, const struct svc_backend *from,
					 const struct svc_backend *to, __u64 cookie)
{
	struct flow_event *ev = flow_reserve(FLOW_CLASS_FLOW, FLOW_SERVICE);

	if (!ev)
		return;
	ev->proto = ctx->protocol;
	ev->cookie = cookie;
	ev->daddr = from->addr;
	ev->dport = from->port;
	ev->xdaddr = to->addr;
	ev->xdport = to->port;
	/* No source: connect() binds the socket after this program (the
	 * FLOW_NEW event of the connection's first packet names the pod). */
	flow_submit(ev);
}

/* translate rewrites the destination of ctx when it names a frontend.
 * It returns 0 to refuse the call (no backend), 1 otherwise. */
static __always_inline int translate(struct bpf_sock_addr *ctx, __u32 reason)
{
	struct svc_frontend *fe = lookup_frontend(ctx);
	if (!fe)
		return 1;
	if (fe->count == 0) {
		count(SVC_NO_BACKEND);
		stat(fe->id, true);
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	struct svc_backend b;
	if (!pick_backend(ctx, fe, &b))
		return 1;
	struct svc_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = b.addr,
		.port = b.port,
	};
	struct svc_backend orig = {.addr = ctx->user_ip4, .port = (__be16)ctx->user_port};
	bpf_map_update_elem(&sb_svc_revnat, &rk, &orig, BPF_ANY);
	ctx->user_ip4 = b.addr;
	ctx->user_port = b.port;
	flow_service(ctx, &orig, &b, rk.cookie);
	count(reason);
	stat(fe->id, false);
	return 1;
}

/* reverse reports a backend's address as the frontend the socket used. */
static __always_inline void reverse(struct bpf_sock_addr *ctx, __u32 reason)
{
	struct svc_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct svc_backend *orig = bpf_map_lookup_elem(&sb_svc_revnat, &rk);
	if (!orig)
		return;
	ctx->user_ip4 = orig->addr;
	ctx->user_port = orig->port;
	count(reason);
}

SEC("cgroup/connect4")
int svc_connect4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, SVC_CONNECT);
}

SEC("cgroup/sendmsg4")
int svc_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, SVC_SENDMSG);
}

SEC("cgroup/recvmsg4")
int svc_recvmsg4(struct bpf_sock_addr *ctx)
{
	reverse(ctx, SVC_RECVMSG);
	return 1;
}

SEC("cgroup/getpeername4")
int svc_getpeername4(struct bpf_sock_addr *ctx)
{
	reverse(ctx, SVC_GETPEERNAME);
	return 1;
}
