package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/google/nftables"
	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/service"
)

// serviceController owns Service load balancing (pkg/service): its own
// informers on Services and EndpointSlices, its maps and its metrics. It
// runs beside the node reconcile loop, not inside it: a Service change
// never waits for an overlay pass, and the reverse.
//
// In auto mode it looks for kube-proxy's rules in the node's network
// namespace on every pass (at least every serviceRecheck): where kube-proxy
// runs it detaches its programs and leaves Services to it, so the two never
// both answer; when they go, it takes over.
type serviceController struct {
	mode   string // KPRAuto, KPRTrue, KPRFalse
	node   string
	root   string // bpffs root
	cgroup string // "" = the cgroup v2 root
	nsFD   int    // node netns (0: our own)
	// netnsDir holds the pods' network namespace files, where connected
	// UDP sockets to removed backends are looked for.
	netnsDir        string
	terminateFailed bool // ErrTerminateUnsupported logged once
	log             *slog.Logger

	kick     chan struct{}
	services cache.Store
	slices   cache.Store
	nodes    corelisters.NodeLister // our Node's zone, for topology hints
	synced   func() bool

	lb *service.LoadBalancer
	// The datapath's table of frontends reachable from outside, and what
	// this controller wrote there (nil map: nothing known, rewrite all).
	external *datapath.LBTable
	extState map[datapath.LBFrontend]datapath.LBEntry
	health   *healthChecks
	state    string // what the last pass decided, logged on change
	rt       *rtnetlink.Conn
	frontend prometheus.Gauge
	syncs    *prometheus.CounterVec
	syncTime prometheus.Histogram
}

// serviceRecheck bounds how long kube-proxy can appear or go unnoticed.
var serviceRecheck = 10 * time.Second

func newServiceController(a *Agent, inf *informers) (*serviceController, error) {
	c := &serviceController{
		mode: a.cfg.KubeProxyReplacement, node: a.cfg.NodeName, root: a.cfg.BPFRoot,
		cgroup: a.cfg.ServiceCgroup, netnsDir: a.cfg.NetnsDir, log: a.log.With("controller", "services"),
		kick: make(chan struct{}, 1),
		frontend: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sinabro_agent_service_frontends",
			Help: "Service frontends (address, port, protocol) programmed into the socket load balancer.",
		}),
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sinabro_agent_service_syncs_total",
			Help: "Service load balancer passes by outcome (served, kube-proxy, off, error).",
		}, []string{"outcome"}),
		syncTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sinabro_agent_service_sync_duration_seconds",
			Help:    "Time from a Service or EndpointSlice change (or a recheck) to the maps written.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
	}
	if a.nsFile != nil {
		c.nsFD = int(a.nsFile.Fd())
	}
	c.health = &healthChecks{log: c.log, netns: a.cfg.NetNS}
	a.metrics.registry.MustRegister(c.frontend, c.syncs, c.syncTime)
	if c.mode == KPRFalse {
		// No watches: each pass only makes sure nothing of ours serves
		// (an earlier run's programs, or its table for traffic from
		// outside once the datapath is loaded).
		return c, nil
	}
	svcs, slices, nodes := inf.Services(), inf.EndpointSlices(), inf.Nodes()
	c.services, c.slices = svcs.GetStore(), slices.GetStore()
	c.nodes = corelisters.NewNodeLister(nodes.GetIndexer())
	c.synced = func() bool { return svcs.HasSynced() && slices.HasSynced() && nodes.HasSynced() }
	kick := func() { trigger(c.kick) }
	return c, errors.Join(onChange[any](svcs, nil, kick), onChange[any](slices, nil, kick),
		onChange(nodes, func(o, n *corev1.Node) bool {
			return n.Name == c.node && o.Labels[corev1.LabelTopologyZone] != n.Labels[corev1.LabelTopologyZone]
		}, kick))
}

// run keeps Services served (or not) until ctx ends; the handles are
// released then, and the programs stay attached.
func (c *serviceController) run(ctx context.Context) error {
	defer c.close()
	if c.synced != nil && !cache.WaitForCacheSync(ctx.Done(), c.synced) {
		return nil
	}
	runLoop(ctx, c.kick, serviceRecheck, c.pass, func(err error, retry time.Duration) {
		c.log.Error("service load balancing", "err", err, "retry_in", retry)
	})
	return nil
}

