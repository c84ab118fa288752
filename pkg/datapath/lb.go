package datapath

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"time"

	"github.com/cilium/ebpf"
)

// Service load balancing for traffic from outside the node (bpf/lib/lb.h):
// the agent's service controller writes one Maglev table per frontend
// reachable from outside (NodePort on the node address, external IPs,
// load-balancer IPs) into the pinned sb_lb_services of the loaded datapath.

// MaglevSize is a frontend's table size (LB_MAGLEV_M in bpf/lib/lb.h).
const MaglevSize = 1021

// LBFrontend is a Service address as seen from outside: Addr and Port,
// or, with NodePort, Port on the node address.
type LBFrontend struct {
	Addr     netip.Addr
	Port     uint16
	Proto    uint8 // IPPROTO_TCP or IPPROTO_UDP
	NodePort bool
}

func (f LBFrontend) String() string {
	proto := map[uint8]string{6: "TCP", 17: "UDP"}[f.Proto]
	if f.NodePort {
		return fmt.Sprintf("node:%d/%s", f.Port, proto)
	}
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.Addr, f.Port), proto)
}

// LBTable is the pinned frontend map of a loaded datapath, with its count
// (sb_lb_active: the programs skip the table while it is zero) and its
// flow table (sb_lb_ct).
type LBTable struct{ m, active, ct *ebpf.Map }

// OpenLBTable opens the frontend map pinned under root; an error wrapping
// os.ErrNotExist means the datapath is not loaded (yet).
func OpenLBTable(root string) (*LBTable, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(root, "maps", "sb_lb_services"), nil)
	if err != nil {
		return nil, err
	}
	active, err := ebpf.LoadPinnedMap(filepath.Join(root, "maps", "sb_lb_active"), nil)
	if err != nil {
		m.Close()
		return nil, err
	}
	ct, err := ebpf.LoadPinnedMap(filepath.Join(root, "maps", "sb_lb_ct"), nil)
	if err != nil {
		m.Close()
		active.Close()
		return nil, err
	}
	return &LBTable{m: m, active: active, ct: ct}, nil
}

func (t *LBTable) Close() error { return errors.Join(t.m.Close(), t.active.Close(), t.ct.Close()) }

// SetActive records how many frontends the table holds; call it after
// each change (the programs look the table up only while it is not zero).
func (t *LBTable) SetActive(n int) error {
	if err := t.active.Put(uint32(0), uint32(n)); err != nil {
		return fmt.Errorf("write the Service frontend count: %w", err)
	}
	return nil
}

func lbKey(f LBFrontend) datapathLbKey {
	k := datapathLbKey{Port: be16(f.Port), Proto: f.Proto}
	if f.NodePort {
		k.Scope = 1
	} else {
		k.Addr = be32(f.Addr)
	}
	return k
}

func lbFrontend(k datapathLbKey) LBFrontend {
	f := LBFrontend{Port: portFromBE16(k.Port), Proto: k.Proto, NodePort: k.Scope == 1}
	if !f.NodePort {
		f.Addr = addrFromBE32(k.Addr)
	}
	return f
}

// LBEntry is what a frontend reachable from outside does.
type LBEntry struct {
	Backends []netip.AddrPort
	// Affinity (sessionAffinity ClientIP) sends every flow of a client
	// address to one backend while the backends do not change.
	Affinity bool
}

// Equal reports whether e and o program the same table.
func (e LBEntry) Equal(o LBEntry) bool {
	return e.Affinity == o.Affinity && slices.Equal(e.Backends, o.Backends)
}

// lbAffinity is LB_F_AFFINITY in bpf/lib/lb.h.
const lbAffinity = 1

// Put writes a frontend's Maglev table over e's backends in one update
// (packets see the old table or the new one); without a backend, packets
// are answered with ICMP port unreachable.
func (t *LBTable) Put(f LBFrontend, e LBEntry) error {
	backends := e.Backends
	var v datapathLbService
	v.Count = uint32(len(backends))
	if e.Affinity {
		v.Flags = lbAffinity
	}
	for slot, i := range Maglev(backends, MaglevSize) {
		v.Slots[slot] = datapathLbBackend{Addr: be32(backends[i].Addr()), Port: be16(backends[i].Port())}
	}
	if err := t.m.Put(lbKey(f), &v); err != nil {
		return fmt.Errorf("write Service frontend %s: %w", f, err)
	}
	return nil
}

