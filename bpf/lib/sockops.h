/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Kernel UAPI definitions used by sockops.c only (contexts of sock_ops and
 * sk_msg programs, socket map types), written out like include/uapi.h so the
 * object depends on clang and this tree alone. Layouts are those of
 * include/uapi/linux/bpf.h; trailing fields we do not read are left out.
 */
#ifndef SINABRO_SOCKOPS_H
#define SINABRO_SOCKOPS_H

#include "uapi.h"

#define BPF_MAP_TYPE_SOCKHASH 18

#define AF_INET6 10

/* sk_msg / sk_skb verdicts */
#define SK_DROP 0
#define SK_PASS 1

/* enum bpf_sock_ops op values (uapi) */
#define BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB 4
#define BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB 5
#define BPF_SOCK_OPS_STATE_CB 10
#define BPF_SOCK_OPS_RTT_CB 12
#define BPF_SOCK_OPS_PARSE_HDR_OPT_CB 13

/* bpf_sock_ops_cb_flags */
#define BPF_SOCK_OPS_STATE_CB_FLAG (1 << 2)
#define BPF_SOCK_OPS_RTT_CB_FLAG (1 << 3)
#define BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG (1 << 4)

/* BPF_TCP_* states */
#define BPF_TCP_CLOSE 7

struct bpf_sock_ops {
	__u32 op;
	union {
		__u32 args[4];
		__u32 reply;
		__u32 replylong[4];
	};
	__u32 family;
	__u32 remote_ip4;  /* network byte order */
	__u32 local_ip4;   /* network byte order */
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port; /* network byte order, in the upper 16 bits */
	__u32 local_port;  /* host byte order */
	__u32 is_fullsock;
	__u32 snd_cwnd;
	__u32 srtt_us;
	__u32 bpf_sock_ops_cb_flags;
	__u32 state;
	__u32 rtt_min;
	__u32 snd_ssthresh;
	__u32 rcv_nxt;
	__u32 snd_nxt;
	__u32 snd_una;
	__u32 mss_cache;
	__u32 ecn_flags;
	__u32 rate_delivered;
	__u32 rate_interval_us;
	__u32 packets_out;
	__u32 retrans_out;
	__u32 total_retrans;
	__u32 segs_in;
	__u32 data_segs_in;
	__u32 segs_out;
	__u32 data_segs_out;
	__u32 lost_out;
	__u32 sacked_out;
	__u32 sk_txhash;
	__u64 bytes_received;
	__u64 bytes_acked;
	__bpf_md_ptr(struct bpf_sock *, sk);
};

struct sk_msg_md {
	__bpf_md_ptr(void *, data);
	__bpf_md_ptr(void *, data_end);
	__u32 family;
	__u32 remote_ip4;  /* network byte order */
	__u32 local_ip4;   /* network byte order */
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port; /* network byte order, in the upper 16 bits */
	__u32 local_port;  /* host byte order */
	__u32 size;        /* bytes of this message */
	__bpf_md_ptr(struct bpf_sock *, sk);
};

#endif
