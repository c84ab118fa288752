// Package netpoloracle is an independent, deliberately simple model of
// Kubernetes networking.k8s.io/v1 NetworkPolicy semantics. It is the oracle
// of truth-table tests that probe a real cluster: given the pods, namespaces
// and policies of a cluster, it says whether a connection should be allowed
// and why.
//
// It is written straight from the upstream API documentation
// (k8s.io/api/networking/v1 field docs and
// https://kubernetes.io/docs/concepts/services-networking/network-policies/)
// and shares no code with the policy implementation it checks. Every probe is
// evaluated directly against the policy objects: no compilation, no caching.
package netpoloracle

import (
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Pod is a pod as seen by the oracle.
type Pod struct {
	Namespace, Name string
	Labels          map[string]string
	IP              netip.Addr
	Node            string
	Ports           []corev1.ContainerPort // all containers' ports, for named ports
}

// Namespace is a namespace as seen by the oracle. The label
// kubernetes.io/metadata.name=<Name>, which the API server sets on every
// namespace, is implied and need not be listed in Labels.
type Namespace struct {
	Name   string
	Labels map[string]string
}

// Endpoint is one end of a probe: a pod, or a bare IP (outside the cluster,
// or a node address).
type Endpoint struct {
	Pod *Pod       // Pod != nil: the pod (its IP is Pod.IP; IP is ignored)
	IP  netip.Addr // used only when Pod == nil
}

// Probe is one connection attempt. An empty Protocol means TCP.
type Probe struct {
	From, To Endpoint
	Port     int32
	Protocol corev1.Protocol
}

// World is the cluster state the oracle evaluates probes against.
type World struct {
	Pods       []Pod
	Namespaces []Namespace
	Policies   []networkingv1.NetworkPolicy
	NodeIPs    map[string][]netip.Addr // node name -> its addresses
}

// Verdict is the oracle's answer for one probe.
type Verdict struct {
	Allowed bool
	Reason  string
}

// namespaceNameLabel is set by the API server on every namespace.
const namespaceNameLabel = "kubernetes.io/metadata.name"

type direction string

const (
	ingress direction = "ingress"
	egress  direction = "egress"
)

// Evaluate says whether the probe's connection is allowed: egress must be
// allowed for the source (if it is a pod) and ingress for the destination (if
// it is a pod). Bare IPs are not subject to policy.
func (w *World) Evaluate(p Probe) Verdict {
	proto := p.Protocol
	if proto == "" {
		proto = corev1.ProtocolTCP
	}

	src, dst := p.From.Pod, p.To.Pod
	if src != nil && dst != nil && src.Namespace == dst.Namespace && src.Name == dst.Name {
		return Verdict{Allowed: true, Reason: "pod to itself: always allowed"}
	}

	var allowed []string
	var denied []string
	if src != nil {
		ok, why := w.egressAllowed(src, p.To, p.Port, proto)
		if ok {
			allowed = append(allowed, why)
		} else {
			denied = append(denied, why)
		}
	}
	if dst != nil {
		ok, why := w.ingressAllowed(dst, p.From, p.Port, proto)
		if ok {
			allowed = append(allowed, why)
		} else {
			denied = append(denied, why)
		}
	}
	if len(denied) > 0 {
		return Verdict{Allowed: false, Reason: strings.Join(denied, "; ")}
	}
	if len(allowed) == 0 {
		return Verdict{Allowed: true, Reason: "no pod endpoint: not subject to policy"}
	}
	return Verdict{Allowed: true, Reason: strings.Join(allowed, "; ")}
}

// ingressAllowed decides ingress to pod dst from the given source.
func (w *World) ingressAllowed(dst *Pod, from Endpoint, port int32, proto corev1.Protocol) (bool, string) {
	if from.Pod == nil && from.IP.IsValid() {
		for _, a := range w.NodeIPs[dst.Node] {
			if a.Unmap() == from.IP.Unmap() {
				return true, fmt.Sprintf("ingress from own node %s address %s: always allowed", dst.Node, from.IP)
			}
		}
	}

	selecting := w.selectingPolicies(dst, ingress)
	if len(selecting) == 0 {
		return true, "not selected for ingress"
	}
	for _, pol := range selecting {
		for i, rule := range pol.Spec.Ingress {
			if w.peersMatch(pol, rule.From, from) && portsMatch(rule.Ports, dst, port, proto) {
				return true, fmt.Sprintf("allowed by %s ingress rule %d", policyName(pol), i)
			}
		}
	}
	return false, defaultDeny(selecting, ingress)
}

// egressAllowed decides egress from pod src to the given destination.
func (w *World) egressAllowed(src *Pod, to Endpoint, port int32, proto corev1.Protocol) (bool, string) {
	selecting := w.selectingPolicies(src, egress)
	if len(selecting) == 0 {
		return true, "not selected for egress"
	}
	for _, pol := range selecting {
		for i, rule := range pol.Spec.Egress {
			// Named ports resolve against the destination pod; for a bare
			// IP destination to.Pod is nil and a named port never matches.
			if w.peersMatch(pol, rule.To, to) && portsMatch(rule.Ports, to.Pod, port, proto) {
				return true, fmt.Sprintf("allowed by %s egress rule %d", policyName(pol), i)
			}
		}
	}
	return false, defaultDeny(selecting, egress)
}

func defaultDeny(selecting []*networkingv1.NetworkPolicy, d direction) string {
	names := make([]string, len(selecting))
	for i, pol := range selecting {
		names[i] = policyName(pol)
	}
	return fmt.Sprintf("default deny: selected by %s for %s", strings.Join(names, ", "), d)
}

func policyName(pol *networkingv1.NetworkPolicy) string {
	return pol.Namespace + "/" + pol.Name
}

// selectingPolicies returns, in World order, the policies of the pod's own
// namespace whose podSelector selects the pod and whose effective
// policyTypes include d.
func (w *World) selectingPolicies(pod *Pod, d direction) []*networkingv1.NetworkPolicy {
	var out []*networkingv1.NetworkPolicy
	for i := range w.Policies {
		pol := &w.Policies[i]
		if pol.Namespace != pod.Namespace {
			continue
		}
		if !hasPolicyType(pol, d) {
			continue
		}
		if !selectorMatches(&pol.Spec.PodSelector, pod.Labels) {
			continue
		}
		out = append(out, pol)
	}
	return out
}

// hasPolicyType reports whether d is among the policy's effective
// policyTypes. Unset policyTypes mean Ingress always, plus Egress iff the
// policy has at least one egress rule.
func hasPolicyType(pol *networkingv1.NetworkPolicy, d direction) bool {
	if len(pol.Spec.PolicyTypes) == 0 {
		switch d {
		case ingress:
			return true
		case egress:
			return len(pol.Spec.Egress) > 0
		}
		return false
	}
	want := networkingv1.PolicyTypeIngress
	if d == egress {
		want = networkingv1.PolicyTypeEgress
	}
	for _, t := range pol.Spec.PolicyTypes {
		if t == want {
			return true
		}
	}
	return false
}

// selectorMatches evaluates a label selector. A nil selector matches nothing,
// an empty one everything; an invalid selector matches nothing.
func selectorMatches(sel *metav1.LabelSelector, lbls map[string]string) bool {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return false
	}
	return s.Matches(labels.Set(lbls))
}

