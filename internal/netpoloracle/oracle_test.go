package netpoloracle

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// testLayout builds the default layout with the given pod IPs (keyed
// "ns/name"), node IPs and outside IP.
func testLayout(t *testing.T, ips map[string]string, nodes map[string]string, outside string) Layout {
	t.Helper()
	nss, pods := DefaultPods()
	for i := range pods {
		key := pods[i].Namespace + "/" + pods[i].Name
		s, ok := ips[key]
		if !ok {
			t.Fatalf("no IP for %s", key)
		}
		pods[i].IP = netip.MustParseAddr(s)
	}
	nodeIPs := map[string][]netip.Addr{}
	for n, s := range nodes {
		nodeIPs[n] = []netip.Addr{netip.MustParseAddr(s)}
	}
	return Layout{Pods: pods, Namespaces: nss, NodeIPs: nodeIPs, Outside: netip.MustParseAddr(outside)}
}

// perNodeV4: each node has its own /24 pod CIDR.
func perNodeV4(t *testing.T) Layout {
	return testLayout(t, map[string]string{
		"np-a/web": "10.244.1.10", "np-a/cli": "10.244.1.11", "np-b/cli": "10.244.1.12",
		"np-a/api": "10.244.2.10", "np-b/db": "10.244.2.11",
	}, map[string]string{Node1: "192.168.100.11", Node2: "192.168.100.12"}, "192.168.100.200")
}

// flatV4: all pods in one /24.
func flatV4(t *testing.T) Layout {
	return testLayout(t, map[string]string{
		"np-a/web": "10.0.0.10", "np-a/cli": "10.0.0.11", "np-b/cli": "10.0.0.12",
		"np-a/api": "10.0.0.20", "np-b/db": "10.0.0.21",
	}, map[string]string{Node1: "10.1.0.1", Node2: "10.1.0.2"}, "172.16.0.9")
}

// scatteredV4: pods of a node far apart, so the ipBlocks must widen.
func scatteredV4(t *testing.T) Layout {
	return testLayout(t, map[string]string{
		"np-a/web": "10.1.0.10", "np-a/cli": "10.9.0.11", "np-b/cli": "10.1.0.12",
		"np-a/api": "10.2.0.20", "np-b/db": "10.200.0.21",
	}, map[string]string{Node1: "10.100.0.1", Node2: "10.100.0.2"}, "198.51.100.7")
}

func perNodeV6(t *testing.T) Layout {
	return testLayout(t, map[string]string{
		"np-a/web": "fd00:10:244:1::a", "np-a/cli": "fd00:10:244:1::b", "np-b/cli": "fd00:10:244:1::c",
		"np-a/api": "fd00:10:244:2::a", "np-b/db": "fd00:10:244:2::b",
	}, map[string]string{Node1: "fd00:100::11", Node2: "fd00:100::12"}, "2001:db8::200")
}

type ends struct {
	web, api, acli, db, bcli, out, node1, node2 Endpoint
}

func endpoints(t *testing.T, l Layout) ends {
	t.Helper()
	get := func(ns, name string) Endpoint {
		for i := range l.Pods {
			if l.Pods[i].Namespace == ns && l.Pods[i].Name == name {
				return Endpoint{Pod: &l.Pods[i]}
			}
		}
		t.Fatalf("no pod %s/%s", ns, name)
		return Endpoint{}
	}
	return ends{
		web: get(NamespaceA, "web"), api: get(NamespaceA, "api"), acli: get(NamespaceA, "cli"),
		db: get(NamespaceB, "db"), bcli: get(NamespaceB, "cli"),
		out:   Endpoint{IP: l.Outside},
		node1: Endpoint{IP: l.NodeIPs[Node1][0]},
		node2: Endpoint{IP: l.NodeIPs[Node2][0]},
	}
}

func tcp(from, to Endpoint, port int32) Probe {
	return Probe{From: from, To: to, Port: port, Protocol: corev1.ProtocolTCP}
}
func udp(from, to Endpoint, port int32) Probe {
	return Probe{From: from, To: to, Port: port, Protocol: corev1.ProtocolUDP}
}

func describe(p Probe) string {
	end := func(e Endpoint) string {
		if e.Pod != nil {
			return e.Pod.Namespace + "/" + e.Pod.Name
		}
		return e.IP.String()
	}
	proto := p.Protocol
	if proto == "" {
		proto = "(default)"
	}
	return fmt.Sprintf("%s -> %s %s/%d", end(p.From), end(p.To), proto, p.Port)
}

