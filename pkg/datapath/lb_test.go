package datapath

import (
	"fmt"
	"net/netip"
	"testing"
)

func backendsN(n int) []netip.AddrPort {
	var out []netip.AddrPort
	for i := range n {
		out = append(out, netip.MustParseAddrPort(fmt.Sprintf("10.244.%d.%d:8080", i/200, i%200+1)))
	}
	return out
}

// TestMaglevSpreadsAndMovesFew: every backend gets its share of slots (give
// or take one round), and removing one backend moves few slots that were
// not its own — the property that keeps flows on their backends.
func TestMaglevSpreadsAndMovesFew(t *testing.T) {
	for _, n := range []int{1, 2, 3, 10, 100} {
		bs := backendsN(n)
		table := Maglev(bs, MaglevSize)
		count := make([]int, n)
		for _, i := range table {
			count[i]++
		}
		for i, c := range count {
			if c < MaglevSize/n-1 || c > MaglevSize/n+1 {
				t.Errorf("n=%d: backend %d has %d slots, want %d±1", n, i, c, MaglevSize/n)
			}
		}
		if n < 3 {
			continue
		}
		// Remove the middle backend: slots of the others mostly stay.
		gone := n / 2
		rest := append(append([]netip.AddrPort{}, bs[:gone]...), bs[gone+1:]...)
		after := Maglev(rest, MaglevSize)
		moved := 0
		for slot, i := range table {
			if i == gone {
				continue
			}
			if rest[after[slot]] != bs[i] {
				moved++
			}
		}
		if limit := MaglevSize / 20; moved > limit {
			t.Errorf("n=%d: removing one backend moved %d slots of the others (more than %d)", n, moved, limit)
		}
		t.Logf("n=%d: removing one backend moved %d of %d other slots", n, moved, MaglevSize-count[gone])
	}
	if got := Maglev(nil, MaglevSize); got != nil {
		t.Errorf("no backends: %v", got)
	}
}
