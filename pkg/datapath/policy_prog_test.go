package datapath

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
)

// TestPolicyLookups drives bpf/lib/policy.h through BPF_PROG_RUN: egress
// in host_route (the packet leaves the pod's veth: lo, ifindex 1, under
// BPF_PROG_RUN), ingress in pol_to_pod. It covers an unselected pod, a
// default deny with its drop counted under the blamed policy, an exact
// port, a port range, an any-protocol rule, a rule for every peer, an
// ipBlock CIDR through the ipcache's longest prefix, replies of allowed
// flows, and a policy change judging an established flow again.
func TestPolicyLookups(t *testing.T) {
	cfg := testConfig()
	cfg.Policy = true
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	m := d.Policy()

	pod := netip.MustParseAddr("10.244.1.5")    // local, selected
	other := netip.MustParseAddr("10.244.1.6")  // local, not selected
	friend := netip.MustParseAddr("10.244.2.7") // a pod of another node: identity 20
	outside := netip.MustParseAddr("203.0.113.9")
	service := netip.MustParseAddr("10.96.0.10") // a ClusterIP kube-proxy translates
	const friendID, cidrID = 20, 30
	state := PolicyState{
		Endpoints: map[netip.Addr]PolicyEndpoint{
			pod:   {Ifindex: 1, Isolated: [2]bool{true, true}, DenyPolicy: [2]uint32{7, 8}},
			other: {Ifindex: 2},
		},
		IPCache: map[netip.Prefix]uint32{
			netip.PrefixFrom(friend, 32):            friendID,
			netip.MustParsePrefix("203.0.113.0/24"): cidrID,
			netip.PrefixFrom(service, 32):           ServiceIdentity,
		},
		Rules: map[PolicyRuleKey]uint32{
			// ingress from friend: TCP 80 exactly, UDP 5000-5007 (one prefix)
			{Pod: pod, Identity: friendID, Dir: Ingress, Proto: 6, Port: 80, PortBits: 16}:    101,
			{Pod: pod, Identity: friendID, Dir: Ingress, Proto: 17, Port: 5000, PortBits: 13}: 102,
			// ingress from anyone on TCP 8080
			{Pod: pod, Identity: AnyIdentity, Dir: Ingress, Proto: 6, Port: 8080, PortBits: 16}: 103,
			// egress to the CIDR, any protocol
			{Pod: pod, Identity: cidrID, Dir: Egress}: 104,
		},
	}
	if _, err := m.SyncPolicy(state); err != nil {
		t.Fatal(err)
	}
	tcp := func(src, dst netip.Addr, sport, dport uint16, flags string) []byte {
		return pkt{proto: layers.IPProtocolTCP, src: src, dst: dst, sport: sport, dport: dport, tcpFlags: flags}.bytes(t)
	}
	udp := func(src, dst netip.Addr, sport, dport uint16) []byte {
		return pkt{proto: layers.IPProtocolUDP, src: src, dst: dst, sport: sport, dport: dport}.bytes(t)
	}
	in := func(frame []byte) bool { ret, _ := run(t, objs.PolToPod, frame); return ret != verdictDrop }
	out := func(frame []byte) bool { ret, _ := run(t, objs.HostRoute, frame); return ret != verdictDrop }

	for _, c := range []struct {
		name  string
		pass  bool
		check func([]byte) bool
		frame []byte
	}{
		{"ingress from friend to TCP 80", true, in, tcp(friend, pod, 40000, 80, "S")},
		{"ingress from friend to TCP 81", false, in, tcp(friend, pod, 40001, 81, "S")},
		{"ingress from friend to UDP 5007 (range)", true, in, udp(friend, pod, 40002, 5007)},
		{"ingress from friend to UDP 5008 (past the range)", false, in, udp(friend, pod, 40003, 5008)},
		{"ingress from outside to TCP 8080 (any peer)", true, in, tcp(outside, pod, 40004, 8080, "S")},
		{"ingress from outside to TCP 80", false, in, tcp(outside, pod, 40005, 80, "S")},
		{"ingress to an unselected pod", true, in, tcp(outside, other, 40006, 9999, "S")},
		{"egress to the CIDR, UDP", true, out, udp(pod, outside, 40007, 53)},
		{"egress to friend", false, out, tcp(pod, friend, 40008, 80, "S")},
		{"another pod's address out of pod's veth (spoofed)", false, out, tcp(other, friend, 40009, 80, "S")},
		// Replies of allowed flows pass both ways, whatever the rules.
		{"reply of the allowed ingress flow, out", true, out, tcp(pod, friend, 80, 40000, "SA")},
		{"reply of the allowed egress flow, in", true, in, udp(outside, pod, 53, 40007)},
		// To a Service address: judged after kube-proxy's translation, on
		// the way out (pol_to_pod also checks the source pod's egress).
		{"egress to a ClusterIP, before translation", true, out, udp(pod, service, 40010, 53)},
		{"the same flow translated to friend, on the way out", false, in, udp(pod, friend, 40010, 53)},
		{"translated to the CIDR, on the way out", true, in, udp(pod, outside, 40011, 53)},
		{"the reply translated back from the ClusterIP", true, in, udp(service, pod, 53, 40010)},
	} {
		if got := c.check(c.frame); got != c.pass {
			t.Errorf("%s: passed %v, want %v", c.name, got, c.pass)
		}
	}
	drops, err := m.PolicyDrops()
	if err != nil {
		t.Fatal(err)
	}
	if drops[[2]uint32{7, uint32(Ingress)}] != 3 || drops[[2]uint32{8, uint32(Egress)}] != 2 {
		t.Errorf("drops per policy = %v, want 3 under policy 7 ingress, 2 under 8 egress", drops)
	}

	// Lookup answers what the datapath decided.
	for _, c := range []struct {
		pod, peer netip.Addr
		dir       PolicyDir
		proto     uint8
		port      uint16
		allowed   bool
		rule      uint32
	}{
		{pod, friend, Ingress, 6, 80, true, 101},
		{pod, friend, Ingress, 17, 5003, true, 102},
		{pod, outside, Ingress, 6, 8080, true, 103},
		{pod, outside, Egress, 1, 0, true, 104},
		{pod, friend, Egress, 6, 80, false, 0},
	} {
		l, err := m.Lookup(c.pod, c.peer, c.dir, c.proto, c.port)
		if err != nil {
			t.Fatal(err)
		}
		if l.Allowed != c.allowed || l.Rule != c.rule {
			t.Errorf("Lookup(%v %s %v %d/%d) = %+v, want allowed %v by rule %d", c.pod, c.dir, c.peer, c.proto, c.port, l, c.allowed, c.rule)
		}
	}

	// An established flow is judged again after a change: removing the
	// rule for TCP 80 stops the next packet of the flow allowed above.
	if !in(tcp(friend, pod, 40000, 80, "A")) {
		t.Fatal("established flow dropped before any change")
	}
	delete(state.Rules, PolicyRuleKey{Pod: pod, Identity: friendID, Dir: Ingress, Proto: 6, Port: 80, PortBits: 16})
	changes, err := m.SyncPolicy(state)
	if err != nil {
		t.Fatal(err)
	}
	if changes.Rules != 1 {
		t.Errorf("SyncPolicy wrote %+v, want one rule deleted", changes)
	}
	if in(tcp(friend, pod, 40000, 80, "A")) {
		t.Error("established flow still passes after its rule was removed")
	}
	// Unchanged state writes nothing and keeps the generation.
	again, err := m.SyncPolicy(state)
	if err != nil {
		t.Fatal(err)
	}
	if again.Any() || again.Generation != changes.Generation {
		t.Errorf("second SyncPolicy of the same state: %+v after %+v", again, changes)
	}
	if n := counter(t, objs, "pol_to_pod", "drop_policy"); n != 5 {
		t.Errorf("pol_to_pod drop_policy = %d, want 5", n)
	}
	// An ICMP error about an allowed flow (path MTU discovery) reaches
	// the isolated pod; one about no known flow does not.
	router := netip.MustParseAddr("192.0.2.1")
	allowed := udp(pod, outside, 40007, 53)
	icmpErr := func(quoted []byte) []byte {
		return pkt{proto: layers.IPProtocolICMPv4, src: router, dst: pod, icmpType: 3, inner: quote(quoted, 8)}.bytes(t)
	}
	if !in(icmpErr(allowed)) {
		t.Error("ICMP error about an allowed flow dropped")
	}
	if in(icmpErr(udp(pod, outside, 40099, 53))) {
		t.Error("ICMP error about no known flow passed an ingress-isolated pod")
	}
	// A reply of a flow allowed before a change is judged again: without
	// the egress rule to the CIDR, the reply of pod's UDP flow stops.
	if !in(udp(outside, pod, 53, 40007)) {
		t.Fatal("reply of the allowed egress flow dropped before the change")
	}
	delete(state.Rules, PolicyRuleKey{Pod: pod, Identity: cidrID, Dir: Egress})
	if _, err := m.SyncPolicy(state); err != nil {
		t.Fatal(err)
	}
	if in(udp(outside, pod, 53, 40007)) {
		t.Error("reply of a flow whose egress rule was removed still passes")
	}
	if n := counter(t, objs, "host_route", "drop_policy_spoof"); n != 1 {
		t.Errorf("host_route drop_policy_spoof = %d, want 1", n)
	}

	// GC: nothing is idle yet; an hour later, every flow is.
	kept, expired, err := m.gcPolicy(context.Background(), Monotonic(), Timeouts{})
	if err != nil || kept == 0 || expired != 0 {
		t.Errorf("GC now: kept %d, expired %d, err %v; want all kept", kept, expired, err)
	}
	kept, expired, err = m.gcPolicy(context.Background(), Monotonic()+7*time.Hour, Timeouts{})
	if err != nil || kept != 0 || expired == 0 {
		t.Errorf("GC 7 h later: kept %d, expired %d, err %v; want all expired", kept, expired, err)
	}
}

func TestPortPrefixes(t *testing.T) {
	for _, c := range []struct {
		from, to uint16
		want     [][2]uint16
	}{
		{80, 80, [][2]uint16{{80, 16}}},
		{5000, 5007, [][2]uint16{{5000, 13}}},
		{0, 65535, [][2]uint16{{0, 0}}},
		{1, 4, [][2]uint16{{1, 16}, {2, 15}, {4, 16}}},
		{65534, 65535, [][2]uint16{{65534, 15}}},
	} {
		got := PortPrefixes(c.from, c.to)
		if len(got) != len(c.want) {
			t.Errorf("PortPrefixes(%d, %d) = %v, want %v", c.from, c.to, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("PortPrefixes(%d, %d) = %v, want %v", c.from, c.to, got, c.want)
				break
			}
		}
	}
}