type check struct {
	probe  Probe
	allow  bool
	reason string // substring the reason must contain; "" = don't care
}

func TestEvaluate(t *testing.T) {
	l := perNodeV4(t)
	e := endpoints(t, l)
	TCP, UDP := corev1.ProtocolTCP, corev1.ProtocolUDP

	cases := []struct {
		name     string
		policies []networkingv1.NetworkPolicy
		checks   []check
	}{
		{
			name: "no policies",
			checks: []check{
				{tcp(e.web, e.db, 80), true, "not selected for egress; not selected for ingress"},
				{tcp(e.out, e.web, 80), true, "not selected for ingress"},
				{tcp(e.out, e.node1, 80), true, "not subject to policy"},
			},
		},
		{
			name: "types unset, no egress rules: ingress only",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{PodSelector: *labelsSel("app", "web")}),
			},
			checks: []check{
				{tcp(e.acli, e.web, 80), false, "default deny: selected by np-a/p for ingress"},
				{tcp(e.web, e.out, 80), true, "not selected for egress"},
				{tcp(e.acli, e.api, 80), true, ""},
			},
		},
		{
			name: "types unset, empty non-nil egress list: ingress only",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{}}),
			},
			checks: []check{
				{tcp(e.web, e.db, 80), true, "not selected for egress"},
				{tcp(e.db, e.web, 80), false, "for ingress"},
			},
		},
		{
			name: "types unset, egress rules: ingress and egress",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					Egress:      []networkingv1.NetworkPolicyEgressRule{{To: peers(podPeer(labelsSel("app", "api")))}},
				}),
			},
			checks: []check{
				{tcp(e.web, e.api, 80), true, "allowed by np-a/p egress rule 0"},
				{tcp(e.web, e.db, 80), false, "default deny: selected by np-a/p for egress"},
				{tcp(e.api, e.web, 80), false, "default deny: selected by np-a/p for ingress"},
			},
		},
		{
			name: "types [Egress] ignores ingress rules and does not isolate ingress",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					PolicyTypes: typesEgress,
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: peers(podPeer(labelsSel("app", "none")))}},
				}),
			},
			checks: []check{
				{tcp(e.db, e.web, 80), true, "not selected for ingress"},
				{tcp(e.web, e.db, 80), false, "default deny: selected by np-a/p for egress"},
			},
		},
		{
			name: "types [Ingress] ignores egress rules and does not isolate egress",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					PolicyTypes: typesIngress,
					Egress:      []networkingv1.NetworkPolicyEgressRule{{To: peers(podPeer(labelsSel("app", "none")))}},
				}),
			},
			checks: []check{
				{tcp(e.web, e.db, 80), true, "not selected for egress"},
				{tcp(e.db, e.web, 80), false, ""},
			},
		},
		{
			name: "policy only selects pods of its own namespace",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceB, "p", networkingv1.NetworkPolicySpec{PodSelector: *labelsSel("app", "cli")}),
			},
			checks: []check{
				{tcp(e.web, e.acli, 80), true, "not selected for ingress"},
				{tcp(e.web, e.bcli, 80), false, "np-b/p"},
			},
		},
		{
			name: "podSelector-only peer means pods of the policy's namespace",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceB, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: peers(podPeer(labelsSel("app", "cli")))}},
				}),
			},
			checks: []check{
				{tcp(e.bcli, e.db, 80), true, "allowed by np-b/p ingress rule 0"},
				{tcp(e.acli, e.db, 80), false, ""},
			},
		},
		{
			name: "empty podSelector peer: all pods of the policy namespace, no IPs",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceB, "p", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: peers(podPeer(labelsSel()))}},
				}),
			},
			checks: []check{
				{tcp(e.bcli, e.db, 80), true, ""},
				{tcp(e.web, e.db, 80), false, ""},
				{tcp(e.out, e.db, 80), false, ""},
			},
		},
		{
			name: "combined selectors in one peer are ANDed",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceB, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: peers(
						nsPodPeer(labelsSel("team", "a"), labelsSel("app", "cli")),
					)}},
				}),
			},
			checks: []check{
				{tcp(e.acli, e.db, 80), true, ""},
				{tcp(e.web, e.db, 80), false, ""},
				{tcp(e.bcli, e.db, 80), false, ""},
			},
		},
		{
			name: "separate peers are ORed",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceB, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: peers(
						nsPeer(labelsSel("team", "a")), podPeer(labelsSel("app", "cli")),
					)}},
				}),
			},
			checks: []check{
				{tcp(e.acli, e.db, 80), true, ""},
				{tcp(e.web, e.db, 80), true, ""},  // namespace peer
				{tcp(e.bcli, e.db, 80), true, ""}, // pod peer, policy namespace
				{tcp(e.out, e.db, 80), false, ""},
			},
		},
		{
			name: "empty namespaceSelector selects all namespaces but no bare IP",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceB, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: peers(nsPeer(labelsSel()))}},
				}),
			},
			checks: []check{
				{tcp(e.web, e.db, 80), true, ""},
				{tcp(e.bcli, e.db, 80), true, ""},
				{tcp(e.out, e.db, 80), false, ""},
				{tcp(e.node1, e.db, 80), false, ""}, // other node's address
			},
		},
		{
			name: "matchExpressions and implied namespace name label",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *exprSel(req("tier", metav1.LabelSelectorOpIn, "front")),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(nsPeer(exprSel(req("env", metav1.LabelSelectorOpNotIn, "prod"))))},
						{From: peers(nsPodPeer(labelsSel(namespaceNameLabel, NamespaceA), exprSel(req("tier", metav1.LabelSelectorOpDoesNotExist))))},
						{From: peers(podPeer(exprSel(req("tier", metav1.LabelSelectorOpExists), req("app", metav1.LabelSelectorOpNotIn, "web"))))},
					},
				}),
			},
			checks: []check{
				{tcp(e.db, e.web, 80), true, "ingress rule 0"},
				{tcp(e.acli, e.web, 80), true, "ingress rule 1"},
				{tcp(e.api, e.web, 80), true, "ingress rule 2"},
				{tcp(e.acli, e.api, 80), true, "not selected for ingress"},
			},
		},
		{
			name: "invalid selector matches nothing",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *exprSel(req("tier", "Bogus")),
				}),
			},
			checks: []check{
				{tcp(e.acli, e.web, 80), true, "not selected for ingress"},
			},
		},
		{
			name: "named ports resolve per destination pod",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "pa", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: ports(namedPort(corev1.ProtocolTCP, "http"))}},
				}),
				policy(NamespaceB, "pb", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: ports(namedPort(corev1.ProtocolTCP, "http"))}},
				}),
			},
			checks: []check{
				{tcp(e.db, e.web, 80), true, "np-a/pa ingress rule 0"},
				{tcp(e.db, e.web, 8080), false, ""},
				{tcp(e.web, e.db, 8080), true, "np-b/pb ingress rule 0"},
				{tcp(e.web, e.db, 80), false, ""},
				{tcp(e.web, e.bcli, 80), true, ""},
				{udp(e.web, e.bcli, 80), false, ""}, // protocol must match
			},
		},
		{
			name: "named port needs matching protocol on the container port",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: ports(
						namedPort(TCP, "dns"), namedPort(UDP, "mdns"),
					)}},
				}),
			},
			checks: []check{
				{tcp(e.db, e.web, 53), false, ""},
				{udp(e.db, e.web, 53), false, ""},
				{udp(e.db, e.web, 5353), true, ""},
			},
		},
		{
			name: "egress named port: destination pod, never a bare IP",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					PolicyTypes: typesEgress,
					Egress:      []networkingv1.NetworkPolicyEgressRule{{Ports: ports(namedPort(TCP, "http"))}},
				}),
			},
			checks: []check{
				{tcp(e.web, e.api, 80), true, "allowed by np-a/p egress rule 0"},
				{tcp(e.web, e.db, 8080), true, ""},
				{tcp(e.web, e.db, 80), false, ""},
				{tcp(e.web, e.out, 80), false, "default deny: selected by np-a/p for egress"},
			},
		},
		{
			name: "numeric port and endPort range are inclusive",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: ports(
						rangePort(TCP, 8000, 9000), numPort(UDP, 53),
					)}},
				}),
			},
			checks: []check{
				{tcp(e.db, e.web, 7999), false, ""},
				{tcp(e.db, e.web, 8000), true, ""},
				{tcp(e.db, e.web, 8080), true, ""},
				{tcp(e.db, e.web, 9000), true, ""},
				{tcp(e.db, e.web, 9001), false, ""},
				{udp(e.db, e.web, 8080), false, ""},
				{udp(e.db, e.web, 53), true, ""},
				{udp(e.db, e.web, 54), false, ""},
				{tcp(e.db, e.web, 53), false, ""},
			},
		},
		{
			name: "protocol defaults to TCP, in policy and in probe",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: ports(numPortNoProto(80))}},
				}),
			},
			checks: []check{
				{tcp(e.db, e.web, 80), true, ""},
				{udp(e.db, e.web, 80), false, ""},
				{Probe{From: e.db, To: e.web, Port: 80}, true, ""},
				{Probe{From: e.db, To: e.web, Port: 80, Protocol: corev1.ProtocolSCTP}, false, ""},
			},
		},
		{
			name: "protocol without port: all ports of that protocol",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: ports(protoOnly(corev1.ProtocolSCTP))}},
				}),
			},
			checks: []check{
				{Probe{From: e.db, To: e.web, Port: 9000, Protocol: corev1.ProtocolSCTP}, true, ""},
				{tcp(e.db, e.web, 9000), false, ""},
			},
		},
		{
			name: "empty ports: all ports and protocols; empty from: all sources",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{{}},
				}),
			},
			checks: []check{
				{tcp(e.out, e.web, 1), true, ""},
				{Probe{From: e.db, To: e.web, Port: 9, Protocol: corev1.ProtocolSCTP}, true, ""},
			},
		},
		{
			name: "ipBlock with except, for pods and bare IPs",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "in", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: peers(
						ipPeer("10.244.0.0/16", "10.244.1.11/32", "10.244.2.0/24"),
						ipPeer("192.168.100.200/32"),
					)}},
				}),
				policy(NamespaceA, "eg", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "api"),
					PolicyTypes: typesEgress,
					Egress: []networkingv1.NetworkPolicyEgressRule{{To: peers(
						ipPeer("192.168.100.0/24", "192.168.100.200/32"),
						ipPeer("10.244.2.11/32"),
					)}},
				}),
			},
			checks: []check{
				{tcp(e.bcli, e.web, 80), true, "allowed by np-a/in ingress rule 0"},
				{tcp(e.acli, e.web, 80), false, ""}, // except /32
				{tcp(e.api, e.web, 80), false, ""},  // except /24
				{tcp(e.out, e.web, 80), true, ""},
				{tcp(e.api, e.out, 80), false, ""},  // except
				{tcp(e.api, e.node1, 80), true, ""}, // in cidr
				{tcp(e.api, e.db, 80), true, ""},    // pod by IP
				{tcp(e.api, e.bcli, 80), false, ""},
			},
		},
		{
			name: "ipBlock: address family mismatch and invalid CIDR match nothing",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "p", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{{From: peers(
						ipPeer("::/0"), ipPeer("not-a-cidr"),
					)}},
				}),
			},
			checks: []check{
				{tcp(e.out, e.web, 80), false, ""},
				{tcp(e.bcli, e.web, 80), false, ""},
			},
		},
		{
			name: "own node address always allowed to ingress",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "deny", networkingv1.NetworkPolicySpec{PolicyTypes: typesBoth}),
			},
			checks: []check{
				{tcp(e.node1, e.web, 80), true, "ingress from own node node-1 address 192.168.100.11: always allowed"},
				{tcp(e.node2, e.web, 80), false, "default deny: selected by np-a/deny for ingress"},
				{tcp(e.node2, e.api, 80), true, "own node"},
				{tcp(e.web, e.node1, 80), false, "for egress"}, // egress to own node is not special
			},
		},
		{
			name: "pod to itself always allowed",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "deny", networkingv1.NetworkPolicySpec{PolicyTypes: typesBoth}),
			},
			checks: []check{
				{tcp(e.web, e.web, 80), true, "itself"},
				{tcp(e.web, e.acli, 80), false, ""},
			},
		},
		{
			name: "policies and rules are additive; reasons list every selecting policy",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "deny-all", networkingv1.NetworkPolicySpec{}),
				policy(NamespaceA, "web-80", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					Ingress:     []networkingv1.NetworkPolicyIngressRule{{Ports: ports(numPort(TCP, 80))}},
				}),
				policy(NamespaceA, "front-8080", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("tier", "front"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(podPeer(labelsSel("app", "none")))},
						{Ports: ports(numPort(TCP, 8080))},
					},
				}),
			},
			checks: []check{
				{tcp(e.db, e.web, 80), true, "allowed by np-a/web-80 ingress rule 0"},
				{tcp(e.db, e.web, 8080), true, "allowed by np-a/front-8080 ingress rule 1"},
				{udp(e.db, e.web, 53), false, "default deny: selected by np-a/deny-all, np-a/web-80, np-a/front-8080 for ingress"},
				{tcp(e.db, e.api, 80), false, "default deny: selected by np-a/deny-all for ingress"},
			},
		},
		{
			name: "both directions must allow",
			policies: []networkingv1.NetworkPolicy{
				policy(NamespaceA, "web-egress-deny", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"), PolicyTypes: typesEgress,
				}),
				policy(NamespaceB, "db-ingress-deny", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
				}),
			},
			checks: []check{
				{tcp(e.web, e.db, 80), false, "default deny: selected by np-a/web-egress-deny for egress; default deny: selected by np-b/db-ingress-deny for ingress"},
				{tcp(e.web, e.bcli, 80), false, "for egress"},
				{tcp(e.acli, e.db, 80), false, "for ingress"},
				{tcp(e.acli, e.bcli, 80), true, ""},
			},
		},
	}

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := l.World(tc.policies)
			for _, c := range tc.checks {
				v := w.Evaluate(c.probe)
				if v.Allowed != c.allow {
					t.Errorf("%s: allowed=%v, want %v (reason %q)", describe(c.probe), v.Allowed, c.allow, v.Reason)
				}
				if c.reason != "" && !strings.Contains(v.Reason, c.reason) {
					t.Errorf("%s: reason %q, want it to contain %q", describe(c.probe), v.Reason, c.reason)
				}
				if v.Reason == "" {
					t.Errorf("%s: empty reason", describe(c.probe))
				}
			}
		})
	}
}

