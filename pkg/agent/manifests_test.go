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
	b, err := os.ReadFile("../../manifests/sinabro.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var role *rbacv1.ClusterRole
	var config *corev1.ConfigMap
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
		switch kind.Kind {
		case "ClusterRole":
			role = &rbacv1.ClusterRole{}
			err = json.Unmarshal(js, role)
		case "ConfigMap":
			config = &corev1.ConfigMap{}
			err = json.Unmarshal(js, config)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if role == nil || config == nil {
		t.Fatalf("manifests lack the ClusterRole or the ConfigMap")
	}
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
