package kernel

import (
	"errors"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// TestPreflight probes this kernel: every feature has a name, the kernel
// that brought it and a consequence, and on this project's CI kernel (6.18,
// BTF, tcx) everything is present.
func TestPreflight(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the probes load programs")
	}
	fs := Preflight()
	if len(fs) < 10 {
		t.Fatalf("%d features probed, want every one the README lists", len(fs))
	}
	for _, f := range fs {
		t.Logf("%-55s present=%-5v kernel %-10s %s", f.Name, f.Present, f.Kernel, f.Detail)
		if f.Name == "" || f.Kernel == "" || f.Without == "" {
			t.Errorf("incomplete feature %+v", f)
		}
	}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err == nil {
		if m := Missing(fs); len(m) > 0 {
			t.Errorf("missing on a kernel with BTF: %+v", m)
		}
	}
}

// TestProbesSayMissing checks that the probes tell a missing feature from
// a present one: a helper socket filters may not call, a map type this
// kernel has no such thing as.
func TestProbesSayMissing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the probes load programs")
	}
	if err := haveHelper(ebpf.SocketFilter, asm.FnRedirectPeer); !errors.Is(err, ebpf.ErrNotSupported) {
		t.Errorf("bpf_redirect_peer from a socket filter: %v, want ErrNotSupported", err)
	}
	if err := haveHelper(ebpf.SchedCLS, asm.FnRedirectPeer); err != nil {
		t.Errorf("bpf_redirect_peer from sched_cls: %v, want present", err)
	}
	if err := haveMapType(ebpf.MapType(4242)); err == nil {
		t.Error("map type 4242 reported present")
	}
}
