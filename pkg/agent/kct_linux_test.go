package agent

import (
	"errors"
	"log/slog"
	"testing"

	"k8s.io/client-go/kubernetes/fake"
)

// TestHostRoutingWaitsForKernelCT: where the kernel's conntrack kfuncs are
// missing at start (nf_conntrack, a module on distribution kernels, not
// loaded yet), kube-proxy coexistence turns host routing off, and the agent
// asks to be restarted as soon as they appear, so host routing does not
// stay off until someone restarts it by hand.
func TestHostRoutingWaitsForKernelCT(t *testing.T) {
	probe := errors.New("no kfuncs")
	saved := kernelCTAvailable
	kernelCTAvailable = func() error { return probe }
	t.Cleanup(func() { kernelCTAvailable = saved })

	for _, coexist := range []bool{true, false} {
		cfg := Config{NodeName: "a", BPFRoot: "/sys/fs/bpf/unused", HostRouting: true, KubeProxyCoexistence: coexist, KubeProxyReplacement: KPRFalse}
		a, err := New(cfg, clientsetCluster{fake.NewClientset()}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		if a.cfg.HostRouting == coexist || a.hostRoutingWaitsForKCT != coexist {
			t.Errorf("coexistence %v, kfuncs missing: host routing %v, waits %v; want %v, %v", coexist, a.cfg.HostRouting, a.hostRoutingWaitsForKCT, !coexist, coexist)
		}
		if a.restartWanted() {
			t.Errorf("coexistence %v: restart wanted while the kfuncs are still missing", coexist)
		}
		probe = nil
		if got := a.restartWanted(); got != coexist {
			t.Errorf("coexistence %v: restart wanted = %v once the kfuncs appeared, want %v", coexist, got, coexist)
		}
		probe = errors.New("no kfuncs")
	}
}
