//go:build linux

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestDatapath proves the eBPF datapath on a real lab: masquerade with
// conntrack on node-1's uplink for many concurrent flows, and established
// and new flows surviving an agent killed with SIGKILL (the programs,
// links and conntrack table are pinned, so they outlive the process).
func TestDatapath(t *testing.T) {
	l, _ := newLab(t, 2, 1)
	d := newDatapathLab(t, l, "node-1")
	t.Logf("pod %s (netns %s) on %s (%s) → external %s", d.podIP, filepath.Base(d.podNetns), d.node, d.nodeIP, d.ext)

	t.Run("1000 concurrent external flows", d.concurrentFlows)
	t.Run("agent kill -9 during a long transfer", d.killDuringLongTransfer)
	t.Run("agent kill -9 during a stream of short connections", d.killDuringShortConnections)
}

// datapathLab is one pod of a lab and what its traffic to the external
// host must look like.
type datapathLab struct {
	l        *testLab
	node     string
	nodeIP   netip.Addr
	podIP    netip.Addr
	podNetns string         // path
	ext      netip.AddrPort // the external host's test server
	bpfRoot  string
}

// labBasics opens an API client and the configuration of lab l and finds
// its external host.
func labBasics(t *testing.T, l *testLab) (*kube.Client, *lab.Config, netip.Addr) {
	t.Helper()
	cs, err := lab.AdminClient(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := lab.LoadConfig(l.dir)
	if err != nil {
		t.Fatal(err)
	}
	// The external host is .254 on the underlay (see pkg/lab/lab.go).
	ext := netip.MustParsePrefix(cfg.Underlay).Addr().As4()
	ext[3] = 254
	return cs, cfg, netip.AddrFrom4(ext)
}

func newDatapathLab(t *testing.T, l *testLab, node string) *datapathLab {
	t.Helper()
	ctx := context.Background()
	cs, cfg, ext := labBasics(t, l)
	d := &datapathLab{
		l:       l,
		node:    node,
		ext:     netip.AddrPortFrom(ext, lab.ServeTCPPort),
		bpfRoot: filepath.Join(cfg.BPFRoot, node),
	}
	n, err := cs.Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			d.nodeIP, _ = netip.ParseAddr(a.Address)
		}
	}
	pods, err := cs.Pods("default").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		if p.Spec.NodeName == node && !p.Spec.HostNetwork && p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" {
			d.podIP, _ = netip.ParseAddr(p.Status.PodIP)
			d.podNetns = netns.Path(lab.PodNetnsOf(labName, string(p.UID)))
			break
		}
	}
	if !d.nodeIP.IsValid() || !d.podIP.IsValid() {
		t.Fatalf("%s: node address %v, running pod %v: want both", node, d.nodeIP, d.podIP)
	}
	return d
}

// dial opens a TCP connection to the external host from the pod's netns.
func (d *datapathLab) dial(timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := netns.Do(d.podNetns, func() (err error) {
		c, err = net.DialTimeout("tcp", d.ext.String(), timeout)
		return err
	})
	return c, err
}

// exchange sends one line and returns the source address the server saw.
func exchange(c net.Conn, r *bufio.Reader, timeout time.Duration) (netip.AddrPort, error) {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return netip.AddrPort{}, fmt.Errorf("write: %w", err)
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("read reply: %w", err)
	}
	_, peer, ok := strings.Cut(strings.TrimSpace(line), "peer=")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("reply %q has no peer=", line)
	}
	return netip.ParseAddrPort(peer)
}

// ctFlow is one flow of `sinabro debug maps sb_ct -o json`.
type ctFlow struct {
	Protocol string         `json:"protocol"`
	Src      netip.AddrPort `json:"src"`
	Dst      netip.AddrPort `json:"dst"`
	NAT      netip.AddrPort `json:"nat"`
	State    string         `json:"state"`
	Orphan   bool           `json:"orphan"`
}

