//go:build linux

package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/sinabro-io/sinabro/pkg/lab"
)

// TestRealNodesDownAfterCrash brings up one real node (kubelet + containerd,
// the sinabro DaemonSet, a test pod), kills the lab's supervisor with
// SIGKILL and removes lab.json, as a crash would leave it, then runs `lab
// down --name`: every container, shim, containerd and kubelet goes, and so
// do the node's cgroups, mount namespace (with the pods' network
// namespaces and overlay mounts inside) and dirs (assertClean, at cleanup).
func TestRealNodesDownAfterCrash(t *testing.T) {
	l, _ := newNamedLab(t, randomLabName("sbreal"), 1, 1, lab.KubeProxyNFTables, "--runtime="+lab.RuntimeContainerd, "--timeout=15m")
	if out := l.mustSinabro(t, "check"); !strings.Contains(out, "probes ok") {
		t.Fatalf("lab check:\n%s", out)
	}
	cgroups, _ := filepath.Glob("/sys/fs/cgroup/*/" + l.name + "-node-1")
	if len(cgroups) == 0 {
		t.Fatal("no node cgroups: the test would prove nothing")
	}
	pid := readPid(t, filepath.Join(l.dir, "supervisor.pid"))
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(l.dir, "lab.json")); err != nil {
		t.Fatal(err)
	}
	t.Logf("lab down after a crash:\n%s", l.mustSinabro(t, "down"))
	assertClean(t, l.dir, l.name)
}
