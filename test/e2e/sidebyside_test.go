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

// TestLabsSideBySide runs two labs of different names and dirs at once
// (1 node × 1 pod each, no kube-proxy, to stay quick): both pass `lab
// check`, each through its own admin proxy port, and a third lab of the
// first one's name is refused. The second then crashes
// (supervisor killed, lab.json gone) and `lab down --name` removes all of it
// and nothing of the first, which still passes its check.
func TestLabsSideBySide(t *testing.T) {
	a, _ := newNamedLab(t, labName, 1, 1, lab.KubeProxyNone)
	b, _ := newNamedLab(t, labName+"b", 1, 1, lab.KubeProxyNone)

	ca, cb := loadLabConfig(t, a), loadLabConfig(t, b)
	if ca.ProxyAddr == cb.ProxyAddr || ca.BPFRoot == cb.BPFRoot || ca.CgroupPath == cb.CgroupPath {
		t.Errorf("labs share a global name: proxy %s/%s, bpffs %s/%s, cgroup %s/%s",
			ca.ProxyAddr, cb.ProxyAddr, ca.BPFRoot, cb.BPFRoot, ca.CgroupPath, cb.CgroupPath)
	}
	a.mustSinabro(t, "check")
	b.mustSinabro(t, "check")
	// Only a lab of the same name is in the way.
	// (Under /var/lib, where lab dirs must be, so the name is what refuses it.)
	dupBase, err := os.MkdirTemp("/var/lib", "sinabro-e2e-dup-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dupBase) })
	dup := &testLab{t: t, dir: filepath.Join(dupBase, "lab"), name: a.name}
	if out, err := dup.sinabro("up", "--name", a.name, "--kube-bin-dir", kubeBinDir, "--nodes", "1"); err == nil || !strings.Contains(out, "named "+a.name) {
		t.Errorf("a second lab named %s started or failed for another reason (%v):\n%s", a.name, err, out)
	}
	for _, l := range []*testLab{a, b} {
		if out := l.mustSinabro(t, "status"); !strings.Contains(out, lab.NetnsPrefix(l.name)+"node-1") {
			t.Errorf("lab %s status does not show its node namespace %s:\n%s", l.name, lab.NetnsPrefix(l.name)+"node-1", out)
		}
	}

	// Crash b: what `lab down` must find then comes from --name alone.
	pid := readPid(t, filepath.Join(b.dir, "supervisor.pid"))
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(b.dir, "lab.json")); err != nil {
		t.Fatal(err)
	}
	t.Logf("lab %s down after a crash:\n%s", b.name, b.mustSinabro(t, "down"))
	assertClean(t, b.dir, b.name)

	for _, p := range []string{filepath.Join("/run/netns", lab.NetnsPrefix(a.name)+"node-1"), ca.BPFRoot, ca.CgroupPath} {
		if !exists(p) {
			t.Errorf("%s of lab %s went with lab %s", p, a.name, b.name)
		}
	}
	a.mustSinabro(t, "check")
}

func loadLabConfig(t *testing.T, l *testLab) *lab.Config {
	t.Helper()
	cfg, err := lab.LoadConfig(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}
