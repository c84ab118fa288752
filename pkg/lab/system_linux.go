package lab

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"golang.org/x/sys/unix"
)

const (
	cgroupName = "sinabro-lab"
	bpffsMount = "/sys/fs/bpf"
)

// joinCgroup moves the calling process into the cgroup of the lab named
// name; children
// inherit it, so `lab down` can kill every lab process through cgroup.kill
// even after the supervisor itself was killed.
func joinCgroup(name string) (string, error) {
	mnt, err := cgroup.V2Mount()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(mnt, CgroupNameFor(name))
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return "", fmt.Errorf("join cgroup %s: %w", dir, err)
	}
	return dir, nil
}

// killCgroup kills every process of the lab cgroup (dir, or the one of the
// lab named name when dir is "") and removes it. It returns how many
// processes it found there.
func killCgroup(dir, name string) (int, error) {
	if dir == "" {
		mnt, err := cgroup.V2Mount()
		if err != nil {
			return 0, nil
		}
		dir = filepath.Join(mnt, CgroupNameFor(name))
	}
	if !fileExists(dir) {
		return 0, nil
	}
	n := len(cgroupPids(dir))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0o644); err != nil {
		// Kernels before 5.14 have no cgroup.kill: signal each member.
		for _, pid := range cgroupPids(dir) {
			unix.Kill(pid, unix.SIGKILL)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for populated(dir) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	// Sub-cgroups (node-<name>/pods, and any an agent made) go first,
	// deepest first.
	var subs []string
	filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && path != dir {
			subs = append(subs, path)
		}
		return nil
	})
	for i := len(subs) - 1; i >= 0; i-- {
		unix.Rmdir(subs[i])
	}
	for time.Now().Before(deadline) {
		if err := unix.Rmdir(dir); err == nil || errors.Is(err, unix.ENOENT) {
			return n, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return n, fmt.Errorf("remove cgroup %s: still busy", dir)
}

// populated reports whether a process is left in dir or below it.
func populated(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return len(cgroupPids(dir)) > 0
	}
	return strings.Contains(string(b), "populated 1")
}

func cgroupPids(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// ensureBPFFS mounts bpffs at /sys/fs/bpf unless it is mounted already; the
// agents pin their maps and links below it.
func ensureBPFFS() error {
	var st unix.Statfs_t
	if err := unix.Statfs(bpffsMount, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(bpffsMount, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("bpf", bpffsMount, "bpf", 0, ""); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", bpffsMount, err)
	}
	return nil
}
