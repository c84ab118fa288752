package agent

import (
	"context"
	"fmt"
	"log/slog"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"

	"github.com/sinabro-io/sinabro/pkg/kube"
)

// Cluster is what the agent needs from the Kubernetes API. KubeCluster
// provides it on pkg/kube; tests adapt client-go's fake clientset.
type Cluster interface {
	// Nodes lists and watches all Nodes, for the agent's node informer.
	Nodes(ctx context.Context) cache.ListerWatcher
	// Pods lists and watches the Pods scheduled to node (for per-pod
	// settings such as the TCP acceleration annotation).
	Pods(ctx context.Context, node string) cache.ListerWatcher
	// AllPods lists and watches the Pods of every node, and
	// NetworkPolicies all NetworkPolicies (NetworkPolicy's peers).
	AllPods(ctx context.Context) cache.ListerWatcher
	NetworkPolicies(ctx context.Context) cache.ListerWatcher
	// Namespaces lists and watches all Namespaces (the TCP acceleration
	// annotation of a pod's namespace).
	Namespaces(ctx context.Context) cache.ListerWatcher
	// Services and EndpointSlices list and watch all of them, for
	// Service load balancing.
	Services(ctx context.Context) cache.ListerWatcher
	EndpointSlices(ctx context.Context) cache.ListerWatcher
	// PatchNode applies a JSON merge patch to a Node through its status
	// subresource: the API server takes metadata changes (our VTEP
	// annotations) there too, as flannel relies on, and RBAC then needs
	// only "patch nodes/status", not "patch nodes" (which could change
	// any Node's spec: taints, pod CIDRs).
	PatchNode(ctx context.Context, name string, patch []byte) error
	// EventRecorder returns a recorder of core/v1 Events and the function
	// that flushes and stops it.
	EventRecorder(component string) (kube.EventRecorder, func())
}

// KubeCluster connects with the kubeconfig at path, or with the in-cluster
// service account when path is "".
func KubeCluster(path string) (Cluster, error) {
	cfg, err := kube.Config(path)
	if err != nil {
		return nil, err
	}
	c, err := kube.New(cfg, "sinabro-agent")
	if err != nil {
		return nil, fmt.Errorf("create kubernetes client: %w", err)
	}
	return kubeCluster{c: c, log: slog.Default()}, nil
}

type kubeCluster struct {
	c   *kube.Client
	log *slog.Logger
}

func (k kubeCluster) Nodes(ctx context.Context) cache.ListerWatcher {
	return k.c.Nodes().ListWatch(ctx, nil)
}

func (k kubeCluster) Pods(ctx context.Context, node string) cache.ListerWatcher {
	return k.c.Pods("").ListWatch(ctx, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
	})
}

func (k kubeCluster) AllPods(ctx context.Context) cache.ListerWatcher {
	return k.c.Pods("").ListWatch(ctx, nil)
}

func (k kubeCluster) NetworkPolicies(ctx context.Context) cache.ListerWatcher {
	return k.c.NetworkPolicies("").ListWatch(ctx, nil)
}

func (k kubeCluster) Namespaces(ctx context.Context) cache.ListerWatcher {
	return k.c.Namespaces().ListWatch(ctx, nil)
}

func (k kubeCluster) Services(ctx context.Context) cache.ListerWatcher {
	return k.c.Services("").ListWatch(ctx, nil)
}

func (k kubeCluster) EndpointSlices(ctx context.Context) cache.ListerWatcher {
	return k.c.EndpointSlices("").ListWatch(ctx, nil)
}

func (k kubeCluster) PatchNode(ctx context.Context, name string, patch []byte) error {
	_, err := k.c.Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: fieldManager}, "status")
	return err
}

func (k kubeCluster) EventRecorder(component string) (kube.EventRecorder, func()) {
	return k.c.EventRecorder(component, k.log)
}

// fieldManager names the agent in the managed fields of what it writes.
const fieldManager = "sinabro-agent"
