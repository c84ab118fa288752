package datapath

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestConnRateBenchmark compares the pod-to-outside TCP connection rate
// through eBPF masquerading and through nftables' masquerade, alternating
// the two in rounds so machine noise hits both. It takes ~30s and only runs
// with SINABRO_BENCH=1:
//
//	SINABRO_BENCH=1 go test -run ConnRateBenchmark -v ./pkg/datapath
func TestConnRateBenchmark(t *testing.T) {
	if os.Getenv("SINABRO_BENCH") == "" {
		t.Skip("benchmark: set SINABRO_BENCH=1 to run")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nft for the baseline")
	}
	const (
		serverPorts = 50
		workers     = 8
		rounds      = 3
		phase       = 3 * time.Second
	)
	topo := newTopology(t)
	cfg := topo.config(t)
	// Closed flows hold their two entries until GC (10s): size for the churn.
	cfg.CTSize = 1 << 18
	node := topo.base + "-node"

	// One-byte request/response servers on many ports, so neither side's
	// port space (nor TIME_WAIT) limits the rate.
	for i := range serverPorts {
		ln := in(t, topo.ext, func() (net.Listener, error) {
			return net.Listen("tcp4", fmt.Sprintf("%s:%d", topoExt, 9000+i))
		})
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					b := make([]byte, 1)
					if _, err := io.ReadFull(c, b); err != nil {
						return
					}
					c.Write(b)
					io.Copy(io.Discard, c) // until the client closes
				}()
			}
		}()
	}

	churn := func() (int64, int64) {
		var ok, failed atomic.Int64
		deadline := time.Now().Add(phase)
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				netns.Do(topo.pod, func() error {
					b := []byte{1}
					for i := w; time.Now().Before(deadline); i += workers {
						c, err := net.DialTimeout("tcp4", fmt.Sprintf("%s:%d", topoExt, 9000+i%serverPorts), time.Second)
						if err != nil {
							if failed.Add(1) < 3 {
								t.Logf("dial: %v", err)
							}
							continue
						}
						c.SetDeadline(time.Now().Add(time.Second))
						if _, err := c.Write(b); err == nil {
							if _, err = io.ReadFull(c, b); err == nil {
								ok.Add(1)
							} else if failed.Add(1) < 3 {
								t.Logf("read: %v", err)
							}
						} else {
							failed.Add(1)
						}
						c.Close()
					}
					return nil
				})
			}()
		}
		wg.Wait()
		return ok.Load(), failed.Load()
	}

	nft := func(script string) {
		t.Helper()
		cmd := exec.Command("ip", "netns", "exec", node, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(script)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("nft: %v: %s", err, out)
		}
	}
	nftOn := `table ip sbbench {
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "uplink0" ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade
	}
}`
	t.Cleanup(func() { exec.Command("ip", "netns", "exec", node, "nft", "delete", "table", "ip", "sbbench").Run() })

	rates := map[string][]float64{}
	for r := range rounds {
		for _, mode := range []string{"ebpf", "ebpf-full", "ebpf+hr", "nft"} {
			var stop func()
			switch mode {
			case "ebpf", "ebpf-full", "ebpf+hr":
				c := cfg
				c.RouteOut = mode == "ebpf+hr"
				d := topo.load(t, c)
				if mode == "ebpf-full" {
					fillConntrack(t, d, int(cfg.CTSize)*9/10)
				}
				if mode == "ebpf+hr" { // the agent's default: host routing too
					if err := d.UpsertEndpoint(topo.podEndpoint); err != nil {
						t.Fatal(err)
					}
					if err := netns.Do(topo.node, func() error { return d.AttachHostVeth(topo.podEndpoint.Ifindex) }); err != nil {
						t.Fatal(err)
					}
				}
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan struct{})
				go func() { d.RunGC(ctx, 10*time.Second, t.Logf); close(done) }() // the agent's GC interval
				stop = func() {
					cancel()
					<-done
					if cs, err := Counters(d.objs.SbCounters); err == nil {
						t.Logf("counters: %+v", cs)
					}
					d.Close()
					Cleanup(cfg.BPFRoot)
				}
			case "nft":
				nft(nftOn)
				stop = func() { nft("delete table ip sbbench") }
			}
			ok, failed := churn()
			stop()
			rate := float64(ok) / phase.Seconds()
			rates[mode] = append(rates[mode], rate)
			t.Logf("round %d %-4s: %7.0f conn/s (%d failed)", r+1, mode, rate, failed)
			if failed > ok/100 {
				t.Errorf("%s: %d of %d connections failed", mode, failed, ok+failed)
			}
		}
	}
	mean := func(v []float64) float64 {
		s := 0.0
		for _, x := range v {
			s += x
		}
		return s / float64(len(v))
	}
	e, f, h, n := mean(rates["ebpf"]), mean(rates["ebpf-full"]), mean(rates["ebpf+hr"]), mean(rates["nft"])
	t.Logf("mean: ebpf %.0f conn/s, ebpf with the conntrack table 90%% full %.0f conn/s, ebpf with host routing %.0f conn/s, nft masquerade %.0f conn/s; ratio ebpf/nft %.2f, ebpf+host routing/nft %.2f, full/empty %.2f",
		e, f, h, n, e/n, h/n, f/e)
}