func TestEvaluateExactReasons(t *testing.T) {
	l := perNodeV4(t)
	e := endpoints(t, l)
	w := l.World([]networkingv1.NetworkPolicy{
		policy(NamespaceA, "deny-all", networkingv1.NetworkPolicySpec{}),
		policy(NamespaceA, "allow-web", networkingv1.NetworkPolicySpec{
			PodSelector: *labelsSel("app", "web"),
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: peers(podPeer(labelsSel("app", "cli")))}},
		}),
	})
	for _, c := range []struct {
		p    Probe
		want Verdict
	}{
		{tcp(e.acli, e.web, 80), Verdict{true, "not selected for egress; allowed by np-a/allow-web ingress rule 0"}},
		{tcp(e.api, e.web, 80), Verdict{false, "default deny: selected by np-a/deny-all, np-a/allow-web for ingress"}},
		{tcp(e.out, e.acli, 80), Verdict{false, "default deny: selected by np-a/deny-all for ingress"}},
		{tcp(e.web, e.out, 80), Verdict{true, "not selected for egress"}},
		{tcp(e.web, e.web, 80), Verdict{true, "pod to itself: always allowed"}},
	} {
		if got := w.Evaluate(c.p); got != c.want {
			t.Errorf("%s: got %+v, want %+v", describe(c.p), got, c.want)
		}
	}
}

