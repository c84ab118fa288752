package agent

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/overlay"
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
			sel := selectPeers(self, tt.nodes, Bounds{})
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
		node("c", cidrs("10.244.3.0/24"), internalIP("192.168.1.3"), internalIP("192.168.2.3"), mac("02:00:00:00:00:03"), annotate(AnnotationVTEPIP, "192.168.2.3")),
	}, Bounds{})
	got := map[string]netip.Addr{}
	for _, p := range sel.Peers {
		got[p.Name] = p.Underlay
	}
	want := map[string]netip.Addr{"b": netip.MustParseAddr("192.168.1.2"), "c": netip.MustParseAddr("192.168.2.3")}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("underlay = %v, want %v", got, want)
	}
	if len(sel.ExcludeCIDRs) != 2 || len(sel.NodeIPs) != 3 {
		t.Errorf("exclude = %v, node IPs = %v; want 2 and 3", sel.ExcludeCIDRs, sel.NodeIPs)
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

func names(ps []overlay.Peer) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Name)
	}
	return out
}

func reasons(sel Selection) map[string]string {
	out := map[string]string{}
	for name, s := range sel.Skipped {
		out[name] = s.Reason
	}
	return out
}

// TestSelectPeersBounds: what a Node object may not make this node install,
// whatever the others claim.
func TestSelectPeersBounds(t *testing.T) {
	self := nodeInfo{Name: "a", PodCIDRs: prefixes("10.244.1.0/24"), Addresses: []netip.Addr{netip.MustParseAddr("192.168.1.1")}}
	self.VTEPMAC, _ = net.ParseMAC("02:00:00:00:00:01")
	host := prefixes("192.168.1.1/24", "127.0.0.1/8", "10.244.1.0/32") // the last: our VTEP address, ignored
	cluster := prefixes("10.244.0.0/16", "fd00:10:244::/56")
	n := 1
	peer := func(name, cidr, ip string, opts ...nodeOpt) *corev1.Node {
		n++
		return node(name, append([]nodeOpt{cidrs(cidr), internalIP(ip), mac(fmt.Sprintf("02:00:00:00:01:%02x", n)), created(n)}, opts...)...)
	}
	tests := []struct {
		name        string
		bounds      Bounds
		nodes       []*corev1.Node
		wantPeers   []string
		wantSkipped map[string]string
	}{
		{
			name:   "pod CIDRs outside the cluster CIDR, default routes, special-purpose ranges, our own",
			bounds: Bounds{ClusterCIDRs: cluster, HostPrefixes: host},
			nodes: []*corev1.Node{
				peer("good", "10.244.2.0/24", "192.168.1.2"),
				peer("good-v6", "fd00:10:244:3::/64", "192.168.1.3"),
				peer("outside", "10.245.0.0/24", "192.168.1.4"),
				peer("outside-v6", "fd00:10:245::/64", "192.168.1.5"),
				peer("supernet", "10.0.0.0/8", "192.168.1.6"),
				peer("default", "0.0.0.0/0", "192.168.1.7"),
				peer("default-v6", "::/0", "192.168.1.8"),
				peer("link-local", "169.254.0.0/24", "192.168.1.9"),
				peer("loopback", "127.0.0.0/24", "192.168.1.10"),
				peer("multicast", "224.0.0.0/24", "192.168.1.11"),
				peer("ours", "10.244.1.0/25", "192.168.1.12"),
				peer("ours-supernet", "10.244.0.0/23", "192.168.1.13"),
			},
			wantPeers: []string{"good", "good-v6"},
			wantSkipped: map[string]string{
				"outside": ReasonOutsideClusterCIDR, "outside-v6": ReasonOutsideClusterCIDR, "supernet": ReasonOutsideClusterCIDR,
				"default": ReasonReservedPodCIDR, "default-v6": ReasonReservedPodCIDR, "link-local": ReasonReservedPodCIDR,
				"loopback": ReasonReservedPodCIDR, "multicast": ReasonReservedPodCIDR,
				"ours": ReasonOverlappingPodCIDR, "ours-supernet": ReasonOverlappingPodCIDR,
			},
		},
		{
			name:   "without a cluster CIDR: any pod CIDR clear of the underlay, node addresses and the others",
			bounds: Bounds{HostPrefixes: host},
			nodes: []*corev1.Node{
				peer("elsewhere", "10.99.0.0/24", "192.168.1.2"),
				peer("underlay-subnet", "192.168.1.128/25", "192.168.1.3"),
				peer("holds-our-address", "192.168.0.0/16", "192.168.1.4"),
				peer("holds-its-own-address", "172.16.0.0/24", "172.16.0.5"),
				peer("older", "10.98.0.0/24", "172.17.0.9"),
				peer("holds-older-node-address", "172.17.0.0/24", "192.168.1.6"),
				peer("default", "0.0.0.0/0", "192.168.1.7"),
			},
			wantPeers: []string{"elsewhere", "older"},
			wantSkipped: map[string]string{
				"underlay-subnet": ReasonOverlapsNodeAddress, "holds-our-address": ReasonOverlapsNodeAddress,
				"holds-its-own-address": ReasonOverlapsNodeAddress, "holds-older-node-address": ReasonOverlapsNodeAddress,
				"default": ReasonReservedPodCIDR,
			},
		},
		{
			name:   "a subnet that holds the cluster CIDR counts as its address only",
			bounds: Bounds{ClusterCIDRs: prefixes("10.244.0.0/16"), HostPrefixes: prefixes("10.0.0.7/8")},
			nodes: []*corev1.Node{
				peer("b", "10.244.2.0/24", "10.0.0.8"),
				peer("holds-our-address", "10.0.0.0/24", "10.0.0.9"),
			},
			wantPeers:   []string{"b"},
			wantSkipped: map[string]string{"holds-our-address": ReasonOutsideClusterCIDR},
		},
		{
			name:   "a newcomer naming an address inside a working node's pod CIDR is skipped, not the node",
			bounds: Bounds{ClusterCIDRs: cluster, HostPrefixes: host},
			nodes: []*corev1.Node{
				peer("working", "10.244.2.0/24", "192.168.1.2"),
				peer("newcomer", "10.244.3.0/24", "10.244.2.7"),
				peer("in-our-cidr", "10.244.4.0/24", "10.244.1.9"),
			},
			wantPeers:   []string{"working"},
			wantSkipped: map[string]string{"newcomer": ReasonOverlapsNodeAddress, "in-our-cidr": ReasonOverlapsNodeAddress},
		},
		{
			name:   "VTEP addresses: unicast and the node's own",
			bounds: Bounds{ClusterCIDRs: cluster, HostPrefixes: host},
			nodes: []*corev1.Node{
				peer("second-address", "10.244.2.0/24", "192.168.1.2", internalIP("192.168.2.2"), annotate(AnnotationVTEPIP, "192.168.2.2")),
				peer("foreign", "10.244.3.0/24", "192.168.1.3", annotate(AnnotationVTEPIP, "192.168.1.1")),
				peer("loopback", "10.244.4.0/24", "127.0.0.1"),
				peer("broadcast", "10.244.5.0/24", "255.255.255.255"),
				peer("multicast", "10.244.6.0/24", "192.168.1.6", internalIP("239.1.1.1"), annotate(AnnotationVTEPIP, "239.1.1.1")),
				peer("unspecified", "10.244.7.0/24", "0.0.0.0"),
				peer("zero-mac", "10.244.8.0/24", "192.168.1.8", mac("00:00:00:00:00:00")),
			},
			wantPeers: []string{"second-address"},
			wantSkipped: map[string]string{
				"foreign": ReasonMalformedVTEP, "loopback": ReasonMalformedVTEP, "broadcast": ReasonMalformedVTEP,
				"multicast": ReasonMalformedVTEP, "unspecified": ReasonMalformedVTEP, "zero-mac": ReasonMalformedVTEP,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sel := selectPeers(self, tt.nodes, tt.bounds)
			if got := names(sel.Peers); !reflect.DeepEqual(got, tt.wantPeers) {
				t.Errorf("peers = %v, want %v", got, tt.wantPeers)
			}
			if got := reasons(sel); !reflect.DeepEqual(got, tt.wantSkipped) {
				t.Errorf("skipped = %v, want %v", got, tt.wantSkipped)
				for name, s := range sel.Skipped {
					t.Logf("%s: %s", name, s.Message)
				}
			}
		})
	}
}

