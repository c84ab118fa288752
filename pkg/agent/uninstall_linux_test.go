package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestUninstall builds, in a network namespace, what the agent and the
// plugin leave on a node — the eBPF datapath on the uplink and a pod's host
// veth (tcx or classic tc), the vxlan device with an overlay route, a pod
// veth with its route, the conflist, the plugin and state — and checks that
// Uninstall removes all of it, twice in a row.
func TestUninstall(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and eBPF")
	}
	for _, mode := range []datapath.AttachMode{datapath.AttachTCX, datapath.AttachClassic} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == datapath.AttachTCX && datapath.HaveTCX() != nil {
				t.Skip("kernel without tcx")
			}
			testUninstall(t, mode)
		})
	}
}

func testUninstall(t *testing.T, mode datapath.AttachMode) {
	name := fmt.Sprintf("sbun%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	ns, err := netns.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Delete(name) })
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	ip("link", "add", "uplink0", "type", "veth", "peer", "name", "peer0")
	ip("addr", "add", "192.168.77.1/24", "dev", "uplink0")
	ip("link", "set", "uplink0", "up")
	const hostVeth = "sb0123456789a"
	ip("link", "add", hostVeth, "type", "veth", "peer", "name", "podeth0")
	ip("link", "set", hostVeth, "alias", "sinabro:cid/eth0")
	ip("link", "set", hostVeth, "up")
	ip("route", "add", "10.244.1.5/32", "dev", hostVeth, "proto", "200")
	ip("link", "add", DefaultVXLANDevice, "type", "vxlan", "id", "1", "dstport", "8472", "dev", "uplink0")
	ip("link", "set", DefaultVXLANDevice, "up")
	ip("route", "add", "10.244.2.0/24", "via", "10.244.2.0", "dev", DefaultVXLANDevice, "onlink", "proto", "201")

	root := filepath.Join("/sys/fs/bpf", name)
	t.Cleanup(func() { os.RemoveAll(root) })
	err = netns.Do(ns, func() error {
		up, err := net.InterfaceByName("uplink0")
		if err != nil {
			return err
		}
		veth, err := net.InterfaceByName(hostVeth)
		if err != nil {
			return err
		}
		d, err := datapath.Load(context.Background(), datapath.Config{
			BPFRoot: root, UplinkIfindex: up.Index, NodeIP: netip.MustParseAddr("192.168.77.1"),
			ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}, CTSize: 1024, Attach: mode,
		})
		if err != nil {
			return err
		}
		defer d.Close()
		return d.AttachHostVeth(veth.Index)
	})
	if err != nil {
		t.Fatalf("load datapath: %v", err)
	}
	dir := t.TempDir()
	cfg := UninstallConfig{
		BPFRoot: root, VXLANDevice: DefaultVXLANDevice,
		CNIBinDir: filepath.Join(dir, "bin"), CNIConfDir: filepath.Join(dir, "net.d"), StateDir: filepath.Join(dir, "state"),
	}
	for _, f := range []string{filepath.Join(cfg.CNIBinDir, cni.DefaultBinName), filepath.Join(cfg.CNIConfDir, cni.ConfListName),
		filepath.Join(cfg.StateDir, "ipam", "sinabro", "10.244.1.5")} {
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Someone else's file in the conf dir stays.
	other := filepath.Join(cfg.CNIConfDir, "05-other.conflist")
	if err := os.WriteFile(other, []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := nodeLeftovers(t, name, cfg); len(got) < 6 {
		t.Fatalf("before uninstall, the probes see only %v", got)
	}

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	for i := range 2 { // idempotent
		if err := netns.Do(ns, func() error { return Uninstall(context.Background(), cfg, log) }); err != nil {
			t.Fatalf("uninstall #%d: %v", i+1, err)
		}
		if got := nodeLeftovers(t, name, cfg); len(got) > 0 {
			t.Errorf("left after uninstall #%d:\n  %s", i+1, strings.Join(got, "\n  "))
		}
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("another plugin's conflist went too: %v", err)
	}
}

// nodeLeftovers lists what of Sinabro's the namespace and dirs still hold.
func nodeLeftovers(t *testing.T, ns string, cfg UninstallConfig) []string {
	t.Helper()
	var out []string
	run := func(name string, args ...string) string {
		b, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, b)
		}
		return strings.TrimSpace(string(b))
	}
	links := run("ip", "-n", ns, "-o", "link", "show")
	for _, l := range strings.Split(links, "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		dev, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if dev == DefaultVXLANDevice || strings.HasPrefix(dev, "sb") {
			out = append(out, "link "+dev)
		}
		for _, dir := range []string{"ingress", "egress"} {
			if s := run("tc", "-n", ns, "filter", "show", "dev", dev, dir); s != "" {
				out = append(out, fmt.Sprintf("tc %s on %s: %s", dir, dev, s))
			}
		}
		if s := run("tc", "-n", ns, "qdisc", "show", "dev", dev); strings.Contains(s, "clsact") {
			out = append(out, "clsact on "+dev)
		}
	}
	err := netns.Do(netns.Path(ns), func() error {
		ifs, err := net.Interfaces()
		if err != nil {
			return err
		}
		for _, ifc := range ifs {
			for _, attach := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				res, err := link.QueryPrograms(link.QueryOptions{Target: ifc.Index, Attach: attach})
				if err == nil && len(res.Programs) > 0 {
					out = append(out, fmt.Sprintf("tcx %v on %s: %d programs", attach, ifc.Name, len(res.Programs)))
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, proto := range []string{"200", "201"} {
		if s := run("ip", "-n", ns, "route", "show", "table", "all", "proto", proto); s != "" {
			out = append(out, "routes proto "+proto+": "+s)
		}
	}
	if _, err := os.Stat(cfg.BPFRoot); err == nil {
		out = append(out, "bpf root "+cfg.BPFRoot)
	}
	for _, p := range []string{filepath.Join(cfg.CNIBinDir, cni.DefaultBinName), filepath.Join(cfg.CNIConfDir, cni.ConfListName), cfg.StateDir} {
		if _, err := os.Stat(p); err == nil {
			out = append(out, "file "+p)
		}
	}
	return out
}
