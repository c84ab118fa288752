// Package agent is the Sinabro node agent: it watches the cluster's Nodes and
// keeps this node's networking in line with them — host sysctls, the VXLAN
// overlay to every other node, the eBPF datapath (masquerading of traffic
// leaving the cluster, host routing between local pods) — and writes the CNI
// configuration once the node has its pod CIDRs.
//
// The controller is level-triggered: every Node event, the periodic resync
// and retries after errors all run the same full reconciliation, which
// compares the whole desired state with what the kernel has. Triggers are
// coalesced, so a burst of events costs one pass.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/hostnet"
	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/masquerade"
	"github.com/sinabro-io/sinabro/pkg/netns"
	"github.com/sinabro-io/sinabro/pkg/overlay"
	"github.com/sinabro-io/sinabro/pkg/service"
	"github.com/sinabro-io/sinabro/pkg/sockmap"
)

// Defaults of the agent's flags.
const (
	DefaultHealthAddr     = "127.0.0.1:9962"
	DefaultBPFRoot        = "/sys/fs/bpf/sinabro"
	DefaultVXLANDevice    = "sinabro.vxlan"
	DefaultVXLANVNI       = 1
	DefaultVXLANPort      = 8472 // the Linux kernel's historical VXLAN port, as Flannel uses
	DefaultResyncInterval = 30 * time.Second
)

// DefaultClusterCIDRs is the cluster CIDR assumed when none is given.
var DefaultClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}

// Config is the agent's configuration.
type Config struct {
	NodeName   string
	CNIConfDir string
	// CNIBinDir is where the runtime finds CNI plugins, and CNIPortMap
	// whether the conflist chains portmap for hostPort: "auto" (when
	// CNIBinDir has it, as nodes with the reference plugins installed do),
	// "true" or "false".
	CNIBinDir    string
	CNIPortMap   string
	StateDir     string
	BPFRoot      string // bpffs directory of the eBPF datapath's pins
	HealthAddr   string // "" disables the health/metrics server
	VXLANVNI     uint32
	VXLANPort    uint16
	VXLANDevice  string
	MTU          int // pod MTU; 0 = underlay MTU - overlay.Overhead
	ClusterCIDRs []netip.Prefix
	// NonMasqueradeCIDRs are further destinations pods reach with their
	// own address (node addresses and ClusterCIDRs always are).
	NonMasqueradeCIDRs []netip.Prefix
	Masquerade         bool
	// MasqueradeBackend is BackendEBPF (default) or BackendNFTables.
	MasqueradeBackend string
	// Conntrack sizes the eBPF masquerading's connection tracking: table
	// entries (two per flow), NAT source ports and idle timeouts; zero
	// fields take the datapath's defaults.
	Conntrack ConntrackConfig
	// HostRouting redirects traffic between pods of this node in eBPF,
	// skipping the host's stack.
	HostRouting bool
	// KubeProxyCoexistence keeps the eBPF fast paths off flows that
	// netfilter translated (kube-proxy's Services, hostPort DNAT): with
	// host routing, each TCP/UDP packet on its fast paths is checked in
	// the kernel's conntrack (datapath Config.KernelCT); without it the
	// stack carries such flows anyway. Where the kernel cannot be asked,
	// host routing is turned off instead.
	KubeProxyCoexistence bool
	// TCPAcceleration is the node's default for redirecting TCP between its
	// pods at the socket layer (sock_ops + sk_msg, pkg/sockmap) for sockets
	// in PodCgroup: false accelerates only the pods that opt in with
	// AnnotationTCPAcceleration (on the pod or its namespace), true all but
	// those that opt out.
	TCPAcceleration bool
	// PodCgroup is the cgroup v2 directory holding the node's pods; ""
	// takes the cgroup v2 root.
	PodCgroup string
	// KubeProxyReplacement is KPRAuto (default: serve Services where
	// kube-proxy's rules are absent), KPRTrue or KPRFalse.
	KubeProxyReplacement string
	// ServiceCgroup is the cgroup v2 directory whose sockets see Services
	// through the socket load balancer; "" takes the cgroup v2 root (every
	// process of the node, pods and host).
	ServiceCgroup string
	// NetnsDir holds the pods' network namespace files (the runtime's:
	// containerd and CRI-O pin them in /var/run/netns), where connected UDP
	// sockets to a removed Service backend are found and terminated.
	NetnsDir       string
	ResyncInterval time.Duration
	// Flows is flow telemetry (`sinabro observe`, pkg/flows).
	Flows FlowConfig
	// TCAttach is how the datapath's programs attach to interfaces:
	// datapath.AttachAuto (tcx where the kernel has it, else classic tc),
	// AttachTCX or AttachClassic.
	TCAttach datapath.AttachMode
	// ProcSys is where the node's sysctl tree is mounted ("" is
	// /proc/sys). An unprivileged container's /proc/sys is read-only: the
	// DaemonSet mounts the host's /proc/sys/net elsewhere.
	ProcSys string
	// NetworkPolicy enforces Kubernetes NetworkPolicy in the eBPF
	// datapath (needs host routing: its checks run on host routing's paths
	// and host veths). The CNI plugin's ADD then waits for a new pod's
	// policy state (fail closed).
	NetworkPolicy bool
	// NetNS, when set, is the path of the network namespace to program
	// instead of the agent's own (tests run several agents in one process).
	NetNS string
}

