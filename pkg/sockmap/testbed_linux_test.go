package sockmap

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/rlimit"
	"github.com/sinabro-io/sinabro/internal/tcpload"
)

// The testbed wires a node like the CNI does: a node netns, pod netns with
// eth0 (IP/32, default via 169.254.1.1 whose neighbour is the host veth),
// a /32 route per pod on the node via its host veth, and a cgroup v2 for
// the node's pod processes. Pod processes are re-execs of the test binary
// (TestMain dispatches on SOCKMAP_HELPER), started inside the pod netns
// (ip netns exec) and directly in the cgroup (CLONE_INTO_CGROUP), so every
// socket they open is seen by sock_ops.

const cgroupRoot = "/sys/fs/cgroup/unified"

type pod struct {
	name string // netns
	host string // host veth in the node netns
	ip   netip.Addr
}

type testbed struct {
	t      testing.TB
	node   string
	pods   map[string]*pod
	cgroup string
	root   string // bpffs root
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (netns, cgroups, BPF)")
	}
	for _, bin := range []string{"ip"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s: %v", bin, err)
		}
	}
	if _, err := os.Stat(filepath.Join(cgroupRoot, "cgroup.procs")); err != nil {
		t.Skipf("needs cgroup v2 at %s: %v", cgroupRoot, err)
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Skipf("remove memlock rlimit: %v", err)
	}
}

