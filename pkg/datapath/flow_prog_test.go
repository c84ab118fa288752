package datapath

import (
	"errors"
	"net/netip"
	"os"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/gopacket/gopacket/layers"

	"github.com/sinabro-io/sinabro/pkg/flows"
)

// TestFlowEventLayout checks pkg/flows' reading of the event, settings and
// counters against the object's BTF.
func TestFlowEventLayout(t *testing.T) {
	spec, err := loadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int{"flow_event": flows.RawSize, "flow_cfg": 16, "flow_state": 56 + flows.RawSize} {
		var s *btf.Struct
		if err := spec.Types.TypeByName(name, &s); err != nil {
			t.Fatal(err)
		}
		if int(s.Size) != want {
			t.Errorf("struct %s is %d bytes, pkg/flows reads %d", name, s.Size, want)
		}
	}
}

// TestFlowEvents drives the datapath's events through BPF_PROG_RUN: a
// policy drop names its policy, a new flow its rule and verdict, replies
// and later packets send nothing, the drop budget summarises a flood, and
// nothing is sent while telemetry is off.
func TestFlowEvents(t *testing.T) {
	cfg := testConfig()
	cfg.Policy = true
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	pod := netip.MustParseAddr("10.244.1.5")
	friend := netip.MustParseAddr("10.244.2.7")
	const friendID = 20
	if _, err := d.Policy().SyncPolicy(PolicyState{
		Endpoints: map[netip.Addr]PolicyEndpoint{pod: {Ifindex: 1, Isolated: [2]bool{true, true}, DenyPolicy: [2]uint32{7, 8}}},
		IPCache:   map[netip.Prefix]uint32{netip.PrefixFrom(friend, 32): friendID},
		Rules: map[PolicyRuleKey]uint32{
			{Pod: pod, Identity: friendID, Dir: Ingress, Proto: 6, Port: 80, PortBits: 16}: 101,
		},
	}); err != nil {
		t.Fatal(err)
	}
	r, err := ringbuf.NewReader(objs.SbFlowEvents)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	read := func() []flows.Raw {
		var out []flows.Raw
		for {
			r.SetDeadline(time.Now().Add(50 * time.Millisecond))
			rec, err := r.Read()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return out
			}
			if err != nil {
				t.Fatal(err)
			}
			ev, err := flows.Decode(rec.RawSample)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, ev)
		}
	}
	tcp := func(src, dst netip.Addr, sport, dport uint16, flags string) []byte {
		return pkt{proto: layers.IPProtocolTCP, src: src, dst: dst, sport: sport, dport: dport, tcpFlags: flags}.bytes(t)
	}

	// Off (the loader's default): nothing.
	run(t, objs.PolToPod, tcp(friend, pod, 41000, 80, "S"))
	run(t, objs.HostRoute, tcp(pod, friend, 41001, 80, "S"))
	if evs := read(); len(evs) != 0 {
		t.Fatalf("telemetry off: %d events, want none: %+v", len(evs), evs)
	}

	if err := flows.Configure(objs.SbFlowCfg, flows.Settings{Enabled: true, FlowRate: 100, DropRate: 3}); err != nil {
		t.Fatal(err)
	}
	run(t, objs.PolToPod, tcp(friend, pod, 42000, 80, "S"))   // new, allowed by rule 101
	run(t, objs.HostRoute, tcp(pod, friend, 80, 42000, "SA")) // its reply: nothing
	run(t, objs.PolToPod, tcp(friend, pod, 42000, 80, "A"))   // established: nothing
	run(t, objs.HostRoute, tcp(pod, friend, 42001, 80, "S"))  // egress denied by policy 8
	evs := read()
	if len(evs) != 2 {
		t.Fatalf("got %d events, want a new flow and a drop: %+v", len(evs), evs)
	}
	nw, drop := evs[0], evs[1]
	if nw.Type != flows.TypeNew || nw.Src != friend || nw.Dst != pod || nw.SPort != 42000 || nw.DPort != 80 || nw.Proto != 6 ||
		nw.Verdict[0] != flows.VerdictAllowed || nw.Rule[0] != 101 || nw.Verdict[1] != flows.VerdictNone || nw.Prog != uint8(datapathProgIdPROG_POL_TO_POD) {
		t.Errorf("new flow event = %+v, want friend:42000 -> pod:80 TCP, ingress allowed by rule 101, from pol_to_pod", nw)
	}
	if drop.Type != flows.TypeDrop || drop.Src != pod || drop.Dst != friend || drop.DPort != 80 ||
		drop.Reason != uint8(datapathReasonREASON_DROP_POLICY) || drop.Verdict[1] != flows.VerdictDenied || drop.Rule[1] != 8 || drop.Bytes == 0 {
		t.Errorf("drop event = %+v, want pod -> friend:80 dropped (drop_policy), egress denied by policy 8", drop)
	}

	// A flood of 10 drops in one second: 3 sent (budget), the rest counted
	// as sampled out, and the flows' budget untouched.
	for i := 0; i < 10; i++ {
		run(t, objs.HostRoute, tcp(pod, friend, uint16(43000+i), 80, "S"))
	}
	run(t, objs.PolToPod, tcp(friend, pod, 44000, 80, "S"))
	evs = read()
	var ndrop, nnew int
	for _, e := range evs {
		switch e.Type {
		case flows.TypeDrop:
			ndrop++
		case flows.TypeNew:
			nnew++
		}
	}
	// The budget's second may have begun between the two bursts: 1 or 2
	// drops sent (the earlier drop counts), never more than 3 per window.
	if ndrop < 1 || ndrop > 3 || nnew != 1 {
		t.Errorf("after a flood of 10 drops: %d drop events, %d new flows; want the drops within their budget of 3 and the new flow sent", ndrop, nnew)
	}
	cs, err := flows.ReadCounters(objs.SbFlowState)
	if err != nil {
		t.Fatal(err)
	}
	if cs.SampledDrops < 7 || cs.SampledFlows != 0 || cs.Lost != 0 {
		t.Errorf("counters = %+v, want at least 7 drops sampled out, no flow sampled out, none lost", cs)
	}
}