// Delete removes a frontend; absent is not an error.
func (t *LBTable) Delete(f LBFrontend) error {
	if err := t.m.Delete(lbKey(f)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete Service frontend %s: %w", f, err)
	}
	return nil
}

// LBRow is one frontend reachable from outside as the datapath holds it.
type LBRow struct {
	Frontend string   `json:"frontend"`
	Affinity bool     `json:"affinity,omitempty"` // ClientIP: one backend per client address
	Backends []string `json:"backends"`           // distinct, in order of first slot
	Slots    []int    `json:"slots"`              // Maglev slots per backend
}

// ListLB reads the frontend table pinned under root.
func ListLB(root string) ([]LBRow, error) {
	t, err := OpenLBTable(root)
	if err != nil {
		return nil, err
	}
	defer t.Close()
	var out []LBRow
	var k datapathLbKey
	var v datapathLbService
	it := t.m.Iterate()
	for it.Next(&k, &v) {
		r := LBRow{Frontend: lbFrontend(k).String(), Affinity: v.Flags&lbAffinity != 0, Backends: []string{}}
		idx := map[string]int{}
		for slot := 0; v.Count > 0 && slot < MaglevSize; slot++ {
			b := v.Slots[slot]
			name := netip.AddrPortFrom(addrFromBE32(b.Addr), portFromBE16(b.Port)).String()
			i, ok := idx[name]
			if !ok {
				i = len(r.Backends)
				idx[name] = i
				r.Backends = append(r.Backends, name)
				r.Slots = append(r.Slots, 0)
			}
			r.Slots[i]++
		}
		out = append(out, r)
	}
	return out, it.Err()
}

// Frontends lists the frontends in the map.
func (t *LBTable) Frontends() ([]LBFrontend, error) {
	var out []LBFrontend
	var k datapathLbKey
	it := t.m.Iterate()
	var v datapathLbService
	for it.Next(&k, &v) {
		out = append(out, lbFrontend(k))
	}
	return out, it.Err()
}

// Flow directions in sb_lb_ct (LB_FWD, LB_REV in bpf/lib/lb.h).
const (
	lbFwd = 0
	lbRev = 1
)

// ForgetUDPFlows deletes the UDP flows whose backend no longer serves
// their frontend in current (the frontends and backends just written), so
// the next datagram of such a flow picks a live backend instead of going
// on to a removed one. TCP flows stay, as kube-proxy leaves them: a
// terminating backend may still finish its connections. It returns how
// many flows it deleted.
func (t *LBTable) ForgetUDPFlows(current map[LBFrontend]LBEntry) (int, error) {
	type flow struct{ fwd, rev datapathLbCtKey }
	var stale []flow
	var k datapathLbCtKey
	var v datapathLbCt
	it := t.ct.Iterate()
	for it.Next(&k, &v) {
		if k.Proto != 17 || k.Dir != lbFwd {
			continue
		}
		f := LBFrontend{Addr: addrFromBE32(k.Daddr), Port: portFromBE16(k.Dport), Proto: k.Proto}
		e, ok := current[f]
		if !ok {
			// Not an address frontend: a NodePort on a node address.
			f = LBFrontend{Port: f.Port, Proto: f.Proto, NodePort: true}
			e = current[f]
		}
		backends := e.Backends
		backend := netip.AddrPortFrom(addrFromBE32(v.ToAddr), portFromBE16(v.ToPort))
		if slices.Contains(backends, backend) {
			continue
		}
		stale = append(stale, flow{fwd: k, rev: lbRevKey(k, v)})
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("read the Service flow table: %w", err)
	}
	for _, fl := range stale {
		for _, key := range []datapathLbCtKey{fl.fwd, fl.rev} {
			if err := t.ct.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return 0, fmt.Errorf("delete a Service flow: %w", err)
			}
		}
	}
	return len(stale), nil
}

