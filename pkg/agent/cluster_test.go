package agent

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/sinabro-io/sinabro/pkg/kube"
)

// clientsetCluster adapts a client-go clientset (the fake one in tests) to
// the agent's Cluster.
type clientsetCluster struct{ c kubernetes.Interface }

func (k clientsetCluster) Nodes(ctx context.Context) cache.ListerWatcher {
	return &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			return k.c.CoreV1().Nodes().List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			return k.c.CoreV1().Nodes().Watch(ctx, o)
		},
	}
}

func (k clientsetCluster) Pods(ctx context.Context, node string) cache.ListerWatcher {
	return &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = "spec.nodeName=" + node
			return k.c.CoreV1().Pods("").List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = "spec.nodeName=" + node
			return k.c.CoreV1().Pods("").Watch(ctx, o)
		},
	}
}

func (k clientsetCluster) AllPods(ctx context.Context) cache.ListerWatcher {
	return &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			return k.c.CoreV1().Pods("").List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			return k.c.CoreV1().Pods("").Watch(ctx, o)
		},
	}
}

func (k clientsetCluster) NetworkPolicies(ctx context.Context) cache.ListerWatcher {
	return &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			return k.c.NetworkingV1().NetworkPolicies("").List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			return k.c.NetworkingV1().NetworkPolicies("").Watch(ctx, o)
		},
	}
}

func (k clientsetCluster) Namespaces(ctx context.Context) cache.ListerWatcher {
	return &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			return k.c.CoreV1().Namespaces().List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			return k.c.CoreV1().Namespaces().Watch(ctx, o)
		},
	}
}

func (k clientsetCluster) Services(ctx context.Context) cache.ListerWatcher {
	return &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			return k.c.CoreV1().Services("").List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			return k.c.CoreV1().Services("").Watch(ctx, o)
		},
	}
}

func (k clientsetCluster) EndpointSlices(ctx context.Context) cache.ListerWatcher {
	return &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			return k.c.DiscoveryV1().EndpointSlices("").List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			return k.c.DiscoveryV1().EndpointSlices("").Watch(ctx, o)
		},
	}
}

func (k clientsetCluster) PatchNode(ctx context.Context, name string, patch []byte) error {
	_, err := k.c.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: fieldManager}, "status")
	return err
}

func (k clientsetCluster) EventRecorder(component string) (kube.EventRecorder, func()) {
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: k.c.CoreV1().Events("")})
	return b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component}), b.Shutdown
}
