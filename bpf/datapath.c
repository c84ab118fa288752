// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The sinabro datapath: one object holding every program and map, so they
 * share maps without cross-object plumbing. See lib/masq.h (uplink
 * masquerading) and lib/host.h (host routing on pod veths, also used by
 * masq_ingress to hand replies straight to local pods).
 */
#include "lib/common.h"
#include "lib/host.h"
#include "lib/lb.h"
#include "lib/masq.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Keep the counter enums in the object's BTF (pkg/datapath names counters
 * from them, bpf2go -type exports their values). */
const enum prog_id *unused_prog_id __attribute__((unused));
const enum reason *unused_reason __attribute__((unused));
