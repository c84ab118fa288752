package datapath

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
)

// Remote is a pod prefix of another node: host routing hands packets for it
// straight to the vxlan device with these MACs, as the stack's route and
// neighbour entry would (see bpf/lib/host.h).
type Remote struct {
	Prefix netip.Prefix
	// Ifindex is the vxlan device's index in the node's network namespace.
	Ifindex int
	// PeerMAC is the destination: the other node's vxlan device MAC, which
	// the local vxlan device's FDB maps to that node's underlay address.
	PeerMAC net.HardwareAddr
	// LocalMAC is the source: the local vxlan device's MAC.
	LocalMAC net.HardwareAddr
	// VTEP is the other node's underlay address. With it (and a VXLAN
	// port configured) packets are encapsulated in eBPF and sent straight
	// out of the uplink; without it everything goes through the vxlan
	// device.
	VTEP netip.Addr
	// NextHop is the underlay's next hop towards VTEP (VTEP itself when on
	// link), from the node's routing table: the encapsulated packet is
	// handed to its neighbour entry directly. Unset, every packet takes a
	// route lookup.
	NextHop netip.Addr
}

func (r Remote) value() (datapathRemoteCidr, error) {
	var v datapathRemoteCidr
	if !r.Prefix.IsValid() || !r.Prefix.Addr().Is4() || r.Ifindex <= 0 || len(r.PeerMAC) != 6 || len(r.LocalMAC) != 6 {
		return v, fmt.Errorf("invalid remote prefix %v (ifindex %d, peer MAC %v, local MAC %v): want IPv4, an ifindex and two MACs",
			r.Prefix, r.Ifindex, r.PeerMAC, r.LocalMAC)
	}
	if r.VTEP.IsValid() && !r.VTEP.Is4() || r.NextHop.IsValid() && (!r.NextHop.Is4() || !r.VTEP.IsValid()) {
		return v, fmt.Errorf("remote prefix %v: VTEP %v, next hop %v: want IPv4, and a next hop only with a VTEP", r.Prefix, r.VTEP, r.NextHop)
	}
	v.Ifindex = uint32(r.Ifindex)
	if r.VTEP.IsValid() {
		v.VtepIp = be32(r.VTEP)
	}
	if r.NextHop.IsValid() {
		v.Nexthop = be32(r.NextHop)
	}
	copy(v.DstMac[:], r.PeerMAC)
	copy(v.SrcMac[:], r.LocalMAC)
	return v, nil
}

// SetRemotes converges the remote pod prefixes with want: changed and new
// prefixes are written before stale ones are deleted, so a prefix present
// before and after never disappears. An empty want leaves every remote
// pod to the stack.
func (d *Datapath) SetRemotes(want []Remote) error {
	byPrefix := make(map[netip.Prefix]datapathRemoteCidr, len(want))
	for _, r := range want {
		v, err := r.value()
		if err != nil {
			return err
		}
		byPrefix[r.Prefix.Masked()] = v
	}
	m := d.objs.SbRemoteCidrs
	if n := len(byPrefix); uint32(n) > m.MaxEntries() {
		return fmt.Errorf("%d remote pod prefixes do not fit in a map of %d", n, m.MaxEntries())
	}
	have, err := remoteEntries(m)
	if err != nil {
		return err
	}
	var errs []error
	for p, v := range byPrefix {
		if cur, ok := have[p]; ok && cur == v {
			continue
		}
		if err := m.Put(lpmKey(p), v); err != nil {
			errs = append(errs, fmt.Errorf("put %v in remote CIDRs: %w", p, err))
		}
	}
	for p := range have {
		if _, ok := byPrefix[p]; ok {
			continue
		}
		if err := m.Delete(lpmKey(p)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete %v from remote CIDRs: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// MarshalJSON writes MACs as text rather than base64 bytes.
func (r Remote) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Prefix   netip.Prefix `json:"prefix"`
		Ifindex  int          `json:"ifindex"`
		PeerMAC  string       `json:"peerMAC"`
		LocalMAC string       `json:"localMAC"`
		VTEP     string       `json:"vtep,omitempty"`
		NextHop  string       `json:"nextHop,omitempty"`
	}{r.Prefix, r.Ifindex, r.PeerMAC.String(), r.LocalMAC.String(), addrString(r.VTEP), addrString(r.NextHop)})
}

// Remotes lists the remote pod prefixes, sorted.
func (d *Datapath) Remotes() ([]Remote, error) { return Remotes(d.objs.SbRemoteCidrs) }

// Remotes lists a remote pod prefix map (sb_remote_cidrs), sorted.
func Remotes(m *ebpf.Map) ([]Remote, error) {
	have, err := remoteEntries(m)
	if err != nil {
		return nil, err
	}
	out := make([]Remote, 0, len(have))
	for p, v := range have {
		r := Remote{
			Prefix:   p,
			Ifindex:  int(v.Ifindex),
			PeerMAC:  net.HardwareAddr(slices.Clone(v.DstMac[:])),
			LocalMAC: net.HardwareAddr(slices.Clone(v.SrcMac[:])),
		}
		if v.VtepIp != 0 {
			r.VTEP = addrFromBE32(v.VtepIp)
		}
		if v.Nexthop != 0 {
			r.NextHop = addrFromBE32(v.Nexthop)
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b Remote) int {
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c
		}
		return a.Prefix.Bits() - b.Prefix.Bits()
	})
	return out, nil
}

func remoteEntries(m *ebpf.Map) (map[netip.Prefix]datapathRemoteCidr, error) {
	var (
		k   datapathLpmV4Key
		v   datapathRemoteCidr
		out = map[netip.Prefix]datapathRemoteCidr{}
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[prefixFromKey(k)] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list remote CIDRs: %w", err)
	}
	return out, nil
}

// addrString is a's text, or "" for the zero Addr.
func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// SetVTEPPeers converges the peer nodes' underlay addresses whose VXLAN
// packets the uplink accepts (sb_vtep_peers); VXLAN for our port and VNI
// from any other source is dropped and counted (drop_vxlan_unknown_peer).
func (d *Datapath) SetVTEPPeers(want []netip.Addr) error {
	m := d.objs.SbVtepPeers
	var (
		k, v uint32
		have = map[uint32]bool{}
		errs []error
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		have[k] = true
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list VTEP peers: %w", err)
	}
	keep := make(map[uint32]bool, len(want))
	for _, a := range want {
		if !a.Is4() {
			continue // IPv6 underlays are the vxlan device's
		}
		k := be32(a)
		keep[k] = true
		if have[k] {
			continue // written once, never changes
		}
		if err := m.Put(k, uint32(1)); err != nil {
			errs = append(errs, fmt.Errorf("put %v in VTEP peers: %w", a, err))
		}
	}
	for k := range have {
		if keep[k] {
			continue
		}
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete %v from VTEP peers: %w", addrFromBE32(k), err))
		}
	}
	return errors.Join(errs...)
}

// VTEPPeers lists the accepted peer underlay addresses, sorted.
func (d *Datapath) VTEPPeers() ([]netip.Addr, error) {
	var k, v uint32
	var out []netip.Addr
	it := d.objs.SbVtepPeers.Iterate()
	for it.Next(&k, &v) {
		out = append(out, addrFromBE32(k))
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, it.Err()
}
