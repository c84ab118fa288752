package agent

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

func testNS(t *testing.T, role string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s to set up and inspect test namespaces", tool)
		}
	}
	name := fmt.Sprintf("sbagent-%s-%d-%s", role, os.Getpid(), rand.Text()[:6])
	if _, err := netns.Create(name); err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() {
		if err := netns.Delete(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return name
}

func ipcmd(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s %s: %v\n%s", ns, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func testNode(name, ip string, podCIDRs ...string) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.NodeSpec{PodCIDR: podCIDRs[0], PodCIDRs: podCIDRs},
		Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}},
	}
}

// TestAgentsConnectTwoNodes runs two agents against one (fake) API server,
// each programming its own network namespace, and checks the whole loop:
// VTEP annotations, CNI config, readiness, real pod-to-pod traffic over the
// overlay, Events for a bad node, masquerade rules, and peer removal.
func TestAgentsConnectTwoNodes(t *testing.T) {
	nsA, nsB := testNS(t, "a"), testNS(t, "b")
	ipcmd(t, nsA, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", nsB)
	for ns, addr := range map[string]string{nsA: "192.168.60.1/24", nsB: "192.168.60.2/24"} {
		ipcmd(t, ns, "addr", "add", addr, "dev", "eth0")
		ipcmd(t, ns, "link", "set", "eth0", "up")
		ipcmd(t, ns, "link", "set", "lo", "up")
	}
	ipcmd(t, nsA, "addr", "add", "10.244.1.10/32", "dev", "lo") // a "pod" on each node
	ipcmd(t, nsB, "addr", "add", "10.244.2.10/32", "dev", "lo")

	bad := testNode("bad", "192.168.60.9", "10.244.9.0/24")
	bad.Spec.PodCIDRs = []string{"10.244.9.1/24"}
	client := fake.NewClientset(
		testNode("a", "192.168.60.1", "10.244.1.0/24"),
		testNode("b", "192.168.60.2", "10.244.2.0/24"),
		bad,
	)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	agents := map[string]*Agent{}
	confDirs := map[string]string{}
	done := make(chan error, 2)
	for name, ns := range map[string]string{"a": nsA, "b": nsB} {
		confDirs[name] = t.TempDir()
		cfg := Config{
			NodeName: name, CNIConfDir: confDirs[name], StateDir: "/var/lib/sinabro-test",
			VXLANVNI: 1, VXLANPort: 8472, VXLANDevice: "sinabro.vxlan",
			ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}, Masquerade: true,
			MasqueradeBackend: BackendNFTables, HostRouting: false, KubeProxyReplacement: KPRFalse,
			ResyncInterval: time.Second, NetNS: netns.Path(ns),
		}
		if name == "a" {
			cfg.HealthAddr = "127.0.0.1:0"
		}
		log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})).With("agent", name)
		a, err := New(cfg, clientsetCluster{client}, log)
		if err != nil {
			t.Fatalf("New(%s): %v", name, err)
		}
		t.Cleanup(func() { a.Close() })
		agents[name] = a
		go func() { done <- a.Run(ctx) }()
	}
	stop := sync.OnceFunc(func() {
		cancel()
		for range 2 {
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	})
	defer stop()

	eventually(t, "both agents ready", func() bool { return agents["a"].Ready() && agents["b"].Ready() })
	for name, dir := range confDirs {
		b, err := os.ReadFile(filepath.Join(dir, cni.ConfListName))
		if err != nil {
			t.Fatalf("conflist of %s: %v", name, err)
		}
		if !strings.Contains(string(b), `"mtu": 1450`) || !strings.Contains(string(b), "10.244.") {
			t.Errorf("conflist of %s:\n%s", name, b)
		}
	}
	n, err := client.CoreV1().Nodes().Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Annotations[AnnotationVTEPIP] != "192.168.60.1" || n.Annotations[AnnotationVTEPMAC] == "" {
		t.Errorf("annotations of a = %v", n.Annotations)
	}

	// Pod-to-pod over the overlay, both directions (routes appear once
	// each agent has seen the other's annotations).
	eventually(t, "routes to the other node", func() bool {
		return strings.Contains(ipcmd(t, nsA, "route"), "10.244.2.0/24 via 10.244.2.0 dev sinabro.vxlan") &&
			strings.Contains(ipcmd(t, nsB, "route"), "10.244.1.0/24 via 10.244.1.0 dev sinabro.vxlan")
	})
	echo(t, nsB, "10.244.2.10", nsA, "10.244.1.10")

	// The bad node got an Event and stays out.
	eventually(t, "an Event for the bad node", func() bool {
		evs, err := client.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false
		}
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == "bad" && e.Reason == "SinabroNodeSkipped" && strings.Contains(e.Message, ReasonMalformedPodCIDR) {
				return true
			}
		}
		return false
	})
	if strings.Contains(ipcmd(t, nsA, "route"), "10.244.9.") {
		t.Error("route to the bad node's CIDR")
	}
	if out, err := exec.Command("ip", "netns", "exec", nsA, "nft", "list", "table", "inet", "sinabro").CombinedOutput(); err != nil || !strings.Contains(string(out), "masquerade") {
		t.Errorf("masquerade table in a: %v\n%s", err, out)
	}

	// Tampering is repaired by the periodic resync.
	ipcmd(t, nsA, "route", "del", "10.244.2.0/24")
	eventually(t, "route repaired", func() bool {
		return strings.Contains(ipcmd(t, nsA, "route"), "10.244.2.0/24 via 10.244.2.0")
	})

	// Node b leaves the cluster: a forgets it.
	if err := client.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b's route removed from a", func() bool {
		return !strings.Contains(ipcmd(t, nsA, "route"), "10.244.2.0/24")
	})
	if out := ipcmd(t, nsA, "neigh", "show", "dev", "sinabro.vxlan"); strings.Contains(out, "10.244.2.0") {
		t.Errorf("b's neighbour still on a:\n%s", out)
	}

	// Stopped agents leave the datapath; --cleanup removes it.
	stop()
	if !strings.Contains(ipcmd(t, nsA, "link"), "sinabro.vxlan") {
		t.Error("stopping the agent removed the vxlan device")
	}
	if err := netns.Do(netns.Path(nsA), func() error { return Cleanup(context.Background(), "sinabro.vxlan", "") }); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	if out := ipcmd(t, nsA, "link") + ipcmd(t, nsA, "route"); strings.Contains(out, "sinabro.vxlan") || strings.Contains(out, "proto 201") {
		t.Errorf("left after Cleanup:\n%s", out)
	}
	if out, _ := exec.Command("ip", "netns", "exec", nsA, "nft", "list", "tables").CombinedOutput(); strings.Contains(string(out), "sinabro") {
		t.Errorf("nft table left after Cleanup:\n%s", out)
	}
}

// echo sends 256 KiB from client to server over TCP and checks it comes back.
func echo(t *testing.T, serverNS, serverIP, clientNS, clientIP string) {
	t.Helper()
	var ln net.Listener
	if err := netns.Do(netns.Path(serverNS), func() (err error) {
		ln, err = net.Listen("tcp", serverIP+":0")
		return err
	}); err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()
	var c net.Conn
	if err := netns.Do(netns.Path(clientNS), func() (err error) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(clientIP)}, Timeout: 5 * time.Second}
		c, err = d.Dial("tcp", ln.Addr().String())
		return err
	}); err != nil {
		t.Fatalf("dial %s from %s: %v", ln.Addr(), clientIP, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	payload := make([]byte, 256<<10)
	rand.Read(payload)
	go c.Write(payload)
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("echo from %s to %s: %v", clientIP, serverIP, err)
	}
	if string(got) != string(payload) {
		t.Error("echoed payload differs")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
