// Package policy compiles Kubernetes NetworkPolicies into the state the
// eBPF datapath enforces (datapath.PolicyState: bpf/lib/policy.h), and
// explains verdicts from that same state (explain.go).
//
// Peers are grouped into identities: every address the datapath may see
// (pods of all nodes, this node's addresses, the CIDRs of ipBlocks) maps to
// a number shared by all peers no rule can tell apart — same namespace,
// labels, named ports, and ipBlock CIDRs containing them. Rules are then
// (local pod, identity, direction, protocol, port prefix) entries, so a
// new pod with known labels costs one ipcache entry, not one per rule.
package policy

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sinabro-io/sinabro/pkg/datapath"
)

// AnyIdentity stands for every peer in a rule key (a rule without peers):
// the datapath tries it after the peer's own identity.
const AnyIdentity = datapath.AnyIdentity

// HostRule is the rule number of "traffic from this node to its pods",
// allowed to every isolated pod (kubelet probes).
const HostRule = 1

// Local is a pod of this node as the kernel shows it (its host veth and the
// pod the CNI plugin named in the veth's alias).
type Local struct {
	Ifindex   int
	Namespace string
	Name      string
	UID       string // instead of the name, when the name was too long for the alias
}

// Input is what a compilation reads.
type Input struct {
	// Pods of every node; hostNetwork pods and pods without an address
	// are no peers (their address is a node's).
	Pods       []*corev1.Pod
	Namespaces []*corev1.Namespace
	Policies   []*networkingv1.NetworkPolicy
	// Local are this node's pods by address. A local pod whose Pod the
	// informer has not shown yet gets no entry (the CNI plugin waits).
	Local map[netip.Addr]Local
	// HostIPs are this node's addresses: always allowed to its pods.
	HostIPs []netip.Addr
	// ServiceIPs are Service addresses (ClusterIPs, external and load
	// balancer IPs): where kube-proxy translates them in the stack, a
	// pod's egress to them is judged on the translated packet.
	ServiceIPs []netip.Addr
}

// Compiled is the datapath's state and what explains it.
type Compiled struct {
	State datapath.PolicyState
	Meta  Meta
	// Warnings name what could not be compiled (an unparsable ipBlock).
	Warnings []string
}

// Meta names the numbers in the datapath's state. It is written beside the
// pinned maps for `sinabro debug policy`.
type Meta struct {
	// Policies and rules by number; numbers stay stable while the agent
	// runs (drop counters are kept by policy number). Rule 1 is HostRule.
	Policies   map[uint32]PolicyMeta       `json:"policies"`
	Rules      map[uint32]RuleMeta         `json:"rules"`
	Identities map[uint32]IdentityMeta     `json:"identities"`
	Endpoints  map[netip.Addr]EndpointMeta `json:"endpoints"`
	// Pods maps "namespace/name" to its address, for every known pod.
	Pods map[string]netip.Addr `json:"pods"`
}

type PolicyMeta struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

func (p PolicyMeta) String() string { return p.Namespace + "/" + p.Name }

// RuleMeta is one rule of one policy as compiled.
type RuleMeta struct {
	Policy uint32             `json:"policy"` // 0 for HostRule
	Dir    datapath.PolicyDir `json:"dir"`
	Index  int                `json:"index"`
	// Peers as written, each with the identities it selected; none: every
	// peer.
	Peers []PeerMeta `json:"peers,omitempty"`
	// Ports as written; none: every port and protocol.
	Ports []string `json:"ports,omitempty"`
	Text  string   `json:"text"`
}

type PeerMeta struct {
	Text       string   `json:"text"`
	Identities []uint32 `json:"identities"`
}

