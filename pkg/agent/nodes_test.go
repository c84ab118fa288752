package agent

import (
	"net"
	"net/netip"
	"reflect"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

type nodeOpt func(*corev1.Node)

func node(name string, opts ...nodeOpt) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{}}}
	for _, o := range opts {
		o(n)
	}
	return n
}

func cidrs(c ...string) nodeOpt { return func(n *corev1.Node) { n.Spec.PodCIDRs = c } }
func internalIP(ip string) nodeOpt {
	return func(n *corev1.Node) {
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
	}
}
func annotate(k, v string) nodeOpt { return func(n *corev1.Node) { n.Annotations[k] = v } }
func created(minute int) nodeOpt {
	return func(n *corev1.Node) {
		n.CreationTimestamp = metav1.NewTime(time.Date(2026, 1, 1, 0, minute, 0, 0, time.UTC))
	}
}
func mac(m string) nodeOpt { return annotate(AnnotationVTEPMAC, m) }

func TestSelectPeers(t *testing.T) {
	self := nodeInfo{Name: "a", PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}}
	selfMAC := "02:00:00:00:00:01"
	self.VTEPMAC, _ = net.ParseMAC(selfMAC)
	selfNode := node("a", cidrs("10.244.1.0/24"), internalIP("192.168.1.1"), mac(selfMAC))
	good := func(name, cidr, ip, m string) *corev1.Node {
		return node(name, cidrs(cidr), internalIP(ip), mac(m))
	}

	tests := []struct {
		name        string
		nodes       []*corev1.Node
		wantPeers   []string
		wantSkipped map[string]string // name → reason
		wantPending []string
	}{
		{
			name:      "healthy cluster",
			nodes:     []*corev1.Node{selfNode, good("b", "10.244.2.0/24", "192.168.1.2", "02:00:00:00:00:02"), good("c", "10.244.3.0/24", "192.168.1.3", "02:00:00:00:00:03")},
			wantPeers: []string{"b", "c"},
		},
		{
			name: "bad nodes skipped, the rest kept",
			nodes: []*corev1.Node{selfNode,
				good("b", "10.244.2.0/24", "192.168.1.2", "02:00:00:00:00:02"),
				good("bad-cidr", "10.244.300.0/24", "192.168.1.4", "02:00:00:00:00:04"),
				good("host-bits", "10.244.5.1/24", "192.168.1.5", "02:00:00:00:00:05"),
				node("no-ip", cidrs("10.244.6.0/24"), mac("02:00:00:00:00:06")),
				node("v6-only", cidrs("10.244.7.0/24"), internalIP("fd00::7"), mac("02:00:00:00:00:07")),
				good("bad-mac", "10.244.8.0/24", "192.168.1.8", "zz:00:00:00:00:08"),
				good("multicast-mac", "10.244.9.0/24", "192.168.1.9", "01:00:00:00:00:09"),
				node("bad-vtep-ip", cidrs("10.244.10.0/24"), internalIP("192.168.1.10"), mac("02:00:00:00:00:0a"), annotate(AnnotationVTEPIP, "nope")),
			},
			wantPeers: []string{"b"},
			wantSkipped: map[string]string{
				"bad-cidr": ReasonMalformedPodCIDR, "host-bits": ReasonMalformedPodCIDR,
				"no-ip": ReasonMissingInternalIP, "v6-only": ReasonMissingInternalIP,
				"bad-mac": ReasonMalformedVTEP, "multicast-mac": ReasonMalformedVTEP, "bad-vtep-ip": ReasonMalformedVTEP,
			},
		},
		{
			name: "duplicate MACs: self, then the first holder keeps it",
			nodes: []*corev1.Node{selfNode,
				good("b", "10.244.2.0/24", "192.168.1.2", "02:00:00:00:00:99"),
				good("c", "10.244.3.0/24", "192.168.1.3", "02:00:00:00:00:99"),
				good("d", "10.244.4.0/24", "192.168.1.4", selfMAC),
				good("e", "10.244.5.0/24", "192.168.1.5", "02:00:00:00:00:05"),
			},
			wantPeers:   []string{"b", "e"},
			wantSkipped: map[string]string{"c": ReasonDuplicateVTEPMAC, "d": ReasonDuplicateVTEPMAC},
		},
		{
			name: "overlapping pod CIDRs",
			nodes: []*corev1.Node{selfNode,
				good("b", "10.244.0.0/16", "192.168.1.2", "02:00:00:00:00:02"),
				good("c", "10.244.200.0/24", "192.168.1.3", "02:00:00:00:00:03"),
				good("d", "10.244.200.0/25", "192.168.1.4", "02:00:00:00:00:04"),
				good("e", "10.245.0.0/24", "192.168.1.5", "02:00:00:00:00:05"),
			},
			wantPeers:   []string{"c", "e"},
			wantSkipped: map[string]string{"b": ReasonOverlappingPodCIDR, "d": ReasonOverlappingPodCIDR},
		},
		{
			name: "the older node wins a conflict",
			nodes: []*corev1.Node{selfNode,
				node("new", cidrs("10.244.2.0/24"), internalIP("192.168.1.2"), mac("02:00:00:00:00:02"), created(2)),
				node("old", cidrs("10.244.2.0/24"), internalIP("192.168.1.3"), mac("02:00:00:00:00:02"), created(1)),
				node("newer", cidrs("10.244.2.0/25"), internalIP("192.168.1.4"), mac("02:00:00:00:00:04"), created(3)),
			},
			wantPeers:   []string{"old"},
			wantSkipped: map[string]string{"new": ReasonDuplicateVTEPMAC, "newer": ReasonOverlappingPodCIDR},
		},
		{
			name: "agents not started yet are pending",
			nodes: []*corev1.Node{selfNode,
				node("b", cidrs("10.244.2.0/24"), internalIP("192.168.1.2")),
				node("c", internalIP("192.168.1.3"), mac("02:00:00:00:00:03")),
			},
			wantPending: []string{"b", "c"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sel := selectPeers(self, tt.nodes)
			var gotPeers []string
			for _, p := range sel.Peers {
				gotPeers = append(gotPeers, p.Name)
			}
			if !reflect.DeepEqual(gotPeers, tt.wantPeers) {
				t.Errorf("peers = %v, want %v", gotPeers, tt.wantPeers)
			}
			gotSkipped := map[string]string{}
			for name, s := range sel.Skipped {
				gotSkipped[name] = s.Reason
				if s.Message == "" {
					t.Errorf("skip of %s has no message", name)
				}
			}
			if tt.wantSkipped == nil {
				tt.wantSkipped = map[string]string{}
			}
			if !reflect.DeepEqual(gotSkipped, tt.wantSkipped) {
				t.Errorf("skipped = %v, want %v", gotSkipped, tt.wantSkipped)
			}
			if !reflect.DeepEqual(sel.Pending, tt.wantPending) {
				t.Errorf("pending = %v, want %v", sel.Pending, tt.wantPending)
			}
		})
	}
}

