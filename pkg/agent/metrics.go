package agent

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the agent's Prometheus metrics, on a registry of its own.
type metrics struct {
	registry       *prometheus.Registry
	reconciles     *prometheus.CounterVec
	reconcileTime  prometheus.Histogram
	peers          prometheus.Gauge
	pending        prometheus.Gauge
	skipped        *prometheus.GaugeVec
	overlayChanges *prometheus.CounterVec
	hostChanges    prometheus.Counter

	endpoints       prometheus.Gauge
	endpointChanges *prometheus.CounterVec
	endpointSyncs   *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sinabro_agent_reconciles_total",
			Help: "Node reconciliations by result (success, error).",
		}, []string{"result"}),
		reconcileTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sinabro_agent_reconcile_duration_seconds",
			Help:    "Time taken by one node reconciliation.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		peers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sinabro_agent_peers",
			Help: "Other nodes currently programmed into the overlay.",
		}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sinabro_agent_pending_nodes",
			Help: "Other nodes not programmed yet: no VTEP published or no pod CIDR.",
		}),
		skipped: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sinabro_agent_skipped_nodes",
			Help: "Other nodes left out of the overlay because of bad input, by reason.",
		}, []string{"reason"}),
		overlayChanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sinabro_agent_overlay_changes_total",
			Help: "Overlay kernel entries written, by kind (address, route, neighbour, fdb) and op (upsert, delete). Growth at steady state means something else is changing them.",
		}, []string{"kind", "op"}),
		hostChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sinabro_agent_sysctl_changes_total",
			Help: "Host sysctls the agent had to (re)set.",
		}),
	}
	m.endpoints = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sinabro_agent_endpoints",
		Help: "Local pod addresses in the datapath's endpoint map (host routing).",
	})
	m.endpointChanges = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sinabro_agent_endpoint_changes_total",
		Help: "Endpoint map entries written, by op (upsert, delete).",
	}, []string{"op"})
	m.endpointSyncs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sinabro_agent_endpoint_syncs_total",
		Help: "Host routing endpoint resyncs by result (success, error).",
	}, []string{"result"})
	m.registry.MustRegister(m.reconciles, m.reconcileTime, m.peers, m.pending, m.skipped, m.overlayChanges, m.hostChanges,
		m.endpoints, m.endpointChanges, m.endpointSyncs,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, r := range []string{"success", "error"} {
		m.reconciles.WithLabelValues(r)
		m.endpointSyncs.WithLabelValues(r)
	}
	for _, op := range []string{"upsert", "delete"} {
		m.endpointChanges.WithLabelValues(op)
	}
	for _, r := range skipReasons {
		m.skipped.WithLabelValues(r)
	}
	return m
}
