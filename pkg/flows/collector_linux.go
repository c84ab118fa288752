package flows

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// Settings are the datapath's event budget (bpf/lib/flow.h's flow_cfg).
type Settings struct {
	Enabled bool
	// FlowRate and DropRate bound the events per second and CPU, for
	// flows (new, translate, service, accel-end) and drops each: a flood
	// of drops never pushes the flows out. 0: unbounded.
	FlowRate, DropRate uint32
}

// Configure writes the settings into the pinned sb_flow_cfg map: the
// agent at start, the benchmark between rounds.
func Configure(cfg *ebpf.Map, s Settings) error {
	v := flowCfg{Rate: [2]uint32{s.FlowRate, s.DropRate}}
	if s.Enabled {
		v.Enabled = 1
	}
	if err := cfg.Put(uint32(0), v); err != nil {
		return fmt.Errorf("write flow telemetry settings: %w", err)
	}
	return nil
}

// flowCfg and flowState mirror bpf/lib/flow.h (sizes checked by a test).
type flowCfg struct {
	Enabled uint32
	Rate    [2]uint32
	_       uint32
}

type flowState struct {
	Window     uint64
	Sent       [2]uint32
	Suppressed [2]uint32
	Sampled    [2]uint64
	Lost       uint64
	HasPending uint32
	_          uint32
	Pending    [RawSize]byte
}

// Counters sum the datapath's per-CPU flow counters.
type Counters struct {
	Lost                       uint64 // refused by the full ring
	SampledFlows, SampledDrops uint64 // left out by the rate limit
}

// ReadCounters reads sb_flow_state.
func ReadCounters(state *ebpf.Map) (Counters, error) {
	var per []flowState
	if err := state.Lookup(uint32(0), &per); err != nil {
		return Counters{}, fmt.Errorf("read flow telemetry counters: %w", err)
	}
	var c Counters
	for _, v := range per {
		c.SampledFlows += v.Sampled[0]
		c.SampledDrops += v.Sampled[1]
		c.Lost += v.Lost
	}
	return c, nil
}

// Collector reads the datapath's events into a Buffer and counts them.
type Collector struct {
	node   string
	names  Names
	namer  Namer
	buf    *Buffer
	maps   map[string]*ebpf.Map
	reader *ringbuf.Reader
	boot   time.Time
	log    *slog.Logger

	events   *prometheus.CounterVec
	drops    *prometheus.CounterVec
	newFlows *prometheus.CounterVec
	local    func(ns, pod string) bool
}

// NewCollector starts reading the shared maps (flow telemetry's ring,
// settings, counters, as datapath.FlowMaps opens them). local tells
// whether a pod runs on this node: only those get pod labels on the
// metrics, which bounds their series by the node's pod capacity.
func NewCollector(node string, maps map[string]*ebpf.Map, names Names, namer Namer, local func(ns, pod string) bool, buf *Buffer, log *slog.Logger) (*Collector, error) {
	for _, name := range []string{"sb_flow_events", "sb_flow_cfg", "sb_flow_state"} {
		if maps[name] == nil {
			return nil, fmt.Errorf("flow telemetry: no map %s", name)
		}
	}
	r, err := ringbuf.NewReader(maps["sb_flow_events"])
	if err != nil {
		return nil, fmt.Errorf("read the flow ring buffer: %w", err)
	}
	c := &Collector{node: node, names: names, namer: namer, buf: buf, maps: maps, reader: r, boot: bootTime(), log: log, local: local,
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sinabro_flow_events_total",
			Help: "Flow telemetry events read from the datapath, by type (new, drop, translate, service, accel-end).",
		}, []string{"type"}),
		drops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sinabro_flow_drops_total",
			Help: "Dropped packets reported as flow events, by reason and by the pod of this node at either end (namespace and pod empty when neither end is one). Sampled: a drop flood is reported at most --flow-drop-rate times per second and CPU (see sinabro_flow_events_sampled_out_total); the exact counts per reason are sinabro_datapath_packets_total.",
		}, []string{"reason", "namespace", "pod"}),
		newFlows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sinabro_flows_total",
			Help: "New flows of the pods of this node, by pod and direction (egress: the pod opened it; ingress: it was opened to the pod).",
		}, []string{"namespace", "pod", "direction"}),
	}
	return c, nil
}