// masquerader is a masquerade backend (see package masquerade).
type masquerader interface {
	Name() string
	Ensure(ctx context.Context, cfg masquerade.Config) error
	Remove(ctx context.Context) error
}

// Agent is the node agent.
type Agent struct {
	// hostRoutingWaitsForKCT: host routing is off only because the
	// kernel's conntrack kfuncs were missing at start (nf_conntrack, a
	// module on distribution kernels, not loaded yet: kube-proxy loads it).
	hostRoutingWaitsForKCT bool

	cfg     Config
	log     *slog.Logger
	cluster Cluster
	overlay *overlay.Manager
	masq    masquerader
	nsFile  *os.File
	metrics *metrics

	kick     chan struct{}
	ready    atomic.Bool
	lastPass atomic.Int64 // unix nanoseconds of the last finished reconciliation
	nodes    corelisters.NodeLister
	recorder kube.EventRecorder

	// The eBPF datapath: loaded and replaced by the reconcile loop under
	// the write lock; used by the endpoint and GC loops under the read lock.
	dpMu        sync.RWMutex
	dp          *datapath.Datapath
	dpEndpoints *ebpf.Map // read-only handle on the endpoint map, for listing
	dpCollector prometheus.Collector

	// policy is the NetworkPolicy controller (nil when off), told about
	// this node's pods by the endpoint loop.
	policy *policyController

	// Owned by the endpoint loop.
	epConn   *rtnetlink.Conn
	epKick   chan struct{}
	epFor    *datapath.Datapath // the datapath that attached refers to
	attached map[int]bool       // host veth ifindexes attached by this run

	// Owned by the reconcile loop.
	skipped     map[string]Skip
	selfProblem string
	nftRemoved  bool
	dpRemoved   bool
	waitingFor  string
	mtuChecked  bool
	lastConfMTU int
	lastDevice  overlay.Link
	// vxlanIndex is the vxlan device's ifindex, read by the endpoint sync
	// to attach host routing to traffic arriving from other nodes.
	vxlanIndex atomic.Int32
	// remotes is the number of remote pod prefixes last written, for
	// logging changes without reading the map back.
	remotes int
	// ownCIDRProblem is the last problem reported with our own pod CIDRs
	// against the peer bounds (one Event per problem).
	ownCIDRProblem string
}

