package datapath

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
)

// TestLBFromOutside drives bpf/lib/lb.h through BPF_PROG_RUN: a NodePort
// with backends on another node (DNAT + SNAT to a NAT port, the reply sent
// back out), an external IP with a backend on this node (DNAT only, the
// reply translated on the pod's veth), flow stickiness, Maglev spread, a
// frontend without backends, and ForgetUDPFlows after a backend leaves.
func TestLBFromOutside(t *testing.T) {
	cfg := testConfig()
	cfg.RouteOut = true
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	pod := Endpoint{
		IP:      netip.MustParseAddr("10.244.1.6"),
		Ifindex: 42,
		PodMAC:  net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 6},
		HostMAC: net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 6},
		Local:   true,
	}
	if err := d.UpsertEndpoint(pod); err != nil {
		t.Fatal(err)
	}
	table := &LBTable{m: objs.SbLbServices, active: objs.SbLbActive, ct: objs.SbLbCt}
	client := netip.MustParseAddr("203.0.113.9")
	nodePort := LBFrontend{NodePort: true, Port: 30080, Proto: 6}
	remote := []netip.AddrPort{netip.MustParseAddrPort("10.244.2.7:8080"), netip.MustParseAddrPort("10.244.2.8:8080")}
	if err := table.Put(nodePort, LBEntry{Backends: remote}); err != nil {
		t.Fatal(err)
	}
	syn := func(sport uint16, flags string) []byte {
		return pkt{proto: layers.IPProtocolTCP, src: client, dst: testNode, sport: sport, dport: 30080, tcpFlags: flags}.bytes(t)
	}

	// Until the agent counts its frontends, the table is not looked at.
	in := syn(40000, "S")
	if _, out := run(t, objs.MasqIngress, in); !bytes.Equal(out[:len(in)], in) {
		t.Fatal("a NodePort packet was translated while sb_lb_active is 0")
	}
	if err := table.SetActive(1); err != nil {
		t.Fatal(err)
	}

	// NodePort, backend on another node: DNAT and SNAT to a NAT port.
	ret, out := run(t, objs.MasqIngress, syn(40000, "S"))
	if ret == verdictDrop {
		t.Fatalf("NodePort SYN dropped")
	}
	fwd := parse(t, out)
	backend := netip.AddrPortFrom(fwd.dst, fwd.dport)
	if !contains(remote, backend) || fwd.src != testNode || fwd.sport < cfg.PortMin || fwd.sport > cfg.PortMax {
		t.Fatalf("NodePort SYN became %s:%d -> %s, want %s:[%d-%d] -> one of %v", fwd.src, fwd.sport, backend, testNode, cfg.PortMin, cfg.PortMax, remote)
	}
	// The flow stays on its backend and NAT port.
	_, out = run(t, objs.MasqIngress, syn(40000, "A"))
	if again := parse(t, out); again.dst != fwd.dst || again.sport != fwd.sport {
		t.Errorf("second packet of the flow went to %s from port %d, want %s from %d", again.dst, again.sport, fwd.dst, fwd.sport)
	}
	// The backend's reply to the NAT port leaves from the NodePort.
	reply := pkt{proto: layers.IPProtocolTCP, src: backend.Addr(), dst: testNode, sport: backend.Port(), dport: fwd.sport, tcpFlags: "SA"}.bytes(t)
	ret, out = run(t, objs.MasqIngress, reply)
	back := parse(t, out)
	if ret != verdictRedirect || back.src != testNode || back.sport != 30080 || back.dst != client || back.dport != 40000 {
		t.Errorf("reply = verdict %d, %s:%d -> %s:%d; want redirect, %s:30080 -> %s:40000", int32(ret), back.src, back.sport, back.dst, back.dport, testNode, client)
	}
	for reason, want := range map[string]uint64{"lb_new": 1, "lb_forward": 2, "lb_reply": 1} {
		if n := counter(t, objs, "masq_ingress", reason); n != want {
			t.Errorf("masq_ingress %s = %d, want %d", reason, n, want)
		}
	}

	// Maglev: many flows spread over both backends.
	seen := map[netip.Addr]int{}
	for sport := uint16(41000); sport < 41064; sport++ {
		_, out := run(t, objs.MasqIngress, syn(sport, "S"))
		seen[parse(t, out).dst]++
	}
	if len(seen) != 2 {
		t.Errorf("64 flows went to %v, want both backends", seen)
	}

	// ClientIP affinity: every flow of one client to one backend.
	sticky := LBFrontend{NodePort: true, Port: 30090, Proto: 6}
	if err := table.Put(sticky, LBEntry{Backends: remote, Affinity: true}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"203.0.113.9", "203.0.113.10", "203.0.113.11", "203.0.113.12"} {
		seen := map[netip.Addr]int{}
		for sport := uint16(42000); sport < 42016; sport++ {
			in := pkt{proto: layers.IPProtocolTCP, src: netip.MustParseAddr(c), dst: testNode, sport: sport, dport: 30090, tcpFlags: "S"}.bytes(t)
			_, out := run(t, objs.MasqIngress, in)
			seen[parse(t, out).dst]++
		}
		if len(seen) != 1 {
			t.Errorf("ClientIP affinity: client %s's 16 flows went to %v, want one backend", c, seen)
		}
	}

	// External IP, backend on this node: only the destination changes, the
	// pod sees the client; its reply is translated back on its veth.
	extIP := LBFrontend{Addr: netip.MustParseAddr("198.51.100.10"), Port: 53, Proto: 17}
	podDNS := netip.AddrPortFrom(pod.IP, 5353)
	if err := table.Put(extIP, LBEntry{Backends: []netip.AddrPort{podDNS}}); err != nil {
		t.Fatal(err)
	}
	query := pkt{proto: layers.IPProtocolUDP, src: client, dst: extIP.Addr, sport: 7777, dport: 53, payload: []byte("query")}.bytes(t)
	ret, out = run(t, objs.MasqIngress, query)
	if q := parse(t, out); ret != verdictRedirect || q.dst != pod.IP || q.dport != 5353 || q.src != client || q.sport != 7777 {
		t.Fatalf("query = verdict %d, %s:%d -> %s:%d; want redirect to the pod, %s:7777 -> %s", int32(ret), q.src, q.sport, q.dst, q.dport, client, podDNS)
	}
	answer := pkt{proto: layers.IPProtocolUDP, src: pod.IP, dst: client, sport: 5353, dport: 7777, payload: []byte("answer")}.bytes(t)
	ret, out = run(t, objs.HostRoute, answer)
	if a := parse(t, out); ret == verdictDrop || a.src != extIP.Addr || a.sport != 53 || a.dst != client || a.dport != 7777 {
		t.Errorf("answer = verdict %d, %s:%d -> %s:%d; want %s -> %s:7777", int32(ret), a.src, a.sport, a.dst, a.dport, netip.AddrPortFrom(extIP.Addr, 53), client)
	}
	if n := counter(t, objs, "host_route", "lb_reply"); n != 1 {
		t.Errorf("host_route lb_reply = %d, want 1", n)
	}

	// The pod leaves the external IP's backends: its UDP flow is forgotten
	// and the next datagram goes to the new backend; TCP flows stay.
	moved := netip.MustParseAddrPort("10.244.2.9:5353")
	current := map[LBFrontend]LBEntry{extIP: {Backends: []netip.AddrPort{moved}}, nodePort: {Backends: remote[:1]}}
	for f, b := range current {
		if err := table.Put(f, b); err != nil {
			t.Fatal(err)
		}
	}
	if _, out = run(t, objs.MasqIngress, query); parse(t, out).dst != pod.IP {
		t.Fatal("before ForgetUDPFlows the flow should still be on its old backend (the test proves nothing otherwise)")
	}
	n, err := table.ForgetUDPFlows(current)
	if err != nil || n != 1 {
		t.Fatalf("ForgetUDPFlows = %d, %v; want 1 flow", n, err)
	}
	if _, out = run(t, objs.MasqIngress, query); parse(t, out).dst != moved.Addr() {
		t.Errorf("after ForgetUDPFlows the query went to %s, want %s", parse(t, out).dst, moved.Addr())
	}
	if _, out = run(t, objs.MasqIngress, syn(40000, "A")); parse(t, out).dst != fwd.dst {
		t.Errorf("a TCP flow moved off its backend %s after ForgetUDPFlows", fwd.dst)
	}

	// A frontend without backends answers at once, as kube-proxy's
	// REJECT does: an ICMP port unreachable back out of the uplink, quoting
	// the packet (its sender's stack then fails the connect or the recv).
	for _, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP} {
		empty := LBFrontend{NodePort: true, Port: 30081, Proto: uint8(proto)}
		if err := table.Put(empty, LBEntry{}); err != nil {
			t.Fatal(err)
		}
		in = pkt{proto: proto, src: client, dst: testNode, sport: 40001, dport: 30081, tcpFlags: "S", payload: []byte("0123456789")}.bytes(t)
		ret, out := run(t, objs.MasqIngress, in)
		out = out[:14+56]
		icmp := parse(t, out)
		quoted := out[14+20+8:]
		if ret != verdictRedirect || out[14+9] != 1 || icmp.src != testNode || icmp.dst != client || icmp.icmpType != 3 || icmp.l4[1] != 3 {
			t.Fatalf("%v to a NodePort without backends: verdict %d, proto %d %s -> %s, ICMP %d/%d; want redirect, ICMP 3/3 %s -> %s",
				proto, int32(ret), out[14+9], icmp.src, icmp.dst, icmp.icmpType, icmp.l4[1], testNode, client)
		}
		if !bytes.Equal(quoted, in[14:14+28]) {
			t.Errorf("%v: ICMP quote = % x, want the packet's IP header and 8 bytes of L4 % x", proto, quoted, in[14:14+28])
		}
		if !bytes.Equal(out[0:6], in[6:12]) || !bytes.Equal(out[6:12], in[0:6]) {
			t.Errorf("%v: the answer's MACs are not the packet's swapped", proto)
		}
	}
	if n := counter(t, objs, "masq_ingress", "drop_lb_no_backend"); n != 2 {
		t.Errorf("drop_lb_no_backend = %d, want 2", n)
	}
	// With IP options the packet is only dropped.
	in = pkt{proto: layers.IPProtocolTCP, src: client, dst: testNode, sport: 40002, dport: 30081, tcpFlags: "S", options: 4}.bytes(t)
	if ret, _ := run(t, objs.MasqIngress, in); ret != verdictDrop {
		t.Errorf("SYN with IP options to a NodePort without backends: verdict %d, want drop", int32(ret))
	}
}

