package agent

import (
	"bytes"
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
	// ReasonReservedPodCIDR: a default route, or a pod CIDR overlapping
	// loopback, link-local, multicast or other special-purpose space.
	ReasonReservedPodCIDR = "ReservedPodCIDR"
	// ReasonOutsideClusterCIDR: a pod CIDR not inside --cluster-cidr.
	ReasonOutsideClusterCIDR = "OutsideClusterCIDR"
	// ReasonOverlapsNodeAddress: a pod CIDR holding a node's address or
	// overlapping a subnet this node is attached to, or a node address
	// inside another node's pod CIDR.
	ReasonOverlapsNodeAddress = "OverlapsNodeAddress"
)

// skipReasons lists every reason, for the metric's label values.
var skipReasons = []string{
	ReasonMalformedPodCIDR, ReasonMissingInternalIP, ReasonMalformedVTEP, ReasonDuplicateVTEPMAC,
	ReasonOverlappingPodCIDR, ReasonReservedPodCIDR, ReasonOutsideClusterCIDR, ReasonOverlapsNodeAddress,
}

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
		// FDB entries send this node's traffic there: it must be the
		// node's own, not an address a Node object merely names.
		if !slices.Contains(info.Addresses, ip) {
			return info, &Skip{ReasonMalformedVTEP, fmt.Sprintf("annotation %s=%s is not one of the node's addresses %v", AnnotationVTEPIP, s, info.Addresses)}
		}
	}
	if !unicast(info.VTEPIP) {
		return info, &Skip{ReasonMalformedVTEP, fmt.Sprintf("VTEP address %s is not a unicast address", info.VTEPIP)}
	}
	if s, ok := n.Annotations[AnnotationVTEPMAC]; ok {
		mac, err := net.ParseMAC(s)
		if err != nil || len(mac) != 6 || mac[0]&0x01 != 0 || bytes.Equal(mac, make(net.HardwareAddr, 6)) {
			return info, &Skip{ReasonMalformedVTEP, fmt.Sprintf("annotation %s=%q is not a unicast Ethernet MAC", AnnotationVTEPMAC, s)}
		}
		info.VTEPMAC = mac
	}
	return info, nil
}

// Bounds limit what another node's Node object can make this node
// install: the Node API is wide (kubelets write their own Node, admins and
// controllers others), and a route or FDB entry taken from it redirects
// this node's traffic.
type Bounds struct {
	// ClusterCIDRs must contain every peer pod CIDR of their family. A
	// family without one accepts any pod CIDR that passes the other checks.
	ClusterCIDRs []netip.Prefix
	// HostPrefixes are this node's interface addresses with their prefix
	// lengths (the subnets it is attached to), the overlay device's own
	// left out. A subnet that contains a cluster CIDR counts as its
	// address only: the operator put the pods inside it on purpose.
	HostPrefixes []netip.Prefix
}

// Selection is the outcome of choosing peers among the cluster's nodes.
type Selection struct {
	Peers   []overlay.Peer
	Skipped map[string]Skip // by node name
	Pending []string        // nodes whose agent has not published its VTEP yet, or without pod CIDRs
	// ExcludeCIDRs and NodeIPs feed masquerade: the pod CIDRs and node
	// addresses of this node, the peers and the pending nodes, all of them
	// checked like peers. A skipped node contributes nothing, so a bad Node
	// object cannot turn masquerading off (a pod CIDR of 0.0.0.0/0 would).
	ExcludeCIDRs []netip.Prefix
	NodeIPs      []netip.Addr
}

