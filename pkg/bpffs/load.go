package bpffs

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// LoadPinned loads spec into objs with its maps pinned by name in pinDir,
// adopting maps already pinned there ("" pins nothing, for tests). A
// verifier rejection is reported once, with its log; what names the
// object in errors.
func LoadPinned(spec *ebpf.CollectionSpec, objs any, pinDir, what string) error {
	if pinDir == "" {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}}
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