func contains(list []netip.AddrPort, a netip.AddrPort) bool {
	for _, b := range list {
		if a == b {
			return true
		}
	}
	return false
}

// Flows from outside age like masqueraded ones: a TCP flow closed both
// ways is gone TCPClosing after its last packet (its NAT port free again),
// an open one stays until TCPEstablished; UDP after UDP.
func TestLBFlowsExpire(t *testing.T) {
	cfg := testConfig()
	cfg.RouteOut = true
	objs := newTestObjects(t, cfg)
	table := &LBTable{m: objs.SbLbServices, active: objs.SbLbActive, ct: objs.SbLbCt}
	client := netip.MustParseAddr("203.0.113.9")
	backend := netip.MustParseAddrPort("10.244.2.7:8080")
	for _, f := range []LBFrontend{{NodePort: true, Port: 30080, Proto: 6}, {NodePort: true, Port: 30053, Proto: 17}} {
		if err := table.Put(f, LBEntry{Backends: []netip.AddrPort{backend}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := table.SetActive(2); err != nil {
		t.Fatal(err)
	}
	// send runs a packet from the client to the NodePort and the
	// backend's answer back, with the given TCP flags each way.
	send := func(proto layers.IPProtocol, sport, dport uint16, fwdFlags, revFlags string) {
		t.Helper()
		_, out := run(t, objs.MasqIngress, pkt{proto: proto, src: client, dst: testNode, sport: sport, dport: dport, tcpFlags: fwdFlags}.bytes(t))
		natPort := parse(t, out).sport
		if revFlags == "-" {
			return
		}
		if ret, _ := run(t, objs.MasqIngress, pkt{proto: proto, src: backend.Addr(), dst: testNode, sport: backend.Port(), dport: natPort, tcpFlags: revFlags}.bytes(t)); ret != verdictRedirect {
			t.Fatalf("reply not translated (verdict %d)", int32(ret))
		}
	}
	send(layers.IPProtocolTCP, 40000, 30080, "S", "SA") // closed below
	send(layers.IPProtocolTCP, 40000, 30080, "FA", "FA")
	send(layers.IPProtocolTCP, 40001, 30080, "S", "SA") // stays open
	send(layers.IPProtocolTCP, 40001, 30080, "A", "A")
	send(layers.IPProtocolUDP, 40002, 30053, "", "")

	var timeouts Timeouts
	timeouts.setDefaults()
	count := func() int {
		n := 0
		var k datapathLbCtKey
		var v datapathLbCt
		it := objs.SbLbCt.Iterate()
		for it.Next(&k, &v) {
			n++
		}
		return n
	}
	if n := count(); n != 6 {
		t.Fatalf("sb_lb_ct holds %d entries, want 3 flows × 2", n)
	}
	now := Monotonic()
	for _, step := range []struct {
		after   time.Duration
		deleted int
	}{
		{timeouts.TCPClosing / 2, 0},           // nothing idle long enough
		{timeouts.TCPClosing + time.Second, 1}, // the closed TCP flow
		{timeouts.UDP + time.Second, 1},        // the UDP flow
		{timeouts.TCPEstablished - time.Minute, 0},
		{timeouts.TCPEstablished + time.Second, 1}, // the open TCP flow, idle
	} {
		res, err := gcLB(context.Background(), objs.SbLbCt, timeouts, now+step.after)
		if err != nil || res.deleted != step.deleted {
			t.Errorf("GC %s after the last packets: deleted %d flows (%v), want %d", step.after, res.deleted, err, step.deleted)
		}
	}
	if n := count(); n != 0 {
		t.Errorf("%d entries left after every flow expired", n)
	}
}

// A pod of another node that reaches this node's NodePort (its address is
// not masqueraded toward node addresses) gets the reply of a backend on a
// third node over the overlay, not out of the uplink, where its address is
// not on-link.
func TestLBReplyToPodOfAnotherNode(t *testing.T) {
	cfg := testConfig()
	cfg.RouteOut = true
	cfg.VXLANPort, cfg.VXLANVNI = 4789, 7 // encapsulation in eBPF
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	peer := Remote{Prefix: netip.MustParsePrefix("10.244.3.0/24"), Ifindex: 42, VTEP: netip.MustParseAddr("192.168.50.13"),
		PeerMAC: net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 3}, LocalMAC: net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 1}}
	if err := d.SetRemotes([]Remote{peer}); err != nil {
		t.Fatal(err)
	}
	table := &LBTable{m: objs.SbLbServices, active: objs.SbLbActive, ct: objs.SbLbCt}
	backend := netip.MustParseAddrPort("10.244.2.7:8080")
	if err := table.Put(LBFrontend{NodePort: true, Port: 30080, Proto: 6}, LBEntry{Backends: []netip.AddrPort{backend}}); err != nil {
		t.Fatal(err)
	}
	if err := table.SetActive(1); err != nil {
		t.Fatal(err)
	}
	client := netip.MustParseAddr("10.244.3.5")
	_, out := run(t, objs.MasqIngress, pkt{proto: layers.IPProtocolTCP, src: client, dst: testNode, sport: 40000, dport: 30080, tcpFlags: "S"}.bytes(t))
	natPort := parse(t, out).sport
	reply := pkt{proto: layers.IPProtocolTCP, src: backend.Addr(), dst: testNode, sport: backend.Port(), dport: natPort, tcpFlags: "SA"}.bytes(t)
	ret, out := run(t, objs.MasqIngress, reply)
	// VXLAN: outer Ethernet, IPv4, UDP and VXLAN headers (50 bytes) around
	// the translated reply.
	if ret != verdictRedirect || len(out) < len(reply)+50 {
		t.Fatalf("reply to a pod of another node: verdict %d, %d bytes; want redirect, encapsulated (%d bytes)", int32(ret), len(out), len(reply)+50)
	}
	outer := parse(t, out)
	inner := parse(t, out[50:])
	if outer.dst != peer.VTEP || inner.src != testNode || inner.sport != 30080 || inner.dst != client || inner.dport != 40000 {
		t.Errorf("reply = outer to %s, inner %s:%d -> %s:%d; want outer to %s, inner %s:30080 -> %s:40000",
			outer.dst, inner.src, inner.sport, inner.dst, inner.dport, peer.VTEP, testNode, client)
	}
}
