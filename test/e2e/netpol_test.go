//go:build linux

package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sinabro-io/sinabro/internal/netpoloracle"
	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/netns"
	"github.com/sinabro-io/sinabro/pkg/policy"
)

// The ports the truth table's pods (and the external host) answer on.
var (
	netpolTCPPorts = []int{80, 81, 8080, 9000}
	netpolUDPPorts = []int{53, 5353, 9000}
)

// netpolLab is a lab with the truth table's namespaces and pods.
type netpolLab struct {
	l      *testLab
	cs     *kube.Client
	cfg    *lab.Config
	layout netpoloracle.Layout
	netns  map[netip.Addr]string // address → network namespace path (pods, the external host)
	where  map[netip.Addr]string // pod address → node
}

// TestNetworkPolicy is the truth-table test: every scenario of
// internal/netpoloracle (each NetworkPolicy feature, ingress and egress,
// same and other node) is applied to a lab, every probe runs for real
// (TCP connect, UDP echo) between pods and the external host, and the
// outcome is compared with the independent oracle's verdict. Then a label
// change, and a pod that must not start before its policy is in place.
func TestNetworkPolicy(t *testing.T) {
	l, _ := newNamedLab(t, labName, 2, 1, lab.KubeProxyNone)
	n := newNetpolLab(t, l)
	t.Run("truth table", n.truthTable)
	t.Run("label change", n.labelChange)
	t.Run("fail closed pod start", n.failClosed)
}

func newNetpolLab(t *testing.T, l *testLab) *netpolLab {
	t.Helper()
	cs, cfg, ext := labBasics(t, l)
	ctx := context.Background()
	nss, pods := netpoloracle.DefaultPods()
	n := &netpolLab{l: l, cs: cs, cfg: cfg, netns: map[netip.Addr]string{}, where: map[netip.Addr]string{}}
	for _, ns := range nss {
		_, err := cs.Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns.Name, Labels: ns.Labels}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range pods {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: p.Labels},
			Spec: corev1.PodSpec{NodeName: p.Node, Containers: []corev1.Container{{
				Name: "serve", Image: "sinabro-lab/serve", Ports: p.Ports,
			}}},
		}
		if _, err := cs.Pods(p.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for i, p := range pods {
		var got *corev1.Pod
		waitFor(t, 60*time.Second, "pod "+p.Namespace+"/"+p.Name+" running", func() (bool, string) {
			var err error
			got, err = cs.Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			return got.Status.Phase == corev1.PodRunning && got.Status.PodIP != "", string(got.Status.Phase)
		})
		pods[i].IP = netip.MustParseAddr(got.Status.PodIP)
		n.netns[pods[i].IP] = netns.Path(podNetnsName(got))
		n.where[pods[i].IP] = p.Node
	}
	n.netns[ext] = netns.Path(labNetns("ext"))
	nodeIPs := map[string][]netip.Addr{}
	nodes, err := cs.Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, node := range nodes.Items {
		for _, a := range node.Status.Addresses {
			if ip, err := netip.ParseAddr(a.Address); err == nil {
				nodeIPs[node.Name] = append(nodeIPs[node.Name], ip)
			}
		}
		// The external host reaches pods through their node, as a router
		// of the underlay would.
		if len(node.Spec.PodCIDRs) > 0 && len(nodeIPs[node.Name]) > 0 {
			if out, err := exec.Command("ip", "-n", labNetns("ext"), "route", "replace", node.Spec.PodCIDRs[0], "via", nodeIPs[node.Name][0].String()).CombinedOutput(); err != nil {
				t.Fatalf("route to %s: %v\n%s", node.Name, err, out)
			}
		}
	}
	n.layout = netpoloracle.Layout{Pods: pods, Namespaces: nss, NodeIPs: nodeIPs, Outside: ext}
	// Servers: TCP accepts and closes, UDP echoes.
	for addr, ns := range n.netns {
		if err := netns.Do(ns, func() error { return serveNetpol(t, addr) }); err != nil {
			t.Fatalf("servers on %s: %v", addr, err)
		}
	}
	return n
}

