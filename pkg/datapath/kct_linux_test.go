package datapath

import (
	"bufio"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestKernelNATTakesStack runs what kube-proxy does to a pod's Service
// traffic — DNAT in the node's prerouting, to a pod on the node (TCP and
// UDP) and to a backend outside (masqueraded on the uplink) — under the
// datapath with host routing and route_out on. With Config.KernelCT the
// translated flows take the stack both ways and work, while traffic that
// needs no translation keeps its fast path; without it the same
// connections fail (the forward packets skip the DNAT or the replies skip
// its reversal), so the test can fail.
func TestKernelNATTakesStack(t *testing.T) {
	if err := KernelCTAvailable(); err != nil {
		t.Skipf("kernel without conntrack kfuncs: %v", err)
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nft for the Service DNAT rules")
	}
	topo := newTopology(t)
	pod2Addr := netip.MustParseAddr("10.244.1.6")
	pod2, ep2 := topo.addPod(t, "pod2", pod2Addr)
	node := topo.base + "-node"
	// A real node has a default route: Service addresses follow it.
	ipCmd(t, "-n", node, "route", "add", "default", "via", topoExt.String())
	nft := exec.Command("ip", "netns", "exec", node, "nft", "-f", "-")
	nft.Stdin = strings.NewReader(`table ip sbsvc {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.96.0.10 tcp dport 80 dnat to 10.244.1.6:8080
		ip daddr 10.96.0.10 udp dport 80 dnat to 10.244.1.6:8081
		ip daddr 10.96.0.11 tcp dport 80 dnat to 192.168.50.1:8080
	}
}`)
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}

	ln := in(t, pod2, func() (net.Listener, error) { return net.Listen("tcp4", pod2Addr.String()+":8080") })
	defer ln.Close()
	echoServer(t, ln)
	udp := in(t, pod2, func() (net.PacketConn, error) { return net.ListenPacket("udp4", pod2Addr.String()+":8081") })
	defer udp.Close()
	udpEchoServer(udp, true)
	extLn := in(t, topo.ext, func() (net.Listener, error) { return net.Listen("tcp4", topoExt.String()+":8080") })
	defer extLn.Close()
	echoServer(t, extLn)

	// tcp connects to addr from the first pod and returns the address the
	// server saw.
	tcp := func(addr string) (netip.Addr, error) {
		c, err := dialIn(topo.pod, func() (net.Conn, error) { return net.DialTimeout("tcp4", addr, time.Second) })
		if err != nil {
			return netip.Addr{}, err
		}
		defer c.Close()
		r := bufio.NewReader(c)
		var got string
		for _, msg := range []string{"one", "two"} { // past the handshake
			if got, err = roundTrip(c, r, msg); err != nil {
				return netip.Addr{}, err
			}
		}
		from, _, _ := strings.Cut(got, " ")
		return netip.MustParseAddrPort(from).Addr(), nil
	}
	udpExchange := func(addr string) (string, error) {
		c, err := dialIn(topo.pod, func() (net.Conn, error) { return net.Dial("udp4", addr) })
		if err != nil {
			return "", err
		}
		defer c.Close()
		var got string
		for _, msg := range []string{"one", "two"} {
			c.SetDeadline(time.Now().Add(time.Second))
			if _, err := c.Write([]byte(msg)); err != nil {
				return "", err
			}
			buf := make([]byte, 1500)
			n, err := c.Read(buf)
			if err != nil {
				return "", err
			}
			got = string(buf[:n])
		}
		return got, nil
	}

	for _, kernelCT := range []bool{false, true} {
		cfg := topo.config(t)
		cfg.RouteOut, cfg.KernelCT = true, kernelCT
		d := topo.load(t, cfg)
		for _, ep := range []Endpoint{topo.podEndpoint, ep2} {
			if err := d.UpsertEndpoint(ep); err != nil {
				t.Fatal(err)
			}
			if err := netns.Do(topo.node, func() error { return d.AttachHostVeth(ep.Ifindex) }); err != nil {
				t.Fatal(err)
			}
		}

		// Untranslated pod to pod keeps the fast path either way.
		if from, err := tcp(pod2Addr.String() + ":8080"); err != nil || from != topoPod {
			t.Errorf("KernelCT=%v: pod to pod: saw %v, %v; want %v", kernelCT, from, err, topoPod)
		}
		svcPod, errPod := tcp("10.96.0.10:80")
		svcExt, errExt := tcp("10.96.0.11:80")
		svcUDP, errUDP := udpExchange("10.96.0.10:80")
		if !kernelCT {
			if errPod == nil || errExt == nil || errUDP == nil {
				t.Errorf("without KernelCT the translated flows worked (pod %v, outside %v, udp %v): the test cannot fail", errPod, errExt, errUDP)
			}
		} else {
			if errPod != nil || svcPod != topoPod {
				t.Errorf("Service to a pod of the node: saw %v, %v; want %v", svcPod, errPod, topoPod)
			}
			if errExt != nil || svcExt != topoNode {
				t.Errorf("Service to a backend outside: saw %v, %v; want the node address %v", svcExt, errExt, topoNode)
			}
			if errUDP != nil || !strings.HasPrefix(svcUDP, topoPod.String()+":") {
				t.Errorf("UDP Service to a pod of the node: got %q, %v; want an answer naming %v", svcUDP, errUDP, topoPod)
			}
			for _, c := range []struct {
				prog, reason string
			}{{"host_route", "pass_kernel_nat"}, {"masq_ingress", "pass_kernel_nat"}, {"host_route", "redirect_local"}} {
				if n := counter(t, &d.objs, c.prog, c.reason); n == 0 {
					t.Errorf("%s %s = 0, want > 0", c.prog, c.reason)
				}
			}
		}
		for _, ep := range []Endpoint{topo.podEndpoint, ep2} {
			if err := netns.Do(topo.node, func() error { return d.DetachHostVeth(ep.Ifindex) }); err != nil {
				t.Fatal(err)
			}
		}
		d.Close()
		Cleanup(cfg.BPFRoot)
	}
}

