package agent

import (
	"context"
	"errors"
	"time"

	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"golang.org/x/sync/errgroup"
)

// The wiring: which controllers the agent runs, on which shared informers.
//
//	controller    owns                                         reads
//	node          overlay (vxlan, routes, FDB), sysctls,       Nodes
//	(Agent)       masquerading, the eBPF datapath, conflist
//	endpoints     host routing's endpoint map, tc attachments  netlink (links, routes, neighbours)
//	gc            conntrack/NAT entries of the datapath        the datapath's maps
//	acceleration  sockmap programs and maps (pkg/sockmap)      Nodes, this node's Pods, Namespaces
//	services      socket load balancer (pkg/service), the      Services, EndpointSlices
//	              datapath's table for traffic from outside,
//	              healthCheckNodePort servers
//	policy        the datapath's NetworkPolicy maps,           Pods (all nodes), Namespaces,
//	              policy.json (pkg/policy)                     NetworkPolicies, this node's pods
//	                                                           (from endpoints), addresses
//	flows         flow telemetry: its settings, the flow       Pods (all nodes), Nodes, Services,
//	              buffer and the observe socket (pkg/flows)    the datapath's ring buffer
//
// Each has its own trigger and loop and fails alone: a Service error
// never delays the overlay, and the reverse. A new feature adds a
// controller here (and its informers in informers.go).

// Run starts the informers and every controller, and returns when ctx is
// cancelled (nil) or a controller fails for good (ErrRestart included).
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	inf := newInformers(ctx, a.cluster, a.cfg.NodeName)

	nodes := inf.Nodes()
	a.nodes = corelisters.NewNodeLister(nodes.GetIndexer())
	if err := onChange(nodes, relevantChange, a.trigger); err != nil {
		return err
	}
	accel, err := newAccelerationController(a, inf)
	if err != nil {
		return err
	}
	services, err := newServiceController(a, inf)
	if err != nil {
		return err
	}
	if a.cfg.NetworkPolicy && a.cfg.HostRouting {
		if a.policy, err = newPolicyController(a, inf); err != nil {
			return err
		}
		a.policy.mayDeny = accel.policyChanged
	} else if a.cfg.NetworkPolicy {
		a.log.Error("NetworkPolicy is NOT enforced: it needs host routing (--host-routing, or the kernel's conntrack kfuncs with --kube-proxy-coexistence)")
	}

	var flowsCtl *flowsController
	if a.cfg.BPFRoot != "" && a.cfg.Flows.Enabled {
		if flowsCtl, err = newFlowsController(a, inf); err != nil {
			return err
		}
	}

	recorder, stopEvents := a.cluster.EventRecorder("sinabro-agent")
	a.recorder = recorder
	defer stopEvents()

	g, ctx := errgroup.WithContext(ctx)
	if a.cfg.HealthAddr != "" {
		srv, err := a.healthServer()
		if err != nil {
			return err
		}
		srv.run(ctx, g)
	}
	inf.run(ctx, g)
	if err := a.runEndpoints(ctx, g); err != nil {
		cancel()
		g.Wait()
		return err
	}
	g.Go(func() error { return a.runGC(ctx) })
	g.Go(func() error { return accel.run(ctx) })
	g.Go(func() error { return services.run(ctx) })
	if a.policy != nil {
		g.Go(func() error { return a.policy.run(ctx) })
	}
	if flowsCtl != nil {
		g.Go(func() error { return flowsCtl.run(ctx) })
	} else if a.cfg.BPFRoot != "" {
		g.Go(func() error { a.flowsOff(); return nil })
	}
	g.Go(func() error {
		a.log.Info("waiting for the node informer to sync")
		if !cache.WaitForCacheSync(ctx.Done(), nodes.HasSynced) {
			if ctx.Err() != nil {
				return nil
			}
			return errors.New("sync the node informer")
		}
		a.trigger()
		return a.loop(ctx)
	})
	return g.Wait()
}

// trigger asks for a pass of the loop reading kick; a pass already pending
// will see the latest state.
func trigger(kick chan struct{}) {
	select {
	case kick <- struct{}{}:
	default:
	}
}

// runLoop runs pass at once, then on every trigger, at least every
// period, and after a failure again after a backoff from 1 s up to period
// (reported to failed), until ctx ends.
func runLoop(ctx context.Context, kick <-chan struct{}, period time.Duration, pass func(context.Context) error, failed func(err error, retry time.Duration)) {
	const minBackoff = time.Second
	backoff := minBackoff
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-kick:
		case <-timer.C:
		}
		wait := period
		if err := pass(ctx); err != nil && ctx.Err() == nil {
			failed(err, backoff)
			wait, backoff = backoff, min(2*backoff, period)
		} else {
			backoff = minBackoff
		}
		timer.Reset(wait)
	}
}
