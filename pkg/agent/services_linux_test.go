package agent

import (
	"context"
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
	"testing"
	"time"

	"github.com/cilium/ebpf/rlimit"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/netns"
	"github.com/sinabro-io/sinabro/pkg/service"
)

// TestAgentServices runs the agent's service controller against a fake API:
// Services and EndpointSlices become frontends and backends in the pinned
// maps, follow every change, and are handed to kube-proxy (programs
// detached) while its nftables table exists in the node's namespace.
func TestAgentServices(t *testing.T) {
	defer func(d time.Duration) { serviceRecheck = d }(serviceRecheck)
	serviceRecheck = 200 * time.Millisecond
	nodeNS := testNS(t, "svc")
	ipcmd(t, nodeNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	ipcmd(t, nodeNS, "addr", "add", "192.168.72.1/24", "dev", "eth0")
	ipcmd(t, nodeNS, "link", "set", "eth0", "up")
	ipcmd(t, nodeNS, "link", "set", "lo", "up")
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	mnt, err := cgroup.V2Mount()
	if err != nil {
		t.Fatalf("cgroup v2: %v", err)
	}
	id := fmt.Sprintf("sinabro-agent-svc-%d", os.Getpid())
	cg := filepath.Join(mnt, id)
	root := filepath.Join("/sys/fs/bpf", id)
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := service.Cleanup(root); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		os.RemoveAll(root)
		os.Remove(cg)
	})
	web := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeNodePort, ClusterIP: "10.96.0.20", ClusterIPs: []string{"10.96.0.20"},
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, NodePort: 30080}},
		},
	}
	slice := func(addrs ...string) *discoveryv1.EndpointSlice {
		port, name, proto := int32(8080), "http", corev1.ProtocolTCP
		s := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "web-abc", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &name, Protocol: &proto, Port: &port}},
		}
		for _, a := range addrs {
			s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}})
		}
		return s
	}
	client := fake.NewClientset(testNode("a", "192.168.72.1", "10.244.1.0/24"), web, slice("10.244.1.5", "10.244.2.7"))
	cfg := Config{
		NodeName: "a", CNIConfDir: t.TempDir(), StateDir: t.TempDir(), BPFRoot: root,
		VXLANVNI: 1, VXLANPort: 8472, VXLANDevice: "sinabro.vxlan",
		ClusterCIDRs:   []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		ResyncInterval: time.Second, NetNS: netns.Path(nodeNS),
		KubeProxyReplacement: KPRAuto, ServiceCgroup: cg,
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a, err := New(cfg, clientsetCluster{client}, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; a.Close() })

	rowsAre := func(want map[string][]string) func() bool {
		return func() bool {
			rows, err := service.List(root)
			if err != nil || len(rows) != len(want) {
				return false
			}
			for _, r := range rows {
				if !slices.Equal(r.Backends, want[r.Frontend]) || r.Name != "default/web:http" {
					return false
				}
			}
			return true
		}
	}
	eventually(t, "ClusterIP and NodePort frontends with both endpoints", rowsAre(map[string][]string{
		"10.96.0.20:80/TCP": {"10.244.1.5:8080", "10.244.2.7:8080"},
		"*:30080/TCP":       {"10.244.1.5:8080", "10.244.2.7:8080"},
	}))

	// An endpoint leaves, another one is terminating (used only when none is ready).
	s := slice("10.244.1.5", "10.244.2.9")
	no, yes := false, true
	s.Endpoints[1].Conditions = discoveryv1.EndpointConditions{Ready: &no, Serving: &yes, Terminating: &yes}
	if _, err := client.DiscoveryV1().EndpointSlices("default").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the removed endpoint gone, the terminating one unused", rowsAre(map[string][]string{
		"10.96.0.20:80/TCP": {"10.244.1.5:8080"},
		"*:30080/TCP":       {"10.244.1.5:8080"},
	}))

	// externalTrafficPolicy Local with a healthCheckNodePort: 200 while the
	// node has a ready endpoint, 503 once it has none.
	local := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "lb", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "10.96.0.21", ClusterIPs: []string{"10.96.0.21"},
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal, HealthCheckNodePort: 31999,
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, NodePort: 30081}},
		},
	}
	if _, err := client.CoreV1().Services("default").Create(ctx, local, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	lbSlice := slice("10.244.1.8", "10.244.2.8")
	lbSlice.Name, lbSlice.Labels[discoveryv1.LabelServiceName] = "lb-abc", "lb"
	nodeA, nodeB := "a", "b"
	lbSlice.Endpoints[0].NodeName, lbSlice.Endpoints[1].NodeName = &nodeA, &nodeB
	if _, err := client.DiscoveryV1().EndpointSlices("default").Create(ctx, lbSlice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	health := func() string {
		var out string
		netns.Do(netns.Path(nodeNS), func() error {
			c, err := net.DialTimeout("tcp", "192.168.72.1:31999", time.Second)
			if err != nil {
				out = err.Error()
				return nil
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			fmt.Fprintf(c, "GET / HTTP/1.0\r\n\r\n")
			b, _ := io.ReadAll(c)
			out = string(b)
			return nil
		})
		return out
	}
	eventually(t, "healthCheckNodePort answers 200 with one local endpoint", func() bool {
		h := health()
		return strings.HasPrefix(h, "HTTP/1.0 200") && strings.Contains(h, `"localEndpoints":1`)
	})
	lbSlice.Endpoints = lbSlice.Endpoints[1:]
	if _, err := client.DiscoveryV1().EndpointSlices("default").Update(ctx, lbSlice, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "healthCheckNodePort answers 503 without a local endpoint", func() bool {
		return strings.HasPrefix(health(), "HTTP/1.0 503")
	})
	if err := client.CoreV1().Services("default").Delete(ctx, "lb", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "healthCheckNodePort closed with its Service", func() bool {
		return strings.Contains(health(), "refused")
	})

	// kube-proxy appears on the node: we step aside, then take over again.
	nft := func(args ...string) {
		if out, err := exec.Command("ip", append([]string{"netns", "exec", nodeNS, "nft"}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("nft %v: %v\n%s", args, err, out)
		}
	}
	nft("add", "table", "ip", "kube-proxy")
	eventually(t, "programs detached next to kube-proxy", func() bool { return !service.Attached(root) })
	nft("delete", "table", "ip", "kube-proxy")
	eventually(t, "programs attached again", func() bool { return service.Attached(root) })

	if err := client.CoreV1().Services("default").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "frontends of the deleted Service gone", rowsAre(map[string][]string{}))
	// The NodePort also reaches the datapath's table for traffic from
	// outside; it is gone with the Service too.
	if rows, err := datapath.ListLB(root); err == nil && len(rows) != 0 {
		t.Errorf("datapath Service table still holds %+v", rows)
	}
}
