/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What the socket load balancer translated, per socket: bpf/service.c
 * writes an entry when it sends a socket to a backend (recvmsg and
 * getpeername read it back); bpf/sockterm.c reads it to find the connected
 * UDP sockets of a backend that left its Service.
 */
#ifndef SINABRO_SVC_REVNAT_H
#define SINABRO_SVC_REVNAT_H

struct svc_backend {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct svc_revnat_key {
	__u64 cookie; /* socket cookie */
	__be32 addr;  /* backend */
	__be16 port;
	__u16 pad;
};

/* Socket and backend → the frontend it stands for. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct svc_revnat_key);
	__type(value, struct svc_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sb_svc_revnat SEC(".maps");

#endif
