package sockmap

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
)

// cntSlots is the size of the counters map: enum sock_counter in
// bpf/sockops.c, exported by bpf2go -type.
const cntSlots = int(sockopsSockCounterCNT_MAX)

// counterNames names the counters from enum sock_counter in the object's
// BTF, on first use (the CNI plugin is this binary too): CNT_SOCK_<X> are
// sock_ops decisions, socket events "<x>" (added, skipped, ...); the
// others count sends (sk_msg), message results "<x>": "redirect" went to
// the peer socket, "pass" through TCP, "fallback_*" moved a flow to TCP.
var counterNames = sync.OnceValues(func() (messages, sockets map[uint32]string) {
	spec, err := loadSockops()
	if err != nil {
		panic(fmt.Sprintf("sockops object: %v", err)) // embedded at build time
	}
	names, err := bpffs.EnumNames(spec, "sock_counter", "CNT_", uint64(cntSlots))
	if err != nil {
		panic(err)
	}
	messages, sockets = map[uint32]string{}, map[uint32]string{}
	for id, n := range names {
		if ev, ok := strings.CutPrefix(n, "sock_"); ok {
			sockets[id] = ev
		} else {
			messages[id] = n
		}
	}
	return messages, sockets
})

// Stat is one counter summed over CPUs: messages (or sockets) and bytes.
type Stat struct {
	Count uint64 `json:"count"`
	Bytes uint64 `json:"bytes"`
}

// Stats are the acceleration counters since the maps were created.
type Stats struct {
	Messages map[string]Stat `json:"messages"` // by result
	Sockets  map[string]Stat `json:"sockets"`  // by event (Bytes unused)
}

// Message returns the counter of a send result ("redirect", "pass", ...).
func (s Stats) Message(result string) Stat { return s.Messages[result] }

// ReadStats reads the per-CPU counters map m: the counters it could read
// and, joined, the errors of those it could not.
func ReadStats(m *ebpf.Map) (Stats, error) {
	s, errs := readStats(m)
	return s, errors.Join(errs...)
}

func readStats(m *ebpf.Map) (s Stats, errs []error) {
	s = Stats{Messages: map[string]Stat{}, Sockets: map[string]Stat{}}
	read := func(id uint32, name string, into map[string]Stat) error {
		var perCPU []sockopsCounter
		if err := m.Lookup(id, &perCPU); err != nil {
			return fmt.Errorf("read sockmap counter %s: %w", name, err)
		}
		var st Stat
		for _, c := range perCPU {
			st.Count += c.Packets
			st.Bytes += c.Bytes
		}
		into[name] = st
		return nil
	}
	messageResults, socketEvents := counterNames()
	for id, name := range messageResults {
		if err := read(id, name, s.Messages); err != nil {
			errs = append(errs, err)
		}
	}
	for id, name := range socketEvents {
		if err := read(id, name, s.Sockets); err != nil {
			errs = append(errs, err)
		}
	}
	return s, errs
}

// Stats reads this accelerator's counters.
func (a *Accelerator) Stats() (Stats, error) { return ReadStats(a.objs.SbSockCounters) }

// Collector exposes the acceleration counters and the number of
// accelerated sockets to Prometheus.
type Collector struct {
	counters, hash *ebpf.Map
	messages       *prometheus.Desc
	bytes          *prometheus.Desc
	sockets        *prometheus.Desc
	accelerated    *prometheus.Desc
	errors         *prometheus.Desc

	readErrors atomic.Uint64 // failed map reads, reported by errors
}

// NewCollector returns a collector over the counters map and the sockhash.
func NewCollector(counters, hash *ebpf.Map) *Collector {
	return &Collector{
		counters:    counters,
		hash:        hash,
		messages:    prometheus.NewDesc("sinabro_sockmap_messages_total", "TCP sends seen by the sockmap acceleration, by result (redirect: handed to the peer socket; pass: normal TCP; fallback_*: the flow moved to normal TCP).", []string{"result"}, nil),
		bytes:       prometheus.NewDesc("sinabro_sockmap_bytes_total", "Bytes of TCP sends seen by the sockmap acceleration, by result.", []string{"result"}, nil),
		sockets:     prometheus.NewDesc("sinabro_sockmap_sockets_total", "Established pod sockets seen by sock_ops, by event (added to the sockhash, skipped, add_failed, closed, evicted: a TCP-bound socket taken out of the sockhash, drained: evicted after reading what its peer redirected).", []string{"event"}, nil),
		accelerated: prometheus.NewDesc("sinabro_sockmap_accelerated_sockets", "Sockets currently in the sockhash.", nil, nil),
		errors:      prometheus.NewDesc("sinabro_sockmap_read_errors_total", "Failed reads of the sockmap maps.", nil, nil),
	}
}

// Collector returns a Prometheus collector for this accelerator.
func (a *Accelerator) Collector() *Collector {
	return NewCollector(a.objs.SbSockCounters, a.objs.SbSockHash)
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.messages
	ch <- c.bytes
	ch <- c.sockets
	ch <- c.accelerated
	ch <- c.errors
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	// What cannot be read is left out and counted, rather than failing
	// the whole scrape.
	s, errs := readStats(c.counters)
	failed := uint64(len(errs))
	for name, v := range s.Messages {
		ch <- prometheus.MustNewConstMetric(c.messages, prometheus.CounterValue, float64(v.Count), name)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(v.Bytes), name)
	}
	for name, v := range s.Sockets {
		ch <- prometheus.MustNewConstMetric(c.sockets, prometheus.CounterValue, float64(v.Count), name)
	}
	if socks, err := listSockets(c.hash, nil); err != nil {
		failed++
	} else {
		ch <- prometheus.MustNewConstMetric(c.accelerated, prometheus.GaugeValue, float64(len(socks)))
	}
	ch <- prometheus.MustNewConstMetric(c.errors, prometheus.CounterValue, float64(c.readErrors.Add(failed)))
}
