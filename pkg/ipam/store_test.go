package ipam

import (
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"
)

func att(id string) Attachment { return Attachment{ContainerID: id, IfName: "eth0"} }

func open(t *testing.T, cidrs ...string) *Store {
	t.Helper()
	var rs []netip.Prefix
	for _, c := range cidrs {
		rs = append(rs, netip.MustParsePrefix(c))
	}
	s, err := Open(t.TempDir(), rs)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mustAllocate(t *testing.T, s *Store, id string) []Allocation {
	t.Helper()
	a, err := s.Allocate(att(id), nil)
	if err != nil {
		t.Fatalf("allocate %s: %v", id, err)
	}
	return a
}

func TestAllocateSkipsReservedAndRoundRobins(t *testing.T) {
	s := open(t, "10.0.0.0/29") // .0 network, .1 node, .7 broadcast: .2-.6 usable
	var got []string
	for _, id := range []string{"a", "b", "c"} {
		got = append(got, mustAllocate(t, s, id)[0].IP.String())
	}
	if want := "10.0.0.2 10.0.0.3 10.0.0.4"; strings.Join(got, " ") != want {
		t.Fatalf("got %s, want %s", strings.Join(got, " "), want)
	}
	if _, err := s.Release(att("a")); err != nil {
		t.Fatal(err)
	}
	// Round-robin: the freed .2 is not handed out before .5 and .6.
	for _, want := range []string{"10.0.0.5", "10.0.0.6", "10.0.0.2"} {
		if got := mustAllocate(t, s, "n-"+want)[0].IP.String(); got != want {
			t.Errorf("got %s, want %s", got, want)
		}
	}
	if _, err := s.Allocate(att("full"), nil); !errors.Is(err, ErrExhausted) {
		t.Errorf("allocate from a full range: %v, want ErrExhausted", err)
	}
}

func TestAllocateReusesForSameAttachment(t *testing.T) {
	s := open(t, "10.0.0.0/24", "fd00::/64")
	first := mustAllocate(t, s, "a")
	again := mustAllocate(t, s, "a")
	if len(first) != 2 || first[0].IP != again[0].IP || first[1].IP != again[1].IP {
		t.Fatalf("retry got %v, want %v", again, first)
	}
	if !first[1].IP.Is6() || first[1].IP.String() != "fd00::2" {
		t.Errorf("ipv6 address = %s, want fd00::2", first[1].IP)
	}
}

func TestReclaimDeadPending(t *testing.T) {
	s := open(t, "10.0.0.0/30") // one usable address
	// A pending allocation of a process that no longer exists...
	err := s.withLock(func(st *state) (bool, error) {
		ip := netip.MustParseAddr("10.0.0.2")
		st.Allocations[ip] = &Allocation{IP: ip, Attachment: att("dead"), PID: deadPID}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// ...whose interface still exists is kept,
	if _, err := s.Allocate(att("new"), func(Allocation) bool { return true }); !errors.Is(err, ErrExhausted) {
		t.Fatalf("allocate while the dead one's interface exists: %v, want ErrExhausted", err)
	}
	// and reclaimed once it does not.
	got, err := s.Allocate(att("new"), func(Allocation) bool { return false })
	if err != nil || got[0].IP.String() != "10.0.0.2" {
		t.Fatalf("allocate after reclaim = %v, %v", got, err)
	}
	// Committed allocations are never reclaimed that way.
	if err := s.Commit(att("new")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Allocate(att("other"), func(Allocation) bool { return false }); !errors.Is(err, ErrExhausted) {
		t.Fatalf("a committed address was reclaimed: %v", err)
	}
}

func TestReleaseExcept(t *testing.T) {
	s := open(t, "10.0.0.0/24")
	for _, id := range []string{"a", "b", "c"} {
		mustAllocate(t, s, id)
	}
	freed, err := s.ReleaseExcept(map[Attachment]bool{att("b"): true})
	if err != nil || len(freed) != 2 {
		t.Fatalf("freed %v, %v; want a and c", freed, err)
	}
	left, _ := s.List()
	if len(left) != 1 || left[0].ContainerID != "b" {
		t.Errorf("left %v, want only b", left)
	}
}

func TestOpenRejectsBadRanges(t *testing.T) {
	for _, c := range []string{"10.0.0.1/24", "10.0.0.0/31"} {
		if _, err := Open(t.TempDir(), []netip.Prefix{netip.MustParsePrefix(c)}); err == nil {
			t.Errorf("Open(%s) succeeded", c)
		}
	}
}

func TestCorruptStateIsAnErrorNotAReset(t *testing.T) {
	s := open(t, "10.0.0.0/24")
	if err := os.WriteFile(s.statePath(), []byte("{broken"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Allocate(att("a"), nil); err == nil {
		t.Fatal("allocate over a corrupt state file succeeded; it must not silently forget allocations")
	}
}

// deadPID is above the kernel's PID_MAX_LIMIT (2^22), so never a live process.
const deadPID = 1<<22 + 12345