// ctFlows dumps the node's pinned conntrack table with the built binary,
// keyed by the pod-side address, for TCP flows to the external server.
func (d *datapathLab) ctFlows(t *testing.T) map[netip.AddrPort]ctFlow {
	t.Helper()
	out, err := exec.Command(binary, "debug", "maps", "--bpf-root", d.bpfRoot, "sb_ct", "-o", "json").Output()
	if err != nil {
		t.Fatalf("debug maps sb_ct: %v", err)
	}
	var flows []ctFlow
	if err := json.Unmarshal(out, &flows); err != nil {
		t.Fatalf("decode debug maps sb_ct: %v", err)
	}
	m := map[netip.AddrPort]ctFlow{}
	for _, f := range flows {
		if f.Protocol == "tcp" && f.Dst == d.ext {
			m[f.Src] = f
		}
	}
	return m
}

// concurrentFlows holds 1,000 connections open at once, then has each do
// one exchange and close.
func (d *datapathLab) concurrentFlows(t *testing.T) {
	const flows, dialers = 1000, 32
	conns := make([]net.Conn, flows)
	dialErrs := make([]error, flows)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range dialers {
		// Each dialer enters the pod's netns once and opens its share.
		wg.Go(func() {
			netns.Do(d.podNetns, func() error {
				for i := w; i < flows; i += dialers {
					conns[i], dialErrs[i] = net.DialTimeout("tcp", d.ext.String(), 5*time.Second)
				}
				return nil
			})
		})
	}
	wg.Wait()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	open := 0
	var firstErrs []string
	for i, err := range dialErrs {
		if err == nil && conns[i] != nil {
			open++
		} else if len(firstErrs) < 5 {
			firstErrs = append(firstErrs, fmt.Sprint(err))
		}
	}
	t.Logf("figure: %d/%d connections open at once after %s", open, flows, time.Since(start).Round(time.Millisecond))
	if open != flows {
		t.Fatalf("%d of %d connections failed to open, e.g. %s", flows-open, flows, strings.Join(firstErrs, "; "))
	}

	// While all are open, the pinned conntrack table holds each of them,
	// translated to the node's address with a distinct port.
	ct := d.ctFlows(t)
	natPorts := map[uint16]bool{}
	missing := 0
	for _, c := range conns {
		local := netip.MustParseAddrPort(c.LocalAddr().String())
		f, ok := ct[local]
		if !ok || f.NAT.Addr() != d.nodeIP || f.Orphan {
			missing++
			continue
		}
		natPorts[f.NAT.Port()] = true
	}
	t.Logf("figure: sb_ct lists %d tcp flows to %s, %d of ours masqueraded to %s with %d distinct ports", len(ct), d.ext, flows-missing, d.nodeIP, len(natPorts))
	if missing > 0 || len(natPorts) != flows {
		t.Errorf("sb_ct: %d of %d open connections lack a full entry masqueraded to %s; %d distinct NAT ports, want %d", missing, flows, d.nodeIP, len(natPorts), flows)
	}
	// The text dump an operator reads says the same.
	text, err := exec.Command(binary, "debug", "maps", "--bpf-root", d.bpfRoot, "sb_ct").Output()
	if err != nil {
		t.Fatalf("debug maps sb_ct: %v", err)
	}
	lines := 0
	for _, line := range strings.Split(string(text), "\n") {
		if strings.HasPrefix(line, "tcp "+d.podIP.String()+":") && strings.Contains(line, "→ "+d.ext.String()+" ⇢ "+d.nodeIP.String()+":") {
			lines++
		}
	}
	t.Logf("figure: debug maps sb_ct prints %d lines tcp %s → %s ⇢ %s", lines, d.podIP, d.ext, d.nodeIP)
	if lines < flows {
		t.Errorf("debug maps sb_ct prints %d masqueraded flows from the pod, want at least %d:\n%s", lines, flows, firstLines(string(text), 5))
	}

	// Every connection exchanges once; the server must see exactly the
	// address conntrack translated it to.
	var failed, wrongPeer atomic.Int32
	var mu sync.Mutex
	var errs []string
	start = time.Now()
	for _, c := range conns {
		wg.Go(func() {
			peer, err := exchange(c, bufio.NewReader(c), 10*time.Second)
			local := netip.MustParseAddrPort(c.LocalAddr().String())
			switch {
			case err != nil:
				failed.Add(1)
				mu.Lock()
				if len(errs) < 5 {
					errs = append(errs, err.Error())
				}
				mu.Unlock()
			case peer.Addr() != d.nodeIP || ct[local].NAT != peer:
				wrongPeer.Add(1)
				mu.Lock()
				if len(errs) < 5 {
					errs = append(errs, fmt.Sprintf("%v seen as %v, conntrack says %v", local, peer, ct[local].NAT))
				}
				mu.Unlock()
			}
			c.Close()
		})
	}
	wg.Wait()
	t.Logf("figure: %d/%d exchanges ok in %s (%d failed, %d with an unexpected source)", flows-int(failed.Load()+wrongPeer.Load()), flows,
		time.Since(start).Round(time.Millisecond), failed.Load(), wrongPeer.Load())
	if failed.Load()+wrongPeer.Load() > 0 {
		t.Errorf("%d exchanges failed and %d saw an unexpected source, e.g. %s", failed.Load(), wrongPeer.Load(), strings.Join(errs, "; "))
	}
}

