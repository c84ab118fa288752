package overlay

import (
	"crypto/sha256"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// HostPrefixes lists the addresses of the namespace's interfaces with their
// prefix lengths (the subnets the node is attached to), except those of
// interface skip (the vxlan device, whose VTEP addresses the overlay owns).
func (m *Manager) HostPrefixes(skip uint32) ([]netip.Prefix, error) {
	msgs, err := m.rt.Address.List()
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range msgs {
		if a.Index == skip || a.Attributes == nil {
			continue
		}
		ip := a.Attributes.Local
		if ip == nil {
			ip = a.Attributes.Address
		}
		if addr, ok := netip.AddrFromSlice(ip); ok {
			out = append(out, netip.PrefixFrom(addr.Unmap(), int(a.PrefixLength)))
		}
	}
	return out, nil
}

// hopCache remembers NextHop answers while the underlay's routing stays
// the same, so a resync with thousands of peers asks the kernel nothing
// per peer.
type hopCache struct {
	oif     uint32
	routing [sha256.Size]byte // of the routes through oif and the policy rules
	hops    map[netip.Addr]hopAnswer
	queries int // NextHop calls made, for tests
}

type hopAnswer struct {
	hop netip.Addr
	err error
}

// NextHops returns NextHop(dst, oif) for every dst in dsts, with the error
// of each one that has none. Answers are reused until the routes through
// oif (any table) or the IPv4 policy rules change: a pass with nothing new
// costs two netlink dumps, not one request per destination.
func (m *Manager) NextHops(dsts []netip.Addr, oif uint32) (map[netip.Addr]netip.Addr, map[netip.Addr]error, error) {
	sum, err := m.routingSum(oif)
	if err != nil {
		return nil, nil, err
	}
	c := &m.hops
	if c.hops == nil || c.oif != oif || c.routing != sum {
		*c = hopCache{oif: oif, routing: sum, hops: map[netip.Addr]hopAnswer{}, queries: c.queries}
	}
	hops := make(map[netip.Addr]netip.Addr, len(dsts))
	errs := map[netip.Addr]error{}
	seen := make(map[netip.Addr]bool, len(dsts))
	for _, dst := range dsts {
		seen[dst] = true
		ans, ok := c.hops[dst]
		if !ok {
			c.queries++
			ans.hop, ans.err = m.NextHop(dst, oif)
			c.hops[dst] = ans
		}
		if ans.err != nil {
			errs[dst] = ans.err
		} else {
			hops[dst] = ans.hop
		}
	}
	for dst := range c.hops {
		if !seen[dst] {
			delete(c.hops, dst)
		}
	}
	return hops, errs, nil
}

// routingSum hashes what NextHop's answers depend on: the IPv4 routes
// leaving through oif, in every table, and the IPv4 policy rules.
func (m *Manager) routingSum(oif uint32) ([sha256.Size]byte, error) {
	h := sha256.New()
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(unix.RTA_OIF, oif) // dump filter (strict mode)
	attrs, err := ae.Encode()
	if err != nil {
		return [sha256.Size]byte{}, err
	}
	rtmsg := make([]byte, unix.SizeofRtMsg)
	rtmsg[0] = unix.AF_INET
	routes, err := m.nl.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETROUTE, Flags: netlink.Request | netlink.Dump},
		Data:   append(rtmsg, attrs...),
	})
	if err != nil {
		return [sha256.Size]byte{}, fmt.Errorf("list routes through interface %d: %w", oif, err)
	}
	rule := make([]byte, 12) // struct fib_rule_hdr
	rule[0] = unix.AF_INET
	rules, err := m.nl.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETRULE, Flags: netlink.Request | netlink.Dump},
		Data:   rule,
	})
	if err != nil {
		return [sha256.Size]byte{}, fmt.Errorf("list routing rules: %w", err)
	}
	for _, msg := range append(routes, rules...) {
		h.Write(msg.Data)
		h.Write([]byte{0xff}) // separator
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum, nil
}
