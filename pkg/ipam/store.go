// Package ipam is Sinabro's host-local IP address management: it hands out
// pod addresses from the node's pod CIDRs and keeps its state in one JSON
// file per network.
//
// Crash safety: every change happens under an exclusive flock on the state
// directory and is written atomically (temp file, fsync, rename), so a plugin
// killed at any point leaves either the old or the new state. An address is
// first recorded as pending with the allocating process's PID and marked
// committed once the pod's interface is configured; a pending entry whose
// process died and whose interface does not exist is reclaimed by the next
// allocation, and GC releases anything not in the runtime's valid list.
package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
)

// ErrExhausted is returned when a range has no free address left.
var ErrExhausted = errors.New("no free address")

// Attachment names one pod interface: the CNI container ID and interface name.
type Attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

// Allocation is one address handed to an attachment.
type Allocation struct {
	IP netip.Addr `json:"ip"`
	Attachment
	// PID of the plugin process that allocated it; meaningful while pending.
	PID       int       `json:"pid,omitempty"`
	Committed bool      `json:"committed"`
	Created   time.Time `json:"created"`
}

type state struct {
	Allocations map[netip.Addr]*Allocation `json:"allocations"`
	// Last is the last address handed out per range, so allocation proceeds
	// round-robin and a released address is not reused right away.
	Last map[netip.Prefix]netip.Addr `json:"last"`
}

// Store is the IPAM state of one network on this node.
type Store struct {
	dir    string
	ranges []netip.Prefix
}

// Open returns the store kept in dir for the given ranges (at most one per
// address family is used per attachment). The directory is created if needed.
func Open(dir string, ranges []netip.Prefix) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create ipam dir %s: %w", dir, err)
	}
	for _, r := range ranges {
		if r != r.Masked() {
			return nil, fmt.Errorf("range %s is not a network address (want %s)", r, r.Masked())
		}
		if usable(r) < 1 {
			return nil, fmt.Errorf("range %s is too small for pods", r)
		}
	}
	return &Store{dir: dir, ranges: ranges}, nil
}

func (s *Store) statePath() string { return filepath.Join(s.dir, "state.json") }

// withLock runs fn with the directory's exclusive lock held and the state
// loaded; when fn reports a change the state is written back atomically.
func (s *Store) withLock(fn func(st *state) (changed bool, err error)) error {
	lock, err := os.OpenFile(filepath.Join(s.dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open ipam lock: %w", err)
	}
	defer lock.Close() // closing releases the flock, and so does the process dying
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock ipam state: %w", err)
	}
	st := &state{Allocations: map[netip.Addr]*Allocation{}, Last: map[netip.Prefix]netip.Addr{}}
	data, err := os.ReadFile(s.statePath())
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("read ipam state: %w", err)
	default:
		if err := json.Unmarshal(data, st); err != nil {
			return fmt.Errorf("decode ipam state %s: %w", s.statePath(), err)
		}
		if st.Allocations == nil {
			st.Allocations = map[netip.Addr]*Allocation{}
		}
		if st.Last == nil {
			st.Last = map[netip.Prefix]netip.Addr{}
		}
	}
	changed, err := fn(st)
	if err != nil || !changed {
		return err
	}
	out, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode ipam state: %w", err)
	}
	// Replace, not Write: the file is never partial, and skipping the
	// directory flush keeps ADD fast. A power loss may bring back the
	// previous state, which is harmless: no pod survives it, and GC or the
	// next ADD reclaims what the older state still lists.
	if err := atomicfile.Replace(s.statePath(), out, 0o600); err != nil {
		return fmt.Errorf("write ipam state: %w", err)
	}
	return nil
}

