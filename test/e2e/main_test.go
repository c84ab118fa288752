//go:build linux

// Package e2e drives the built sinabro executable through `sinabro lab`: a
// real control plane, nodes running the agent and CNI plugin, and pods, all
// in network namespaces. It needs root and the control-plane binaries of
// scripts/build-kube.sh (or $SINABRO_KUBE_BIN_DIR); it skips without them.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sinabro-io/sinabro/pkg/lab"
)

var (
	binary     string // the sinabro executable under test
	kubeBinDir string
	skipReason string
	// labName names this run's labs (they run one after another, except in
	// TestLabsSideBySide): its own namespace prefix, bpffs root and cgroup,
	// so the suite runs beside a user's lab (named lab.DefaultName).
	labName = randomLabName("sbe2e")
)

// randomLabName is prefix followed by 4 random lowercase letters or digits.
func randomLabName(prefix string) string {
	const chars = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := []byte(prefix)
	for range 4 {
		b = append(b, chars[rand.IntN(len(chars))])
	}
	return string(b)
}

// labNetns names a network namespace of this run's lab ("node-1", "ext").
func labNetns(suffix string) string { return lab.NetnsPrefix(labName) + suffix }

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if role := os.Getenv(helperEnv); role != "" {
		return helperMain(role) // a pod process of the acceleration test
	}
	root := repoRoot()
	switch {
	case os.Geteuid() != 0:
		skipReason = "the lab needs root (network namespaces, bpffs, cgroups)"
	default:
		kubeBinDir = findKubeBins(root)
		if kubeBinDir == "" {
			skipReason = "no control-plane binaries: set SINABRO_KUBE_BIN_DIR or run scripts/build-kube.sh"
		}
	}
	if skipReason == "" {
		dir, err := os.MkdirTemp("", "sinabro-e2e-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		binary = filepath.Join(dir, "sinabro")
		cmd := exec.Command("go", "build", "-trimpath", "-o", binary, ".")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build sinabro: %v\n%s", err, out)
			return 1
		}
	}
	return m.Run()
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// findKubeBins prefers $SINABRO_KUBE_BIN_DIR, then the cache of
// scripts/build-kube.sh (only if already built: a cold build takes minutes).
func findKubeBins(root string) string {
	if d := os.Getenv("SINABRO_KUBE_BIN_DIR"); d != "" {
		if lab.CheckKubeBins(d, lab.KubeProxyNone, lab.RuntimeStandin) == nil {
			return d
		}
		return ""
	}
	script := filepath.Join(root, "scripts", "build-kube.sh")
	if os.Getenv("SINABRO_E2E_BUILD_KUBE") == "" {
		// Ask the script for its cache dir without building: it exits early
		// when cached, so run it only when the cache looks populated
		// (kube-proxy is the last binary it builds).
		matches, _ := filepath.Glob("/var/cache/sinabro/kube/*/kube-proxy")
		if len(matches) == 0 {
			return ""
		}
	}
	out, err := exec.Command(script).Output()
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	d := lines[len(lines)-1]
	if lab.CheckKubeBins(d, lab.KubeProxyNone, lab.RuntimeStandin) != nil {
		return ""
	}
	return d
}

// testLab is one lab under test, in its own dir.
type testLab struct {
	t    *testing.T
	dir  string
	name string // --name
}

// newLab brings the default lab up: kube-proxy in nftables mode, as in most
// clusters, so every `lab check` also probes Services; TestServices covers
// each kube-proxy mode.
func newLab(t *testing.T, nodes, podsPerNode int) (*testLab, time.Duration) {
	t.Helper()
	return newLabWith(t, nodes, podsPerNode, lab.DefaultKubeProxy)
}

// newLabWith brings a lab up with kube-proxy in the given mode and registers
// `lab down` as cleanup, which runs even when the test fails, after dumping
// log tails. $SINABRO_E2E_AGENT_ARGS (space-separated) adds agent flags,
// e.g. --host-routing=false to tell a datapath bug from a lab bug.
func newLabWith(t *testing.T, nodes, podsPerNode int, kubeProxy string) (*testLab, time.Duration) {
	t.Helper()
	return newNamedLab(t, labName, nodes, podsPerNode, kubeProxy)
}