func (c *serviceController) close() {
	c.health.sync(nil)
	if c.external != nil {
		c.external.Close()
		c.external, c.extState = nil, nil
	}
	if c.lb != nil {
		c.lb.Close() // programs stay attached: Services keep working
		c.lb = nil
	}
	if c.rt != nil {
		c.rt.Close()
		c.rt = nil
	}
}

func (c *serviceController) decided(state, why string) {
	if c.state != state {
		c.state = state
		c.log.Info("service load balancing", "state", state, "why", why)
	}
}

// pass decides who serves Services and, if we do, writes the maps.
func (c *serviceController) pass(ctx context.Context) (err error) {
	start := time.Now()
	outcome := "served"
	defer func() {
		if err != nil {
			outcome = "error"
		}
		c.syncs.WithLabelValues(outcome).Inc()
	}()
	if c.mode == KPRFalse {
		outcome = "off"
		c.decided("off", "--kube-proxy-replacement=false: kube-proxy serves Services")
		err := c.syncExternal(nil)
		if service.Attached(c.root) {
			err = errors.Join(err, service.Disable(ctx, c.root))
		}
		return err
	}
	if c.mode == KPRAuto {
		found, err := kubeProxyRules(c.nsFD)
		if err != nil {
			return fmt.Errorf("look for kube-proxy's rules: %w", err)
		}
		if found != "" {
			outcome = "kube-proxy"
			c.decided("kube-proxy", "kube-proxy's rules are in this node's network namespace ("+found+"); set --kube-proxy-replacement=true to take over")
			// Nothing of ours may answer before kube-proxy's rules: the
			// external table empties too (tc runs before netfilter), and
			// kube-proxy serves the healthCheckNodePorts.
			err := errors.Join(c.syncExternal(nil), c.health.sync(nil))
			if c.lb != nil || service.Attached(c.root) {
				c.close()
				err = errors.Join(err, service.Disable(ctx, c.root))
			}
			return err
		}
	}
	if c.lb == nil {
		cg, err := cgroup.V2Dir(c.cgroup)
		if err != nil {
			return fmt.Errorf("--service-cgroup: %w", err)
		}
		if c.lb, err = service.Enable(ctx, service.Config{BPFRoot: c.root, CgroupPath: cg}); err != nil {
			return err
		}
	}
	addrs, err := c.nodeAddrs()
	if err != nil {
		return err
	}
	if err := c.lb.SetNodeAddrs(addrs); err != nil {
		return err
	}
	svcs, eps := storeList[*corev1.Service](c.services), storeList[*discoveryv1.EndpointSlice](c.slices)
	here := locality{node: c.node}
	if n, err := c.nodes.Get(c.node); err == nil {
		here.zone = n.Labels[corev1.LabelTopologyZone]
	}
	st, err := c.lb.Sync(desiredServices(svcs, eps, here))
	err = errors.Join(err, c.syncExternal(desiredExternal(svcs, eps, here)),
		c.health.sync(desiredHealthChecks(svcs, eps, c.node)))
	c.terminateUDP(st.GoneUDP)
	c.frontend.Set(float64(st.Frontends))
	c.syncTime.Observe(time.Since(start).Seconds())
	if st.Written+st.Deleted > 0 {
		c.log.Debug("services synced", "frontends", st.Frontends, "written", st.Written, "deleted", st.Deleted, "took", time.Since(start))
	}
	c.decided("serving", fmt.Sprintf("no kube-proxy rules found (mode %s): %d frontends", c.mode, st.Frontends))
	return err
}

// terminateUDP ends the connected UDP sockets that still send to backends
// that left their Service, in the node's namespace and the pods', as
// kube-proxy clears their conntrack entries. Failures are logged, not
// retried: a socket left behind only keeps talking to a backend on its way
// out, as it would have before.
func (c *serviceController) terminateUDP(gone []service.Gone) {
	if len(gone) == 0 {
		return
	}
	var paths []string
	if c.netnsDir != "" {
		paths, _ = filepath.Glob(filepath.Join(c.netnsDir, "*"))
	}
	if c.nsFD != 0 {
		paths = append(paths, fmt.Sprintf("/proc/self/fd/%d", c.nsFD))
	}
	n, err := c.lb.TerminateUDP(gone, paths)
	switch {
	case errors.Is(err, service.ErrTerminateUnsupported):
		if !c.terminateFailed {
			c.terminateFailed = true
			c.log.Warn("connected UDP sockets to removed backends are not terminated on this kernel", "err", err)
		}
	case err != nil:
		c.log.Warn("terminate UDP sockets of removed backends", "err", err)
	}
	if n > 0 {
		c.log.Info("terminated connected UDP sockets of removed backends", "sockets", n, "backends", len(gone))
	}
}