// serveNetpol opens the truth table's listeners on addr, in the calling
// thread's network namespace, until the test ends. A port already served
// (the lab's own pod server on TCP 8080) is fine.
func serveNetpol(t *testing.T, addr netip.Addr) error {
	for _, p := range netpolTCPPorts {
		ln, err := net.Listen("tcp4", netip.AddrPortFrom(addr, uint16(p)).String())
		if errors.Is(err, syscall.EADDRINUSE) {
			continue
		}
		if err != nil {
			return err
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
	for _, p := range netpolUDPPorts {
		pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(addr, uint16(p)).String())
		if errors.Is(err, syscall.EADDRINUSE) {
			continue
		}
		if err != nil {
			return err
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 512)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], from)
			}
		}()
	}
	return nil
}

// probe runs one probe from its source's network namespace: a TCP
// connect, or a UDP datagram echoed back (from any address: a reply the
// source's node masquerades still proves the way through). Denied probes
// time out; each gets a second try so that a lost first packet is no
// verdict.
func (n *netpolLab) probe(p netpoloracle.Probe) (bool, error) {
	from, to := endpointAddr(p.From), endpointAddr(p.To)
	ns, ok := n.netns[from]
	if !ok {
		return false, fmt.Errorf("no network namespace for %s", from)
	}
	target := netip.AddrPortFrom(to, uint16(p.Port))
	var ok2 bool
	err := netns.Do(ns, func() error {
		for try := 0; try < 2 && !ok2; try++ {
			switch p.Protocol {
			case corev1.ProtocolUDP:
				pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(from, 0).String())
				if err != nil {
					return err
				}
				nonce := make([]byte, 8)
				rand.Read(nonce)
				pc.WriteTo(nonce, net.UDPAddrFromAddrPort(target))
				pc.SetReadDeadline(time.Now().Add(600 * time.Millisecond))
				buf := make([]byte, 64)
				for {
					k, _, err := pc.ReadFrom(buf)
					if err != nil {
						break
					}
					if string(buf[:k]) == string(nonce) {
						ok2 = true
						break
					}
				}
				pc.Close()
			default:
				d := net.Dialer{Timeout: 600 * time.Millisecond, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
				c, err := d.Dial("tcp4", target.String())
				if err == nil {
					c.Close()
					ok2 = true
				}
			}
		}
		return nil
	})
	return ok2, err
}

func endpointAddr(e netpoloracle.Endpoint) netip.Addr {
	if e.Pod != nil {
		return e.Pod.IP
	}
	return e.IP
}

func (n *netpolLab) describe(e netpoloracle.Endpoint) string {
	if e.Pod != nil {
		return fmt.Sprintf("%s/%s(%s)", e.Pod.Namespace, e.Pod.Name, n.where[e.Pod.IP])
	}
	return e.IP.String()
}

// applyPolicies replaces the lab's NetworkPolicies with want and waits
// until every node's agent has compiled exactly them (the policy.json
// each writes after the datapath's maps); it returns how long that took.
func (n *netpolLab) applyPolicies(t *testing.T, want []networkingv1.NetworkPolicy) time.Duration {
	t.Helper()
	ctx := context.Background()
	start := time.Now()
	for _, ns := range []string{netpoloracle.NamespaceA, netpoloracle.NamespaceB} {
		list, err := n.cs.NetworkPolicies(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range list.Items {
			if err := n.cs.NetworkPolicies(ns).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				t.Fatal(err)
			}
		}
	}
	var names []string
	for _, p := range want {
		p := p
		if _, err := n.cs.NetworkPolicies(p.Namespace).Create(ctx, &p, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create %s/%s: %v", p.Namespace, p.Name, err)
		}
		names = append(names, p.Namespace+"/"+p.Name)
	}
	slices.Sort(names)
	waitFor(t, 10*time.Second, fmt.Sprintf("agents compiled %v", names), func() (bool, string) {
		for _, node := range []string{netpoloracle.Node1, netpoloracle.Node2} {
			meta, err := n.meta(node)
			if err != nil {
				return false, err.Error()
			}
			var have []string
			for _, p := range meta.Policies {
				have = append(have, p.String())
			}
			slices.Sort(have)
			if !slices.Equal(have, names) {
				return false, fmt.Sprintf("%s has %v", node, have)
			}
		}
		return true, ""
	})
	return time.Since(start)
}

