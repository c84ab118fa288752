package datapath

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
		for _, mode := range []string{"ebpf", "nft"} {
			var stop func()
			switch mode {
			case "ebpf":
				d := topo.load(t, cfg)
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan struct{})
				go func() { d.RunGC(ctx, time.Second, t.Logf); close(done) }()
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
	e, n := mean(rates["ebpf"]), mean(rates["nft"])
	t.Logf("mean: ebpf %.0f conn/s, nft masquerade %.0f conn/s, ratio ebpf/nft %.2f", e, n, e/n)
}
