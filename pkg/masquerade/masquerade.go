// Package masquerade source-NATs pod traffic that leaves the cluster to the
// node's address, so hosts outside the cluster see (and answer) the node.
//
// A backend implements Ensure(ctx, Config) and Remove(ctx). The nftables
// backend (NFTables) is the interim implementation until the eBPF datapath
// brings its own; both take the same Config so they can be compared.
package masquerade

import (
	"cmp"
	"net/netip"
	"slices"
)

// Config says which traffic is masqueraded: packets from this node's pods
// (source in PodCIDRs) to anything that is neither in ExcludeCIDRs nor one
// of NodeIPs.
type Config struct {
	PodCIDRs     []netip.Prefix // this node's pod CIDRs
	ExcludeCIDRs []netip.Prefix // cluster CIDRs and every node's pod CIDRs
	NodeIPs      []netip.Addr   // every node's addresses: pods reach nodes unNATed
}

// Range is an inclusive address range [From, To] of one family.
type Range struct{ From, To netip.Addr }

// Ranges turns prefixes into sorted, disjoint, non-adjacent ranges per
// family: nftables interval sets reject overlapping elements, and a cluster
// CIDR usually contains every node's pod CIDR.
func Ranges(prefixes []netip.Prefix) []Range {
	var rs []Range
	for _, p := range prefixes {
		if !p.IsValid() {
			continue
		}
		p = p.Masked()
		rs = append(rs, Range{From: p.Addr(), To: lastAddr(p)})
	}
	slices.SortFunc(rs, func(a, b Range) int {
		if a.From.Is4() != b.From.Is4() {
			if a.From.Is4() {
				return -1
			}
			return 1
		}
		return cmp.Or(a.From.Compare(b.From), a.To.Compare(b.To))
	})
	var out []Range
	for _, r := range rs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			if last.To.Is4() == r.From.Is4() && (r.From.Compare(last.To) <= 0 || last.To.Next() == r.From) {
				if r.To.Compare(last.To) > 0 {
					last.To = r.To
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// lastAddr is the last address of a (masked) prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 1 << (7 - i%8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