// TestFlowEventsCost measures what flow telemetry costs the datapath, per
// packet, through BPF_PROG_RUN on pol_to_pod (NetworkPolicy on, the pod
// isolated): a packet of an established flow (no event either way) and a
// flow's first packet (a FLOW_NEW event when on), with telemetry off and
// on alternating over rounds, a reader draining the ring as the agent
// does. Only with SINABRO_BENCH=1:
//
//	SINABRO_BENCH=1 go test -run FlowEventsCost -v ./pkg/datapath
func TestFlowEventsCost(t *testing.T) {
	if os.Getenv("SINABRO_BENCH") == "" {
		t.Skip("benchmark: set SINABRO_BENCH=1 to run")
	}
	cfg := testConfig()
	cfg.Policy = true
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	pod := netip.MustParseAddr("10.244.1.5")
	friends := netip.MustParsePrefix("10.244.2.0/24")
	if _, err := d.Policy().SyncPolicy(PolicyState{
		Endpoints: map[netip.Addr]PolicyEndpoint{pod: {Ifindex: 1, Isolated: [2]bool{true, false}, DenyPolicy: [2]uint32{7, 0}}},
		IPCache:   map[netip.Prefix]uint32{friends: 20},
		Rules:     map[PolicyRuleKey]uint32{{Pod: pod, Identity: 20, Dir: Ingress, Proto: 6, Port: 80, PortBits: 16}: 101},
	}); err != nil {
		t.Fatal(err)
	}
	r, err := ringbuf.NewReader(objs.SbFlowEvents)
	if err != nil {
		t.Fatal(err)
	}
	var events atomic.Int64
	go func() {
		var rec ringbuf.Record
		for {
			r.SetDeadline(time.Now().Add(100 * time.Millisecond))
			err := r.ReadInto(&rec)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			if err != nil {
				return
			}
			events.Add(1)
		}
	}()
	defer r.Close()
	set := func(on bool) {
		// No rate limit: all runs are on one CPU, far past its budget.
		if err := flows.Configure(objs.SbFlowCfg, flows.Settings{Enabled: on}); err != nil {
			t.Fatal(err)
		}
	}
	tcp := func(src netip.Addr, sport uint16, flags string) []byte {
		return pkt{proto: layers.IPProtocolTCP, src: src, dst: pod, sport: sport, dport: 80, tcpFlags: flags}.bytes(t)
	}
	established := tcp(netip.MustParseAddr("10.244.2.1"), 40000, "A")
	run(t, objs.PolToPod, tcp(netip.MustParseAddr("10.244.2.1"), 40000, "S"))

	const rounds, newFlows = 7, 4000
	results := map[bool][2][]float64{} // on → [established ns, new flow ns]
	src := 2
	for round := range rounds {
		for _, on := range []bool{round%2 == 1, round%2 == 0} {
			set(on)
			_, per, err := objs.PolToPod.Benchmark(established, 200000, nil)
			if err != nil {
				t.Fatal(err)
			}
			// First packets: a fresh source address per measurement, a
			// fresh port per packet (the BPF_PROG_RUN syscall is in both).
			frames := make([][]byte, newFlows)
			for i := range frames {
				frames[i] = tcp(netip.AddrFrom4([4]byte{10, 244, 2, byte(src)}), uint16(1024+i), "S")
			}
			src++
			start := time.Now()
			for _, f := range frames {
				if _, err := objs.PolToPod.Run(&ebpf.RunOptions{Data: f}); err != nil {
					t.Fatal(err)
				}
			}
			took := time.Since(start)
			res := results[on]
			res[0] = append(res[0], float64(per.Nanoseconds()))
			res[1] = append(res[1], float64(took.Nanoseconds())/newFlows)
			results[on] = res
		}
	}
	time.Sleep(200 * time.Millisecond)
	med := func(xs []float64) float64 {
		s := append([]float64{}, xs...)
		sort.Float64s(s)
		return s[len(s)/2]
	}
	t.Logf("flow telemetry in pol_to_pod, %d rounds interleaved (median ns per packet):", rounds)
	t.Logf("| packet | off | on | on − off |")
	t.Logf("|---|---|---|---|")
	for i, name := range []string{"established flow (no event)", "first packet (a FLOW_NEW event when on; incl. the run syscall)"} {
		off, on := med(results[false][i]), med(results[true][i])
		t.Logf("| %s | %.0f | %.0f | %+.0f |", name, off, on, on-off)
	}
	t.Logf("events read: %d (want %d)", events.Load(), rounds*newFlows)
	if got := events.Load(); got < int64(rounds*newFlows) {
		t.Errorf("events read %d, want %d: some lost", got, rounds*newFlows)
	}
}