// TestInboundToPodAddress connects from outside the node to a pod's own
// address (the outside routes the pod CIDR via the node, as a router or a
// control plane on the pod network does) over TCP and UDP, with the full
// datapath (host routing, route_out, masquerading): the answers must come
// back from the pod's address, not be masqueraded to the node's. TCP is
// told by its missing SYN; UDP needs the kernel's conntrack (KernelCT).
func TestInboundToPodAddress(t *testing.T) {
	if err := KernelCTAvailable(); err != nil {
		t.Skipf("kernel without conntrack kfuncs: %v", err)
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nft to make the node's conntrack run")
	}
	topo := newTopology(t)
	ipCmd(t, "-n", topo.base+"-ext", "route", "add", topoPrefix.String(), "via", topoNode.String())
	// The kernel tracks connections in a namespace only once a rule needs
	// it, as kube-proxy's NAT tables do on every node.
	nft := exec.Command("ip", "netns", "exec", topo.base+"-node", "nft", "-f", "-")
	nft.Stdin = strings.NewReader(`table ip sbct {
	chain pre { type filter hook prerouting priority 0; policy accept; ct state new counter; }
}`)
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	ln := in(t, topo.pod, func() (net.Listener, error) { return net.Listen("tcp4", topoPod.String()+":8080") })
	defer ln.Close()
	echoServer(t, ln)
	udp := in(t, topo.pod, func() (net.PacketConn, error) { return net.ListenPacket("udp4", topoPod.String()+":8081") })
	defer udp.Close()
	udpEchoServer(udp, false)

	cfg := topo.config(t)
	cfg.RouteOut, cfg.KernelCT = true, true
	d := topo.load(t, cfg)
	if err := d.UpsertEndpoint(topo.podEndpoint); err != nil {
		t.Fatal(err)
	}
	if err := netns.Do(topo.node, func() error { return d.AttachHostVeth(topo.podEndpoint.Ifindex) }); err != nil {
		t.Fatal(err)
	}

	c, err := dialIn(topo.ext, func() (net.Conn, error) {
		return net.DialTimeout("tcp4", topoPod.String()+":8080", 2*time.Second)
	})
	if err != nil {
		t.Fatalf("TCP from outside to the pod's address: %v", err)
	}
	r := bufio.NewReader(c)
	for _, msg := range []string{"one", "two"} {
		if _, err := roundTrip(c, r, msg); err != nil {
			t.Fatalf("TCP from outside to the pod's address: %v", err)
		}
	}
	c.Close()

	u, err := dialIn(topo.ext, func() (net.Conn, error) { return net.Dial("udp4", topoPod.String()+":8081") })
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for _, msg := range []string{"one", "two"} {
		u.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := u.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1500)
		if n, err := u.Read(buf); err != nil || string(buf[:n]) != msg {
			cs, _ := Counters(d.objs.SbCounters)
			t.Fatalf("UDP from outside to the pod's address: got %q, %v (a masqueraded answer comes from the node's address, which the connected socket drops); counters %+v", buf[:n], err, cs)
		}
	}
	if got := counter(t, &d.objs, "masq_egress", "pass_inbound_reply"); got < 4 {
		t.Errorf("masq_egress pass_inbound_reply = %d, want >= 4 (TCP and UDP answers)", got)
	}
	if got := counter(t, &d.objs, "masq_egress", "snat_new"); got != 0 {
		t.Errorf("masq_egress snat_new = %d: an answer to a connection from outside was masqueraded", got)
	}
}

// udpEchoServer answers every datagram on pc with its payload, prefixed
// with the sender's address and a space when withSender is set, until pc
// is closed.
func udpEchoServer(pc net.PacketConn, withSender bool) {
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			out := buf[:n]
			if withSender {
				out = append([]byte(from.String()+" "), out...)
			}
			pc.WriteTo(out, from)
		}
	}()
}
