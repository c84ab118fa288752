package bpffs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// LoadPinned loads spec into objs with its maps pinned by name in pinDir,
// adopting maps already pinned there ("" pins nothing, for tests). A
// verifier rejection is reported once, with its log; what names the
// object in errors.
//
// Maps named in rebuildable hold only state the caller writes again after
// loading (configuration, routes): a pinned one whose layout an upgrade
// changed is replaced instead of failing the load. Every other map
// (conntrack, counters) must be adopted as it is.
func LoadPinned(spec *ebpf.CollectionSpec, objs any, pinDir, what string, rebuildable ...string) error {
	return LoadPinnedWith(spec, objs, pinDir, what, ebpf.ProgramOptions{}, rebuildable...)
}

// LoadPinnedWith is LoadPinned with program options (the CO-RE targets).
func LoadPinnedWith(spec *ebpf.CollectionSpec, objs any, pinDir, what string, progs ebpf.ProgramOptions, rebuildable ...string) error {
	return LoadPinnedShared(spec, objs, pinDir, "", what, progs, rebuildable...)
}

// SharedPrefix names the maps several objects share (flow telemetry's
// ring buffer and its settings, bpf/lib/flow.h): with a sharedDir, they
// are pinned there, created by whichever object loads first, and adopted
// by the others.
const SharedPrefix = "sb_flow_"

// SharedDir is where the maps shared between objects are pinned under an
// agent's bpffs root.
func SharedDir(root string) string { return filepath.Join(root, "shared") }

// OpenShared creates, or adopts where pinned, spec's maps named
// SharedPrefix* in dir.
func OpenShared(spec *ebpf.CollectionSpec, dir string) (map[string]*ebpf.Map, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	shared := map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		if !strings.HasPrefix(name, SharedPrefix) {
			continue
		}
		m, err := openShared(ms, dir)
		if err != nil {
			for _, m := range shared {
				m.Close()
			}
			return nil, fmt.Errorf("create or adopt shared map %s in %s: %w", name, dir, err)
		}
		shared[name] = m
	}
	return shared, nil
}

// openShared adopts the map pinned as ms.Name in dir or creates and pins
// it. The shared maps hold nothing worth keeping over an upgrade (events,
// settings the agent writes again, counters): one of another layout is
// replaced. Loaders race to create them (the agent's controllers start
// together): the loser adopts the winner's pin.
func openShared(ms *ebpf.MapSpec, dir string) (*ebpf.Map, error) {
	ms = ms.Copy()
	ms.Pinning = ebpf.PinByName
	var err error
	for range 3 {
		var m *ebpf.Map
		if m, err = ebpf.NewMapWithOptions(ms, ebpf.MapOptions{PinPath: dir}); err == nil {
			return m, nil
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			if rerr := os.Remove(filepath.Join(dir, ms.Name)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				return nil, fmt.Errorf("replace a shared map of an older layout: %w", rerr)
			}
			continue
		}
		if !errors.Is(err, os.ErrExist) {
			return nil, err
		}
	}
	return nil, err
}

// RemoveSharedIfAlone removes the shared maps' pins once nothing else is
// left under root: each component's Cleanup calls it after removing its
// own pins, so the last one out takes them.
func RemoveSharedIfAlone(root string) error {
	entries, err := os.ReadDir(root)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("list %s: %w", root, err)
	}
	for _, e := range entries {
		if e.Name() != filepath.Base(SharedDir(root)) {
			return nil
		}
	}
	if err := os.RemoveAll(SharedDir(root)); err != nil {
		return fmt.Errorf("remove %s: %w", SharedDir(root), err)
	}
	return nil
}

// LoadPinnedShared is LoadPinnedWith with the maps named SharedPrefix*
// pinned in sharedDir instead of pinDir ("" treats them as any other).
func LoadPinnedShared(spec *ebpf.CollectionSpec, objs any, pinDir, sharedDir, what string, progs ebpf.ProgramOptions, rebuildable ...string) error {
	var shared map[string]*ebpf.Map
	if pinDir != "" && sharedDir != "" {
		var err error
		if shared, err = OpenShared(spec, sharedDir); err != nil {
			return err
		}
		defer func() {
			for _, m := range shared {
				m.Close() // the collection holds clones
			}
		}()
	}
	if pinDir == "" {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	}
	for _, name := range rebuildable {
		ms := spec.Maps[name]
		if ms == nil || pinDir == "" {
			continue
		}
		path := filepath.Join(pinDir, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			continue // absent: created; unreadable: the load reports it
		}
		incompatible := ms.Compatible(m) != nil
		m.Close()
		if incompatible {
			if err := os.Remove(path); err != nil {
				return fmt.Errorf("replace pinned map %s of an older layout: %w", path, err)
			}
		}
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}, Programs: progs, MapReplacements: shared}
	if err := spec.LoadAndAssign(objs, opts); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("load %s programs: %+v", what, ve)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return fmt.Errorf("adopt pinned maps in %s (remove them with Cleanup to start afresh): %w", pinDir, err)
		}
		return fmt.Errorf("load %s: %w", what, err)
	}
	return nil
}

// EnumNames reads the C enum named enum from the object's BTF and returns
// value → lower-case name without prefix (REASON_SNAT_NEW → "snat_new"
// with prefix "REASON_"), for values below limit: counters and metrics are
// named from the C source alone, never from a second list.
func EnumNames(spec *ebpf.CollectionSpec, enum, prefix string, limit uint64) (map[uint32]string, error) {
	var e *btf.Enum
	if err := spec.Types.TypeByName(enum, &e); err != nil {
		return nil, fmt.Errorf("find enum %s in the object's BTF: %w", enum, err)
	}
	out := map[uint32]string{}
	for _, v := range e.Values {
		if v.Value < limit {
			out[uint32(v.Value)] = strings.ToLower(strings.TrimPrefix(v.Name, prefix))
		}
	}
	return out, nil
}
