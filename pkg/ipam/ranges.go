package ipam

import (
	"math"
	"net/netip"
)

// Reserved addresses of a pod range: the network address, the first host
// address (kept for the node itself, e.g. the overlay's VTEP/gateway address)
// and, for IPv4, the broadcast address.

// Gateway returns the address of r reserved for the node.
func Gateway(r netip.Prefix) netip.Addr { return r.Masked().Addr().Next() }

func firstUsable(r netip.Prefix) netip.Addr { return Gateway(r).Next() }

func lastUsable(r netip.Prefix) netip.Addr {
	last := broadcast(r)
	if r.Addr().Is4() {
		last = last.Prev()
	}
	return last
}

// broadcast is the highest address of r.
func broadcast(r netip.Prefix) netip.Addr {
	b := r.Masked().Addr().AsSlice()
	bits := r.Bits()
	for i := range b {
		for bit := 0; bit < 8; bit++ {
			if i*8+bit >= bits {
				b[i] |= 0x80 >> bit
			}
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// usable counts the addresses pods can get from r, capped to keep scans bounded.
func usable(r netip.Prefix) uint64 {
	hostBits := r.Addr().BitLen() - r.Bits()
	if hostBits >= 24 {
		return 1 << 24 // plenty for one node; bounds the scan of huge IPv6 ranges
	}
	n := uint64(1) << hostBits
	reserved := uint64(2) // network + node gateway
	if r.Addr().Is4() {
		reserved++ // broadcast
	}
	if n <= reserved {
		return 0
	}
	return min(n-reserved, math.MaxUint32)
}
