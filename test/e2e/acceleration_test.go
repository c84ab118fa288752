//go:build linux

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sinabro-io/sinabro/internal/tcpload"
	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/sockmap"
)

// TestTCPAcceleration proves same-node TCP acceleration on a real lab
// (2 nodes × 2 pods, node-1's agent owning the programs): same-node
// exchanges give byte-identical results accelerated and not (the pods
// opted out), a Go io.Copy echo server works in a pod that opted out (the
// kernel's splice reads do not see redirected data), cross-node and
// external flows are never redirected, and accelerated connections
// survive the agent's SIGKILL without losing a byte.
func TestTCPAcceleration(t *testing.T) {
	l, _ := newLab(t, 2, 2)
	a := newAccelLab(t, l)
	client, server := a.pods["node-1-pod-1"], a.pods["node-1-pod-2"]
	a.startServer(t, server)

	scenarios := []string{
		"pingpong:1000:100:b",       // small request/response
		"pingpong:100:65536:b",      // 64 KiB messages
		"stream:1048576:16384:b",    // 1 MiB echoed, half-close
		"stream:1048576:1024:b",     // the same in 1 KiB writes
		"sink:1073741824:65536",     // 1 GiB one way (falls back to TCP past the window)
		"http:1048576",              // HTTP GET of 1 MiB
		"stream:104857600:131072:b", // 100 MiB echoed, both ways at once
		"pingpong:200:10:b",         // tiny messages after the bulk ones
	}
	for _, mode := range []struct {
		name  string
		accel bool
	}{{"accelerated", true}, {"opted out", false}} {
		t.Run(mode.name, func(t *testing.T) {
			if !mode.accel {
				a.optOut(t, client, server)
				defer a.optIn(t, client, server)
			}
			for _, sc := range scenarios {
				redirected, r := a.run(t, client, server.ip, sc)
				t.Logf("%s: sent %d received %d, %d bytes redirected", sc, r.Sent, r.Received, redirected)
				if mode.accel && redirected == 0 {
					t.Errorf("%s: nothing redirected between accelerated pods", sc)
				}
				if !mode.accel && redirected != 0 {
					t.Errorf("%s: %d bytes redirected for pods that opted out", sc, redirected)
				}
			}
		})
	}

	t.Run("io.Copy echo server in a pod that opted out", func(t *testing.T) {
		a.optOut(t, server)
		defer a.optIn(t, server)
		for _, sc := range []string{"stream:1048576:16384:e", "stream:33554432:131072:e"} {
			redirected, r := a.run(t, client, server.ip, sc)
			t.Logf("%s: sent %d received %d", sc, r.Sent, r.Received)
			if redirected != 0 {
				t.Errorf("%s: %d bytes redirected to a pod that opted out", sc, redirected)
			}
		}
	})

	t.Run("through a ClusterIP whose backend is on the same node", func(t *testing.T) {
		// The socket load balancer picks the backend at connect(), so
		// sock_ops sees two local pods and the connection is accelerated.
		// (svc-<pod> is the lab's ClusterIP Service of one pod.)
		svc, err := a.cs.Services("default").Get(context.Background(), "svc-"+server.name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		port := 0
		for _, p := range svc.Spec.Ports {
			if p.Protocol == corev1.ProtocolTCP {
				port = int(p.Port)
			}
		}
		before := a.stats(t)
		a.exchange(t, client, net.JoinHostPort(svc.Spec.ClusterIP, strconv.Itoa(port)), 200)
		after := a.stats(t)
		if d := after.Message("redirect").Count - before.Message("redirect").Count; d < 200 {
			t.Errorf("%d messages redirected over a ClusterIP connection to a same-node pod, want at least 200", d)
		}
	})

	t.Run("cross-node and external flows are not redirected", func(t *testing.T) {
		before := a.stats(t)
		for _, to := range []string{a.pods["node-2-pod-1"].ip, a.external} {
			a.exchange(t, client, net.JoinHostPort(to, strconv.Itoa(lab.ServeTCPPort)), 200)
		}
		after := a.stats(t)
		if d := after.Message("redirect").Count - before.Message("redirect").Count; d != 0 {
			t.Errorf("%d messages redirected for cross-node/external flows", d)
		}
		if d := after.Sockets["skipped"].Count - before.Sockets["skipped"].Count; d < 2 {
			t.Errorf("sock_ops skipped %d sockets, want the 2 client sockets (not between local pods)", d)
		}
	})

	t.Run("a NetworkPolicy change takes connections off acceleration", func(t *testing.T) {
		// A policy that newly isolates the server (allowing the client)
		// may deny existing flows: the agent moves the sockmap's policy
		// epoch, and the accelerated connection goes on over TCP, through
		// tc where policy is decided, without losing a byte.
		cmd, out := a.clientCmd(t, client, server.ip, "pingpong-for:5:1024:b")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond)
		before := a.stats(t)
		pol := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "isolate-server", Namespace: "default"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"lab.sinabro.io/pod": server.name}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
					PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"lab.sinabro.io/pod": client.name}},
				}}}},
			},
		}
		if _, err := a.cs.NetworkPolicies("default").Create(context.Background(), pol, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		defer a.cs.NetworkPolicies("default").Delete(context.Background(), pol.Name, metav1.DeleteOptions{})
		cmd.Wait()
		if r := parseResult(t, out.String()); !r.OK {
			t.Errorf("connection across the policy change: %s", r.Err)
		}
		after := a.stats(t)
		if d := after.Message("fallback_policy").Count - before.Message("fallback_policy").Count; d == 0 {
			t.Error("the policy change did not take the accelerated connection off acceleration (no fallback_policy)")
		}
	})

	t.Run("agent kill -9 during accelerated traffic", func(t *testing.T) {
		before := a.stats(t)
		var procs []*exec.Cmd
		var outs []*strings.Builder
		for _, sc := range []string{"pingpong-for:8:1024:b", "pingpong-for:8:65536:b"} {
			cmd, out := a.clientCmd(t, client, server.ip, sc)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			procs, outs = append(procs, cmd), append(outs, out)
		}
		time.Sleep(2 * time.Second)
		(&datapathLab{l: l, node: "node-1"}).killAgent(t)
		for i, cmd := range procs {
			cmd.Wait()
			r := parseResult(t, outs[i].String())
			if !r.OK {
				t.Errorf("connection %d across the agent's SIGKILL: %s", i, r.Err)
			}
			t.Logf("connection %d: %d bytes each way, every reply identical", i, r.Sent)
		}
		if d := a.stats(t).Message("redirect").Count - before.Message("redirect").Count; d == 0 {
			t.Errorf("nothing redirected during the exchanges")
		}
	})
}

