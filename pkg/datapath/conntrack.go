package datapath

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Conntrack entry directions and per-direction flags; see bpf/masq.c.
const (
	ctFwd = 0
	ctRev = 1

	ctSeen = 0x01
	ctSyn  = 0x02
	ctFin  = 0x04
	ctRst  = 0x08
)

// Timeouts are how long a flow may stay idle before GC removes it.
type Timeouts struct {
	TCPSyn         time.Duration // TCP not (yet) answered
	TCPEstablished time.Duration // TCP seen both ways
	TCPClosing     time.Duration // TCP after RST or FIN both ways
	UDP            time.Duration
	ICMP           time.Duration
}

func (t *Timeouts) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&t.TCPSyn, 60*time.Second)
	def(&t.TCPEstablished, 6*time.Hour)
	def(&t.TCPClosing, 10*time.Second)
	def(&t.UDP, 60*time.Second)
	def(&t.ICMP, 30*time.Second)
}

// State names a flow's TCP state as seen by conntrack.
func flowState(proto uint8, fwd, rev uint8) string {
	all := fwd | rev
	switch {
	case proto != unix.IPPROTO_TCP && rev&ctSeen != 0:
		return "replied"
	case proto != unix.IPPROTO_TCP:
		return "unreplied"
	case all&ctRst != 0:
		return "reset"
	case fwd&ctFin != 0 && rev&ctFin != 0:
		return "closed"
	case all&ctFin != 0:
		return "closing"
	case rev&ctSeen != 0 && fwd&ctSeen != 0:
		return "established"
	default:
		return "syn-sent"
	}
}

func (t Timeouts) timeout(proto uint8, fwd, rev uint8) time.Duration {
	switch proto {
	case unix.IPPROTO_TCP:
		switch flowState(proto, fwd, rev) {
		case "reset", "closed":
			return t.TCPClosing
		case "syn-sent":
			return t.TCPSyn
		default:
			return t.TCPEstablished
		}
	case unix.IPPROTO_UDP:
		return t.UDP
	default:
		return t.ICMP
	}
}

// Flow is one masqueraded connection, both conntrack halves combined.
type Flow struct {
	Proto    uint8          `json:"proto"`
	Src      netip.AddrPort `json:"src"` // pod
	Dst      netip.AddrPort `json:"dst"` // remote
	NAT      netip.AddrPort `json:"nat"` // node address and NAT port (ICMP: echo id)
	State    string         `json:"state"`
	Created  time.Duration  `json:"created"` // monotonic clock, as bpf_ktime_get_ns
	LastSeen time.Duration  `json:"lastSeen"`
	// Orphan is set when only one half is present (the other was evicted).
	Orphan bool `json:"orphan,omitempty"`
}

type ctPair struct {
	fk, rk         datapathCtKey
	fv, rv         datapathCtEntry
	hasFwd, hasRev bool
}

func revKeyOf(fk datapathCtKey, fv datapathCtEntry) datapathCtKey {
	return datapathCtKey{Saddr: fk.Daddr, Daddr: fv.Addr, Sport: fk.Dport, Dport: fv.Port, Proto: fk.Proto, Dir: ctRev}
}

func fwdKeyOf(rk datapathCtKey, rv datapathCtEntry) datapathCtKey {
	return datapathCtKey{Saddr: rv.Addr, Daddr: rk.Saddr, Sport: rv.Port, Dport: rk.Sport, Proto: rk.Proto, Dir: ctFwd}
}

// dumpCT reads the whole conntrack map, in batches where the kernel can.
func dumpCT(m *ebpf.Map) (map[datapathCtKey]datapathCtEntry, error) {
	entries := make(map[datapathCtKey]datapathCtEntry)
	const chunk = 4096
	keys := make([]datapathCtKey, chunk)
	vals := make([]datapathCtEntry, chunk)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			entries[keys[i]] = vals[i]
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return entries, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("dump conntrack: %w", err)
		}
	}
	var (
		k datapathCtKey
		v datapathCtEntry
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		entries[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump conntrack: %w", err)
	}
	return entries, nil
}

// readPairs dumps the conntrack map and joins its halves.
func readPairs(m *ebpf.Map) ([]ctPair, error) {
	entries, err := dumpCT(m)
	if err != nil {
		return nil, err
	}
	var pairs []ctPair
	for k, v := range entries {
		if k.Dir == ctFwd {
			p := ctPair{fk: k, fv: v, hasFwd: true, rk: revKeyOf(k, v)}
			p.rv, p.hasRev = entries[p.rk]
			pairs = append(pairs, p)
			continue
		}
		fk := fwdKeyOf(k, v)
		if _, ok := entries[fk]; ok {
			continue // listed with its forward half
		}
		pairs = append(pairs, ctPair{fk: fk, rk: k, rv: v, hasRev: true})
	}
	return pairs, nil
}

