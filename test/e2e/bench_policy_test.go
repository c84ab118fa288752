//go:build linux

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sinabro-io/sinabro/internal/tcpload"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab"
)

// TestBenchPolicy compares the datapath with no NetworkPolicy against
// 10,000 rules selecting the pods under test (100 policies of 100 rules:
// 5,000 ingress and 5,000 egress, each an ipBlock /32 on its own port, plus
// one policy allowing the benchmark's own traffic): connection rate and
// request/response rate, same node and across nodes, A/B interleaved in
// each round. Then the time from 1,000 rule changes to the last of them
// enforced, and the agents' memory with the rules in place.
func TestBenchPolicy(t *testing.T) {
	needBench(t)
	// Acceleration off: the benchmark's bytes must cross tc, where policy is.
	l, _ := newNamedLab(t, labName, 2, 2, lab.KubeProxyNone, "--agent-arg=--tcp-acceleration=false", "--timeout=10m")
	cs, cfg, _ := labBasics(t, l)
	ctx := context.Background()
	pods, run := startBenchWorkload(t, l)
	server := pods["node-1-pod-2"]

	rules := benchPolicies(100, 100)
	apply := func(on bool) {
		var wg sync.WaitGroup
		errs := make(chan error, len(rules))
		for _, p := range rules {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var err error
				if on {
					if _, err = cs.NetworkPolicies("default").Create(ctx, p, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
						err = nil
					}
				} else if err = cs.NetworkPolicies("default").Delete(ctx, p.Name, metav1.DeleteOptions{}); apierrors.IsNotFound(err) {
					err = nil
				}
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		want := 0
		if on {
			want = len(rules)
		}
		waitFor(t, 2*time.Minute, fmt.Sprintf("agents compiled %d policies", want), func() (bool, string) {
			for _, node := range []string{"node-1", "node-2"} {
				m, err := (&netpolLab{l: l}).meta(node)
				if err != nil {
					return false, fmt.Sprintf("%s: %v", node, err)
				}
				if len(m.Policies) != want {
					return false, fmt.Sprintf("%s has %d", node, len(m.Policies))
				}
			}
			return true, ""
		})
		// Then until both agents are done (a compilation of 10,000 rules
		// takes a core for a fraction of a second): no generation moved
		// for 3 s.
		quietSince, last := time.Now(), [2]uint32{}
		for time.Since(quietSince) < 3*time.Second {
			var now [2]uint32
			for i, node := range []string{"node-1", "node-2"} {
				m, err := datapath.OpenPolicyMaps(filepath.Join(cfg.BPFRoot, node))
				if err != nil {
					t.Fatal(err)
				}
				now[i], err = m.Generation()
				m.Close()
				if err != nil {
					t.Fatal(err)
				}
			}
			if now != last {
				quietSince, last = time.Now(), now
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	const rounds = 5
	results := benchAB(rounds, apply, pods, run)
	// With the rules in place (the last round ends with them on or off).
	apply(true)
	rss := agentRSS(t, l)
	update := benchPolicyUpdate(t, cs, rules, pods["node-2-pod-1"], server)

	var b strings.Builder
	fmt.Fprintf(&b, "NetworkPolicy benchmark: 0 policies vs 10,000 rules selecting the pods under test, %d rounds interleaved (median)\n\n", rounds)
	benchABTable(&b, results, "0 policies", "10,000 rules")
	fmt.Fprintf(&b, "\n1,000 rule changes (10 policies rewritten) to the last one enforced on the other node: %s\n", update.Round(time.Millisecond))
	fmt.Fprintf(&b, "agent RSS with 10,000 rules (MiB): %s\n", rss)
	t.Log("\n" + b.String())
	fmt.Print(b.String())
}

// benchPolicies returns n policies of m rules each selecting every pod of
// the default namespace (half ingress, half egress: an ipBlock /32 on its
// own port each), and a last one allowing the benchmark's traffic.
func benchPolicies(n, m int) []*networkingv1.NetworkPolicy {
	var out []*networkingv1.NetworkPolicy
	for i := range n {
		p := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bench-%03d", i), Namespace: "default"},
			Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}},
		}
		for j := range m {
			peer := []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: fmt.Sprintf("10.200.%d.%d/32", i, j)}}}
			port := []networkingv1.NetworkPolicyPort{{Port: ptrTo(intstr.FromInt32(int32(20000 + j)))}}
			if j%2 == 0 {
				p.Spec.Ingress = append(p.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: peer, Ports: port})
			} else {
				p.Spec.Egress = append(p.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: peer, Ports: port})
			}
		}
		out = append(out, p)
	}
	all := []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{}}}
	ports := []networkingv1.NetworkPolicyPort{{Port: ptrTo(intstr.FromInt32(workloadPort))}}
	out = append(out, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "bench-allow", Namespace: "default"},
		Spec: networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: all, Ports: ports}},
			Egress:      []networkingv1.NetworkPolicyEgressRule{{To: all, Ports: ports}},
		},
	})
	return out
}

