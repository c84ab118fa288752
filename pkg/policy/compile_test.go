package policy

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sinabro-io/sinabro/pkg/datapath"
)

func pod(ns, name, ip string, lbls map[string]string, ports ...corev1.ContainerPort) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbls},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Ports: ports}}},
		Status:     corev1.PodStatus{PodIP: ip, Phase: corev1.PodRunning},
	}
}

func proto(p corev1.Protocol) *corev1.Protocol { return &p }

// TestCompile checks the entries the datapath gets for what the lab's
// truth table cannot probe or see: SCTP, egress named ports resolved per
// destination pod, the node's addresses, Service addresses, a pod known
// only from its veth (no address in its status yet), and identities
// shared by pods no rule tells apart.
func TestCompile(t *testing.T) {
	web := netip.MustParseAddr("10.244.0.5")
	in := Input{
		Pods: []*corev1.Pod{
			pod("a", "web", "", map[string]string{"app": "web"}), // address from the kernel only
			pod("a", "db-1", "10.244.1.7", map[string]string{"app": "db"}, corev1.ContainerPort{Name: "sql", ContainerPort: 5432}),
			pod("a", "db-2", "10.244.1.8", map[string]string{"app": "db"}, corev1.ContainerPort{Name: "sql", ContainerPort: 5433}),
			pod("a", "db-3", "10.244.1.9", map[string]string{"app": "db"}, corev1.ContainerPort{Name: "sql", ContainerPort: 5432}),
		},
		Namespaces: []*corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "a"}}},
		Local:      map[netip.Addr]Local{web: {Ifindex: 9, Namespace: "a", Name: "web"}},
		HostIPs:    []netip.Addr{netip.MustParseAddr("172.31.0.11")},
		ServiceIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10")},
		Policies: []*networkingv1.NetworkPolicy{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "web"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: proto(corev1.ProtocolSCTP), Port: ptr(intstr.FromInt32(9))}},
				}},
				Egress: []networkingv1.NetworkPolicyEgressRule{{
					To:    []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromString("sql"))}},
				}},
			},
		}},
	}
	out := NewCompiler().Compile(in)
	if len(out.Warnings) > 0 {
		t.Fatalf("warnings: %v", out.Warnings)
	}
	ep, ok := out.State.Endpoints[web]
	if !ok || ep.Ifindex != 9 || !ep.Isolated[datapath.Ingress] || !ep.Isolated[datapath.Egress] {
		t.Fatalf("web's entry = %+v (present %v), want ifindex 9, isolated both ways", ep, ok)
	}
	id := func(ip string) uint32 {
		v, ok := out.State.IPCache[netip.PrefixFrom(netip.MustParseAddr(ip), 32)]
		if !ok {
			t.Fatalf("%s not in the ipcache", ip)
		}
		return v
	}
	if id("10.244.1.7") != id("10.244.1.9") || id("10.244.1.7") == id("10.244.1.8") {
		t.Errorf("identities db-1 %d, db-2 %d, db-3 %d: want db-1 = db-3 (same labels and ports), db-2 apart (another sql port)",
			id("10.244.1.7"), id("10.244.1.8"), id("10.244.1.9"))
	}
	if id("10.96.0.10") != datapath.ServiceIdentity {
		t.Errorf("the ClusterIP's identity is %d, want %d", id("10.96.0.10"), datapath.ServiceIdentity)
	}
	want := map[datapath.PolicyRuleKey]bool{
		// SCTP 9 from anyone.
		{Pod: web, Identity: AnyIdentity, Dir: datapath.Ingress, Proto: 132, Port: 9, PortBits: 16}: true,
		// The node's address, always.
		{Pod: web, Identity: id("172.31.0.11"), Dir: datapath.Ingress}: true,
		// "sql" is 5432 on db-1 and db-3, 5433 on db-2.
		{Pod: web, Identity: id("10.244.1.7"), Dir: datapath.Egress, Proto: 6, Port: 5432, PortBits: 16}: true,
		{Pod: web, Identity: id("10.244.1.8"), Dir: datapath.Egress, Proto: 6, Port: 5433, PortBits: 16}: true,
	}
	for k := range want {
		if _, ok := out.State.Rules[k]; !ok {
			t.Errorf("missing rule entry %+v", k)
		}
	}
	if len(out.State.Rules) != len(want) {
		t.Errorf("%d rule entries, want %d: %+v", len(out.State.Rules), len(want), out.State.Rules)
	}
}

// TestCompileScale: 10,000 ipBlock rules selecting two local pods compile
// in well under a second (the agent compiles on every change).
func TestCompileScale(t *testing.T) {
	in := Input{
		Pods:       []*corev1.Pod{pod("a", "p1", "10.244.0.2", nil), pod("a", "p2", "10.244.0.3", nil)},
		Namespaces: []*corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "a"}}},
		Local: map[netip.Addr]Local{
			netip.MustParseAddr("10.244.0.2"): {Ifindex: 2, Namespace: "a", Name: "p1"},
			netip.MustParseAddr("10.244.0.3"): {Ifindex: 3, Namespace: "a", Name: "p2"},
		},
	}
	for i := range 100 {
		p := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: fmt.Sprintf("p%d", i)}}
		for j := range 100 {
			p.Spec.Ingress = append(p.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{
				From:  []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: fmt.Sprintf("10.200.%d.%d/32", i, j)}}},
				Ports: []networkingv1.NetworkPolicyPort{{Port: ptr(intstr.FromInt32(int32(10000 + j)))}},
			})
		}
		in.Policies = append(in.Policies, p)
	}
	c := NewCompiler()
	start := time.Now()
	out := c.Compile(in)
	took := time.Since(start)
	if n := len(out.State.Rules); n != 20000 {
		t.Errorf("%d rule entries, want 20,000 (10,000 rules × 2 pods)", n)
	}
	t.Logf("10,000 rules × 2 pods: %d entries, %d addresses, compiled in %s", len(out.State.Rules), len(out.State.IPCache), took)
	if took > 2*time.Second {
		t.Errorf("compiling 10,000 rules took %s", took)
	}
}

func ptr[T any](v T) *T { return &v }
