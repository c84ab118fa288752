//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestLab walks one 3-node lab through the life of a cluster: the full
// connectivity matrix (every cross-node pod pair over TCP, UDP and ICMP),
// pod deletion and re-creation, an agent killed with SIGKILL, a Node
// deleted and a node added, a check after the agents' periodic resync, then
// `lab down` (in the cleanup, which also asserts nothing is left).
func TestLab(t *testing.T) {
	l, took := newLab(t, 3, 2)
	t.Logf("figure: lab up 3×2 took %s", took.Round(100*time.Millisecond))
	upAt := time.Now()
	cs, err := lab.AdminClient(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	t.Run("check", func(t *testing.T) {
		// Exit 0 means every probe passed, including the external host
		// seeing each pod's node address (masquerade).
		out := l.mustSinabro(t, "check")
		t.Log(out)
		// Every cross-node pod pair: 6 pods with 4 pods on other nodes each.
		if got := strings.Count(out, "pod↔pod across nodes"); got != 6*4 {
			t.Errorf("check probed %d cross-node pod pairs, want %d", got, 6*4)
		}
		// Same-node TCP took the socket shortcut (check asserts the pod's
		// eth0 stayed quiet), and the agent's counters say so too.
		if !strings.Contains(out, "3/3 accelerated") {
			t.Errorf("check did not confirm TCP acceleration on all 3 nodes")
		}
		dbg, err := exec.Command(binary, "debug", "maps", "--bpf-root", filepath.Join(lab.BPFRootFor(labName), "node-1"), "sb_sock_counters").CombinedOutput()
		if err != nil || !regexp.MustCompile(`message\s+redirect\s+[1-9]`).Match(dbg) {
			t.Errorf("debug maps sb_sock_counters shows no redirected messages (%v):\n%s", err, dbg)
		}
		// Cross-node pod traffic left node-1 encapsulated in eBPF, and
		// came back decapsulated in eBPF, one remote prefix per other node;
		// traffic for the external host left through the uplink directly.
		dbg, err = exec.Command(binary, "debug", "maps", "--bpf-root", filepath.Join(lab.BPFRootFor(labName), "node-1"), "sb_counters").CombinedOutput()
		for _, re := range []string{`host_route\s+redirect_tunnel\s+[1-9]`, `host_route\s+encap\s+[1-9]`, `masq_ingress\s+decap\s+[1-9]`, `host_route\s+redirect_neigh\s+[1-9]`} {
			if err != nil || !regexp.MustCompile(re).Match(dbg) {
				t.Errorf("debug maps sb_counters has no %q: cross-node traffic missed the eBPF tunnel (%v):\n%s", re, err, dbg)
			}
		}
		dbg, err = exec.Command(binary, "debug", "maps", "--bpf-root", filepath.Join(lab.BPFRootFor(labName), "node-1"), "sb_remote_cidrs").CombinedOutput()
		// Each with the node's underlay address and, from the routing
		// table, its next hop (on link in the lab: the same address).
		if err != nil || len(regexp.MustCompile(`(?m)^10\.\S+\s.*\s(172\.31\.250\.\d+)\s+172\.31\.250\.\d+\s*$`).FindAll(dbg, -1)) != 2 {
			t.Errorf("debug maps sb_remote_cidrs does not list the 2 other nodes' pod CIDRs with VTEP and next hop (%v):\n%s", err, dbg)
		}
		dbg, err = exec.Command(binary, "debug", "maps", "--bpf-root", filepath.Join(lab.BPFRootFor(labName), "node-1")).CombinedOutput()
		if err != nil || !strings.Contains(string(dbg), "sb_sock_hash") || !strings.Contains(string(dbg), "sb_ct") {
			t.Errorf("debug maps does not list the datapath and acceleration maps (%v):\n%s", err, dbg)
		}
	})
	t.Run("tcp acceleration opt-out", func(t *testing.T) {
		// check's shortcut probe on node-1 talks to node-1-pod-2; once that
		// pod opts out, its connections must take the normal path.
		patch := func(v string) {
			t.Helper()
			body := fmt.Sprintf(`{"metadata":{"annotations":{"sinabro.io/tcp-acceleration":%s}}}`, v)
			if _, err := cs.Pods("default").Patch(ctx, "node-1-pod-2", types.MergePatchType, []byte(body), metav1.PatchOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		patch(`"false"`)
		waitFor(t, 15*time.Second, "node-1-pod-2 left out of acceleration", func() (bool, string) {
			out, _ := l.sinabro("check")
			return strings.Contains(out, "2/3 accelerated") && strings.Contains(out, "node-1-pod-2: "), lastLine(out)
		})
		patch("null")
		waitFor(t, 15*time.Second, "node-1-pod-2 accelerated again", func() (bool, string) {
			out, err := l.sinabro("check")
			return err == nil, lastLine(out)
		})
	})
	t.Run("status", func(t *testing.T) {
		out := l.mustSinabro(t, "status")
		t.Log(out)
		for _, want := range []string{"kube-apiserver", "etcd", "kube-controller-manager", "agent-node-1", "MiB"} {
			if !strings.Contains(out, want) {
				t.Errorf("status lacks %q", want)
			}
		}
	})
	t.Run("pod delete and recreate", func(t *testing.T) {
		const name = "node-1-pod-1"
		old, err := cs.Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		oldNetns := filepath.Join(netns.RunDir, podNetnsName(old))
		if _, err := os.Stat(oldNetns); err != nil {
			t.Fatalf("pod netns: %v", err)
		}
		if err := cs.Pods("default").Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// The kubelet stand-in runs CNI DEL, removes the netns and then
		// finalizes the pod.
		waitFor(t, 30*time.Second, "pod gone", func() (bool, string) {
			_, err := cs.Pods("default").Get(ctx, name, metav1.GetOptions{})
			return apierrors.IsNotFound(err), fmt.Sprint(err)
		})
		if _, err := os.Stat(oldNetns); err == nil {
			t.Errorf("netns %s still there after pod deletion", oldNetns)
		}
		if routes := hostRoutesTo(t, "node-1", old.Status.PodIP); len(routes) > 0 {
			t.Errorf("node-1 still routes the deleted pod's %s: %v", old.Status.PodIP, routes)
		}
		if err := lab.CreatePod(ctx, cs, name, "node-1"); err != nil {
			t.Fatal(err)
		}
		waitPodRunning(t, cs, name)
		l.mustSinabro(t, "check")
	})
	t.Run("agent killed", func(t *testing.T) {
		before := overlaySnapshot(t, []string{"node-1", "node-2", "node-3"})
		pid := readPid(t, filepath.Join(l.dir, "pids", "agent-node-2.pid"))
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		took := waitFor(t, 30*time.Second, "agent-node-2 restarted", func() (bool, string) {
			st, err := lab.SupervisorStatus(ctx, l.dir)
			if err != nil {
				return false, err.Error()
			}
			for _, p := range st.Procs {
				if p.Name == "agent-node-2" {
					return p.Running && p.PID != pid && p.Restarts >= 1, fmt.Sprintf("%+v", p)
				}
			}
			return false, "no agent-node-2"
		})
		t.Logf("figure: supervisor restarted a SIGKILLed agent in %s", took.Round(10*time.Millisecond))
		// Let the new agent reconcile, then the overlay must be what it was:
		// no duplicate and no stale entries.
		time.Sleep(3 * time.Second)
		after := overlaySnapshot(t, []string{"node-1", "node-2", "node-3"})
		if missing, extra := diff(before, after); len(missing)+len(extra) > 0 {
			t.Errorf("overlay changed across an agent restart:\n  gone: %s\n  new:  %s",
				strings.Join(missing, "\n        "), strings.Join(extra, "\n        "))
		}
		l.mustSinabro(t, "check")
	})
	t.Run("node deleted", func(t *testing.T) {
		n, err := cs.Nodes().Get(ctx, "node-3", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		refs := nodeRefs(n)
		if len(overlayRefs(t, "node-1", refs)) == 0 {
			t.Fatalf("node-1 has no overlay entry for node-3 (%v) before the deletion", refs)
		}
		start := time.Now()
		// Delete the Node object only: the other agents must react to the
		// API, whatever happens to the node's own processes.
		if err := cs.Nodes().Delete(ctx, "node-3", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		for _, other := range []string{"node-1", "node-2"} {
			waitFor(t, 10*time.Second, other+" forgets node-3", func() (bool, string) {
				left := overlayRefs(t, other, refs)
				return len(left) == 0, strings.Join(left, "; ")
			})
		}
		t.Logf("figure: node-3's routes, neighbours and FDB entries gone from the other nodes %s after the Node deletion", time.Since(start).Round(10*time.Millisecond))
		l.mustSinabro(t, "node", "delete", "node-3")
	})
	t.Run("node added", func(t *testing.T) {
		start := time.Now()
		l.mustSinabro(t, "node", "add", "node-4")
		t.Logf("figure: node-4 added and Ready in %s", time.Since(start).Round(100*time.Millisecond))
		if err := lab.CreatePod(ctx, cs, "node-4-pod-1", "node-4"); err != nil {
			t.Fatal(err)
		}
		waitPodRunning(t, cs, "node-4-pod-1")
		n, err := cs.Nodes().Get(ctx, "node-4", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		refs := nodeRefs(n)
		for _, other := range []string{"node-1", "node-2"} {
			waitFor(t, 10*time.Second, other+" programs node-4", func() (bool, string) {
				got := overlayRefs(t, other, refs)
				return hasRouteTo(got, n.Spec.PodCIDR), strings.Join(got, "; ")
			})
		}
		out := l.mustSinabro(t, "check")
		if !strings.Contains(out, "node-4-pod-1") {
			t.Errorf("check did not probe node-4-pod-1:\n%s", out)
		}
	})
	t.Run("malformed node is skipped with an event", func(t *testing.T) {
		// A Node without an InternalIP (the API server itself refuses a
		// malformed pod CIDR): every agent skips it, says why in an Event,
		// and the cluster keeps working.
		bad := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "bad-node"}}
		if _, err := cs.Nodes().Create(ctx, bad, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 15*time.Second, "an Event about bad-node", func() (bool, string) {
			evs, err := cs.Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=bad-node"})
			if err != nil {
				return false, err.Error()
			}
			for _, e := range evs.Items {
				if e.Source.Component == "sinabro-agent" && e.Type == corev1.EventTypeWarning {
					t.Logf("event: %s: %s", e.Reason, e.Message)
					return true, ""
				}
			}
			return false, fmt.Sprintf("%d events, none from sinabro-agent", len(evs.Items))
		})
		// The pods still reach each other (check counts a NotReady node as
		// a failure, so it runs once the bad Node is gone).
		if err := cs.Nodes().Delete(ctx, "bad-node", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		l.mustSinabro(t, "check")
	})
	t.Run("steady after agent resync", func(t *testing.T) {
		// The agents run a full reconciliation every 30s by default: it must
		// not undo what the CNI plugin or an earlier pass set up.
		if wait := 40*time.Second - time.Since(upAt); wait > 0 {
			time.Sleep(wait)
		}
		l.mustSinabro(t, "check")
	})
}

// TestLabDownAfterCrash kills the supervisor and every lab process with
// SIGKILL, then expects `lab down` to remove all that is left.
func TestLabDownAfterCrash(t *testing.T) {
	l, _ := newLab(t, 1, 1)
	pid := readPid(t, filepath.Join(l.dir, "supervisor.pid"))
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// `lab down` cleans up what the killed supervisor left, and is
	// idempotent: a second run succeeds with nothing to do. The cleanup
	// registered by newLab runs it once more and asserts a clean box.
	for i := 0; i < 2; i++ {
		out := l.mustSinabro(t, "down")
		t.Logf("lab down #%d:\n%s", i+1, out)
	}
	assertClean(t, l.dir, l.name)
}

func podNetnsName(p *corev1.Pod) string {
	return lab.PodNetnsOf(labName, string(p.UID))
}

func waitPodRunning(t *testing.T, cs *kube.Client, name string) {
	t.Helper()
	waitFor(t, 60*time.Second, "pod "+name+" running", func() (bool, string) {
		p, err := cs.Pods("default").Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "", string(p.Status.Phase)
	})
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// ipJSON runs iproute2 with JSON output inside a node's namespace.
func ipJSON(t *testing.T, node string, args ...string) []map[string]any {
	t.Helper()
	full := append([]string{"netns", "exec", labNetns(node)}, args...)
	out, err := exec.Command("ip", full...).Output()
	if err != nil {
		t.Fatalf("ip %s: %v", strings.Join(full, " "), err)
	}
	var rows []map[string]any
	if len(strings.TrimSpace(string(out))) == 0 {
		return nil
	}
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatalf("decode ip %s: %v\n%s", strings.Join(full, " "), err, out)
	}
	return rows
}

func str(m map[string]any, k string) string {
	v, _ := m[k].(string)
	return v
}

// overlaySnapshot lists every route, neighbour and FDB entry the overlay
// keeps on the given nodes, sorted: equal snapshots mean no duplicates and
// nothing stale.
func overlaySnapshot(t *testing.T, nodes []string) []string {
	var out []string
	for _, n := range nodes {
		for _, r := range ipJSON(t, n, "ip", "-j", "route", "show") {
			out = append(out, fmt.Sprintf("%s route %s via %s dev %s proto %v", n, str(r, "dst"), str(r, "gateway"), str(r, "dev"), r["protocol"]))
		}
		for _, r := range ipJSON(t, n, "ip", "-j", "neigh", "show", "nud", "permanent") {
			out = append(out, fmt.Sprintf("%s neigh %s lladdr %s dev %s", n, str(r, "dst"), str(r, "lladdr"), str(r, "dev")))
		}
		for _, r := range ipJSON(t, n, "bridge", "-j", "fdb", "show") {
			if str(r, "dst") == "" {
				continue
			}
			out = append(out, fmt.Sprintf("%s fdb %s dst %s dev %s", n, str(r, "mac"), str(r, "dst"), str(r, "ifname")))
		}
	}
	slices.Sort(out)
	return out
}

// nodeRefs are the addresses that identify a node in its peers' overlay
// state: pod CIDRs, underlay IP and VTEP MAC/IP annotations.
func nodeRefs(n *corev1.Node) []string {
	refs := append([]string{}, n.Spec.PodCIDRs...)
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			refs = append(refs, a.Address)
		}
	}
	for k, v := range n.Annotations {
		if strings.HasPrefix(k, "sinabro.io/vtep") && v != "" {
			refs = append(refs, strings.ToLower(v))
		}
	}
	return refs
}

// overlayRefs lists a node's overlay entries that mention any of refs.
func overlayRefs(t *testing.T, node string, refs []string) []string {
	var out []string
	for _, e := range overlaySnapshot(t, []string{node}) {
		for _, r := range refs {
			if strings.Contains(" "+e+" ", " "+r+" ") {
				out = append(out, e)
				break
			}
		}
	}
	return out
}

func hasRouteTo(entries []string, cidr string) bool {
	for _, e := range entries {
		if strings.Contains(e, " route "+cidr+" ") {
			return true
		}
	}
	return false
}

func hostRoutesTo(t *testing.T, node, ip string) []string {
	var out []string
	for _, r := range ipJSON(t, node, "ip", "-j", "route", "show") {
		if str(r, "dst") == ip {
			out = append(out, fmt.Sprint(r))
		}
	}
	return out
}

// diff returns the entries only in a and only in b (multisets: a duplicate
// counts as an extra entry).
func diff(a, b []string) (onlyA, onlyB []string) {
	count := map[string]int{}
	for _, x := range a {
		count[x]++
	}
	for _, x := range b {
		count[x]--
	}
	for x, n := range count {
		for ; n > 0; n-- {
			onlyA = append(onlyA, x)
		}
		for ; n < 0; n++ {
			onlyB = append(onlyB, x)
		}
	}
	slices.Sort(onlyA)
	slices.Sort(onlyB)
	return onlyA, onlyB
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
