package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
)

// Flags of sb_masq_cidrs values; see bpf/masq.c.
const (
	cidrPod    uint32 = 0x1 // pod addresses: sources to masquerade
	cidrNoMasq uint32 = 0x2 // destinations never masqueraded
)

// cidrEntries returns the LPM entries for the given prefixes. An LPM lookup
// returns only the longest match, so each prefix carries the union of the
// flags of every configured prefix that contains it.
func cidrEntries(cluster, nonMasq []netip.Prefix) map[netip.Prefix]uint32 {
	type flagged struct {
		p netip.Prefix
		f uint32
	}
	var all []flagged
	for _, p := range cluster {
		all = append(all, flagged{p.Masked(), cidrPod | cidrNoMasq})
	}
	for _, p := range nonMasq {
		all = append(all, flagged{p.Masked(), cidrNoMasq})
	}
	out := make(map[netip.Prefix]uint32, len(all))
	for _, a := range all {
		f := out[a.p]
		for _, b := range all {
			if b.p.Bits() <= a.p.Bits() && b.p.Contains(a.p.Addr()) {
				f |= b.f
			}
		}
		out[a.p] = f
	}
	return out
}

// SetCIDRs replaces the pod and non-masquerade prefixes, converging the
// pinned LPM map: entries are written before stale ones are deleted, so a
// prefix present before and after never disappears.
func (d *Datapath) SetCIDRs(cluster, nonMasq []netip.Prefix) error {
	if err := syncCIDRs(d.objs.SbMasqCidrs, cidrEntries(cluster, nonMasq)); err != nil {
		return err
	}
	d.cfg.ClusterCIDRs = slices.Clone(cluster)
	d.cfg.NonMasqCIDRs = slices.Clone(nonMasq)
	return nil
}

func syncCIDRs(m *ebpf.Map, want map[netip.Prefix]uint32) error {
	for p, f := range want {
		if !p.Addr().Is4() {
			return fmt.Errorf("prefix %v is not IPv4", p)
		}
		if err := m.Put(lpmKey(p), f); err != nil {
			return fmt.Errorf("put %v in masquerade CIDRs: %w", p, err)
		}
	}
	var (
		k     datapathLpmV4Key
		v     uint32
		stale []datapathLpmV4Key
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if _, ok := want[prefixFromKey(k)]; !ok {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list masquerade CIDRs: %w", err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete %v from masquerade CIDRs: %w", prefixFromKey(k), err)
		}
	}
	return nil
}

func lpmKey(p netip.Prefix) datapathLpmV4Key {
	return datapathLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: be32(p.Addr())}
}

func prefixFromKey(k datapathLpmV4Key) netip.Prefix {
	return netip.PrefixFrom(addrFromBE32(k.Addr), int(k.Prefixlen))
}