// traffic counts exchanges of a loop running while the agent is killed.
type traffic struct {
	mu      sync.Mutex
	ok      int
	failed  int
	errs    []string
	maxLat  time.Duration
	slow    int // exchanges over 100ms
	wrongIP int
}

func (tr *traffic) record(lat time.Duration, err error) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if err != nil {
		tr.failed++
		if len(tr.errs) < 5 {
			tr.errs = append(tr.errs, fmt.Sprintf("%s: %v", time.Now().Format("15:04:05.000"), err))
		}
		return
	}
	tr.ok++
	tr.maxLat = max(tr.maxLat, lat)
	if lat > 100*time.Millisecond {
		tr.slow++
	}
}

func (tr *traffic) String() string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return fmt.Sprintf("%d ok, %d failed, %d over 100ms, slowest %s", tr.ok, tr.failed, tr.slow, tr.maxLat.Round(100*time.Microsecond))
}

// agentProc returns the supervisor's view of the node's agent.
func (d *datapathLab) agentProc(ctx context.Context) (pid int, running bool, detail string, err error) {
	st, err := lab.SupervisorStatus(ctx, d.l.dir)
	if err != nil {
		return 0, false, "", err
	}
	for _, p := range st.Procs {
		if p.Name == "agent-"+d.node {
			return p.PID, p.Running, fmt.Sprintf("%+v", p), nil
		}
	}
	return 0, false, "", fmt.Errorf("no agent-%s in the supervisor status", d.node)
}

