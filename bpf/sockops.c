// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Same-node TCP acceleration. sock_ops (on the node's pod cgroup) puts
 * established IPv4 sockets whose both ends are local pods in sb_sock_hash,
 * keyed by their 4-tuple; sk_msg (attached to that sockhash) hands each
 * send straight to the peer socket's receive queue with
 * bpf_msg_redirect_hash(BPF_F_INGRESS), skipping TCP/IP and the veths.
 *
 * Ordering rule: the receiver reads redirected data (its psock queue)
 * before anything that came through the TCP stack. So a socket must never
 * redirect after it has sent anything the normal way, or new data would
 * overtake old. Each socket's direction therefore moves one way only:
 * UNDECIDED -> REDIRECT -> PASS, or UNDECIDED -> PASS, kept per connection
 * in sb_sock_conns (both sides in one entry, so each side can see and
 * atomically change the other's).
 *
 * Kernel behaviour this relies on (checked on 6.18): a TCP socket stays in
 * the sockhash until close(), even past TCP_CLOSE; taking a socket out of
 * the sockhash drops data redirected to it and not read yet; redirected
 * data has no flow control; splice(2) reads do not see redirected data;
 * a socket's unread redirected data is its psock's ingress_msg list (read
 * through BTF: sk_user_data points to the psock); a redirect queues the
 * data at the peer after the sk_msg program returned, with the sender's
 * socket lock released, but inside the sender's tcp_bpf_sendmsg(), which
 * holds a reference on the sender's psock from start to end (as each
 * recvmsg does, and each sockhash the socket is in).
 */
#include "lib/sockops.h"
#include "lib/flow.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual BSD/GPL";

/* Kernel-internal structures, read through BTF with CO-RE relocations
 * (offsets come from the running kernel's BTF at load time): only to see
 * whether a socket still holds redirected data it has not read, and
 * whether any send, receive or redirect is in progress on it. */
struct list_head {
	struct list_head *next, *prev;
} __attribute__((preserve_access_index));

struct sock {
	void *sk_user_data;
} __attribute__((preserve_access_index));

typedef struct {
	int counter;
} atomic_t;

struct refcount_struct {
	atomic_t refs;
} __attribute__((preserve_access_index));

struct sk_psock {
	struct list_head ingress_msg; /* redirected data not read yet */
	struct refcount_struct refcnt; /* one per sockhash, per send/recvmsg in progress */
} __attribute__((preserve_access_index));

/* Tag bits of sk_user_data (include/net/sock.h). */
#define SK_USER_DATA_PTRMASK (~7UL)