// TestMasqueradeExclusionsFromAcceptedNodes: only this node, its peers and
// pending nodes that pass the same checks feed masquerade's exclusions, so
// one bad Node cannot turn masquerading off for the cluster.
func TestMasqueradeExclusionsFromAcceptedNodes(t *testing.T) {
	self := nodeInfo{Name: "a", PodCIDRs: prefixes("10.244.1.0/24"), Addresses: []netip.Addr{netip.MustParseAddr("192.168.1.1")}}
	nodes := []*corev1.Node{
		node("b", cidrs("10.244.2.0/24"), internalIP("192.168.1.2"), mac("02:00:00:00:00:02"), created(1)),
		node("pending", cidrs("10.244.3.0/24"), internalIP("192.168.1.3"), created(2)),
		node("everything", cidrs("0.0.0.0/0"), internalIP("192.168.1.4"), mac("02:00:00:00:00:04"), created(3)),
		node("half", cidrs("0.0.0.0/1"), internalIP("192.168.1.5"), mac("02:00:00:00:00:05"), created(4)),
		node("outside", cidrs("8.8.8.0/24"), internalIP("8.8.4.4"), mac("02:00:00:00:00:06"), created(5)),
		node("dup-mac", cidrs("10.244.7.0/24"), internalIP("192.168.1.7"), mac("02:00:00:00:00:02"), created(6)),
	}
	sel := selectPeers(self, nodes, Bounds{ClusterCIDRs: prefixes("10.244.0.0/16")})
	if want := prefixes("10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"); !slices.Equal(sel.ExcludeCIDRs, want) {
		t.Errorf("exclude CIDRs = %v, want %v", sel.ExcludeCIDRs, want)
	}
	var want []netip.Addr
	for _, s := range []string{"192.168.1.1", "192.168.1.2", "192.168.1.3"} {
		want = append(want, netip.MustParseAddr(s))
	}
	if !slices.Equal(sel.NodeIPs, want) {
		t.Errorf("node IPs = %v, want %v", sel.NodeIPs, want)
	}
	// What the eBPF datapath gets: pod prefixes are masqueraded sources and
	// never-masqueraded destinations; 0.0.0.0/0 there would end masquerading.
	a := &Agent{cfg: Config{Masquerade: true, MasqueradeBackend: BackendEBPF, ClusterCIDRs: prefixes("10.244.0.0/16")}}
	cluster, nonMasq := a.datapathCIDRs(sel)
	if want := prefixes("10.244.0.0/16"); !slices.Equal(cluster, want) {
		t.Errorf("datapath pod prefixes = %v, want %v", cluster, want)
	}
	if want := prefixes("192.168.1.1/32", "192.168.1.2/32", "192.168.1.3/32"); !slices.Equal(nonMasq, want) {
		t.Errorf("datapath non-masquerade prefixes = %v, want %v", nonMasq, want)
	}
}

