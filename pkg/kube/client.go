// Package kube is Sinabro's small Kubernetes API client: typed access to the
// few resources the agent and the lab use, built on client-go's REST client,
// list-watch and informer machinery.
//
// Why not client-go's generated clientset: it links every API group and
// registers all of them in package init, which costs every CNI plugin exec
// (the same executable) several milliseconds before main even starts. This
// package registers only the groups below, lazily, on first use.
package kube

import (
	"context"
	"fmt"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	coordv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

var (
	schemeOnce sync.Once
	scheme     *runtime.Scheme
	codecs     serializer.CodecFactory
	paramCodec runtime.ParameterCodec
)

func loadScheme() {
	schemeOnce.Do(func() {
		scheme = runtime.NewScheme()
		for _, add := range []func(*runtime.Scheme) error{
			corev1.AddToScheme, coordv1.AddToScheme, authnv1.AddToScheme, rbacv1.AddToScheme, appsv1.AddToScheme,
			discoveryv1.AddToScheme, networkingv1.AddToScheme,
		} {
			if err := add(scheme); err != nil {
				panic(fmt.Sprintf("register API types: %v", err)) // programming error
			}
		}
		metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
		codecs = serializer.NewCodecFactory(scheme)
		paramCodec = runtime.NewParameterCodec(scheme)
	})
}

// Config loads a REST config from a kubeconfig file, or the in-cluster
// config when path is "".
func Config(path string) (*rest.Config, error) {
	if path == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster config (pass --kubeconfig outside a cluster): %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", path, err)
	}
	return cfg, nil
}

// Client holds one REST client per API group version in use.
type Client struct {
	core, coord, authn, rbac, apps, discovery, networking *rest.RESTClient
	Config                                                *rest.Config
}

// New returns a client for cfg. userAgent names the component in API logs.
func New(cfg *rest.Config, userAgent string) (*Client, error) {
	loadScheme()
	mk := func(gv schema.GroupVersion, apiPath string) (*rest.RESTClient, error) {
		c := rest.CopyConfig(cfg)
		c.GroupVersion = &gv
		c.APIPath = apiPath
		c.NegotiatedSerializer = codecs.WithoutConversion()
		c.UserAgent = userAgent
		if c.ContentType == "" {
			c.ContentType = runtime.ContentTypeJSON
		}
		rc, err := rest.RESTClientFor(c)
		if err != nil {
			return nil, fmt.Errorf("rest client for %s: %w", gv, err)
		}
		return rc, nil
	}
	var c Client
	var err error
	c.Config = cfg
	if c.core, err = mk(corev1.SchemeGroupVersion, "/api"); err != nil {
		return nil, err
	}
	for _, g := range []struct {
		dst **rest.RESTClient
		gv  schema.GroupVersion
	}{
		{&c.coord, coordv1.SchemeGroupVersion},
		{&c.authn, authnv1.SchemeGroupVersion},
		{&c.rbac, rbacv1.SchemeGroupVersion},
		{&c.apps, appsv1.SchemeGroupVersion},
		{&c.discovery, discoveryv1.SchemeGroupVersion},
		{&c.networking, networkingv1.SchemeGroupVersion},
	} {
		if *g.dst, err = mk(g.gv, "/apis"); err != nil {
			return nil, err
		}
	}
	return &c, nil
}

// Object is a pointer to an API type T.
type Object[T any] interface {
	*T
	runtime.Object
}

// Resource is typed access to one resource, optionally in one namespace.
type Resource[T, L any, PT Object[T], PL Object[L]] struct {
	rc        *rest.RESTClient
	resource  string
	namespace string
}

func (c *Client) Nodes() Resource[corev1.Node, corev1.NodeList, *corev1.Node, *corev1.NodeList] {
	return Resource[corev1.Node, corev1.NodeList, *corev1.Node, *corev1.NodeList]{rc: c.core, resource: "nodes"}
}

func (c *Client) Pods(ns string) Resource[corev1.Pod, corev1.PodList, *corev1.Pod, *corev1.PodList] {
	return Resource[corev1.Pod, corev1.PodList, *corev1.Pod, *corev1.PodList]{rc: c.core, resource: "pods", namespace: ns}
}

func (c *Client) Events(ns string) Resource[corev1.Event, corev1.EventList, *corev1.Event, *corev1.EventList] {
	return Resource[corev1.Event, corev1.EventList, *corev1.Event, *corev1.EventList]{rc: c.core, resource: "events", namespace: ns}
}