// listening is what the lab pods listen on.
var listening = map[corev1.Protocol]map[int32]bool{
	corev1.ProtocolTCP:  {80: true, 81: true, 8080: true, 9000: true},
	corev1.ProtocolUDP:  {53: true, 5353: true, 9000: true},
	corev1.ProtocolSCTP: {80: true, 9000: true},
}

func TestScenariosValid(t *testing.T) {
	layouts := map[string]func(*testing.T) Layout{
		"per-node-v4": perNodeV4, "flat-v4": flatV4, "scattered-v4": scatteredV4, "per-node-v6": perNodeV6,
	}
	for lname, mk := range layouts {
		t.Run(lname, func(t *testing.T) {
			l := mk(t)
			scs := Scenarios(l)
			if len(scs) < 15 || len(scs) > 25 {
				t.Errorf("%d scenarios, want 15-25", len(scs))
			}
			nsExists := map[string]bool{}
			for _, ns := range l.Namespaces {
				nsExists[ns.Name] = true
			}
			scenarioNames := map[string]bool{}
			policyNames := map[string]string{}
			for _, sc := range scs {
				if sc.Name == "" || scenarioNames[sc.Name] {
					t.Errorf("scenario name %q empty or duplicate", sc.Name)
				}
				scenarioNames[sc.Name] = true
				if len(sc.Policies) == 0 {
					t.Errorf("%s: no policies", sc.Name)
				}
				for _, p := range sc.Policies {
					if p.Name == "" || !nsExists[p.Namespace] {
						t.Errorf("%s: policy %s/%s: bad name or namespace", sc.Name, p.Namespace, p.Name)
					}
					if prev, dup := policyNames[p.Name]; dup {
						t.Errorf("%s: policy name %s already used in %s", sc.Name, p.Name, prev)
					}
					policyNames[p.Name] = sc.Name
					checkPolicyShape(t, sc.Name, p)
				}
				if n := len(sc.Probes); n < 6 || n > 20 {
					t.Errorf("%s: %d probes, want 6-20", sc.Name, n)
				}
				w := l.World(sc.Policies)
				var allows, denies int
				hasSCTP := false
				for _, pr := range sc.Probes {
					checkProbeShape(t, sc.Name, l, pr)
					if pr.Protocol == corev1.ProtocolSCTP {
						hasSCTP = true
					}
					if w.Evaluate(pr).Allowed {
						allows++
					} else {
						denies++
					}
				}
				if hasSCTP != sc.NeedsSCTP {
					t.Errorf("%s: uses SCTP=%v but NeedsSCTP=%v", sc.Name, hasSCTP, sc.NeedsSCTP)
				}
				if allows == 0 || denies == 0 {
					t.Errorf("%s: %d allows, %d denies; want at least one of each", sc.Name, allows, denies)
				}
			}
		})
	}
}