// scaleNodes builds n healthy Node objects with /30 pod CIDRs from
// 10.244.128.0 on (10.0.0.0/8 holds 20,000).
func scaleNodes(n int) []*corev1.Node {
	nodes := make([]*corev1.Node, 0, n+1)
	nodes = append(nodes, node("a", cidrs("10.244.1.0/24"), internalIP("192.168.1.1"), mac("02:00:00:00:00:01")))
	base := netip.MustParseAddr("10.244.128.0").As4()
	for i := range n {
		c := binary.BigEndian.Uint32(base[:]) + uint32(4*i)
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], c)
		nodes = append(nodes, node(fmt.Sprintf("n%05d", i), cidrs(netip.PrefixFrom(netip.AddrFrom4(b), 30).String()),
			internalIP(fmt.Sprintf("172.%d.%d.%d", 16+i/62500, i/250%250, i%250+1)), mac(fmt.Sprintf("02:5b:00:%02x:%02x:%02x", i>>16, i>>8&0xff, i&0xff)), created(i%60)))
	}
	return nodes
}

// TestSelectPeersScales: a pass over 20,000 nodes costs a small multiple of
// parsing them, not their square. Measured against that linear baseline in
// the same run (best of three each), so a busy machine slows both: the
// pairwise overlap check this replaced took 300-600× the baseline, this
// takes 10-30×.
func TestSelectPeersScales(t *testing.T) {
	self := nodeInfo{Name: "a", PodCIDRs: prefixes("10.244.1.0/24"), Addresses: []netip.Addr{netip.MustParseAddr("192.168.1.1")}}
	b := Bounds{ClusterCIDRs: prefixes("10.0.0.0/8"), HostPrefixes: prefixes("192.168.1.1/24")}
	const n = 20000
	nodes := scaleNodes(n)
	var parse, sel time.Duration
	for i := range 3 {
		runtime.GC()
		start := time.Now()
		for _, node := range nodes {
			parseNode(node)
		}
		if d := time.Since(start); i == 0 || d < parse {
			parse = d
		}
		runtime.GC()
		start = time.Now()
		got := selectPeers(self, nodes, b)
		if d := time.Since(start); i == 0 || d < sel {
			sel = d
		}
		if len(got.Peers) != n || len(got.Skipped) != 0 {
			t.Fatalf("%d nodes: %d peers, skipped %v", n, len(got.Peers), reasons(got))
		}
	}
	t.Logf("%d nodes: parsing %s, selectPeers %s (%.1f×)", n, parse, sel, float64(sel)/float64(parse))
	if sel > 100*parse {
		t.Errorf("selectPeers over %d nodes took %s, more than 100× parsing them (%s)", n, sel, parse)
	}
}

func BenchmarkSelectPeers5000(b *testing.B) {
	self := nodeInfo{Name: "a", PodCIDRs: prefixes("10.244.1.0/24"), Addresses: []netip.Addr{netip.MustParseAddr("192.168.1.1")}}
	nodes := scaleNodes(5000)
	bounds := Bounds{ClusterCIDRs: prefixes("10.244.0.0/16"), HostPrefixes: prefixes("192.168.1.1/24")}
	for b.Loop() {
		selectPeers(self, nodes, bounds)
	}
}
