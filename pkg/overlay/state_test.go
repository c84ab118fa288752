package overlay

import (
	"net"
	"net/netip"
	"reflect"
	"testing"
)

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }

func TestDesired(t *testing.T) {
	peers := []Peer{
		{Name: "b", Underlay: addr("192.168.1.2"), MAC: mustMAC("02:00:00:00:00:02"),
			PodCIDRs: []netip.Prefix{pfx("10.244.2.0/24"), pfx("fd00:10:244:2::/64")}},
		{Name: "c", Underlay: addr("192.168.1.3"), MAC: mustMAC("02:00:00:00:00:03")},
	}
	got := Desired([]netip.Prefix{pfx("10.244.1.0/24")}, peers)
	want := State{
		Addresses: []netip.Prefix{pfx("10.244.1.0/32")},
		Routes: []Route{
			{Dst: pfx("10.244.1.0/24"), Metric: UnreachableMetric},
			{Dst: pfx("10.244.2.0/24"), Gateway: addr("10.244.2.0")},
			{Dst: pfx("fd00:10:244:2::/64"), Gateway: addr("fd00:10:244:2::"), Metric: 1024},
		},
		Neighbours: []Neighbour{
			{IP: addr("10.244.2.0"), MAC: "02:00:00:00:00:02"},
			{IP: addr("fd00:10:244:2::"), MAC: "02:00:00:00:00:02"},
		},
		FDB: []FDBEntry{
			{MAC: "02:00:00:00:00:02", Dst: addr("192.168.1.2")},
			{MAC: "02:00:00:00:00:03", Dst: addr("192.168.1.3")},
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Desired() =\n%+v\nwant\n%+v", got, want)
	}
}

func TestDiff(t *testing.T) {
	routeB := Route{Dst: pfx("10.244.2.0/24"), Gateway: addr("10.244.2.0")}
	routeC := Route{Dst: pfx("10.244.3.0/24"), Gateway: addr("10.244.3.0")}
	fdbB := FDBEntry{MAC: "02:00:00:00:00:02", Dst: addr("192.168.1.2")}
	neighB := Neighbour{IP: addr("10.244.2.0"), MAC: "02:00:00:00:00:02"}

	tests := []struct {
		name            string
		desired, actual State
		want            Plan
	}{
		{
			name: "empty",
		},
		{
			name:    "all missing",
			desired: State{Routes: []Route{routeB}, FDB: []FDBEntry{fdbB}, Neighbours: []Neighbour{neighB}},
			want:    Plan{UpsertRoutes: []Route{routeB}, UpsertFDB: []FDBEntry{fdbB}, UpsertNeighbours: []Neighbour{neighB}},
		},
		{
			name:    "converged",
			desired: State{Routes: []Route{routeB}, FDB: []FDBEntry{fdbB}, Neighbours: []Neighbour{neighB}},
			actual:  State{Routes: []Route{routeB}, FDB: []FDBEntry{fdbB}, Neighbours: []Neighbour{neighB}},
		},
		{
			name:    "stale peer removed",
			desired: State{Routes: []Route{routeB}},
			actual:  State{Routes: []Route{routeB, routeC}},
			want:    Plan{DelRoutes: []Route{routeC}},
		},
		{
			name:    "underlay address changed is replaced, not deleted",
			desired: State{FDB: []FDBEntry{fdbB}},
			actual:  State{FDB: []FDBEntry{{MAC: fdbB.MAC, Dst: addr("192.168.9.9")}}},
			want:    Plan{UpsertFDB: []FDBEntry{fdbB}},
		},
		{
			name:    "MAC changed is replaced",
			desired: State{Neighbours: []Neighbour{neighB}},
			actual:  State{Neighbours: []Neighbour{{IP: neighB.IP, MAC: "02:00:00:00:00:99"}}},
			want:    Plan{UpsertNeighbours: []Neighbour{neighB}},
		},
		{
			name:    "gateway changed is replaced",
			desired: State{Routes: []Route{routeB}},
			actual:  State{Routes: []Route{{Dst: routeB.Dst, Gateway: addr("10.244.2.1")}}},
			want:    Plan{UpsertRoutes: []Route{routeB}},
		},
		{
			name:    "route with another metric is a different route",
			desired: State{Routes: []Route{routeB}},
			actual:  State{Routes: []Route{{Dst: routeB.Dst, Gateway: routeB.Gateway, Metric: 7}}},
			want:    Plan{UpsertRoutes: []Route{routeB}, DelRoutes: []Route{{Dst: routeB.Dst, Gateway: routeB.Gateway, Metric: 7}}},
		},
		{
			name:    "addresses",
			desired: State{Addresses: []netip.Prefix{pfx("10.244.1.0/32")}},
			actual:  State{Addresses: []netip.Prefix{pfx("10.244.9.0/32")}},
			want:    Plan{AddAddresses: []netip.Prefix{pfx("10.244.1.0/32")}, DelAddresses: []netip.Prefix{pfx("10.244.9.0/32")}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Diff(tt.desired, tt.actual)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Diff() =\n%+v\nwant\n%+v", got, tt.want)
			}
			if got.Empty() != (tt.want.Empty()) {
				t.Errorf("Empty() = %v, want %v", got.Empty(), tt.want.Empty())
			}
		})
	}
}

func TestStableMAC(t *testing.T) {
	a, b := StableMAC("node-a"), StableMAC("node-b")
	if !reflect.DeepEqual(a, StableMAC("node-a")) {
		t.Errorf("StableMAC not stable: %s vs %s", a, StableMAC("node-a"))
	}
	if reflect.DeepEqual(a, b) {
		t.Errorf("StableMAC(node-a) == StableMAC(node-b) == %s", a)
	}
	for _, m := range []net.HardwareAddr{a, b} {
		if m[0]&0x01 != 0 || m[0]&0x02 == 0 {
			t.Errorf("%s is not a locally administered unicast MAC", m)
		}
	}
}
