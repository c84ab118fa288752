// Package cgroup finds the cgroup v2 hierarchy, where Sinabro attaches its
// socket programs and the lab keeps its processes.
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// V2Mount returns where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup,
// or /sys/fs/cgroup/unified on hybrid systems.
func V2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root mountpoint opts ... - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields := strings.Fields(pre)
		if len(fields) >= 5 && strings.HasPrefix(post, "cgroup2 ") {
			return filepath.Clean(fields[4]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 mount")
}

// V2Dir resolves a cgroup v2 directory given on the command line: "" is the
// cgroup v2 root; a directory on cgroup2 is itself; on a hybrid host (cgroup
// v1 controllers, the v2 hierarchy on <root>/unified), a path under the
// cgroup root that is not on cgroup2 names the same path in the unified
// hierarchy — /host/sys/fs/cgroup/x is /host/sys/fs/cgroup/unified/x, so
// one DaemonSet argument serves both kinds of hosts.
func V2Dir(dir string) (string, error) {
	if dir == "" {
		return V2Mount()
	}
	dir = filepath.Clean(dir)
	if isCgroup2(dir) {
		return dir, nil
	}
	for a := dir; ; a = filepath.Dir(a) {
		if u := filepath.Join(a, "unified"); isCgroup2(u) {
			rel, err := filepath.Rel(a, dir)
			if err != nil {
				return "", err
			}
			if v2 := filepath.Join(u, rel); isCgroup2(v2) {
				return v2, nil
			}
			return "", fmt.Errorf("%s: no such cgroup v2 directory (this host is hybrid: its cgroup v2 hierarchy is %s)", dir, u)
		}
		if a == "/" || a == "." {
			return "", fmt.Errorf("%s is not a cgroup v2 directory", dir)
		}
	}
}

func isCgroup2(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// Current returns the cgroup v2 directory of this process.
func Current() (string, error) { return Of("/proc/self") }

// Of returns the cgroup v2 directory of the process whose /proc directory
// is proc ("/proc/1234").
func Of(proc string) (string, error) {
	mnt, err := V2Mount()
	if err != nil {
		return "", err
	}
	path := filepath.Join(proc, "cgroup")
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(mnt, rest), nil
		}
	}
	return "", fmt.Errorf("no cgroup v2 line in %s", path)
}

var enterMu sync.Mutex

// Enter moves this process into the cgroup v2 directory dir until leave is
// called: sockets opened meanwhile belong to dir for good (a socket's
// cgroup is fixed when it is created), so its socket programs see them.
// Calls are serialized. Tests and the lab's probes use it to open sockets
// "as" a node or pod without a process there. dir "" stays in this
// process's cgroup, only waiting for other calls to leave: a socket opened
// concurrently with another Enter would belong to that call's cgroup.
func Enter(dir string) (leave func() error, err error) {
	enterMu.Lock()
	if dir == "" {
		return func() error { enterMu.Unlock(); return nil }, nil
	}
	back, err := Current()
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644)
	}
	if err != nil {
		enterMu.Unlock()
		return nil, fmt.Errorf("enter cgroup %s: %w", dir, err)
	}
	return func() error {
		defer enterMu.Unlock()
		if err := os.WriteFile(filepath.Join(back, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
			return fmt.Errorf("return to cgroup %s: %w", back, err)
		}
		return nil
	}, nil
}