func TestSelectPeersUsesVTEPIP(t *testing.T) {
	self := nodeInfo{Name: "a"}
	sel := selectPeers(self, []*corev1.Node{
		node("b", cidrs("10.244.2.0/24"), internalIP("192.168.1.2"), mac("02:00:00:00:00:02")),
		node("c", cidrs("10.244.3.0/24"), internalIP("192.168.1.3"), mac("02:00:00:00:00:03"), annotate(AnnotationVTEPIP, "192.168.2.3")),
	})
	got := map[string]netip.Addr{}
	for _, p := range sel.Peers {
		got[p.Name] = p.Underlay
	}
	want := map[string]netip.Addr{"b": netip.MustParseAddr("192.168.1.2"), "c": netip.MustParseAddr("192.168.2.3")}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("underlay = %v, want %v", got, want)
	}
	if len(sel.ExcludeCIDRs) != 2 || len(sel.NodeIPs) != 2 {
		t.Errorf("exclude = %v, node IPs = %v; want 2 of each", sel.ExcludeCIDRs, sel.NodeIPs)
	}
}

func TestRelevantChange(t *testing.T) {
	base := node("a", cidrs("10.244.1.0/24"), internalIP("192.168.1.1"), mac("02:00:00:00:00:01"))
	tests := []struct {
		name   string
		change func(n *corev1.Node)
		want   bool
	}{
		{"heartbeat", func(n *corev1.Node) {
			n.Status.Conditions = append(n.Status.Conditions, corev1.NodeCondition{Type: corev1.NodeReady})
			n.ResourceVersion = "2"
		}, false},
		{"unrelated annotation", func(n *corev1.Node) { n.Annotations["x"] = "y" }, false},
		{"pod CIDR", func(n *corev1.Node) { n.Spec.PodCIDRs = []string{"10.244.2.0/24"} }, true},
		{"address", func(n *corev1.Node) { n.Status.Addresses[0].Address = "192.168.1.9" }, true},
		{"VTEP MAC", func(n *corev1.Node) { n.Annotations[AnnotationVTEPMAC] = "02:00:00:00:00:09" }, true},
		{"VTEP IP", func(n *corev1.Node) { n.Annotations[AnnotationVTEPIP] = "192.168.1.9" }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cur := base.DeepCopy()
			tt.change(cur)
			if got := relevantChange(base, cur); got != tt.want {
				t.Errorf("relevantChange() = %v, want %v", got, tt.want)
			}
		})
	}
}
