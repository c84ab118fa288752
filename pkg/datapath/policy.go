package datapath

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
)

// NetworkPolicy state as bpf/lib/policy.h reads it. pkg/policy compiles
// Kubernetes objects into a PolicyState; SyncPolicy writes it; PolicyMaps
// answers the same lookups the datapath makes (sinabro debug policy).

// PolicyDir is the direction a rule applies in, seen from the local pod.
type PolicyDir uint8

const (
	Ingress PolicyDir = 0 // to the pod (POL_INGRESS)
	Egress  PolicyDir = 1 // from the pod (POL_EGRESS)
)

func (d PolicyDir) String() string {
	if d == Egress {
		return "egress"
	}
	return "ingress"
}

const (
	polIsolatedIngress = 0x1
	polIsolatedEgress  = 0x2
	polRuleFixedBits   = 72 // pod, identity, direction
	// ServiceIdentity marks Service addresses in the ipcache: a pod's
	// egress to one is judged after kube-proxy translates it.
	ServiceIdentity = 2
	// AnyIdentity in a rule key stands for every peer (a rule without peers).
	AnyIdentity = ^uint32(0)
)

// PolicyEndpoint is a local pod as policy sees it.
type PolicyEndpoint struct {
	// Ifindex is its host veth: the CNI plugin waits for this entry.
	Ifindex int
	// Isolated per PolicyDir: some policy selects the pod for it.
	Isolated [2]bool
	// DenyPolicy per PolicyDir: the policy number drops are counted under.
	DenyPolicy [2]uint32
}

// PolicyRuleKey is one allowed (pod, peer identity, direction, protocol,
// port prefix). Proto 0 allows every protocol (Port, PortBits unused);
// PortBits is how many leading bits of Port must match (16: one port, 0:
// all ports).
type PolicyRuleKey struct {
	Pod      netip.Addr
	Identity uint32
	Dir      PolicyDir
	Proto    uint8
	Port     uint16
	PortBits uint8
}

// PolicyState is everything the datapath needs to decide.
type PolicyState struct {
	Endpoints map[netip.Addr]PolicyEndpoint
	// IPCache maps addresses and CIDRs to identities; an address without
	// a match is identity 0, the world.
	IPCache map[netip.Prefix]uint32
	// Rules maps allowed keys to the rule number that allows them.
	Rules map[PolicyRuleKey]uint32
}

func (k PolicyRuleKey) raw() datapathPolRuleKey {
	r := datapathPolRuleKey{Pod: be32(k.Pod), Identity: k.Identity, Dir: uint8(k.Dir), Prefixlen: polRuleFixedBits}
	if k.Proto != 0 {
		bits := min(k.PortBits, 16)
		r.Proto = k.Proto
		r.Prefixlen += 8 + uint32(bits)
		r.Port = be16(k.Port & ^uint16(0xffff>>bits))
	}
	return r
}

func ruleKeyFromRaw(r datapathPolRuleKey) PolicyRuleKey {
	k := PolicyRuleKey{Pod: addrFromBE32(r.Pod), Identity: r.Identity, Dir: PolicyDir(r.Dir)}
	if r.Prefixlen > polRuleFixedBits {
		k.Proto = r.Proto
		k.PortBits = uint8(r.Prefixlen - polRuleFixedBits - 8)
		k.Port = portFromBE16(r.Port)
	}
	return k
}

// PortPrefixes splits the port range [from, to] into the aligned prefixes
// the rule trie holds, as (port, bits) pairs.
func PortPrefixes(from, to uint16) [][2]uint16 {
	var out [][2]uint16
	for lo := uint32(from); lo <= uint32(to); {
		bits := uint32(16)
		// Widen while lo stays aligned and the block stays inside the range.
		for bits > 0 {
			size := uint32(1) << (16 - (bits - 1))
			if lo%size != 0 || lo+size-1 > uint32(to) {
				break
			}
			bits--
		}
		out = append(out, [2]uint16{uint16(lo), uint16(bits)})
		lo += 1 << (16 - bits)
	}
	return out
}

// PolicyMaps are the policy's pinned maps, from a Datapath or opened by
// OpenPolicyMaps.
type PolicyMaps struct {
	Endpoints, IPCache, Rules, CT, Gen, Drops, Veths *ebpf.Map
	owned                                            bool
}

