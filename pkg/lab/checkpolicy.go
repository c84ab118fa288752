package lab

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sinabro-io/sinabro/pkg/kube"
)

// The NetworkPolicy row of `lab check`: a temporary policy lets one pod be
// reached only from a pod of its own node on the test server's TCP port;
// the check probes what it allows and denies, then removes it and probes
// that traffic flows again.

// checkPolicyName is the temporary policy's name (in the lab's pod namespace).
const checkPolicyName = "sinabro-lab-check"

// PolicyProbe is one probe of the NetworkPolicy check.
type PolicyProbe struct {
	What        string
	Src, Dst    Endpoint
	Proto       string
	WantAllowed bool
	OK          bool
	Took        time.Duration // for waits: until the verdict held
	Err         string
}

func (p *PolicyProbe) run(timeout time.Duration) bool {
	var err error
	switch p.Proto {
	case "udp":
		_, _, err = probeUDP(p.Src, p.Dst.IP, ServeUDPPort, timeout, false)
	default:
		_, _, err = probeTCP(p.Src, p.Dst.IP, ServeTCPPort, timeout, false)
	}
	allowed := err == nil
	p.OK = allowed == p.WantAllowed
	p.Err = ""
	if !p.OK {
		p.Err = fmt.Sprintf("allowed=%v, want %v", allowed, p.WantAllowed)
		if err != nil {
			p.Err += ": " + err.Error()
		}
	}
	return p.OK
}

// until probes p until it gives the wanted verdict, for at most wait.
func (p *PolicyProbe) until(wait, timeout time.Duration) {
	start := time.Now()
	for !p.run(timeout) && time.Since(start) < wait {
		time.Sleep(100 * time.Millisecond)
	}
	p.Took = time.Since(start)
}

// checkPolicy runs the NetworkPolicy check; nil when the lab has no pods on
// two nodes.
func checkPolicy(ctx context.Context, cs *kube.Client, nodes, pods []Endpoint) ([]PolicyProbe, error) {
	if len(pods) < 2 {
		return nil, nil
	}
	target := pods[0]
	var same, other *Endpoint
	for i := range pods[1:] {
		p := &pods[i+1]
		if p.Node == target.Node && same == nil {
			same = p
		}
		if p.Node != target.Node && other == nil {
			other = p
		}
	}
	var node *Endpoint
	for i := range nodes {
		if nodes[i].Name == target.Node {
			node = &nodes[i]
		}
	}
	if other == nil || node == nil {
		return nil, nil
	}
	allowFrom := []networkingv1.NetworkPolicyPeer{}
	if same != nil {
		allowFrom = append(allowFrom, networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{labelPod: same.Name}}})
	}
	tcp := corev1.ProtocolTCP
	port := intstr.FromInt32(ServeTCPPort)
	pol := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: checkPolicyName, Namespace: podNamespace},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{labelPod: target.Name}},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: allowFrom, Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}}}},
		},
	}
	if len(allowFrom) == 0 {
		pol.Spec.Ingress = nil // default deny
	}
	del := func() error {
		err := cs.NetworkPolicies(podNamespace).Delete(ctx, checkPolicyName, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete NetworkPolicy %s: %w", checkPolicyName, err)
		}
		return nil
	}
	if err := del(); err != nil {
		return nil, err
	}
	if _, err := cs.NetworkPolicies(podNamespace).Create(ctx, pol, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create NetworkPolicy %s: %w", checkPolicyName, err)
	}
	const timeout, wait = 700 * time.Millisecond, 5 * time.Second
	var out []PolicyProbe
	denied := PolicyProbe{What: "pod of another node, denied", Src: *other, Dst: target, Proto: "tcp"}
	denied.until(wait, timeout)
	out = append(out, denied)
	if same != nil {
		for _, p := range []PolicyProbe{
			{What: "pod of the same node, allowed (TCP port)", Src: *same, Dst: target, Proto: "tcp", WantAllowed: true},
			{What: "pod of the same node, denied (UDP port)", Src: *same, Dst: target, Proto: "udp"},
		} {
			p.run(timeout)
			out = append(out, p)
		}
	}
	kubelet := PolicyProbe{What: "its node (kubelet probes), allowed", Src: *node, Dst: target, Proto: "tcp", WantAllowed: true}
	kubelet.run(timeout)
	out = append(out, kubelet)
	if err := del(); err != nil {
		return out, err
	}
	again := PolicyProbe{What: "policy deleted: pod of another node, allowed", Src: *other, Dst: target, Proto: "tcp", WantAllowed: true}
	again.until(wait, timeout)
	out = append(out, again)
	return out, nil
}

func printPolicyProbes(out io.Writer, probes []PolicyProbe) []string {
	if len(probes) == 0 {
		return nil
	}
	fmt.Fprintf(out, "\nNetworkPolicy (a temporary policy %q: %s reachable on TCP %d from a pod of its node only)\n",
		checkPolicyName, probes[0].Dst.Name, ServeTCPPort)
	tw := tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	var errs []string
	for _, p := range probes {
		took := ""
		if p.Took > 0 {
			took = "within " + fmtLatency(p.Took)
		}
		fmt.Fprintf(tw, "  %s\t%s (%s) → %s\t%s\t%s %s\n", p.What, p.Src.Name, p.Src.IP, p.Dst.Name, p.Proto, mark(p.OK), took)
		if !p.OK {
			errs = append(errs, fmt.Sprintf("  ✗ NetworkPolicy %s %s→%s %s: %s", p.What, p.Src.Name, p.Dst.Name, p.Proto, p.Err))
		}
	}
	tw.Flush()
	return errs
}