func (p ctPair) lastSeen() uint64 { return max(p.fv.LastSeen, p.rv.LastSeen) }

func (p ctPair) flow() Flow {
	f := Flow{
		Proto:    p.fk.Proto,
		Src:      netip.AddrPortFrom(addrFromBE32(p.fk.Saddr), portFromBE16(p.fk.Sport)),
		Dst:      netip.AddrPortFrom(addrFromBE32(p.fk.Daddr), portFromBE16(p.fk.Dport)),
		NAT:      netip.AddrPortFrom(addrFromBE32(p.rk.Daddr), portFromBE16(p.rk.Dport)),
		State:    flowState(p.fk.Proto, p.fv.Flags, p.rv.Flags),
		LastSeen: time.Duration(p.lastSeen()),
		Orphan:   !p.hasFwd || !p.hasRev,
	}
	f.Created = time.Duration(p.fv.Created)
	if !p.hasFwd {
		f.Created = time.Duration(p.rv.Created)
	}
	return f
}

// Flows lists the masqueraded flows in a conntrack map.
func Flows(m *ebpf.Map) ([]Flow, error) {
	pairs, err := readPairs(m)
	if err != nil {
		return nil, err
	}
	flows := make([]Flow, 0, len(pairs))
	for _, p := range pairs {
		flows = append(flows, p.flow())
	}
	return flows, nil
}

// Monotonic returns the clock bpf_ktime_get_ns reads.
func Monotonic() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

// GC deletes expired conntrack entries and returns how many flows it removed.
func (d *Datapath) GC(ctx context.Context) (int, error) {
	now := Monotonic()
	res, err := gcConntrack(ctx, d.objs.SbCt, d.cfg.Timeouts, now)
	d.gc.flows.Store(int64(res.flows - res.deleted))
	d.gc.deleted.Add(uint64(res.deleted))
	d.gc.runs.Add(1)
	lb, lerr := gcLB(ctx, d.objs.SbLbCt, d.cfg.Timeouts, now)
	d.gc.lbFlows.Store(int64(lb.flows - lb.deleted))
	var pexp int
	var perr error
	if d.cfg.Policy {
		var kept int
		kept, pexp, perr = d.Policy().gcPolicy(ctx, now, d.cfg.Timeouts)
		d.gc.policyFlows.Store(int64(kept))
	}
	return res.deleted + lb.deleted + pexp, errors.Join(err, lerr, perr)
}

// gcStats are the last GC pass's findings, exported as metrics.
type gcStats struct {
	flows   atomic.Int64 // flows left after the last pass
	lbFlows atomic.Int64 // Service flows from outside left after the last pass
	// policyFlows are NetworkPolicy's tracked flows left after the last pass.
	policyFlows atomic.Int64
	deleted     atomic.Uint64 // flows deleted by all passes
	runs        atomic.Uint64
}

type gcResult struct{ flows, deleted int }

// RunGC runs GC every interval until ctx is done.
func (d *Datapath) RunGC(ctx context.Context, interval time.Duration, logf func(format string, args ...any)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if _, err := d.GC(ctx); err != nil && ctx.Err() == nil && logf != nil {
				logf("conntrack gc: %v", err)
			}
		}
	}
}

func gcConntrack(ctx context.Context, m *ebpf.Map, t Timeouts, now time.Duration) (gcResult, error) {
	t.setDefaults()
	pairs, err := readPairs(m)
	if err != nil {
		return gcResult{}, err
	}
	res := gcResult{flows: len(pairs)}
	for _, p := range pairs {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		if !expired(p, t, now) {
			continue
		}
		// Re-read both halves: a packet may have arrived since the dump.
		p.fv, p.rv = datapathCtEntry{}, datapathCtEntry{}
		p.hasFwd = m.Lookup(p.fk, &p.fv) == nil
		p.hasRev = m.Lookup(p.rk, &p.rv) == nil
		if !p.hasFwd {
			p.fv = datapathCtEntry{}
		}
		if !p.hasRev {
			p.rv = datapathCtEntry{}
		}
		if !p.hasFwd && !p.hasRev || !expired(p, t, now) {
			continue
		}
		var errs []error
		for _, k := range []datapathCtKey{p.fk, p.rk} {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, err)
			}
		}
		if err := errors.Join(errs...); err != nil {
			return res, fmt.Errorf("delete conntrack entry: %w", err)
		}
		res.deleted++
	}
	return res, nil
}

func expired(p ctPair, t Timeouts, now time.Duration) bool {
	fwd, rev := p.fv.Flags, p.rv.Flags
	if !p.hasFwd {
		fwd = 0
	}
	if !p.hasRev {
		rev = 0
	}
	last := time.Duration(p.lastSeen())
	return now-last > t.timeout(p.fk.Proto, fwd, rev)
}