func checkPolicyShape(t *testing.T, sc string, p networkingv1.NetworkPolicy) {
	t.Helper()
	m := p.ObjectMeta
	if len(m.Labels) != 0 || len(m.Annotations) != 0 || m.ResourceVersion != "" || m.UID != "" || m.GenerateName != "" {
		t.Errorf("%s: policy %s has extra metadata", sc, p.Name)
	}
	checkBlock := func(b *networkingv1.IPBlock) {
		cidr, err := netip.ParsePrefix(b.CIDR)
		if err != nil || cidr.Masked() != cidr {
			t.Errorf("%s: policy %s: bad cidr %q", sc, p.Name, b.CIDR)
			return
		}
		for _, ex := range b.Except {
			e, err := netip.ParsePrefix(ex)
			if err != nil || e.Masked() != e || e.Bits() <= cidr.Bits() || !cidr.Contains(e.Addr()) {
				t.Errorf("%s: policy %s: except %q not a strict subset of %q", sc, p.Name, ex, b.CIDR)
			}
		}
	}
	checkPeers := func(ps []networkingv1.NetworkPolicyPeer) {
		for _, peer := range ps {
			if peer.IPBlock != nil {
				if peer.PodSelector != nil || peer.NamespaceSelector != nil {
					t.Errorf("%s: policy %s: ipBlock combined with selectors", sc, p.Name)
				}
				checkBlock(peer.IPBlock)
			} else if peer.PodSelector == nil && peer.NamespaceSelector == nil {
				t.Errorf("%s: policy %s: empty peer", sc, p.Name)
			}
		}
	}
	checkPorts := func(ps []networkingv1.NetworkPolicyPort) {
		for _, port := range ps {
			if port.EndPort != nil && (port.Port == nil || port.Port.Type != intstr.Int || *port.EndPort < port.Port.IntVal) {
				t.Errorf("%s: policy %s: bad endPort", sc, p.Name)
			}
		}
	}
	for _, r := range p.Spec.Ingress {
		checkPeers(r.From)
		checkPorts(r.Ports)
	}
	for _, r := range p.Spec.Egress {
		checkPeers(r.To)
		checkPorts(r.Ports)
	}
}