// Policy returns the loaded datapath's policy maps (not to be closed).
func (d *Datapath) Policy() *PolicyMaps {
	return &PolicyMaps{
		Endpoints: d.objs.SbPolEndpoints, IPCache: d.objs.SbPolIpcache, Rules: d.objs.SbPolRules,
		CT: d.objs.SbPolCt, Gen: d.objs.SbPolGen, Drops: d.objs.SbPolDrops, Veths: d.objs.SbPolVeths,
	}
}

// PolicyEndpointsPin is where the pods' policy entries are pinned under a
// datapath root (the CNI plugin waits for a new pod's entry there).
func PolicyEndpointsPin(root string) string { return filepath.Join(mapsDir(root), "sb_pol_endpoints") }

// OpenPolicyMaps opens the policy maps pinned under a datapath's root.
func OpenPolicyMaps(root string) (*PolicyMaps, error) {
	m := &PolicyMaps{owned: true}
	for _, x := range []struct {
		name string
		to   **ebpf.Map
	}{
		{"sb_pol_endpoints", &m.Endpoints}, {"sb_pol_ipcache", &m.IPCache}, {"sb_pol_rules", &m.Rules},
		{"sb_pol_ct", &m.CT}, {"sb_pol_gen", &m.Gen}, {"sb_pol_drops", &m.Drops}, {"sb_pol_veths", &m.Veths},
	} {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(root), x.name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("open policy map %s (is the agent running with NetworkPolicy on?): %w", x.name, err)
		}
		*x.to = mp
	}
	return m, nil
}

// Close closes maps OpenPolicyMaps opened.
func (m *PolicyMaps) Close() {
	if !m.owned {
		return
	}
	for _, mp := range []*ebpf.Map{m.Endpoints, m.IPCache, m.Rules, m.CT, m.Gen, m.Drops, m.Veths} {
		if mp != nil {
			mp.Close()
		}
	}
}

// Read returns the state in the maps.
func (m *PolicyMaps) Read() (PolicyState, error) {
	s := PolicyState{Endpoints: map[netip.Addr]PolicyEndpoint{}, IPCache: map[netip.Prefix]uint32{}, Rules: map[PolicyRuleKey]uint32{}}
	var (
		ek uint32
		ev datapathPolEndpoint
	)
	it := m.Endpoints.Iterate()
	for it.Next(&ek, &ev) {
		s.Endpoints[addrFromBE32(ek)] = endpointFromRaw(ev)
	}
	if err := it.Err(); err != nil {
		return s, fmt.Errorf("read sb_pol_endpoints: %w", err)
	}
	var (
		ik datapathLpmV4Key
		iv uint32
	)
	it = m.IPCache.Iterate()
	for it.Next(&ik, &iv) {
		s.IPCache[netip.PrefixFrom(addrFromBE32(ik.Addr), int(ik.Prefixlen))] = iv
	}
	if err := it.Err(); err != nil {
		return s, fmt.Errorf("read sb_pol_ipcache: %w", err)
	}
	var (
		rk datapathPolRuleKey
		rv uint32
	)
	it = m.Rules.Iterate()
	for it.Next(&rk, &rv) {
		s.Rules[ruleKeyFromRaw(rk)] = rv
	}
	if err := it.Err(); err != nil {
		return s, fmt.Errorf("read sb_pol_rules: %w", err)
	}
	return s, nil
}

func endpointFromRaw(v datapathPolEndpoint) PolicyEndpoint {
	return PolicyEndpoint{
		Ifindex:    int(v.Ifindex),
		Isolated:   [2]bool{v.Flags&polIsolatedIngress != 0, v.Flags&polIsolatedEgress != 0},
		DenyPolicy: v.DenyPolicy,
	}
}

func (ep PolicyEndpoint) raw() datapathPolEndpoint {
	v := datapathPolEndpoint{Ifindex: uint32(ep.Ifindex), DenyPolicy: ep.DenyPolicy}
	if ep.Isolated[Ingress] {
		v.Flags |= polIsolatedIngress
	}
	if ep.Isolated[Egress] {
		v.Flags |= polIsolatedEgress
	}
	return v
}

// PolicyChanges counts what a SyncPolicy wrote.
type PolicyChanges struct {
	Endpoints, IPCache, Rules int
	Generation                uint32
	// MayDeny: something that allowed a flow may have gone (a rule, an
	// address's identity, a pod newly isolated). Flows that skip tc
	// (same-node TCP acceleration) must then be judged again.
	MayDeny bool
}

// Any reports whether anything was written.
func (c PolicyChanges) Any() bool { return c.Endpoints+c.IPCache+c.Rules > 0 }