func (n *netpolLab) meta(node string) (*policy.Meta, error) {
	b, err := os.ReadFile(filepath.Join(n.l.dir, "nodes", node, "state", "policy.json"))
	if err != nil {
		return nil, err
	}
	var m policy.Meta
	return &m, json.Unmarshal(b, &m)
}

// explain runs `sinabro debug policy explain` on the node of a pod end.
func (n *netpolLab) explain(p netpoloracle.Probe) string {
	var out []string
	for _, e := range []netpoloracle.Endpoint{p.From, p.To} {
		if e.Pod == nil {
			continue
		}
		node := n.where[e.Pod.IP]
		cmd := exec.Command(binary, "debug", "policy", "explain", "--bpf-root", filepath.Join(n.cfg.BPFRoot, node),
			"--state-dir", filepath.Join(n.l.dir, "nodes", node, "state"),
			"--from", endpointAddr(p.From).String(), "--to", endpointAddr(p.To).String(),
			"--port", fmt.Sprintf("%d/%s", p.Port, strings.ToLower(string(p.Protocol))))
		b, _ := cmd.CombinedOutput()
		out = append(out, "on "+node+": "+strings.TrimSpace(string(b)))
	}
	return strings.Join(out, "\n")
}

func sctpAvailable() bool {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, syscall.IPPROTO_SCTP)
	if err != nil {
		return false
	}
	syscall.Close(fd)
	return true
}

func (n *netpolLab) truthTable(t *testing.T) {
	var probes, mismatches int
	var slowest time.Duration
	for _, sc := range netpoloracle.Scenarios(n.layout) {
		if sc.NeedsSCTP && !sctpAvailable() {
			// Not a skip of the test: the SCTP path is proven by
			// BPF_PROG_RUN (pkg/datapath TestPolicyLookups) instead.
			t.Logf("scenario %s not probed: this kernel has no SCTP sockets", sc.Name)
			continue
		}
		took := n.applyPolicies(t, sc.Policies)
		slowest = max(slowest, took)
		world := n.layout.World(sc.Policies)
		type result struct {
			p    netpoloracle.Probe
			got  bool
			want netpoloracle.Verdict
			err  error
		}
		results := make([]result, len(sc.Probes))
		var wg sync.WaitGroup
		for i, p := range sc.Probes {
			wg.Add(1)
			go func() {
				defer wg.Done()
				got, err := n.probe(p)
				results[i] = result{p, got, world.Evaluate(p), err}
			}()
		}
		wg.Wait()
		for _, r := range results {
			probes++
			if r.err != nil {
				t.Errorf("%s: probe %s → %s %d/%s: %v", sc.Name, n.describe(r.p.From), n.describe(r.p.To), r.p.Port, r.p.Protocol, r.err)
				continue
			}
			if r.got == r.want.Allowed {
				continue
			}
			mismatches++
			pols, _ := json.Marshal(sc.Policies)
			t.Errorf("scenario %s: %s → %s %d/%s: got allowed=%v, oracle says %v (%s)\npolicies: %s\nexplain:\n%s",
				sc.Name, n.describe(r.p.From), n.describe(r.p.To), r.p.Port, r.p.Protocol, r.got, r.want.Allowed, r.want.Reason, pols, n.explain(r.p))
		}
	}
	n.applyPolicies(t, nil)
	t.Logf("truth table: %d probes, %d mismatches; policies enforced on both nodes at most %s after they were written", probes, mismatches, slowest.Round(time.Millisecond))
}

