package netpoloracle

import (
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Layout is the fixed cluster layout the lab creates, with real addresses
// filled in by the test:
//
// 2 nodes ("node-1", "node-2"), namespaces "np-a" (labels team=a, env=prod)
// and "np-b" (labels team=b, env=dev), pods (all with container ports: tcp 80
// named "http", tcp 8080 named "alt", udp 53 named "dns", udp 5353 named
// "mdns"; pod "np-b/db" instead names tcp 8080 "http" and tcp 80 "web"):
//
//	np-a/web   labels app=web,tier=front   node-1
//	np-a/api   labels app=api,tier=back    node-2
//	np-a/cli   labels app=cli              node-1
//	np-b/db    labels app=db,tier=back     node-2
//	np-b/cli   labels app=cli              node-1
//
// plus one bare "outside" IP (the lab's external host). The lab pods listen on
// TCP 80, 81, 8080, 9000, UDP 53, 5353, 9000 and SCTP 80, 9000; the outside
// host is assumed to answer on the same ports (egress probes to it use TCP 80,
// 8080 and UDP 53 only).
type Layout struct {
	Pods       []Pod
	Namespaces []Namespace
	NodeIPs    map[string][]netip.Addr
	Outside    netip.Addr
}

// World returns the oracle world of the layout with the given policies.
func (l Layout) World(policies []networkingv1.NetworkPolicy) *World {
	return &World{Pods: l.Pods, Namespaces: l.Namespaces, Policies: policies, NodeIPs: l.NodeIPs}
}

// Scenario is one truth table: the policies to apply (all at once, on top of
// no other policy) and the probes to run. The expected result of each probe
// is World.Evaluate on Layout.World(Policies).
type Scenario struct {
	Name      string
	Policies  []networkingv1.NetworkPolicy
	Probes    []Probe
	NeedsSCTP bool // probes use SCTP; skip when the kernel lacks it
}

// Names of the layout's namespaces and nodes.
const (
	NamespaceA = "np-a"
	NamespaceB = "np-b"
	Node1      = "node-1"
	Node2      = "node-2"
)

// DefaultPods returns the layout's namespaces and pods, without IPs.
func DefaultPods() ([]Namespace, []Pod) {
	nss := []Namespace{
		{Name: NamespaceA, Labels: map[string]string{"team": "a", "env": "prod"}},
		{Name: NamespaceB, Labels: map[string]string{"team": "b", "env": "dev"}},
	}
	std := func() []corev1.ContainerPort {
		return []corev1.ContainerPort{
			{Name: "http", ContainerPort: 80, Protocol: corev1.ProtocolTCP},
			{Name: "alt", ContainerPort: 8080, Protocol: corev1.ProtocolTCP},
			{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP},
			{Name: "mdns", ContainerPort: 5353, Protocol: corev1.ProtocolUDP},
		}
	}
	dbPorts := []corev1.ContainerPort{
		{Name: "web", ContainerPort: 80, Protocol: corev1.ProtocolTCP},
		{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP},
		{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP},
		{Name: "mdns", ContainerPort: 5353, Protocol: corev1.ProtocolUDP},
	}
	pods := []Pod{
		{Namespace: NamespaceA, Name: "web", Labels: map[string]string{"app": "web", "tier": "front"}, Node: Node1, Ports: std()},
		{Namespace: NamespaceA, Name: "api", Labels: map[string]string{"app": "api", "tier": "back"}, Node: Node2, Ports: std()},
		{Namespace: NamespaceA, Name: "cli", Labels: map[string]string{"app": "cli"}, Node: Node1, Ports: std()},
		{Namespace: NamespaceB, Name: "db", Labels: map[string]string{"app": "db", "tier": "back"}, Node: Node2, Ports: dbPorts},
		{Namespace: NamespaceB, Name: "cli", Labels: map[string]string{"app": "cli"}, Node: Node1, Ports: std()},
	}
	return nss, pods
}

// ---- builders ----

func policy(ns, name string, spec networkingv1.NetworkPolicySpec) networkingv1.NetworkPolicy {
	return networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       spec,
	}
}

// labelsSel is a matchLabels selector from key, value pairs; no pairs gives
// the empty (match-all) selector.
func labelsSel(kv ...string) *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	if len(kv) > 0 {
		s.MatchLabels = map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			s.MatchLabels[kv[i]] = kv[i+1]
		}
	}
	return s
}

