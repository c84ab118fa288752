// Package kernel finds out, before the agent needs them, which kernel
// features Sinabro relies on are present, and says what is turned off (or
// fails) without each. The agent logs the list at start; `sinabro debug
// preflight` prints it. Nothing here changes the node for good: probes load
// tiny programs, read BTF and mounts, and try classic tc in a throw-away
// network namespace (without CAP_SYS_ADMIN, on the loopback device of the
// process's namespace, removing what they added).
package kernel

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/service"
)

// Feature is one kernel feature and what its absence means.
type Feature struct {
	Name    string `json:"name"`
	Present bool   `json:"present"`
	// Detail says where it was found, or why it is missing.
	Detail string `json:"detail,omitempty"`
	// Kernel is the first Linux release that has it (mainline).
	Kernel string `json:"kernel"`
	// Without is what Sinabro does when it is missing.
	Without string `json:"without"`
}

const (
	noDatapath = "no eBPF datapath: the agent cannot load it (run it with --masquerade-backend=nftables --host-routing=false)"
	noAccel    = "TCP acceleration off (the node runs unaccelerated)"
)

// Preflight probes every feature. It needs the privileges of the agent
// (bpf(), and CAP_SYS_ADMIN for the classic tc probe's namespace).
func Preflight() []Feature {
	var fs []Feature
	add := func(name, kernel, without string, err error, detail string) {
		f := Feature{Name: name, Present: err == nil, Kernel: kernel, Without: without, Detail: detail}
		if err != nil {
			f.Detail = err.Error()
		}
		fs = append(fs, f)
	}
	add("bpf() with sched_cls programs", "4.1", noDatapath, haveProgramType(ebpf.SchedCLS), "")
	add("LRU hash and LPM trie maps", "4.11", noDatapath,
		errors.Join(haveMapType(ebpf.LRUHash), haveMapType(ebpf.LPMTrie)), "")
	for _, h := range []struct {
		fn     asm.BuiltinFunc
		kernel string
	}{
		{asm.FnFibLookup, "4.18"}, {asm.FnRedirectNeigh, "5.10"}, {asm.FnRedirectPeer, "5.10"},
	} {
		add("helper "+helperName(h.fn), h.kernel, noDatapath+"; its programs call it",
			haveHelper(ebpf.SchedCLS, h.fn), "")
	}

	tcxErr := datapath.HaveTCX()
	add("tcx", "6.6", "programs attach with classic tc (clsact qdisc + direct-action cls_bpf) instead; --tc-attach=auto does this", tcxErr, "")
	without := "none while tcx is present (--tc-attach=classic would fail)"
	if tcxErr != nil {
		without = noDatapath
	}
	add("classic tc (clsact, cls_bpf direct-action)", "4.5", without, datapath.HaveClassicTC(), "")

	_, btfErr := btf.LoadKernelSpec()
	add("kernel BTF (/sys/kernel/btf/vmlinux)", "5.4 with CONFIG_DEBUG_INFO_BTF",
		noAccel+" (its programs read the psock with CO-RE); the conntrack kfuncs cannot be found", btfErr, "")

	cg, cgErr := cgroup.V2Mount()
	add("cgroup v2", "4.5", noAccel+" (sock_ops attaches to a cgroup v2)", cgErr, cg)

	add("sock_ops and sk_msg programs, sockhash maps", "4.20", noAccel,
		errors.Join(haveProgramType(ebpf.SockOps), haveProgramType(ebpf.SkMsg), haveMapType(ebpf.SockHash)), "")

	// The datapath's own check: what it reports is what the agent does.
	where, kfErr := datapath.KernelCTLocation()
	if kfErr == nil {
		where = "in the " + where
	}
	add("kfuncs bpf_skb_ct_lookup, bpf_ct_release (nf_conntrack)", "6.0",
		"with --kube-proxy-coexistence (default): host routing off, so kube-proxy's Service translations are not skipped", kfErr, where)

	add("cgroup connect4, sendmsg4, recvmsg4, getpeername4 programs with bpf_set_retval", "5.18",
		"no Service load balancing at the socket: the agent logs the load error every pass; keep kube-proxy (--kube-proxy-replacement=false)",
		service.Supported(), "")

	add("bpffs on /sys/fs/bpf", "4.4", "the agent mounts one; inside a container that mount does not outlive it, so a restarted agent cannot adopt the datapath", bpffsMounted("/sys/fs/bpf"), "")
	return fs
}

func bpffsMounted(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", path, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("%s is not a bpffs", path)
	}
	return nil
}

func helperName(fn asm.BuiltinFunc) string {
	s := strings.TrimPrefix(fn.String(), "Fn")
	var b strings.Builder
	b.WriteString("bpf")
	for _, r := range s {
		if r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
			r += 'a' - 'A'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// Missing returns the features that are not present.
func Missing(fs []Feature) []Feature {
	var out []Feature
	for _, f := range fs {
		if !f.Present {
			out = append(out, f)
		}
	}
	return out
}
