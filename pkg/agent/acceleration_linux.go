package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/sockmap"
)

// kernelBTF is where the running kernel describes its types (CONFIG_DEBUG_INFO_BTF).
const kernelBTF = "/sys/kernel/btf/vmlinux"

// accelerationController owns same-node TCP acceleration (pkg/sockmap):
// its programs, its maps and its metrics. It reads our Node (the pod
// CIDRs), this node's Pods and every Namespace (the annotation) from the
// shared informers and runs its own loop, independent of the overlay's.
type accelerationController struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	kick    chan struct{}

	nodes            corelisters.NodeLister
	pods, namespaces cache.Store
	synced           func() bool // all three are listed

	accel     *sockmap.Accelerator
	plan      accelerationPlan // what accel's pod map holds
	collector prometheus.Collector
	off       bool // disabled (a leftover from an earlier run, or ours)
	// policyEpoch is moved by the policy controller (policyChanged).
	policyEpoch atomic.Uint32
	noBTF       bool            // warned once that the kernel lacks BTF
	warned      map[string]bool // bad annotation values already logged
}

func newAccelerationController(a *Agent, inf *informers) (*accelerationController, error) {
	c := &accelerationController{cfg: a.cfg, log: a.log.With("controller", "acceleration"), metrics: a.metrics, kick: make(chan struct{}, 1)}
	nodes, pods, nss := inf.Nodes(), inf.Pods(), inf.Namespaces()
	c.nodes = corelisters.NewNodeLister(nodes.GetIndexer())
	c.pods, c.namespaces = pods.GetStore(), nss.GetStore()
	c.synced = func() bool { return nodes.HasSynced() && pods.HasSynced() && nss.HasSynced() }
	kick := func() { trigger(c.kick) }
	err := errors.Join(
		onChange(nodes, func(o, n *corev1.Node) bool {
			return n.Name == c.cfg.NodeName && (!slices.Equal(o.Spec.PodCIDRs, n.Spec.PodCIDRs) || o.Spec.PodCIDR != n.Spec.PodCIDR)
		}, kick),
		onChange(pods, accelerationInputsChanged, kick),
		onChange(nss, func(o, n *corev1.Namespace) bool {
			return o.Annotations[AnnotationTCPAcceleration] != n.Annotations[AnnotationTCPAcceleration]
		}, kick))
	return c, err
}

// policyChanged is told by the policy controller that a change may deny
// flows that exist: accelerated connections must leave acceleration (their
// bytes skip tc, where policy is decided).
func (c *accelerationController) policyChanged() {
	c.policyEpoch.Add(1)
	trigger(c.kick)
}

// run waits for the informers, then keeps acceleration in line until ctx
// ends; the handles are released then, and acceleration keeps running.
func (c *accelerationController) run(ctx context.Context) error {
	defer c.close()
	// Until our Node, the Pods and Namespaces are known, any decision
	// could accelerate a pod that opted out, or detach connections a
	// restarted agent should keep: leave things as they are.
	if !cache.WaitForCacheSync(ctx.Done(), c.synced) {
		return nil
	}
	runLoop(ctx, c.kick, c.cfg.ResyncInterval, c.pass, func(err error, retry time.Duration) {
		c.log.Error("TCP acceleration", "err", err, "retry_in", retry)
	})
	return nil
}

// pass plans from our Node's pod CIDRs (none until it has them).
func (c *accelerationController) pass(ctx context.Context) error {
	var self nodeInfo
	if n, err := c.nodes.Get(c.cfg.NodeName); err == nil {
		self, _ = parseNode(n)
	}
	return c.ensure(ctx, self)
}

