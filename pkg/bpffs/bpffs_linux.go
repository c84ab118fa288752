// Package bpffs makes sure Sinabro's pin roots live on a mounted bpffs.
package bpffs

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// LockFile serialises mounting bpffs. It lives in the agent's default
// state directory, on the host (a hostPath in the DaemonSet), so every
// agent on the kernel takes the same lock — /tmp is private to each
// container and writable by anyone. It is not each agent's --state-dir:
// agents sharing a kernel (the lab) have distinct ones.
const LockFile = "/var/lib/sinabro/bpffs.lock"

// Ensure makes sure root will be on a bpffs, mounting /sys/fs/bpf when
// it is not mounted yet (it is not at boot on our hosts). Agents starting
// together (the lab) serialise on LockFile so none stacks a second bpffs
// over pins another has just made.
// It then creates dirs (pin directories under root).
func Ensure(root string, dirs ...string) error {
	if err := ensureMounted(root, LockFile); err != nil {
		return err
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("create pin dir %s: %w", d, err)
		}
	}
	return nil
}

func ensureMounted(root, lockFile string) error {
	if On(root) {
		return nil
	}
	const sysBPF = "/sys/fs/bpf"
	rel, err := filepath.Rel(sysBPF, root)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return fmt.Errorf("bpf root %s is not on a bpffs", root)
	}
	if err := os.MkdirAll(filepath.Dir(lockFile), 0o700); err != nil {
		return fmt.Errorf("create bpffs mount lock dir: %w", err)
	}
	lock, err := os.OpenFile(lockFile, os.O_CREATE|os.O_RDWR|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("open bpffs mount lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock bpffs mount: %w", err)
	}
	if On(root) {
		return nil
	}
	if err := os.MkdirAll(sysBPF, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", sysBPF, err)
	}
	if err := unix.Mount("bpf", sysBPF, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", sysBPF, err)
	}
	return nil
}

// On reports whether path, or its closest existing ancestor, is on a
// bpffs.
func On(path string) bool {
	for {
		var st unix.Statfs_t
		if err := unix.Statfs(path, &st); err == nil {
			return st.Type == unix.BPF_FS_MAGIC
		}
		parent := filepath.Dir(path)
		if parent == path {
			return false
		}
		path = parent
	}
}
