package kernel

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// The probes below do what cilium/ebpf's features package does for the few
// things the preflight asks (program and map types, helpers). Note that
// cilium/ebpf/link imports features anyway, so this saves no package init.

// haveProgramType loads the smallest program of type t.
func haveProgramType(t ebpf.ProgramType) error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         t,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("load a %v program: %w", t, err)
	}
	return prog.Close()
}

// haveMapType creates the smallest map of type t.
func haveMapType(t ebpf.MapType) error {
	spec := &ebpf.MapSpec{Type: t, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	if t == ebpf.LPMTrie {
		spec.KeySize, spec.Flags = 8, unix.BPF_F_NO_PREALLOC
	}
	m, err := ebpf.NewMap(spec)
	if err != nil {
		return fmt.Errorf("create a %v map: %w", t, err)
	}
	return m.Close()
}

// haveHelper loads a program of type t calling helper with unset
// arguments: the verifier rejects it with EACCES when it knows the helper
// (bad arguments), with EINVAL and "invalid func" or "unknown func" when
// it does not.
func haveHelper(t ebpf.ProgramType, helper asm.BuiltinFunc) error {
	prog, err := ebpf.NewProgramWithOptions(&ebpf.ProgramSpec{
		Type:         t,
		License:      "GPL",
		Instructions: asm.Instructions{helper.Call(), asm.LoadImm(asm.R0, 0, asm.DWord), asm.Return()},
	}, ebpf.ProgramOptions{LogLevel: ebpf.LogLevelBranch})
	if err == nil {
		return prog.Close()
	}
	var verr *ebpf.VerifierError
	switch {
	case errors.Is(err, unix.EACCES):
		return nil
	case errors.As(err, &verr) && (strings.Contains(strings.Join(verr.Log, "\n"), "invalid func") ||
		strings.Contains(strings.Join(verr.Log, "\n"), "unknown func") ||
		strings.Contains(strings.Join(verr.Log, "\n"), "cannot use helper")):
		return fmt.Errorf("%v programs cannot call it: %w", t, ebpf.ErrNotSupported)
	}
	return fmt.Errorf("probe %v: %w", helper, err)
}