func run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newTestbed creates the node and pods name→IP (all under the node's
// cgroup; which of them count as local pods is the test's choice).
func newTestbed(t testing.TB, pods map[string]string) *testbed {
	t.Helper()
	requireRoot(t)
	id := fmt.Sprintf("sbsm%d", os.Getpid()%100000)
	tb := &testbed{
		t:      t,
		node:   id + "-node",
		pods:   map[string]*pod{},
		cgroup: filepath.Join(cgroupRoot, id+"-"+strings.ReplaceAll(t.Name(), "/", "_")),
		root:   filepath.Join("/sys/fs/bpf", id+"-"+strings.ReplaceAll(t.Name(), "/", "_")),
	}
	t.Cleanup(tb.close)
	run(t, "ip", "netns", "add", tb.node)
	run(t, "ip", "-n", tb.node, "link", "set", "lo", "up")
	run(t, "ip", "netns", "exec", tb.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	i := 0
	for name, ip := range pods {
		p := &pod{name: id + "-" + name, host: fmt.Sprintf("sbsm%x", i), ip: netip.MustParseAddr(ip)}
		i++
		tb.pods[name] = p
		run(t, "ip", "netns", "add", p.name)
		run(t, "ip", "-n", tb.node, "link", "add", p.host, "type", "veth", "peer", "name", "eth0", "netns", p.name)
		run(t, "ip", "-n", tb.node, "link", "set", p.host, "up")
		run(t, "ip", "-n", p.name, "link", "set", "lo", "up")
		run(t, "ip", "-n", p.name, "link", "set", "eth0", "up")
		run(t, "ip", "-n", p.name, "addr", "add", ip+"/32", "dev", "eth0")
		run(t, "ip", "-n", p.name, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
		run(t, "ip", "-n", p.name, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")
		mac := linkMAC(t, tb.node, p.host)
		run(t, "ip", "-n", p.name, "neigh", "add", "169.254.1.1", "lladdr", mac, "dev", "eth0", "nud", "permanent")
		run(t, "ip", "-n", tb.node, "route", "add", ip+"/32", "dev", p.host)
		// Static neighbours both ways: the node netns has no address
		// to ARP from.
		podMAC := linkMAC(t, p.name, "eth0")
		run(t, "ip", "-n", tb.node, "neigh", "add", ip, "lladdr", podMAC, "dev", p.host, "nud", "permanent")
	}
	if err := os.Mkdir(tb.cgroup, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	return tb
}

func linkMAC(t testing.TB, ns, dev string) string {
	var links []struct {
		Address string `json:"address"`
	}
	out := run(t, "ip", "-n", ns, "-j", "link", "show", dev)
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		t.Fatalf("parse link %s in %s: %v: %s", dev, ns, err, out)
	}
	return links[0].Address
}

// vethPackets returns the packets received plus sent by a pod's host veth.
func (tb *testbed) vethPackets(name string) uint64 {
	var links []struct {
		Stats struct {
			RX struct{ Packets uint64 } `json:"rx"`
			TX struct{ Packets uint64 } `json:"tx"`
		} `json:"stats64"`
	}
	out := run(tb.t, "ip", "-n", tb.node, "-s", "-j", "link", "show", tb.pods[name].host)
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		tb.t.Fatalf("parse stats: %v: %s", err, out)
	}
	return links[0].Stats.RX.Packets + links[0].Stats.TX.Packets
}

func (tb *testbed) close() {
	// Helpers were stopped by their own cleanups (registered later, run
	// earlier). Errors here are reported but must not stop the rest.
	if err := Cleanup(tb.root); err != nil {
		tb.t.Errorf("cleanup bpf root: %v", err)
	}
	// Cleanup leaves the root itself (the datapath shares it).
	if err := os.Remove(tb.root); err != nil && !errors.Is(err, os.ErrNotExist) {
		tb.t.Errorf("remove bpf root: %v", err)
	}
	for _, p := range tb.pods {
		exec.Command("ip", "netns", "del", p.name).Run()
	}
	exec.Command("ip", "netns", "del", tb.node).Run()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(tb.cgroup)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			tb.t.Errorf("remove cgroup %s: %v", tb.cgroup, err)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// enable turns acceleration on for the local pods named (by IP /32).
func (tb *testbed) enable(cfg Config, local ...string) *Accelerator {
	tb.t.Helper()
	cfg.BPFRoot, cfg.CgroupPath = tb.root, tb.cgroup
	for _, name := range local {
		cfg.PodPrefixes = append(cfg.PodPrefixes, netip.PrefixFrom(tb.pods[name].ip, 32))
	}
	a, err := Enable(context.Background(), cfg)
	if err != nil {
		tb.t.Fatalf("enable: %v", err)
	}
	tb.t.Cleanup(func() { a.Close() })
	return a
}

// proc is a helper process in a pod.
type proc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *bufio.Reader
	stderr *strings.Builder
}

// start runs the test binary as helper kind in the pod, inside the cgroup
// (inCgroup false leaves it in the test's cgroup: a "host" process).
func (tb *testbed) start(podName string, inCgroup bool, env ...string) *proc {
	tb.t.Helper()
	exe, err := os.Executable()
	if err != nil {
		tb.t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", tb.pods[podName].name, exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	if inCgroup {
		cg, err := os.Open(tb.cgroup)
		if err != nil {
			tb.t.Fatal(err)
		}
		defer cg.Close()
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	}
	p := &proc{cmd: cmd, stderr: &strings.Builder{}}
	cmd.Stderr = p.stderr
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		tb.t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.t.Fatal(err)
	}
	p.stdout = bufio.NewReader(out)
	if err := cmd.Start(); err != nil {
		tb.t.Fatalf("start helper in %s: %v", podName, err)
	}
	tb.t.Cleanup(func() {
		p.stdin.Close() // helpers exit when stdin closes
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	return p
}

// line reads the helper's next stdout line, failing after timeout.
func (p *proc) line(t testing.TB, timeout time.Duration) string {
	t.Helper()
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		s, err := p.stdout.ReadString('\n')
		ch <- res{s, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("helper output: %v (stderr: %s)", r.err, p.stderr.String())
		}
		return strings.TrimSpace(r.s)
	case <-time.After(timeout):
		p.cmd.Process.Kill()
		t.Fatalf("helper gave no answer within %v (stderr: %s)", timeout, p.stderr.String())
		return ""
	}
}

// server starts the test server in a pod and waits until it listens.
func (tb *testbed) server(podName string) {
	tb.t.Helper()
	p := tb.start(podName, true, "SOCKMAP_HELPER=server", "SOCKMAP_ADDR="+tb.pods[podName].ip.String()+":7000")
	if got := p.line(tb.t, 10*time.Second); got != "ready" {
		tb.t.Fatalf("server: %q", got)
	}
}

// client runs one client scenario (see helper_linux_test.go) from a pod
// against a pod's test server and returns its tcpload.Result line.
func (tb *testbed) client(from, to, scenario string, timeout time.Duration, env ...string) tcpload.Result {
	tb.t.Helper()
	p := tb.start(from, true, append(env, "SOCKMAP_HELPER=client", "SOCKMAP_ADDR="+tb.pods[to].ip.String()+":7000", "SOCKMAP_SCENARIO="+scenario)...)
	var r tcpload.Result
	line := p.line(tb.t, timeout)
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		tb.t.Fatalf("client %s: %v: %q (stderr: %s)", scenario, err, line, p.stderr.String())
	}
	return r
}
