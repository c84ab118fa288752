package kube

import (
	"context"
	"encoding/json"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// ResourceFor maps a kind to its resource through the API server's
// discovery document, as kubectl's REST mapper does, without client-go's
// discovery package (which links the full clientset scheme).
func (c *Client) ResourceFor(ctx context.Context, gvk schema.GroupVersionKind) (gvr schema.GroupVersionResource, namespaced bool, err error) {
	path := "/apis/" + gvk.Group + "/" + gvk.Version
	if gvk.Group == "" {
		path = "/api/" + gvk.Version
	}
	raw, err := c.core.Get().AbsPath(path).Do(ctx).Raw()
	if err != nil {
		return gvr, false, fmt.Errorf("discover %s: %w", path, err)
	}
	var list metav1.APIResourceList
	if err := json.Unmarshal(raw, &list); err != nil {
		return gvr, false, fmt.Errorf("decode discovery %s: %w", path, err)
	}
	for _, r := range list.APIResources {
		if r.Kind == gvk.Kind && r.Group == "" && r.Version == "" && !isSubresource(r.Name) {
			return gvk.GroupVersion().WithResource(r.Name), r.Namespaced, nil
		}
	}
	return gvr, false, fmt.Errorf("no resource for kind %s in %s", gvk.Kind, path)
}

func isSubresource(name string) bool {
	for _, c := range name {
		if c == '/' {
			return true
		}
	}
	return false
}
