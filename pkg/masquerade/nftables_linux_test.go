package masquerade

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

func testNS(t *testing.T, role string) (string, int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2 (ip) to set up test namespaces")
	}
	name := fmt.Sprintf("sbmasq-%s-%d-%s", role, os.Getpid(), rand.Text()[:6])
	path, err := netns.Create(name)
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	f, err := os.Open(path)
	if err != nil {
		netns.Delete(name)
		t.Fatalf("open netns: %v", err)
	}
	t.Cleanup(func() {
		f.Close()
		if err := netns.Delete(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return name, int(f.Fd())
}

func run(t *testing.T, ns string, cmd string, args ...string) string {
	t.Helper()
	var c *exec.Cmd
	if cmd == "ip" {
		c = exec.Command("ip", append([]string{"-n", ns}, args...)...)
	} else {
		c = exec.Command("ip", append([]string{"netns", "exec", ns, cmd}, args...)...)
	}
	out, err := c.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s in %s: %v\n%s", cmd, strings.Join(args, " "), ns, err, out)
	}
	return string(out)
}

// TestNFTablesMasquerade builds pod → node → external host namespaces and
// checks which source address the external host sees.
func TestNFTablesMasquerade(t *testing.T) {
	pod, _ := testNS(t, "pod")
	node, nodeFD := testNS(t, "node")
	ext, _ := testNS(t, "ext")
	run(t, pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "pod0", "netns", node)
	run(t, node, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ext)
	run(t, pod, "ip", "addr", "add", "10.244.1.10/24", "dev", "eth0")
	run(t, pod, "ip", "link", "set", "eth0", "up")
	run(t, pod, "ip", "route", "add", "default", "via", "10.244.1.1")
	run(t, node, "ip", "addr", "add", "10.244.1.1/24", "dev", "pod0")
	run(t, node, "ip", "addr", "add", "192.168.88.1/24", "dev", "eth0")
	run(t, node, "ip", "link", "set", "pod0", "up")
	run(t, node, "ip", "link", "set", "eth0", "up")
	run(t, node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	run(t, ext, "ip", "addr", "add", "192.168.88.2/24", "dev", "eth0")
	run(t, ext, "ip", "link", "set", "eth0", "up")
	run(t, ext, "ip", "link", "set", "lo", "up")
	// The external host can route to pods (a return path for the unNATed case).
	run(t, ext, "ip", "route", "add", "10.244.0.0/16", "via", "192.168.88.1")

	var ln net.Listener
	if err := netns.Do(netns.Path(ext), func() (err error) {
		ln, err = net.Listen("tcp", "192.168.88.2:0")
		return err
	}); err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	seenFrom := func(t *testing.T) string {
		t.Helper()
		errc := make(chan error, 1)
		go func() {
			errc <- netns.Do(netns.Path(pod), func() error {
				c, err := net.DialTimeout("tcp", ln.Addr().String(), 3*time.Second)
				if err == nil {
					c.Close()
				}
				return err
			})
		}()
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatalf("accept: %v (dial: %v)", err, <-errc)
		}
		defer c.Close()
		if err := <-errc; err != nil {
			t.Fatalf("dial: %v", err)
		}
		return c.RemoteAddr().(*net.TCPAddr).IP.String()
	}

	if got := seenFrom(t); got != "10.244.1.10" {
		t.Fatalf("without masquerade the external host sees %s, want the pod 10.244.1.10", got)
	}

	m := NewNFTables(nodeFD)
	ctx := context.Background()
	cfg := Config{
		PodCIDRs:     []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")},
		ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244::/56")},
		NodeIPs:      []netip.Addr{netip.MustParseAddr("192.168.88.1"), netip.MustParseAddr("192.168.88.3")},
	}
	t.Run("leaving the cluster is masqueraded", func(t *testing.T) {
		if err := m.Ensure(ctx, cfg); err != nil {
			t.Fatalf("Ensure: %v", err)
		}
		if err := m.Ensure(ctx, cfg); err != nil {
			t.Fatalf("Ensure again: %v", err)
		}
		if got := seenFrom(t); got != "192.168.88.1" {
			t.Errorf("external host sees %s, want the node 192.168.88.1", got)
		}
		// An unchanged config leaves the table (and its counters) alone; a
		// table deleted by hand is rebuilt.
		if err := m.Ensure(ctx, cfg); err != nil {
			t.Fatalf("Ensure unchanged: %v", err)
		}
		if out := run(t, node, "nft", "list", "table", "inet", TableName); !strings.Contains(out, "packets 1 ") {
			t.Errorf("counter reset by an unchanged Ensure:\n%s", out)
		}
		run(t, node, "nft", "delete", "table", "inet", TableName)
		if err := m.Ensure(ctx, cfg); err != nil {
			t.Fatalf("Ensure after deletion: %v", err)
		}
		table := run(t, node, "nft", "list", "table", "inet", TableName)
		for _, w := range []string{"10.244.0.0/16", "fd00:10:244::/56", "192.168.88.3", "masquerade"} {
			if !strings.Contains(table, w) {
				t.Errorf("table lacks %q:\n%s", w, table)
			}
		}
	})
	t.Run("node addresses are not masqueraded", func(t *testing.T) {
		cfg := cfg
		cfg.NodeIPs = append(cfg.NodeIPs, netip.MustParseAddr("192.168.88.2"))
		if err := m.Ensure(ctx, cfg); err != nil {
			t.Fatalf("Ensure: %v", err)
		}
		if got := seenFrom(t); got != "10.244.1.10" {
			t.Errorf("node sees %s, want the pod 10.244.1.10", got)
		}
	})
	t.Run("remove", func(t *testing.T) {
		if err := m.Remove(ctx); err != nil {
			t.Fatalf("Remove: %v", err)
		}
		if err := m.Remove(ctx); err != nil {
			t.Fatalf("Remove again: %v", err)
		}
		if out := run(t, node, "nft", "list", "tables"); strings.Contains(out, TableName) {
			t.Errorf("table still there:\n%s", out)
		}
	})
}