// labelChange: a rule allowing np-a/cli stops allowing it once its label
// changes, and allows it again when the label comes back, each within a
// second.
func (n *netpolLab) labelChange(t *testing.T) {
	pod := func(ns, name string) *netpoloracle.Pod {
		for i := range n.layout.Pods {
			if p := &n.layout.Pods[i]; p.Namespace == ns && p.Name == name {
				return p
			}
		}
		t.Fatalf("no pod %s/%s", ns, name)
		return nil
	}
	web, cli := pod(netpoloracle.NamespaceA, "web"), pod(netpoloracle.NamespaceA, "cli")
	allow := networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "web-from-cli", Namespace: netpoloracle.NamespaceA},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
				PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "cli"}},
			}}}},
		},
	}
	n.applyPolicies(t, []networkingv1.NetworkPolicy{allow})
	defer n.applyPolicies(t, nil)
	probe := netpoloracle.Probe{From: netpoloracle.Endpoint{Pod: cli}, To: netpoloracle.Endpoint{Pod: web}, Port: 80, Protocol: corev1.ProtocolTCP}
	if ok, err := n.probe(probe); err != nil || !ok {
		t.Fatalf("cli → web before the label change: allowed=%v err=%v", ok, err)
	}
	relabel := func(app string) {
		patch := fmt.Sprintf(`{"metadata":{"labels":{"app":%q}}}`, app)
		if _, err := n.cs.Pods(cli.Namespace).Patch(context.Background(), cli.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		app     string
		allowed bool
	}{{"not-cli", false}, {"cli", true}} {
		start := time.Now()
		relabel(c.app)
		var got bool
		for time.Since(start) < 5*time.Second {
			if got, _ = n.probe(probe); got == c.allowed {
				break
			}
		}
		took := time.Since(start)
		if got != c.allowed {
			t.Fatalf("cli relabelled app=%s: cli → web allowed=%v after 5 s, want %v", c.app, got, c.allowed)
		}
		t.Logf("cli relabelled app=%s: cli → web allowed=%v after %s", c.app, got, took.Round(time.Millisecond))
		if took > time.Second+1300*time.Millisecond { // a denied probe itself takes 1.2 s
			t.Errorf("the label change took %s to apply, want about a second", took)
		}
	}
}

