package agent

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/util/yaml"
)

// TestManifestsTCPAcceleration checks what the DaemonSet manifests give the
// agent for TCP acceleration: the permission to watch Namespaces (their
// annotation opts pods in or out; without it acceleration is never
// decided) and acceleration off by default.
func TestManifestsTCPAcceleration(t *testing.T) {
	var role rbacv1.ClusterRole
	var config corev1.ConfigMap
	manifestObjects(t, "../../manifests/sinabro.yaml", map[string]any{"ClusterRole": &role, "ConfigMap": &config})
	for _, verb := range []string{"list", "watch"} {
		if !slices.ContainsFunc(role.Rules, func(r rbacv1.PolicyRule) bool {
			return slices.Contains(r.APIGroups, "") && slices.Contains(r.Resources, "namespaces") && slices.Contains(r.Verbs, verb)
		}) {
			t.Errorf("ClusterRole %s does not allow %s namespaces", role.Name, verb)
		}
	}
	if got := config.Data["tcp-acceleration"]; got != "false" {
		t.Errorf("ConfigMap tcp-acceleration = %q, want \"false\" (opt-in)", got)
	}
}

// manifestObjects decodes the documents of the YAML file at path whose
// kind is a key of into (the last of each kind) into its value, failing
// the test when one of the kinds is missing.
func manifestObjects(t *testing.T, path string, into map[string]any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	r := yaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		js, err := yaml.ToJSON(doc)
		if err != nil {
			t.Fatal(err)
		}
		var kind struct{ Kind string }
		if err := json.Unmarshal(js, &kind); err != nil {
			t.Fatal(err)
		}
		if obj, ok := into[kind.Kind]; ok {
			if err := json.Unmarshal(js, obj); err != nil {
				t.Fatal(err)
			}
			found[kind.Kind] = true
		}
	}
	for k := range into {
		if !found[k] {
			t.Fatalf("%s has no %s", path, k)
		}
	}
}