// Allocate returns one address per range for att, reusing the addresses it
// already holds (an ADD retried after a failure gets the same IP). New
// addresses are recorded as pending under this process's PID. inUse reports
// whether a pending allocation of a dead process still backs a live
// interface; those that do not are reclaimed first.
func (s *Store) Allocate(att Attachment, inUse func(Allocation) bool) ([]Allocation, error) {
	var got []Allocation
	err := s.withLock(func(st *state) (bool, error) {
		changed := reclaimDead(st, att, inUse)
		for _, r := range s.ranges {
			if a := findIn(st, att, r); a != nil {
				if !a.Committed && a.PID != os.Getpid() {
					a.PID = os.Getpid()
					changed = true
				}
				got = append(got, *a)
				continue
			}
			ip, err := nextFree(st, r)
			if err != nil {
				return changed, fmt.Errorf("allocate from %s: %w", r, err)
			}
			a := &Allocation{IP: ip, Attachment: att, PID: os.Getpid(), Created: time.Now().UTC()}
			st.Allocations[ip] = a
			st.Last[r] = ip
			got = append(got, *a)
			changed = true
		}
		return changed, nil
	})
	if err != nil {
		return nil, err
	}
	return got, nil
}

// Commit marks att's allocations as backing a configured interface.
func (s *Store) Commit(att Attachment) error {
	return s.withLock(func(st *state) (bool, error) {
		changed := false
		for _, a := range st.Allocations {
			if a.Attachment == att && !a.Committed {
				a.Committed, a.PID = true, 0
				changed = true
			}
		}
		return changed, nil
	})
}

// Release frees every address held by att. Releasing nothing is not an error.
func (s *Store) Release(att Attachment) ([]Allocation, error) {
	return s.releaseIf(func(a *Allocation) bool { return a.Attachment == att })
}

// ReleaseExcept frees every address whose attachment is not in valid (CNI GC).
func (s *Store) ReleaseExcept(valid map[Attachment]bool) ([]Allocation, error) {
	return s.releaseIf(func(a *Allocation) bool { return !valid[a.Attachment] })
}

func (s *Store) releaseIf(match func(*Allocation) bool) ([]Allocation, error) {
	var freed []Allocation
	err := s.withLock(func(st *state) (bool, error) {
		for ip, a := range st.Allocations {
			if match(a) {
				freed = append(freed, *a)
				delete(st.Allocations, ip)
			}
		}
		return len(freed) > 0, nil
	})
	sortAllocations(freed)
	return freed, err
}

// List returns every allocation, ordered by address.
func (s *Store) List() ([]Allocation, error) {
	var all []Allocation
	err := s.withLock(func(st *state) (bool, error) {
		for _, a := range st.Allocations {
			all = append(all, *a)
		}
		return false, nil
	})
	sortAllocations(all)
	return all, err
}

func sortAllocations(as []Allocation) {
	sort.Slice(as, func(i, j int) bool { return as[i].IP.Less(as[j].IP) })
}

// reclaimDead drops pending allocations of other attachments whose plugin
// process is gone and whose interface was never (or is no longer) set up.
func reclaimDead(st *state, att Attachment, inUse func(Allocation) bool) bool {
	changed := false
	for ip, a := range st.Allocations {
		if a.Committed || a.Attachment == att || processAlive(a.PID) {
			continue
		}
		if inUse != nil && inUse(*a) {
			continue
		}
		delete(st.Allocations, ip)
		changed = true
	}
	return changed
}

func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

func findIn(st *state, att Attachment, r netip.Prefix) *Allocation {
	for _, a := range st.Allocations {
		if a.Attachment == att && r.Contains(a.IP) {
			return a
		}
	}
	return nil
}

// nextFree scans round-robin from the address after the last one handed out.
func nextFree(st *state, r netip.Prefix) (netip.Addr, error) {
	first, last := firstUsable(r), lastUsable(r)
	start := first
	if prev, ok := st.Last[r]; ok && r.Contains(prev) && prev.Less(last) {
		start = prev.Next()
	}
	// Bounded scan: at most the number of usable addresses (capped for IPv6).
	limit := usable(r)
	ip := start
	for i := uint64(0); i < limit; i++ {
		if !ip.IsValid() || last.Less(ip) || ip.Less(first) {
			ip = first
		}
		if _, taken := st.Allocations[ip]; !taken {
			return ip, nil
		}
		ip = ip.Next()
	}
	return netip.Addr{}, ErrExhausted
}