func checkProbeShape(t *testing.T, sc string, l Layout, pr Probe) {
	t.Helper()
	isLayoutPod := func(p *Pod) bool {
		for i := range l.Pods {
			if p == &l.Pods[i] {
				return true
			}
		}
		return false
	}
	if !listening[pr.Protocol][pr.Port] {
		t.Errorf("%s: %s: port not listened on", sc, describe(pr))
	}
	switch {
	case pr.From.Pod != nil && pr.To.Pod != nil:
		if !isLayoutPod(pr.From.Pod) || !isLayoutPod(pr.To.Pod) {
			t.Errorf("%s: %s: pod not from layout", sc, describe(pr))
		}
	case pr.From.Pod == nil && pr.To.Pod != nil: // ingress from outside
		if pr.From.IP != l.Outside || !isLayoutPod(pr.To.Pod) {
			t.Errorf("%s: %s: bare source must be the outside IP", sc, describe(pr))
		}
	case pr.From.Pod != nil && pr.To.Pod == nil: // egress to outside
		if pr.To.IP != l.Outside || !isLayoutPod(pr.From.Pod) {
			t.Errorf("%s: %s: bare destination must be the outside IP", sc, describe(pr))
		}
	default:
		t.Errorf("%s: %s: no pod end", sc, describe(pr))
	}
}

