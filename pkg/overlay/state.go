// Package overlay manages the VXLAN overlay between nodes: the node's vxlan
// device and, for every other node, a route to its pod CIDRs, a permanent
// neighbour entry for its VTEP address and an FDB entry that tells the vxlan
// device where to send frames for that node's VTEP MAC.
//
// Addressing follows Flannel's scheme: a node's VTEP address is the first
// address of each of its pod CIDRs (10.244.1.0 for 10.244.1.0/24). It is
// assigned (/32, /128) to the local vxlan device, and peers route a remote
// pod CIDR "via <remote VTEP address> dev <vxlan> onlink". IPAM must not hand
// out a pod CIDR's first address.
package overlay

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"fmt"
	"net"
	"net/netip"
	"slices"
)

// RouteProtocol marks every route the agent installs (rtm_protocol), so a
// resync deletes stale sinabro routes and never touches anyone else's. 201 is
// not assigned in the kernel's rtnetlink.h nor in iproute2's rt_protos; it
// differs from the CNI plugin's pod routes (cni.RouteProtocol, 200), which
// the overlay's resync must leave alone.
const RouteProtocol = 201

// UnreachableMetric is the priority of the unreachable route covering the
// local pod CIDRs: a packet for a local pod IP that has no /32 route (pod gone,
// not yet created) is rejected with ICMP unreachable instead of following the
// default route out of the node and looping back. The high metric leaves room
// for anyone who wants a real route for the whole CIDR.
const UnreachableMetric = 4242

// Peer is another node reachable over the overlay.
type Peer struct {
	Name     string
	Underlay netip.Addr       // the remote vxlan device's local (underlay) address
	MAC      net.HardwareAddr // the remote vxlan device's MAC
	PodCIDRs []netip.Prefix
}

// Route is a route the agent owns, in the main table, protocol RouteProtocol.
type Route struct {
	Dst netip.Prefix
	// Gateway is the remote VTEP address, reached onlink through the vxlan
	// device. The zero Addr marks an unreachable route.
	Gateway netip.Addr
	Metric  uint32
}

// Unreachable reports whether r is a reject route rather than a peer route.
func (r Route) Unreachable() bool { return !r.Gateway.IsValid() }

func (r Route) String() string {
	if r.Unreachable() {
		return fmt.Sprintf("unreachable %s metric %d", r.Dst, r.Metric)
	}
	return fmt.Sprintf("%s via %s onlink metric %d", r.Dst, r.Gateway, r.Metric)
}

// Neighbour is a permanent neighbour entry on the vxlan device: a remote VTEP
// address and the remote vxlan device's MAC.
type Neighbour struct {
	IP  netip.Addr
	MAC string // canonical net.HardwareAddr.String() form, comparable
}

// FDBEntry is a permanent forwarding entry on the vxlan device: frames for MAC
// are encapsulated and sent to Dst.
type FDBEntry struct {
	MAC string
	Dst netip.Addr
}

// State is the kernel state the agent owns beyond the vxlan device itself.
type State struct {
	Addresses  []netip.Prefix // local VTEP addresses on the vxlan device (/32, /128)
	Routes     []Route
	Neighbours []Neighbour
	FDB        []FDBEntry
}

// VTEPAddr is a node's VTEP address for one of its pod CIDRs: its first address.
func VTEPAddr(podCIDR netip.Prefix) netip.Addr { return podCIDR.Masked().Addr() }

// Desired computes the state for a node with the given local pod CIDRs and
// peers. Peers are expected to be validated already (see the agent); a peer
// without pod CIDRs still gets its FDB entry so it is reachable as soon as it
// has them.
func Desired(local []netip.Prefix, peers []Peer) State {
	var s State
	for _, p := range local {
		a := VTEPAddr(p)
		s.Addresses = append(s.Addresses, netip.PrefixFrom(a, a.BitLen()))
		s.Routes = append(s.Routes, Route{Dst: p.Masked(), Metric: UnreachableMetric})
	}
	for _, peer := range peers {
		mac := peer.MAC.String()
		s.FDB = append(s.FDB, FDBEntry{MAC: mac, Dst: peer.Underlay})
		for _, p := range peer.PodCIDRs {
			gw := VTEPAddr(p)
			s.Routes = append(s.Routes, Route{Dst: p.Masked(), Gateway: gw, Metric: defaultMetric(gw)})
			s.Neighbours = append(s.Neighbours, Neighbour{IP: gw, MAC: mac})
		}
	}
	s.sort()
	return s
}

