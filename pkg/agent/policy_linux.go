package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/policy"
)

// PolicyMetaFile is where the agent writes what names the numbers in the
// datapath's policy state (policy.Meta), under --state-dir, for `sinabro
// debug policy`.
const PolicyMetaFile = "policy.json"

// policyController owns NetworkPolicy enforcement: it compiles the
// policies, every pod (of all nodes), the namespaces, this node's pods as
// the kernel shows them and this node's addresses into the datapath's
// policy maps (pkg/policy, pkg/datapath/policy.go), and writes the
// explanation beside them.
type policyController struct {
	a       *Agent
	log     *slog.Logger
	kick    chan struct{}
	metrics *policyMetrics

	pods, namespaces, policies, services cache.Store
	synced                               func() bool

	compiler *policy.Compiler
	warned   map[string]bool
	// mayDeny is told when a change may deny flows that exist (the
	// acceleration controller's policyChanged).
	mayDeny func()

	// dirty: an input changed since the last compilation (periodic passes
	// without one only check the kernel against the last result).
	dirty atomic.Bool
	last  *policy.Compiled
	hosts []netip.Addr

	mu        sync.Mutex
	local     map[netip.Addr]policy.Local // from the endpoint loop; nil until its first pass
	meta      *policy.Meta                // the last compiled, for metrics
	metaBytes []byte                      // what PolicyMetaFile holds
	fresh     bool                        // drop counters reset for this run's numbering
}

func newPolicyController(a *Agent, inf *informers) (*policyController, error) {
	c := &policyController{
		a: a, log: a.log.With("controller", "policy"), kick: make(chan struct{}, 1),
		compiler: policy.NewCompiler(), warned: map[string]bool{},
	}
	pods, nss, pols, svcs := inf.AllPods(), inf.Namespaces(), inf.NetworkPolicies(), inf.Services()
	c.pods, c.namespaces, c.policies, c.services = pods.GetStore(), nss.GetStore(), pols.GetStore(), svcs.GetStore()
	c.synced = func() bool { return pods.HasSynced() && nss.HasSynced() && pols.HasSynced() && svcs.HasSynced() }
	kick := func() {
		c.dirty.Store(true)
		trigger(c.kick)
	}
	err := errors.Join(
		onChange(pods, func(o, n *corev1.Pod) bool {
			return o.Status.PodIP != n.Status.PodIP || !maps.Equal(o.Labels, n.Labels) || o.Status.Phase != n.Status.Phase
		}, kick),
		onChange(nss, func(o, n *corev1.Namespace) bool { return !maps.Equal(o.Labels, n.Labels) }, kick),
		onChange[*networkingv1.NetworkPolicy](pols, nil, kick),
		onChange(svcs, func(o, n *corev1.Service) bool { return !slices.Equal(serviceAddrs(o), serviceAddrs(n)) }, kick))
	c.metrics = newPolicyMetrics(c)
	if err == nil {
		err = a.metrics.registry.Register(c.metrics)
	}
	return c, err
}

// setLocal hands over this node's pods found by the endpoint loop.
func (c *policyController) setLocal(local map[netip.Addr]policy.Local) {
	if local == nil {
		local = map[netip.Addr]policy.Local{}
	}
	c.mu.Lock()
	changed := c.local == nil || !maps.Equal(c.local, local)
	if changed {
		c.local = local
	}
	c.mu.Unlock()
	if changed {
		c.dirty.Store(true)
		trigger(c.kick)
	}
}

func (c *policyController) run(ctx context.Context) error {
	if !cache.WaitForCacheSync(ctx.Done(), c.synced) {
		return nil
	}
	c.log.Info("NetworkPolicy enforcement on")
	runLoop(ctx, c.kick, c.a.cfg.ResyncInterval, c.pass, func(err error, retry time.Duration) {
		c.log.Error("NetworkPolicy", "err", err, "retry_in", retry)
	})
	return nil
}