// TestScenariosCoverage checks that the scenarios together exercise every
// feature the oracle models.
func TestScenariosCoverage(t *testing.T) {
	l := perNodeV4(t)
	node := func(e Endpoint) string {
		if e.Pod == nil {
			return ""
		}
		return e.Pod.Node
	}
	seen := map[string]bool{}
	mark := func(f string) { seen[f] = true }
	for _, sc := range Scenarios(l) {
		for _, p := range sc.Policies {
			s := p.Spec
			mark("policies")
			if len(sc.Policies) > 1 {
				mark("multiple policies")
			}
			if len(s.PodSelector.MatchLabels) == 0 && len(s.PodSelector.MatchExpressions) == 0 {
				mark("empty podSelector")
				if len(s.Ingress) == 0 && len(s.Egress) == 0 {
					switch {
					case len(s.PolicyTypes) == 0:
						mark("default deny ingress")
					case len(s.PolicyTypes) == 2:
						mark("default deny both")
					case s.PolicyTypes[0] == networkingv1.PolicyTypeEgress:
						mark("default deny egress")
					}
				}
			}
			if len(s.PolicyTypes) == 1 && s.PolicyTypes[0] == networkingv1.PolicyTypeEgress {
				mark("egress-only policyTypes")
				if len(s.Ingress) > 0 {
					mark("ignored ingress rules")
				}
			}
			if len(s.PolicyTypes) == 0 && len(s.Egress) > 0 {
				mark("implicit egress type")
			}
			for _, m := range s.PodSelector.MatchExpressions {
				mark("matchExpressions " + string(m.Operator))
			}
			var allPeers [][]networkingv1.NetworkPolicyPeer
			var allPorts [][]networkingv1.NetworkPolicyPort
			for _, r := range s.Ingress {
				allPeers, allPorts = append(allPeers, r.From), append(allPorts, r.Ports)
				if len(r.From) == 0 && len(r.Ports) > 0 {
					mark("ingress all sources with ports")
				}
				if len(r.From) > 0 && len(r.Ports) == 0 {
					mark("ingress peers without ports")
				}
			}
			for _, r := range s.Egress {
				allPeers, allPorts = append(allPeers, r.To), append(allPorts, r.Ports)
				if len(r.To) == 0 && len(r.Ports) > 0 {
					mark("egress all destinations with ports")
				}
				if len(r.To) > 0 && len(r.Ports) == 0 {
					mark("egress peers without ports")
				}
			}
			for _, ps := range allPeers {
				if len(ps) > 1 {
					mark("multiple peers")
				}
				for _, peer := range ps {
					switch {
					case peer.IPBlock != nil:
						mark("ipBlock")
						if len(peer.IPBlock.Except) > 0 {
							mark("ipBlock except")
						}
					case peer.PodSelector != nil && peer.NamespaceSelector != nil:
						mark("combined selectors")
					case peer.PodSelector != nil:
						mark("podSelector peer")
					default:
						mark("namespaceSelector peer")
					}
					for _, sel := range []*metav1.LabelSelector{peer.PodSelector, peer.NamespaceSelector} {
						if sel == nil {
							continue
						}
						for _, m := range sel.MatchExpressions {
							mark("matchExpressions " + string(m.Operator))
						}
					}
					if ns := peer.NamespaceSelector; ns != nil && len(ns.MatchLabels) == 0 && len(ns.MatchExpressions) == 0 {
						mark("empty namespaceSelector")
					}
				}
			}
			for _, ps := range allPorts {
				for _, port := range ps {
					proto := corev1.ProtocolTCP
					if port.Protocol == nil {
						mark("default protocol")
					} else {
						proto = *port.Protocol
					}
					mark("port protocol " + string(proto))
					switch {
					case port.Port == nil:
						mark("protocol-only port")
					case port.Port.Type == intstr.String:
						mark("named port")
					case port.EndPort != nil:
						mark("endPort")
					default:
						mark("numeric port")
					}
				}
			}
		}
		w := l.World(sc.Policies)
		for _, pr := range sc.Probes {
			v := w.Evaluate(pr)
			mark("probe " + string(pr.Protocol))
			if pr.From.Pod == nil {
				mark("probe from outside")
			}
			if pr.To.Pod == nil {
				mark("probe to outside")
			}
			if pr.From.Pod != nil && pr.To.Pod != nil {
				if node(pr.From) == node(pr.To) {
					mark(fmt.Sprintf("same-node allowed=%v", v.Allowed))
				} else {
					mark(fmt.Sprintf("cross-node allowed=%v", v.Allowed))
				}
			}
			if strings.Contains(v.Reason, "egress rule") {
				mark("allowed by egress rule")
			}
			if strings.Contains(v.Reason, "ingress rule") {
				mark("allowed by ingress rule")
			}
			if strings.Contains(v.Reason, "for egress") {
				mark("denied egress")
			}
			if strings.Contains(v.Reason, "for ingress") {
				mark("denied ingress")
			}
			if strings.Contains(v.Reason, "itself") {
				mark("pod to itself")
			}
			// db's "http" is 8080: a named-port allow to db on 8080.
			if pr.To.Pod != nil && pr.To.Pod.Name == "db" && pr.Port == 8080 && v.Allowed {
				for _, p := range sc.Policies {
					for _, r := range append(append([]networkingv1.NetworkPolicyPort{}, flattenIngressPorts(p)...), flattenEgressPorts(p)...) {
						if r.Port != nil && r.Port.Type == intstr.String && r.Port.StrVal == "http" {
							mark("db named http 8080")
						}
					}
				}
			}
		}
	}
	want := []string{
		"policies", "multiple policies", "empty podSelector",
		"default deny ingress", "default deny egress", "default deny both",
		"egress-only policyTypes", "ignored ingress rules", "implicit egress type",
		"matchExpressions In", "matchExpressions NotIn", "matchExpressions Exists", "matchExpressions DoesNotExist",
		"ingress all sources with ports", "ingress peers without ports",
		"egress all destinations with ports", "egress peers without ports", "multiple peers",
		"ipBlock", "ipBlock except", "combined selectors", "podSelector peer", "namespaceSelector peer",
		"empty namespaceSelector", "default protocol", "port protocol TCP", "port protocol UDP", "port protocol SCTP",
		"protocol-only port", "named port", "endPort", "numeric port",
		"probe TCP", "probe UDP", "probe SCTP", "probe from outside", "probe to outside",
		"same-node allowed=true", "same-node allowed=false", "cross-node allowed=true", "cross-node allowed=false",
		"allowed by egress rule", "allowed by ingress rule", "denied egress", "denied ingress",
		"pod to itself", "db named http 8080",
	}
	for _, f := range want {
		if !seen[f] {
			t.Errorf("no scenario covers %q", f)
		}
	}
}

