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

// PrefixMapSize is the capacity of the prefix maps, sb_masq_cidrs and
// sb_remote_cidrs (set at load time over the C sources' value). The agent
// writes about one sb_masq_cidrs entry per node address and one
// sb_remote_cidrs entry per peer pod CIDR, so this covers clusters well
// beyond Kubernetes' 5,000 nodes; LPM tries are never preallocated, so
// unused capacity costs no memory.
const PrefixMapSize = 1 << 16

// sizePrefixMaps raises the prefix maps' capacity to PrefixMapSize. A
// pinned map of another size is rebuilt on load (both are rebuildable).
func sizePrefixMaps(spec *ebpf.CollectionSpec) {
	for _, name := range []string{"sb_masq_cidrs", "sb_remote_cidrs"} {
		if m := spec.Maps[name]; m != nil && m.MaxEntries < PrefixMapSize {
			m.MaxEntries = PrefixMapSize
		}
	}
}

// cidrEntries returns the LPM entries for the given prefixes. An LPM lookup
// returns only the longest match, so each prefix carries the union of the
// flags of every configured prefix that contains it. It looks containers up
// by length (at most 33 lookups per prefix), so thousands of node addresses
// cost thousands of steps, not millions.
func cidrEntries(cluster, nonMasq []netip.Prefix) map[netip.Prefix]uint32 {
	own := make(map[netip.Prefix]uint32, len(cluster)+len(nonMasq))
	for _, p := range cluster {
		own[p.Masked()] |= cidrPod | cidrNoMasq
	}
	for _, p := range nonMasq {
		own[p.Masked()] |= cidrNoMasq
	}
	var lens []int
	for p := range own {
		if i, found := slices.BinarySearch(lens, p.Bits()); !found {
			lens = slices.Insert(lens, i, p.Bits())
		}
	}
	out := make(map[netip.Prefix]uint32, len(own))
	for p, f := range own {
		for _, l := range lens {
			if l >= p.Bits() {
				break
			}
			f |= own[netip.PrefixFrom(p.Addr(), l).Masked()]
		}
		out[p] = f
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

// syncCIDRs converges m with want, writing only the entries that differ.
func syncCIDRs(m *ebpf.Map, want map[netip.Prefix]uint32) error {
	if n := len(want); uint32(n) > m.MaxEntries() {
		return fmt.Errorf("%d masquerade prefixes do not fit in a map of %d", n, m.MaxEntries())
	}
	var (
		k    datapathLpmV4Key
		v    uint32
		have = map[netip.Prefix]uint32{}
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		have[prefixFromKey(k)] = v
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list masquerade CIDRs: %w", err)
	}
	for p, f := range want {
		if !p.Addr().Is4() {
			return fmt.Errorf("prefix %v is not IPv4", p)
		}
		if cur, ok := have[p]; ok && cur == f {
			continue
		}
		if err := m.Put(lpmKey(p), f); err != nil {
			return fmt.Errorf("put %v in masquerade CIDRs: %w", p, err)
		}
	}
	for p := range have {
		if _, ok := want[p]; ok {
			continue
		}
		if err := m.Delete(lpmKey(p)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete %v from masquerade CIDRs: %w", p, err)
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