// New prepares an agent; Run starts it.
func New(cfg Config, cluster Cluster, log *slog.Logger) (*Agent, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("node name is required")
	}
	switch cfg.MasqueradeBackend {
	case "":
		cfg.MasqueradeBackend = BackendEBPF
	case BackendEBPF, BackendNFTables:
	default:
		return nil, fmt.Errorf("masquerade backend %q: want %s or %s", cfg.MasqueradeBackend, BackendEBPF, BackendNFTables)
	}
	if (cfg.HostRouting || cfg.Masquerade && cfg.MasqueradeBackend == BackendEBPF) && cfg.BPFRoot == "" {
		return nil, errors.New("the eBPF datapath needs a bpffs root")
	}
	switch cfg.KubeProxyReplacement {
	case "":
		cfg.KubeProxyReplacement = KPRAuto
	case KPRAuto, KPRTrue, KPRFalse:
	default:
		return nil, fmt.Errorf("kube-proxy replacement %q: want %s, %s or %s", cfg.KubeProxyReplacement, KPRAuto, KPRTrue, KPRFalse)
	}
	if cfg.KubeProxyReplacement != KPRFalse && cfg.BPFRoot == "" {
		return nil, errors.New("Service load balancing needs a bpffs root (or --kube-proxy-replacement=false)")
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = DefaultResyncInterval
	}
	waitsForKCT := false
	if cfg.HostRouting && cfg.KubeProxyCoexistence {
		// Host routing past kube-proxy's translations breaks Services.
		if err := kernelCTAvailable(); err != nil {
			log.Warn("host routing turned off: it would skip kube-proxy's Service translations, and the kernel's conntrack cannot be asked from eBPF (Linux >= 6.0 with nf_conntrack and BTF needed); the agent restarts itself once it can", "err", err)
			cfg.HostRouting = false
			waitsForKCT = true
		}
	}
	a := &Agent{
		hostRoutingWaitsForKCT: waitsForKCT,
		cfg:                    cfg,
		log:                    log,
		cluster:                cluster,
		metrics:                newMetrics(),
		kick:                   make(chan struct{}, 1),
		epKick:                 make(chan struct{}, 1),
		skipped:                map[string]Skip{},
	}
	fd := 0
	if cfg.NetNS != "" {
		f, err := os.Open(cfg.NetNS)
		if err != nil {
			return nil, fmt.Errorf("open netns %s: %w", cfg.NetNS, err)
		}
		a.nsFile, fd = f, int(f.Fd())
	}
	ovl, err := overlay.Open(fd)
	if err != nil {
		a.Close()
		return nil, err
	}
	a.overlay = ovl
	a.masq = masquerade.NewNFTables(fd)
	if a.epConn, err = rtnetlink.Dial(&netlink.Config{NetNS: fd, Strict: true}); err != nil {
		a.Close()
		return nil, fmt.Errorf("dial rtnetlink: %w", err)
	}
	return a, nil
}

// Close releases the agent's netlink sockets and eBPF handles. It leaves
// the datapath in place: pods keep their connectivity, and masqueraded
// flows their conntrack state, while the agent restarts.
func (a *Agent) Close() error {
	var errs []error
	errs = append(errs, a.closeDatapath())
	if a.epConn != nil {
		errs = append(errs, a.epConn.Close())
	}
	if a.overlay != nil {
		errs = append(errs, a.overlay.Close())
	}
	if a.nsFile != nil {
		errs = append(errs, a.nsFile.Close())
	}
	return errors.Join(errs...)
}

// Ready reports whether the node is set up: CNI config written and the last
// reconciliation succeeded.
func (a *Agent) Ready() bool { return a.ready.Load() }

func (a *Agent) trigger() { trigger(a.kick) }