func (c *Client) Namespaces() Resource[corev1.Namespace, corev1.NamespaceList, *corev1.Namespace, *corev1.NamespaceList] {
	return Resource[corev1.Namespace, corev1.NamespaceList, *corev1.Namespace, *corev1.NamespaceList]{rc: c.core, resource: "namespaces"}
}

func (c *Client) ServiceAccounts(ns string) Resource[corev1.ServiceAccount, corev1.ServiceAccountList, *corev1.ServiceAccount, *corev1.ServiceAccountList] {
	return Resource[corev1.ServiceAccount, corev1.ServiceAccountList, *corev1.ServiceAccount, *corev1.ServiceAccountList]{rc: c.core, resource: "serviceaccounts", namespace: ns}
}

func (c *Client) Services(ns string) Resource[corev1.Service, corev1.ServiceList, *corev1.Service, *corev1.ServiceList] {
	return Resource[corev1.Service, corev1.ServiceList, *corev1.Service, *corev1.ServiceList]{rc: c.core, resource: "services", namespace: ns}
}

func (c *Client) ConfigMaps(ns string) Resource[corev1.ConfigMap, corev1.ConfigMapList, *corev1.ConfigMap, *corev1.ConfigMapList] {
	return Resource[corev1.ConfigMap, corev1.ConfigMapList, *corev1.ConfigMap, *corev1.ConfigMapList]{rc: c.core, resource: "configmaps", namespace: ns}
}

func (c *Client) Leases(ns string) Resource[coordv1.Lease, coordv1.LeaseList, *coordv1.Lease, *coordv1.LeaseList] {
	return Resource[coordv1.Lease, coordv1.LeaseList, *coordv1.Lease, *coordv1.LeaseList]{rc: c.coord, resource: "leases", namespace: ns}
}

func (c *Client) ClusterRoles() Resource[rbacv1.ClusterRole, rbacv1.ClusterRoleList, *rbacv1.ClusterRole, *rbacv1.ClusterRoleList] {
	return Resource[rbacv1.ClusterRole, rbacv1.ClusterRoleList, *rbacv1.ClusterRole, *rbacv1.ClusterRoleList]{rc: c.rbac, resource: "clusterroles"}
}

func (c *Client) ClusterRoleBindings() Resource[rbacv1.ClusterRoleBinding, rbacv1.ClusterRoleBindingList, *rbacv1.ClusterRoleBinding, *rbacv1.ClusterRoleBindingList] {
	return Resource[rbacv1.ClusterRoleBinding, rbacv1.ClusterRoleBindingList, *rbacv1.ClusterRoleBinding, *rbacv1.ClusterRoleBindingList]{rc: c.rbac, resource: "clusterrolebindings"}
}

func (c *Client) DaemonSets(ns string) Resource[appsv1.DaemonSet, appsv1.DaemonSetList, *appsv1.DaemonSet, *appsv1.DaemonSetList] {
	return Resource[appsv1.DaemonSet, appsv1.DaemonSetList, *appsv1.DaemonSet, *appsv1.DaemonSetList]{rc: c.apps, resource: "daemonsets", namespace: ns}
}

func (c *Client) Deployments(ns string) Resource[appsv1.Deployment, appsv1.DeploymentList, *appsv1.Deployment, *appsv1.DeploymentList] {
	return Resource[appsv1.Deployment, appsv1.DeploymentList, *appsv1.Deployment, *appsv1.DeploymentList]{rc: c.apps, resource: "deployments", namespace: ns}
}

func (c *Client) EndpointSlices(ns string) Resource[discoveryv1.EndpointSlice, discoveryv1.EndpointSliceList, *discoveryv1.EndpointSlice, *discoveryv1.EndpointSliceList] {
	return Resource[discoveryv1.EndpointSlice, discoveryv1.EndpointSliceList, *discoveryv1.EndpointSlice, *discoveryv1.EndpointSliceList]{rc: c.discovery, resource: "endpointslices", namespace: ns}
}

func (c *Client) NetworkPolicies(ns string) Resource[networkingv1.NetworkPolicy, networkingv1.NetworkPolicyList, *networkingv1.NetworkPolicy, *networkingv1.NetworkPolicyList] {
	return Resource[networkingv1.NetworkPolicy, networkingv1.NetworkPolicyList, *networkingv1.NetworkPolicy, *networkingv1.NetworkPolicyList]{rc: c.networking, resource: "networkpolicies", namespace: ns}
}