struct sock_key {
	__be32 sip; /* this socket's address */
	__be32 dip; /* the peer's address */
	__be16 sport;
	__be16 dport;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_sock_hash SEC(".maps");

/* Local pod addresses or prefixes, filled by the agent. */
struct pod_key {
	__u32 prefixlen;
	__be32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct pod_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_sock_pods SEC(".maps");

/* The send path of one direction of a connection. */
enum sock_mode {
	MODE_UNDECIDED = 0,  /* nothing sent yet */
	MODE_REDIRECT = 1,   /* every send so far was redirected */
	MODE_PASS = 2,       /* TCP for good, nothing ever redirected */
	MODE_PASS_AFTER = 3, /* TCP for good, after redirecting */
};

/* Whether a socket may leave the sockhash. A socket in the sockhash sends
 * through tcp_bpf even when its sends pass (bulk streams lose about a
 * third of their throughput), but leaving it drops whatever was
 * redirected to it and not read yet. So a PASS socket leaves only when its
 * peer will never redirect again and nothing the peer redirected is left
 * unread: at once if the peer never redirected (the peer is made PASS
 * atomically, racing the peer's own first send), otherwise after the peer
 * is made PASS_AFTER (TCP for good too: a download that outgrew the
 * window) and this socket's queue of redirected data is seen empty with
 * no redirect of the peer in progress (quiet, below). sk_msg cannot
 * delete from a sockhash: it marks the socket, and sock_ops deletes it at
 * a later callback (an ACK's RTT sample, a received packet). */
#define EVICT_CB_FLAGS \
	(BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)

enum evict_state {
	EVICT_UNKNOWN = 0,
	EVICT_PENDING = 1, /* delete at the next callback */
	EVICT_DRAIN = 2,   /* delete once the redirected data is read */
	EVICT_DONE = 3,
};

/* Shared state of a connection, keyed by its tuple in canonical order
 * (lower address:port first); side 0 is the socket whose local end is
 * the lower one. */
struct conn_state {
	__u32 mode[2];
	__u32 evict[2];
	/* Bytes each side redirected since the other side last sent. */
	__u64 unanswered[2];
	/* Set once a side on TCP for good was seen with no send in progress:
	 * every redirect it made is queued at the peer by then, and it makes
	 * no new ones. A redirect runs inside the sender's sendmsg, which
	 * holds a psock reference throughout, so "no send in progress" is
	 * the psock's reference count being what the sockhash (and the
	 * program's own sendmsg) hold. See EVICT_DRAIN and note_quiet. */
	__u32 quiet[2];
	/* sock_cfg's policy_epoch when the connection was established. */
	__u32 epoch;
	__u32 pad;
	/* Bytes both sides redirected: reported when the connection closes
	 * (FLOW_ACCEL_END), since they never cross tc. */
	__u64 redirected;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, struct conn_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_sock_conns SEC(".maps");

/* Runtime settings, written by the agent. Keep in step with config in
 * pkg/sockmap. */
struct sock_cfg {
	__u32 enabled;       /* 0: every socket moves to PASS at its next send */
	__u32 msg_threshold; /* a send of at least this many bytes moves to PASS (0: none) */
	__u64 window;        /* unanswered redirected bytes that move to PASS (0: unlimited) */
	/* Moved by the agent when a NetworkPolicy change may deny flows that
	 * exist: connections established before move to PASS (TCP for good)
	 * at their next send, so their bytes cross tc, where policy decides. */
	__u32 policy_epoch;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sock_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_sock_cfg SEC(".maps");

/* Counter ids; keep in step with pkg/sockmap/counters.go. */
enum sock_counter {
	CNT_REDIRECT = 0,          /* message redirected to the peer */
	CNT_PASS = 1,              /* message of a PASS socket */
	CNT_FALLBACK_NO_PEER = 2,  /* first send found no peer: PASS */
	CNT_FALLBACK_BULK = 3,     /* send over the threshold or window: PASS */
	CNT_FALLBACK_DISABLED = 4, /* acceleration disabled: PASS */
	CNT_FALLBACK_PEER_GONE = 5,/* the peer left the map (closed): PASS */
	CNT_PASS_NO_STATE = 6,     /* socket without connection state: pass */
	CNT_SOCK_ADDED = 7,        /* socket put in the sockhash */
	CNT_SOCK_SKIPPED = 8,      /* established socket not between local pods */
	CNT_SOCK_ADD_FAILED = 9,   /* sockhash or state map refused the socket */
	CNT_SOCK_CLOSED = 10,      /* accelerated socket reached TCP_CLOSE */
	CNT_SOCK_EVICTED = 11,     /* PASS socket taken out of the sockhash */
	CNT_SOCK_DRAINED = 12,     /* of which after reading its peer's redirected data */
	CNT_FALLBACK_POLICY = 13,  /* NetworkPolicy changed since the connection was established: PASS */
	CNT_MAX = 16,
};

/* In the object's BTF for pkg/sockmap, which names the counters from it
 * (CNT_FALLBACK_BULK is the send result "fallback_bulk", CNT_SOCK_ADDED
 * the socket event "added"). */
const enum sock_counter *unused_sock_counter __attribute__((unused));

struct counter {
	__u64 packets; /* messages or sockets */
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_sock_counters SEC(".maps");

static __always_inline void count(__u32 id, __u64 bytes)
{
	struct counter *c = bpf_map_lookup_elem(&sb_sock_counters, &id);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline struct sock_cfg *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&sb_sock_cfg, &zero);
}

static __always_inline bool is_local_pod(__be32 addr)
{
	struct pod_key k = { .prefixlen = 32, .addr = addr };

	__u8 *member = bpf_map_lookup_elem(&sb_sock_pods, &k);

	/* 1: inside a pod prefix; 0: a /32 excluded from it (a pod that opted
	 * out, e.g. one reading sockets with splice). */
	return member && *member;
}

/* conn_key puts a socket's tuple in canonical order and returns its side. */
static __always_inline __u32 conn_key(const struct sock_key *k, struct sock_key *c)
{
	__u32 l = bpf_ntohl(k->sip), r = bpf_ntohl(k->dip);
	__u16 lp = bpf_ntohs(k->sport), rp = bpf_ntohs(k->dport);

	if (l < r || (l == r && lp < rp)) {
		*c = *k;
		return 0;
	}
	c->sip = k->dip;
	c->dip = k->sip;
	c->sport = k->dport;
	c->dport = k->sport;
	return 1;
}

/* A dual-stack listener (Go's net.Listen("tcp", ":80"), most servers)
 * accepts IPv4 clients on AF_INET6 sockets with IPv4-mapped addresses
 * (::ffff:a.b.c.d): those are IPv4 connections too, keyed by the IPv4
 * address in the last word. */
static __always_inline bool v4mapped(const __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff);
}

static __always_inline void sock_ops_key(struct bpf_sock_ops *skops, struct sock_key *k)
{
	/* Every field is read at its fixed offset (volatile), then chosen: the
	 * verifier refuses a context access at a computed offset, which is
	 * what the compiler otherwise makes of the choice. */
	__u32 l4 = *(volatile __u32 *)&skops->local_ip4, r4 = *(volatile __u32 *)&skops->remote_ip4;
	__u32 l6 = *(volatile __u32 *)&skops->local_ip6[3], r6 = *(volatile __u32 *)&skops->remote_ip6[3];
	bool mapped = skops->family == AF_INET6;

	k->sip = mapped ? l6 : l4;
	k->dip = mapped ? r6 : r4;
	k->sport = bpf_htons((__u16)skops->local_port);
	k->dport = (__be16)(skops->remote_port >> 16);
}

static __always_inline int established(struct bpf_sock_ops *skops)
{
	struct conn_state zero = {}, *cs;
	struct sock_key key = {}, ck;
	struct sock_cfg *cfg;

	cfg = config();
	if (!cfg || !cfg->enabled)
		return 1;
	if (skops->family == AF_INET6) {
		__u32 l6[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2], skops->local_ip6[3] };
		__u32 r6[4] = { skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2], skops->remote_ip6[3] };

