package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/flows"
	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestFlowTelemetry runs `lab check` on a 2-node lab without kube-proxy
// (Services through Sinabro's socket load balancer) and reads what `lab
// observe` reports: a denied connection, an allowed one with its rule, a
// masqueraded one, a Service connection, a NodePort from outside, an
// accelerated one and a cross-node one, each with its fields; filters;
// the metrics. Then a flood of drops must not lose the flows of
// connections made meanwhile (nor break `lab check`), and an agent killed
// with SIGKILL leaves the datapath forwarding, its events kept in the
// pinned ring for the restarted agent.
func TestFlowTelemetry(t *testing.T) {
	l, _ := newLabWith(t, 2, 2, lab.KubeProxyNone)
	cs, _, _ := labBasics(t, l)
	ctx := context.Background()
	if out, err := l.sinabro("check"); err != nil {
		t.Fatalf("lab check: %v\n%s", err, out)
	}
	pods := map[string]*corev1.Pod{} // name → pod
	list, err := cs.Pods("default").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range list.Items {
		pods[list.Items[i].Name] = &list.Items[i]
	}
	nodeIP := map[string]string{}
	nodes, err := cs.Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes.Items {
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				nodeIP[n.Name] = a.Address
			}
		}
	}
	nodeOf := func(e flows.Endpoint) string {
		if p := pods[e.Pod]; p != nil && e.Namespace == p.Namespace {
			return p.Spec.NodeName
		}
		return ""
	}

	all := observe(t, l, "--last", "0")
	t.Logf("lab observe: %d flows after lab check", len(all))
	find := func(what string, ok func(f flows.Flow) bool) flows.Flow {
		t.Helper()
		for _, f := range all {
			if ok(f) {
				t.Logf("%s: %s", what, f)
				return f
			}
		}
		t.Errorf("no flow: %s", what)
		return flows.Flow{}
	}
	const checkPolicy = "default/sinabro-lab-check"
	find("a connection denied by the check's NetworkPolicy", func(f flows.Flow) bool {
		return f.Type == "drop" && f.Verdict == "dropped" && f.DropReason == "drop_policy" && f.Ingress != nil &&
			f.Ingress.Verdict == "denied" && f.Ingress.Policy == checkPolicy && f.Destination.Pod != "" && f.Source.Pod != "" &&
			f.Node == nodeOf(f.Destination)
	})
	find("a connection allowed by the check's rule", func(f flows.Flow) bool {
		return f.Type == "new" && f.Ingress != nil && f.Ingress.Verdict == "allowed" && f.Ingress.Policy == checkPolicy &&
			f.Ingress.Rule == "ingress rule 0" && f.Protocol == "TCP"
	})
	find("a masqueraded connection to the external host", func(f flows.Flow) bool {
		return f.Type == "translate" && f.Reason == "snat_new" && f.Source.Pod != "" && f.TranslatedSource != nil &&
			f.TranslatedSource.Node == f.Node && f.TranslatedSource.IP.String() == nodeIP[f.Node] &&
			f.TranslatedDestination != nil && f.TranslatedDestination.IP == f.Destination.IP && f.Node == nodeOf(f.Source)
	})
	find("a Service connection through the socket load balancer", func(f flows.Flow) bool {
		return f.Type == "service" && strings.HasPrefix(f.Service, "default/svc-") && f.TranslatedDestination != nil &&
			f.TranslatedDestination.Pod != "" && f.Destination.IP.IsValid() && f.Destination.IP != f.TranslatedDestination.IP
	})
	find("a NodePort connection from outside", func(f flows.Flow) bool {
		return f.Type == "translate" && f.Reason == "lb_new" && f.Destination.Node == f.Node && f.Service != "" &&
			f.TranslatedDestination != nil && f.TranslatedDestination.Pod != ""
	})
	find("an accelerated connection, closed", func(f flows.Flow) bool {
		return f.Type == "accel-end" && f.Bytes > 0 && f.Source.Pod != "" && f.Destination.Pod != "" &&
			nodeOf(f.Source) == f.Node && nodeOf(f.Destination) == f.Node
	})
	find("a cross-node connection, encapsulated to the other node", func(f flows.Flow) bool {
		return f.Type == "new" && (f.Path == "encap" || f.Path == "redirect_tunnel") && f.Source.Pod != "" &&
			nodeOf(f.Source) == f.Node && f.OverlayNode != "" && f.OverlayNode == nodeOf(f.Destination) && f.OverlayNode != f.Node
	})
	find("the same connection delivered on the other node", func(f flows.Flow) bool {
		return f.Type == "new" && f.Path == "redirect_local" && f.Program == "masq_ingress" && nodeOf(f.Destination) == f.Node &&
			nodeOf(f.Source) != "" && nodeOf(f.Source) != f.Node
	})

	t.Run("filters", func(t *testing.T) {
		denied := observe(t, l, "--last", "0", "--verdict", "denied")
		if len(denied) == 0 {
			t.Error("--verdict denied: nothing")
		}
		for _, f := range denied {
			if (f.Ingress == nil || f.Ingress.Verdict != "denied") && (f.Egress == nil || f.Egress.Verdict != "denied") {
				t.Errorf("--verdict denied showed %s", f)
			}
		}
		pod := "node-1-pod-1"
		for _, f := range observe(t, l, "--last", "0", "--pod", "default/"+pod, "--type", "new", "--node", "node-2") {
			if f.Type != "new" || f.Node != "node-2" || (f.Source.Pod != pod && f.Destination.Pod != pod) {
				t.Errorf("--pod %s --type new --node node-2 showed %s", pod, f)
			}
		}
		if n := len(observe(t, l, "--last", "3")); n != 3 {
			t.Errorf("--last 3 showed %d flows", n)
		}
		if out, err := l.sinabro("observe", "--verdict", "maybe"); err == nil || !strings.Contains(out, "--verdict") {
			t.Errorf("a bad --verdict: %v\n%s", err, out)
		}
	})

	t.Run("metrics", func(t *testing.T) {
		m := agentMetrics(t, "node-1")
		var drops, newFlows float64
		for k, v := range m {
			if strings.HasPrefix(k, "sinabro_flow_drops_total{") && strings.Contains(k, `reason="drop_policy"`) && strings.Contains(k, `pod="node-1-pod-1"`) {
				drops += v
			}
			if strings.HasPrefix(k, "sinabro_flows_total{") {
				newFlows += v
			}
		}
		if drops == 0 || newFlows == 0 {
			t.Errorf("node-1 /metrics: drop_policy drops of node-1-pod-1 %v, new flows %v; want both > 0", drops, newFlows)
		}
		if v, ok := m["sinabro_flow_events_lost_total"]; !ok || v != 0 {
			t.Errorf("sinabro_flow_events_lost_total = %v (present %v), want 0", v, ok)
		}
	})

	// A flood of drops on node-1 (node-2-pod-2 → a pod of node-1 whose
	// ingress a policy denies, outside the lab's namespace so that `lab
	// check` does not probe it) while node-2-pod-1 opens connections to
	// node-1-pod-1 and `lab check` runs: node-1 must report every one of
	// those connections, and the drops within their budget.
	t.Run("drop flood", func(t *testing.T) {
		client, flooder, server := pods["node-2-pod-1"], pods["node-2-pod-2"], pods["node-1-pod-1"]
		if _, err := cs.Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "flood"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		sink := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "sink", Namespace: "flood"},
			Spec:       corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "serve", Image: "sinabro-lab/serve"}}},
		}
		if _, err := cs.Pods("flood").Create(ctx, sink, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 60*time.Second, "pod flood/sink running", func() (bool, string) {
			var err error
			if sink, err = cs.Pods("flood").Get(ctx, "sink", metav1.GetOptions{}); err != nil {
				return false, err.Error()
			}
			return sink.Status.Phase == corev1.PodRunning && sink.Status.PodIP != "", string(sink.Status.Phase)
		})
		target := sink
		deny := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "deny-all", Namespace: "flood"},
			Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
		}
		if _, err := cs.NetworkPolicies("flood").Create(ctx, deny, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second) // enforced well before
		before := agentMetrics(t, "node-1")

		stop := make(chan struct{})
		floodStart := time.Now()
		var sent atomic.Int64
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := netns.Do(netns.Path(podNetnsName(flooder)), func() error {
				c, err := net.Dial("udp", net.JoinHostPort(target.Status.PodIP, "9"))
				if err != nil {
					return err
				}
				defer c.Close()
				b := make([]byte, 64)
				for {
					select {
					case <-stop:
						return nil
					default:
					}
					// About 25,000 packets a second: 25 times the
					// default drop budget of one CPU.
					for i := 0; i < 256; i++ {
						c.Write(b) // errors (ICMP) do not matter
					}
					sent.Add(256)
					time.Sleep(10 * time.Millisecond)
				}
			})
			if err != nil {
				t.Errorf("flood: %v", err)
			}
		}()
		var ports []int
		err := netns.Do(netns.Path(podNetnsName(client)), func() error {
			for i := 0; i < 50; i++ {
				c, err := net.DialTimeout("tcp", net.JoinHostPort(server.Status.PodIP, fmt.Sprint(lab.ServeTCPPort)), 2*time.Second)
				if err != nil {
					return err
				}
				ports = append(ports, c.LocalAddr().(*net.TCPAddr).Port)
				c.Close()
			}
			return nil
		})
		if err != nil {
			t.Errorf("connections during the flood: %v", err)
		}
		checkOut, checkErr := l.sinabro("check")
		time.Sleep(time.Until(floodStart.Add(5 * time.Second))) // a flood of 5 s at least
		close(stop)
		wg.Wait()
		if checkErr != nil {
			t.Errorf("lab check during a drop flood: %v\n%s", checkErr, checkOut)
		}
		after := agentMetrics(t, "node-1")
		sampled := after[`sinabro_flow_events_sampled_out_total{class="drop"}`] - before[`sinabro_flow_events_sampled_out_total{class="drop"}`]
		dropEvents := after[`sinabro_flow_events_total{type="drop"}`] - before[`sinabro_flow_events_total{type="drop"}`]
		t.Logf("figure: flood of %d UDP packets; node-1 sent %.0f drop events and sampled out %.0f; lost %v", sent.Load(), dropEvents, sampled, after["sinabro_flow_events_lost_total"])
		if sampled == 0 {
			t.Errorf("no drop sampled out: the flood (%d packets) did not reach the drop budget", sent.Load())
		}
		if after["sinabro_flow_events_sampled_out_total{class=\"flow\"}"] != 0 || after["sinabro_flow_events_lost_total"] != 0 {
			t.Errorf("flows sampled out %v, events lost %v: want none", after[`sinabro_flow_events_sampled_out_total{class="flow"}`], after["sinabro_flow_events_lost_total"])
		}
		seen := map[uint16]bool{}
		for _, f := range observe(t, l, "--last", "0", "--node", "node-1", "--type", "new", "--ip", client.Status.PodIP) {
			if f.Destination.IP.String() == server.Status.PodIP && f.Destination.Port == lab.ServeTCPPort {
				seen[f.Source.Port] = true
			}
		}
		missing := 0
		for _, p := range ports {
			if !seen[uint16(p)] {
				missing++
			}
		}
		if missing > 0 {
			t.Errorf("%d of %d connections made during the flood missing from node-1's flows", missing, len(ports))
		}
		if n := len(observe(t, l, "--last", "0", "--node", "node-1", "--drop-reason", "drop_policy", "--pod", "flood/"+target.Name)); n == 0 {
			t.Error("the flood's drops are not shown")
		}
	})

	// SIGKILL node-1's agent: while it is down, a cross-node connection
	// still works (the datapath stays), and its flow, kept in the pinned
	// ring, is shown once the agent is back.
	t.Run("agent killed", func(t *testing.T) {
		client, server := pods["node-2-pod-1"], pods["node-1-pod-1"]
		pid := readPid(t, filepath.Join(l.dir, "pids", "agent-node-1.pid"))
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		var port int
		err := netns.Do(netns.Path(podNetnsName(client)), func() error {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(server.Status.PodIP, fmt.Sprint(lab.ServeTCPPort)), 2*time.Second)
			if err != nil {
				return err
			}
			port = c.LocalAddr().(*net.TCPAddr).Port
			return c.Close()
		})
		if err != nil {
			t.Fatalf("connection while node-1's agent is down: %v", err)
		}
		waitFor(t, 60*time.Second, "node-1's agent back, its connection shown", func() (bool, string) {
			out, err := l.sinabro("observe", "--last", "0", "--node", "node-1", "--type", "new", "--port", fmt.Sprint(port), "-o", "json")
			if err != nil {
				return false, out
			}
			return strings.Contains(out, fmt.Sprintf(`"port":%d`, port)), out
		})
		if out, err := l.sinabro("check"); err != nil {
			t.Errorf("lab check after the agent restarted: %v\n%s", err, out)
		}
	})
}

// observe runs `lab observe -o json` with args and decodes its flows.
func observe(t *testing.T, l *testLab, args ...string) []flows.Flow {
	t.Helper()
	out, err := l.sinabro(append([]string{"observe", "-o", "json"}, args...)...)
	if err != nil {
		t.Fatalf("lab observe %v: %v\n%s", args, err, out)
	}
	var fs []flows.Flow
	dec := json.NewDecoder(strings.NewReader(out))
	for dec.More() {
		var f flows.Flow
		if err := dec.Decode(&f); err != nil {
			t.Fatalf("lab observe %v: %v\n%s", args, err, out)
		}
		fs = append(fs, f)
	}
	return fs
}
