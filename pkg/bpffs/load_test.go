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

// TestLoadPinnedShared: two objects share a map named SharedPrefix* pinned
// in the shared dir (the second adopts the first's), one of an older
// layout is replaced, and RemoveSharedIfAlone leaves it while another
// component's pins remain.
func TestLoadPinnedShared(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create eBPF maps")
	}
	if err := Ensure("/sys/fs/bpf"); err != nil {
		t.Fatal(err)
	}
	root, err := os.MkdirTemp("/sys/fs/bpf", "sinabro-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(root)
	spec := func(valueSize uint32) *ebpf.CollectionSpec {
		return &ebpf.CollectionSpec{Maps: map[string]*ebpf.MapSpec{
			"sb_flow_test": {Name: "sb_flow_test", Type: ebpf.Array, KeySize: 4, ValueSize: valueSize, MaxEntries: 1, Pinning: ebpf.PinByName},
			"sb_own":       {Name: "sb_own", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1, Pinning: ebpf.PinByName},
		}}
	}
	for _, d := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	type objs struct {
		Shared *ebpf.Map `ebpf:"sb_flow_test"`
		Own    *ebpf.Map `ebpf:"sb_own"`
	}
	var a, b objs
	if err := LoadPinnedShared(spec(4), &a, filepath.Join(root, "a"), SharedDir(root), "a", ebpf.ProgramOptions{}); err != nil {
		t.Fatal(err)
	}
	defer a.Shared.Close()
	defer a.Own.Close()
	if err := a.Shared.Put(uint32(0), uint32(42)); err != nil {
		t.Fatal(err)
	}
	if err := LoadPinnedShared(spec(4), &b, filepath.Join(root, "b"), SharedDir(root), "b", ebpf.ProgramOptions{}); err != nil {
		t.Fatal(err)
	}
	var v uint32
	if err := b.Shared.Lookup(uint32(0), &v); err != nil || v != 42 {
		t.Errorf("the second object's shared map reads %d, %v: not the first's", v, err)
	}
	b.Shared.Close()
	b.Own.Close()
	if _, err := os.Stat(filepath.Join(root, "a", "sb_flow_test")); !os.IsNotExist(err) {
		t.Errorf("the shared map was pinned in the object's own dir too: %v", err)
	}
	// An upgrade changed the layout: replaced, not a failed load.
	if err := LoadPinnedShared(spec(8), &b, filepath.Join(root, "b"), SharedDir(root), "b", ebpf.ProgramOptions{}); err != nil {
		t.Fatalf("shared map of an older layout: %v", err)
	}
	b.Shared.Close()
	b.Own.Close()
	if err := os.RemoveAll(filepath.Join(root, "b")); err != nil {
		t.Fatal(err)
	}
	if err := RemoveSharedIfAlone(root); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(SharedDir(root)); err != nil {
		t.Errorf("shared dir removed while %s/a remains: %v", root, err)
	}
	os.RemoveAll(filepath.Join(root, "a"))
	if err := RemoveSharedIfAlone(root); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(SharedDir(root)); !os.IsNotExist(err) {
		t.Errorf("shared dir left alone under %s: %v", root, err)
	}
}