// selectPeers decides which nodes other than self are programmed. Bad input
// skips a node with a reason; it never stops the others. When nodes conflict
// (the same VTEP MAC, overlapping pod CIDRs, a node address inside another
// node's pod CIDR) self and then the oldest Node win, so a misconfigured
// newcomer cannot cut off a working node. Its cost grows with the number
// of nodes times the number of distinct prefix lengths, never with the
// square of the number of nodes.
func selectPeers(self nodeInfo, nodes []*corev1.Node, b Bounds) Selection {
	sel := Selection{Skipped: map[string]Skip{}}
	var cands []nodeInfo
	for _, n := range nodes {
		if n.Name == self.Name {
			continue
		}
		info, skip := parseNode(n)
		if skip == nil {
			skip = checkPodCIDRs(info.PodCIDRs, b.ClusterCIDRs)
		}
		if skip != nil {
			sel.Skipped[n.Name] = *skip
			continue
		}
		cands = append(cands, info)
	}

	// Oldest first: on a conflict the node that was there first keeps
	// working and the newcomer is skipped.
	slices.SortFunc(cands, func(a, b nodeInfo) int {
		return cmp.Or(a.Created.Compare(b.Created), strings.Compare(a.Name, b.Name))
	})
	var probeLens []int // every pod CIDR length a candidate asks about
	for _, c := range cands {
		for _, p := range c.PodCIDRs {
			probeLens = append(probeLens, p.Bits())
		}
	}
	pods := newPrefixIndex(probeLens)  // accepted pod CIDRs
	addrs := newPrefixIndex(probeLens) // node addresses and host subnets
	for _, p := range self.PodCIDRs {
		pods.insert(p, "this node")
	}
	for _, a := range self.Addresses {
		addrs.insert(netip.PrefixFrom(a, a.BitLen()), "this node")
	}
	for _, h := range b.HostPrefixes {
		if _, _, ours := pods.overlap(netip.PrefixFrom(h.Addr(), h.Addr().BitLen())); ours {
			continue // a pod gateway or VTEP address inside our own pod CIDR
		}
		if slices.ContainsFunc(b.ClusterCIDRs, func(c netip.Prefix) bool { return h.Bits() <= c.Bits() && h.Contains(c.Addr()) }) {
			h = netip.PrefixFrom(h.Addr(), h.Addr().BitLen())
		}
		addrs.insert(h.Masked(), "this node's interface")
	}
	macOwner := map[string]string{}
	if self.VTEPMAC != nil {
		macOwner[self.VTEPMAC.String()] = self.Name
	}
	accepted := []nodeInfo{self}
	for _, c := range cands {
		if skip := conflict(c, macOwner, pods, addrs); skip != nil {
			sel.Skipped[c.Name] = *skip
			continue
		}
		if c.VTEPMAC != nil {
			macOwner[c.VTEPMAC.String()] = c.Name
		}
		for _, p := range c.PodCIDRs {
			pods.insert(p, "node "+c.Name)
		}
		for _, a := range c.Addresses {
			addrs.insert(netip.PrefixFrom(a, a.BitLen()), "node "+c.Name)
		}
		accepted = append(accepted, c)
		if c.VTEPMAC == nil || len(c.PodCIDRs) == 0 {
			sel.Pending = append(sel.Pending, c.Name)
			continue
		}
		sel.Peers = append(sel.Peers, overlay.Peer{Name: c.Name, Underlay: c.VTEPIP, MAC: c.VTEPMAC, PodCIDRs: c.PodCIDRs})
	}
	for _, n := range accepted {
		sel.ExcludeCIDRs = append(sel.ExcludeCIDRs, n.PodCIDRs...)
		sel.NodeIPs = append(sel.NodeIPs, n.Addresses...)
	}

	slices.SortFunc(sel.Peers, func(a, b overlay.Peer) int { return strings.Compare(a.Name, b.Name) })
	sort.Strings(sel.Pending)
	// Sorted output lets consumers compare selections.
	slices.SortFunc(sel.ExcludeCIDRs, comparePrefix)
	sel.ExcludeCIDRs = slices.Compact(sel.ExcludeCIDRs)
	slices.SortFunc(sel.NodeIPs, netip.Addr.Compare)
	sel.NodeIPs = slices.Compact(sel.NodeIPs)
	return sel
}

// conflict checks a candidate against the nodes accepted before it.
func conflict(c nodeInfo, macOwner map[string]string, pods, addrs *prefixIndex) *Skip {
	if c.VTEPMAC != nil {
		if owner, taken := macOwner[c.VTEPMAC.String()]; taken {
			return &Skip{ReasonDuplicateVTEPMAC, fmt.Sprintf("VTEP MAC %s is already used by node %s", c.VTEPMAC, owner)}
		}
	}
	for _, p := range c.PodCIDRs {
		if q, owner, ok := pods.overlap(p); ok {
			return &Skip{ReasonOverlappingPodCIDR, fmt.Sprintf("pod CIDR %s overlaps %s of %s", p, q, owner)}
		}
		if q, owner, ok := addrs.overlap(p); ok {
			return &Skip{ReasonOverlapsNodeAddress, fmt.Sprintf("pod CIDR %s overlaps %s of %s", p, q, owner)}
		}
	}
	for _, a := range c.Addresses {
		// Its own address too: the route to its pods would swallow the
		// tunnel's own packets.
		if i := slices.IndexFunc(c.PodCIDRs, func(p netip.Prefix) bool { return p.Contains(a) }); i >= 0 {
			return &Skip{ReasonOverlapsNodeAddress, fmt.Sprintf("pod CIDR %s holds the node's own address %s", c.PodCIDRs[i], a)}
		}
		if q, owner, ok := pods.overlap(netip.PrefixFrom(a, a.BitLen())); ok {
			return &Skip{ReasonOverlapsNodeAddress, fmt.Sprintf("node address %s lies in pod CIDR %s of %s", a, q, owner)}
		}
	}
	return nil
}

