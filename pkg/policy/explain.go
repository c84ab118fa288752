package policy

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/sinabro-io/sinabro/pkg/datapath"
)

// Lookuper makes the datapath's lookups (datapath.PolicyMaps).
type Lookuper interface {
	Lookup(pod, peer netip.Addr, dir datapath.PolicyDir, proto uint8, port uint16) (datapath.PolicyLookup, error)
}

// Explanation is the verdict for a new flow from one address to another,
// with the check of each end this node enforces.
type Explanation struct {
	From    string  `json:"from"`
	To      string  `json:"to"`
	Port    string  `json:"port"`
	Allowed bool    `json:"allowed"`
	Checks  []Check `json:"checks"`
}

// Check is one direction's decision: the source pod's egress or the
// destination pod's ingress.
type Check struct {
	Dir datapath.PolicyDir `json:"direction"`
	Pod string             `json:"pod"`
	// Here is false when the pod is not on this node: its node decides.
	Here     bool   `json:"here"`
	Isolated bool   `json:"isolated"`
	Allowed  bool   `json:"allowed"`
	Verdict  string `json:"verdict"`
	// PeerIdentity is the peer's identity as this node's ipcache has it.
	PeerIdentity uint32   `json:"peerIdentity"`
	Peer         string   `json:"peer"`
	Why          []string `json:"why,omitempty"`
}

// Explain answers for a new flow from → to (proto 0: any protocol other
// than TCP, UDP, SCTP) from the datapath's maps (lookups) and the names
// the agent wrote beside them (meta).
func Explain(meta *Meta, maps Lookuper, from, to netip.Addr, proto uint8, port uint16) (Explanation, error) {
	e := Explanation{From: meta.describe(from), To: meta.describe(to), Port: portString(proto, port), Allowed: true}
	for _, c := range []struct {
		dir       datapath.PolicyDir
		pod, peer netip.Addr
	}{{datapath.Egress, from, to}, {datapath.Ingress, to, from}} {
		ch := Check{Dir: c.dir, Pod: meta.describe(c.pod), Peer: meta.describe(c.peer)}
		if _, local := meta.Endpoints[c.pod]; !local && !meta.isPod(c.pod) {
			continue // not a pod: no policy on this end
		}
		l, err := maps.Lookup(c.pod, c.peer, c.dir, proto, port)
		if err != nil {
			return e, err
		}
		ch.Here, ch.Isolated, ch.Allowed, ch.PeerIdentity = l.Endpoint, l.Isolated, l.Allowed, l.Identity
		switch {
		case !l.Endpoint:
			ch.Verdict = "not a pod of this node: its own node decides"
		case !l.Isolated:
			ch.Verdict = fmt.Sprintf("allowed: no policy selects the pod for %s", c.dir)
		case l.Allowed:
			ch.Verdict = "allowed by " + meta.ruleName(l.Rule)
		default:
			ch.Verdict = fmt.Sprintf("denied: default deny, selected by %s for %s", meta.policyList(meta.Endpoints[c.pod].Selected[c.dir]), c.dir)
		}
		if l.Endpoint {
			ch.Why = meta.why(c.pod, c.dir, l.Identity, proto, port)
		}
		if !ch.Allowed {
			e.Allowed = false
		}
		e.Checks = append(e.Checks, ch)
	}
	return e, nil
}

func (m *Meta) isPod(ip netip.Addr) bool {
	for _, a := range m.Pods {
		if a == ip {
			return true
		}
	}
	return false
}

func (m *Meta) describe(ip netip.Addr) string {
	for _, name := range slices.Sorted(maps.Keys(m.Pods)) {
		if m.Pods[name] == ip {
			return fmt.Sprintf("%s (%s)", name, ip)
		}
	}
	return ip.String()
}

func (m *Meta) ruleName(n uint32) string {
	if r, ok := m.Rules[n]; ok {
		return r.Text
	}
	return fmt.Sprintf("rule %d (not in the agent's explanation: written by a newer pass?)", n)
}

func (m *Meta) policyList(nums []uint32) string {
	var names []string
	for _, n := range nums {
		names = append(names, m.Policies[n].String())
	}
	return strings.Join(names, ", ")
}

