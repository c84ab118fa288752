package agent

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// testPod is a pod wired into a node namespace the way the CNI plugin does.
type testPod struct {
	ns       string // netns name
	ip       netip.Addr
	hostVeth string
	ifindex  int // of the host veth, in the node namespace
	podMAC   net.HardwareAddr
	hostMAC  net.HardwareAddr
}

// addTestPod creates a pod namespace behind a host veth in nodeNS exactly as
// the plugin leaves it: veth sb<hash> with alias sinabro:<id>/eth0, a /32
// route of protocol 200, a permanent neighbour with the pod's MAC, and in
// the pod a default route via 169.254.1.1 resolved to the host veth's MAC.
func addTestPod(t *testing.T, nodeNS, role string, ip netip.Addr) testPod {
	t.Helper()
	p := testPod{ns: testNS(t, role), ip: ip}
	id := "test-" + role + "-" + rand.Text()[:8]
	p.hostVeth = cni.HostVethName(id, "eth0")
	ipcmd(t, nodeNS, "link", "add", p.hostVeth, "type", "veth", "peer", "name", "eth0", "netns", p.ns)
	ipcmd(t, nodeNS, "link", "set", p.hostVeth, "alias", "sinabro:"+id+"/eth0", "up")
	ipcmd(t, p.ns, "link", "set", "lo", "up")
	ipcmd(t, p.ns, "link", "set", "eth0", "up")
	ipcmd(t, p.ns, "addr", "add", ip.String()+"/32", "dev", "eth0")
	read := func(ns, dev string) (*net.Interface, error) {
		var ifc *net.Interface
		err := netns.Do(netns.Path(ns), func() (err error) { ifc, err = net.InterfaceByName(dev); return err })
		return ifc, err
	}
	host, err := read(nodeNS, p.hostVeth)
	if err != nil {
		t.Fatal(err)
	}
	pod, err := read(p.ns, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	p.ifindex, p.hostMAC, p.podMAC = host.Index, host.HardwareAddr, pod.HardwareAddr
	ipcmd(t, p.ns, "route", "add", "169.254.1.1/32", "dev", "eth0", "scope", "link")
	ipcmd(t, p.ns, "neigh", "replace", "169.254.1.1", "lladdr", p.hostMAC.String(), "dev", "eth0", "nud", "permanent")
	ipcmd(t, p.ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
	ipcmd(t, nodeNS, "route", "add", ip.String()+"/32", "dev", p.hostVeth, "proto", "200")
	ipcmd(t, nodeNS, "neigh", "replace", ip.String(), "lladdr", p.podMAC.String(), "dev", p.hostVeth, "nud", "permanent")
	return p
}

// lineServer answers each line with "<remote address> <line>".
func lineServer(t *testing.T, ns, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := netns.Do(netns.Path(ns), func() (err error) { ln, err = net.Listen("tcp4", addr); return err }); err != nil {
		t.Fatalf("listen in %s: %v", ns, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					fmt.Fprintf(c, "%s %s", c.RemoteAddr(), line)
				}
			}()
		}
	}()
	return ln
}

// lineConn is a client connection to a lineServer.
type lineConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialLine(t *testing.T, ns, addr string) *lineConn {
	t.Helper()
	var c net.Conn
	if err := netns.Do(netns.Path(ns), func() (err error) { c, err = net.DialTimeout("tcp4", addr, 3*time.Second); return err }); err != nil {
		t.Fatalf("dial %s from %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { c.Close() })
	return &lineConn{c: c, r: bufio.NewReader(c)}
}

// roundTrip sends msg and returns the address the server saw.
func (l *lineConn) roundTrip(msg string) (netip.AddrPort, error) {
	l.c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprintln(l.c, msg); err != nil {
		return netip.AddrPort{}, err
	}
	line, err := l.r.ReadString('\n')
	if err != nil {
		return netip.AddrPort{}, err
	}
	remote, rest, _ := strings.Cut(strings.TrimSpace(line), " ")
	if rest != msg {
		return netip.AddrPort{}, fmt.Errorf("echo %q, want %q", rest, msg)
	}
	return netip.ParseAddrPort(remote)
}

// metricValue returns the value of a metric with the given labels (0 if absent).
func metricValue(t *testing.T, a *Agent, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := a.metrics.registry.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue next
				}
			}
			return value(m)
		}
	}
	return 0
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	return 0
}

