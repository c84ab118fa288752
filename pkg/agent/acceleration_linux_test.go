package agent

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sinabro-io/sinabro/internal/tcpload"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/netns"
	"github.com/sinabro-io/sinabro/pkg/sockmap"
)

// helperEnv makes the test binary a pod process (see accelHelper).
const helperEnv = "SINABRO_AGENT_TEST_HELPER"

func TestMain(m *testing.M) {
	if kind := os.Getenv(helperEnv); kind != "" {
		os.Exit(accelHelper(kind, os.Getenv("SINABRO_AGENT_TEST_ADDR")))
	}
	os.Exit(m.Run())
}

// accelHelper runs the internal/tcpload server (until stdin closes) or one
// client scenario, printing its result as JSON.
func accelHelper(kind, addr string) int {
	switch kind {
	case "server":
		go func() {
			io.Copy(io.Discard, os.Stdin)
			os.Exit(0)
		}()
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println("ready")
		fmt.Fprintln(os.Stderr, tcpload.Serve(ln))
		return 1
	case "client":
		b, _ := json.Marshal(tcpload.Run(addr, os.Getenv("SINABRO_AGENT_TEST_SCENARIO")))
		fmt.Println(string(b))
		return 0
	}
	fmt.Fprintf(os.Stderr, "unknown helper %q\n", kind)
	return 2
}

// accelBed is a node netns with two pods whose processes run in a cgroup
// of their own, the agent's --pod-cgroup.
type accelBed struct {
	t      *testing.T
	cgroup string
	cgFD   *os.File
	root   string // bpffs root
}

// podProc starts the test binary as a helper in pod p's netns and the bed's
// cgroup (CLONE_INTO_CGROUP), where sock_ops sees its sockets.
func (b *accelBed) podProc(ctx context.Context, p testPod, env ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", p.ns, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(b.cgFD.Fd())}
	return cmd
}

func (b *accelBed) server(p testPod, addr string) {
	t := b.t
	cmd := b.podProc(context.Background(), p, helperEnv+"=server", "SINABRO_AGENT_TEST_ADDR="+addr)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		ready <- strings.TrimSpace(line)
	}()
	select {
	case line := <-ready:
		if line != "ready" {
			t.Fatalf("server in %s: %q", p.ns, line)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("server in %s not ready", p.ns)
	}
}

// exchange runs a client scenario from pod p to addr and returns the bytes
// the acceleration programs redirected meanwhile, and the client's result.
func (b *accelBed) exchange(p testPod, addr, scenario string) (uint64, tcpload.Result) {
	b.t.Helper()
	before := b.redirected()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := b.podProc(ctx, p, helperEnv+"=client", "SINABRO_AGENT_TEST_ADDR="+addr, "SINABRO_AGENT_TEST_SCENARIO="+scenario)
	out, err := cmd.Output()
	var r tcpload.Result
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if jerr := json.Unmarshal([]byte(lines[len(lines)-1]), &r); jerr != nil {
		r.Err = fmt.Sprintf("client %s: %v, %v: %q", scenario, err, jerr, out)
	}
	return b.redirected() - before, r
}

// redirected is the redirect byte counter (0 before acceleration was ever
// enabled under the root).
func (b *accelBed) redirected() uint64 {
	s, err := sockmap.ListStats(b.root)
	if err != nil {
		return 0
	}
	return s.Message("redirect").Bytes
}

