//go:build linux

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
	"github.com/sinabro-io/sinabro/pkg/flows"
	"github.com/sinabro-io/sinabro/pkg/lab"
)

// TestBenchFlows compares the datapath with flow telemetry off and on (the
// default: every new flow, drop, translation and accelerated connection an
// event, read by the agent into its buffer): connection rate and
// request/response rate, same node and across nodes, A/B interleaved in
// each round. The switch is the pinned settings map both agents' datapaths
// read, so nothing restarts between rounds. Acceleration is off: every
// packet crosses the tc programs that send the events.
func TestBenchFlows(t *testing.T) {
	needBench(t)
	l, _ := newNamedLab(t, labName, 2, 2, lab.KubeProxyNone, "--agent-arg=--tcp-acceleration=false", "--timeout=10m")
	_, cfg, _ := labBasics(t, l)
	pods, run := startBenchWorkload(t, l)
	var cfgMaps []*ebpf.Map
	for _, node := range []string{"node-1", "node-2"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(bpffs.SharedDir(filepath.Join(cfg.BPFRoot, node)), "sb_flow_cfg"), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		cfgMaps = append(cfgMaps, m)
	}
	// The agents' CPU time while telemetry was on and off (each apply
	// ends the previous setting's measurements).
	agentCPU := map[bool]time.Duration{}
	var lastCPU time.Duration
	lastOn := false
	apply := func(on bool) {
		now := agentsCPU(t, l)
		agentCPU[lastOn] += now - lastCPU
		lastCPU, lastOn = now, on
		for _, m := range cfgMaps {
			if err := flows.Configure(m, flows.Settings{Enabled: on, FlowRate: flows.DefaultFlowRate, DropRate: flows.DefaultDropRate}); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(500 * time.Millisecond) // the agents drain what is in flight
	}
	before := agentMetrics(t, "node-1")
	const rounds = 9
	agentsCPU(t, l)
	lastCPU = agentsCPU(t, l)
	results := benchAB(rounds, apply, pods, run)
	apply(true)
	after := agentMetrics(t, "node-1")

	var b strings.Builder
	fmt.Fprintf(&b, "Flow telemetry benchmark: events off vs on, %d rounds interleaved (median)\n\n", rounds)
	benchABTable(&b, results, "telemetry off", "telemetry on")
	fmt.Fprintf(&b, "\nnode-1 during the run: %.0f events read, %.0f lost, %.0f flows sampled out\n",
		after[`sinabro_flow_events_total{type="new"}`]-before[`sinabro_flow_events_total{type="new"}`],
		after["sinabro_flow_events_lost_total"]-before["sinabro_flow_events_lost_total"],
		after[`sinabro_flow_events_sampled_out_total{class="flow"}`]-before[`sinabro_flow_events_sampled_out_total{class="flow"}`])
	fmt.Fprintf(&b, "both agents' CPU time: %s with telemetry off, %s on\n", agentCPU[false].Round(time.Millisecond), agentCPU[true].Round(time.Millisecond))
	t.Log("\n" + b.String())
	fmt.Print(b.String())
}

// agentsCPU sums the user and system time of the lab's running agents.
func agentsCPU(t *testing.T, l *testLab) time.Duration {
	t.Helper()
	st, err := lab.SupervisorStatus(context.Background(), l.dir)
	if err != nil {
		t.Fatal(err)
	}
	var total time.Duration
	for _, p := range st.Procs {
		if !strings.HasPrefix(p.Name, "agent-") || !p.Running {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.PID))
		if err != nil {
			t.Fatal(err)
		}
		// Fields after the command's closing parenthesis: utime is the
		// 12th, stime the 13th, in clock ticks (USER_HZ, 100).
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		for _, i := range []int{11, 12} {
			v, _ := strconv.Atoi(f[i])
			total += time.Duration(v) * 10 * time.Millisecond
		}
	}
	return total
}