// reserved are special-purpose ranges no pod CIDR may overlap (RFC 6890):
// traffic to them must never be routed into the overlay.
var reserved = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("240.0.0.0/4"),
	netip.MustParsePrefix("::/8"), // unspecified, loopback, IPv4-mapped and -compatible
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

// checkPodCIDRs rejects pod CIDRs that no node may claim whatever the
// others claim: default routes, special-purpose space, and anything outside
// the cluster CIDRs of its family.
func checkPodCIDRs(cidrs, cluster []netip.Prefix) *Skip {
	for _, p := range cidrs {
		if p.Bits() == 0 {
			return &Skip{ReasonReservedPodCIDR, fmt.Sprintf("pod CIDR %s is a default route", p)}
		}
		for _, r := range reserved {
			if p.Overlaps(r) {
				return &Skip{ReasonReservedPodCIDR, fmt.Sprintf("pod CIDR %s overlaps special-purpose range %s", p, r)}
			}
		}
		inFamily := false
		inside := false
		for _, c := range cluster {
			if c.Addr().Is4() != p.Addr().Is4() {
				continue
			}
			inFamily = true
			inside = inside || c.Bits() <= p.Bits() && c.Contains(p.Addr())
		}
		if inFamily && !inside {
			return &Skip{ReasonOutsideClusterCIDR, fmt.Sprintf("pod CIDR %s is not inside the cluster CIDR %v", p, cluster)}
		}
	}
	return nil
}

// unicast reports whether a can be a tunnel endpoint: a global unicast
// address (private ranges included), not the IPv4 broadcast address.
func unicast(a netip.Addr) bool {
	return a.IsGlobalUnicast() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// prefixIndex finds an inserted prefix overlapping a given one with a few
// map lookups per distinct prefix length instead of a scan of every
// prefix. Inserted prefixes are also recorded under their supernets at the
// lengths given to newPrefixIndex, so only prefixes of those lengths (and
// single addresses) can be asked about.
type prefixIndex struct {
	probeLens [2][]int // per family (0: IPv4, 1: IPv6), sorted
	lens      [2][]int // lengths inserted
	exact     map[netip.Prefix]string
	covers    map[netip.Prefix]netip.Prefix // supernet at a probe length → an inserted prefix inside it
}

func newPrefixIndex(probeLens []int) *prefixIndex {
	x := &prefixIndex{exact: map[netip.Prefix]string{}, covers: map[netip.Prefix]netip.Prefix{}}
	for _, l := range probeLens {
		for f := range 2 { // the same length may be asked of either family
			x.probeLens[f] = addLen(x.probeLens[f], l)
		}
	}
	return x
}

func addLen(ls []int, l int) []int {
	if i, found := slices.BinarySearch(ls, l); !found {
		return slices.Insert(ls, i, l)
	}
	return ls
}

func family(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

// insert adds p (masked) with its owner; the first owner of a prefix stays.
func (x *prefixIndex) insert(p netip.Prefix, owner string) {
	p = p.Masked()
	if _, ok := x.exact[p]; ok {
		return
	}
	x.exact[p] = owner
	f := family(p.Addr())
	x.lens[f] = addLen(x.lens[f], p.Bits())
	for _, l := range x.probeLens[f] {
		if l >= p.Bits() {
			break
		}
		super := netip.PrefixFrom(p.Addr(), l).Masked()
		if _, ok := x.covers[super]; !ok {
			x.covers[super] = p
		}
	}
}

// within reports whether an inserted prefix contains p: strictly, or
// also when it is p itself (orEqual).
func (x *prefixIndex) within(p netip.Prefix, orEqual bool) bool {
	p = p.Masked()
	f := family(p.Addr())
	for _, l := range x.lens[f] {
		if l > p.Bits() || l == p.Bits() && !orEqual {
			break
		}
		if _, ok := x.exact[netip.PrefixFrom(p.Addr(), l).Masked()]; ok {
			return true
		}
	}
	return false
}

// overlap returns an inserted prefix overlapping p, and its owner.
func (x *prefixIndex) overlap(p netip.Prefix) (netip.Prefix, string, bool) {
	p = p.Masked()
	f := family(p.Addr())
	for _, l := range x.lens[f] { // an inserted prefix containing p
		if l > p.Bits() {
			break
		}
		q := netip.PrefixFrom(p.Addr(), l).Masked()
		if owner, ok := x.exact[q]; ok {
			return q, owner, true
		}
	}
	if q, ok := x.covers[p]; ok { // one inside p
		return q, x.exact[q], true
	}
	return netip.Prefix{}, "", false
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
