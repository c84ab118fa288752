package datapath

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"os"
	"testing"
	"time"
)

// bruteCIDREntries is cidrEntries by definition: each prefix gets the
// union of the flags of every configured prefix containing it.
func bruteCIDREntries(cluster, nonMasq []netip.Prefix) map[netip.Prefix]uint32 {
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
	out := map[netip.Prefix]uint32{}
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

func TestCIDREntriesMatchesDefinition(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []netip.Prefix {
		var out []netip.Prefix
		for range n {
			// A narrow address range so that prefixes nest.
			a := netip.AddrFrom4([4]byte{10, byte(r.IntN(4)), byte(r.IntN(256)), byte(r.IntN(256))})
			out = append(out, netip.PrefixFrom(a, 8+r.IntN(25)))
		}
		return out
	}
	for i := range 20 {
		cluster, nonMasq := random(30), random(60)
		got, want := cidrEntries(cluster, nonMasq), bruteCIDREntries(cluster, nonMasq)
		if len(got) != len(want) {
			t.Fatalf("round %d: %d entries, want %d", i, len(got), len(want))
		}
		for p, f := range want {
			if got[p] != f {
				t.Errorf("round %d: %v flags %#x, want %#x", i, p, got[p], f)
			}
		}
	}
}

// scalePrefixes is what the agent hands the datapath at 5,000 nodes
// without --cluster-cidr: a pod CIDR per node and three addresses each.
func scalePrefixes(nodes int) (cluster, nonMasq []netip.Prefix) {
	for i := range nodes {
		cluster = append(cluster, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24))
		for j := range 3 {
			nonMasq = append(nonMasq, netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 16 + byte(j), byte(i >> 8), byte(i)}), 32))
		}
	}
	return cluster, nonMasq
}

// TestCIDREntriesScales: 20,000 prefixes are computed in milliseconds (the
// pairwise version took seconds, on every agent pass).
func TestCIDREntriesScales(t *testing.T) {
	cluster, nonMasq := scalePrefixes(5000)
	start := time.Now()
	got := cidrEntries(cluster, nonMasq)
	took := time.Since(start)
	t.Logf("cidrEntries of %d prefixes: %s", len(got), took)
	if len(got) != 20000 {
		t.Errorf("%d entries, want 20000", len(got))
	}
	if took > 500*time.Millisecond {
		t.Errorf("cidrEntries of 20,000 prefixes took %s, want well under 500ms", took)
	}
}

// TestPrefixMapsHoldLargeClusters loads the datapath and fills its prefix
// maps as 5,000 nodes would (without --cluster-cidr, the worst case), then
// resyncs them unchanged.
func TestPrefixMapsHoldLargeClusters(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load eBPF programs")
	}
	var objs datapathObjects
	if err := loadObjects(&objs, testConfig(), ""); err != nil {
		if errors.Is(err, os.ErrPermission) {
			t.Skipf("cannot load eBPF programs: %v", err)
		}
		t.Fatal(err)
	}
	defer objs.Close()
	for _, m := range []struct {
		name string
		max  uint32
	}{{"sb_masq_cidrs", objs.SbMasqCidrs.MaxEntries()}, {"sb_remote_cidrs", objs.SbRemoteCidrs.MaxEntries()}} {
		if m.max < PrefixMapSize {
			t.Errorf("%s holds %d entries, want %d", m.name, m.max, PrefixMapSize)
		}
	}

	cluster, nonMasq := scalePrefixes(5000)
	for _, what := range []string{"first", "unchanged"} {
		start := time.Now()
		if err := syncCIDRs(objs.SbMasqCidrs, cidrEntries(cluster, nonMasq)); err != nil {
			t.Fatalf("%s sync: %v", what, err)
		}
		t.Logf("sb_masq_cidrs: %s sync of %d prefixes in %s", what, len(cluster)+len(nonMasq), time.Since(start))
	}

	d := &Datapath{objs: objs}
	var remotes []Remote
	for i := range 5000 {
		remotes = append(remotes, Remote{
			Prefix: cluster[i], Ifindex: 1,
			PeerMAC: []byte{2, 0x5b, 0, 0, byte(i >> 8), byte(i)}, LocalMAC: []byte{2, 0, 0, 0, 0, 1},
			VTEP: netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)}),
		})
	}
	for _, what := range []string{"first", "unchanged"} {
		start := time.Now()
		if err := d.SetRemotes(remotes); err != nil {
			t.Fatalf("%s SetRemotes: %v", what, err)
		}
		t.Logf("sb_remote_cidrs: %s sync of %d prefixes in %s", what, len(remotes), time.Since(start))
	}
	got, err := d.Remotes()
	if err != nil || len(got) != len(remotes) {
		t.Fatalf("Remotes: %d, %v; want %d", len(got), err, len(remotes))
	}
	if err := d.SetRemotes(append(remotes, make([]Remote, PrefixMapSize)...)); err == nil {
		t.Error("SetRemotes beyond the map's capacity: no error")
	}
}