		if (!v4mapped(l6) || !v4mapped(r6))
			return 1;
	} else if (skops->family != AF_INET) {
		return 1;
	}
	sock_ops_key(skops, &key);
	/* Both ends must be local pods; a pod talking to itself (same
	 * address) keeps its loopback-like path. */
	if (key.sip == key.dip || !is_local_pod(key.sip) || !is_local_pod(key.dip)) {
		count(CNT_SOCK_SKIPPED, 0);
		return 1;
	}
	conn_key(&key, &ck);
	zero.epoch = cfg->policy_epoch;
	/* The first end to establish creates the state, the second joins. */
	bpf_map_update_elem(&sb_sock_conns, &ck, &zero, BPF_NOEXIST);
	cs = bpf_map_lookup_elem(&sb_sock_conns, &ck);
	if (!cs) {
		count(CNT_SOCK_ADD_FAILED, 0);
		return 1;
	}
	if (bpf_sock_hash_update(skops, &sb_sock_hash, &key, BPF_ANY) != 0) {
		count(CNT_SOCK_ADD_FAILED, 0);
		return 1;
	}
	/* STATE: count closes and drop the connection state. RTT and
	 * PARSE_ALL_HDR_OPT: a callback per ACK and per received packet, to
	 * carry out evictions on the sending and on the receiving side. An
	 * accelerated connection sees hardly any packets (its data does not
	 * travel as packets); once a side is decided they stop. */
	bpf_sock_ops_cb_flags_set(skops, EVICT_CB_FLAGS);
	count(CNT_SOCK_ADDED, 0);
	return 1;
}

/* psock_of reads the socket's psock (sk_user_data) through BTF into
 * *psock (0: none). False if it cannot be read. */
static __always_inline bool psock_of(struct bpf_sock *bs, unsigned long *psock)
{
	struct sock *sk;
	void *ud;

	if (!bs)
		return false;
	sk = (struct sock *)bpf_skc_to_tcp_sock(bs);
	if (!sk)
		return false;
	if (bpf_probe_read_kernel(&ud, sizeof(ud), &sk->sk_user_data))
		return false;
	*psock = (unsigned long)ud & SK_USER_DATA_PTRMASK;
	return true;
}

/* ingress_empty reports whether the socket's psock holds no redirected
 * data waiting to be read. Unsure (no BTF access, no psock) means no. */
static __always_inline bool ingress_empty(struct bpf_sock *bs)
{
	unsigned long psock = 0;
	struct list_head head;

	if (!psock_of(bs, &psock) || !psock)
		return false;
	if (bpf_probe_read_kernel(&head, sizeof(head), &((struct sk_psock *)psock)->ingress_msg))
		return false;
	return head.next == &((struct sk_psock *)psock)->ingress_msg;
}

/* psock_refs is the socket's psock reference count: 0 without a psock
 * (it left the sockhash and every holder let go), -1 if unreadable. */
static __always_inline int psock_refs(struct bpf_sock *bs)
{
	unsigned long psock = 0;
	int refs;

	if (!psock_of(bs, &psock))
		return -1;
	if (!psock)
		return 0;
	if (bpf_probe_read_kernel(&refs, sizeof(refs), &((struct sk_psock *)psock)->refcnt.refs.counter))
		return -1;
	return refs;
}

/* note_quiet sets quiet[side] once the side is on TCP for good and, if it
 * ever redirected, its psock holds no more references than the sockhash
 * (none once evicted) plus own_send (the sendmsg an sk_msg program runs
 * in), or there is no psock at all. The mode is read first: a redirect
 * decided before it changed is queued already or inside a sendmsg that
 * still holds its reference. Both callers run under the socket's lock,
 * as evictions do, so evict[side] tells whether the sockhash holds one
 * (a close() racing another thread's send could mislead it; the kernel
 * takes a closed socket out of the sockhash itself). */
static __always_inline void note_quiet(struct conn_state *cs, __u32 side, struct bpf_sock *bs, int own_send)
{
	__u32 mode;
	int refs;

	side &= 1;
	mode = cs->mode[side];
	if (cs->quiet[side] || (mode != MODE_PASS && mode != MODE_PASS_AFTER))
		return;
	if (mode == MODE_PASS_AFTER) {
		refs = psock_refs(bs);
		if (refs < 0)
			return;
		if (refs && refs != (cs->evict[side] == EVICT_DONE ? 0 : 1) + own_send)
			return;
	}
	__sync_val_compare_and_swap(&cs->quiet[side], 0, 1);
}

/* maybe_evict takes a socket decided to leave the sockhash out of it, at
 * once (PENDING) or once its queue is read and its peer quiet (DRAIN). */
static __always_inline void maybe_evict(struct conn_state *cs, __u32 side, struct bpf_sock_ops *skops,
					struct sock_key *key)
{
	side &= 1;
	switch (cs->evict[side]) {
	case EVICT_PENDING:
		break;
	case EVICT_DRAIN:
		/* The atomic read orders the queue read after it. */
		if (!__sync_fetch_and_add(&cs->quiet[side ^ 1], 0) || !ingress_empty(skops->sk))
			return;
		count(CNT_SOCK_DRAINED, 0);
		break;
	default:
		return;
	}
	cs->evict[side] = EVICT_DONE;
	if (bpf_map_delete_elem(&sb_sock_hash, key) == 0)
		count(CNT_SOCK_EVICTED, 0);
}

/* accel_end reports an accelerated connection's close (the first of its
 * sockets to close; the second finds its state gone). */
static __always_inline void accel_end(struct bpf_sock_ops *skops, const struct sock_key *key, __u64 bytes)
{
	struct flow_event *ev = flow_reserve(FLOW_CLASS_FLOW, FLOW_ACCEL_END);

	if (!ev)
		return;
	ev->proto = IPPROTO_TCP;
	ev->saddr = key->sip;
	ev->daddr = key->dip;
	ev->sport = key->sport;
	ev->dport = key->dport;
	ev->bytes = bytes;
	ev->cookie = bpf_get_socket_cookie(skops);
	flow_submit(ev);
}

SEC("sockops")
int sock_ops(struct bpf_sock_ops *skops)
{
	struct sock_key key = {}, ck;
	struct conn_state *cs;
	__u32 side;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		return established(skops);
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			return 1;
		/* No sockhash delete here: a half-closer reaches TCP_CLOSE
		 * (TIME_WAIT) while its owner still reads, and leaving the
		 * sockhash would drop redirected data it has not read. The
		 * kernel removes the socket when it is closed. Both ends have
		 * sent their FIN by now: neither sends again. */
		sock_ops_key(skops, &key);
		conn_key(&key, &ck);
		cs = bpf_map_lookup_elem(&sb_sock_conns, &ck);
		if (cs && cs->redirected)
			accel_end(skops, &key, cs->redirected);
		bpf_map_delete_elem(&sb_sock_conns, &ck);
		count(CNT_SOCK_CLOSED, 0);
		return 1;
	case BPF_SOCK_OPS_RTT_CB:
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		sock_ops_key(skops, &key);
		side = conn_key(&key, &ck) & 1;
		cs = bpf_map_lookup_elem(&sb_sock_conns, &ck);
		if (!cs) {
			/* State gone (closing): no more callbacks per packet. */
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
			return 1;
		}
		maybe_evict(cs, side, skops, &key);
		/* The peer may be waiting for this side to be quiet. */
		note_quiet(cs, side, skops->sk, 0);
		if (cs->evict[side] == EVICT_DONE && cs->quiet[side])
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	return 1;
}

/* try_evict decides once how a PASS socket leaves the sockhash: at once if
 * its peer never redirected to it (and now never will), or once it has
 * read what the peer redirected, the peer being moved to TCP for good. */
static __always_inline void try_evict(struct conn_state *cs, __u32 side)
{
	__u32 peer = (side ^ 1) & 1, pm;

	side &= 1;
	if (cs->evict[side] != EVICT_UNKNOWN)
		return;
	pm = __sync_val_compare_and_swap(&cs->mode[peer], MODE_UNDECIDED, MODE_PASS);
	if (pm == MODE_UNDECIDED || pm == MODE_PASS) {
		cs->evict[side] = EVICT_PENDING;
	} else {
		if (pm == MODE_REDIRECT)
			__sync_val_compare_and_swap(&cs->mode[peer], MODE_REDIRECT, MODE_PASS_AFTER);
		cs->evict[side] = EVICT_DRAIN;
	}
	/* Both sides are on TCP for good now: the peer leaves too, once it
	 * has read what we redirected to it (a one-way stream's receiver, a
	 * download's client), which its received packets' callbacks see. */
	__sync_val_compare_and_swap(&cs->evict[peer], EVICT_UNKNOWN, EVICT_DRAIN);
}

static __always_inline void to_pass(struct conn_state *cs, __u32 side, __u32 mode, __u32 why, __u64 size)
{
	cs->mode[side & 1] = mode == MODE_UNDECIDED ? MODE_PASS : MODE_PASS_AFTER;
	count(why, size);
	try_evict(cs, side);
}

/* redirect sends the message of a side not yet on TCP for good (mode
 * UNDECIDED or REDIRECT): to the peer socket (true), or through TCP (for
 * good) when it should or must. */
static __always_inline bool redirect(struct sk_msg_md *msg, struct conn_state *cs, __u32 side, __u32 mode,
				    const struct sock_key *self, __u64 size)
{
	struct sock_key peer = {};
	struct sock_cfg *cfg;

	cfg = config();
	if (!cfg || !cfg->enabled) {
		to_pass(cs, side, mode, CNT_FALLBACK_DISABLED, size);
		return false;
	}
	if (cs->epoch != cfg->policy_epoch) {
		to_pass(cs, side, mode, CNT_FALLBACK_POLICY, size);
		return false;
	}
	/* Redirected data has no flow control: it queues at the peer however
	 * slowly the peer reads. TCP's window bounds that; ours is the bytes
	 * sent since the peer last sent anything (request/response flows
	 * never reach it, a one-way stream or a stalled reader does). Past
	 * it, or for a send over the size threshold, TCP for good. */
	if ((cfg->msg_threshold && size >= cfg->msg_threshold) ||
	    (cfg->window && cs->unanswered[side] + size > cfg->window)) {
		to_pass(cs, side, mode, CNT_FALLBACK_BULK, size);
		return false;
	}
	/* Claim REDIRECT before redirecting: the peer may be making us PASS
	 * right now to leave the sockhash itself. */
	if (mode == MODE_UNDECIDED &&
	    __sync_val_compare_and_swap(&cs->mode[side], MODE_UNDECIDED, MODE_REDIRECT) != MODE_UNDECIDED) {
		count(CNT_PASS, size);
		try_evict(cs, side);
		return false;
	}

	peer.sip = self->dip;
	peer.dip = self->sip;
	peer.sport = self->dport;
	peer.dport = self->sport;
	if (bpf_msg_redirect_hash(msg, &sb_sock_hash, &peer, BPF_F_INGRESS) != SK_PASS) {
		/* No peer socket: not ours, not yet added, or closed. Once
		 * anything went through TCP we may never redirect again. */
		if (mode == MODE_UNDECIDED)
			to_pass(cs, side, MODE_UNDECIDED, CNT_FALLBACK_NO_PEER, size);
		else
			to_pass(cs, side, MODE_REDIRECT, CNT_FALLBACK_PEER_GONE, size);
		return false;
	}
	cs->unanswered[side] += size;
	__sync_fetch_and_add(&cs->redirected, size);
	count(CNT_REDIRECT, size);
	return true;
}

SEC("sk_msg")
int sock_redirect(struct sk_msg_md *msg)
{
	struct sock_key self = {}, ck;
	__u64 size = msg->size;
	struct conn_state *cs;
	__u32 side, mode;

	{
		/* Fixed-offset reads, then a choice (see sock_ops_key). */
		__u32 l4 = *(volatile __u32 *)&msg->local_ip4, r4 = *(volatile __u32 *)&msg->remote_ip4;
		__u32 l6 = *(volatile __u32 *)&msg->local_ip6[3], r6 = *(volatile __u32 *)&msg->remote_ip6[3];
		bool mapped = msg->family == AF_INET6;

		self.sip = mapped ? l6 : l4;
		self.dip = mapped ? r6 : r4;
	}
	self.sport = bpf_htons((__u16)msg->local_port);
	self.dport = (__be16)(msg->remote_port >> 16);
	side = conn_key(&self, &ck) & 1;
	cs = bpf_map_lookup_elem(&sb_sock_conns, &ck);
	if (!cs) {
		count(CNT_PASS_NO_STATE, size);
		return SK_PASS;
	}
	/* We are sending: the peer's redirected data is being answered. */
	cs->unanswered[(side ^ 1) & 1] = 0;
	mode = cs->mode[side];
	if (mode == MODE_PASS || mode == MODE_PASS_AFTER) {
		count(CNT_PASS, size);
		try_evict(cs, side);
		note_quiet(cs, side, msg->sk, 1);
		return SK_PASS;
	}
	if (!redirect(msg, cs, side, mode, &self, size))
		note_quiet(cs, side, msg->sk, 1);
	return SK_PASS;
}