// SyncPolicy makes the maps hold want, writing only differences, in an
// order that never denies what both the old and the new state allow: new
// rules, then addresses, then endpoints, then what is stale in the reverse
// order. Then it moves the generation, so established flows are judged
// again on their next packet.
func (m *PolicyMaps) SyncPolicy(want PolicyState) (PolicyChanges, error) {
	var c PolicyChanges
	have, err := m.Read()
	if err != nil {
		return c, err
	}
	var errs []error
	for k, v := range want.Rules {
		if cur, ok := have.Rules[k]; ok && cur == v {
			continue
		}
		if err := m.Rules.Put(k.raw(), v); err != nil {
			errs = append(errs, fmt.Errorf("put policy rule %+v: %w", k, err))
			continue
		}
		c.Rules++
	}
	for p, id := range want.IPCache {
		cur, ok := have.IPCache[p]
		if ok && cur == id {
			continue
		}
		if ok {
			c.MayDeny = true // the address's identity changed
		}
		if err := m.IPCache.Put(datapathLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: be32(p.Addr())}, id); err != nil {
			errs = append(errs, fmt.Errorf("put policy address %v: %w", p, err))
			continue
		}
		c.IPCache++
	}
	for ip, ep := range want.Endpoints {
		cur, ok := have.Endpoints[ip]
		if ok && cur == ep {
			continue
		}
		if ok && (ep.Isolated[Ingress] && !cur.Isolated[Ingress] || ep.Isolated[Egress] && !cur.Isolated[Egress]) {
			c.MayDeny = true
		}
		if err := m.Endpoints.Put(be32(ip), ep.raw()); err != nil {
			errs = append(errs, fmt.Errorf("put policy endpoint %v: %w", ip, err))
			continue
		}
		c.Endpoints++
	}
	for ip := range have.Endpoints {
		if _, ok := want.Endpoints[ip]; !ok {
			c.Endpoints++
			errs = append(errs, ignoreMissing(m.Endpoints.Delete(be32(ip))))
		}
	}
	errs = append(errs, m.syncVeths(want.Endpoints))
	for p := range have.IPCache {
		if _, ok := want.IPCache[p]; !ok {
			c.IPCache++
			c.MayDeny = true
			errs = append(errs, ignoreMissing(m.IPCache.Delete(datapathLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: be32(p.Addr())})))
		}
	}
	for k := range have.Rules {
		if _, ok := want.Rules[k]; !ok {
			c.Rules++
			c.MayDeny = true
			errs = append(errs, ignoreMissing(m.Rules.Delete(k.raw())))
		}
	}
	gen, err := m.Generation()
	if err != nil {
		errs = append(errs, err)
	}
	if c.Any() || gen == 0 {
		gen++
		if gen == 0 {
			gen = 1 // 0 marks a direction never judged
		}
		if err := m.Gen.Put(uint32(0), gen); err != nil {
			errs = append(errs, fmt.Errorf("move policy generation: %w", err))
		}
	}
	c.Generation = gen
	return c, errors.Join(errs...)
}