func exprSel(reqs ...metav1.LabelSelectorRequirement) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchExpressions: reqs}
}

func req(key string, op metav1.LabelSelectorOperator, values ...string) metav1.LabelSelectorRequirement {
	return metav1.LabelSelectorRequirement{Key: key, Operator: op, Values: values}
}

func podPeer(s *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{PodSelector: s}
}

func nsPeer(s *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{NamespaceSelector: s}
}

func nsPodPeer(ns, pod *metav1.LabelSelector) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{NamespaceSelector: ns, PodSelector: pod}
}

func ipPeer(cidr string, except ...string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: cidr, Except: except}}
}

func protoPtr(p corev1.Protocol) *corev1.Protocol { return &p }

func numPort(proto corev1.Protocol, port int32) networkingv1.NetworkPolicyPort {
	v := intstr.FromInt32(port)
	return networkingv1.NetworkPolicyPort{Protocol: protoPtr(proto), Port: &v}
}

// numPortNoProto leaves protocol unset (defaults to TCP).
func numPortNoProto(port int32) networkingv1.NetworkPolicyPort {
	v := intstr.FromInt32(port)
	return networkingv1.NetworkPolicyPort{Port: &v}
}

func namedPort(proto corev1.Protocol, name string) networkingv1.NetworkPolicyPort {
	v := intstr.FromString(name)
	return networkingv1.NetworkPolicyPort{Protocol: protoPtr(proto), Port: &v}
}

func rangePort(proto corev1.Protocol, lo, hi int32) networkingv1.NetworkPolicyPort {
	v := intstr.FromInt32(lo)
	return networkingv1.NetworkPolicyPort{Protocol: protoPtr(proto), Port: &v, EndPort: &hi}
}

// protoOnly is a port entry with a protocol and no port: every port of it.
func protoOnly(proto corev1.Protocol) networkingv1.NetworkPolicyPort {
	return networkingv1.NetworkPolicyPort{Protocol: protoPtr(proto)}
}

func ports(p ...networkingv1.NetworkPolicyPort) []networkingv1.NetworkPolicyPort { return p }

func peers(p ...networkingv1.NetworkPolicyPeer) []networkingv1.NetworkPolicyPeer { return p }

var (
	typesIngress = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	typesEgress  = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	typesBoth    = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
)

// hostPrefix is the single-address prefix of ip (/32 or /128).
func hostPrefix(ip netip.Addr) string {
	return netip.PrefixFrom(ip, ip.BitLen()).String()
}

// blockAround is a prefix around center (/24 for IPv4, /120 for IPv6),
// widened as needed so that it also contains include and is strictly wider
// than include's single-address prefix (the API requires except to be a
// strict subset of cidr).
func blockAround(center, include netip.Addr) string {
	bits := 24
	if center.Is6() {
		bits = 120
	}
	for ; bits > 0; bits-- {
		p, err := center.Prefix(bits)
		if err == nil && p.Contains(include) {
			return p.String()
		}
	}
	p, _ := center.Prefix(0)
	return p.String()
}

