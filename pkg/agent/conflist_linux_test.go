package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestConfListWithheldUntilDatapathLoads: while the eBPF datapath cannot
// be loaded (its bpffs root is taken by a pinned map, not a directory), the
// Node has pod CIDRs but the agent writes no conflist — so CNI STATUS fails
// and no pod starts. Once the obstacle is gone, the next pass loads the
// datapath and writes it.
func TestConfListWithheldUntilDatapathLoads(t *testing.T) {
	nodeNS := testNS(t, "withheld")
	ipcmd(t, nodeNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	ipcmd(t, nodeNS, "addr", "add", "192.168.71.1/24", "dev", "eth0")
	ipcmd(t, nodeNS, "link", "set", "eth0", "up")
	ipcmd(t, nodeNS, "link", "set", "eth1", "up")
	ipcmd(t, nodeNS, "link", "set", "lo", "up")

	if err := bpffs.Ensure("/sys/fs/bpf"); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("sinabro-agent-test-%d-%s", os.Getpid(), rand.Text()[:6]))
	blocker, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close()
	if err := blocker.Pin(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if fi, err := os.Stat(root); err == nil && !fi.IsDir() {
			os.Remove(root) // still the blocker
			return
		}
		if err := datapath.Cleanup(root); err != nil {
			t.Errorf("cleanup %s: %v", root, err)
		}
	})

	confDir := t.TempDir()
	// A conflist from before a reboot: pods could start before the datapath
	// is back, so the agent must take it back.
	if err := os.WriteFile(filepath.Join(confDir, cni.ConfListName), []byte(`{"cniVersion":"1.0.0","name":"sinabro","plugins":[{"type":"sinabro"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		NodeName: "a", CNIConfDir: confDir, StateDir: "/var/lib/sinabro-test", BPFRoot: root, KubeProxyReplacement: KPRFalse,
		VXLANVNI: 1, VXLANPort: 8472, VXLANDevice: "sinabro.vxlan",
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		Masquerade:   true, MasqueradeBackend: BackendEBPF, HostRouting: true,
		ResyncInterval: time.Second, NetNS: netns.Path(nodeNS),
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a, err := New(cfg, clientsetCluster{fake.NewClientset(testNode("a", "192.168.71.1", "10.244.1.0/24"))}, log)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		a.Close()
	})

	conflist := filepath.Join(confDir, cni.ConfListName)
	eventually(t, "two failed passes", func() bool {
		return metricValue(t, a, "sinabro_agent_reconciles_total", map[string]string{"result": "error"}) >= 2
	})
	if _, err := os.Stat(conflist); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("conflist written although the datapath could not load (stat: %v)", err)
	}
	if a.Ready() {
		t.Error("agent ready without its datapath")
	}

	if err := os.Remove(root); err != nil {
		t.Fatalf("unpin the blocker: %v", err)
	}
	eventually(t, "agent ready", a.Ready)
	if _, err := os.Stat(conflist); err != nil {
		t.Fatalf("conflist after the datapath loaded: %v", err)
	}
}