// accelLab is a lab's node-1 as the acceleration test sees it.
type accelLab struct {
	l        *testLab
	cs       *kube.Client
	cfg      *lab.Config
	root     string // node-1's bpffs root
	pods     map[string]labPod
	external string // the external host's address
}

type labPod struct{ name, node, ip, netns string }

func newAccelLab(t *testing.T, l *testLab) *accelLab {
	t.Helper()
	cs, cfg, ext := labBasics(t, l)
	a := &accelLab{l: l, cs: cs, cfg: cfg, root: filepath.Join(cfg.BPFRoot, "node-1"), pods: map[string]labPod{},
		external: ext.String()}
	for _, name := range []string{"node-1-pod-1", "node-1-pod-2", "node-2-pod-1"} {
		p, err := cs.Pods("default").Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.PodIP == "" {
			t.Fatalf("%s has no IP", name)
		}
		a.pods[name] = labPod{name: name, node: p.Spec.NodeName, ip: p.Status.PodIP, netns: lab.PodNetnsOf(labName, string(p.UID))}
	}
	return a
}

// inPod makes cmd start in the pod's netns (ip netns exec) and its node's
// pod cgroup, where the agent attached sock_ops.
func (a *accelLab) inPod(t *testing.T, p labPod, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", p.netns}, args...)...)
	if cg := a.cfg.NodePodCgroup(p.node); cg != "" {
		f, err := os.Open(cg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	}
	return cmd
}

// startServer runs the workload server in pod p until the test ends.
func (a *accelLab) startServer(t *testing.T, p labPod) {
	t.Helper()
	cmd := a.inPod(t, p, os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=server", "SINABRO_E2E_ADDR="+p.ip)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		ready <- strings.TrimSpace(line)
	}()
	select {
	case line := <-ready:
		if line != "ready" {
			t.Fatalf("workload server in %s: %q", p.name, line)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("workload server in %s not ready", p.name)
	}
}

func (a *accelLab) clientCmd(t *testing.T, p labPod, to, scenario string) (*exec.Cmd, *strings.Builder) {
	cmd := a.inPod(t, p, os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=client", "SINABRO_E2E_ADDR="+to, "SINABRO_E2E_SCENARIO="+scenario)
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	return cmd, out
}

// run runs one client scenario from pod p to the server at address to and
// fails t unless the bytes came back right; it returns the bytes node-1's
// programs redirected meanwhile.
func (a *accelLab) run(t *testing.T, p labPod, to, scenario string) (uint64, tcpload.Result) {
	t.Helper()
	before := a.stats(t)
	cmd, out := a.clientCmd(t, p, to, scenario)
	cmd.Run()
	r := parseResult(t, out.String())
	if !r.OK {
		t.Errorf("%s: %s", scenario, r.Err)
	}
	return a.stats(t).Message("redirect").Bytes - before.Message("redirect").Bytes, r
}

func parseResult(t *testing.T, out string) tcpload.Result {
	t.Helper()
	var r tcpload.Result
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil {
		r.Err = fmt.Sprintf("no result from the client: %v\n%s", err, out)
	}
	return r
}

// exchange runs `sinabro lab exchange` (line request/response with a lab
// test server) from pod p.
func (a *accelLab) exchange(t *testing.T, p labPod, to string, count int) {
	t.Helper()
	cmd := a.inPod(t, p, binary, "lab", "exchange", "--to", to, "--count", strconv.Itoa(count))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("exchange with %s: %v\n%s", to, err, out)
	}
}

func (a *accelLab) stats(t *testing.T) sockmap.Stats {
	t.Helper()
	s, err := sockmap.ListStats(a.root)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// optOut annotates pods out of acceleration and waits until a connection
// between the first two (or to the first, from node-1-pod-1) is no longer
// redirected; optIn undoes it.
func (a *accelLab) optOut(t *testing.T, pods ...labPod) {
	t.Helper()
	a.annotate(t, `"false"`, pods...)
	waitFor(t, 15*time.Second, "pods left out of acceleration", func() (bool, string) {
		d, r := a.probe(t, pods[len(pods)-1])
		return d == 0 && r.OK, fmt.Sprintf("%d bytes redirected", d)
	})
}

func (a *accelLab) optIn(t *testing.T, pods ...labPod) {
	t.Helper()
	a.annotate(t, "null", pods...)
	waitFor(t, 15*time.Second, "pods accelerated again", func() (bool, string) {
		d, r := a.probe(t, pods[len(pods)-1])
		return d > 0 && r.OK, fmt.Sprintf("%d bytes redirected", d)
	})
}

// probe exchanges a few messages from node-1-pod-1 with the workload
// server in pod to (which must be node-1-pod-2).
func (a *accelLab) probe(t *testing.T, to labPod) (uint64, tcpload.Result) {
	before := a.stats(t)
	cmd, out := a.clientCmd(t, a.pods["node-1-pod-1"], to.ip, "pingpong:10:10:b")
	cmd.Run()
	return a.stats(t).Message("redirect").Bytes - before.Message("redirect").Bytes, parseResult(t, out.String())
}

func (a *accelLab) annotate(t *testing.T, value string, pods ...labPod) {
	t.Helper()
	body := fmt.Sprintf(`{"metadata":{"annotations":{"sinabro.io/tcp-acceleration":%s}}}`, value)
	for _, p := range pods {
		if _, err := a.cs.Pods("default").Patch(context.Background(), p.name, types.MergePatchType, []byte(body), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}