// newNamedLab brings up a lab named name, in a dir of its own; extra are
// more `lab up` flags.
func newNamedLab(t *testing.T, name string, nodes, podsPerNode int, kubeProxy string, extra ...string) (*testLab, time.Duration) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	runtime := lab.RuntimeStandin
	for _, a := range extra {
		if v, ok := strings.CutPrefix(a, "--runtime="); ok {
			runtime = v
		}
	}
	if err := lab.CheckKubeBins(kubeBinDir, kubeProxy, runtime); err != nil {
		t.Fatal(err)
	}
	// Under /var/lib: the lab's node state dirs become the conflists'
	// dataDir, which the plugin confines there (cni.DataDirRoot).
	base, err := os.MkdirTemp("/var/lib", "sinabro-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) }) // after lab down
	dir := filepath.Join(base, "lab")
	l := &testLab{t: t, dir: dir, name: name}
	t.Cleanup(func() {
		if t.Failed() {
			l.dumpLogs()
		}
		if out, err := l.sinabro("down"); err != nil {
			t.Errorf("lab down: %v\n%s", err, out)
		}
		assertClean(t, dir, name)
	})
	args := []string{"up", "--name", name, "--kube-bin-dir", kubeBinDir, "--manifests", filepath.Join(repoRoot(), "manifests"),
		"--nodes", fmt.Sprint(nodes), "--pods-per-node", fmt.Sprint(podsPerNode), "--kube-proxy", kubeProxy}
	args = append(args, extra...)
	for _, a := range strings.Fields(os.Getenv("SINABRO_E2E_AGENT_ARGS")) {
		args = append(args, "--agent-arg="+a)
	}
	start := time.Now()
	out, err := l.sinabro(args...)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("lab up: %v\n%s", err, out)
	}
	t.Logf("lab %s up (%d×%d, kube-proxy %s) in %s\n%s", name, nodes, podsPerNode, kubeProxy, took.Round(100*time.Millisecond), out)
	return l, took
}

func (l *testLab) sinabro(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 16*time.Minute)
	defer cancel()
	full := append([]string{"lab", "--dir", l.dir}, args...)
	if len(args) > 0 && args[0] == "down" {
		// Once lab.json is gone, a plain `lab down` means the default
		// lab's leftovers: a user's lab, never this one.
		full = append(full, "--name", l.name)
	}
	// `lab --dir` is a persistent flag: it may come before the subcommand.
	cmd := exec.CommandContext(ctx, binary, full...)
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	return buf.String(), err
}

// mustSinabro runs a lab subcommand and fails t (the running subtest) on error.
func (l *testLab) mustSinabro(t *testing.T, args ...string) string {
	t.Helper()
	out, err := l.sinabro(args...)
	if err != nil {
		t.Fatalf("sinabro lab %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (l *testLab) dumpLogs() {
	logs, _ := filepath.Glob(filepath.Join(l.dir, "logs", "*.log"))
	for _, f := range logs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 25 {
			lines = lines[len(lines)-25:]
		}
		l.t.Logf("--- tail of %s\n%s", filepath.Base(f), strings.Join(lines, "\n"))
	}
}

// assertClean checks `lab down` left nothing of the lab named name (in dir)
// behind; other labs (a user's) may run.
func assertClean(t *testing.T, dir, name string) {
	t.Helper()
	if names, _ := filepath.Glob("/run/netns/" + lab.NetnsPrefix(name) + "*"); len(names) > 0 {
		t.Errorf("network namespaces left: %v", names)
	}
	if root := lab.BPFRootFor(name); exists(root) {
		t.Errorf("bpffs root %s left", root)
	}
	if exists(dir) {
		t.Errorf("lab dir %s left", dir)
	}
	cgroup := lab.CgroupNameFor(name)
	for _, cg := range []string{"/sys/fs/cgroup/unified/" + cgroup, "/sys/fs/cgroup/" + cgroup} {
		if exists(cg) {
			t.Errorf("cgroup %s left", cg)
		}
	}
	// Real nodes' cgroup roots, in every hierarchy.
	if left, _ := filepath.Glob("/sys/fs/cgroup/*/" + name + "-node-*"); len(left) > 0 {
		t.Errorf("node cgroups left: %v", left)
	}
	// Real nodes' mount namespaces (bound under the lab dir) and the
	// mounts made in them.
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil && strings.Contains(string(b), dir+"/") {
		t.Errorf("mounts under %s left", dir)
	}
	// Nothing of the lab may ever appear in the root namespace.
	if out, err := exec.Command("ip", "-o", "link", "show").Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			name := strings.TrimSuffix(strings.SplitN(f[1], "@", 2)[0], ":")
			if strings.HasPrefix(name, "sinabro") || strings.HasPrefix(name, "u-node-") || name == "u-cp" || name == "u-ext" || name == "u-router" {
				t.Errorf("lab link %s in the root network namespace", name)
			}
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(dir)) {
			t.Errorf("process left: %s", strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	last := ""
	for time.Since(start) < timeout {
		ok, detail := cond()
		if ok {
			return time.Since(start)
		}
		last = detail
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s (last: %s)", what, timeout, last)
	return 0
}
