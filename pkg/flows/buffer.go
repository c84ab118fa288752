package flows

import "sync"

// Buffer keeps the last flows of a node (for --last) and hands new ones
// to followers. A follower that does not keep up loses flows (counted),
// never slows the reader.
type Buffer struct {
	mu        sync.Mutex
	ring      []Flow
	next      int
	full      bool
	followers map[*follower]struct{}
}

type follower struct {
	ch      chan Flow
	filter  Filter
	dropped uint64
}

// NewBuffer keeps up to size flows.
func NewBuffer(size int) *Buffer {
	if size < 1 {
		size = 1
	}
	return &Buffer{ring: make([]Flow, size), followers: map[*follower]struct{}{}}
}

// Add records a flow and hands it to the followers it matches.
func (b *Buffer) Add(f Flow) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.ring[b.next] = f
	b.next = (b.next + 1) % len(b.ring)
	if b.next == 0 {
		b.full = true
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
	defer b.mu.Unlock()
	size := b.next
	if b.full {
		size = len(b.ring)
	}
	var out []Flow
	for i := 0; i < size && (n <= 0 || len(out) < n); i++ {
		f := &b.ring[(b.next-1-i+len(b.ring))%len(b.ring)]
		if filter.Match(f) {
			out = append(out, *f)
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
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
