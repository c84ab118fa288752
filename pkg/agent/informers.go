package agent

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/cache"

	"golang.org/x/sync/errgroup"
)

// informers are the agent's watches on the API: one per kind, shared by
// the controllers that read it (each adds its own event handler). A kind
// no controller asked for is never watched (no Service watch with
// --kube-proxy-replacement=false).
type informers struct {
	ctx     context.Context
	cluster Cluster
	node    string
	started []cache.SharedIndexInformer

	nodes, pods, allPods, namespaces, services, slices, policies cache.SharedIndexInformer
}

func newInformers(ctx context.Context, cluster Cluster, node string) *informers {
	return &informers{ctx: ctx, cluster: cluster, node: node}
}

func (i *informers) get(slot *cache.SharedIndexInformer, lw cache.ListerWatcher, obj runtime.Object) cache.SharedIndexInformer {
	if *slot == nil {
		*slot = cache.NewSharedIndexInformer(lw, obj, 0, cache.Indexers{})
		i.started = append(i.started, *slot)
	}
	return *slot
}

// Nodes: every Node (the overlay's peers, our own Node's pod CIDRs).
func (i *informers) Nodes() cache.SharedIndexInformer {
	return i.get(&i.nodes, i.cluster.Nodes(i.ctx), &corev1.Node{})
}

// Pods: this node's Pods.
func (i *informers) Pods() cache.SharedIndexInformer {
	return i.get(&i.pods, i.cluster.Pods(i.ctx, i.node), &corev1.Pod{})
}

// AllPods: the Pods of every node (NetworkPolicy's peers).
func (i *informers) AllPods() cache.SharedIndexInformer {
	return i.get(&i.allPods, i.cluster.AllPods(i.ctx), &corev1.Pod{})
}

// NetworkPolicies: every NetworkPolicy.
func (i *informers) NetworkPolicies() cache.SharedIndexInformer {
	return i.get(&i.policies, i.cluster.NetworkPolicies(i.ctx), &networkingv1.NetworkPolicy{})
}

// Namespaces: every Namespace (their annotations and labels).
func (i *informers) Namespaces() cache.SharedIndexInformer {
	return i.get(&i.namespaces, i.cluster.Namespaces(i.ctx), &corev1.Namespace{})
}

// Services: every Service.
func (i *informers) Services() cache.SharedIndexInformer {
	return i.get(&i.services, i.cluster.Services(i.ctx), &corev1.Service{})
}

// EndpointSlices: every EndpointSlice.
func (i *informers) EndpointSlices() cache.SharedIndexInformer {
	return i.get(&i.slices, i.cluster.EndpointSlices(i.ctx), &discoveryv1.EndpointSlice{})
}

// run starts every informer asked for, under g.
func (i *informers) run(ctx context.Context, g *errgroup.Group) {
	for _, inf := range i.started {
		g.Go(func() error { inf.RunWithContext(ctx); return nil })
	}
}

// onChange calls kick on every add and delete of inf's objects, and on
// updates for which relevant (nil: always) says so.
func onChange[T any](inf cache.SharedIndexInformer, relevant func(old, cur T) bool, kick func()) error {
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { kick() },
		UpdateFunc: func(old, cur any) {
			o, ok1 := old.(T)
			n, ok2 := cur.(T)
			if relevant == nil || !ok1 || !ok2 || relevant(o, n) {
				kick()
			}
		},
		DeleteFunc: func(any) { kick() },
	})
	if err != nil {
		return fmt.Errorf("add event handler: %w", err)
	}
	return nil
}
