package datapath

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// AttachMode is how programs are attached to interfaces. The programs are
// the same either way: they return TCX_NEXT (-1), TCX_PASS (0), TCX_DROP
// (2) or TCX_REDIRECT (7), which are TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT
// and TC_ACT_REDIRECT under a direct-action cls_bpf filter.
type AttachMode string

const (
	// AttachAuto is tcx where the kernel has it, classic tc elsewhere.
	AttachAuto AttachMode = "auto"
	// AttachTCX uses tcx links (Linux >= 6.6), pinned under the root and
	// re-pointed atomically on restart with link.Update.
	AttachTCX AttachMode = "tcx"
	// AttachClassic uses the clsact qdisc and one direct-action cls_bpf
	// filter per interface and direction (any kernel Sinabro supports).
	// Filters are not bpf objects that can be pinned: the program is
	// pinned where the link would be, as the record of the attachment, and
	// a restart replaces the filter in place (same priority and handle).
	AttachClassic AttachMode = "classic"
)

// ParseAttachMode checks a --tc-attach value.
func ParseAttachMode(s string) (AttachMode, error) {
	switch m := AttachMode(s); m {
	case AttachAuto, AttachTCX, AttachClassic:
		return m, nil
	case "":
		return AttachAuto, nil
	}
	return "", fmt.Errorf("tc attach mode %q: want auto, tcx or classic", s)
}

// HaveTCX reports whether the kernel attaches programs with tcx: nil when
// it does, an error wrapping ebpf.ErrNotSupported when it does not.
func HaveTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "Dual BSD/GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("load a probe program: %w", err)
	}
	defer prog.Close()
	// No interface has this index: a kernel with tcx says ENODEV,
	// cilium/ebpf turns a kernel without it into ErrNotSupported.
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
		return nil
	}
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("tcx: %w", err)
	}
	// Anything else (EPERM without privileges) proves nothing either way.
	return fmt.Errorf("probe tcx: %w", err)
}

// Resolve turns AttachAuto into the mode this kernel supports.
func (m AttachMode) Resolve() AttachMode {
	if m != AttachAuto && m != "" {
		return m
	}
	if HaveTCX() == nil {
		return AttachTCX
	}
	return AttachClassic
}

// attachment is a program attached to an interface by this process.
type attachment interface {
	// Close releases the process's handle; the attachment stays.
	Close() error
}

// tcAttachment is a cls_bpf filter; the filter holds its own reference on
// the program, so there is nothing to release.
type tcAttachment struct{ tcFilter }

func (tcAttachment) Close() error { return nil }

// pinned is what a pin under links/ holds: a tcx link, or the program of
// a classic tc filter.
type pinned struct {
	link link.Link
	prog *ebpf.Program
}

func (p pinned) Close() {
	if p.link != nil {
		p.link.Close()
	}
	if p.prog != nil {
		p.prog.Close()
	}
}

// loadPin opens the object pinned at path; both fields are nil when there
// is none.
func loadPin(path string) (pinned, error) {
	l, lerr := link.LoadPinnedLink(path, nil)
	if lerr == nil {
		return pinned{link: l}, nil
	}
	if errors.Is(lerr, os.ErrNotExist) {
		return pinned{}, nil
	}
	p, perr := ebpf.LoadPinnedProgram(path, nil)
	if perr == nil {
		return pinned{prog: p}, nil
	}
	return pinned{}, fmt.Errorf("load pin %s: %w", path, errors.Join(lerr, perr))
}

func progID(p *ebpf.Program) (uint32, error) {
	info, err := p.Info()
	if err != nil {
		return 0, fmt.Errorf("program info: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("program info has no ID")
	}
	return uint32(id), nil
}

// attach makes prog run on ifindex's dir in the datapath's mode, with
// the attachment recorded at links/<name>. Whatever the pin held before
// (the same attachment to update, one on another interface, one made in
// the other mode) is taken over or removed once the new one is in place.
func (d *Datapath) attach(name string, ifindex int, prog *ebpf.Program, dir direction) (attachment, error) {
	path := filepath.Join(linksDir(d.cfg.BPFRoot), name)
	if d.cfg.Attach == AttachClassic {
		return d.attachClassic(path, name, ifindex, prog, dir)
	}
	return d.attachTCX(path, ifindex, prog, dir)
}

// attachTCX makes the pinned tcx link at path run prog on ifindex: an
// existing link on the same interface is updated in place (atomic program
// replacement), a stale one is detached and a new link is attached and
// pinned.
func (d *Datapath) attachTCX(path string, ifindex int, prog *ebpf.Program, dir direction) (link.Link, error) {
	attach := ebpf.AttachTCXIngress
	if dir == egress {
		attach = ebpf.AttachTCXEgress
	}
	old, err := loadPin(path)
	if err != nil {
		return nil, err
	}
	if l := old.link; l != nil {
		info, ierr := l.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex &&
			ebpf.AttachType(info.TCX().AttachType) == attach {
			if err := l.Update(prog); err != nil {
				l.Close()
				return nil, fmt.Errorf("update tcx link %s: %w", path, err)
			}
			return l, nil
		}
		// The interface is gone or changed: drop the old attachment.
		l.Unpin()
		l.Close()
		old.link = nil
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: attach})
	if err != nil {
		old.Close()
		return nil, fmt.Errorf("attach tcx %s to ifindex %d: %w", filepath.Base(path), ifindex, err)
	}
	if old.prog != nil {
		// A classic filter of an earlier run: tcx runs before it, so the new
		// program is in charge already; remove the filter now.
		err := d.removeClassic(path, old.prog)
		old.Close()
		if err != nil {
			l.Close()
			return nil, err
		}
	}
	if err := l.Pin(path); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin tcx link %s: %w", path, err)
	}
	return l, nil
}

