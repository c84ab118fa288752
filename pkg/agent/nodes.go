package agent

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/sinabro-io/sinabro/pkg/overlay"
)

// Annotations each agent publishes on its own Node for the others.
const (
	// AnnotationVTEPMAC is the MAC of the node's vxlan device.
	AnnotationVTEPMAC = "sinabro.io/vtep-mac"
	// AnnotationVTEPIP is the underlay address the node's vxlan device sends
	// from (and receives on); peers send their VXLAN packets there. It falls
	// back to the node's first IPv4 InternalIP when absent.
	AnnotationVTEPIP = "sinabro.io/vtep-ip"
)

// Reasons a node is left out of the overlay, used in logs, Events and the
// skipped-nodes metric.
const (
	ReasonMalformedPodCIDR   = "MalformedPodCIDR"
	ReasonMissingInternalIP  = "MissingInternalIP"
	ReasonMalformedVTEP      = "MalformedVTEP"
	ReasonDuplicateVTEPMAC   = "DuplicateVTEPMAC"
	ReasonOverlappingPodCIDR = "OverlappingPodCIDR"
)

// Skip says why a node is not programmed.
type Skip struct {
	Reason  string
	Message string
}

// nodeInfo is what the overlay needs from a Node.
type nodeInfo struct {
	Name       string
	Created    time.Time
	PodCIDRs   []netip.Prefix
	InternalIP netip.Addr // first IPv4 InternalIP
	Addresses  []netip.Addr
	VTEPMAC    net.HardwareAddr // nil: not published yet
	VTEPIP     netip.Addr       // where to send VXLAN packets
}

// parseNode extracts nodeInfo, or the reason the node is unusable.
func parseNode(n *corev1.Node) (nodeInfo, *Skip) {
	info := nodeInfo{Name: n.Name, Created: n.CreationTimestamp.Time}
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, s := range cidrs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return info, &Skip{ReasonMalformedPodCIDR, fmt.Sprintf("pod CIDR %q: %v", s, err)}
		}
		if p != p.Masked() {
			return info, &Skip{ReasonMalformedPodCIDR, fmt.Sprintf("pod CIDR %q has host bits set", s)}
		}
		if p.Addr().Is4() && p.Bits() > 30 || p.Addr().Is6() && p.Bits() > 126 {
			return info, &Skip{ReasonMalformedPodCIDR, fmt.Sprintf("pod CIDR %q is too small", s)}
		}
		info.PodCIDRs = append(info.PodCIDRs, p)
	}
	for _, a := range n.Status.Addresses {
		ip, err := netip.ParseAddr(a.Address)
		if err != nil {
			continue
		}
		ip = ip.Unmap()
		info.Addresses = append(info.Addresses, ip)
		if a.Type == corev1.NodeInternalIP && ip.Is4() && !info.InternalIP.IsValid() {
			info.InternalIP = ip
		}
	}
	if !info.InternalIP.IsValid() {
		return info, &Skip{ReasonMissingInternalIP, "node has no IPv4 InternalIP address"}
	}
	info.VTEPIP = info.InternalIP
	if s, ok := n.Annotations[AnnotationVTEPIP]; ok {
		ip, err := netip.ParseAddr(s)
		if err != nil || !ip.Is4() {
			return info, &Skip{ReasonMalformedVTEP, fmt.Sprintf("annotation %s=%q is not an IPv4 address", AnnotationVTEPIP, s)}
		}
		info.VTEPIP = ip
	}
	if s, ok := n.Annotations[AnnotationVTEPMAC]; ok {
		mac, err := net.ParseMAC(s)
		if err != nil || len(mac) != 6 || mac[0]&0x01 != 0 {
			return info, &Skip{ReasonMalformedVTEP, fmt.Sprintf("annotation %s=%q is not a unicast Ethernet MAC", AnnotationVTEPMAC, s)}
		}
		info.VTEPMAC = mac
	}
	return info, nil
}

// Selection is the outcome of choosing peers among the cluster's nodes.
type Selection struct {
	Peers   []overlay.Peer
	Skipped map[string]Skip // by node name
	Pending []string        // nodes whose agent has not published its VTEP yet, or without pod CIDRs
	// ExcludeCIDRs and NodeIPs feed masquerade: every parseable pod CIDR and
	// node address, skipped nodes included (they are still in the cluster).
	ExcludeCIDRs []netip.Prefix
	NodeIPs      []netip.Addr
}

