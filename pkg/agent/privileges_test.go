package agent

import (
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// TestManifestsLeastPrivilege pins down the agent's privileges in
// manifests/sinabro.yaml: the ClusterRole grants exactly the verbs the
// agent's code uses (its VTEP annotations go through nodes/status, never
// "patch nodes"), and the agent container is unprivileged with a fixed
// capability list, the host's /proc/sys/net for its sysctls and no
// Bidirectional mount.
func TestManifestsLeastPrivilege(t *testing.T) {
	var (
		role rbacv1.ClusterRole
		ds   appsv1.DaemonSet
	)
	manifestObjects(t, "../../manifests/sinabro.yaml", map[string]any{"ClusterRole": &role, "DaemonSet": &ds})

	// Every (resource, verb) granted, against what pkg/agent calls.
	want := map[string]bool{
		"nodes/list": true, "nodes/watch": true, "nodes/status/patch": true,
		"pods/list": true, "pods/watch": true, "namespaces/list": true, "namespaces/watch": true,
		"events/create": true,
		// Service load balancing (services_linux.go).
		"services/list": true, "services/watch": true,
		"discovery.k8s.io/endpointslices/list": true, "discovery.k8s.io/endpointslices/watch": true,
		"networking.k8s.io/networkpolicies/list": true, "networking.k8s.io/networkpolicies/watch": true,
	}
	got := map[string]bool{}
	for _, rule := range role.Rules {
		if len(rule.APIGroups) != 1 || len(rule.ResourceNames) > 0 || len(rule.NonResourceURLs) > 0 {
			t.Errorf("unexpected rule %+v", rule)
			continue
		}
		group := rule.APIGroups[0]
		if group != "" {
			group += "/"
		}
		for _, res := range rule.Resources {
			for _, verb := range rule.Verbs {
				got[group+res+"/"+verb] = true
			}
		}
	}
	for k := range got {
		if !want[k] {
			t.Errorf("ClusterRole grants %s, which the agent does not use", k)
		}
	}
	for k := range want {
		if !got[k] {
			t.Errorf("ClusterRole lacks %s, which the agent uses", k)
		}
	}

	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("the agent must run in the node's network namespace (hostNetwork)")
	}
	var agent *corev1.Container
	for i := range spec.Containers {
		if spec.Containers[i].Name == "agent" {
			agent = &spec.Containers[i]
		}
	}
	if agent == nil {
		t.Fatal("no agent container")
	}
	sc := agent.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil {
		t.Fatalf("agent securityContext %+v: want privileged: false and a capability list", sc)
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities drop %v, want [ALL]", sc.Capabilities.Drop)
	}
	caps := slices.Clone(sc.Capabilities.Add)
	slices.Sort(caps)
	if want := []corev1.Capability{"BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"}; !slices.Equal(caps, want) {
		t.Errorf("capabilities add %v, want %v (justify any change in the manifest)", caps, want)
	}
	for _, m := range agent.VolumeMounts {
		if m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional {
			t.Errorf("mount %s is Bidirectional, which needs a privileged container", m.Name)
		}
	}
	if !slices.Contains(agent.Args, "--proc-sys=/host/proc/sys") ||
		!slices.ContainsFunc(agent.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == "/host/proc/sys/net" && !m.ReadOnly }) {
		t.Error("the agent needs the host's /proc/sys/net mounted writable at /host/proc/sys/net and --proc-sys=/host/proc/sys")
	}
}