// IdentityMeta says who an identity stands for.
type IdentityMeta struct {
	Kind      string            `json:"kind"` // pod, host, cidr
	Namespace string            `json:"namespace,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	CIDRs     []string          `json:"cidrs,omitempty"`
	Pods      []string          `json:"pods,omitempty"`
}

// EndpointMeta is a local pod with the policies selecting it, by
// direction (policy numbers).
type EndpointMeta struct {
	Pod      string      `json:"pod"`
	Selected [2][]uint32 `json:"selected"`
	// Ports are its named container ports, "name=proto/port".
	Ports []string `json:"ports,omitempty"`
}

// Compiler keeps identity numbers stable from one compilation to the next,
// so an unchanged peer keeps its entries.
type Compiler struct {
	ids, policies, rules numbering
}

func NewCompiler() *Compiler {
	return &Compiler{ids: numbering{m: map[string]uint32{}, next: 16}, policies: numbering{m: map[string]uint32{}},
		rules: numbering{m: map[string]uint32{}, next: HostRule}}
}

// numbering hands out a number per key, the same one every time.
type numbering struct {
	m    map[string]uint32
	next uint32
}

func (n *numbering) of(key string) uint32 {
	if v, ok := n.m[key]; ok {
		return v
	}
	n.next++
	n.m[key] = n.next
	return n.next
}

func (c *Compiler) identity(key string) uint32 { return c.ids.of(key) }

type identity struct {
	id   uint32
	meta IdentityMeta
	// ports: named container ports of its pods, name/proto → numbers.
	ports    map[namedPort][]int32
	cidrs    map[netip.Prefix]bool
	nsLabels labels.Set
}

type namedPort struct {
	name  string
	proto corev1.Protocol
}

type podInfo struct {
	pod *corev1.Pod
	ip  netip.Addr
}

// Compile turns the input into datapath state. It never fails: what it
// cannot understand is left out and named in Warnings.
func (c *Compiler) Compile(in Input) *Compiled {
	out := &Compiled{
		State: datapath.PolicyState{
			Endpoints: map[netip.Addr]datapath.PolicyEndpoint{},
			IPCache:   map[netip.Prefix]uint32{},
			Rules:     map[datapath.PolicyRuleKey]uint32{},
		},
		Meta: Meta{
			Policies:   map[uint32]PolicyMeta{},
			Rules:      map[uint32]RuleMeta{HostRule: {Index: -1, Text: "traffic from this node (kubelet probes) is always allowed in"}},
			Identities: map[uint32]IdentityMeta{},
			Endpoints:  map[netip.Addr]EndpointMeta{},
			Pods:       map[string]netip.Addr{},
		},
	}
	nsLabels := map[string]labels.Set{}
	for _, ns := range in.Namespaces {
		nsLabels[ns.Name] = labels.Set(ns.Labels)
	}
	policies := slices.Clone(in.Policies)
	slices.SortFunc(policies, func(a, b *networkingv1.NetworkPolicy) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})

	// Every ipBlock CIDR and exception: they split the address space.
	cidrSet := map[netip.Prefix]bool{}
	for _, p := range policies {
		forPeers(p, func(_ datapath.PolicyDir, _ int, peer networkingv1.NetworkPolicyPeer) {
			if peer.IPBlock == nil {
				return
			}
			for _, s := range append([]string{peer.IPBlock.CIDR}, peer.IPBlock.Except...) {
				if pr, err := netip.ParsePrefix(s); err == nil && pr.Addr().Is4() {
					cidrSet[pr.Masked()] = true
				}
			}
		})
	}
	// The configured prefixes holding a: one lookup per prefix length.
	containing := func(a netip.Prefix) map[netip.Prefix]bool {
		in := map[netip.Prefix]bool{}
		for bits := 0; bits <= a.Bits(); bits++ {
			if q := netip.PrefixFrom(a.Addr(), bits).Masked(); cidrSet[q] {
				in[q] = true
			}
		}
		return in
	}

	// Pods: status addresses, and this node's pods by the kernel's
	// addresses (known before the kubelet reports them).
	byName := map[string]podInfo{}
	for _, p := range in.Pods {
		if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if err != nil || !ip.Is4() {
			ip = netip.Addr{}
		}
		byName[p.Namespace+"/"+p.Name] = podInfo{pod: p, ip: ip}
	}
	localPods := map[netip.Addr]*corev1.Pod{}
	for ip, l := range in.Local {
		key := l.Namespace + "/" + l.Name
		pi, ok := byName[key]
		if l.Name == "" && l.UID != "" {
			for k, cand := range byName {
				if string(cand.pod.UID) == l.UID {
					key, pi, ok = k, cand, true
				}
			}
		} else if l.Name == "" {
			// A veth without the pod's name (an older plugin): by address.
			for k, cand := range byName {
				if cand.ip == ip {
					key, pi, ok = k, cand, true
				}
			}
		}
		if !ok {
			continue
		}
		pi.ip = ip
		byName[key] = pi
		localPods[ip] = pi.pod
	}

	idents := map[uint32]*identity{}
	addIdentity := func(key string, prefix netip.Prefix, meta IdentityMeta, ports map[namedPort][]int32, nsl labels.Set) *identity {
		cidrs := containing(prefix)
		names := make([]string, 0, len(cidrs))
		for q := range cidrs {
			names = append(names, q.String())
		}
		slices.Sort(names)
		id := c.identity(key + "\x00" + strings.Join(names, ","))
		ident, ok := idents[id]
		if !ok {
			meta.CIDRs = names
			ident = &identity{id: id, meta: meta, ports: ports, cidrs: cidrs, nsLabels: nsl}
			idents[id] = ident
		}
		out.State.IPCache[prefix] = id
		return ident
	}
	podKeys := slices.Sorted(maps.Keys(byName))
	for _, name := range podKeys {
		pi := byName[name]
		if !pi.ip.IsValid() {
			continue
		}
		p := pi.pod
		ports := namedPorts(p)
		key := "pod\x00" + p.Namespace + "\x00" + labels.Set(p.Labels).String() + "\x00" + portsKey(ports)
		ident := addIdentity(key, netip.PrefixFrom(pi.ip, 32),
			IdentityMeta{Kind: "pod", Namespace: p.Namespace, Labels: p.Labels}, ports, nsLabels[p.Namespace])
		ident.meta.Pods = append(ident.meta.Pods, name)
		out.Meta.Pods[name] = pi.ip
	}
	for _, ip := range in.HostIPs {
		if !ip.Is4() {
			continue
		}
		pr := netip.PrefixFrom(ip, 32)
		if _, taken := out.State.IPCache[pr]; taken {
			continue
		}
		addIdentity("host", pr, IdentityMeta{Kind: "host"}, nil, nil)
	}
	for _, ip := range in.ServiceIPs {
		pr := netip.PrefixFrom(ip, 32)
		if _, taken := out.State.IPCache[pr]; !taken && ip.Is4() {
			out.State.IPCache[pr] = datapath.ServiceIdentity
			out.Meta.Identities[datapath.ServiceIdentity] = IdentityMeta{Kind: "service"}
		}
	}
	for _, q := range slices.SortedFunc(maps.Keys(cidrSet), netip.Prefix.Compare) {
		if _, taken := out.State.IPCache[q]; taken {
			continue
		}
		addIdentity("cidr", q, IdentityMeta{Kind: "cidr"}, nil, nil)
	}
	byCIDR := map[netip.Prefix][]uint32{} // the identities inside each ipBlock prefix
	for id, ident := range idents {
		out.Meta.Identities[id] = ident.meta
		for q := range ident.cidrs {
			byCIDR[q] = append(byCIDR[q], id)
		}
	}
	hostIDs := []uint32{}
	for id, ident := range idents {
		if ident.meta.Kind == "host" {
			hostIDs = append(hostIDs, id)
		}
	}

	nums := make([]uint32, len(policies))
	for i, p := range policies {
		nums[i] = c.policies.of(p.Namespace + "/" + p.Name)
		out.Meta.Policies[nums[i]] = PolicyMeta{Namespace: p.Namespace, Name: p.Name}
	}
	for _, ip := range slices.SortedFunc(maps.Keys(localPods), netip.Addr.Compare) {
		pod := localPods[ip]
		ep := datapath.PolicyEndpoint{Ifindex: in.Local[ip].Ifindex}
		em := EndpointMeta{Pod: pod.Namespace + "/" + pod.Name}
		for np, nums := range namedPorts(pod) {
			for _, n := range nums {
				em.Ports = append(em.Ports, fmt.Sprintf("%s=%s/%d", np.name, np.proto, n))
			}
		}
		slices.Sort(em.Ports)
		for pi, p := range policies {
			if p.Namespace != pod.Namespace {
				continue
			}
			sel, err := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector)
			if err != nil {
				out.Warnings = append(out.Warnings, fmt.Sprintf("%s/%s: podSelector: %v", p.Namespace, p.Name, err))
				continue
			}
			if !sel.Matches(labels.Set(pod.Labels)) {
				continue
			}
			num := nums[pi]
			for _, dir := range policyDirs(p) {
				em.Selected[dir] = append(em.Selected[dir], num)
				if !ep.Isolated[dir] {
					ep.Isolated[dir] = true
					ep.DenyPolicy[dir] = num
				}
			}
		}
		out.State.Endpoints[ip] = ep
		out.Meta.Endpoints[ip] = em
		if ep.Isolated[datapath.Ingress] {
			for _, h := range hostIDs {
				out.addRule(datapath.PolicyRuleKey{Pod: ip, Identity: h, Dir: datapath.Ingress}, HostRule)
			}
		}
	}

	// Rules: each selecting policy's rules, for each pod it selects.
	for pi, p := range policies {
		num := nums[pi]
		var selected []netip.Addr
		for ip, em := range out.Meta.Endpoints {
			for _, dir := range []datapath.PolicyDir{datapath.Ingress, datapath.Egress} {
				if slices.Contains(em.Selected[dir], num) && !slices.Contains(selected, ip) {
					selected = append(selected, ip)
				}
			}
		}
		slices.SortFunc(selected, netip.Addr.Compare)
		c.compileRules(out, p, num, selected, localPods, idents, byCIDR, nsLabels)
	}
	return out
}

// addRule records key → rule; the first rule (lowest number) keeps a key.
func (out *Compiled) addRule(k datapath.PolicyRuleKey, rule uint32) {
	if _, ok := out.State.Rules[k]; !ok {
		out.State.Rules[k] = rule
	}
}

func (c *Compiler) compileRules(out *Compiled, p *networkingv1.NetworkPolicy, num uint32, selected []netip.Addr,
	localPods map[netip.Addr]*corev1.Pod, idents map[uint32]*identity, byCIDR map[netip.Prefix][]uint32, nsLabels map[string]labels.Set) {
	type rule struct {
		dir   datapath.PolicyDir
		peers []networkingv1.NetworkPolicyPeer
		ports []networkingv1.NetworkPolicyPort
	}
	var rules []rule
	for _, dir := range policyDirs(p) {
		if dir == datapath.Ingress {
			for _, r := range p.Spec.Ingress {
				rules = append(rules, rule{dir, r.From, r.Ports})
			}
		} else {
			for _, r := range p.Spec.Egress {
				rules = append(rules, rule{dir, r.To, r.Ports})
			}
		}
	}
	index := map[datapath.PolicyDir]int{}
	for _, r := range rules {
		rm := RuleMeta{Policy: num, Dir: r.dir, Index: index[r.dir]}
		index[r.dir]++
		// Which identities the peers select; nil: every peer.
		var peerIDs []uint32
		anyPeer := len(r.peers) == 0
		for _, peer := range r.peers {
			ids, text, err := selectPeer(p, peer, idents, byCIDR, nsLabels)
			if err != nil {
				out.Warnings = append(out.Warnings, fmt.Sprintf("%s/%s %s rule %d: %v", p.Namespace, p.Name, r.dir, rm.Index, err))
			}
			rm.Peers = append(rm.Peers, PeerMeta{Text: text, Identities: ids})
			peerIDs = append(peerIDs, ids...)
		}
		slices.Sort(peerIDs)
		peerIDs = slices.Compact(peerIDs)
		for _, port := range r.ports {
			rm.Ports = append(rm.Ports, portText(port))
		}
		rm.Text = ruleText(p, rm)
		ruleNum := c.rules.of(fmt.Sprintf("%s/%s\x00%s\x00%d", p.Namespace, p.Name, r.dir, rm.Index))
		out.Meta.Rules[ruleNum] = rm

		for _, ip := range selected {
			em := out.Meta.Endpoints[ip]
			if !slices.Contains(em.Selected[r.dir], num) {
				continue
			}
			emit := func(id uint32, proto uint8, port uint16, bits uint8) {
				out.addRule(datapath.PolicyRuleKey{Pod: ip, Identity: id, Dir: r.dir, Proto: proto, Port: port, PortBits: bits}, ruleNum)
			}
			targets := peerIDs
			if anyPeer {
				targets = []uint32{AnyIdentity}
			}
			if len(r.ports) == 0 {
				for _, id := range targets {
					emit(id, 0, 0, 0)
				}
				continue
			}
			for _, port := range r.ports {
				proto := protoNumber(port.Protocol)
				if proto == 0 {
					continue
				}
				switch {
				case port.Port == nil:
					for _, id := range targets {
						emit(id, proto, 0, 0)
					}
				case port.Port.Type == 0: // a number, maybe a range
					from := uint16(port.Port.IntVal)
					to := from
					if port.EndPort != nil && *port.EndPort >= port.Port.IntVal {
						to = uint16(*port.EndPort)
					}
					for _, pp := range datapath.PortPrefixes(from, to) {
						for _, id := range targets {
							emit(id, proto, pp[0], uint8(pp[1]))
						}
					}
				default: // a name: the destination pod's container port
					np := namedPort{port.Port.StrVal, protocolOf(port.Protocol)}
					if r.dir == datapath.Ingress {
						for _, n := range namedPorts(localPods[ip])[np] {
							for _, id := range targets {
								emit(id, proto, uint16(n), 16)
							}
						}
						continue
					}
					// Egress: each destination identity's own number; a
					// rule for every peer covers every pod identity.
					dests := peerIDs
					if anyPeer {
						dests = slices.Collect(maps.Keys(idents))
					}
					for _, id := range dests {
						if ident := idents[id]; ident != nil {
							for _, n := range ident.ports[np] {
								emit(id, proto, uint16(n), 16)
							}
						}
					}
				}
			}
		}
	}
}

// selectPeer returns the identities a peer of policy p selects.
func selectPeer(p *networkingv1.NetworkPolicy, peer networkingv1.NetworkPolicyPeer, idents map[uint32]*identity,
	byCIDR map[netip.Prefix][]uint32, nsLabels map[string]labels.Set) ([]uint32, string, error) {
	text := peerText(peer)
	var ids []uint32
	if b := peer.IPBlock; b != nil {
		cidr, err := netip.ParsePrefix(b.CIDR)
		if err != nil || !cidr.Addr().Is4() {
			return nil, text, fmt.Errorf("ipBlock %q: not an IPv4 CIDR (IPv6 is not enforced)", b.CIDR)
		}
		var except []netip.Prefix
		for _, e := range b.Except {
			if ep, err := netip.ParsePrefix(e); err == nil && ep.Addr().Is4() {
				except = append(except, ep.Masked())
			}
		}
		for _, id := range byCIDR[cidr.Masked()] {
			ident := idents[id]
			if slices.ContainsFunc(except, func(e netip.Prefix) bool { return ident.cidrs[e] }) {
				continue
			}
			ids = append(ids, id)
		}
		slices.Sort(ids)
		return ids, text, nil
	}
	var podSel, nsSel labels.Selector
	var err error
	if peer.PodSelector != nil {
		if podSel, err = metav1.LabelSelectorAsSelector(peer.PodSelector); err != nil {
			return nil, text, err
		}
	}
	if peer.NamespaceSelector != nil {
		if nsSel, err = metav1.LabelSelectorAsSelector(peer.NamespaceSelector); err != nil {
			return nil, text, err
		}
	}
	for id, ident := range idents {
		if ident.meta.Kind != "pod" {
			continue
		}
		if nsSel == nil && ident.meta.Namespace != p.Namespace {
			continue
		}
		if nsSel != nil && !nsSel.Matches(nsLabels[ident.meta.Namespace]) {
			continue
		}
		if podSel != nil && !podSel.Matches(labels.Set(ident.meta.Labels)) {
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, text, nil
}

// policyDirs are a policy's effective policyTypes.
func policyDirs(p *networkingv1.NetworkPolicy) []datapath.PolicyDir {
	if len(p.Spec.PolicyTypes) == 0 {
		if len(p.Spec.Egress) > 0 {
			return []datapath.PolicyDir{datapath.Ingress, datapath.Egress}
		}
		return []datapath.PolicyDir{datapath.Ingress}
	}
	var out []datapath.PolicyDir
	for _, t := range p.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			out = append(out, datapath.Ingress)
		case networkingv1.PolicyTypeEgress:
			out = append(out, datapath.Egress)
		}
	}
	return out
}

func forPeers(p *networkingv1.NetworkPolicy, f func(datapath.PolicyDir, int, networkingv1.NetworkPolicyPeer)) {
	for i, r := range p.Spec.Ingress {
		for _, peer := range r.From {
			f(datapath.Ingress, i, peer)
		}
	}
	for i, r := range p.Spec.Egress {
		for _, peer := range r.To {
			f(datapath.Egress, i, peer)
		}
	}
}

func protocolOf(p *corev1.Protocol) corev1.Protocol {
	if p == nil {
		return corev1.ProtocolTCP
	}
	return *p
}

func protoNumber(p *corev1.Protocol) uint8 {
	switch protocolOf(p) {
	case corev1.ProtocolTCP:
		return 6
	case corev1.ProtocolUDP:
		return 17
	case corev1.ProtocolSCTP:
		return 132
	}
	return 0
}

func namedPorts(p *corev1.Pod) map[namedPort][]int32 {
	out := map[namedPort][]int32{}
	if p == nil {
		return out
	}
	for _, cs := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for _, c := range cs {
			for _, cp := range c.Ports {
				if cp.Name == "" {
					continue
				}
				proto := cp.Protocol
				if proto == "" {
					proto = corev1.ProtocolTCP
				}
				k := namedPort{cp.Name, proto}
				if !slices.Contains(out[k], cp.ContainerPort) {
					out[k] = append(out[k], cp.ContainerPort)
				}
			}
		}
	}
	return out
}

func portsKey(ports map[namedPort][]int32) string {
	var parts []string
	for k, v := range ports {
		slices.Sort(v)
		parts = append(parts, fmt.Sprintf("%s/%s=%v", k.name, k.proto, v))
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

func portText(p networkingv1.NetworkPolicyPort) string {
	proto := protocolOf(p.Protocol)
	switch {
	case p.Port == nil:
		return string(proto) + "/*"
	case p.EndPort != nil:
		return fmt.Sprintf("%s/%s-%d", proto, p.Port.String(), *p.EndPort)
	}
	return fmt.Sprintf("%s/%s", proto, p.Port.String())
}

func selectorText(s *metav1.LabelSelector) string {
	if s == nil {
		return ""
	}
	t := metav1.FormatLabelSelector(s)
	if t == "" || t == "<none>" {
		return "{}"
	}
	return "{" + t + "}"
}

func peerText(peer networkingv1.NetworkPolicyPeer) string {
	if b := peer.IPBlock; b != nil {
		if len(b.Except) > 0 {
			return fmt.Sprintf("ipBlock %s except %s", b.CIDR, strings.Join(b.Except, ","))
		}
		return "ipBlock " + b.CIDR
	}
	var parts []string
	if peer.NamespaceSelector != nil {
		parts = append(parts, "namespaceSelector "+selectorText(peer.NamespaceSelector))
	}
	if peer.PodSelector != nil {
		parts = append(parts, "podSelector "+selectorText(peer.PodSelector))
	}
	if len(parts) == 0 {
		return "(empty peer)"
	}
	return strings.Join(parts, " and ")
}

func ruleText(p *networkingv1.NetworkPolicy, r RuleMeta) string {
	from := "from"
	if r.Dir == datapath.Egress {
		from = "to"
	}
	peers := "any peer"
	if len(r.Peers) > 0 {
		var ts []string
		for _, pm := range r.Peers {
			ts = append(ts, pm.Text)
		}
		peers = strings.Join(ts, " or ")
	}
	ports := "any port"
	if len(r.Ports) > 0 {
		ports = strings.Join(r.Ports, ",")
	}
	return fmt.Sprintf("%s/%s %s rule %d: %s %s on %s", p.Namespace, p.Name, r.Dir, r.Index, from, peers, ports)
}