// CreateToken issues a bound token for a ServiceAccount (TokenRequest API).
func (c *Client) CreateToken(ctx context.Context, ns, sa string, req *authnv1.TokenRequest, _ metav1.CreateOptions) (*authnv1.TokenRequest, error) {
	out := &authnv1.TokenRequest{}
	err := c.core.Post().Namespace(ns).Resource("serviceaccounts").Name(sa).SubResource("token").
		Body(mustJSON(req)).SetHeader("Content-Type", runtime.ContentTypeJSON).Do(ctx).Into(out)
	return out, err
}

func (r Resource[T, L, PT, PL]) req(verb string) *rest.Request {
	return r.rc.Verb(verb).NamespaceIfScoped(r.namespace, r.namespace != "").Resource(r.resource)
}

// The methods below mirror client-go's typed clients, so code reads the same.

func (r Resource[T, L, PT, PL]) Get(ctx context.Context, name string, opts metav1.GetOptions) (PT, error) {
	out := PT(new(T))
	return out, r.req("GET").Name(name).VersionedParams(&opts, paramCodec).Do(ctx).Into(out)
}

func (r Resource[T, L, PT, PL]) List(ctx context.Context, opts metav1.ListOptions) (PL, error) {
	out := PL(new(L))
	return out, r.req("GET").VersionedParams(&opts, paramCodec).Do(ctx).Into(out)
}

func (r Resource[T, L, PT, PL]) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return r.req("GET").VersionedParams(&opts, paramCodec).Watch(ctx)
}

func (r Resource[T, L, PT, PL]) Create(ctx context.Context, obj PT, opts metav1.CreateOptions) (PT, error) {
	out := PT(new(T))
	return out, r.req("POST").VersionedParams(&opts, paramCodec).Body(runtime.Object(obj)).Do(ctx).Into(out)
}

func (r Resource[T, L, PT, PL]) Update(ctx context.Context, obj PT, opts metav1.UpdateOptions) (PT, error) {
	out := PT(new(T))
	return out, r.req("PUT").Name(nameOf(obj)).VersionedParams(&opts, paramCodec).Body(runtime.Object(obj)).Do(ctx).Into(out)
}

func (r Resource[T, L, PT, PL]) UpdateStatus(ctx context.Context, obj PT, opts metav1.UpdateOptions) (PT, error) {
	out := PT(new(T))
	return out, r.req("PUT").Name(nameOf(obj)).SubResource("status").VersionedParams(&opts, paramCodec).Body(runtime.Object(obj)).Do(ctx).Into(out)
}

// Patch applies a patch to the object or, with subresources, to e.g. "status".
func (r Resource[T, L, PT, PL]) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (PT, error) {
	out := PT(new(T))
	return out, r.req("PATCH").Name(name).SubResource(subresources...).VersionedParams(&opts, paramCodec).
		SetHeader("Content-Type", string(pt)).Body(data).Do(ctx).Into(out)
}

func (r Resource[T, L, PT, PL]) Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error {
	return r.req("DELETE").Name(name).Body(mustJSON(&opts)).SetHeader("Content-Type", runtime.ContentTypeJSON).Do(ctx).Error()
}

func nameOf(obj runtime.Object) string {
	if m, ok := obj.(metav1.Object); ok {
		return m.GetName()
	}
	return ""
}

// ListWatch adapts the resource for client-go's reflectors and informers.
func (r Resource[T, L, PT, PL]) ListWatch(ctx context.Context, tweak func(*metav1.ListOptions)) *cache.ListWatch {
	return &cache.ListWatch{
		ListFunc: func(o metav1.ListOptions) (runtime.Object, error) {
			if tweak != nil {
				tweak(&o)
			}
			return r.List(ctx, o)
		},
		WatchFunc: func(o metav1.ListOptions) (watch.Interface, error) {
			if tweak != nil {
				tweak(&o)
			}
			return r.Watch(ctx, o)
		},
	}
}

// Informer returns a shared informer over the resource. tweak may narrow
// the list/watch (e.g. a field selector on spec.nodeName).
func (r Resource[T, L, PT, PL]) Informer(ctx context.Context, resync time.Duration, tweak func(*metav1.ListOptions)) cache.SharedIndexInformer {
	return cache.NewSharedIndexInformer(r.ListWatch(ctx, tweak), runtime.Object(PT(new(T))), resync, cache.Indexers{})
}
