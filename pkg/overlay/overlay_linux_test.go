package overlay

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// testNS creates a uniquely named network namespace removed at cleanup and
// returns its name and an open fd to it.
func testNS(t *testing.T) (string, int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2 (ip) to set up and inspect test namespaces")
	}
	name := fmt.Sprintf("sbovl-%d-%s", os.Getpid(), rand.Text()[:6])
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

// ip runs iproute2 (or bridge, when args[0] is "bridge") in namespace ns.
func ip(t *testing.T, ns string, args ...string) string {
	t.Helper()
	cmd := "ip"
	if args[0] == "bridge" {
		cmd, args = "bridge", args[1:]
	}
	out, err := exec.Command(cmd, append([]string{"-n", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s -n %s %s: %v\n%s", cmd, ns, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func openManager(t *testing.T, fd int) *Manager {
	t.Helper()
	m, err := Open(fd)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// node is one side of an overlay test: a namespace with an underlay device.
type node struct {
	ns    string
	m     *Manager
	local netip.Addr
	cidr  netip.Prefix
	mac   net.HardwareAddr
	dev   Link
}

func (n *node) deviceConfig(t *testing.T) DeviceConfig {
	t.Helper()
	under, err := n.m.LinkByAddr(n.local)
	if err != nil {
		t.Fatalf("LinkByAddr(%s): %v", n.local, err)
	}
	return DeviceConfig{Name: "sinabro.vxlan", VNI: 42, Port: 8472, MTU: under.MTU - Overhead,
		Underlay: under.Index, Local: n.local, MAC: n.mac}
}

func (n *node) peer() Peer {
	return Peer{Name: n.ns, Underlay: n.local, MAC: n.mac, PodCIDRs: []netip.Prefix{n.cidr}}
}

// twoNodes connects two namespaces with a veth underlay and creates their
// vxlan devices.
func twoNodes(t *testing.T) (a, b *node) {
	nsA, fdA := testNS(t)
	nsB, fdB := testNS(t)
	ip(t, nsA, "link", "add", "under", "type", "veth", "peer", "name", "under", "netns", nsB)
	a = &node{ns: nsA, m: openManager(t, fdA), local: netip.MustParseAddr("192.168.77.1"),
		cidr: netip.MustParsePrefix("10.244.1.0/24"), mac: StableMAC("a")}
	b = &node{ns: nsB, m: openManager(t, fdB), local: netip.MustParseAddr("192.168.77.2"),
		cidr: netip.MustParsePrefix("10.244.2.0/24"), mac: StableMAC("b")}
	for _, n := range []*node{a, b} {
		ip(t, n.ns, "addr", "add", n.local.String()+"/24", "dev", "under")
		ip(t, n.ns, "link", "set", "under", "up")
		ip(t, n.ns, "link", "set", "lo", "up")
		dev, err := n.m.EnsureDevice(n.deviceConfig(t))
		if err != nil {
			t.Fatalf("EnsureDevice in %s: %v", n.ns, err)
		}
		n.dev = dev
	}
	return a, b
}

func TestEnsureDevice(t *testing.T) {
	a, _ := twoNodes(t)
	cfg := a.deviceConfig(t)
	out := ip(t, a.ns, "-d", "link", "show", "sinabro.vxlan")
	for _, want := range []string{"vxlan id 42", "local 192.168.77.1", "dev under", "dstport 8472", "nolearning", "mtu 1450", a.mac.String(), "UP"} {
		if !strings.Contains(out, want) {
			t.Errorf("vxlan device lacks %q:\n%s", want, out)
		}
	}

	// Idempotent: same device, same index.
	again, err := a.m.EnsureDevice(cfg)
	if err != nil || again.Index != a.dev.Index {
		t.Errorf("EnsureDevice again = %+v, %v; want index %d", again, err, a.dev.Index)
	}

	// Drift that can be fixed in place is fixed in place.
	ip(t, a.ns, "link", "set", "sinabro.vxlan", "down", "mtu", "1300")
	fixed, err := a.m.EnsureDevice(cfg)
	if err != nil || fixed.Index != a.dev.Index || fixed.MTU != 1450 {
		t.Errorf("EnsureDevice after drift = %+v, %v; want index %d mtu 1450", fixed, err, a.dev.Index)
	}
	if out := ip(t, a.ns, "link", "show", "sinabro.vxlan"); !strings.Contains(out, "state UNKNOWN") && !strings.Contains(out, ",UP") {
		t.Errorf("device not up again:\n%s", out)
	}

	// A changed VNI needs a new device, with the same MAC.
	cfg.VNI = 43
	re, err := a.m.EnsureDevice(cfg)
	if err != nil {
		t.Fatalf("EnsureDevice with new VNI: %v", err)
	}
	if !strings.Contains(ip(t, a.ns, "-d", "link", "show", "sinabro.vxlan"), "vxlan id 43") || !equalMAC(re.MAC, a.mac) {
		t.Errorf("device not recreated with VNI 43 and MAC %s: %+v", a.mac, re)
	}

	if err := a.m.Cleanup("sinabro.vxlan"); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	if out, err := exec.Command("ip", "-n", a.ns, "link", "show", "sinabro.vxlan").CombinedOutput(); err == nil {
		t.Errorf("device still there after Cleanup:\n%s", out)
	}
	if err := a.m.Cleanup("sinabro.vxlan"); err != nil {
		t.Errorf("second Cleanup: %v", err)
	}
}

func TestSyncProgramsAndConverges(t *testing.T) {
	a, b := twoNodes(t)
	c := Peer{Name: "c", Underlay: netip.MustParseAddr("192.168.77.3"), MAC: StableMAC("c"),
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.3.0/24")}}
	// Someone else's route that must survive every sync.
	ip(t, a.ns, "route", "add", "10.99.0.0/16", "via", "192.168.77.254")

	desired := Desired([]netip.Prefix{a.cidr}, []Peer{b.peer(), c})
	plan, err := a.m.Sync(a.dev, desired)
	if err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if plan.Empty() {
		t.Fatal("first Sync planned nothing")
	}
	check := func(t *testing.T, wantPresent, wantAbsent []string) {
		t.Helper()
		state := ip(t, a.ns, "route", "show") + ip(t, a.ns, "neigh", "show", "dev", "sinabro.vxlan") +
			ip(t, a.ns, "bridge", "fdb", "show", "dev", "sinabro.vxlan") + ip(t, a.ns, "addr", "show", "dev", "sinabro.vxlan")
		for _, w := range wantPresent {
			if !strings.Contains(state, w) {
				t.Errorf("missing %q in\n%s", w, state)
			}
		}
		for _, w := range wantAbsent {
			if strings.Contains(state, w) {
				t.Errorf("unexpected %q in\n%s", w, state)
			}
		}
	}
	all := []string{
		"10.244.2.0/24 via 10.244.2.0 dev sinabro.vxlan proto 201 onlink",
		"10.244.3.0/24 via 10.244.3.0 dev sinabro.vxlan proto 201 onlink",
		"unreachable 10.244.1.0/24 proto 201 metric 4242",
		"10.244.2.0 lladdr " + b.mac.String() + " PERMANENT",
		"10.244.3.0 lladdr " + c.MAC.String() + " PERMANENT",
		b.mac.String() + " dst 192.168.77.2 self permanent",
		c.MAC.String() + " dst 192.168.77.3 self permanent",
		"inet 10.244.1.0/32",
		"10.99.0.0/16 via 192.168.77.254",
	}
	check(t, all, nil)

	if plan, err := a.m.Sync(a.dev, desired); err != nil || !plan.Empty() {
		t.Errorf("second Sync = %+v, %v; want an empty plan", plan, err)
	}

	// Manual tampering is repaired by the next sync.
	ip(t, a.ns, "route", "del", "10.244.2.0/24")
	ip(t, a.ns, "bridge", "fdb", "del", c.MAC.String(), "dev", "sinabro.vxlan", "self")
	ip(t, a.ns, "neigh", "replace", "10.244.3.0", "lladdr", "02:de:ad:be:ef:00", "dev", "sinabro.vxlan", "nud", "permanent")
	ip(t, a.ns, "bridge", "fdb", "append", "02:de:ad:be:ef:01", "dev", "sinabro.vxlan", "dst", "192.168.77.9", "self", "permanent")
	plan, err = a.m.Sync(a.dev, desired)
	if err != nil {
		t.Fatalf("Sync after tampering: %v", err)
	}
	if len(plan.UpsertRoutes) != 1 || len(plan.UpsertFDB) != 1 || len(plan.UpsertNeighbours) != 1 || len(plan.DelFDB) != 1 {
		t.Errorf("plan after tampering = %+v; want 1 route, 1 fdb, 1 neighbour upserted and 1 fdb deleted", plan)
	}
	check(t, all, []string{"02:de:ad:be:ef"})

	// Peer c changes its underlay address and pod CIDR; b leaves.
	c.Underlay = netip.MustParseAddr("192.168.77.33")
	c.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.33.0/24")}
	if _, err := a.m.Sync(a.dev, Desired([]netip.Prefix{a.cidr}, []Peer{c})); err != nil {
		t.Fatalf("Sync after change: %v", err)
	}
	check(t, []string{
		"10.244.33.0/24 via 10.244.33.0 dev sinabro.vxlan proto 201 onlink",
		c.MAC.String() + " dst 192.168.77.33 self permanent",
		"10.244.33.0 lladdr " + c.MAC.String() + " PERMANENT",
		"10.99.0.0/16 via 192.168.77.254",
	}, []string{"10.244.2.0", "10.244.3.0", b.mac.String(), "192.168.77.3 "})

	// Cleanup leaves only foreign routes behind.
	if err := a.m.Cleanup("sinabro.vxlan"); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	routes := ip(t, a.ns, "route", "show")
	if strings.Contains(routes, "proto 201") || !strings.Contains(routes, "10.99.0.0/16") {
		t.Errorf("routes after Cleanup:\n%s", routes)
	}
}

func TestSyncIPv6(t *testing.T) {
	a, b := twoNodes(t)
	b6 := b.peer()
	b6.PodCIDRs = append(b6.PodCIDRs, netip.MustParsePrefix("fd00:10:244:2::/64"))
	local := []netip.Prefix{a.cidr, netip.MustParsePrefix("fd00:10:244:1::/64")}
	desired := Desired(local, []Peer{b6})
	if _, err := a.m.Sync(a.dev, desired); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if plan, err := a.m.Sync(a.dev, desired); err != nil || !plan.Empty() {
		t.Errorf("second Sync = %+v, %v; want an empty plan", plan, err)
	}
	routes := ip(t, a.ns, "-6", "route", "show")
	for _, w := range []string{"fd00:10:244:2::/64 via fd00:10:244:2:: dev sinabro.vxlan proto 201", "unreachable fd00:10:244:1::/64"} {
		if !strings.Contains(routes, w) {
			t.Errorf("missing %q in\n%s", w, routes)
		}
	}
}

// TestTwoNodeConnectivity proves real VXLAN forwarding: a "pod" address on
// each node reaches the other over TCP and ICMP through the overlay only.
func TestTwoNodeConnectivity(t *testing.T) {
	a, b := twoNodes(t)
	podA, podB := "10.244.1.10", "10.244.2.10"
	for _, n := range []struct {
		n   *node
		pod string
	}{{a, podA}, {b, podB}} {
		// This kernel has no dummy driver; a /32 on lo serves as the pod.
		ip(t, n.n.ns, "addr", "add", n.pod+"/32", "dev", "lo")
	}
	// Dual stack: an IPv6 pod CIDR per node too, over the same IPv4 underlay.
	podA6, podB6 := "fd00:10:244:1::10", "fd00:10:244:2::10"
	ip(t, a.ns, "addr", "add", podA6+"/128", "dev", "lo", "nodad")
	ip(t, b.ns, "addr", "add", podB6+"/128", "dev", "lo", "nodad")
	dual := func(n *node, v6 string) Peer {
		p := n.peer()
		p.PodCIDRs = append(p.PodCIDRs, netip.MustParsePrefix(v6))
		return p
	}
	peerA, peerB := dual(a, "fd00:10:244:1::/64"), dual(b, "fd00:10:244:2::/64")
	if _, err := a.m.Sync(a.dev, Desired(peerA.PodCIDRs, []Peer{peerB})); err != nil {
		t.Fatalf("Sync a: %v", err)
	}
	if _, err := b.m.Sync(b.dev, Desired(peerB.PodCIDRs, []Peer{peerA})); err != nil {
		t.Fatalf("Sync b: %v", err)
	}

	for _, p := range [][2]string{{podA, podB}, {podA6, podB6}} {
		if out, err := exec.Command("ip", "netns", "exec", a.ns, "ping", "-c", "2", "-W", "2", "-I", p[0], p[1]).CombinedOutput(); err != nil {
			t.Errorf("ping %s -> %s: %v\n%s", p[0], p[1], err, out)
		}
	}

	// TCP with full-size segments: 1 MiB echoed back proves the MTU is right.
	var ln net.Listener
	if err := netns.Do(netns.Path(b.ns), func() (err error) {
		ln, err = net.Listen("tcp", podB+":0")
		return err
	}); err != nil {
		t.Fatalf("listen in %s: %v", b.ns, err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	var conn net.Conn
	if err := netns.Do(netns.Path(a.ns), func() (err error) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(podA)}, Timeout: 5 * time.Second}
		conn, err = d.Dial("tcp", ln.Addr().String())
		return err
	}); err != nil {
		t.Fatalf("dial %s from %s: %v", ln.Addr(), podA, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	payload := bytes.Repeat([]byte("sinabro!"), 128<<10)
	go conn.Write(payload)
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Error("echoed payload differs")
	}
	if conn.LocalAddr().(*net.TCPAddr).IP.String() != podA {
		t.Errorf("local address %s, want %s", conn.LocalAddr(), podA)
	}
	// The only route between 10.244.1.0/24 and 10.244.2.0/24 is the overlay,
	// so the exchange above went through both vxlan devices.
}

func TestNextHop(t *testing.T) {
	ns, fd := testNS(t)
	m := openManager(t, fd)
	ip(t, ns, "link", "add", "under0", "type", "veth", "peer", "name", "under1")
	ip(t, ns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
	ip(t, ns, "addr", "add", "10.9.0.1/24", "dev", "under0")
	ip(t, ns, "addr", "add", "10.8.0.1/24", "dev", "other0")
	for _, l := range []string{"under0", "under1", "other0", "other1"} {
		ip(t, ns, "link", "set", l, "up")
	}
	ip(t, ns, "route", "add", "10.10.0.0/16", "via", "10.9.0.254")
	under, err := m.LinkByAddr(netip.MustParseAddr("10.9.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		dst, want string // want "": an error
	}{
		{"10.9.0.7", "10.9.0.7"},    // on link
		{"10.10.3.4", "10.9.0.254"}, // routed
		{"10.8.0.7", ""},            // through another interface
		{"192.0.2.1", ""},           // no route at all
	} {
		got, err := m.NextHop(netip.MustParseAddr(tt.dst), under.Index)
		if tt.want == "" {
			if err == nil {
				t.Errorf("NextHop(%s) = %v, want an error", tt.dst, got)
			}
			continue
		}
		if err != nil || got != netip.MustParseAddr(tt.want) {
			t.Errorf("NextHop(%s) = %v, %v; want %s", tt.dst, got, err, tt.want)
		}
	}
}