// attachClassic makes a direct-action cls_bpf filter on ifindex's dir run
// prog, replacing ours in place when there is one, and pins prog at path.
func (d *Datapath) attachClassic(path, name string, ifindex int, prog *ebpf.Program, dir direction) (attachment, error) {
	old, err := loadPin(path)
	if err != nil {
		return nil, err
	}
	defer old.Close()
	var oldID uint32
	moved := false
	if old.prog != nil {
		if oldID, err = progID(old.prog); err != nil {
			return nil, err
		}
		ours, _, err := d.tc.filters(ifindex, dir)
		if err != nil {
			return nil, err
		}
		moved = len(ours) == 0 || ours[0].ProgID != oldID
	}
	if _, err := d.tc.ensureClsact(ifindex); err != nil {
		return nil, err
	}
	if err := d.tc.replaceFilter(ifindex, dir, prog.FD(), name); err != nil {
		return nil, err
	}
	switch {
	case old.link != nil:
		// A tcx link of an earlier run runs first: detach it now that the
		// filter is in place.
		if err := old.link.Unpin(); err != nil {
			return nil, fmt.Errorf("unpin tcx link %s: %w", path, err)
		}
	case moved:
		// The old program ran elsewhere (the uplink moved) or nowhere any
		// more (the interface is gone): remove any filter still running it.
		if err := d.tc.removeFilters(map[uint32]bool{oldID: true}); err != nil {
			return nil, err
		}
	}
	if err := pinProgram(prog, path); err != nil {
		return nil, err
	}
	return tcAttachment{tcFilter{Ifindex: ifindex, Dir: dir, Name: tcFilterNamePrefix + name}}, nil
}

// pinProgram pins prog at path, replacing what is there atomically. It
// pins a duplicate handle: Program.Pin on a handle pinned elsewhere would
// move that pin (host routing's one program is pinned once per veth).
func pinProgram(prog *ebpf.Program, path string) error {
	dup, err := prog.Clone()
	if err != nil {
		return fmt.Errorf("pin program %s: %w", path, err)
	}
	defer dup.Close()
	tmp := path + "_new" // bpffs names take no dots
	if err := unix.Unlink(tmp); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %s: %w", tmp, err)
	}
	if err := dup.Pin(tmp); err != nil {
		return fmt.Errorf("pin program %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("pin program %s: %w", path, err)
	}
	return nil
}

// removeClassic deletes the filters running prog (recorded at path) and
// the pin.
func (d *Datapath) removeClassic(path string, prog *ebpf.Program) error {
	id, err := progID(prog)
	if err != nil {
		return err
	}
	if err := d.tc.removeFilters(map[uint32]bool{id: true}); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unpin program %s: %w", path, err)
	}
	return nil
}

// HaveClassicTC reports whether the kernel attaches programs with classic
// tc (sch_clsact and cls_bpf): nil when it does. The probe runs on the
// loopback device of a network namespace of its own, which dies with the
// probing thread. Without CAP_SYS_ADMIN for that namespace it runs on the
// loopback device of the process's network namespace instead (not that of
// a caller locked into another one: the probe runs on a thread of its own)
// and removes what it added (the probe program passes every packet).
func HaveClassicTC() error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread() // still in the caller's namespace
			if errors.Is(err, unix.EPERM) {
				errc <- probeClassicTC(true)
				return
			}
			errc <- fmt.Errorf("network namespace for the probe: %w", err)
			return
		}
		// Never unlocked: the thread leaves with its namespace.
		errc <- probeClassicTC(false)
	}()
	return <-errc
}

func probeClassicTC(tidy bool) error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "Dual BSD/GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("load a probe program: %w", err)
	}
	defer prog.Close()
	tc, err := dialTC()
	if err != nil {
		return err
	}
	defer tc.Close()
	const lo = 1 // the loopback device is ifindex 1 in every namespace
	created, err := tc.ensureClsact(lo)
	if err != nil {
		return err
	}
	if tidy && created {
		defer tc.deleteClsact(lo)
	}
	// A handle of its own, so that a tidy probe never touches a filter of
	// ours that a datapath keeps on lo.
	if err := tc.addFilter(lo, ingress, prog.FD(), "probe", tcProbeHandle); err != nil {
		return err
	}
	if tidy {
		return tc.deleteFilterHandle(lo, ingress, tcProbeHandle)
	}
	return nil
}