func waitUntil(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s (%s)", what, state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAgentTCPAcceleration runs the agent against a fake API server on a
// node with two pods and checks, with real connections between the pods,
// that same-node TCP acceleration is opt-in: off by default (the
// programs are not even attached, and a Go io.Copy echo server works),
// on between pods that opt in through their namespace or themselves (a
// pod's annotation wins over its namespace's), only when both ends opted
// in, detached live when the last pod opts out, and, with the node's
// --tcp-acceleration, on for all pods except those that opt out.
func TestAgentTCPAcceleration(t *testing.T) {
	if _, err := os.Stat(kernelBTF); err != nil {
		t.Skipf("needs kernel BTF: %v", err)
	}
	const cgroupRoot = "/sys/fs/cgroup/unified"
	if _, err := os.Stat(filepath.Join(cgroupRoot, "cgroup.procs")); err != nil {
		t.Skipf("needs a cgroup v2 at %s: %v", cgroupRoot, err)
	}
	nodeNS := testNS(t, "node")
	ipcmd(t, nodeNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1") // an underlay (no dummy driver here)
	ipcmd(t, nodeNS, "addr", "add", "192.168.72.1/24", "dev", "eth0")
	ipcmd(t, nodeNS, "link", "set", "eth0", "up")
	ipcmd(t, nodeNS, "link", "set", "lo", "up")
	podA := addTestPod(t, nodeNS, "pa", netip.MustParseAddr("10.244.1.5"))
	podB := addTestPod(t, nodeNS, "pb", netip.MustParseAddr("10.244.1.6"))
	id := fmt.Sprintf("%d-%s", os.Getpid(), rand.Text()[:6])
	bed := &accelBed{t: t, cgroup: filepath.Join(cgroupRoot, "sbagent-accel-"+id), root: filepath.Join("/sys/fs/bpf", "sbagent-accel-"+id)}
	if err := os.Mkdir(bed.cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	var err error
	if bed.cgFD, err = os.Open(bed.cgroup); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		bed.cgFD.Close()
		if err := errors.Join(sockmap.Cleanup(bed.root), datapath.Cleanup(bed.root)); err != nil {
			t.Errorf("cleanup %s: %v", bed.root, err)
		}
		os.Remove(bed.root)
		deadline := time.Now().Add(5 * time.Second)
		for os.Remove(bed.cgroup) != nil && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
	})
	server := netip.AddrPortFrom(podB.ip, 7000).String()
	bed.server(podB, server)

	pod := func(name string, ip netip.Addr) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
			Spec:       corev1.PodSpec{NodeName: "a"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip.String(), PodIPs: []corev1.PodIP{{IP: ip.String()}}},
		}
	}
	client := fake.NewClientset(
		testNode("a", "192.168.72.1", "10.244.1.0/24"),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "default"}},
		pod("pa", podA.ip), pod("pb", podB.ip),
	)
	ctx := context.Background()
	annotate := func(t *testing.T, kind, name, value string) {
		t.Helper()
		body := []byte(fmt.Sprintf(`{"metadata":{"annotations":{%q:%s}}}`, AnnotationTCPAcceleration, value))
		var err error
		if kind == "namespace" {
			_, err = client.CoreV1().Namespaces().Patch(ctx, name, types.MergePatchType, body, metav1.PatchOptions{})
		} else {
			_, err = client.CoreV1().Pods("default").Patch(ctx, name, types.MergePatchType, body, metav1.PatchOptions{})
		}
		if err != nil {
			t.Fatalf("annotate %s %s: %v", kind, name, err)
		}
	}
	start := func(nodeDefault bool) func() {
		t.Helper()
		cfg := Config{
			NodeName: "a", CNIConfDir: t.TempDir(), StateDir: t.TempDir(), BPFRoot: bed.root, KubeProxyReplacement: KPRFalse,
			VXLANVNI: 1, VXLANPort: 8472, VXLANDevice: "sinabro.vxlan",
			ClusterCIDRs:    []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
			TCPAcceleration: nodeDefault, PodCgroup: bed.cgroup,
			ResyncInterval: time.Second, NetNS: netns.Path(nodeNS),
		}
		log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})).With("agent", fmt.Sprintf("default-%v", nodeDefault))
		a, err := New(cfg, clientsetCluster{client}, log)
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		return runReady(t, ctx, a)
	}
	// accelerated waits until a new connection from pod a to pod b is
	// redirected (want true) or not, its bytes intact either way.
	accelerated := func(t *testing.T, what string, want bool) {
		t.Helper()
		waitUntil(t, what, func() (bool, string) {
			d, r := bed.exchange(podA, server, "pingpong:20:100:b")
			if !r.OK {
				t.Fatalf("%s: exchange failed: %s", what, r.Err)
			}
			return (d > 0) == want, fmt.Sprintf("%d bytes redirected, attached %v", d, sockmap.Attached(bed.root))
		})
	}

	wantPods := func(t *testing.T, want ...string) {
		t.Helper()
		pods, err := sockmap.ListPods(bed.root)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, p := range pods {
			got = append(got, fmt.Sprintf("%v %v", p.Prefix, p.Accelerated))
		}
		if !slices.Equal(got, want) {
			t.Errorf("pod map %q, want %q", got, want)
		}
	}

	stop := start(false)
	t.Run("off by default", func(t *testing.T) {
		// The agent has had a few resyncs to (wrongly) attach.
		time.Sleep(2 * time.Second)
		if sockmap.Attached(bed.root) {
			t.Error("programs attached while no pod opted in")
		}
		for _, sc := range []string{"pingpong:100:100:b", "stream:1048576:16384:e"} { // e: a Go io.Copy (splice) echo
			d, r := bed.exchange(podA, server, sc)
			if !r.OK {
				t.Errorf("%s between two pods by default: %s", sc, r.Err)
			}
			if d != 0 {
				t.Errorf("%s: %d bytes redirected by default", sc, d)
			}
		}
	})
	t.Run("namespace opts in", func(t *testing.T) {
		annotate(t, "namespace", "default", `"true"`)
		accelerated(t, "pods of an opted-in namespace accelerated", true)
		if !sockmap.Attached(bed.root) {
			t.Error("programs not attached")
		}
		// The pods' /32s, not the node's pod CIDR.
		wantPods(t, "10.244.1.5/32 true", "10.244.1.6/32 true")
	})
	t.Run("a pod's false wins over its namespace's true", func(t *testing.T) {
		annotate(t, "pod", "pb", `"false"`)
		accelerated(t, "pb out of acceleration", false)
	})
	t.Run("pods opt in themselves; both ends must", func(t *testing.T) {
		annotate(t, "namespace", "default", "null")
		annotate(t, "pod", "pb", `"true"`)
		annotate(t, "pod", "pa", `"true"`)
		accelerated(t, "pods that opted in accelerated", true)
		annotate(t, "pod", "pa", "null")
		accelerated(t, "pa (not opted in) to pb (opted in) not accelerated", false)
		if !sockmap.Attached(bed.root) {
			t.Error("programs detached while pb opts in")
		}
	})
	t.Run("detached live when no pod opts in", func(t *testing.T) {
		annotate(t, "pod", "pb", "null")
		waitUntil(t, "programs detached", func() (bool, string) { return !sockmap.Attached(bed.root), "attached" })
		if d, r := bed.exchange(podA, server, "pingpong:20:100:b"); !r.OK || d != 0 {
			t.Errorf("after detaching: %d bytes redirected, %+v", d, r)
		}
	})
	stop()

	stop = start(true)
	defer stop()
	t.Run("node default on", func(t *testing.T) {
		accelerated(t, "all pods accelerated with --tcp-acceleration", true)
		annotate(t, "namespace", "default", `"false"`)
		accelerated(t, "pods of an opted-out namespace not accelerated", false)
		annotate(t, "pod", "pa", `"true"`)
		annotate(t, "pod", "pb", `"true"`)
		accelerated(t, "pods opted in inside an opted-out namespace accelerated", true)
		annotate(t, "namespace", "default", "null")
		annotate(t, "pod", "pb", `"false"`)
		accelerated(t, "a pod that opts out on an accelerated node not accelerated", false)
		wantPods(t, "10.244.1.0/24 true", "10.244.1.6/32 false")
	})
}