// defaultMetric is the metric the kernel gives a route added without one:
// IPv6 turns 0 into 1024, and the desired state must say what will be read back.
func defaultMetric(a netip.Addr) uint32 {
	if a.Is6() {
		return 1024
	}
	return 0
}

func (s *State) sort() {
	slices.SortFunc(s.Addresses, comparePrefix)
	slices.SortFunc(s.Routes, func(a, b Route) int { return comparePrefix(a.Dst, b.Dst) })
	slices.SortFunc(s.Neighbours, func(a, b Neighbour) int { return a.IP.Compare(b.IP) })
	slices.SortFunc(s.FDB, func(a, b FDBEntry) int { return cmp.Compare(a.MAC, b.MAC) })
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

// Plan is what turns an actual State into a desired one. Upserts are applied
// with replace semantics, deletions remove stale entries.
type Plan struct {
	AddAddresses, DelAddresses      []netip.Prefix
	UpsertRoutes, DelRoutes         []Route
	UpsertNeighbours, DelNeighbours []Neighbour
	UpsertFDB, DelFDB               []FDBEntry
}

// Empty reports whether the plan changes nothing.
func (p Plan) Empty() bool {
	return len(p.AddAddresses)+len(p.DelAddresses)+len(p.UpsertRoutes)+len(p.DelRoutes)+
		len(p.UpsertNeighbours)+len(p.DelNeighbours)+len(p.UpsertFDB)+len(p.DelFDB) == 0
}

// Diff plans the changes from actual to desired. Entries are keyed the way the
// kernel keys them (address, route destination and metric, neighbour IP, FDB
// MAC); an entry whose key exists with other content is replaced.
func Diff(desired, actual State) Plan {
	var p Plan
	p.AddAddresses, p.DelAddresses = diffSets(desired.Addresses, actual.Addresses,
		func(a netip.Prefix) netip.Prefix { return a })
	type routeKey struct {
		dst    netip.Prefix
		metric uint32
	}
	p.UpsertRoutes, p.DelRoutes = diffSets(desired.Routes, actual.Routes,
		func(r Route) routeKey { return routeKey{r.Dst, r.Metric} })
	p.UpsertNeighbours, p.DelNeighbours = diffSets(desired.Neighbours, actual.Neighbours,
		func(n Neighbour) netip.Addr { return n.IP })
	p.UpsertFDB, p.DelFDB = diffSets(desired.FDB, actual.FDB,
		func(f FDBEntry) string { return f.MAC })
	return p
}

// diffSets returns the desired entries missing from actual or differing from
// it, and the actual entries whose key is not desired at all (an entry whose
// key is desired is fixed by the upsert, not deleted).
func diffSets[T comparable, K comparable](desired, actual []T, key func(T) K) (upsert, del []T) {
	have := make(map[K]T, len(actual))
	for _, a := range actual {
		have[key(a)] = a
	}
	want := make(map[K]bool, len(desired))
	for _, d := range desired {
		want[key(d)] = true
		if a, ok := have[key(d)]; !ok || a != d {
			upsert = append(upsert, d)
		}
	}
	for _, a := range actual {
		if !want[key(a)] {
			del = append(del, a)
		}
	}
	return upsert, del
}

// StableMAC derives a locally administered unicast MAC from a node name, so
// the vxlan device keeps its MAC when it is recreated or the agent restarts
// and peers' FDB and neighbour entries stay valid.
func StableMAC(nodeName string) net.HardwareAddr {
	sum := sha256.Sum256([]byte("sinabro-vtep/" + nodeName))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^0x01 | 0x02 // unicast, locally administered
	return mac
}

// equalMAC compares hardware addresses byte-wise.
func equalMAC(a, b net.HardwareAddr) bool { return bytes.Equal(a, b) }
