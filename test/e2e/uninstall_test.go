//go:build linux

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestUninstall runs `sinabro uninstall` on a lab node whose agent is
// stopped and pods deleted (what an operator does before the uninstall
// DaemonSet), asserts that nothing of Sinabro's is left in the node — no
// programs on any interface (tcx or classic tc), no pins, no vxlan device,
// no routes of protocol 200/201, no rules, no pod interfaces, no masquerade
// table, no conflist, no plugin, no state — then reinstalls (`sinabro
// install`, the agent back) and the lab check passes again. With
// SINABRO_E2E_AGENT_ARGS=--tc-attach=classic it covers classic tc.
func TestUninstall(t *testing.T) {
	l, _ := newLab(t, 2, 1)
	cs, err := lab.AdminClient(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := lab.LoadConfig(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const node, pod = "node-1", "node-1-pod-1"
	layout := lab.Layout{Dir: l.dir}
	nsPath := filepath.Join(netns.RunDir, labNetns(node))
	bpfRoot := filepath.Join(cfg.BPFRoot, node)
	stateDir := filepath.Join(layout.Node(node), "state")
	binDir, confDir := layout.NodeCNIBin(node), layout.NodeCNIConf(node)
	// The lab works as brought up (with SINABRO_E2E_AGENT_ARGS=--tc-attach=classic:
	// through classic tc filters, listed below).
	t.Log(l.mustSinabro(t, "check"))
	before := leftovers(t, node, nsPath, bpfRoot, cfg.NodePodCgroup(node), binDir, confDir, stateDir)
	if len(before) == 0 {
		t.Fatal("a running node shows nothing of Sinabro's: the leftover probes see nothing")
	}
	t.Logf("%s before uninstall:\n  %s", node, strings.Join(before, "\n  "))

	t.Run("agent RBAC", func(t *testing.T) { checkAgentRBAC(t, layout.AdminKubeconfig(), node) })

	// The uninstall DaemonSet is valid for this API server (the lab
	// dry-runs only manifests/*.yaml).
	dryRunUninstallManifest(t, layout.AdminKubeconfig())

	// Drain: the pod's network is torn down by CNI DEL while the plugin is
	// still there.
	if err := cs.Pods("default").Delete(ctx, pod, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "pod gone", func() (bool, string) {
		_, err := cs.Pods("default").Get(ctx, pod, metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})

	// Stop the agent as deleting its DaemonSet would. The supervisor
	// restarts a dead agent, so its kubeconfig goes away first: restarts
	// fail before they touch the node.
	kc := filepath.Join(layout.Node(node), "agent.kubeconfig")
	if err := os.Rename(kc, kc+".away"); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := os.Rename(kc+".away", kc); err != nil {
				t.Error(err)
			}
		}
	}
	defer restore()
	pid := readPid(t, filepath.Join(l.dir, "pids", "agent-"+node+".pid"))
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "agent gone", func() (bool, string) {
		err := syscall.Kill(pid, 0)
		return errors.Is(err, syscall.ESRCH), fmt.Sprint(err)
	})

	uninstall := func() string {
		t.Helper()
		cmd := exec.Command(binary, "uninstall", "--bpf-root", bpfRoot, "--cni-bin-dir", binDir,
			"--cni-conf-dir", confDir, "--state-dir", stateDir)
		var out []byte
		err := netns.Do(nsPath, func() (err error) { out, err = cmd.CombinedOutput(); return err })
		if err != nil {
			t.Fatalf("sinabro uninstall: %v\n%s", err, out)
		}
		return string(out)
	}
	start := time.Now()
	out := uninstall()
	t.Logf("figure: sinabro uninstall took %s\n%s", time.Since(start).Round(time.Millisecond), out)
	if got := leftovers(t, node, nsPath, bpfRoot, cfg.NodePodCgroup(node), binDir, confDir, stateDir); len(got) > 0 {
		t.Errorf("left on %s after uninstall:\n  %s", node, strings.Join(got, "\n  "))
	}
	// Idempotent: nothing to do the second time.
	uninstall()

	// Reinstall: the init container's `sinabro install`, then the agent.
	inst := exec.Command(binary, "install", "--cni-bin-dir", binDir, "--cni-conf-dir", confDir)
	if err := netns.Do(nsPath, func() error {
		if out, err := inst.CombinedOutput(); err != nil {
			return fmt.Errorf("sinabro install: %v\n%s", err, out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	restore()
	waitFor(t, 60*time.Second, "agent back and the conflist written", func() (bool, string) {
		_, err := os.Stat(filepath.Join(confDir, cni.ConfListName))
		return err == nil, fmt.Sprint(err)
	})
	if err := lab.CreatePod(ctx, cs, pod, node); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(t, cs, pod)
	waitFor(t, 60*time.Second, "lab check passing after reinstall", func() (bool, string) {
		out, err := l.sinabro("check")
		return err == nil, lastLine(out)
	})
}

// checkAgentRBAC acts as the agents' ServiceAccount (impersonated by the
// admin): it may annotate a Node through nodes/status, as the agent does, but
// not patch a Node itself (its spec: taints, pod CIDRs, unschedulable), nor
// patch Events.
func checkAgentRBAC(t *testing.T, kubeconfig, node string) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Impersonate.UserName = "system:serviceaccount:kube-system:sinabro"
	cs, err := kube.New(cfg, "sinabro-e2e")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	annotate := []byte(`{"metadata":{"annotations":{"sinabro.io/e2e-rbac":"1"}}}`)
	if _, err := cs.Nodes().Patch(ctx, node, types.MergePatchType, annotate, metav1.PatchOptions{}, "status"); err != nil {
		t.Errorf("annotate node %s through nodes/status as the agent: %v", node, err)
	}
	if _, err := cs.Nodes().List(ctx, metav1.ListOptions{}); err != nil {
		t.Errorf("list nodes as the agent: %v", err)
	}
	spec := []byte(`{"spec":{"unschedulable":true}}`)
	if _, err := cs.Nodes().Patch(ctx, node, types.MergePatchType, spec, metav1.PatchOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("patch node %s as the agent: %v, want forbidden", node, err)
	}
	if _, err := cs.Nodes().Patch(ctx, node, types.MergePatchType, annotate, metav1.PatchOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("annotate node %s directly as the agent: %v, want forbidden", node, err)
	}
	if _, err := cs.Events("default").Patch(ctx, "any", types.MergePatchType, []byte(`{}`), metav1.PatchOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("patch an event as the agent: %v, want forbidden", err)
	}
}

// dryRunUninstallManifest creates every object of
// manifests/uninstall/uninstall.yaml with a server-side dry-run.
func dryRunUninstallManifest(t *testing.T, kubeconfig string) {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(repoRoot(), "manifests", "uninstall", "uninstall.yaml")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	n := 0
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			t.Fatalf("decode %s: %v", path, err)
		}
		if len(m) == 0 {
			continue
		}
		o := &unstructured.Unstructured{Object: m}
		if o.GetKind() != "DaemonSet" {
			t.Fatalf("%s: unexpected %s", path, o.GetKind())
		}
		gvr := schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "daemonsets"}
		if _, err := dyn.Resource(gvr).Namespace(o.GetNamespace()).Create(context.Background(), o,
			metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
			t.Errorf("dry-run %s %s: %v", o.GetKind(), o.GetName(), err)
		}
		n++
	}
	if n == 0 {
		t.Errorf("%s holds no object", path)
	}
}