// benchPolicyUpdate rewrites 10 of the policies (1,000 rules: new ports),
// the last also allowing the server's HTTP port, and returns the time from
// the first write until a client on the other node connects to that port.
func benchPolicyUpdate(t *testing.T, cs *kube.Client, rules []*networkingv1.NetworkPolicy, client, server labPod) time.Duration {
	t.Helper()
	ctx := context.Background()
	dial := func() bool {
		cmd := exec.Command("ip", "netns", "exec", client.netns, os.Args[0])
		cmd.Env = append(os.Environ(), helperEnv+"=dial", "SINABRO_E2E_ADDR="+net.JoinHostPort(server.ip, strconv.Itoa(httpPort)))
		return cmd.Run() == nil
	}
	if dial() {
		t.Fatal("the HTTP port is reachable before the update allows it")
	}
	start := time.Now()
	for i, p := range rules[:10] {
		cur, err := cs.NetworkPolicies("default").Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for k := range cur.Spec.Ingress {
			cur.Spec.Ingress[k].Ports[0].Port = ptrTo(intstr.FromInt32(int32(30000 + k)))
		}
		for k := range cur.Spec.Egress {
			cur.Spec.Egress[k].Ports[0].Port = ptrTo(intstr.FromInt32(int32(30000 + k)))
		}
		if i == 9 {
			all := []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{}}}
			port := []networkingv1.NetworkPolicyPort{{Port: ptrTo(intstr.FromInt32(httpPort))}}
			cur.Spec.Ingress = append(cur.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: all, Ports: port})
			cur.Spec.Egress = append(cur.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: all, Ports: port})
		}
		if _, err := cs.NetworkPolicies("default").Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for !dial() {
		if time.Since(start) > time.Minute {
			t.Fatal("the updated policies were not enforced within a minute")
		}
	}
	return time.Since(start)
}

func ptrTo[T any](v T) *T { return &v }

// benchPaths are the A/B benchmarks' paths: a client pod on the server's
// node, and one on the other node.
var benchPaths = []struct{ name, client string }{{"same node", "node-1-pod-1"}, {"across nodes", "node-2-pod-1"}}

// startBenchWorkload starts the workload server in node-1-pod-2 of a 2-node
// lab and returns the pods and a function running a client scenario.
func startBenchWorkload(t *testing.T, l *testLab) (map[string]labPod, func(labPod, string) tcpload.Result) {
	t.Helper()
	cs, _, _ := labBasics(t, l)
	ctx := context.Background()
	pods := map[string]labPod{}
	for _, name := range []string{"node-1-pod-1", "node-1-pod-2", "node-2-pod-1"} {
		p, err := cs.Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil || p.Status.PodIP == "" {
			t.Fatalf("pod %s: %v", name, err)
		}
		pods[name] = labPod{name: name, node: p.Spec.NodeName, ip: p.Status.PodIP, netns: lab.PodNetnsOf(labName, string(p.UID))}
	}
	server := pods["node-1-pod-2"]
	for _, name := range []string{"node-1-pod-1", "node-2-pod-1"} {
		out, err := exec.Command("ip", "netns", "exec", pods[name].netns, "sysctl", "-qw",
			"net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=10000 60999").CombinedOutput()
		if err != nil {
			t.Fatalf("sysctl in %s: %v: %s", name, err, out)
		}
	}
	srv := exec.Command("ip", "netns", "exec", server.netns, os.Args[0])
	srv.Env = append(os.Environ(), helperEnv+"=server", "SINABRO_E2E_ADDR="+server.ip)
	out, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	if line, _ := bufio.NewReader(out).ReadString('\n'); strings.TrimSpace(line) != "ready" {
		t.Fatalf("workload server: %q", line)
	}
	run := func(client labPod, scenario string) tcpload.Result {
		cmd := exec.Command("ip", "netns", "exec", client.netns, os.Args[0])
		cmd.Env = append(os.Environ(), helperEnv+"=client", "SINABRO_E2E_ADDR="+server.ip, "SINABRO_E2E_SCENARIO="+scenario)
		b, _ := cmd.CombinedOutput()
		r := parseResult(t, string(b))
		if !r.OK {
			t.Fatalf("%s from %s: %s", scenario, client.name, r.Err)
		}
		return r
	}
	return pods, run
}

// benchFigures are one measurement: connections and requests per second.
type benchFigures struct{ conns, reqs float64 }

// benchAB measures each path with the setting off and on (apply), rounds
// times, who goes first alternating: path → on → figures.
func benchAB(rounds int, apply func(on bool), pods map[string]labPod, run func(labPod, string) tcpload.Result) map[string]map[bool][]benchFigures {
	const secs = 2
	results := map[string]map[bool][]benchFigures{}
	for r := range rounds {
		for _, on := range []bool{r%2 == 1, r%2 == 0} {
			apply(on)
			for _, p := range benchPaths {
				client := pods[p.client]
				run(client, "many:20") // warm: neighbours, conntrack
				c := run(client, fmt.Sprintf("parallel:2:many-for:%d", secs))
				q := run(client, fmt.Sprintf("parallel:2:pingpong-for:%d:100:b", secs))
				if results[p.name] == nil {
					results[p.name] = map[bool][]benchFigures{}
				}
				results[p.name][on] = append(results[p.name][on], benchFigures{float64(c.Conns) / secs, float64(q.Sent) / 100 / secs})
			}
		}
	}
	return results
}

// benchABTable writes benchAB's medians as a Markdown table.
func benchABTable(b *strings.Builder, results map[string]map[bool][]benchFigures, off, on string) {
	fmt.Fprintf(b, "| path | conn/s, %s | conn/s, %s | ratio | req/s, %s | req/s, %s | ratio |\n", off, on, off, on)
	fmt.Fprintln(b, "|---|---|---|---|---|---|---|")
	for _, p := range benchPaths {
		var c0, c1, q0, q1 []float64
		for _, f := range results[p.name][false] {
			c0, q0 = append(c0, f.conns), append(q0, f.reqs)
		}
		for _, f := range results[p.name][true] {
			c1, q1 = append(c1, f.conns), append(q1, f.reqs)
		}
		fmt.Fprintf(b, "| %s | %.0f | %.0f | %.3f | %.0f | %.0f | %.3f |\n", p.name, median(c0), median(c1), median(c1)/median(c0),
			median(q0), median(q1), median(q1)/median(q0))
	}
}
