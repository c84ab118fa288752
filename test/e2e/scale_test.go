//go:build linux

package e2e

import (
	"bufio"
	"context"

	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// scaleNodeCount is the number of Node objects TestScaleNodes adds: 300 by
// default (a few minutes on 2 cores), 5,000 with SINABRO_BENCH=1, or
// $SINABRO_SCALE_NODES.
func scaleNodeCount(t *testing.T) int {
	if s := os.Getenv("SINABRO_SCALE_NODES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 8000 {
			t.Fatalf("SINABRO_SCALE_NODES=%q: want 1..8000", s)
		}
		return n
	}
	if os.Getenv("SINABRO_BENCH") != "" {
		return 5000
	}
	return 300
}

// TestScaleNodes adds N simulated Node objects (API objects only: a /30
// pod CIDR in 10.244.128.0/17, an InternalIP, VTEP annotations, never
// Ready) to a 2-node lab, plus two bad ones: a pod CIDR of 0.0.0.0/0 and
// one outside --cluster-cidr. The real agents must program a route,
// neighbour and FDB entry to every simulated peer, skip the bad Nodes with
// a reason, stay ready, keep masquerading and cross-node pod traffic
// working; it reports the time to converge, one pass's time at that size
// and the agents' RSS.
func TestScaleNodes(t *testing.T) {
	n := scaleNodeCount(t)
	l, _ := newLab(t, 2, 1)
	cs := scaleClient(t, l)
	ctx := context.Background()
	real := []string{"node-1", "node-2"}
	d := newDatapathLab(t, l, "node-1")
	peerPod := podOn(t, cs, "node-2")

	rssBefore := agentRSSKiB(t, l)
	for _, node := range real {
		m := agentMetrics(t, node)
		t.Logf("%s before: %v peers, %.0f reconciles", node, m["sinabro_agent_peers"], m[`sinabro_agent_reconciles_total{result="success"}`])
	}

	// Create the Nodes, status included (as kubelet registers), 32 at a time.
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	for i := range n {
		g.Go(func() error {
			_, err := cs.Nodes().Create(gctx, simNode(i), metav1.CreateOptions{})
			return err
		})
	}
	bad := []*corev1.Node{
		badNode("sim-bad-default", "0.0.0.0/0", "172.29.0.1", "02:5b:00:ff:00:01"),
		badNode("sim-bad-outside", "10.99.0.0/24", "172.29.0.2", "02:5b:00:ff:00:02"),
	}
	for _, b := range bad {
		g.Go(func() error {
			_, err := cs.Nodes().Create(gctx, b, metav1.CreateOptions{})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("create Nodes: %v", err)
	}
	created := time.Since(start)
	t.Logf("figure: %d Node objects created in %s", n+len(bad), created.Round(100*time.Millisecond))

	// Every agent has a route, neighbour and FDB entry for each peer.
	want := n + len(real) - 1
	converged := map[string]time.Duration{}
	for _, node := range real {
		waitFor(t, 10*time.Minute, node+" programs every peer", func() (bool, string) {
			routes, fdb := overlayCounts(node)
			return routes >= want && fdb >= want, fmt.Sprintf("%d routes, %d fdb entries, want %d", routes, fdb, want)
		})
		converged[node] = time.Since(start)
	}
	for _, node := range real {
		t.Logf("figure: %s programmed %d peers %s after the first create (%s after the last)",
			node, want, converged[node].Round(100*time.Millisecond), (converged[node] - created).Round(100*time.Millisecond))
	}

	for _, node := range real {
		m := agentMetrics(t, node)
		if m["sinabro_agent_peers"] != float64(want) {
			t.Errorf("%s: sinabro_agent_peers = %v, want %d", node, m["sinabro_agent_peers"], want)
		}
		for _, reason := range []string{"ReservedPodCIDR", "OutsideClusterCIDR"} {
			if got := m[`sinabro_agent_skipped_nodes{reason="`+reason+`"}`]; got != 1 {
				t.Errorf("%s: skipped nodes for %s = %v, want 1", node, reason, got)
			}
		}
		routes := ipRoutes(node)
		for _, cidr := range []string{"0.0.0.0/0", "default", "10.99.0.0/24"} {
			if strings.Contains(routes, "\n"+cidr+" ") || strings.HasPrefix(routes, cidr+" ") {
				t.Errorf("%s: route to a bad Node's pod CIDR %s installed", node, cidr)
			}
		}
	}

	// One pass at this size: a relevant change on one Node (its VTEP
	// MAC), then the pass it triggers, from the agent's own histogram.
	for _, node := range real {
		before := agentMetrics(t, node)
		patch := fmt.Sprintf(`{"metadata":{"annotations":{"sinabro.io/vtep-mac":"02:5c:00:00:%02x:%02x"}}}`, len(node), time.Now().Second())
		if _, err := cs.Nodes().Patch(ctx, simName(0), types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		const count = "sinabro_agent_reconcile_duration_seconds_count"
		const sum = "sinabro_agent_reconcile_duration_seconds_sum"
		var after map[string]float64
		waitFor(t, time.Minute, node+" reconciles the change", func() (bool, string) {
			after = agentMetrics(t, node)
			return after[count] > before[count], fmt.Sprintf("%v passes", after[count])
		})
		passes := after[count] - before[count]
		t.Logf("figure: %s, %d peers: %.0f pass(es) after one Node change, %.0f ms each (mean over the agent's life: %.0f ms over %.0f passes)",
			node, want, passes, 1000*(after[sum]-before[sum])/passes, 1000*after[sum]/after[count], after[count])
	}

	rssAfter := agentRSSKiB(t, l)
	for _, node := range real {
		t.Logf("figure: agent-%s RSS %.1f MiB with 2 nodes, %.1f MiB with %d", node,
			float64(rssBefore[node])/1024, float64(rssAfter[node])/1024, n+len(real)+len(bad))
		if !readyz(node) {
			t.Errorf("agent on %s not ready with %d Nodes", node, n+len(real)+len(bad))
		}
	}

	// The real cluster still works: masquerading (a 0.0.0.0/0 pod CIDR
	// would have turned it off) and pod to pod across nodes.
	c, err := d.dial(5 * time.Second)
	if err != nil {
		t.Fatalf("pod on node-1 → external host: %v", err)
	}
	seen, err := exchange(c, bufio.NewReader(c), 5*time.Second)
	c.Close()
	if err != nil || seen.Addr() != d.nodeIP {
		t.Errorf("external host saw %v (%v), want the node address %s", seen, err, d.nodeIP)
	}
	var conn net.Conn
	err = netns.Do(d.podNetns, func() (err error) {
		conn, err = net.DialTimeout("tcp", netip.AddrPortFrom(peerPod, lab.ServeTCPPort).String(), 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("pod on node-1 → pod %s on node-2: %v", peerPod, err)
	}
	seen, err = exchange(conn, bufio.NewReader(conn), 5*time.Second)
	conn.Close()
	if err != nil || seen.Addr() != d.podIP {
		t.Errorf("pod on node-2 saw %v (%v), want the pod address %s", seen, err, d.podIP)
	}
}

// scaleClient is an admin client allowed many requests per second.
func scaleClient(t *testing.T, l *testLab) *kube.Client {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", lab.Layout{Dir: l.dir}.AdminKubeconfig())
	if err != nil {
		t.Fatal(err)
	}
	cfg.QPS, cfg.Burst = 1000, 1000
	cs, err := kube.New(cfg, "sinabro-e2e-scale")
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func simName(i int) string { return fmt.Sprintf("sim-%05d", i) }

// simNode is simulated node i: pod CIDR 10.244.128.0/30 + 4i (inside the
// lab's 10.244.0.0/16, above what the controller-manager hands out),
// InternalIP and VTEP in 172.30.0.0/16, off the lab's underlay.
func simNode(i int) *corev1.Node {
	off := 4 * i // 10.244.128.0 + 4i
	cidr := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(128 + off>>8), byte(off)}), 30).String()
	ip := fmt.Sprintf("172.30.%d.%d", i/250, i%250+1)
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: simName(i), Labels: map[string]string{"sinabro.io/simulated": "true"},
			Annotations: map[string]string{
				"sinabro.io/vtep-mac": fmt.Sprintf("02:5b:00:00:%02x:%02x", i>>8, i&0xff),
				"sinabro.io/vtep-ip":  ip,
			}},
		Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}, Unschedulable: true,
			Taints: []corev1.Taint{{Key: "sinabro.io/simulated", Effect: corev1.TaintEffectNoSchedule}}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}},
	}
}