// fillConntrack puts n live-looking flows into the conntrack table, so a
// benchmark sees the cost of a nearly full table (and its LRU evictions).
func fillConntrack(t *testing.T, d *Datapath, n int) {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	now := uint64(ts.Nano())
	const batch = 4096
	keys := make([]datapathCtKey, 0, batch)
	vals := make([]datapathCtEntry, 0, batch)
	flush := func() {
		if len(keys) == 0 {
			return
		}
		if _, err := d.objs.SbCt.BatchUpdate(keys, vals, nil); err != nil {
			t.Fatalf("fill conntrack: %v", err)
		}
		keys, vals = keys[:0], vals[:0]
	}
	for i := 0; i < n; i++ {
		keys = append(keys, datapathCtKey{Saddr: 0x0a630000 | uint32(i>>16), Daddr: 0xc6336401, Sport: uint16(i), Dport: 80, Proto: unix.IPPROTO_TCP})
		vals = append(vals, datapathCtEntry{Created: now, LastSeen: now, Addr: 0x0a630001, Port: uint16(i)})
		if len(keys) == batch {
			flush()
		}
	}
	flush()
}

// TestHostRoutingBenchmark compares same-node pod→pod traffic with host
// routing attached (bpf_redirect_peer between host veths) and detached
// (plain routing through the node's stack): 1-byte TCP request/response
// rate over one connection and summed over 8 concurrent ones (where the
// per-packet CPU cost shows rather than wake-up latency), and iperf3
// single-stream throughput, alternating on/off per round.
//
//	SINABRO_BENCH=1 go test -run HostRoutingBenchmark -v ./pkg/datapath
func TestHostRoutingBenchmark(t *testing.T) {
	if os.Getenv("SINABRO_BENCH") == "" {
		t.Skip("benchmark: set SINABRO_BENCH=1 to run")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Skip("needs iperf3")
	}
	const rounds = 5
	topo := newTopology(t)
	pod2Addr := netip.MustParseAddr("10.244.1.6")
	pod2, ep2 := topo.addPod(t, "pod2", pod2Addr)
	d := topo.load(t, topo.config(t))
	defer d.Close()
	topo.setForwarding(t, true) // "off" must still work, through the stack
	eps := []Endpoint{topo.podEndpoint, ep2}
	for _, ep := range eps {
		if err := d.UpsertEndpoint(ep); err != nil {
			t.Fatal(err)
		}
	}
	set := func(on bool) {
		for _, ep := range eps {
			err := netns.Do(topo.node, func() error {
				if on {
					return d.AttachHostVeth(ep.Ifindex)
				}
				return d.DetachHostVeth(ep.Ifindex)
			})
			if err != nil {
				t.Fatalf("host routing %v on ifindex %d: %v", on, ep.Ifindex, err)
			}
		}
	}

	copyServer(t, pod2, pod2Addr.String()+":8081")
	rr := func(conns int) float64 { return requestRate(t, topo.pod, pod2Addr.String()+":8081", conns) }
	iperf := func() float64 {
		var srv *exec.Cmd
		if err := netns.Do(pod2, func() error {
			srv = exec.Command("iperf3", "-s", "-1", "-p", "5397")
			return srv.Start()
		}); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
		time.Sleep(300 * time.Millisecond)
		var out []byte
		err := netns.Do(topo.pod, func() (err error) {
			out, err = exec.Command("iperf3", "-c", pod2Addr.String(), "-p", "5397", "-t", "3", "-J").Output()
			return err
		})
		if err != nil {
			t.Fatalf("iperf3: %v", err)
		}
		var res struct {
			End struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatal(err)
		}
		return res.End.SumReceived.BitsPerSecond / 1e9
	}
	results := map[bool][3][]float64{}
	for r := 0; r < rounds; r++ {
		for _, on := range []bool{r%2 == 0, r%2 != 0} {
			set(on)
			cur := results[on]
			cur[0] = append(cur[0], rr(1))
			cur[1] = append(cur[1], rr(8))
			cur[2] = append(cur[2], iperf())
			results[on] = cur
		}
	}
	med := func(xs []float64) float64 { s := slices.Clone(xs); slices.Sort(s); return s[len(s)/2] }
	var b strings.Builder
	fmt.Fprintf(&b, "same-node pod→pod, %d rounds interleaved (median)\n%-14s %18s %18s %14s\n", rounds, "host routing", "req/resp /s 1 conn", "req/resp /s 8 conn", "iperf3 Gbit/s")
	for _, on := range []bool{true, false} {
		fmt.Fprintf(&b, "%-14v %18.0f %18.0f %14.2f\n", on, med(results[on][0]), med(results[on][1]), med(results[on][2]))
	}
	ratio := func(i int) float64 { return med(results[true][i]) / med(results[false][i]) }
	fmt.Fprintf(&b, "%-14s %17.2fx %17.2fx %13.2fx\n", "ratio on/off", ratio(0), ratio(1), ratio(2))
	t.Log("\n" + b.String())
}