// why says, for each rule of each policy selecting pod in dir, whether
// the peer identity and the port match it.
func (m *Meta) why(pod netip.Addr, dir datapath.PolicyDir, peer uint32, proto uint8, port uint16) []string {
	ep := m.Endpoints[pod]
	var out []string
	if ident, ok := m.Identities[peer]; ok {
		out = append(out, fmt.Sprintf("peer is identity %d: %s", peer, ident.String()))
	} else {
		out = append(out, fmt.Sprintf("peer is identity %d: the world (no pod, node address or ipBlock CIDR holds it)", peer))
	}
	if dir == datapath.Ingress && m.Identities[peer].Kind == "host" {
		out = append(out, "the peer is this node: always allowed in (kubelet probes)")
	}
	for _, num := range ep.Selected[dir] {
		var rules []RuleMeta
		for _, r := range m.Rules {
			if r.Policy == num && r.Dir == dir {
				rules = append(rules, r)
			}
		}
		slices.SortFunc(rules, func(a, b RuleMeta) int { return cmp.Compare(a.Index, b.Index) })
		if len(rules) == 0 {
			out = append(out, fmt.Sprintf("%s selects the pod for %s and has no %s rules (deny all)", m.Policies[num], dir, dir))
		}
		for _, r := range rules {
			peerMatch := "any peer matches"
			if len(r.Peers) > 0 {
				peerMatch = "no peer matches"
				for _, p := range r.Peers {
					if slices.Contains(p.Identities, peer) {
						peerMatch = "peer matches " + p.Text
						break
					}
				}
			}
			ports := "any port"
			if len(r.Ports) > 0 {
				ports = strings.Join(r.Ports, ",")
			}
			out = append(out, fmt.Sprintf("%s %s rule %d: %s; ports %s (the flow: %s)", m.Policies[num], dir, r.Index, peerMatch, ports, portString(proto, port)))
		}
	}
	return out
}

func (i IdentityMeta) String() string {
	var parts []string
	switch i.Kind {
	case "pod":
		var ls []string
		for _, k := range slices.Sorted(maps.Keys(i.Labels)) {
			ls = append(ls, k+"="+i.Labels[k])
		}
		parts = append(parts, fmt.Sprintf("pods of namespace %s with labels {%s}", i.Namespace, strings.Join(ls, ",")))
	case "host":
		parts = append(parts, "this node's addresses")
	case "service":
		parts = append(parts, "Service addresses (egress judged after kube-proxy translates them)")
	default:
		parts = append(parts, "addresses of ipBlock CIDRs")
	}
	if len(i.CIDRs) > 0 {
		parts = append(parts, "inside "+strings.Join(i.CIDRs, ","))
	}
	return strings.Join(parts, ", ")
}

func portString(proto uint8, port uint16) string {
	switch proto {
	case 6:
		return fmt.Sprintf("%d/tcp", port)
	case 17:
		return fmt.Sprintf("%d/udp", port)
	case 132:
		return fmt.Sprintf("%d/sctp", port)
	}
	return fmt.Sprintf("protocol %d", proto)
}

// ParsePort reads "80/tcp", "53/udp", "9/sctp" or "icmp".
func ParsePort(s string) (proto uint8, port uint16, err error) {
	if strings.EqualFold(s, "icmp") {
		return 1, 0, nil
	}
	num, p, ok := strings.Cut(s, "/")
	if !ok {
		p = "tcp"
	}
	switch strings.ToLower(p) {
	case "tcp":
		proto = 6
	case "udp":
		proto = 17
	case "sctp":
		proto = 132
	default:
		return 0, 0, fmt.Errorf("port %q: protocol %q is not tcp, udp or sctp", s, p)
	}
	var n int
	if _, err := fmt.Sscanf(num, "%d", &n); err != nil || n < 1 || n > 65535 {
		return 0, 0, fmt.Errorf("port %q: want N/tcp, N/udp or N/sctp with N in 1..65535", s)
	}
	return proto, uint16(n), nil
}

// Resolve turns "namespace/name" or an address into an address.
func (m *Meta) Resolve(s string) (netip.Addr, error) {
	if ip, err := netip.ParseAddr(s); err == nil {
		return ip, nil
	}
	if ip, ok := m.Pods[s]; ok {
		return ip, nil
	}
	if !strings.Contains(s, "/") {
		if ip, ok := m.Pods["default/"+s]; ok {
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%q is neither an address nor a pod the agent knows (namespace/name)", s)
}