func (c *policyController) pass(ctx context.Context) error {
	c.a.dpMu.RLock()
	defer c.a.dpMu.RUnlock()
	d := c.a.dp
	if d == nil || !d.Config().Policy {
		return nil // the node controller has not loaded the datapath yet
	}
	c.mu.Lock()
	known := c.local != nil
	c.mu.Unlock()
	if !known {
		// Until the endpoint loop has listed this node's pods, an empty
		// list would delete every pod's entry (no policy for anyone).
		return nil
	}
	if !c.fresh {
		// Policy numbers are this run's: counts kept under an earlier
		// run's numbers would be blamed on other policies.
		if err := d.Policy().ResetDrops(); err != nil {
			return err
		}
		c.fresh = true
	}
	start := time.Now()
	hostIPs, err := c.hostAddrs()
	if err != nil {
		return err
	}
	if !slices.Equal(hostIPs, c.hosts) {
		c.hosts = hostIPs
		c.dirty.Store(true)
	}
	out, compiled := c.last, false
	if c.dirty.Swap(false) || out == nil {
		out, compiled = c.compile(hostIPs), true
		c.last = out
		// Named before written: flow events of the new state find their
		// policies (numbers are stable, so the old state's still do).
		c.mu.Lock()
		c.meta = &out.Meta
		c.mu.Unlock()
	}
	changes, err := d.Policy().SyncPolicy(out.State)
	if changes.MayDeny && c.mayDeny != nil {
		c.mayDeny()
	}
	if err != nil {
		return err
	}
	if compiled {
		if err := c.writeMeta(&out.Meta); err != nil {
			c.dirty.Store(true) // written again next pass
			return err
		}
		c.metrics.observe(out, time.Since(start))
	}
	if changes.Any() {
		c.log.Info("NetworkPolicy state updated", "endpoints", len(out.State.Endpoints), "rules", len(out.State.Rules),
			"identities", len(out.Meta.Identities), "written", fmt.Sprintf("%d endpoints, %d addresses, %d rules", changes.Endpoints, changes.IPCache, changes.Rules),
			"generation", changes.Generation, "took", time.Since(start).Round(time.Microsecond))
	}
	return nil
}

// compile reads the informers and this node's pods and addresses.
func (c *policyController) compile(hostIPs []netip.Addr) *policy.Compiled {
	in := policy.Input{Local: c.localPods(), HostIPs: hostIPs}
	for _, o := range c.pods.List() {
		in.Pods = append(in.Pods, o.(*corev1.Pod))
	}
	for _, o := range c.namespaces.List() {
		in.Namespaces = append(in.Namespaces, o.(*corev1.Namespace))
	}
	for _, o := range c.policies.List() {
		in.Policies = append(in.Policies, o.(*networkingv1.NetworkPolicy))
	}
	for _, o := range c.services.List() {
		in.ServiceIPs = append(in.ServiceIPs, serviceAddrs(o.(*corev1.Service))...)
	}
	out := c.compiler.Compile(in)
	for _, w := range out.Warnings {
		if !c.warned[w] {
			c.warned[w] = true
			c.log.Warn("NetworkPolicy not enforced as written", "problem", w)
		}
	}
	return out
}

func (c *policyController) localPods() map[netip.Addr]policy.Local {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.local)
}

// serviceAddrs are the addresses kube-proxy would translate for svc.
func serviceAddrs(svc *corev1.Service) []netip.Addr {
	var out []netip.Addr
	add := func(s string) {
		if ip, err := netip.ParseAddr(s); err == nil {
			out = append(out, ip)
		}
	}
	for _, s := range svc.Spec.ClusterIPs {
		add(s)
	}
	for _, s := range svc.Spec.ExternalIPs {
		add(s)
	}
	for _, in := range svc.Status.LoadBalancer.Ingress {
		add(in.IP)
	}
	return out
}

