package overlay

import (
	"net/netip"
	"slices"
	"testing"
	"time"
)

func TestHostPrefixes(t *testing.T) {
	ns, fd := testNS(t)
	m := openManager(t, fd)
	ip(t, ns, "link", "add", "under0", "type", "veth", "peer", "name", "under1")
	ip(t, ns, "addr", "add", "10.9.0.1/24", "dev", "under0")
	ip(t, ns, "addr", "add", "10.8.0.1/16", "dev", "under1")
	skip, err := m.LinkByAddr(netip.MustParseAddr("10.8.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := m.HostPrefixes(skip.Index)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(got, netip.MustParsePrefix("10.9.0.1/24")) || slices.Contains(got, netip.MustParsePrefix("10.8.0.1/16")) {
		t.Errorf("HostPrefixes(skip %d) = %v, want 10.9.0.1/24 and not 10.8.0.1/16", skip.Index, got)
	}
}

// TestNextHopsCached: answers are reused until the underlay's routing
// changes, so a resync asks nothing per peer.
func TestNextHopsCached(t *testing.T) {
	ns, fd := testNS(t)
	m := openManager(t, fd)
	ip(t, ns, "link", "add", "under0", "type", "veth", "peer", "name", "under1")
	ip(t, ns, "addr", "add", "10.9.0.1/24", "dev", "under0")
	ip(t, ns, "link", "set", "under0", "up")
	ip(t, ns, "link", "set", "under1", "up")
	ip(t, ns, "route", "add", "10.10.0.0/16", "via", "10.9.0.254")
	under, err := m.LinkByAddr(netip.MustParseAddr("10.9.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	dsts := []netip.Addr{netip.MustParseAddr("10.9.0.7"), netip.MustParseAddr("10.10.3.4"), netip.MustParseAddr("192.0.2.1")}
	check := func(what string, wantQueries int, want map[string]string) {
		t.Helper()
		hops, errs, err := m.NextHops(dsts, under.Index)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		for dst, hop := range want {
			if got := hops[netip.MustParseAddr(dst)]; got != netip.MustParseAddr(hop) {
				t.Errorf("%s: next hop of %s = %v, want %s", what, dst, got, hop)
			}
		}
		if errs[netip.MustParseAddr("192.0.2.1")] == nil {
			t.Errorf("%s: 192.0.2.1 has a next hop %v, want an error", what, hops[netip.MustParseAddr("192.0.2.1")])
		}
		if m.hops.queries != wantQueries {
			t.Errorf("%s: %d route queries in all, want %d", what, m.hops.queries, wantQueries)
		}
	}
	check("first", 3, map[string]string{"10.9.0.7": "10.9.0.7", "10.10.3.4": "10.9.0.254"})
	check("unchanged", 3, map[string]string{"10.9.0.7": "10.9.0.7", "10.10.3.4": "10.9.0.254"})
	ip(t, ns, "route", "add", "10.10.3.0/24", "via", "10.9.0.253")
	check("route added", 6, map[string]string{"10.10.3.4": "10.9.0.253"})
	ip(t, ns, "rule", "add", "to", "10.10.3.4", "table", "100", "priority", "100")
	ip(t, ns, "route", "add", "10.10.3.4", "via", "10.9.0.252", "table", "100")
	check("rule added", 9, map[string]string{"10.10.3.4": "10.9.0.252"})
}

// TestSyncManyPeers programs 5,000 peers, then resyncs with nothing
// changed: the resync writes nothing and costs a few dumps, and the next
// hops of 5,000 VTEPs are asked once.
func TestSyncManyPeers(t *testing.T) {
	a, _ := twoNodes(t)
	const n = 5000
	var peers []Peer
	var vteps []netip.Addr
	for i := range n {
		vtep := netip.AddrFrom4([4]byte{192, 168, 77, 0})
		if i > 0 {
			vtep = netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)})
		}
		vteps = append(vteps, vtep)
		peers = append(peers, Peer{
			Name: "p", Underlay: vtep, MAC: []byte{2, 0x5b, 0, 0, byte(i >> 8), byte(i)},
			PodCIDRs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 128 + byte(i>>14), byte(i >> 6), byte(i<<2) & 0xff}), 30)},
		})
	}
	ip(t, a.ns, "route", "add", "172.16.0.0/16", "via", "192.168.77.254")
	desired := Desired([]netip.Prefix{a.cidr}, peers)
	start := time.Now()
	plan, err := a.m.Sync(a.dev, desired)
	first := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.UpsertRoutes) != n+1 || len(plan.UpsertFDB) != n || len(plan.UpsertNeighbours) != n {
		t.Fatalf("first plan: %d routes, %d fdb, %d neighbours; want %d, %d, %d",
			len(plan.UpsertRoutes), len(plan.UpsertFDB), len(plan.UpsertNeighbours), n+1, n, n)
	}
	start = time.Now()
	plan, err = a.m.Sync(a.dev, desired)
	again := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if !plan.Empty() {
		t.Errorf("resync with nothing changed planned %+v", plan)
	}

	under, err := a.m.LinkByAddr(a.local)
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	hops, _, err := a.m.NextHops(vteps, under.Index)
	hopsFirst := time.Since(start)
	if err != nil || len(hops) != n {
		t.Fatalf("NextHops: %d answers, %v; want %d", len(hops), err, n)
	}
	start = time.Now()
	if _, _, err := a.m.NextHops(vteps, under.Index); err != nil {
		t.Fatal(err)
	}
	hopsAgain := time.Since(start)
	if a.m.hops.queries != n {
		t.Errorf("%d next-hop queries for %d VTEPs over two passes, want %d", a.m.hops.queries, n, n)
	}
	t.Logf("%d peers: first sync %s, unchanged resync %s; next hops first %s, unchanged %s",
		n, first.Round(time.Millisecond), again.Round(time.Millisecond), hopsFirst.Round(time.Millisecond), hopsAgain.Round(time.Millisecond))
}