// syncExternal makes the datapath's table of frontends reachable from
// outside exactly desired (nil: empty). Without a loaded datapath yet it
// does nothing: the next pass (at most serviceRecheck later) writes it.
func (c *serviceController) syncExternal(desired map[datapath.LBFrontend]datapath.LBEntry) error {
	if c.external == nil {
		t, err := datapath.OpenLBTable(c.root)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("open the datapath's Service table: %w", err)
		}
		c.external, c.extState = t, nil
	}
	if c.extState == nil {
		// First pass on this table: what it holds is unknown (an
		// earlier agent's): delete what is not desired, write the rest.
		have, err := c.external.Frontends()
		if err != nil {
			return fmt.Errorf("read the datapath's Service table: %w", err)
		}
		c.extState = map[datapath.LBFrontend]datapath.LBEntry{}
		for _, f := range have {
			c.extState[f] = datapath.LBEntry{Backends: []netip.AddrPort{netip.AddrPortFrom(netip.IPv4Unspecified(), 0)}} // never equal
		}
	}
	var errs []error
	udpChanged := false // a UDP frontend lost backends, or went
	for f, e := range desired {
		cur, ok := c.extState[f]
		if ok && cur.Equal(e) {
			continue
		}
		if err := c.external.Put(f, e); err != nil {
			errs = append(errs, err)
			continue
		}
		c.extState[f] = e
		udpChanged = udpChanged || (ok && f.Proto == uint8(service.UDP))
	}
	for f := range c.extState {
		if _, ok := desired[f]; ok {
			continue
		}
		if err := c.external.Delete(f); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(c.extState, f)
		udpChanged = udpChanged || f.Proto == uint8(service.UDP)
	}
	errs = append(errs, c.external.SetActive(len(c.extState)))
	if udpChanged {
		// As kube-proxy clears conntrack: datagrams of a flow whose
		// backend left go to a live one from the next on.
		n, err := c.external.ForgetUDPFlows(desired)
		errs = append(errs, err)
		if n > 0 {
			c.log.Info("forgot UDP flows to removed backends", "flows", n)
		}
	}
	return errors.Join(errs...)
}

func storeList[T any](s cache.Store) []T {
	var out []T
	for _, o := range s.List() {
		if t, ok := o.(T); ok {
			out = append(out, t)
		}
	}
	return out
}

// nodeAddrs lists the IPv4 addresses of the node's interfaces, where
// NodePorts answer.
func (c *serviceController) nodeAddrs() ([]netip.Addr, error) {
	if c.rt == nil {
		rt, err := rtnetlink.Dial(&netlink.Config{NetNS: c.nsFD, Strict: true})
		if err != nil {
			return nil, fmt.Errorf("dial rtnetlink: %w", err)
		}
		c.rt = rt
	}
	msgs, err := c.rt.Address.List()
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var out []netip.Addr
	for _, m := range msgs {
		if a, ok := netip.AddrFromSlice(m.Attributes.Address); ok && a.Unmap().Is4() && !a.Unmap().IsLoopback() {
			out = append(out, a.Unmap())
		}
	}
	return out, nil
}

// kubeProxyRules reports where kube-proxy's Service rules were found in
// the network namespace nsFD ("" for none): the nftables mode's table
// "ip kube-proxy", or the iptables mode's KUBE-SERVICES chain in the nat
// table (iptables-nft; the legacy iptables backend is not seen).
func kubeProxyRules(nsFD int) (string, error) {
	var opts []nftables.ConnOption
	if nsFD != 0 {
		opts = append(opts, nftables.WithNetNSFd(nsFD))
	}
	conn, err := nftables.New(opts...)
	if err != nil {
		return "", err
	}
	defer conn.CloseLasting()
	tables, err := conn.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return "", fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == "kube-proxy" {
			return "nftables table ip kube-proxy", nil
		}
	}
	chains, err := conn.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return "", fmt.Errorf("list nftables chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Name == "KUBE-SERVICES" && ch.Table != nil && ch.Table.Name == "nat" {
			return "iptables chain nat/KUBE-SERVICES", nil
		}
	}
	return "", nil
}
