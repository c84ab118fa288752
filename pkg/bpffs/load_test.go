package bpffs

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
)

// TestLoadPinnedReplacesRebuildable pins a map of an older layout and loads
// a spec whose map of the same name grew its value: refused unless the map
// is rebuildable, then replaced.
func TestLoadPinnedReplacesRebuildable(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create eBPF maps")
	}
	// bpffs is not mounted at boot: mount it as the agent would rather
	// than skip (CI must run this test).
	if err := Ensure("/sys/fs/bpf"); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("/sys/fs/bpf", "sinabro-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	spec := func(valueSize uint32) *ebpf.CollectionSpec {
		return &ebpf.CollectionSpec{Maps: map[string]*ebpf.MapSpec{
			"sb_test": {Name: "sb_test", Type: ebpf.Hash, KeySize: 4, ValueSize: valueSize, MaxEntries: 4, Pinning: ebpf.PinByName},
		}}
	}
	var objs struct {
		M *ebpf.Map `ebpf:"sb_test"`
	}
	if err := LoadPinned(spec(4), &objs, dir, "test"); err != nil {
		t.Fatal(err)
	}
	if err := objs.M.Put(uint32(1), uint32(7)); err != nil {
		t.Fatal(err)
	}
	objs.M.Close()

	if err := LoadPinned(spec(8), &objs, dir, "test"); !errors.Is(err, ebpf.ErrMapIncompatible) {
		t.Fatalf("incompatible pinned map not rebuildable: err = %v, want ErrMapIncompatible", err)
	}
	// A compatible map is adopted with its contents, rebuildable or not.
	if err := LoadPinned(spec(4), &objs, dir, "test", "sb_test"); err != nil {
		t.Fatal(err)
	}
	var v uint32
	if err := objs.M.Lookup(uint32(1), &v); err != nil || v != 7 {
		t.Errorf("adopted map: lookup = %d, %v; want 7", v, err)
	}
	objs.M.Close()
	if err := LoadPinned(spec(8), &objs, dir, "test", "sb_test"); err != nil {
		t.Fatalf("rebuildable map of an older layout: %v", err)
	}
	defer objs.M.Close()
	if info, err := objs.M.Info(); err != nil || info.ValueSize != 8 {
		t.Errorf("map after replacement: %+v, %v; want value size 8", info, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "sb_test")); err != nil {
		t.Errorf("replacement not pinned: %v", err)
	}
}