// badNode is a simulated node whose pod CIDR no agent may install.
func badNode(name, cidr, ip, mac string) *corev1.Node {
	n := simNode(0)
	n.Name = name
	n.Spec.PodCIDR, n.Spec.PodCIDRs = cidr, []string{cidr}
	n.Annotations["sinabro.io/vtep-mac"] = mac
	n.Annotations["sinabro.io/vtep-ip"] = ip
	n.Status.Addresses[0].Address = ip
	return n
}

// podOn returns the address of a running pod on node.
func podOn(t *testing.T, cs *kube.Client, node string) netip.Addr {
	t.Helper()
	pods, err := cs.Pods("default").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		if p.Spec.NodeName == node && !p.Spec.HostNetwork && p.Status.Phase == corev1.PodRunning {
			if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
				return a
			}
		}
	}
	t.Fatalf("no running pod on %s", node)
	return netip.Addr{}
}

// overlayCounts counts node's routes and FDB entries on the vxlan device.
func overlayCounts(node string) (routes, fdb int) {
	ns := netns.Path(labNetns(node))
	out, _ := inNetns(ns, "ip", "-o", "route", "show", "dev", "sinabro.vxlan")
	routes = strings.Count(out, " via ")
	out, _ = inNetns(ns, "bridge", "fdb", "show", "dev", "sinabro.vxlan")
	fdb = strings.Count(out, " dst ")
	return routes, fdb
}

