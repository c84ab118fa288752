package bpffs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// AttachCgroup makes the cgroup link pinned at pin run prog on the cgroup
// v2 directory cgroup with attach type attach: a pinned link on the same
// cgroup is re-pointed in place (link.Update: never a moment without a
// program), one on another cgroup is detached and replaced, none is
// created and pinned.
func AttachCgroup(pin, cgroup string, prog *ebpf.Program, attach ebpf.AttachType) (link.Link, error) {
	cgID, err := cgroupID(cgroup)
	if err != nil {
		return nil, err
	}
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == cgID {
			if err := l.Update(prog); err != nil {
				l.Close()
				return nil, fmt.Errorf("update link %s: %w", pin, err)
			}
			return l, nil
		}
		l.Unpin()
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: attach, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", filepath.Base(pin), cgroup, err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin link %s: %w", pin, err)
	}
	return l, nil
}

// UnpinLink detaches the link pinned at path by removing its last
// reference; a path without a pin is not an error, and a pin that is not
// a link is removed all the same.
func UnpinLink(path string) error {
	l, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", path, rerr)
		}
		return nil
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin %s: %w", path, err)
	}
	return nil
}

// cgroupID is the id the kernel reports for a cgroup v2 directory: its
// inode number.
func cgroupID(path string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("statfs cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%s is not a cgroup v2 directory", path)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}
