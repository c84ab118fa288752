//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// Benchmarks run only with SINABRO_BENCH=1 (`just bench-overlay`): they take
// minutes and print figures rather than assert them.
func needBench(t *testing.T) {
	t.Helper()
	if os.Getenv("SINABRO_BENCH") == "" {
		t.Skip("benchmark: set SINABRO_BENCH=1 (just bench-overlay, just bench-services)")
	}
}

// TestBenchOverlay compares pod→pod across nodes (VXLAN) with node→node on
// the underlay between the same two node namespaces: iperf3 single-stream
// throughput and 1-byte TCP request/response rate, interleaved, 5 rounds.
func TestBenchOverlay(t *testing.T) {
	needBench(t)
	l, _ := newLab(t, 2, 1)
	cs, err := lab.AdminClient(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ends := map[string]endpoint{} // "pod-1", "pod-2", "node-1", "node-2"
	nodes, err := cs.Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes.Items {
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				ends[n.Name] = endpoint{netns.Path(labNetns(n.Name)), a.Address}
			}
		}
	}
	pods, err := cs.Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		if p.Spec.HostNetwork || p.Status.PodIP == "" {
			continue
		}
		ends["pod-on-"+p.Spec.NodeName] = endpoint{netns.Path(lab.PodNetnsOf(labName, string(p.UID))), p.Status.PodIP}
	}
	pairs := []struct{ name, from, to string }{
		{"pod→pod across nodes (vxlan)", "pod-on-node-1", "pod-on-node-2"},
		{"node→node (underlay)", "node-1", "node-2"},
	}
	for _, p := range pairs {
		if ends[p.from].ns == "" || ends[p.to].ns == "" {
			t.Fatalf("missing endpoints for %s: %+v", p.name, ends)
		}
	}
	const rounds = 5
	tput := map[string][]float64{}
	rr := map[string][]float64{}
	for r := 0; r < rounds; r++ {
		order := pairs
		if r%2 == 1 { // alternate who goes first
			order = []struct{ name, from, to string }{pairs[1], pairs[0]}
		}
		for _, p := range order {
			bps, err := iperf(ends[p.from], ends[p.to], 3)
			if err != nil {
				t.Fatalf("iperf3 %s: %v", p.name, err)
			}
			tput[p.name] = append(tput[p.name], bps/1e9)
			rate, err := requestResponse(ends[p.from], ends[p.to], 2*time.Second)
			if err != nil {
				t.Fatalf("request/response %s: %v", p.name, err)
			}
			rr[p.name] = append(rr[p.name], rate)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "overlay benchmark, %d rounds interleaved (median)\n", rounds)
	fmt.Fprintf(&b, "%-32s %16s %16s\n", "path", "iperf3 Gbit/s", "req/resp per s")
	for _, p := range pairs {
		fmt.Fprintf(&b, "%-32s %16.2f %16.0f\n", p.name, median(tput[p.name]), median(rr[p.name]))
	}
	fmt.Fprintf(&b, "%-32s %15.2fx %15.2fx\n", "ratio overlay/underlay",
		median(tput[pairs[0].name])/median(tput[pairs[1].name]), median(rr[pairs[0].name])/median(rr[pairs[1].name]))
	t.Log("\n" + b.String())
	fmt.Print(b.String())
}

// TestBenchAgentMemory reports agent RSS in a 3-node lab, then with 100
// Node objects (97 simulated: annotated like real agents, never answering).
func TestBenchAgentMemory(t *testing.T) {
	needBench(t)
	l, _ := newLab(t, 3, 1)
	cs, err := lab.AdminClient(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	before := agentRSS(t, l)
	for i := 0; i < 97; i++ {
		name := fmt.Sprintf("sim-%03d", i)
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{
			"sinabro.io/vtep-mac": fmt.Sprintf("02:5b:00:00:%02x:%02x", i/256, i%256),
			"sinabro.io/vtep-ip":  fmt.Sprintf("172.31.251.%d", i+1),
		}}}
		if _, err := cs.Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		// The controller-manager writes the pod CIDR concurrently: retry
		// the status update on conflicts.
		for try := 0; ; try++ {
			n, err := cs.Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("172.31.251.%d", i+1)}}
			_, err = cs.Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
			if err == nil {
				break
			}
			if !apierrors.IsConflict(err) || try == 10 {
				t.Fatalf("status of %s: %v", name, err)
			}
		}
	}
	// Wait until node-1 has a route to every other node's pod CIDR.
	deadline := time.Now().Add(90 * time.Second)
	for {
		out, _ := inNetns(netns.Path(labNetns("node-1")), "ip", "-o", "route", "show", "dev", "sinabro.vxlan")
		if strings.Count(out, " via ") >= 99 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node-1 programmed %d peers, want 99:\n%s", strings.Count(out, " via "), out)
		}
		time.Sleep(time.Second)
	}
	time.Sleep(3 * time.Second)
	after := agentRSS(t, l)
	msg := fmt.Sprintf("agent RSS (MiB): 3 nodes %s; 100 nodes %s\n", before, after)
	t.Log(msg)
	fmt.Print(msg)
}

func agentRSS(t *testing.T, l *testLab) string {
	t.Helper()
	st, err := lab.SupervisorStatus(context.Background(), l.dir)
	if err != nil {
		t.Fatal(err)
	}
	var parts []string
	for _, p := range st.Procs {
		if strings.HasPrefix(p.Name, "agent-") && p.Running {
			parts = append(parts, fmt.Sprintf("%s=%.1f", strings.TrimPrefix(p.Name, "agent-"), float64(lab.RSS(p.PID))/1024))
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

type endpoint struct{ ns, ip string }

func inNetns(ns string, name string, args ...string) (string, error) {
	var out []byte
	err := netns.Do(ns, func() (err error) {
		out, err = exec.Command(name, args...).CombinedOutput()
		return err
	})
	return string(out), err
}

// iperf runs one single-stream iperf3 test and returns received bits/s.
func iperf(from, to endpoint, seconds int) (float64, error) {
	var srv *exec.Cmd
	err := netns.Do(to.ns, func() error {
		srv = exec.Command("iperf3", "-s", "-1", "-p", "5399")
		return srv.Start()
	})
	if err != nil {
		return 0, err
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	time.Sleep(300 * time.Millisecond)
	out, err := inNetns(from.ns, "iperf3", "-c", to.ip, "-p", "5399", "-t", fmt.Sprint(seconds), "-J")
	if err != nil {
		return 0, fmt.Errorf("%v: %s", err, out)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return 0, fmt.Errorf("decode iperf3 output: %w", err)
	}
	return res.End.SumReceived.BitsPerSecond, nil
}

// requestResponse counts 1-byte TCP ping-pongs per second over one connection.
func requestResponse(from, to endpoint, d time.Duration) (float64, error) {
	var ln net.Listener
	if err := netns.Do(to.ns, func() (err error) { ln, err = net.Listen("tcp", net.JoinHostPort(to.ip, "5398")); return err }); err != nil {
		return 0, err
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	var c net.Conn
	if err := netns.Do(from.ns, func() (err error) { c, err = net.Dial("tcp", net.JoinHostPort(to.ip, "5398")); return err }); err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 1)
	n := 0
	start := time.Now()
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			return 0, err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return 0, err
		}
		n++
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}