// leftovers lists what of Sinabro's a node still has.
func leftovers(t *testing.T, node, nsPath, bpfRoot, podCgroup, binDir, confDir, stateDir string) []string {
	t.Helper()
	var out []string
	links := ipJSON(t, node, "ip", "-j", "link", "show")
	for _, lk := range links {
		name := str(lk, "ifname")
		if name == "sinabro.vxlan" {
			out = append(out, "vxlan device "+name)
		}
		if strings.HasPrefix(str(lk, "ifalias"), "sinabro:") {
			out = append(out, "pod interface "+name)
		}
		for _, dir := range []string{"ingress", "egress"} {
			b, err := exec.Command("tc", "-j", "-n", labNetns(node), "filter", "show", "dev", name, dir).Output()
			var filters []map[string]any
			if err == nil && len(strings.TrimSpace(string(b))) > 0 {
				json.Unmarshal(b, &filters)
			}
			if len(filters) > 0 {
				out = append(out, fmt.Sprintf("tc %s filters on %s: %s", dir, name, strings.TrimSpace(string(b))))
			}
		}
		if b, err := exec.Command("tc", "-n", labNetns(node), "qdisc", "show", "dev", name).Output(); err == nil && strings.Contains(string(b), "clsact") {
			out = append(out, "clsact qdisc on "+name)
		}
	}
	err := netns.Do(nsPath, func() error {
		for _, lk := range links {
			idx, _ := lk["ifindex"].(float64)
			for _, attach := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				res, err := link.QueryPrograms(link.QueryOptions{Target: int(idx), Attach: attach})
				if err != nil {
					if errors.Is(err, ebpf.ErrNotSupported) {
						return nil
					}
					return fmt.Errorf("query tcx on %s: %w", str(lk, "ifname"), err)
				}
				if len(res.Programs) > 0 {
					out = append(out, fmt.Sprintf("%d tcx programs (%v) on %s", len(res.Programs), attach, str(lk, "ifname")))
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The pod cgroup (TCP acceleration) and the node's (Service load
	// balancing), which holds it.
	for _, cg := range []string{podCgroup, filepath.Dir(podCgroup)} {
		if podCgroup == "" {
			break
		}
		if f, err := os.Open(cg); err == nil {
			for _, attach := range []ebpf.AttachType{ebpf.AttachCGroupSockOps, ebpf.AttachCGroupInet4Connect,
				ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCgroupInet4GetPeername} {
				res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: attach})
				if err == nil && len(res.Programs) > 0 {
					out = append(out, fmt.Sprintf("%d %v programs on %s", len(res.Programs), attach, cg))
				}
			}
			f.Close()
		}
	}
	for _, v := range []string{"-4", "-6"} {
		for _, proto := range []string{"200", "201"} {
			for _, r := range ipJSON(t, node, "ip", v, "-j", "route", "show", "table", "all", "proto", proto) {
				out = append(out, fmt.Sprintf("route to %s (proto %s)", str(r, "dst"), proto))
			}
		}
		for _, r := range ipJSON(t, node, "ip", v, "-j", "rule", "show") {
			if p, _ := r["priority"].(float64); p != 0 && p != 32766 && p != 32767 {
				out = append(out, fmt.Sprintf("rule %v", r))
			}
		}
	}
	if b, err := exec.Command("ip", "netns", "exec", labNetns(node), "nft", "list", "tables").Output(); err == nil && strings.Contains(string(b), "sinabro") {
		out = append(out, "nftables: "+strings.TrimSpace(string(b)))
	}
	filepath.WalkDir(bpfRoot, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			out = append(out, "pin "+path)
		}
		return nil
	})
	for _, p := range []string{filepath.Join(confDir, cni.ConfListName), filepath.Join(binDir, cni.DefaultBinName), stateDir} {
		if _, err := os.Stat(p); err == nil {
			out = append(out, "file "+p)
		}
	}
	return out
}
