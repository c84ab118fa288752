package agent

import (
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func accelPod(ns, name, ip, annotation string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
	}
	if annotation != "" {
		p.Annotations = map[string]string{AnnotationTCPAcceleration: annotation}
	}
	return p
}

func accelNamespace(name, annotation string) *corev1.Namespace {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if annotation != "" {
		ns.Annotations = map[string]string{AnnotationTCPAcceleration: annotation}
	}
	return ns
}

func TestPlanAcceleration(t *testing.T) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")}
	hostNet := accelPod("default", "host", "192.168.1.10", "true")
	hostNet.Spec.HostNetwork = true
	done := accelPod("default", "done", "10.244.1.9", "true")
	done.Status.Phase = corev1.PodSucceeded
	dual := accelPod("default", "dual", "10.244.1.7", "true")
	dual.Status.PodIPs = append(dual.Status.PodIPs, corev1.PodIP{IP: "fd00:10:244:1::7"})
	namespaces := map[string]*corev1.Namespace{
		"in":    accelNamespace("in", "true"),
		"out":   accelNamespace("out", "false"),
		"plain": accelNamespace("plain", ""),
		"typo":  accelNamespace("typo", "yes"),
	}

	for _, tt := range []struct {
		name         string
		nodeDefault  bool
		pods         []*corev1.Pod
		wantPrefixes []string
		wantExcluded []string
		wantWarnings int
	}{
		{
			name: "off by default: no pod, no namespace opts in",
			pods: []*corev1.Pod{
				accelPod("default", "a", "10.244.1.2", ""),
				accelPod("plain", "b", "10.244.1.3", ""),
				accelPod("out", "c", "10.244.1.4", ""),
			},
		},
		{
			name: "pods that opt in, as /32s",
			pods: []*corev1.Pod{
				accelPod("default", "a", "10.244.1.2", "true"),
				accelPod("default", "b", "10.244.1.3", ""),
				accelPod("plain", "c", "10.244.1.4", "true"),
			},
			wantPrefixes: []string{"10.244.1.2/32", "10.244.1.4/32"},
		},
		{
			name: "a namespace opts its pods in; a pod's own false wins",
			pods: []*corev1.Pod{
				accelPod("in", "a", "10.244.1.2", ""),
				accelPod("in", "b", "10.244.1.3", "false"),
				accelPod("in", "c", "10.244.1.4", "true"),
				accelPod("default", "d", "10.244.1.5", ""),
			},
			wantPrefixes: []string{"10.244.1.2/32", "10.244.1.4/32"},
		},
		{
			name: "a pod's true wins over its namespace's false",
			pods: []*corev1.Pod{
				accelPod("out", "a", "10.244.1.2", "true"),
				accelPod("out", "b", "10.244.1.3", ""),
			},
			wantPrefixes: []string{"10.244.1.2/32"},
		},
		{
			name: "host-network, finished and foreign-address pods are never added; IPv6 is left out",
			pods: []*corev1.Pod{
				hostNet, done, dual,
				accelPod("default", "elsewhere", "10.244.2.5", "true"),
				accelPod("default", "pending", "", "true"),
			},
			wantPrefixes: []string{"10.244.1.7/32"},
		},
		{
			name: "pods sharing an address: off wins",
			pods: []*corev1.Pod{
				accelPod("default", "old", "10.244.1.2", "false"),
				accelPod("in", "new", "10.244.1.2", ""),
				accelPod("in", "b", "10.244.1.3", ""),
			},
			wantPrefixes: []string{"10.244.1.3/32"},
		},
		{
			name: "unparsable values count as unset and are reported once",
			pods: []*corev1.Pod{
				accelPod("default", "a", "10.244.1.2", "on"),
				accelPod("typo", "b", "10.244.1.3", ""),
				accelPod("typo", "c", "10.244.1.4", ""),
				accelPod("default", "d", "10.244.1.5", "True"),
			},
			wantPrefixes: []string{"10.244.1.5/32"},
			wantWarnings: 2,
		},
		{
			name:         "node default on, no pods: the node's IPv4 pod CIDR",
			nodeDefault:  true,
			wantPrefixes: []string{"10.244.1.0/24"},
		},
		{
			name:        "node default on: pods and namespaces that opt out are carved out",
			nodeDefault: true,
			pods: []*corev1.Pod{
				accelPod("default", "a", "10.244.1.2", ""),
				accelPod("default", "b", "10.244.1.3", "false"),
				accelPod("out", "c", "10.244.1.4", ""),
				accelPod("out", "d", "10.244.1.5", "true"),
				accelPod("in", "e", "10.244.1.6", "false"),
				hostNet,
			},
			wantPrefixes: []string{"10.244.1.0/24"},
			wantExcluded: []string{"10.244.1.3", "10.244.1.4", "10.244.1.6"},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := planAcceleration(tt.nodeDefault, cidrs, tt.pods, namespaces)
			var prefixes, excluded []string
			for _, p := range got.Prefixes {
				prefixes = append(prefixes, p.String())
			}
			for _, a := range got.Excluded {
				excluded = append(excluded, a.String())
			}
			if !slices.Equal(prefixes, tt.wantPrefixes) || !slices.Equal(excluded, tt.wantExcluded) {
				t.Errorf("planAcceleration: prefixes %v excluded %v; want %v, %v", prefixes, excluded, tt.wantPrefixes, tt.wantExcluded)
			}
			if want := len(tt.wantPrefixes) > 0; got.active() != want {
				t.Errorf("active() = %v, want %v (programs attached only while something is accelerated)", got.active(), want)
			}
			if len(got.Warnings) != tt.wantWarnings {
				t.Errorf("warnings %q, want %d", got.Warnings, tt.wantWarnings)
			}
		})
	}
}

func TestAccelerationInputsChanged(t *testing.T) {
	base := accelPod("default", "a", "10.244.1.2", "")
	for _, tt := range []struct {
		name   string
		change func(*corev1.Pod)
		want   bool
	}{
		{"nothing relevant", func(p *corev1.Pod) { p.Labels = map[string]string{"x": "y"} }, false},
		{"annotation set", func(p *corev1.Pod) { p.Annotations = map[string]string{AnnotationTCPAcceleration: "true"} }, true},
		{"address", func(p *corev1.Pod) {
			p.Status.PodIP, p.Status.PodIPs = "10.244.1.3", []corev1.PodIP{{IP: "10.244.1.3"}}
		}, true},
		{"finished", func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed }, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := base.DeepCopy()
			tt.change(n)
			if got := accelerationInputsChanged(base, n); got != tt.want {
				t.Errorf("accelerationInputsChanged = %v, want %v", got, tt.want)
			}
		})
	}
}
