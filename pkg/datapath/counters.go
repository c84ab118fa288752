package datapath

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
)

// Programs and reasons index the per-CPU counters map as
// program*reasonSlots+reason: enum prog_id and enum reason of
// bpf/lib/common.h, exported by bpf2go -type.
const (
	programSlots = int(datapathProgIdPROG_MAX)
	reasonSlots  = int(datapathReasonREASON_MAX)
)

// counterNames names the counters from the C enums, read from the
// object's BTF on first use (not at start: the CNI plugin is this binary
// too): PROG_MASQ_EGRESS is "masq_egress", REASON_SNAT_NEW is "snat_new";
// reasons starting with "drop_" are drops.
var counterNames = sync.OnceValues(func() (p [programSlots]string, r [reasonSlots]string) {
	spec, err := loadDatapath()
	if err != nil {
		panic(fmt.Sprintf("datapath object: %v", err)) // embedded at build time
	}
	progs, err := bpffs.EnumNames(spec, "prog_id", "PROG_", uint64(programSlots))
	if err != nil {
		panic(err)
	}
	reasons, err := bpffs.EnumNames(spec, "reason", "REASON_", uint64(reasonSlots))
	if err != nil {
		panic(err)
	}
	for v, n := range progs {
		p[v] = n
	}
	for v, n := range reasons {
		r[v] = n
	}
	return p, r
})

// Counter is one program/reason total summed over CPUs.
type Counter struct {
	Program string `json:"program"`
	Reason  string `json:"reason"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Counters reads the per-CPU counters map and returns the non-zero totals
// it could read and, joined, the errors of the counters it could not.
func Counters(m *ebpf.Map) ([]Counter, error) {
	out, errs := readCounters(m)
	return out, errors.Join(errs...)
}

func readCounters(m *ebpf.Map) (out []Counter, errs []error) {
	programNames, reasonNames := counterNames()
	for prog, pname := range programNames {
		if pname == "" {
			continue
		}
		for reason, rname := range reasonNames {
			if rname == "" {
				continue
			}
			var perCPU []datapathCounter
			key := uint32(prog*reasonSlots + reason)
			if err := m.Lookup(key, &perCPU); err != nil {
				errs = append(errs, fmt.Errorf("read counter %s/%s: %w", pname, rname, err))
				continue
			}
			c := Counter{Program: pname, Reason: rname}
			for _, v := range perCPU {
				c.Packets += v.Packets
				c.Bytes += v.Bytes
			}
			if c.Packets != 0 {
				out = append(out, c)
			}
		}
	}
	return out, errs
}

// Collector exposes the datapath counters to Prometheus.
type Collector struct {
	m       *ebpf.Map
	gc      *gcStats // nil: no conntrack metrics
	packets *prometheus.Desc
	bytes   *prometheus.Desc
	errors  *prometheus.Desc
	flows   *prometheus.Desc
	lbFlows *prometheus.Desc
	deleted *prometheus.Desc
	gcRuns  *prometheus.Desc

	readErrors atomic.Uint64 // failed counter reads, reported by errors
}

// NewCollector returns a collector reading the counters map m.
func NewCollector(m *ebpf.Map) *Collector {
	labels := []string{"program", "reason"}
	return &Collector{
		m:       m,
		packets: prometheus.NewDesc("sinabro_datapath_packets_total", "Packets handled by a datapath program, by outcome (reasons starting with drop_ are drops).", labels, nil),
		bytes:   prometheus.NewDesc("sinabro_datapath_bytes_total", "Bytes handled by a datapath program, by outcome.", labels, nil),
		errors:  prometheus.NewDesc("sinabro_datapath_counter_read_errors_total", "Failed reads of the datapath counters map.", nil, nil),
		flows:   prometheus.NewDesc("sinabro_datapath_conntrack_flows", "Masqueraded flows in conntrack after the last GC pass (two entries each).", nil, nil),
		lbFlows: prometheus.NewDesc("sinabro_datapath_service_flows", "Service flows from outside the node (NodePort, external and load-balancer IPs) in sb_lb_ct after the last GC pass.", nil, nil),
		deleted: prometheus.NewDesc("sinabro_datapath_conntrack_gc_deleted_total", "Expired masqueraded flows deleted by conntrack GC.", nil, nil),
		gcRuns:  prometheus.NewDesc("sinabro_datapath_conntrack_gc_runs_total", "Conntrack GC passes.", nil, nil),
	}
}

// Collector returns a Prometheus collector for this datapath's counters.
// It includes conntrack GC metrics.
func (d *Datapath) Collector() *Collector {
	c := NewCollector(d.objs.SbCounters)
	c.gc = &d.gc
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.packets
	ch <- c.bytes
	ch <- c.errors
	if c.gc != nil {
		ch <- c.flows
		ch <- c.lbFlows
		ch <- c.deleted
		ch <- c.gcRuns
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	if c.gc != nil {
		ch <- prometheus.MustNewConstMetric(c.flows, prometheus.GaugeValue, float64(c.gc.flows.Load()))
		ch <- prometheus.MustNewConstMetric(c.lbFlows, prometheus.GaugeValue, float64(c.gc.lbFlows.Load()))
		ch <- prometheus.MustNewConstMetric(c.deleted, prometheus.CounterValue, float64(c.gc.deleted.Load()))
		ch <- prometheus.MustNewConstMetric(c.gcRuns, prometheus.CounterValue, float64(c.gc.runs.Load()))
	}
	// A counter that cannot be read is left out and counted, rather than
	// failing the whole scrape.
	counters, errs := readCounters(c.m)
	for _, v := range counters {
		ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(v.Packets), v.Program, v.Reason)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(v.Bytes), v.Program, v.Reason)
	}
	n := c.readErrors.Add(uint64(len(errs)))
	ch <- prometheus.MustNewConstMetric(c.errors, prometheus.CounterValue, float64(n))
}