// failClosed: with node-1's agent stopped (SIGSTOP), a new pod's CNI ADD
// does not finish (its policy state cannot be written); once the agent
// runs again the pod starts, and the first probe to it is already denied
// by the default-deny policy that selects it.
func (n *netpolLab) failClosed(t *testing.T) {
	ctx := context.Background()
	deny := networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "deny-new", Namespace: netpoloracle.NamespaceA},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "new"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		},
	}
	n.applyPolicies(t, []networkingv1.NetworkPolicy{deny})
	defer n.applyPolicies(t, nil)
	pid := readPid(t, filepath.Join(n.l.dir, "pids", "agent-"+netpoloracle.Node1+".pid"))
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	suffix := make([]byte, 3)
	rand.Read(suffix)
	name := "new-" + hex.EncodeToString(suffix)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: netpoloracle.NamespaceA, Labels: map[string]string{"app": "new"}},
		Spec:       corev1.PodSpec{NodeName: netpoloracle.Node1, Containers: []corev1.Container{{Name: "serve", Image: "sinabro-lab/serve"}}},
	}
	if _, err := n.cs.Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	got, err := n.cs.Pods(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase == corev1.PodRunning {
		t.Fatalf("pod %s is running while the agent is stopped: CNI ADD did not wait for its policy state", name)
	}
	t.Logf("agent stopped: pod %s still %q after 3 s (CNI ADD waits)", name, got.Status.Phase)
	syscall.Kill(pid, syscall.SIGCONT)
	stopped = false
	waitFor(t, 60*time.Second, "pod "+name+" running", func() (bool, string) {
		got, err = n.cs.Pods(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return got.Status.Phase == corev1.PodRunning && got.Status.PodIP != "", string(got.Status.Phase)
	})
	ip := netip.MustParseAddr(got.Status.PodIP)
	n.netns[ip] = netns.Path(podNetnsName(got))
	if err := netns.Do(n.netns[ip], func() error { return serveNetpol(t, ip) }); err != nil {
		t.Fatal(err)
	}
	newPod := &netpoloracle.Pod{Namespace: pod.Namespace, Name: name, IP: ip, Node: netpoloracle.Node1}
	for _, from := range n.layout.Pods[:2] {
		from := from
		ok, err := n.probe(netpoloracle.Probe{From: netpoloracle.Endpoint{Pod: &from}, To: netpoloracle.Endpoint{Pod: newPod}, Port: 80, Protocol: corev1.ProtocolTCP})
		if err != nil || ok {
			t.Errorf("%s/%s → new pod %s right after it started: allowed=%v err=%v, want denied", from.Namespace, from.Name, name, ok, err)
		}
	}
	// The drops are counted under the policy that isolates the pod.
	key := `sinabro_policy_drops_total{direction="ingress",namespace="np-a",policy="deny-new"}`
	if n := agentMetrics(t, netpoloracle.Node1)[key]; n == 0 {
		t.Errorf("%s = 0 on node-1 after denied probes", key)
	} else {
		t.Logf("%s %.0f", key, n)
	}
}

// TestNetworkPolicyThroughServices: a pod's egress policy applies to the
// Service's backend, whoever translates the ClusterIP — Sinabro's socket
// load balancer (before the packet exists) or kube-proxy (in the stack,
// after host routing has seen the packet: the check waits for the
// translated packet on its way out).
func TestNetworkPolicyThroughServices(t *testing.T) {
	for _, mode := range []string{lab.KubeProxyNone, "nftables"} {
		t.Run("kube-proxy "+mode, func(t *testing.T) {
			l, _ := newNamedLab(t, labName, 2, 2, mode)
			cs, cfg, _ := labBasics(t, l)
			ctx := context.Background()
			clusterIP := func(svc string) string {
				s, err := cs.Services("default").Get(ctx, svc, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				return net.JoinHostPort(s.Spec.ClusterIP, "80")
			}
			client, err := cs.Pods("default").Get(ctx, "node-1-pod-1", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			dial := func(addr string) bool {
				cmd := exec.Command("ip", "netns", "exec", podNetnsName(client), os.Args[0])
				cmd.Env = append(os.Environ(), helperEnv+"=dial", "SINABRO_E2E_ADDR="+addr)
				f, err := os.Open(cfg.NodePodCgroup(client.Spec.NodeName))
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
				return cmd.Run() == nil
			}
			allowed, other := clusterIP("svc-node-2-pod-1"), clusterIP("svc-node-1-pod-2")
			if !dial(allowed) || !dial(other) {
				t.Fatal("Services unreachable before any policy")
			}
			pol := &networkingv1.NetworkPolicy{
				ObjectMeta: metav1.ObjectMeta{Name: "egress-to-node-2-pod-1", Namespace: "default"},
				Spec: networkingv1.NetworkPolicySpec{
					PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"lab.sinabro.io/pod": "node-1-pod-1"}},
					PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
					Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{
						PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"lab.sinabro.io/pod": "node-2-pod-1"}},
					}}}},
				},
			}
			if _, err := cs.NetworkPolicies("default").Create(ctx, pol, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			took := waitFor(t, 5*time.Second, "the other Service denied", func() (bool, string) { return !dial(other), "" })
			if !dial(allowed) {
				t.Errorf("ClusterIP %s of the allowed backend (node-2-pod-1) denied", allowed)
			}
			if dial(other) {
				t.Errorf("ClusterIP %s of a backend the policy does not allow (node-1-pod-2) reachable", other)
			}
			t.Logf("egress policy through ClusterIPs enforced %s after it was created", took.Round(time.Millisecond))
		})
	}
}
