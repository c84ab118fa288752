package masquerade

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TableName is the nftables table (family inet) the agent owns entirely.
const TableName = "sinabro"

// NFTables is the nftables masquerade backend: one inet table, TableName,
// replaced atomically whenever it has to change.
type NFTables struct {
	nsFD    int     // network namespace to program; 0 is the caller's
	applied *Config // last config written, to skip rewriting an unchanged table
	rules   int     // rules that config produced
}

// NewNFTables returns a backend programming the network namespace referred
// to by nsFD, or the caller's when nsFD is 0.
func NewNFTables(nsFD int) *NFTables { return &NFTables{nsFD: nsFD} }

// Name identifies the backend in logs and metrics.
func (*NFTables) Name() string { return "nftables" }

func (n *NFTables) conn() (*nftables.Conn, error) {
	var opts []nftables.ConnOption
	if n.nsFD != 0 {
		opts = append(opts, nftables.WithNetNSFd(n.nsFD))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	return c, nil
}

// Ensure replaces the table with one built from cfg in a single transaction:
// add (a no-op when it exists), delete, add again with its content. Packets
// never see a half-built table. When cfg is what was applied last and the
// table still has its chain and rules, nothing is written (the rule counters
// keep counting); a deleted table, chain or rule is rebuilt, but edited set
// elements are only reset by the next change.
func (n *NFTables) Ensure(_ context.Context, cfg Config) error {
	c, err := n.conn()
	if err != nil {
		return err
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	if n.applied != nil && reflect.DeepEqual(*n.applied, cfg) && n.intact(c, t) {
		return nil
	}
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	chain := c.AddChain(&nftables.Chain{
		Name:     "postrouting",
		Table:    t,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	})
	rules := 0
	for _, fam := range []family{ipv4, ipv6} {
		added, err := fam.addRule(c, t, chain, cfg)
		if err != nil {
			return err
		}
		if added {
			rules++
		}
	}
	n.applied = nil
	if err := c.Flush(); err != nil {
		return fmt.Errorf("replace nftables table inet %s: %w", TableName, err)
	}
	applied := cfg
	n.applied, n.rules = &applied, rules
	return nil
}

// intact reports whether the table still has the chain and rules last written.
func (n *NFTables) intact(c *nftables.Conn, t *nftables.Table) bool {
	chain, err := c.ListChain(t, "postrouting")
	if err != nil {
		return false
	}
	rules, err := c.GetRules(t, chain)
	return err == nil && len(rules) == n.rules
}

// Remove deletes the table; a missing table is not an error.
func (n *NFTables) Remove(_ context.Context) error {
	c, err := n.conn()
	if err != nil {
		return err
	}
	n.applied = nil
	c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: TableName})
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete nftables table inet %s: %w", TableName, err)
	}
	return nil
}

type family struct {
	name      string // set name suffix
	nfproto   byte
	keyType   nftables.SetDatatype
	is        func(netip.Addr) bool
	saddr     uint32 // offsets in the network header
	daddr     uint32
	addrBytes uint32
}

var (
	ipv4 = family{"4", unix.NFPROTO_IPV4, nftables.TypeIPAddr, netip.Addr.Is4, 12, 16, 4}
	ipv6 = family{"6", unix.NFPROTO_IPV6, nftables.TypeIP6Addr, netip.Addr.Is6, 8, 24, 16}
)

// addRule adds, for one family, the sets and the rule
//
//	meta nfproto F  F saddr @pods  F daddr != @exclude  F daddr != @nodes  counter masquerade
//
// when this node has a pod CIDR of that family.
func (f family) addRule(c *nftables.Conn, t *nftables.Table, chain *nftables.Chain, cfg Config) (bool, error) {
	pods := f.intervals(cfg.PodCIDRs)
	if len(pods) == 0 {
		return false, nil
	}
	podSet := &nftables.Set{Table: t, Name: "pods" + f.name, KeyType: f.keyType, Interval: true}
	excludeSet := &nftables.Set{Table: t, Name: "exclude" + f.name, KeyType: f.keyType, Interval: true}
	nodeSet := &nftables.Set{Table: t, Name: "nodes" + f.name, KeyType: f.keyType}
	var nodes []nftables.SetElement
	seen := map[netip.Addr]bool{}
	for _, a := range cfg.NodeIPs {
		if a = a.Unmap(); f.is(a) && !seen[a] {
			seen[a] = true
			nodes = append(nodes, nftables.SetElement{Key: a.AsSlice()})
		}
	}
	for _, s := range []struct {
		set   *nftables.Set
		elems []nftables.SetElement
	}{{podSet, pods}, {excludeSet, f.intervals(cfg.ExcludeCIDRs)}, {nodeSet, nodes}} {
		if err := c.AddSet(s.set, s.elems); err != nil {
			return false, fmt.Errorf("add nftables set %s: %w", s.set.Name, err)
		}
	}
	lookup := func(set *nftables.Set, offset uint32, invert bool) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: f.addrBytes},
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, Invert: invert},
		}
	}
	exprs := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.nfproto}},
	}
	exprs = append(exprs, lookup(podSet, f.saddr, false)...)
	exprs = append(exprs, lookup(excludeSet, f.daddr, true)...)
	exprs = append(exprs, lookup(nodeSet, f.daddr, true)...)
	exprs = append(exprs, &expr.Counter{}, &expr.Masq{})
	c.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: exprs})
	return true, nil
}

// intervals encodes the prefixes of this family as interval set elements:
// the first address, then the address after the last marked as interval end
// (left out when the range runs to the end of the address space).
func (f family) intervals(prefixes []netip.Prefix) []nftables.SetElement {
	var out []nftables.SetElement
	for _, r := range Ranges(prefixes) {
		if !f.is(r.From) {
			continue
		}
		out = append(out, nftables.SetElement{Key: r.From.AsSlice()})
		if end := r.To.Next(); end.IsValid() {
			out = append(out, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return out
}