// loop runs reconciliations on triggers, on every resync interval, and with
// exponential backoff after a failure.
func (a *Agent) loop(ctx context.Context) error {
	const minBackoff = time.Second
	backoff := minBackoff
	timer := time.NewTimer(a.cfg.ResyncInterval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			a.log.Info("agent stopping; the datapath stays in place")
			return nil
		case <-a.kick:
		case <-timer.C:
		}
		wait := a.cfg.ResyncInterval
		if err := a.reconcile(ctx); err != nil {
			a.log.Error("reconcile node", "node", a.cfg.NodeName, "err", err, "retry_in", backoff)
			wait = backoff
			backoff = min(2*backoff, a.cfg.ResyncInterval)
		} else {
			backoff = minBackoff
		}
		a.lastPass.Store(time.Now().UnixNano())
		if a.restartWanted() {
			return ErrRestart
		}
		timer.Reset(wait)
	}
}

// restartWanted reports (and logs) whether the kernel now offers what a
// feature turned off at start needed.
func (a *Agent) restartWanted() bool {
	if a.hostRoutingWaitsForKCT && kernelCTAvailable() == nil {
		a.log.Info("the kernel's conntrack kfuncs are available now (nf_conntrack loaded): restarting to turn host routing on; the datapath stays in place")
		return true
	}
	return false
}

// ErrRestart is returned by Run when the agent should be started again
// with the same configuration (the datapath stays pinned meanwhile): the
// kernel now offers what a turned-off feature needed.
var ErrRestart = errors.New("agent restart requested")

// kernelCTAvailable reports whether the datapath can ask the kernel's
// conntrack; a variable for tests.
var kernelCTAvailable = datapath.KernelCTAvailable

// waiting logs, once per distinct reason, why the node cannot be set up yet.
func (a *Agent) waiting(reason string) {
	a.ready.Store(false)
	if a.waitingFor != reason {
		a.waitingFor = reason
		a.log.Info("waiting before setting up the node", "node", a.cfg.NodeName, "reason", reason)
	}
}