// Run reads events until ctx ends.
func (c *Collector) Run(ctx context.Context) error {
	go func() {
		<-ctx.Done()
		c.reader.Close()
	}()
	var rec ringbuf.Record
	for {
		// The datapath wakes the reader only once a batch waits (see
		// flow_wakeup in bpf/lib/flow.h): read what is there every 100 ms.
		c.reader.SetDeadline(time.Now().Add(100 * time.Millisecond))
		err := c.reader.ReadInto(&rec)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			if errors.Is(err, os.ErrClosed) || errors.Is(err, ringbuf.ErrClosed) || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("read flow events: %w", err)
		}
		raw, err := Decode(rec.RawSample)
		if err != nil {
			c.log.Warn("undecodable flow event (agent and datapath of different versions?)", "err", err)
			continue
		}
		f := Build(raw, c.node, c.boot, c.names, c.namer)
		c.count(&f)
		c.buf.Add(f)
	}
}

func (c *Collector) count(f *Flow) {
	c.events.WithLabelValues(f.Type).Inc()
	localEnd := func(e *Endpoint) bool { return e.Pod != "" && c.local(e.Namespace, e.Pod) }
	switch f.Type {
	case "drop":
		// The pod whose policy dropped it (the receiver for an ingress
		// denial, unless it is a reply judged again after a policy
		// change: then the pod sent it), else the first of ours.
		ends := []*Endpoint{&f.Source, &f.Destination}
		if f.Ingress != nil && f.Ingress.Verdict == "denied" {
			ends = []*Endpoint{&f.Destination, &f.Source}
		}
		ns, pod := "", ""
		for _, e := range ends {
			if localEnd(e) {
				ns, pod = e.Namespace, e.Pod
				break
			}
		}
		c.drops.WithLabelValues(f.DropReason, ns, pod).Inc()
	case "new":
		if localEnd(&f.Source) {
			c.newFlows.WithLabelValues(f.Source.Namespace, f.Source.Pod, "egress").Inc()
		}
		if localEnd(&f.Destination) {
			c.newFlows.WithLabelValues(f.Destination.Namespace, f.Destination.Pod, "ingress").Inc()
		}
	}
}

// ForgetPod removes a deleted pod's series.
func (c *Collector) ForgetPod(ns, pod string) {
	c.drops.DeletePartialMatch(prometheus.Labels{"namespace": ns, "pod": pod})
	c.newFlows.DeletePartialMatch(prometheus.Labels{"namespace": ns, "pod": pod})
}

var (
	lostDesc    = prometheus.NewDesc("sinabro_flow_events_lost_total", "Flow events the datapath could not send: the ring buffer was full (the agent reads too slowly, or is down).", nil, nil)
	sampledDesc = prometheus.NewDesc("sinabro_flow_events_sampled_out_total", "Flow events the datapath left out to stay within its rate per CPU, by class (flow, drop).", []string{"class"}, nil)
)

// Describe and Collect make the collector a prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	c.events.Describe(ch)
	c.drops.Describe(ch)
	c.newFlows.Describe(ch)
	ch <- lostDesc
	ch <- sampledDesc
}

func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.events.Collect(ch)
	c.drops.Collect(ch)
	c.newFlows.Collect(ch)
	cs, err := ReadCounters(c.maps["sb_flow_state"])
	if err != nil {
		c.log.Warn("flow telemetry counters", "err", err)
		return
	}
	ch <- prometheus.MustNewConstMetric(lostDesc, prometheus.CounterValue, float64(cs.Lost))
	ch <- prometheus.MustNewConstMetric(sampledDesc, prometheus.CounterValue, float64(cs.SampledFlows), "flow")
	ch <- prometheus.MustNewConstMetric(sampledDesc, prometheus.CounterValue, float64(cs.SampledDrops), "drop")
}

// bootTime is the wall time of CLOCK_MONOTONIC's zero (bpf_ktime_get_ns).
func bootTime() time.Time {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return time.Now()
	}
	return time.Now().Add(-time.Duration(ts.Nano()))
}