// ipRoutes lists node's routes through the vxlan device (the node's own
// default route leaves through the underlay).
func ipRoutes(node string) string {
	out, _ := inNetns(netns.Path(labNetns(node)), "ip", "-o", "route", "show", "dev", "sinabro.vxlan")
	return out
}

// agentMetrics scrapes the agent's /metrics on its node's loopback: sample
// name (with its labels, as exposed) → value.
func agentMetrics(t *testing.T, node string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	err := netns.Do(netns.Path(labNetns(node)), func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:9962", 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprint(c, "GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "#") {
				continue
			}
			i := strings.LastIndexByte(line, ' ')
			if i < 0 {
				continue
			}
			if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
				out[line[:i]] = v
			}
		}
		return sc.Err()
	})
	if err != nil {
		t.Fatalf("scrape agent metrics on %s: %v", node, err)
	}
	return out
}

func readyz(node string) bool {
	ok := false
	netns.Do(netns.Path(labNetns(node)), func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:9962", time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		fmt.Fprint(c, "GET /readyz HTTP/1.0\r\nHost: agent\r\n\r\n")
		line, _ := bufio.NewReader(c).ReadString('\n')
		ok = strings.Contains(line, " 200 ")
		return nil
	})
	return ok
}

// agentRSSKiB returns each running agent's RSS by node name.
func agentRSSKiB(t *testing.T, l *testLab) map[string]int {
	t.Helper()
	st, err := lab.SupervisorStatus(context.Background(), l.dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, p := range st.Procs {
		if name, ok := strings.CutPrefix(p.Name, "agent-"); ok && p.Running {
			out[name] = lab.RSS(p.PID)
		}
	}
	return out
}