func flattenIngressPorts(p networkingv1.NetworkPolicy) []networkingv1.NetworkPolicyPort {
	var out []networkingv1.NetworkPolicyPort
	for _, r := range p.Spec.Ingress {
		out = append(out, r.Ports...)
	}
	return out
}

func flattenEgressPorts(p networkingv1.NetworkPolicy) []networkingv1.NetworkPolicyPort {
	var out []networkingv1.NetworkPolicyPort
	for _, r := range p.Spec.Egress {
		out = append(out, r.Ports...)
	}
	return out
}

// TestScenarioTruthTable pins the expected results of a few scenarios on the
// per-node layout, so a change to the oracle is noticed.
func TestScenarioTruthTable(t *testing.T) {
	l := perNodeV4(t)
	want := map[string]string{
		// one char per probe, in order: A allowed, D denied
		"default-deny-ingress":               "DDDDDDAAAA",
		"default-deny-egress":                "DDDDDDAAAA",
		"default-deny-both":                  "DDDDDDDDAAA",
		"egress-only-policytypes":            "AADDDDAAAA",
		"combined-vs-separate-peers":         "ADDDAAAADD",
		"ipblock-ingress-except":             "DADDAADA",
		"ipblock-egress-except":              "ADDDADAA",
		"named-ports-ingress":                "ADAAADADDA",
		"named-ports-egress":                 "AADDDADA",
		"endport-ingress":                    "AADDADAD",
		"sctp":                               "AADDDADDDA",
		"multiple-policies-additive-egress":  "AADADDADA",
		"default-protocol-and-protocol-only": "ADADAAADD",
	}
	found := 0
	for _, sc := range Scenarios(l) {
		exp, ok := want[sc.Name]
		if !ok {
			continue
		}
		found++
		w := l.World(sc.Policies)
		var got strings.Builder
		for _, pr := range sc.Probes {
			if w.Evaluate(pr).Allowed {
				got.WriteByte('A')
			} else {
				got.WriteByte('D')
			}
		}
		if got.String() != exp {
			t.Errorf("%s: got %s, want %s", sc.Name, got.String(), exp)
			for _, pr := range sc.Probes {
				v := w.Evaluate(pr)
				t.Logf("  %s: %v %s", describe(pr), v.Allowed, v.Reason)
			}
		}
	}
	if found != len(want) {
		t.Errorf("found %d of %d pinned scenarios", found, len(want))
	}
}