// copyServer echoes every TCP connection to addr, in the namespace at path,
// until the test ends.
func copyServer(t *testing.T, path, addr string) {
	ln := in(t, path, func() (net.Listener, error) { return net.Listen("tcp4", addr) })
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
}

// requestRate runs conns concurrent 1-byte request/response loops from the
// namespace at path to addr for 2 s and returns the summed rate.
func requestRate(t *testing.T, path, addr string, conns int) float64 {
	var total atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range conns {
		c := in(t, path, func() (net.Conn, error) { return net.Dial("tcp4", addr) })
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			buf := make([]byte, 1)
			for time.Since(start) < 2*time.Second {
				if _, err := c.Write(buf); err != nil {
					t.Error(err)
					return
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					t.Error(err)
					return
				}
				total.Add(1)
			}
		}()
	}
	wg.Wait()
	return float64(total.Load()) / time.Since(start).Seconds()
}

// TestKernelCTBenchmark measures what asking the kernel's conntrack costs
// host routing (kube-proxy coexistence, Config.KernelCT): same-node
// pod→pod request/response with it on and off, interleaved, in a node
// whose conntrack is active (a NAT table loaded, as kube-proxy's is).
func TestKernelCTBenchmark(t *testing.T) {
	if os.Getenv("SINABRO_BENCH") == "" {
		t.Skip("benchmark: set SINABRO_BENCH=1 to run")
	}
	const rounds = 6
	topo := newTopology(t)
	pod2Addr := netip.MustParseAddr("10.244.1.6")
	pod2, ep2 := topo.addPod(t, "pod2", pod2Addr)
	nft := exec.Command("ip", "netns", "exec", topo.base+"-node", "nft", "-f", "-")
	nft.Stdin = strings.NewReader("table ip sbsvc {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  ip daddr 10.96.0.10 tcp dport 80 dnat to 10.244.1.6:8081\n }\n}\n")
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	copyServer(t, pod2, pod2Addr.String()+":8081")
	cfg := topo.config(t)
	load := func(kernelCT bool) *Datapath {
		c := cfg
		c.KernelCT = kernelCT
		d := topo.load(t, c)
		for _, ep := range []Endpoint{topo.podEndpoint, ep2} {
			if err := d.UpsertEndpoint(ep); err != nil {
				t.Fatal(err)
			}
			if err := netns.Do(topo.node, func() error { return d.AttachHostVeth(ep.Ifindex) }); err != nil {
				t.Fatal(err)
			}
		}
		return d
	}
	results := map[bool][2][]float64{}
	for r := range rounds {
		for _, on := range []bool{r%2 == 0, r%2 != 0} {
			d := load(on)
			cur := results[on]
			cur[0] = append(cur[0], requestRate(t, topo.pod, pod2Addr.String()+":8081", 1))
			cur[1] = append(cur[1], requestRate(t, topo.pod, pod2Addr.String()+":8081", 8))
			results[on] = cur
			d.Close()
		}
	}
	med := func(xs []float64) float64 { s := slices.Clone(xs); slices.Sort(s); return s[len(s)/2] }
	var b strings.Builder
	fmt.Fprintf(&b, "same-node pod→pod with host routing, %d rounds interleaved (median)\n%-22s %18s %18s\n", rounds, "kernel conntrack check", "req/resp /s 1 conn", "req/resp /s 8 conn")
	for _, on := range []bool{true, false} {
		fmt.Fprintf(&b, "%-22v %18.0f %18.0f\n", on, med(results[on][0]), med(results[on][1]))
	}
	fmt.Fprintf(&b, "%-22s %17.2fx %17.2fx\n", "ratio on/off", med(results[true][0])/med(results[false][0]), med(results[true][1])/med(results[false][1]))
	t.Log("\n" + b.String())
}