func endpointsIn(t *testing.T, root string) map[netip.Addr]datapath.Endpoint {
	t.Helper()
	m, err := datapath.OpenMap(root, "sb_endpoints")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	eps, err := datapath.Endpoints(m)
	if err != nil {
		t.Fatal(err)
	}
	out := map[netip.Addr]datapath.Endpoint{}
	for _, ep := range eps {
		out[ep.IP] = ep
	}
	return out
}

// TestAgentEBPFDatapath runs an agent with the eBPF backend and host
// routing on a node with two pods and an outside host on the uplink:
// masquerading, host routing, endpoint reconciliation, metrics, and an
// established masqueraded connection that survives an agent restart.
func TestAgentEBPFDatapath(t *testing.T) {
	nodeNS, extNS := testNS(t, "node"), testNS(t, "ext")
	ipcmd(t, nodeNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", extNS)
	ipcmd(t, nodeNS, "addr", "add", "192.168.70.1/24", "dev", "eth0")
	ipcmd(t, extNS, "addr", "add", "192.168.70.2/24", "dev", "eth0")
	for _, ns := range []string{nodeNS, extNS} {
		ipcmd(t, ns, "link", "set", "eth0", "up")
		ipcmd(t, ns, "link", "set", "lo", "up")
	}
	// The outside host has no route to the pod network: only masqueraded
	// traffic can be answered.
	podA := addTestPod(t, nodeNS, "pa", netip.MustParseAddr("10.244.1.5"))
	podB := addTestPod(t, nodeNS, "pb", netip.MustParseAddr("10.244.1.6"))

	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("sinabro-agent-test-%d-%s", os.Getpid(), rand.Text()[:6]))
	t.Cleanup(func() {
		if err := datapath.Cleanup(root); err != nil {
			t.Errorf("cleanup %s: %v", root, err)
		}
	})
	client := fake.NewClientset(testNode("a", "192.168.70.1", "10.244.1.0/24"))
	cfg := Config{
		NodeName: "a", CNIConfDir: t.TempDir(), StateDir: "/var/lib/sinabro-test", BPFRoot: root, KubeProxyReplacement: KPRFalse,
		VXLANVNI: 1, VXLANPort: 8472, VXLANDevice: "sinabro.vxlan",
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		Masquerade:   true, MasqueradeBackend: BackendEBPF, HostRouting: true,
		ResyncInterval: time.Second, NetNS: netns.Path(nodeNS),
	}
	start := func(gen int) (*Agent, func()) {
		t.Helper()
		log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})).With("agent", fmt.Sprintf("a%d", gen))
		a, err := New(cfg, clientsetCluster{client}, log)
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		return a, runReady(t, context.Background(), a)
	}

	a, stop := start(1)
	wantEP := func(p testPod) datapath.Endpoint {
		return datapath.Endpoint{IP: p.ip, Ifindex: p.ifindex, PodMAC: p.podMAC, HostMAC: p.hostMAC, Local: true}
	}
	eventually(t, "both pods in the endpoint map", func() bool {
		eps := endpointsIn(t, root)
		return len(eps) == 2 && sameEndpoint(eps[podA.ip], wantEP(podA)) && sameEndpoint(eps[podB.ip], wantEP(podB))
	})

	// Masquerading: the outside host sees the node's address.
	ext := lineServer(t, extNS, "192.168.70.2:8080")
	conn := dialLine(t, podA.ns, ext.Addr().String())
	seen, err := conn.roundTrip("before restart")
	if err != nil {
		t.Fatalf("pod -> outside: %v", err)
	}
	if seen.Addr() != netip.MustParseAddr("192.168.70.1") || seen.Port() < datapath.DefaultPortMin {
		t.Errorf("outside host saw the pod as %v, want the node address with a port >= %d", seen, datapath.DefaultPortMin)
	}

	// Host routing: pod to pod on the node, redirected by eBPF.
	local := lineServer(t, podB.ns, podB.ip.String()+":9090")
	before := metricValue(t, a, "sinabro_datapath_packets_total", map[string]string{"program": "host_route", "reason": "redirect_local"})
	podConn := dialLine(t, podA.ns, local.Addr().String())
	if seen, err := podConn.roundTrip("hello neighbour"); err != nil || seen.Addr() != podA.ip {
		t.Fatalf("pod -> pod: saw %v, %v; want %v unNATed", seen, err, podA.ip)
	}
	after := metricValue(t, a, "sinabro_datapath_packets_total", map[string]string{"program": "host_route", "reason": "redirect_local"})
	if after-before < 3 {
		t.Errorf("host_route redirect_local went from %v to %v: pod traffic was not redirected", before, after)
	}
	snat := metricValue(t, a, "sinabro_datapath_packets_total", map[string]string{"program": "masq_egress", "reason": "snat"})
	if snat == 0 || metricValue(t, a, "sinabro_agent_endpoints", nil) != 2 {
		t.Errorf("metrics: masq_egress snat = %v, endpoints = %v", snat, metricValue(t, a, "sinabro_agent_endpoints", nil))
	}
	t.Logf("metrics: redirect_local %v -> %v, snat %v", before, after, snat)

	// The agent goes away; the datapath keeps forwarding the established
	// connection and the pod that leaves meanwhile is forgotten on restart.
	stop()
	if _, err := conn.roundTrip("agent down"); err != nil {
		t.Fatalf("established connection while the agent is down: %v", err)
	}
	ipcmd(t, nodeNS, "link", "del", podB.hostVeth)
	if _, ok := endpointsIn(t, root)[podB.ip]; !ok {
		t.Fatal("pod b's endpoint vanished without an agent: the test proves nothing")
	}

	a, _ = start(2)
	eventually(t, "the stale endpoint removed at start", func() bool {
		eps := endpointsIn(t, root)
		return len(eps) == 1 && sameEndpoint(eps[podA.ip], wantEP(podA))
	})
	if seen2, err := conn.roundTrip("after restart"); err != nil || seen2 != seen {
		t.Fatalf("established connection after the restart: saw %v, %v; want %v", seen2, err, seen)
	}
	if n := metricValue(t, a, "sinabro_datapath_conntrack_gc_runs_total", nil); n < 0 {
		t.Errorf("gc runs = %v", n)
	}

	// A new pod and a deleted one are picked up from notifications.
	podC := addTestPod(t, nodeNS, "pc", netip.MustParseAddr("10.244.1.7"))
	eventually(t, "the new pod's endpoint", func() bool {
		return sameEndpoint(endpointsIn(t, root)[podC.ip], wantEP(podC))
	})
	localC := lineServer(t, podC.ns, podC.ip.String()+":9090")
	if seen, err := dialLine(t, podA.ns, localC.Addr().String()).roundTrip("hi c"); err != nil || seen.Addr() != podA.ip {
		t.Fatalf("pod a -> new pod c: saw %v, %v", seen, err)
	}
	ipcmd(t, nodeNS, "link", "del", podC.hostVeth)
	eventually(t, "the deleted pod's endpoint removed", func() bool {
		_, ok := endpointsIn(t, root)[podC.ip]
		return !ok
	})

	// The node's address changes: the datapath is reloaded for it (the
	// node IP is compiled in), keeping its maps and the metrics wired.
	ipcmd(t, nodeNS, "addr", "add", "192.168.70.3/24", "dev", "eth0")
	n := testNode("a", "192.168.70.3", "10.244.1.0/24")
	if _, err := client.CoreV1().Nodes().UpdateStatus(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the datapath reloaded for the new node address", func() bool {
		a.dpMu.RLock()
		defer a.dpMu.RUnlock()
		return a.dp != nil && a.dp.Config().NodeIP == netip.MustParseAddr("192.168.70.3")
	})
	if seen, err := dialLine(t, podA.ns, ext.Addr().String()).roundTrip("new address"); err != nil || seen.Addr() != netip.MustParseAddr("192.168.70.3") {
		t.Fatalf("after the address change the outside host saw %v, %v; want 192.168.70.3", seen, err)
	}
	if sameEndpoint(endpointsIn(t, root)[podA.ip], wantEP(podA)) == false {
		t.Error("pod a's endpoint lost across the reload")
	}
	if v := metricValue(t, a, "sinabro_datapath_packets_total", map[string]string{"program": "masq_egress", "reason": "snat_new"}); v < 2 {
		t.Errorf("masq_egress snat_new = %v after the reload, want >= 2 (metrics not re-registered?)", v)
	}
}

// runReady runs a until the test ends (or the returned stop is called,
// which is idempotent) and waits for it to be ready.
func runReady(t *testing.T, ctx context.Context, a *Agent) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if err := a.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}
	t.Cleanup(stop)
	eventually(t, "agent ready", a.Ready)
	return stop
}
