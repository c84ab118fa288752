package lab

import (
	"reflect"
	"slices"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// The manifests a lab of real nodes applies differ from manifests/ only
// where one machine must stand for many: each node's cgroup root, where
// its containerd pins pod namespaces, and (without kube-proxy) the
// apiserver's own address.
func TestAdaptManifestForRealNodes(t *testing.T) {
	for _, kubeProxy := range []string{KubeProxyNone, KubeProxyNFTables} {
		cfg := &Config{Name: "sbx", Runtime: RuntimeContainerd, KubeProxy: kubeProxy, Underlay: DefaultUnderlay}
		objs, err := readManifests("../../manifests")
		if err != nil {
			t.Fatal(err)
		}
		var ds, cm *unstructured.Unstructured
		for _, o := range objs {
			if err := cfg.adaptManifest(o); err != nil {
				t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
			}
			switch {
			case o.GetKind() == "DaemonSet" && o.GetName() == "sinabro":
				ds = o
			case o.GetKind() == "ConfigMap" && o.GetName() == "sinabro-config":
				cm = o
			}
		}
		if ds == nil || cm == nil {
			t.Fatal("manifests/ lack the sinabro DaemonSet or ConfigMap")
		}
		containers, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
		var args []string
		for _, c := range containers {
			if m := c.(map[string]any); m["name"] == "agent" {
				for _, a := range m["args"].([]any) {
					args = append(args, a.(string))
				}
			}
		}
		for _, want := range []string{"--pod-cgroup=/host/sys/fs/cgroup/sbx-$(NODE_NAME)", "--service-cgroup=/host/sys/fs/cgroup/sbx-$(NODE_NAME)"} {
			if !slices.Contains(args, want) {
				t.Errorf("agent args lack %s: %v", want, args)
			}
		}
		volumes, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "volumes")
		netnsPath := ""
		for _, v := range volumes {
			if m := v.(map[string]any); m["name"] == "netns" {
				netnsPath, _, _ = unstructured.NestedString(m, "hostPath", "path")
			}
		}
		if netnsPath != realNodeNetnsDir {
			t.Errorf("netns volume = %q, want %s", netnsPath, realNodeNetnsDir)
		}
		host, _, _ := unstructured.NestedString(cm.Object, "data", "k8s-service-host")
		port, _, _ := unstructured.NestedString(cm.Object, "data", "k8s-service-port")
		want := [2]string{"172.31.250.2", "6443"}
		if kubeProxy != KubeProxyNone {
			want = [2]string{} // kube-proxy serves the kubernetes Service
		}
		if [2]string{host, port} != want {
			t.Errorf("kube-proxy %s: ConfigMap k8s-service-host/port = %s:%s, want %v", kubeProxy, host, port, want)
		}
	}
	// Stand-in nodes run the agent themselves: nothing changes.
	objs, _ := readManifests("../../manifests")
	for _, o := range objs {
		before := o.DeepCopy()
		if err := (&Config{Runtime: RuntimeStandin}).adaptManifest(o); err != nil || !reflect.DeepEqual(before.Object, o.Object) {
			t.Errorf("stand-in lab: %s %s changed (%v)", o.GetKind(), o.GetName(), err)
		}
	}
}