// peersMatch reports whether the other end of the connection matches a rule's
// peer list. An empty list matches everything (any pod, any IP).
func (w *World) peersMatch(pol *networkingv1.NetworkPolicy, peers []networkingv1.NetworkPolicyPeer, e Endpoint) bool {
	if len(peers) == 0 {
		return true
	}
	for i := range peers {
		if w.peerMatches(pol, &peers[i], e) {
			return true
		}
	}
	return false
}

func (w *World) peerMatches(pol *networkingv1.NetworkPolicy, peer *networkingv1.NetworkPolicyPeer, e Endpoint) bool {
	if peer.IPBlock != nil {
		ip := e.IP
		if e.Pod != nil {
			ip = e.Pod.IP // ipBlock matches pods by their IP (Calico-like)
		}
		return ipBlockContains(peer.IPBlock, ip)
	}
	if e.Pod == nil {
		return false // pod/namespace selectors never match a bare IP
	}
	pod := e.Pod
	switch {
	case peer.PodSelector != nil && peer.NamespaceSelector == nil:
		return pod.Namespace == pol.Namespace && selectorMatches(peer.PodSelector, pod.Labels)
	case peer.PodSelector == nil && peer.NamespaceSelector != nil:
		return selectorMatches(peer.NamespaceSelector, w.namespaceLabels(pod.Namespace))
	case peer.PodSelector != nil && peer.NamespaceSelector != nil:
		return selectorMatches(peer.NamespaceSelector, w.namespaceLabels(pod.Namespace)) &&
			selectorMatches(peer.PodSelector, pod.Labels)
	}
	return false // empty peer: invalid in the API, matches nothing
}

// namespaceLabels returns the namespace's labels plus the implied
// kubernetes.io/metadata.name label. An unknown namespace has only the
// implied label.
func (w *World) namespaceLabels(name string) map[string]string {
	out := map[string]string{namespaceNameLabel: name}
	for _, ns := range w.Namespaces {
		if ns.Name == name {
			for k, v := range ns.Labels {
				out[k] = v
			}
			out[namespaceNameLabel] = name
			break
		}
	}
	return out
}

// ipBlockContains reports whether ip is inside the block's cidr and not
// inside any of its excepts. Unparsable CIDRs match nothing (an unparsable
// except excludes nothing).
func ipBlockContains(b *networkingv1.IPBlock, ip netip.Addr) bool {
	if !ip.IsValid() {
		return false
	}
	ip = ip.Unmap()
	cidr, err := netip.ParsePrefix(b.CIDR)
	if err != nil || !cidr.Contains(ip) {
		return false
	}
	for _, ex := range b.Except {
		p, err := netip.ParsePrefix(ex)
		if err == nil && p.Contains(ip) {
			return false
		}
	}
	return true
}

// portsMatch reports whether (port, proto) matches a rule's port list. An
// empty list matches every port and protocol. dst is the destination pod,
// used to resolve named ports; nil means the destination is not a pod.
func portsMatch(ports []networkingv1.NetworkPolicyPort, dst *Pod, port int32, proto corev1.Protocol) bool {
	if len(ports) == 0 {
		return true
	}
	for i := range ports {
		if portMatches(&ports[i], dst, port, proto) {
			return true
		}
	}
	return false
}

func portMatches(np *networkingv1.NetworkPolicyPort, dst *Pod, port int32, proto corev1.Protocol) bool {
	ruleProto := corev1.ProtocolTCP
	if np.Protocol != nil {
		ruleProto = *np.Protocol
	}
	if ruleProto != proto {
		return false
	}
	if np.Port == nil {
		return true // every port of this protocol
	}
	if np.Port.Type == intstr.String { // a named port
		if dst == nil {
			return false
		}
		name := np.Port.StrVal
		for _, cp := range dst.Ports {
			cpProto := cp.Protocol
			if cpProto == "" {
				cpProto = corev1.ProtocolTCP
			}
			if cp.Name == name && cpProto == proto && cp.ContainerPort == port {
				return true
			}
		}
		return false
	}
	lo := np.Port.IntVal
	hi := lo
	if np.EndPort != nil {
		hi = *np.EndPort
	}
	return port >= lo && port <= hi
}