// Scenarios returns the truth-table scenarios for the layout. Every pod of
// DefaultPods must be present in l.Pods with a valid IP, and l.Outside must
// be valid. Expected results are not part of a scenario: they are
// l.World(s.Policies).Evaluate(probe).
func Scenarios(l Layout) []Scenario {
	pod := func(ns, name string) Endpoint {
		for i := range l.Pods {
			if l.Pods[i].Namespace == ns && l.Pods[i].Name == name {
				return Endpoint{Pod: &l.Pods[i]}
			}
		}
		panic(fmt.Sprintf("netpoloracle: layout has no pod %s/%s", ns, name))
	}
	web := pod(NamespaceA, "web")  // node-1
	api := pod(NamespaceA, "api")  // node-2
	acli := pod(NamespaceA, "cli") // node-1
	db := pod(NamespaceB, "db")    // node-2
	bcli := pod(NamespaceB, "cli") // node-1
	out := Endpoint{IP: l.Outside} // outside host
	const A, B = NamespaceA, NamespaceB

	T := func(from, to Endpoint, port int32) Probe {
		return Probe{From: from, To: to, Port: port, Protocol: corev1.ProtocolTCP}
	}
	U := func(from, to Endpoint, port int32) Probe {
		return Probe{From: from, To: to, Port: port, Protocol: corev1.ProtocolUDP}
	}
	S := func(from, to Endpoint, port int32) Probe {
		return Probe{From: from, To: to, Port: port, Protocol: corev1.ProtocolSCTP}
	}
	TCP, UDP, SCTP := corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP

	return []Scenario{
		{
			Name: "default-deny-ingress",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "dd-ingress-a", networkingv1.NetworkPolicySpec{}),
			},
			Probes: []Probe{
				T(bcli, web, 80),  // deny: cross-ns, same node
				T(db, api, 8080),  // deny: cross-ns, same node
				T(acli, web, 80),  // deny: same ns, same node
				T(web, api, 80),   // deny: same ns, cross node
				U(bcli, api, 53),  // deny: UDP too
				T(out, web, 80),   // deny: outside
				T(web, db, 80),    // allow: db not isolated
				U(api, bcli, 53),  // allow
				T(web, out, 80),   // allow: egress not isolated
				U(acli, db, 5353), // allow
			},
		},
		{
			Name: "default-deny-egress",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "dd-egress-b", networkingv1.NetworkPolicySpec{PolicyTypes: typesEgress}),
			},
			Probes: []Probe{
				T(db, web, 80),     // deny: cross node
				T(bcli, db, 80),    // deny: same ns, cross node
				T(bcli, web, 8080), // deny: same node
				T(bcli, out, 80),   // deny
				U(db, out, 53),     // deny
				U(db, api, 53),     // deny: same node
				T(web, db, 80),     // allow: ingress to db not isolated
				T(out, db, 8080),   // allow
				U(api, bcli, 5353), // allow
				T(acli, web, 80),   // allow: np-a untouched
			},
		},
		{
			Name: "default-deny-both",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "dd-both-a", networkingv1.NetworkPolicySpec{PolicyTypes: typesBoth}),
			},
			Probes: []Probe{
				T(web, api, 80),   // deny
				T(api, web, 8080), // deny
				T(web, acli, 80),  // deny: same node
				T(web, out, 80),   // deny: egress
				T(out, web, 80),   // deny: ingress
				T(web, db, 80),    // deny: egress, cross node
				T(db, api, 80),    // deny: ingress, same node
				U(bcli, web, 53),  // deny: ingress
				T(web, web, 80),   // allow: pod to itself
				T(db, bcli, 80),   // allow
				U(bcli, db, 53),   // allow
			},
		},
		{
			// policyTypes [Egress] only: the ingress rules present are ignored
			// and db is not isolated for ingress.
			Name: "egress-only-policytypes",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "egress-only-db", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					PolicyTypes: typesEgress,
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(podPeer(labelsSel("app", "nothing")))},
					},
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{To: peers(nsPeer(labelsSel("team", "a"))), Ports: ports(numPort(TCP, 80))},
					},
				}),
			},
			Probes: []Probe{
				T(db, web, 80),   // allow: cross node
				T(db, api, 80),   // allow: same node
				T(db, web, 8080), // deny: port
				U(db, api, 53),   // deny: protocol
				T(db, bcli, 80),  // deny: np-b not team=a
				T(db, out, 80),   // deny
				T(web, db, 80),   // allow: ingress not isolated
				T(out, db, 8080), // allow
				U(bcli, db, 53),  // allow
				T(bcli, out, 80), // allow: bcli not selected
			},
		},
		{
			// policyTypes unset and a non-empty egress list: Ingress and Egress.
			Name: "implicit-types-with-egress-rules",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "implicit-both-api", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "api"),
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{To: peers(podPeer(labelsSel("app", "web")))},
					},
				}),
			},
			Probes: []Probe{
				T(api, web, 80),   // allow: cross node
				U(api, web, 53),   // allow: no ports = all
				T(api, web, 9000), // allow
				T(api, acli, 80),  // deny: egress
				T(api, db, 80),    // deny: egress, same node
				T(api, out, 80),   // deny: egress
				T(web, api, 80),   // deny: ingress isolated, no rules
				T(out, api, 8080), // deny: ingress
				T(web, acli, 80),  // allow: neither selected
				T(db, web, 80),    // allow
			},
		},
		{
			// policyTypes unset, egress present but empty: Ingress only. The
			// podSelector-only peer selects pods of the policy's namespace.
			Name: "implicit-types-ingress-only-podselector",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "implicit-ingress-db", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(podPeer(labelsSel("app", "cli")))},
					},
					Egress: []networkingv1.NetworkPolicyEgressRule{},
				}),
			},
			Probes: []Probe{
				T(bcli, db, 80),   // allow: cross node
				U(bcli, db, 5353), // allow
				T(acli, db, 80),   // deny: app=cli but not in np-b
				T(web, db, 8080),  // deny
				T(out, db, 80),    // deny
				T(db, web, 80),    // allow: egress not isolated
				T(db, out, 80),    // allow
				T(db, bcli, 8080), // allow
			},
		},
		{
			Name: "podselector-ingress-with-port",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "allow-web-from-cli", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(podPeer(labelsSel("app", "cli"))), Ports: ports(numPort(TCP, 80))},
					},
				}),
			},
			Probes: []Probe{
				T(acli, web, 80),   // allow: same node
				T(acli, web, 8080), // deny: port
				U(acli, web, 53),   // deny: protocol
				T(bcli, web, 80),   // deny: other namespace
				T(api, web, 80),    // deny: cross node, wrong pod
				T(out, web, 80),    // deny
				T(acli, api, 80),   // allow: api not selected
				T(web, api, 8080),  // allow: egress not isolated
			},
		},
		{
			// Rule with peers and no ports: all ports and protocols.
			Name: "namespaceselector-ingress-no-ports",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "allow-db-from-team-a", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(nsPeer(labelsSel("team", "a")))},
					},
				}),
			},
			Probes: []Probe{
				T(web, db, 80),    // allow: cross node
				U(api, db, 53),    // allow: same node
				T(acli, db, 9000), // allow
				U(acli, db, 5353), // allow
				T(bcli, db, 80),   // deny: np-b not team=a
				T(out, db, 80),    // deny
				T(bcli, web, 80),  // allow: web not selected
				T(db, out, 8080),  // allow
			},
		},
		{
			// One peer with both selectors (AND) vs two separate peers (OR).
			Name: "combined-vs-separate-peers",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "combined-peer-db", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{
							From:  peers(nsPodPeer(labelsSel("team", "a"), labelsSel("app", "cli"))),
							Ports: ports(numPort(TCP, 8080)),
						},
					},
				}),
				policy(B, "separate-peers-bcli", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "cli"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{
							From:  peers(nsPeer(labelsSel("team", "a")), podPeer(labelsSel("app", "db"))),
							Ports: ports(numPort(TCP, 80)),
						},
					},
				}),
			},
			Probes: []Probe{
				T(acli, db, 8080),   // allow: np-a AND app=cli
				T(web, db, 8080),    // deny: np-a but not cli
				T(bcli, db, 8080),   // deny: cli but not np-a
				T(acli, db, 80),     // deny: port
				T(web, bcli, 80),    // allow: namespace peer
				T(api, bcli, 80),    // allow: namespace peer, cross node
				T(db, bcli, 80),     // allow: pod peer
				T(acli, bcli, 80),   // allow
				T(acli, bcli, 8080), // deny: port
				T(out, bcli, 80),    // deny
			},
		},
		{
			// Empty namespaceSelector: all namespaces; alone (all pods) and
			// combined with a podSelector.
			Name: "empty-namespaceselector",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "api-from-any-ns-cli", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "api"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(nsPodPeer(labelsSel(), labelsSel("app", "cli")))},
					},
				}),
				policy(B, "bcli-egress-all-pods", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "cli"),
					PolicyTypes: typesEgress,
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{To: peers(nsPeer(labelsSel()))},
					},
				}),
			},
			Probes: []Probe{
				T(acli, api, 80),    // allow: cross node
				T(bcli, api, 8080),  // allow: both ends
				T(web, api, 80),     // deny
				T(db, api, 80),      // deny: same node
				T(out, api, 80),     // deny
				T(bcli, out, 80),    // deny: egress to bare IP
				U(bcli, db, 53),     // allow
				T(bcli, web, 8080),  // allow: same node
				T(bcli, acli, 9000), // allow
			},
		},
		{
			Name: "matchexpressions",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "expr-tier-exists", networkingv1.NetworkPolicySpec{
					PodSelector: *exprSel(req("tier", metav1.LabelSelectorOpExists)),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(nsPodPeer(
							exprSel(req("env", metav1.LabelSelectorOpNotIn, "prod")),
							exprSel(req("app", metav1.LabelSelectorOpIn, "db", "api")),
						))},
						{From: peers(podPeer(exprSel(req("tier", metav1.LabelSelectorOpDoesNotExist))))},
					},
				}),
			},
			Probes: []Probe{
				T(db, web, 80),    // allow: rule 0, cross node
				T(db, api, 8080),  // allow: rule 0, same node
				T(bcli, web, 80),  // deny: app not in (db, api)
				T(acli, web, 80),  // allow: rule 1, no tier
				U(acli, api, 53),  // allow: rule 1
				T(web, api, 80),   // deny: web has tier
				T(api, web, 80),   // deny: api in env=prod and has tier
				T(out, web, 80),   // deny
				T(bcli, acli, 80), // allow: acli (no tier) not selected
			},
		},
		{
			Name: "ipblock-ingress-except",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "ipblock-web-ingress", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(
							ipPeer(blockAround(web.Pod.IP, acli.Pod.IP), hostPrefix(acli.Pod.IP)),
							ipPeer(hostPrefix(l.Outside)),
						)},
					},
				}),
			},
			Probes: []Probe{
				T(acli, web, 80),   // deny: excepted
				T(bcli, web, 80),   // same /24 as web? (oracle decides)
				T(api, web, 80),    // cross node (oracle decides)
				T(db, web, 8080),   // cross node (oracle decides)
				T(out, web, 80),    // allow
				U(out, web, 53),    // allow
				U(acli, web, 5353), // deny: excepted
				T(out, api, 80),    // allow: api not selected
			},
		},
		{
			Name: "ipblock-egress-except",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "ipblock-bcli-egress", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "cli"),
					PolicyTypes: typesEgress,
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{
							To:    peers(ipPeer(blockAround(api.Pod.IP, db.Pod.IP), hostPrefix(db.Pod.IP))),
							Ports: ports(numPort(TCP, 80)),
						},
						{
							To:    peers(ipPeer(hostPrefix(l.Outside))),
							Ports: ports(numPort(UDP, 53)),
						},
					},
				}),
			},
			Probes: []Probe{
				T(bcli, api, 80),   // cross node (oracle decides)
				T(bcli, db, 80),    // deny: excepted
				T(bcli, web, 80),   // same node (oracle decides)
				T(bcli, api, 8080), // deny: port
				U(bcli, out, 53),   // allow
				T(bcli, out, 80),   // deny: port
				T(db, out, 80),     // allow: db not selected
				T(acli, db, 80),    // allow: acli in np-a not selected
			},
		},
		{
			// A rule with no from (all sources) but ports; numeric ports on
			// TCP and UDP.
			Name: "ports-by-number-all-sources",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "ports-num-api", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "api"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{Ports: ports(numPort(TCP, 8080), numPort(UDP, 53))},
					},
				}),
			},
			Probes: []Probe{
				T(web, api, 8080),  // allow: cross node
				T(web, api, 80),    // deny
				U(db, api, 53),     // allow: same node
				U(db, api, 5353),   // deny
				T(out, api, 8080),  // allow: all sources incl. outside
				T(out, api, 9000),  // deny
				U(bcli, api, 9000), // deny
				T(bcli, api, 8080), // allow
			},
		},
		{
			// Protocol unset means TCP; a protocol without a port means every
			// port of that protocol.
			Name: "default-protocol-and-protocol-only",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "default-proto-db", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{Ports: ports(numPortNoProto(9000))},
						{From: peers(podPeer(labelsSel("app", "cli"))), Ports: ports(protoOnly(UDP))},
					},
				}),
			},
			Probes: []Probe{
				T(web, db, 9000),  // allow: TCP default
				U(web, db, 9000),  // deny: not TCP
				T(out, db, 9000),  // allow
				T(web, db, 80),    // deny
				U(bcli, db, 53),   // allow: any UDP from np-b cli
				U(bcli, db, 5353), // allow
				U(bcli, db, 9000), // allow
				T(bcli, db, 8080), // deny: TCP not in rule 1
				U(acli, db, 53),   // deny: acli not in np-b
			},
		},
		{
			// Named ports resolve per destination pod: "http" is 80 on np-a
			// pods and 8080 on np-b/db.
			Name: "named-ports-ingress",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "named-http-ingress-a", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{Ports: ports(namedPort(TCP, "http"))},
					},
				}),
				policy(B, "named-http-ingress-db", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(nsPeer(labelsSel())), Ports: ports(namedPort(TCP, "http"))},
					},
				}),
			},
			Probes: []Probe{
				T(bcli, web, 80),   // allow
				T(bcli, web, 8080), // deny
				T(api, web, 80),    // allow: cross node
				T(out, web, 80),    // allow: all sources
				T(web, db, 8080),   // allow: db's http is 8080
				T(web, db, 80),     // deny: db's 80 is "web"
				T(api, db, 8080),   // allow: same node
				T(out, db, 8080),   // deny: namespaceSelector never matches bare IP
				T(acli, api, 8080), // deny
				T(db, bcli, 80),    // allow: bcli not selected
			},
		},
		{
			Name: "named-ports-udp-and-protocol-mismatch",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "named-dns-api", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "api"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						// "mdns" is UDP and "alt" TCP: these never match.
						{Ports: ports(namedPort(UDP, "dns"), namedPort(TCP, "mdns"), namedPort(UDP, "alt"))},
					},
				}),
			},
			Probes: []Probe{
				U(web, api, 53),   // allow: cross node
				U(db, api, 53),    // allow: same node
				U(web, api, 5353), // deny
				T(web, api, 8080), // deny
				T(web, api, 80),   // deny
				U(out, api, 53),   // allow
				U(api, web, 5353), // allow: web not selected
			},
		},
		{
			// Egress named ports resolve against the destination pod; never
			// against a bare IP. A rule with no to but ports.
			Name: "named-ports-egress",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "named-egress-web", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					PolicyTypes: typesEgress,
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{Ports: ports(namedPort(TCP, "http"))},
					},
				}),
			},
			Probes: []Probe{
				T(web, api, 80),   // allow: api's http is 80, cross node
				T(web, db, 8080),  // allow: db's http is 8080
				T(web, db, 80),    // deny
				T(web, api, 8080), // deny
				T(web, out, 80),   // deny: named port, bare IP
				T(web, bcli, 80),  // allow: same node
				U(web, acli, 53),  // deny
				T(acli, out, 80),  // allow: acli not selected
			},
		},
		{
			Name: "endport-ingress",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "endport-db", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{Ports: ports(rangePort(TCP, 8000, 9000), rangePort(UDP, 5000, 6000))},
					},
				}),
			},
			Probes: []Probe{
				T(web, db, 8080),  // allow: cross node
				T(web, db, 9000),  // allow: inclusive end
				T(api, db, 80),    // deny: same node
				T(api, db, 81),    // deny
				U(bcli, db, 5353), // allow
				U(bcli, db, 53),   // deny
				T(out, db, 9000),  // allow
				U(out, db, 9000),  // deny
			},
		},
		{
			Name: "endport-egress",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "endport-egress-cli", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "cli"),
					PolicyTypes: typesEgress,
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{To: peers(nsPeer(labelsSel("team", "b"))), Ports: ports(rangePort(TCP, 80, 81))},
					},
				}),
			},
			Probes: []Probe{
				T(acli, db, 80),    // allow: cross node
				T(acli, db, 81),    // allow
				T(acli, db, 8080),  // deny
				T(acli, bcli, 81),  // allow: same node
				T(acli, web, 80),   // deny: np-a not team=b
				T(acli, out, 80),   // deny
				U(acli, bcli, 53),  // deny
				T(bcli, web, 8080), // allow: bcli not selected
			},
		},
		{
			Name:      "sctp",
			NeedsSCTP: true,
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "sctp-web", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(nsPodPeer(labelsSel(), labelsSel("app", "cli"))), Ports: ports(numPort(SCTP, 80))},
					},
				}),
				policy(B, "sctp-egress-db", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					PolicyTypes: typesEgress,
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{Ports: ports(numPort(SCTP, 9000))},
					},
				}),
			},
			Probes: []Probe{
				S(acli, web, 80),   // allow: same node
				S(bcli, web, 80),   // allow
				S(acli, web, 9000), // deny: port
				S(api, web, 80),    // deny: not cli, cross node
				T(acli, web, 80),   // deny: TCP not allowed
				S(db, api, 9000),   // allow: same node
				S(db, api, 80),     // deny
				S(db, web, 9000),   // deny: web ingress
				T(db, api, 9000),   // deny: TCP
				S(api, db, 80),     // allow: db ingress not isolated
			},
		},
		{
			Name: "multiple-policies-additive-ingress",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "additive-1-api", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "api"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(podPeer(labelsSel("app", "web"))), Ports: ports(numPort(TCP, 80))},
					},
				}),
				policy(A, "additive-2-back", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("tier", "back"),
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(nsPeer(labelsSel("team", "b"))), Ports: ports(numPort(TCP, 8080))},
					},
				}),
				policy(A, "additive-3-all", networkingv1.NetworkPolicySpec{
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(podPeer(labelsSel("app", "cli"))), Ports: ports(numPort(UDP, 53))},
					},
				}),
			},
			Probes: []Probe{
				T(web, api, 80),   // allow: policy 1
				T(web, api, 8080), // deny
				T(db, api, 8080),  // allow: policy 2, same node
				T(db, api, 80),    // deny
				U(acli, api, 53),  // allow: policy 3
				T(acli, api, 80),  // deny
				U(bcli, api, 53),  // deny: bcli not in np-a
				U(acli, web, 53),  // allow: policy 3, same node
				U(api, web, 53),   // deny
				T(out, api, 80),   // deny
			},
		},
		{
			Name: "multiple-policies-additive-egress",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "egress-deny-all-b", networkingv1.NetworkPolicySpec{PolicyTypes: typesEgress}),
				policy(B, "egress-allow-dns-b", networkingv1.NetworkPolicySpec{
					PolicyTypes: typesEgress,
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{Ports: ports(numPort(UDP, 53))},
					},
				}),
				policy(B, "egress-db-to-api", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "db"),
					PolicyTypes: typesEgress,
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{To: peers(nsPodPeer(labelsSel("team", "a"), labelsSel("app", "api")))},
					},
				}),
			},
			Probes: []Probe{
				U(bcli, web, 53),  // allow: dns
				U(db, api, 53),    // allow: dns
				T(bcli, web, 80),  // deny
				U(db, out, 53),    // allow: dns to outside
				T(db, out, 80),    // deny
				U(bcli, db, 5353), // deny
				T(db, api, 8080),  // allow: db-to-api
				T(db, web, 8080),  // deny
				T(web, db, 80),    // allow: np-a unrestricted
			},
		},
		{
			// Egress with a combined peer and a podSelector-only peer, plus
			// ingress from all pods of the policy namespace.
			Name: "cross-namespace-egress-and-ns-local-ingress",
			Policies: []networkingv1.NetworkPolicy{
				policy(A, "web-both-ways", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "web"),
					PolicyTypes: typesBoth,
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(podPeer(labelsSel()))},
					},
					Egress: []networkingv1.NetworkPolicyEgressRule{
						{To: peers(
							nsPodPeer(labelsSel("team", "b"), labelsSel("tier", "back")),
							podPeer(labelsSel("tier", "back")),
						)},
					},
				}),
			},
			Probes: []Probe{
				T(web, db, 80),    // allow: cross node, cross ns
				T(web, bcli, 80),  // deny: np-b cli has no tier
				T(web, api, 8080), // allow: np-a tier=back
				T(web, acli, 80),  // deny
				T(web, out, 80),   // deny
				T(acli, web, 80),  // allow: same ns
				U(api, web, 5353), // allow: same ns, cross node
				T(bcli, web, 80),  // deny: other ns
				T(out, web, 80),   // deny
			},
		},
		{
			// The API server labels every namespace kubernetes.io/metadata.name.
			Name: "namespace-name-label",
			Policies: []networkingv1.NetworkPolicy{
				policy(B, "bcli-from-np-a-web", networkingv1.NetworkPolicySpec{
					PodSelector: *labelsSel("app", "cli"),
					PolicyTypes: typesIngress,
					Ingress: []networkingv1.NetworkPolicyIngressRule{
						{From: peers(nsPodPeer(labelsSel(namespaceNameLabel, NamespaceA), labelsSel("app", "web")))},
					},
				}),
			},
			Probes: []Probe{
				T(web, bcli, 80),   // allow: same node
				U(web, bcli, 53),   // allow
				T(acli, bcli, 80),  // deny
				T(db, bcli, 80),    // deny
				T(api, bcli, 8080), // deny
				T(out, bcli, 80),   // deny
				T(bcli, web, 80),   // allow: web not selected
			},
		},
	}
}