// TestKernelCTCost times host_route on one same-node TCP packet with
// BPF_PROG_RUN, the conntrack check on and off: the check's cost per
// packet, free of the scheduling noise of the request/response figures
// (the lookup misses here, as it does for untranslated pod traffic).
func TestKernelCTCost(t *testing.T) {
	if os.Getenv("SINABRO_BENCH") == "" {
		t.Skip("benchmark: set SINABRO_BENCH=1 to run")
	}
	if err := KernelCTAvailable(); err != nil {
		t.Skipf("kernel without conntrack kfuncs: %v", err)
	}
	local := Endpoint{IP: netip.MustParseAddr("10.244.1.6"), Ifindex: 42,
		PodMAC: net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 6}, HostMAC: net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 6}, Local: true}
	frame := pkt{proto: layers.IPProtocolTCP, src: testPod, dst: local.IP, sport: 40000, dport: 80, tcpFlags: "A", payload: []byte("x")}.bytes(t)
	perPacket := func(kernelCT bool) time.Duration {
		cfg := testConfig()
		cfg.KernelCT = kernelCT
		objs := newTestObjects(t, cfg)
		if err := (&Datapath{cfg: cfg, objs: *objs}).UpsertEndpoint(local); err != nil {
			t.Fatal(err)
		}
		_, per, err := objs.HostRoute.Benchmark(frame, 1_000_000, nil)
		if err != nil {
			t.Fatal(err)
		}
		return per
	}
	var on, off []float64
	for r := range 6 {
		for _, ct := range []bool{r%2 == 0, r%2 != 0} {
			d := float64(perPacket(ct).Nanoseconds())
			if ct {
				on = append(on, d)
			} else {
				off = append(off, d)
			}
		}
	}
	med := func(xs []float64) float64 { s := slices.Clone(xs); slices.Sort(s); return s[len(s)/2] }
	t.Logf("host_route per same-node TCP packet (BPF_PROG_RUN ×1,000,000, median of 6 interleaved): kernel conntrack check on %.0f ns, off %.0f ns, cost %.0f ns",
		med(on), med(off), med(on)-med(off))
}