// killAgent SIGKILLs the node's agent and waits until the supervisor has
// restarted it and the new agent reports ready.
func (d *datapathLab) killAgent(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	pid, running, detail, err := d.agentProc(ctx)
	if err != nil || !running {
		t.Fatalf("agent-%s before the kill: %v %s", d.node, err, detail)
	}
	killed := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill agent-%s (pid %d): %v", d.node, pid, err)
	}
	t.Logf("SIGKILL agent-%s pid %d at %s", d.node, pid, killed.Format("15:04:05.000"))
	for {
		newPID, running, detail, err := d.agentProc(ctx)
		if err == nil && running && newPID != pid {
			t.Logf("figure: supervisor restarted agent-%s (pid %d) %s after SIGKILL", d.node, newPID, time.Since(killed).Round(10*time.Millisecond))
			break
		}
		if time.Since(killed) > 10*time.Second {
			t.Fatalf("agent-%s not restarted within 10s: %v %s", d.node, err, detail)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for !d.agentReady() {
		if time.Since(killed) > 30*time.Second {
			t.Fatalf("restarted agent-%s not ready within 30s", d.node)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("figure: restarted agent-%s ready %s after SIGKILL", d.node, time.Since(killed).Round(10*time.Millisecond))
}

// agentReady asks the agent's /readyz on its node's loopback (the lab's
// agent health address, 127.0.0.1:9962).
func (d *datapathLab) agentReady() bool {
	ok := false
	netns.Do(netns.Path(labNetns(d.node)), func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:9962", time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		fmt.Fprint(c, "GET /readyz HTTP/1.0\r\nHost: agent\r\n\r\n")
		line, _ := bufio.NewReader(c).ReadString('\n')
		ok = strings.Contains(line, " 200 ")
		return nil
	})
	return ok
}

// runAcrossKill runs loop in the background, kills the agent after 2s and
// lets the loop go on until at least 6s in total and 3s after the new
// agent is ready.
func (d *datapathLab) runAcrossKill(t *testing.T, loop func(ctx context.Context)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	start := time.Now()
	wg.Go(func() { loop(ctx) })
	time.Sleep(2 * time.Second)
	d.killAgent(t)
	time.Sleep(max(3*time.Second, 6*time.Second-time.Since(start)))
	cancel()
	wg.Wait()
}

// killDuringLongTransfer keeps one connection exchanging every 10ms while
// the agent is killed and restarted: its conntrack entry must survive.
func (d *datapathLab) killDuringLongTransfer(t *testing.T) {
	c, err := d.dial(2 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	first, err := exchange(c, r, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	before, ok := d.ctFlows(t)[local]
	if !ok || before.NAT != first || first.Addr() != d.nodeIP {
		t.Fatalf("before the kill: server sees %v, sb_ct has %+v (present %v), want the node address %s in both", first, before, ok, d.nodeIP)
	}

	var tr traffic
	broken := false
	d.runAcrossKill(t, func(ctx context.Context) {
		for ctx.Err() == nil && !broken {
			start := time.Now()
			peer, err := exchange(c, r, 2*time.Second)
			if err == nil && peer != first {
				err = fmt.Errorf("server now sees %v, was %v", peer, first)
			}
			tr.record(time.Since(start), err)
			// A failed exchange leaves the stream out of step: stop.
			broken = err != nil
			time.Sleep(10 * time.Millisecond)
		}
	})
	t.Logf("figure: long connection %v ⇢ %v, exchanges every 10ms across the kill: %s", local, first, &tr)
	if tr.failed > 0 {
		t.Errorf("%d exchanges failed: %s", tr.failed, strings.Join(tr.errs, "; "))
	}
	// Still intact afterwards, under the same translation.
	if peer, err := exchange(c, r, 2*time.Second); err != nil || peer != first {
		t.Errorf("after the restart: exchange %v, server sees %v, want %v", err, peer, first)
	}
	after, ok := d.ctFlows(t)[local]
	if !ok || after.NAT != before.NAT {
		t.Errorf("sb_ct entry of the long connection after the restart: %+v (present %v), before %+v", after, ok, before)
	}
}

// killDuringShortConnections opens a connection every ~5ms (connect, one
// exchange, close) while the agent is killed and restarted.
func (d *datapathLab) killDuringShortConnections(t *testing.T) {
	var tr traffic
	var wrong atomic.Int32
	d.runAcrossKill(t, func(ctx context.Context) {
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			start := time.Now()
			err := d.shortConnection(&wrong)
			tr.record(time.Since(start), err)
			select {
			case <-ctx.Done():
			case <-tick.C:
			}
		}
	})
	t.Logf("figure: short connections every 5ms across the kill: %s", &tr)
	if tr.failed > 0 {
		t.Errorf("%d short connections failed (%d with an unexpected source), e.g. %s", tr.failed, wrong.Load(), strings.Join(tr.errs, "; "))
	}
	if tr.ok < 500 {
		t.Errorf("only %d short connections in the run, want at least 500", tr.ok)
	}
}

func (d *datapathLab) shortConnection(wrong *atomic.Int32) error {
	c, err := d.dial(2 * time.Second)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer c.Close()
	peer, err := exchange(c, bufio.NewReader(c), 2*time.Second)
	if err != nil {
		return fmt.Errorf("%v: %w", c.LocalAddr(), err)
	}
	if peer.Addr() != d.nodeIP {
		wrong.Add(1)
		return errors.New("server saw " + peer.String() + ", want " + d.nodeIP.String())
	}
	return nil
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}
