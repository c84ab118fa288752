package flows

import (
	"sort"
	"sync"
)

// Buffer keeps the last flows of a node (for --last) and hands new ones
// to followers. Drops are kept apart from the other flows, so a flood of
// drops never pushes the node's flows out. A follower that does not keep
// up loses flows (counted), never slows the reader.
type Buffer struct {
	mu        sync.Mutex
	flows     ring
	drops     ring
	followers map[*follower]struct{}
}

type ring struct {
	items []Flow
	next  int
	full  bool
}

func (r *ring) add(f Flow) {
	r.items[r.next] = f
	r.next = (r.next + 1) % len(r.items)
	if r.next == 0 {
		r.full = true
	}
}

// last appends the last n items matching filter, newest first.
func (r *ring) last(out []Flow, n int, filter Filter) []Flow {
	size := r.next
	if r.full {
		size = len(r.items)
	}
	for i, got := 0, 0; i < size && (n <= 0 || got < n); i++ {
		f := &r.items[(r.next-1-i+len(r.items))%len(r.items)]
		if filter.Match(f) {
			out = append(out, *f)
			got++
		}
	}
	return out
}

type follower struct {
	ch      chan Flow
	filter  Filter
	dropped uint64
}

// NewBuffer keeps up to size flows and size drops.
func NewBuffer(size int) *Buffer {
	if size < 1 {
		size = 1
	}
	return &Buffer{flows: ring{items: make([]Flow, size)}, drops: ring{items: make([]Flow, size)}, followers: map[*follower]struct{}{}}
}

// Add records a flow and hands it to the followers it matches.
func (b *Buffer) Add(f Flow) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if f.Type == "drop" {
		b.drops.add(f)
	} else {
		b.flows.add(f)
	}
	for fo := range b.followers {
		if !fo.filter.Match(&f) {
			continue
		}
		select {
		case fo.ch <- f:
		default:
			fo.dropped++
		}
	}
}

// Last returns the last n flows matching filter, oldest first (n <= 0:
// all the buffer holds).
func (b *Buffer) Last(n int, filter Filter) []Flow {
	b.mu.Lock()
	out := b.flows.last(nil, n, filter)
	out = b.drops.last(out, n, filter)
	b.mu.Unlock()
	sort.SliceStable(out, func(i, j int) bool { return out[i].Time.Before(out[j].Time) })
	if n > 0 && len(out) > n {
		out = out[len(out)-n:]
	}
	return out
}

// Follow returns the flows matching filter from now on, and a function
// ending the subscription (it returns how many the channel lost).
func (b *Buffer) Follow(filter Filter) (<-chan Flow, func() uint64) {
	fo := &follower{ch: make(chan Flow, 4096), filter: filter}
	b.mu.Lock()
	b.followers[fo] = struct{}{}
	b.mu.Unlock()
	return fo.ch, func() uint64 {
		b.mu.Lock()
		defer b.mu.Unlock()
		delete(b.followers, fo)
		return fo.dropped
	}
}