// selectPeers decides which nodes other than self are programmed. Bad input
// skips a node with a reason; it never stops the others. When nodes conflict
// (the same VTEP MAC, overlapping pod CIDRs) self and then the oldest Node
// win, so a misconfigured newcomer cannot cut off a working node.
func selectPeers(self nodeInfo, nodes []*corev1.Node) Selection {
	sel := Selection{Skipped: map[string]Skip{}}
	var cands []nodeInfo
	for _, n := range nodes {
		info, skip := parseNode(n)
		sel.ExcludeCIDRs = append(sel.ExcludeCIDRs, info.PodCIDRs...)
		sel.NodeIPs = append(sel.NodeIPs, info.Addresses...)
		if n.Name == self.Name {
			continue
		}
		switch {
		case skip != nil:
			sel.Skipped[n.Name] = *skip
		case info.VTEPMAC == nil || len(info.PodCIDRs) == 0:
			sel.Pending = append(sel.Pending, n.Name)
		default:
			cands = append(cands, info)
		}
	}

	// Oldest first: on a conflict the node that was there first keeps
	// working and the newcomer is skipped.
	slices.SortFunc(cands, func(a, b nodeInfo) int {
		return cmp.Or(a.Created.Compare(b.Created), strings.Compare(a.Name, b.Name))
	})
	macOwner := map[string]string{}
	if self.VTEPMAC != nil {
		macOwner[self.VTEPMAC.String()] = self.Name
	}
	accepted := []nodeInfo{self}
	for _, c := range cands {
		if owner, taken := macOwner[c.VTEPMAC.String()]; taken {
			sel.Skipped[c.Name] = Skip{ReasonDuplicateVTEPMAC, fmt.Sprintf("VTEP MAC %s is already used by node %s", c.VTEPMAC, owner)}
			continue
		}
		if o, p, q, ok := overlappingNode(c.PodCIDRs, accepted); ok {
			sel.Skipped[c.Name] = Skip{ReasonOverlappingPodCIDR, fmt.Sprintf("pod CIDR %s overlaps %s of node %s", p, q, o)}
			continue
		}
		macOwner[c.VTEPMAC.String()] = c.Name
		accepted = append(accepted, c)
	}

	for _, c := range cands {
		if _, skipped := sel.Skipped[c.Name]; skipped {
			continue
		}
		sel.Peers = append(sel.Peers, overlay.Peer{Name: c.Name, Underlay: c.VTEPIP, MAC: c.VTEPMAC, PodCIDRs: c.PodCIDRs})
	}
	slices.SortFunc(sel.Peers, func(a, b overlay.Peer) int { return strings.Compare(a.Name, b.Name) })
	sort.Strings(sel.Pending)
	// The lister returns nodes in no particular order; sorted output lets
	// consumers compare selections.
	slices.SortFunc(sel.ExcludeCIDRs, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	sel.ExcludeCIDRs = slices.Compact(sel.ExcludeCIDRs)
	slices.SortFunc(sel.NodeIPs, netip.Addr.Compare)
	sel.NodeIPs = slices.Compact(sel.NodeIPs)
	return sel
}

// overlappingNode finds a node among nodes with a pod CIDR overlapping one of cidrs.
func overlappingNode(cidrs []netip.Prefix, nodes []nodeInfo) (string, netip.Prefix, netip.Prefix, bool) {
	for _, n := range nodes {
		for _, p := range cidrs {
			for _, q := range n.PodCIDRs {
				if p.Overlaps(q) {
					return n.Name, p, q, true
				}
			}
		}
	}
	return "", netip.Prefix{}, netip.Prefix{}, false
}

// relevantChange reports whether a Node update touches what the overlay uses;
// kubelet status heartbeats do not.
func relevantChange(old, cur *corev1.Node) bool {
	return !slices.Equal(old.Spec.PodCIDRs, cur.Spec.PodCIDRs) ||
		old.Spec.PodCIDR != cur.Spec.PodCIDR ||
		!slices.Equal(old.Status.Addresses, cur.Status.Addresses) ||
		old.Annotations[AnnotationVTEPMAC] != cur.Annotations[AnnotationVTEPMAC] ||
		old.Annotations[AnnotationVTEPIP] != cur.Annotations[AnnotationVTEPIP]
}