// hostAddrs lists this node's IPv4 addresses (its pods' traffic from the
// node comes from one of them).
func (c *policyController) hostAddrs() ([]netip.Addr, error) {
	cfg := &netlink.Config{}
	if c.a.nsFile != nil {
		cfg.NetNS = int(c.a.nsFile.Fd())
	}
	conn, err := rtnetlink.Dial(cfg)
	if err != nil {
		return nil, fmt.Errorf("dial rtnetlink: %w", err)
	}
	defer conn.Close()
	addrs, err := conn.Address.List()
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if a.Attributes == nil {
			continue
		}
		if ip, ok := netip.AddrFromSlice(a.Attributes.Address); ok && ip.Unmap().Is4() {
			out = append(out, ip.Unmap())
		}
	}
	return out, nil
}

// writeMeta writes the explanation of the state just written, when it
// changed.
func (c *policyController) writeMeta(m *policy.Meta) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	path := filepath.Join(c.a.cfg.StateDir, PolicyMetaFile)
	c.mu.Lock()
	same := bytes.Equal(c.metaBytes, b)
	c.mu.Unlock()
	if same {
		return nil
	}
	if err := atomicfile.Write(path, b, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	c.mu.Lock()
	c.metaBytes = b
	c.mu.Unlock()
	return nil
}

// policyMetrics: sinabro_policy_* on the agent's /metrics.
type policyMetrics struct {
	c                        *policyController
	rules, endpoints, idents prometheus.Gauge
	compileSeconds           prometheus.Histogram
	drops                    *prometheus.Desc
}

func newPolicyMetrics(c *policyController) *policyMetrics {
	return &policyMetrics{
		c:         c,
		rules:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "sinabro_policy_rules", Help: "NetworkPolicy rule entries in the datapath (pod, peer identity, protocol, port prefix)."}),
		endpoints: prometheus.NewGauge(prometheus.GaugeOpts{Name: "sinabro_policy_endpoints", Help: "This node's pods with NetworkPolicy state in the datapath."}),
		idents:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "sinabro_policy_identities", Help: "Peer identities this node knows (sets of pods, node addresses and CIDRs no rule tells apart)."}),
		compileSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sinabro_policy_sync_seconds", Help: "Time from reading the informers to NetworkPolicy state written to the datapath.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		drops: prometheus.NewDesc("sinabro_policy_drops_total",
			"Packets NetworkPolicy dropped, by the policy blamed (a policy selecting the pod for that direction) and direction. Bounded by the policies selecting this node's pods.",
			[]string{"namespace", "policy", "direction"}, nil),
	}
}

func (m *policyMetrics) observe(out *policy.Compiled, took time.Duration) {
	m.rules.Set(float64(len(out.State.Rules)))
	m.endpoints.Set(float64(len(out.State.Endpoints)))
	m.idents.Set(float64(len(out.Meta.Identities)))
	m.compileSeconds.Observe(took.Seconds())
}

func (m *policyMetrics) Describe(ch chan<- *prometheus.Desc) {
	m.rules.Describe(ch)
	m.endpoints.Describe(ch)
	m.idents.Describe(ch)
	m.compileSeconds.Describe(ch)
	ch <- m.drops
}

func (m *policyMetrics) Collect(ch chan<- prometheus.Metric) {
	m.rules.Collect(ch)
	m.endpoints.Collect(ch)
	m.idents.Collect(ch)
	m.compileSeconds.Collect(ch)
	c := m.c
	c.mu.Lock()
	meta := c.meta
	c.mu.Unlock()
	if meta == nil {
		return
	}
	c.a.dpMu.RLock()
	defer c.a.dpMu.RUnlock()
	if c.a.dp == nil || !c.a.dp.Config().Policy {
		return
	}
	drops, err := c.a.dp.Policy().PolicyDrops()
	if err != nil {
		return
	}
	for k, n := range drops {
		p, ok := meta.Policies[k[0]]
		if !ok {
			continue
		}
		ch <- prometheus.MustNewConstMetric(m.drops, prometheus.CounterValue, float64(n), p.Namespace, p.Name, datapath.PolicyDir(k[1]).String())
	}
}