// reconcile brings the node in line with the cluster's Nodes.
func (a *Agent) reconcile(ctx context.Context) (err error) {
	start := time.Now()
	defer func() {
		a.metrics.reconcileTime.Observe(time.Since(start).Seconds())
		if err != nil {
			a.ready.Store(false)
			a.metrics.reconciles.WithLabelValues("error").Inc()
		} else {
			a.metrics.reconciles.WithLabelValues("success").Inc()
		}
	}()

	selfNode, err := a.nodes.Get(a.cfg.NodeName)
	if apierrors.IsNotFound(err) {
		a.waiting("Node object " + a.cfg.NodeName + " does not exist yet")
		return nil
	}
	if err != nil {
		return fmt.Errorf("get node %s: %w", a.cfg.NodeName, err)
	}
	self, skip := parseNode(selfNode)
	if skip != nil && skip.Reason == ReasonMissingInternalIP {
		a.waiting("Node has no IPv4 InternalIP address yet")
		return nil
	}
	if skip != nil && skip.Reason == ReasonMalformedPodCIDR {
		if a.selfProblem != skip.Message { // one Event per problem, not per retry
			a.selfProblem = skip.Message
			a.event(selfNode, *skip)
		}
		return fmt.Errorf("own node: %s", skip.Message)
	}
	a.selfProblem = ""
	// A malformed annotation on our own Node is ours to overwrite below.
	a.checkOwnPodCIDRs(selfNode, self)

	under, err := a.overlay.LinkByAddr(self.InternalIP)
	if err != nil {
		return fmt.Errorf("find underlay device of InternalIP %s: %w", self.InternalIP, err)
	}
	vxlanMTU := under.MTU - overlay.Overhead
	podMTU := vxlanMTU
	if a.cfg.MTU > 0 {
		podMTU = a.cfg.MTU
	}
	if !a.mtuChecked {
		a.mtuChecked = true
		if a.cfg.MTU > 0 && a.cfg.MTU != vxlanMTU {
			effect := "pods use less than the underlay allows"
			if a.cfg.MTU > vxlanMTU {
				effect = "pod packets larger than the overlay carries are dropped or need fragmentation"
			}
			a.log.Warn("--mtu does not match the underlay", "mtu", a.cfg.MTU, "underlay", under.Name,
				"underlay_mtu", under.MTU, "fitting_mtu", vxlanMTU, "effect", effect)
		}
	}

	dev, err := a.overlay.EnsureDevice(overlay.DeviceConfig{
		Name:     a.cfg.VXLANDevice,
		VNI:      a.cfg.VXLANVNI,
		Port:     a.cfg.VXLANPort,
		MTU:      vxlanMTU,
		Underlay: under.Index,
		Local:    self.InternalIP,
		MAC:      overlay.StableMAC(a.cfg.NodeName),
	})
	if err != nil {
		return err
	}
	if dev.Index != a.lastDevice.Index || dev.MTU != a.lastDevice.MTU {
		a.log.Info("vxlan device ready", "device", dev.Name, "index", dev.Index, "mac", dev.MAC.String(),
			"mtu", dev.MTU, "vni", a.cfg.VXLANVNI, "port", a.cfg.VXLANPort, "local", self.InternalIP, "underlay", under.Name)
		a.lastDevice = dev
	}
	a.vxlanIndex.Store(int32(dev.Index))
	self.VTEPMAC = dev.MAC

	// podPathErr holds failures of what pods need from the node (forwarding,
	// masquerading, the eBPF datapath): the conflist is withheld while there
	// are any, so the runtime's CNI STATUS fails and no pod starts on a
	// half-built node.
	var errs []error
	podPathErr := a.ensureHost(hostnet.Config{IPv6: hasIPv6(self.PodCIDRs), LooseRPFilter: []string{dev.Name, under.Name}})
	if podPathErr != nil {
		errs = append(errs, podPathErr)
	}
	if err := a.publishVTEP(ctx, selfNode, dev, self.InternalIP); err != nil {
		errs = append(errs, err)
	}

	allNodes, err := a.nodes.List(labels.Everything())
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list nodes: %w", err))...)
	}
	bounds, err := a.peerBounds(dev)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	sel := selectPeers(self, allNodes, bounds)
	a.reportSelection(sel, allNodes)

	plan, err := a.overlay.Sync(dev, overlay.Desired(self.PodCIDRs, sel.Peers))
	if err != nil {
		errs = append(errs, fmt.Errorf("sync overlay: %w", err))
	}
	a.countPlan(plan)
	if !plan.Empty() {
		a.log.Info("overlay updated", "peers", len(sel.Peers),
			"routes", len(plan.UpsertRoutes), "routes_deleted", len(plan.DelRoutes),
			"neighbours", len(plan.UpsertNeighbours), "neighbours_deleted", len(plan.DelNeighbours),
			"fdb", len(plan.UpsertFDB), "fdb_deleted", len(plan.DelFDB),
			"addresses", len(plan.AddAddresses), "addresses_deleted", len(plan.DelAddresses))
	}

	if err := a.ensureMasquerade(ctx, self, sel); err != nil {
		errs = append(errs, err)
		podPathErr = errors.Join(podPathErr, err)
	}
	if err := a.ensureDatapath(ctx, self, under, dev, sel); err != nil {
		errs = append(errs, err)
		podPathErr = errors.Join(podPathErr, err)
	}

	if len(self.PodCIDRs) == 0 {
		a.waiting("Node has no spec.podCIDRs yet (is kube-controller-manager running with --allocate-node-cidrs?)")
		return errors.Join(errs...)
	}
	if podPathErr != nil {
		// A conflist left from before a reboot (or written by the
		// installer) would let pods start on a node whose datapath this
		// agent has not loaded yet: take it back until it has.
		if a.dp == nil && a.datapathWanted() {
			path := filepath.Join(a.cfg.CNIConfDir, cni.ConfListName)
			if err := os.Remove(path); err == nil {
				a.log.Warn("removed a CNI configuration left from an earlier run: no pod starts until the datapath is loaded", "path", path)
			} else if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("withdraw stale CNI configuration %s: %w", path, err))
			}
		}
		return errors.Join(append(errs, errors.New("CNI configuration withheld until the node's datapath is in place"))...)
	}
	if err := a.writeConfList(selfNode, podMTU); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if !a.ready.Swap(true) {
		a.waitingFor = ""
		a.log.Info("node ready", "node", a.cfg.NodeName, "pod_cidrs", selfNode.Spec.PodCIDRs, "peers", len(sel.Peers))
	}
	return nil
}

