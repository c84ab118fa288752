package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// UpOptions are the flags of `sinabro lab up`.
type UpOptions struct {
	Dir         string
	Name        string // "" means DefaultName
	KubeBinDir  string
	Manifests   string
	Nodes       int
	PodsPerNode int
	ClusterCIDR string
	ServiceCIDR string
	ProxyAddr   string   // "": DefaultProxyAddr for the default lab, a free loopback port for others
	KubeProxy   string   // "none", "iptables" or "nftables"
	AgentArgs   []string // extra agent flags (development)
	Runtime     string   // "standin" or "containerd"
	Containerd  string   // real nodes' containerd: "v2", "v1" or "mixed"
	Timeout     time.Duration
}

// Up creates the lab: it writes the config and PKI, starts the detached
// supervisor that brings up every component, and follows its progress.
func Up(ctx context.Context, o UpOptions, out io.Writer) error {
	start := time.Now()
	if os.Geteuid() != 0 {
		return errors.New("the lab needs root: it creates network namespaces, mounts bpffs and runs agents")
	}
	if o.Name == "" {
		o.Name = DefaultName
	}
	if err := ValidateName(o.Name); err != nil {
		return err
	}
	// Node state dirs under the lab dir become the conflists' dataDir,
	// which the CNI plugin confines to /var/lib. Checked before anything
	// is done (a previous lab in the dir would be taken down first).
	dir, _ := filepath.Abs(o.Dir)
	if rel, err := filepath.Rel(cni.DataDirRoot, dir); err != nil || rel == "." || !filepath.IsLocal(rel) {
		return fmt.Errorf("--dir %s: the lab dir must lie under %s (its nodes' IPAM state is the CNI plugin's dataDir, confined there)", dir, cni.DataDirRoot)
	}
	if o.Nodes < 1 || o.Nodes > 200 {
		return fmt.Errorf("--nodes %d: want 1..200", o.Nodes)
	}
	if _, err := netip.ParsePrefix(o.ClusterCIDR); err != nil {
		return fmt.Errorf("--cluster-cidr: %w", err)
	}
	runtime, err := ParseRuntime(o.Runtime)
	if err != nil {
		return err
	}
	if o.KubeProxy == "" {
		o.KubeProxy = DefaultKubeProxy
	}
	kubeProxy, err := ParseKubeProxyMode(o.KubeProxy)
	if err != nil {
		return err
	}
	containerd, err := ParseContainerd(o.Containerd)
	if err != nil {
		return err
	}
	if err := CheckKubeBins(o.KubeBinDir, kubeProxy, runtime); err != nil {
		return err
	}
	if pid, ok := supervisorAlive(o.Dir); ok {
		return fmt.Errorf("a lab is already running in %s (supervisor pid %d): run `sinabro lab down` first", o.Dir, pid)
	}
	if fileExists(Layout{o.Dir}.Config()) {
		fmt.Fprintf(out, "cleaning up a previous lab in %s\n", o.Dir)
		if err := Down(ctx, DownOptions{Dir: o.Dir}, io.Discard); err != nil {
			return fmt.Errorf("clean up previous lab: %w", err)
		}
	}
	// Namespace names are global: a lab of the same name from another
	// --dir would collide (labs of other names do not).
	if names, _ := filepath.Glob(filepath.Join(netns.RunDir, NetnsPrefix(o.Name)+"*")); len(names) > 0 {
		return fmt.Errorf("namespaces of another lab named %s exist (%s, …): run `sinabro lab down --dir <its dir>` first, or pick another --name", o.Name, filepath.Base(names[0]))
	}
	if o.ProxyAddr == "" {
		if o.ProxyAddr, err = defaultProxyAddr(o.Name); err != nil {
			return err
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	kubeBin, _ := filepath.Abs(o.KubeBinDir)
	cfg := &Config{
		Name: o.Name, Dir: dir, KubeBinDir: kubeBin, Executable: exe, Manifests: FindManifests(o.Manifests),
		ClusterCIDR: o.ClusterCIDR, ServiceCIDR: o.ServiceCIDR, Underlay: DefaultUnderlay,
		BPFRoot: BPFRootFor(o.Name), ProxyAddr: o.ProxyAddr, PodsPerNode: o.PodsPerNode,
		KubeProxy: kubeProxy, AgentArgs: o.AgentArgs, Runtime: runtime, Containerd: containerd,
	}
	for i := 1; i <= o.Nodes; i++ {
		cfg.Nodes = append(cfg.Nodes, nodeName(i))
	}
	l := cfg.layout()
	if err := os.MkdirAll(l.Logs(), 0o755); err != nil {
		return fmt.Errorf("create lab dir: %w", err)
	}
	if err := cfg.save(); err != nil {
		return err
	}
	fmt.Fprintf(out, "lab %s in %s: %d nodes (%s) × %d pods, cluster CIDR %s, kube-proxy %s, control plane from %s\n",
		o.Name, dir, o.Nodes, runtime, o.PodsPerNode, o.ClusterCIDR, kubeProxy, kubeBin)
	if len(o.AgentArgs) > 0 {
		fmt.Fprintf(out, "agents run with extra flags %s\n", strings.Join(o.AgentArgs, " "))
	}
	if err := cfg.writeControlPlanePKI(); err != nil {
		return fmt.Errorf("write PKI: %w", err)
	}

	if err := startSupervisor(cfg); err != nil {
		return err
	}
	if err := follow(ctx, cfg, out, start, o.Timeout); err != nil {
		return err
	}
	shell := "ip netns exec " + cfg.NodeNetns(cfg.Nodes[0]) + " bash"
	if cfg.realNodes() {
		shell = strings.Join(cfg.nsenter(cfg.Nodes[0], "bash"), " ")
	}
	fmt.Fprintf(out, "\nlab up in %.1fs\n  kubeconfig: %s   (export KUBECONFIG=%s)\n  in-lab kubeconfig: %s\n  logs: %s\n  a node's shell: %s\n  next: sinabro lab check; sinabro lab status; sinabro lab down\n",
		time.Since(start).Seconds(), l.AdminKubeconfig(), l.AdminKubeconfig(), l.InternalKubeconfig(), l.Logs(), shell)
	return nil
}

// defaultProxyAddr is where the admin kubeconfig of the lab named name
// reaches the apiserver: DefaultProxyAddr for the default lab, so its
// kubeconfig stays the same from one lab to the next; a loopback port free
// now for any other, so it runs beside the default lab.
func defaultProxyAddr(name string) (string, error) {
	if name == DefaultName {
		return DefaultProxyAddr, nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free loopback port for the api proxy: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// startSupervisor launches `sinabro lab supervise` detached (own session,
// no terminal) so it outlives `lab up`.
func startSupervisor(cfg *Config) error {
	l := cfg.layout()
	logf, err := os.OpenFile(l.Log("supervisor"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(cfg.Executable, "lab", "supervise", "--dir", cfg.Dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start supervisor: %w", err)
	}
	return cmd.Process.Release()
}

// follow prints the supervisor's progress until the lab is ready or failed.
func follow(ctx context.Context, cfg *Config, out io.Writer, t0 time.Time, timeout time.Duration) error {
	l := cfg.layout()
	seen := 0
	stepStart := time.Now()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		evs, _ := readEvents(l.Progress(), seen)
		seen += len(evs)
		for _, e := range evs {
			at := fmt.Sprintf("[%5.1fs]", e.Time.Sub(t0).Seconds())
			switch e.Kind {
			case "step":
				fmt.Fprintf(out, "%s … %s\n", at, e.Msg)
				stepStart = e.Time
			case "done":
				fmt.Fprintf(out, "%s ✓ %s\n", at, e.Msg)
			case "fail":
				fmt.Fprintf(out, "%s ✗ %s\n", at, e.Msg)
				if tail := logTail(e.Log, 10); tail != "" {
					fmt.Fprintf(out, "last lines of %s:\n%s\n", e.Log, tail)
				}
				return fmt.Errorf("lab up failed in %s; see %s (the lab is stopped; `sinabro lab down` cleans up)", e.Component, e.Log)
			case "ready":
				return nil
			}
		}
		if _, ok := supervisorAlive(cfg.Dir); !ok && seen > 0 {
			// A final event may have landed after the read above.
			if evs, _ := readEvents(l.Progress(), seen); len(evs) > 0 {
				continue
			}
			return fmt.Errorf("the lab supervisor exited; see %s", l.Log("supervisor"))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab up timed out after %s (step running for %s); see %s", timeout, time.Since(stepStart).Round(time.Second), l.Logs())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("interrupted; the lab keeps starting in the background (`sinabro lab down` stops it): %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// supervisorAlive reports the pid of the lab's supervisor if it runs.
func supervisorAlive(dir string) (int, bool) {
	b, err := os.ReadFile(Layout{dir}.SupervisorPID())
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), "supervise") {
		return 0, false
	}
	// A zombie is not alive.
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err == nil {
		if _, rest, ok := strings.Cut(string(st), ") "); ok && strings.HasPrefix(rest, "Z") {
			return 0, false
		}
	}
	return pid, true
}

var errNotRunning = errors.New("no lab supervisor is running")

// logTail returns the last n lines of a log file, indented.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}
