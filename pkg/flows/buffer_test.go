package flows

import (
	"net/netip"
	"testing"
	"time"
)

// TestBufferKeepsFlowsThroughADropFlood: drops have a ring of their own,
// --last merges both in time order, and filters apply before counting.
func TestBufferKeepsFlowsThroughADropFlood(t *testing.T) {
	b := NewBuffer(10)
	t0 := time.Unix(1000, 0)
	for i := 0; i < 5; i++ {
		b.Add(Flow{Time: t0.Add(time.Duration(2*i) * time.Second), Type: "new", Source: Endpoint{Port: uint16(i)}})
	}
	for i := 0; i < 1000; i++ {
		b.Add(Flow{Time: t0.Add(time.Duration(i) * time.Millisecond), Type: "drop", Source: Endpoint{IP: netip.MustParseAddr("10.0.0.1")}})
	}
	if got := b.Last(0, Filter{Type: "new"}); len(got) != 5 {
		t.Fatalf("after a flood of drops, %d new flows kept, want 5", len(got))
	}
	all := b.Last(0, Filter{})
	if len(all) != 15 {
		t.Fatalf("Last(0) = %d flows, want 5 flows + 10 drops", len(all))
	}
	for i := 1; i < len(all); i++ {
		if all[i].Time.Before(all[i-1].Time) {
			t.Fatalf("not in time order at %d: %v", i, all)
		}
	}
	last := b.Last(2, Filter{})
	if len(last) != 2 || last[1].Type != "new" || last[1].Source.Port != 4 {
		t.Errorf("Last(2) = %v, want the two newest, the new flow of port 4 last", last)
	}
	ch, stop := b.Follow(Filter{Port: 7})
	b.Add(Flow{Type: "new", Source: Endpoint{Port: 8}})
	b.Add(Flow{Type: "new", Destination: Endpoint{Port: 7}})
	select {
	case f := <-ch:
		if f.Destination.Port != 7 {
			t.Errorf("follower got %v, want the flow to port 7", f)
		}
	case <-time.After(time.Second):
		t.Fatal("follower got nothing")
	}
	if lost := stop(); lost != 0 {
		t.Errorf("lost %d", lost)
	}
}
