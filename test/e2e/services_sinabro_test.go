//go:build linux

package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/netns"
	"github.com/sinabro-io/sinabro/pkg/service"
)

// TestSinabroServices is the lab without kube-proxy, Sinabro alone: every
// Service row of `lab check` (ClusterIP from pods and nodes, TCP and UDP,
// hairpin, a backend outside the cluster — the socket load balancer — and
// NodePort from the external host with externalTrafficPolicy Cluster and
// Local — the datapath's per-packet path), then what kube-proxy
// users rely on beyond those rows — a Service without endpoints refuses at
// once, an endpoint change reaches new connections within a second,
// internalTrafficPolicy=Local keeps only the node's endpoints, and killing
// the agent (SIGKILL) in the middle of a stream of connections to a
// Service fails none of them.
func TestSinabroServices(t *testing.T) {
	const nodes, podsPerNode = 2, 2
	l, _ := newLabWith(t, nodes, podsPerNode, lab.KubeProxyNone)
	out, err := l.sinabro("check")
	t.Log(out)
	if err != nil {
		t.Errorf("lab check: %v", err)
	}
	checkServiceRows(t, out, nodes, podsPerNode)
	for i := 1; i <= nodes; i++ {
		if want := fmt.Sprintf("✓ sinabro on node-%d programmed the Services", i); !strings.Contains(out, want) {
			t.Errorf("check lacks %q", want)
		}
	}

	cs, cfg, _ := labBasics(t, l)
	ctx := context.Background()
	pod := func(name string) labPod {
		p, err := cs.Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil || p.Status.PodIP == "" {
			t.Fatalf("pod %s: %v", name, err)
		}
		return labPod{name: name, node: p.Spec.NodeName, ip: p.Status.PodIP, netns: lab.PodNetnsOf(labName, string(p.UID))}
	}
	client, a, b := pod("node-1-pod-1"), pod("node-1-pod-2"), pod("node-2-pod-1")
	root1 := filepath.Join(cfg.BPFRoot, client.node)
	// dial connects from the client pod as one of its processes would:
	// its network namespace and its node's pod cgroup.
	dial := func(addr string) (net.Conn, error) {
		var c net.Conn
		err := netns.Do(netns.Path(client.netns), func() error {
			leave, err := cgroup.Enter(cfg.NodePodCgroup(client.node))
			if err != nil {
				return err
			}
			c, err = net.DialTimeout("tcp", addr, 2*time.Second)
			return errors.Join(err, leave())
		})
		return c, err
	}

	t.Run("no endpoints refuses at once", func(t *testing.T) {
		vip := createBenchService(t, cs, "empty", nil, 8080)
		waitFor(t, 10*time.Second, "frontend programmed", func() (bool, string) {
			rows, err := service.List(root1)
			for _, r := range rows {
				if r.Name == "default/empty:tcp" {
					return true, ""
				}
			}
			return false, fmt.Sprint(err)
		})
		start := time.Now()
		_, err := dial(vip + ":8080")
		if took := time.Since(start); !errors.Is(err, syscall.ECONNREFUSED) || took > 200*time.Millisecond {
			t.Fatalf("connect to a Service without endpoints: %v after %s, want connection refused at once", err, took)
		}
		// From outside, through its NodePort: the datapath answers with an
		// ICMP port unreachable, so the client's connect() fails at once.
		svc, err := cs.Services("default").Get(ctx, "empty", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		svc.Spec.Type = corev1.ServiceTypeNodePort
		if svc, err = cs.Services("default").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		nodeAddr := net.JoinHostPort(nodeIPOf(t, cs, client.node), fmt.Sprint(svc.Spec.Ports[0].NodePort))
		waitFor(t, 10*time.Second, "NodePort refused from outside", func() (bool, string) {
			var took time.Duration
			err := netns.Do(netns.Path(labNetns("ext")), func() error {
				start := time.Now()
				c, err := net.DialTimeout("tcp", nodeAddr, 2*time.Second)
				took = time.Since(start)
				if err == nil {
					c.Close()
				}
				return err
			})
			return errors.Is(err, syscall.ECONNREFUSED) && took < 200*time.Millisecond, fmt.Sprintf("%v after %s", err, took)
		})
	})

	t.Run("endpoint change reaches new connections", func(t *testing.T) {
		vip := createBenchService(t, cs, "moving", []string{a.ip}, lab.ServeTCPPort)
		seen := func() string {
			c, err := dial(fmt.Sprintf("%s:%d", vip, lab.ServeTCPPort))
			if err != nil {
				return err.Error()
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			c.Write([]byte("probe\n"))
			buf := make([]byte, 128)
			n, _ := c.Read(buf)
			return c.RemoteAddr().String() + " " + string(buf[:n])
		}
		waitFor(t, 10*time.Second, "first backend answers", func() (bool, string) {
			s := seen()
			return strings.HasPrefix(s, fmt.Sprintf("%s:%d ", vip, lab.ServeTCPPort)), s
		})
		slice, err := cs.EndpointSlices("default").Get(ctx, "moving", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		slice.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{b.ip}}}
		if _, err := cs.EndpointSlices("default").Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		took := waitFor(t, 5*time.Second, "the new backend in node-1's table", func() (bool, string) {
			rows, err := service.List(root1)
			for _, r := range rows {
				if r.Name == "default/moving:tcp" {
					return len(r.Backends) == 1 && strings.HasPrefix(r.Backends[0], b.ip+":"), strings.Join(r.Backends, ",")
				}
			}
			return false, fmt.Sprint(err)
		})
		t.Logf("figure: EndpointSlice update to node-1's datapath in %s", took.Round(time.Millisecond))
		if took > time.Second {
			t.Errorf("endpoint change took %s to reach the datapath", took)
		}
	})

	t.Run("connected UDP socket to a removed backend is terminated", func(t *testing.T) {
		svc, err := cs.Services("default").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "udp-moving"},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "udp", Protocol: corev1.ProtocolUDP,
				Port: lab.ServeUDPPort, TargetPort: intstr.FromInt(lab.ServeUDPPort)}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pname, proto, port := "udp", corev1.ProtocolUDP, int32(lab.ServeUDPPort)
		slice, err := cs.EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: "udp-moving", Labels: map[string]string{
				discoveryv1.LabelServiceName: "udp-moving", discoveryv1.LabelManagedBy: "sinabro-e2e"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &pname, Protocol: &proto, Port: &port}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{a.ip}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		addr := net.JoinHostPort(svc.Spec.ClusterIP, fmt.Sprint(lab.ServeUDPPort))
		connect := func() (net.Conn, error) {
			var c net.Conn
			err := netns.Do(netns.Path(client.netns), func() error {
				leave, err := cgroup.Enter(cfg.NodePodCgroup(client.node))
				if err != nil {
					return err
				}
				c, err = net.Dial("udp", addr)
				return errors.Join(err, leave())
			})
			return c, err
		}
		ask := func(c net.Conn) error {
			c.SetDeadline(time.Now().Add(time.Second))
			if _, err := c.Write([]byte("probe\n")); err != nil {
				return err
			}
			_, err := c.Read(make([]byte, 128))
			return err
		}
		var conn net.Conn
		waitFor(t, 10*time.Second, "the backend answers a connected socket", func() (bool, string) {
			if conn != nil {
				conn.Close()
			}
			if conn, err = connect(); err != nil {
				return false, err.Error()
			}
			err := ask(conn)
			return err == nil, fmt.Sprint(err)
		})
		defer conn.Close()
		slice.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{b.ip}}}
		if _, err := cs.EndpointSlices("default").Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		// The agent destroys the socket in the pass that removes the
		// backend: its owner's next read reports ECONNABORTED.
		start := time.Now()
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 128))
		if !errors.Is(err, syscall.ECONNABORTED) {
			t.Fatalf("read on a socket connected to the removed backend: %v, want ECONNABORTED", err)
		}
		t.Logf("figure: connected UDP socket to a removed backend terminated %s after the EndpointSlice update", time.Since(start).Round(time.Millisecond))
		again, err := connect()
		if err != nil {
			t.Fatal(err)
		}
		defer again.Close()
		if err := ask(again); err != nil {
			t.Errorf("a new socket to the Service: %v", err)
		}
	})

	t.Run("pod to the NodePort of another node", func(t *testing.T) {
		// Not translated at the socket (not this node's address): the
		// other node's datapath picks a backend per connection, and the
		// reply of a backend on a third node (or this one) must come back
		// over the overlay, since the pod's address is not on the underlay.
		svc, err := cs.Services("default").Get(ctx, "svc-nodeport", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		addr := net.JoinHostPort(nodeIPOf(t, cs, b.node), fmt.Sprint(svc.Spec.Ports[0].NodePort))
		for i := range 20 {
			c, err := dial(addr)
			if err != nil {
				t.Fatalf("connection %d from %s to %s: %v", i, client.name, addr, err)
			}
			c.SetDeadline(time.Now().Add(2 * time.Second))
			c.Write([]byte("probe\n"))
			if _, err := c.Read(make([]byte, 128)); err != nil {
				t.Fatalf("connection %d from %s to %s: no answer: %v", i, client.name, addr, err)
			}
			c.Close()
		}
	})

	t.Run("internalTrafficPolicy Local", func(t *testing.T) {
		local := corev1.ServiceInternalTrafficPolicyLocal
		svc, err := cs.Services("default").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "itp-local"},
			Spec: corev1.ServiceSpec{InternalTrafficPolicy: &local,
				Ports: []corev1.ServicePort{{Name: "tcp", Protocol: corev1.ProtocolTCP, Port: 80}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		name, proto, port := "tcp", corev1.ProtocolTCP, int32(lab.ServeTCPPort)
		n1, n2 := "node-1", "node-2"
		_, err = cs.EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "itp-local", Labels: map[string]string{discoveryv1.LabelServiceName: "itp-local"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &name, Protocol: &proto, Port: &port}},
			Endpoints: []discoveryv1.Endpoint{
				{Addresses: []string{a.ip}, NodeName: &n1},
				{Addresses: []string{b.ip}, NodeName: &n2},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for node, want := range map[string]string{"node-1": a.ip, "node-2": b.ip} {
			waitFor(t, 10*time.Second, "only "+node+"'s endpoint on "+node, func() (bool, string) {
				rows, _ := service.List(filepath.Join(cfg.BPFRoot, node))
				for _, r := range rows {
					if r.Name == "default/itp-local:tcp" && strings.HasPrefix(r.Frontend, svc.Spec.ClusterIP+":") {
						return len(r.Backends) == 1 && strings.HasPrefix(r.Backends[0], want+":"), strings.Join(r.Backends, ",")
					}
				}
				return false, "no frontend"
			})
		}
	})

	t.Run("agent SIGKILL during traffic", func(t *testing.T) {
		// The tcpload server in node-2-pod-1, behind a Service; short
		// connections from node-1-pod-1 for 6 s while node-1's agent is
		// killed (the supervisor restarts it, which adopts the maps).
		srv := exec.Command("ip", "netns", "exec", b.netns, os.Args[0])
		srv.Env = append(os.Environ(), helperEnv+"=server", "SINABRO_E2E_ADDR="+b.ip)
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { srv.Process.Kill(); srv.Wait() }()
		vip := createBenchService(t, cs, "steady", []string{b.ip}, workloadPort)
		waitFor(t, 10*time.Second, "Service reachable", func() (bool, string) {
			c, err := dial(fmt.Sprintf("%s:%d", vip, workloadPort))
			if err == nil {
				c.Close()
			}
			return err == nil, fmt.Sprint(err)
		})
		f, err := os.Open(cfg.NodePodCgroup(client.node))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cli := exec.Command("ip", "netns", "exec", client.netns, os.Args[0])
		cli.Env = append(os.Environ(), helperEnv+"=client", "SINABRO_E2E_ADDR="+vip, "SINABRO_E2E_SCENARIO=many-for:6")
		cli.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
		var outb strings.Builder
		cli.Stdout, cli.Stderr = &outb, &outb
		if err := cli.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		pidFile := filepath.Join(l.dir, "pids", "agent-"+client.node+".pid")
		pid := readPid(t, pidFile)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		cli.Wait()
		r := parseResult(t, outb.String())
		if !r.OK || r.Conns < 100 {
			t.Fatalf("connections through the agent's SIGKILL: %d done, error %q", r.Conns, r.Err)
		}
		t.Logf("figure: %d connections to a Service, none failed, across a SIGKILL of node-1's agent", r.Conns)
		waitFor(t, 30*time.Second, "agent back", func() (bool, string) {
			p := readPid(t, pidFile)
			return p != pid && syscall.Kill(p, 0) == nil, fmt.Sprint(p)
		})
	})
}

// nodeIPOf is a lab node's InternalIP.
func nodeIPOf(t *testing.T, cs *kube.Client, node string) string {
	t.Helper()
	n, err := cs.Nodes().Get(context.Background(), node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			return a.Address
		}
	}
	t.Fatalf("node %s has no InternalIP", node)
	return ""
}