// lbRevKey is the reverse key of the forward entry fk → fv: from the
// backend to the source it was given (the client, or the node's NAT port).
func lbRevKey(fk datapathLbCtKey, fv datapathLbCt) datapathLbCtKey {
	return datapathLbCtKey{Saddr: fv.ToAddr, Sport: fv.ToPort, Daddr: fv.FromAddr, Dport: fv.FromPort, Proto: fk.Proto, Dir: lbRev}
}

// lbFwdKey is the forward key of the reverse entry rk → rv: from the
// client to the frontend.
func lbFwdKey(rk datapathLbCtKey, rv datapathLbCt) datapathLbCtKey {
	return datapathLbCtKey{Saddr: rv.ToAddr, Sport: rv.ToPort, Daddr: rv.FromAddr, Dport: rv.FromPort, Proto: rk.Proto, Dir: lbFwd}
}

// gcLB expires the flows from outside in sb_lb_ct (both halves) by the
// timeouts and TCP states of masquerading's conntrack, so a closed flow's
// NAT port is free again after TCPClosing.
func gcLB(ctx context.Context, m *ebpf.Map, t Timeouts, now time.Duration) (gcResult, error) {
	t.setDefaults()
	type pair struct {
		fk, rk datapathLbCtKey
		fv, rv datapathLbCt
	}
	pairs := map[datapathLbCtKey]*pair{}
	var k datapathLbCtKey
	var v datapathLbCt
	it := m.Iterate()
	for it.Next(&k, &v) {
		fk := k
		if k.Dir == lbRev {
			fk = lbFwdKey(k, v)
		}
		p := pairs[fk]
		if p == nil {
			p = &pair{fk: fk}
			pairs[fk] = p
		}
		if k.Dir == lbRev {
			p.rk, p.rv = k, v
		} else {
			p.fv, p.rk = v, lbRevKey(k, v)
		}
	}
	if err := it.Err(); err != nil {
		return gcResult{}, fmt.Errorf("dump the Service flow table: %w", err)
	}
	expired := func(p *pair) bool {
		last := time.Duration(max(p.fv.LastSeen, p.rv.LastSeen))
		return now-last > t.timeout(p.fk.Proto, p.fv.Flags, p.rv.Flags)
	}
	res := gcResult{flows: len(pairs)}
	for _, p := range pairs {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		if !expired(p) {
			continue
		}
		// Re-read both halves: a packet may have arrived since the dump.
		p.fv, p.rv = datapathLbCt{}, datapathLbCt{}
		m.Lookup(p.fk, &p.fv)
		m.Lookup(p.rk, &p.rv)
		if !expired(p) {
			continue
		}
		for _, key := range []datapathLbCtKey{p.fk, p.rk} {
			if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return res, fmt.Errorf("delete a Service flow: %w", err)
			}
		}
		res.deleted++
	}
	return res, nil
}

// Maglev fills a lookup table of size m (a prime larger than the number
// of backends) with backend indices, as in Google's Maglev (NSDI '16):
// each backend walks its own permutation of the slots, taking turns, so
// every backend gets m/n slots give or take one, and removing a backend
// moves mostly the flows that were on it. Permutations derive from the
// backends' addresses alone: every node computes the same table.
func Maglev(backends []netip.AddrPort, m int) []int {
	table := make([]int, m)
	n := len(backends)
	if n == 0 {
		return nil
	}
	offset, skip, next := make([]uint64, n), make([]uint64, n), make([]uint64, n)
	for i, b := range backends {
		h := sha256.Sum256([]byte(b.String()))
		offset[i] = binary.LittleEndian.Uint64(h[0:8]) % uint64(m)
		skip[i] = binary.LittleEndian.Uint64(h[8:16])%uint64(m-1) + 1
	}
	for i := range table {
		table[i] = -1
	}
	for filled := 0; ; {
		for i := range n {
			c := (offset[i] + next[i]*skip[i]) % uint64(m)
			for table[c] >= 0 {
				next[i]++
				c = (offset[i] + next[i]*skip[i]) % uint64(m)
			}
			table[c] = i
			next[i]++
			filled++
			if filled == m {
				return table
			}
		}
	}
}
