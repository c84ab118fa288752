// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Terminating connected UDP sockets whose Service backend left
 * (pkg/service TerminateUDP). The socket load balancer (bpf/service.c)
 * picks a backend once, at connect(): a connected UDP socket then sends to
 * that backend for good, even after the backend is removed, where
 * kube-proxy would have cleared the flow's conntrack entry. So, after each
 * update that removes UDP backends, the agent runs this iterator over the
 * UDP sockets of every network namespace of the node: a socket that the
 * load balancer connected (sb_svc_revnat knows its cookie and backend) to
 * a backend in sb_svc_gone for that frontend's port is destroyed with
 * bpf_sock_destroy (Linux >= 6.5): the application's next call gets
 * ECONNABORTED, and its next connect() picks a live backend. Each
 * destroyed socket is written to the iterator's output (struct
 * svc_terminated), which the agent reads and counts.
 *
 * Kernel types are declared with only the fields used, relocated by CO-RE
 * against the running kernel's BTF.
 */
#include "uapi.h"
#include <bpf/bpf_helpers.h>
#include "lib/svc_revnat.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2

struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
} __attribute__((preserve_access_index));

struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

struct udp_sock;

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* A backend that left the frontends on a port (the port the socket
 * connected to: ClusterIP, external IP or NodePort). */
struct svc_gone_key {
	__be32 addr;
	__be16 port;
	__be16 frontend_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct svc_gone_key);
	__type(value, __u8);
} sb_svc_gone SEC(".maps");

struct svc_terminated {
	__u64 cookie;
	struct svc_gone_key gone;
};

SEC("iter/udp")
int svc_udp_terminate(struct bpf_iter__udp *ctx)
{
	struct sock_common *sk = (struct sock_common *)ctx->udp_sk;

	if (!sk || sk->skc_family != AF_INET || !sk->skc_daddr)
		return 0;
	struct svc_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(sk),
		.addr = sk->skc_daddr,
		.port = sk->skc_dport,
	};
	struct svc_backend *fe = bpf_map_lookup_elem(&sb_svc_revnat, &rk);
	if (!fe)
		return 0; /* not connected through a Service */
	struct svc_terminated t = {
		.cookie = rk.cookie,
		.gone = {.addr = rk.addr, .port = rk.port, .frontend_port = fe->port},
	};
	if (!bpf_map_lookup_elem(&sb_svc_gone, &t.gone))
		return 0;
	if (bpf_sock_destroy(sk))
		return 0;
	bpf_seq_write(ctx->meta->seq, &t, sizeof(t));
	return 0;
}
