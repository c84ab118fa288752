package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// DownOptions are the flags of `sinabro lab down`.
type DownOptions struct {
	Dir string
	// Name is the lab's name, needed only when its dir has no lab.json any
	// more (a crash): "" means DefaultName. The name in lab.json wins; a
	// different Name is an error.
	Name     string
	KeepLogs bool
}

// Down stops the lab and removes everything it made: processes, network
// namespaces (and with them every veth, vxlan and route inside), bpffs pins
// under the lab's BPF root, the cgroup and the lab dir. It works after a
// crash too and is a no-op when nothing is left.
func Down(ctx context.Context, o DownOptions, out io.Writer) error {
	l := Layout{o.Dir}
	cfg, err := LoadConfig(o.Dir)
	if err != nil {
		name := o.Name
		if name == "" {
			name = DefaultName
		}
		if err := ValidateName(name); err != nil {
			return err
		}
		cfg = &Config{Dir: o.Dir, Name: name, BPFRoot: BPFRootFor(name)}
	} else if o.Name != "" && o.Name != cfg.LabName() {
		return fmt.Errorf("the lab in %s is named %q, not %q", o.Dir, cfg.LabName(), o.Name)
	}
	prefix := NetnsPrefix(cfg.LabName())
	var errs []error

	// 1. The supervisor stops its children in order on SIGTERM.
	if pid, ok := supervisorAlive(o.Dir); ok {
		fmt.Fprintf(out, "stopping supervisor (pid %d)\n", pid)
		syscall.Kill(pid, syscall.SIGTERM)
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			if _, ok := supervisorAlive(o.Dir); !ok {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if _, ok := supervisorAlive(o.Dir); ok {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	// 2. Whatever survived (a killed supervisor leaves orphans): the cgroup
	// holds every lab process, the pid files name them too.
	n, err := killCgroup(cfg.CgroupPath, cfg.LabName())
	if err != nil {
		errs = append(errs, err)
	}
	if n > 0 {
		fmt.Fprintf(out, "killed %d leftover processes of the lab cgroup\n", n)
	}
	if n := killPidFiles(l); n > 0 {
		fmt.Fprintf(out, "killed %d leftover processes\n", n)
	}
	// Real nodes' containers live in the nodes' cgroups, not the lab's.
	n, err = killNodeCgroups(cfg.LabName())
	if err != nil {
		errs = append(errs, err)
	}
	if n > 0 {
		fmt.Fprintf(out, "killed %d container processes of the nodes\n", n)
	}
	// With no process left in them, the nodes' mount namespaces (and every
	// mount a node made) go with their files.
	if err := releaseNodeNamespaces(l); err != nil {
		errs = append(errs, err)
	}
	removeCreatedDirs(l)
	// 3. Namespaces: pods first, so their veths go before the nodes.
	names, _ := filepath.Glob(filepath.Join(netns.RunDir, prefix+"*"))
	sort.Slice(names, func(i, j int) bool {
		return strings.Contains(names[i], "-pod-") && !strings.Contains(names[j], "-pod-")
	})
	for _, p := range names {
		if err := netns.Remove(p); err != nil {
			errs = append(errs, err)
		}
	}
	if len(names) > 0 {
		fmt.Fprintf(out, "removed %d network namespaces\n", len(names))
	}
	// Mounts of namespace files can outlive their directory entry (another
	// tool re-mounted /run/netns over them, or copies in other mount
	// namespaces): unmount what can be reached, report what cannot.
	if left := netnsMountsLeft(prefix); len(left) > 0 {
		errs = append(errs, fmt.Errorf("namespace mounts left behind (shadowed by a later mount on %s?): %s", netns.RunDir, strings.Join(left, ", ")))
	}
	// 4. bpffs pins of the agents.
	if cfg.BPFRoot != "" && strings.HasPrefix(cfg.BPFRoot, bpffsMount+"/") && fileExists(cfg.BPFRoot) {
		if err := os.RemoveAll(cfg.BPFRoot); err != nil {
			errs = append(errs, fmt.Errorf("remove bpffs root %s: %w", cfg.BPFRoot, err))
		} else {
			fmt.Fprintf(out, "removed bpffs pins under %s\n", cfg.BPFRoot)
		}
	}
	// 5. The lab dir: only what the lab writes, never an unknown file.
	if err := removeLabDir(l, o.KeepLogs); err != nil {
		errs = append(errs, err)
	}
	if cfg.BPFRoot != "" && fileExists(cfg.BPFRoot) {
		errs = append(errs, fmt.Errorf("bpffs root %s left behind", cfg.BPFRoot))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("lab down left things behind: %w", err)
	}
	fmt.Fprintln(out, "lab is down")
	return nil
}

func killPidFiles(l Layout) int {
	files, _ := filepath.Glob(filepath.Join(l.Pids(), "*.pid"))
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			continue
		}
		// Only a process that is recognisably the lab's (pid reuse).
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && (strings.Contains(string(cmdline), l.Dir) || strings.Contains(string(cmdline), "lab\x00serve")) {
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				n++
			}
		}
		os.Remove(f)
	}
	return n
}

// labEntries are the names the lab creates in its dir.
var labEntries = []string{"lab.json", "pki", "nodes", "etcd", "pids", "progress.jsonl",
	"supervisor.pid", "supervisor.sock", "admin.kubeconfig", "admin-underlay.kubeconfig",
	"kube-controller-manager.kubeconfig", "kube-proxy.kubeconfig", "kube-scheduler.kubeconfig", "ns", "created-dirs"}

func removeLabDir(l Layout, keepLogs bool) error {
	if !fileExists(l.Dir) {
		return nil
	}
	var errs []error
	entries := labEntries
	if !keepLogs {
		entries = append(entries, "logs")
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(l.Dir, e)); err != nil {
			errs = append(errs, err)
		}
	}
	if !keepLogs {
		// Only removes the dir when nothing else is in it.
		os.Remove(l.Dir)
	}
	return errors.Join(errs...)
}

// netnsMountsLeft unmounts (lazily) namespace mounts of the lab (names
// starting with prefix) still listed in this process's mount table and
// returns those it could not remove.
func netnsMountsLeft(prefix string) []string {
	var left []string
	for range 8 { // stacked mounts of one path come off one per pass
		left = left[:0]
		b, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			return nil
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 5 || !strings.HasPrefix(f[4], filepath.Join(netns.RunDir, prefix)) {
				continue
			}
			left = append(left, f[4])
		}
		if len(left) == 0 {
			return nil
		}
		progress := false
		for _, p := range left {
			if unix.Unmount(p, unix.MNT_DETACH) == nil {
				progress = true
				os.Remove(p)
			}
		}
		if !progress {
			break
		}
	}
	return left
}
