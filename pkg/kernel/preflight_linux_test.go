package kernel

import (
	"os"
	"testing"
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