// ensure keeps same-node TCP acceleration (pkg/sockmap) in line
// with the node's --tcp-acceleration and the pods' and namespaces'
// annotations (see planAcceleration). The programs are attached only while
// something can be accelerated, and detached live otherwise (established
// connections continue on the normal path).
func (c *accelerationController) ensure(ctx context.Context, self nodeInfo) error {
	if c.cfg.BPFRoot == "" {
		return c.disableAcceleration(ctx, "no bpffs root")
	}
	plan := c.accelerationPlan(self)
	for _, w := range plan.Warnings {
		if !c.warned[w] {
			c.log.Warn("ignoring a TCP acceleration annotation that is neither true nor false", "annotation", w)
		}
	}
	c.warned = map[string]bool{}
	for _, w := range plan.Warnings {
		c.warned[w] = true
	}
	if !plan.active() {
		reason := "no pod opted in (sinabro.io/tcp-acceleration: \"true\" on the pod or its namespace)"
		if c.cfg.TCPAcceleration {
			reason = "the node has no IPv4 pod CIDR"
		}
		return c.disableAcceleration(ctx, reason)
	}
	logPlan := func(msg string) {
		if c.cfg.TCPAcceleration {
			c.log.Info(msg, "node_default", true, "pod_prefixes", plan.Prefixes, "opted_out", plan.Excluded)
		} else {
			c.log.Info(msg, "node_default", false, "opted_in", plan.Prefixes)
		}
	}
	if c.accel != nil {
		// A NetworkPolicy change that may deny existing flows moves the
		// epoch: accelerated connections go back through tc.
		if err := c.accel.SetPolicyEpoch(c.policyEpoch.Load()); err != nil {
			return err
		}
		if slices.Equal(plan.Prefixes, c.plan.Prefixes) && slices.Equal(plan.Excluded, c.plan.Excluded) {
			return nil
		}
		if err := c.accel.SetPods(plan.Prefixes, plan.Excluded); err != nil {
			return err
		}
		c.plan = plan
		logPlan("TCP acceleration pods changed")
		return nil
	}
	// The programs read socket internals through the kernel's BTF: without
	// it the node runs unaccelerated (an optimisation, not a failure).
	if _, err := os.Stat(kernelBTF); err != nil {
		if !c.noBTF {
			c.noBTF = true
			c.log.Warn("TCP acceleration needs kernel BTF; running without it", "btf", kernelBTF, "err", err)
		}
		return nil
	}
	cg, err := cgroup.V2Dir(c.cfg.PodCgroup)
	if err != nil {
		return fmt.Errorf("TCP acceleration needs a cgroup v2 (--pod-cgroup): %w", err)
	}
	acc, err := sockmap.Enable(ctx, sockmap.Config{BPFRoot: c.cfg.BPFRoot, CgroupPath: cg, PodPrefixes: plan.Prefixes, Excluded: plan.Excluded,
		PolicyEpoch: c.policyEpoch.Load()})
	if err != nil {
		return fmt.Errorf("enable TCP acceleration on cgroup %s: %w", cg, err)
	}
	c.accel, c.collector, c.off, c.plan = acc, acc.Collector(), false, plan
	if err := c.metrics.registry.Register(c.collector); err != nil {
		c.log.Warn("register TCP acceleration metrics", "err", err)
	}
	logPlan("TCP acceleration enabled on cgroup " + cg)
	return nil
}

// disableAcceleration detaches the programs, once: its own, or those a
// previous run left pinned under the bpffs root.
func (c *accelerationController) disableAcceleration(ctx context.Context, reason string) error {
	if c.accel != nil {
		c.metrics.registry.Unregister(c.collector)
		err := c.accel.Disable(ctx)
		if cerr := c.accel.Close(); err == nil {
			err = cerr
		}
		c.accel, c.collector, c.plan, c.off = nil, nil, accelerationPlan{}, true
		c.log.Info("TCP acceleration disabled", "reason", reason)
		return err
	}
	if !c.off && c.cfg.BPFRoot != "" {
		// A previous run may have left it enabled.
		c.off = true
		if err := sockmap.Disable(ctx, c.cfg.BPFRoot); err != nil {
			return fmt.Errorf("disable TCP acceleration of an earlier run: %w", err)
		}
		c.log.Debug("TCP acceleration off", "reason", reason)
	}
	return nil
}

// accelerationPlan decides from this node's Pods and the Namespaces.
func (c *accelerationController) accelerationPlan(self nodeInfo) accelerationPlan {
	var pods []*corev1.Pod
	if c.pods != nil {
		for _, obj := range c.pods.List() {
			if p, ok := obj.(*corev1.Pod); ok {
				pods = append(pods, p)
			}
		}
	}
	namespaces := map[string]*corev1.Namespace{}
	if c.namespaces != nil {
		for _, obj := range c.namespaces.List() {
			if ns, ok := obj.(*corev1.Namespace); ok {
				namespaces[ns.Name] = ns
			}
		}
	}
	return planAcceleration(c.cfg.TCPAcceleration, self.PodCIDRs, pods, namespaces)
}

// close releases the handles; acceleration keeps running.
func (c *accelerationController) close() error {
	if c.accel == nil {
		return nil
	}
	c.metrics.registry.Unregister(c.collector)
	err := c.accel.Close()
	c.accel, c.collector = nil, nil
	return err
}