func hasIPv6(ps []netip.Prefix) bool {
	return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Addr().Is6() })
}

func (a *Agent) ensureHost(cfg hostnet.Config) error {
	var changes []hostnet.Change
	ensure := func() (err error) {
		procSys := a.cfg.ProcSys
		if procSys == "" {
			procSys = "/proc/sys"
		}
		changes, err = hostnet.Ensure(procSys, cfg)
		return err
	}
	var err error
	if a.cfg.NetNS != "" {
		err = netns.Do(a.cfg.NetNS, ensure)
	} else {
		err = ensure()
	}
	for _, c := range changes {
		a.metrics.hostChanges.Inc()
		a.log.Info("sysctl set", "key", c.Key, "old", c.Old, "new", c.New)
	}
	if err != nil {
		return fmt.Errorf("host sysctls: %w", err)
	}
	return nil
}

// publishVTEP records the vxlan device's MAC and underlay address on our own
// Node, where the other agents read them.
func (a *Agent) publishVTEP(ctx context.Context, n *corev1.Node, dev overlay.Link, local netip.Addr) error {
	want := map[string]string{AnnotationVTEPMAC: dev.MAC.String(), AnnotationVTEPIP: local.String()}
	if n.Annotations[AnnotationVTEPMAC] == want[AnnotationVTEPMAC] && n.Annotations[AnnotationVTEPIP] == want[AnnotationVTEPIP] {
		return nil
	}
	patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%q,%q:%q}}}`,
		AnnotationVTEPMAC, want[AnnotationVTEPMAC], AnnotationVTEPIP, want[AnnotationVTEPIP])
	if err := a.cluster.PatchNode(ctx, n.Name, patch); err != nil {
		return fmt.Errorf("annotate node %s with its VTEP: %w", n.Name, err)
	}
	a.log.Info("published VTEP", "node", n.Name, "mac", want[AnnotationVTEPMAC], "ip", want[AnnotationVTEPIP])
	return nil
}

// reportSelection logs, records Events for and counts the nodes left out.
// Events and warnings are emitted when a node's reason changes, not on every
// resync.
func (a *Agent) reportSelection(sel Selection, nodes []*corev1.Node) {
	byName := make(map[string]*corev1.Node, len(nodes))
	for _, n := range nodes {
		byName[n.Name] = n
	}
	counts := map[string]float64{}
	for name, s := range sel.Skipped {
		counts[s.Reason]++
		if a.skipped[name] != s {
			a.log.Warn("node skipped", "peer", name, "reason", s.Reason, "detail", s.Message)
			a.event(byName[name], s)
		}
	}
	for name := range a.skipped {
		if _, still := sel.Skipped[name]; !still {
			a.log.Info("node no longer skipped", "peer", name)
		}
	}
	a.skipped = maps.Clone(sel.Skipped)
	for _, r := range skipReasons {
		a.metrics.skipped.WithLabelValues(r).Set(counts[r])
	}
	a.metrics.peers.Set(float64(len(sel.Peers)))
	a.metrics.pending.Set(float64(len(sel.Pending)))
	if len(sel.Pending) > 0 {
		a.log.Debug("nodes pending", "nodes", strings.Join(sel.Pending, ","))
	}
}

func (a *Agent) event(n *corev1.Node, s Skip) {
	if n == nil || a.recorder == nil {
		return
	}
	a.recorder.Eventf(n, corev1.EventTypeWarning, "SinabroNodeSkipped",
		"%s: %s (reported by the agent on %s)", s.Reason, s.Message, a.cfg.NodeName)
}

func (a *Agent) countPlan(p overlay.Plan) {
	add := func(kind, op string, n int) {
		if n > 0 {
			a.metrics.overlayChanges.WithLabelValues(kind, op).Add(float64(n))
		}
	}
	add("address", "upsert", len(p.AddAddresses))
	add("address", "delete", len(p.DelAddresses))
	add("route", "upsert", len(p.UpsertRoutes))
	add("route", "delete", len(p.DelRoutes))
	add("neighbour", "upsert", len(p.UpsertNeighbours))
	add("neighbour", "delete", len(p.DelNeighbours))
	add("fdb", "upsert", len(p.UpsertFDB))
	add("fdb", "delete", len(p.DelFDB))
}

// portMap decides whether the conflist chains portmap (see CNIPortMap).
func (a *Agent) portMap() bool {
	switch a.cfg.CNIPortMap {
	case "true":
		return true
	case "auto":
		if a.cfg.CNIBinDir == "" {
			return false
		}
		_, err := os.Stat(filepath.Join(a.cfg.CNIBinDir, cni.PortMapPlugin))
		return err == nil
	}
	return false
}

func (a *Agent) writeConfList(n *corev1.Node, mtu int) error {
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 {
		cidrs = []string{n.Spec.PodCIDR}
	}
	nc := cni.NetworkConfig{MTU: mtu, PodCIDRs: cidrs, DataDir: a.cfg.StateDir, PortMap: a.portMap()}
	if a.policy != nil {
		nc.PolicyMap = datapath.PolicyEndpointsPin(a.cfg.BPFRoot)
	}
	path, err := cni.WriteConfList(a.cfg.CNIConfDir, nc)
	if err != nil {
		return err
	}
	if a.lastConfMTU != mtu {
		a.lastConfMTU = mtu
		a.log.Info("CNI configuration in place", "path", path, "pod_cidrs", cidrs, "mtu", mtu, "portmap", a.portMap())
	}
	return nil
}

// Cleanup removes what the agent creates on a node: the eBPF datapath
// pinned under bpfRoot (uplink and host veth programs, maps, conntrack,
// TCP acceleration, the socket load balancer),
// the vxlan device (with its addresses, routes, neighbours and FDB
// entries), the remaining sinabro-marked routes and the masquerade table.
// The CNI configuration is left for the installer to manage. An empty
// bpfRoot leaves the eBPF datapath alone.
func Cleanup(ctx context.Context, device, bpfRoot string) error {
	ovl, err := overlay.Open(0)
	if err != nil {
		return err
	}
	defer ovl.Close()
	var dpErr error
	if bpfRoot != "" {
		if err := datapath.Cleanup(bpfRoot); err != nil {
			dpErr = fmt.Errorf("remove eBPF datapath under %s: %w", bpfRoot, err)
		}
		if err := sockmap.Cleanup(bpfRoot); err != nil {
			dpErr = errors.Join(dpErr, fmt.Errorf("remove TCP acceleration under %s: %w", bpfRoot, err))
		}
		if err := service.Cleanup(bpfRoot); err != nil {
			dpErr = errors.Join(dpErr, fmt.Errorf("remove Service load balancing under %s: %w", bpfRoot, err))
		}
		dpErr = errors.Join(dpErr, bpffs.RemoveSharedIfAlone(bpfRoot))
		// The root itself, now empty (the datapath's Cleanup left it).
		if err := os.Remove(bpfRoot); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTEMPTY) {
			dpErr = errors.Join(dpErr, err)
		}
	}
	return errors.Join(dpErr, ovl.Cleanup(device), masquerade.NewNFTables(0).Remove(ctx))
}