// syncVeths makes sb_pol_veths map each endpoint's veth to its address
// (the egress source check).
func (m *PolicyMaps) syncVeths(eps map[netip.Addr]PolicyEndpoint) error {
	want := map[uint32]uint32{}
	for ip, ep := range eps {
		want[uint32(ep.Ifindex)] = be32(ip)
	}
	var (
		k, v  uint32
		stale []uint32
		errs  []error
	)
	it := m.Veths.Iterate()
	for it.Next(&k, &v) {
		if w, ok := want[k]; !ok {
			stale = append(stale, k)
		} else if w == v {
			delete(want, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read sb_pol_veths: %w", err)
	}
	for k, v := range want {
		if err := m.Veths.Put(k, v); err != nil {
			errs = append(errs, fmt.Errorf("put policy veth %d: %w", k, err))
		}
	}
	for _, k := range stale {
		errs = append(errs, ignoreMissing(m.Veths.Delete(k)))
	}
	return errors.Join(errs...)
}

func ignoreMissing(err error) error {
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// Generation is the current policy generation.
func (m *PolicyMaps) Generation() (uint32, error) {
	var g uint32
	if err := m.Gen.Lookup(uint32(0), &g); err != nil {
		return 0, fmt.Errorf("read policy generation: %w", err)
	}
	return g, nil
}

// PolicyLookup is what the datapath finds for a new flow, as
// Lookup reports it.
type PolicyLookup struct {
	// Endpoint is false when the pod has no policy entry (not a pod of
	// this node, or not compiled yet): nothing is checked.
	Endpoint bool
	Isolated bool
	Identity uint32
	// Rule is the allowing rule's number, when Allowed and Isolated.
	Rule    uint32
	Allowed bool
	// DenyPolicy is the policy a drop is counted under.
	DenyPolicy uint32
}

// Lookup makes the datapath's lookups for a new flow to or from the local
// pod (dir) and the peer address: the endpoint, the peer's identity in the
// ipcache (longest prefix), and the rule trie. proto 0 is "any protocol"
// (ICMP and the like).
func (m *PolicyMaps) Lookup(pod, peer netip.Addr, dir PolicyDir, proto uint8, port uint16) (PolicyLookup, error) {
	var r PolicyLookup
	var ev datapathPolEndpoint
	if err := m.Endpoints.Lookup(be32(pod), &ev); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			r.Allowed = true
			return r, nil
		}
		return r, err
	}
	ep := endpointFromRaw(ev)
	r.Endpoint, r.Isolated, r.DenyPolicy = true, ep.Isolated[dir], ep.DenyPolicy[dir]
	var id uint32
	if err := m.IPCache.Lookup(datapathLpmV4Key{Prefixlen: 32, Addr: be32(peer)}, &id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return r, err
	}
	r.Identity = id
	if !r.Isolated {
		r.Allowed = true
		return r, nil
	}
	key := datapathPolRuleKey{Prefixlen: polRuleFixedBits + 8 + 16, Pod: be32(pod), Identity: id, Dir: uint8(dir), Proto: proto, Port: be16(port)}
	var rule uint32
	for _, id := range []uint32{id, AnyIdentity} {
		key.Identity = id
		switch err := m.Rules.Lookup(key, &rule); {
		case err == nil:
			r.Allowed, r.Rule = true, rule
			return r, nil
		case !errors.Is(err, ebpf.ErrKeyNotExist):
			return r, err
		}
	}
	return r, nil
}

// PolicyDrops reads the drop counters: (policy number, direction) → packets.
func (m *PolicyMaps) PolicyDrops() (map[[2]uint32]uint64, error) {
	out := map[[2]uint32]uint64{}
	var (
		k  datapathPolDropKey
		vs []datapathCounter
	)
	it := m.Drops.Iterate()
	for it.Next(&k, &vs) {
		var n uint64
		for _, v := range vs {
			n += v.Packets
		}
		out[[2]uint32{k.Policy, k.Dir}] = n
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read sb_pol_drops: %w", err)
	}
	return out, nil
}

// ResetDrops zeroes the drop counters.
func (m *PolicyMaps) ResetDrops() error {
	var (
		k    datapathPolDropKey
		vs   []datapathCounter
		keys []datapathPolDropKey
	)
	it := m.Drops.Iterate()
	for it.Next(&k, &vs) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read sb_pol_drops: %w", err)
	}
	for _, k := range keys {
		if err := ignoreMissing(m.Drops.Delete(k)); err != nil {
			return fmt.Errorf("reset sb_pol_drops: %w", err)
		}
	}
	return nil
}

// gcPolicy expires idle policy flows: TCP after RST or FIN both ways after
// closing, TCP never answered after syn, other TCP after established,
// everything else after the UDP timeout.
func (m *PolicyMaps) gcPolicy(ctx context.Context, now time.Duration, t Timeouts) (kept, expired int, err error) {
	t.setDefaults()
	idle := func(k datapathPolCtKey, v datapathPolCt) bool {
		timeout := t.UDP
		if k.Proto == 6 {
			timeout = t.timeout(k.Proto, v.Flags[0], v.Flags[1])
		}
		return now-time.Duration(v.LastSeen) > timeout
	}
	var (
		k     datapathPolCtKey
		v     datapathPolCt
		stale []datapathPolCtKey
	)
	it := m.CT.Iterate()
	for it.Next(&k, &v) {
		if idle(k, v) {
			stale = append(stale, k)
			continue
		}
		kept++
	}
	if err := it.Err(); err != nil {
		return kept, 0, fmt.Errorf("iterate sb_pol_ct: %w", err)
	}
	for _, k := range stale {
		if ctx.Err() != nil {
			break
		}
		// Read again: a new connection may have taken the tuple since
		// the dump (ports are reused at a high connection rate), and
		// deleting its entry would make its replies strangers.
		if err := m.CT.Lookup(k, &v); err != nil || !idle(k, v) {
			kept++
			continue
		}
		if err := m.CT.Delete(k); err == nil {
			expired++
		}
	}
	return kept, expired, nil
}
