package datapath

import (
	"bufio"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// TestHostRoutingToRemoteNode turns the external namespace into a peer node
// reached over VXLAN, as pkg/overlay wires nodes, except that the node has
// neither forwarding nor a route to the peer's pods: only host routing can
// carry the pod's packets to the vxlan device (sb_remote_cidrs) and the
// replies back to the pod. With eBPF tunnelling (tunnel=true) the pod's
// packets are encapsulated by host_route and sent out of the uplink, and
// the replies decapsulated by the uplink's program; the peer is the
// kernel's vxlan device either way, so this also proves the headers
// interoperate. Without it the node's vxlan device does both, and
// host_route on its ingress hands the replies on.
func TestHostRoutingToRemoteNode(t *testing.T) {
	attachModes(t, func(t *testing.T, mode AttachMode) {
		for _, tunnel := range []bool{false, true} {
			t.Run(fmt.Sprintf("ebpf-tunnel=%v", tunnel), func(t *testing.T) { testHostRoutingToRemoteNode(t, mode, tunnel) })
		}
	})
}

func testHostRoutingToRemoteNode(t *testing.T, mode AttachMode, tunnel bool) {
	if _, err := exec.LookPath("bridge"); err != nil {
		t.Skip("needs iproute2's bridge for the VXLAN forwarding entries")
	}
	topo := newTopology(t)
	topo.attach = mode
	node, peer := topo.base+"-node", topo.base+"-ext"
	peerPod := netip.MustParseAddr("10.244.2.10")
	nodeMAC, _ := net.ParseMAC("02:5b:00:00:00:01")
	peerMAC, _ := net.ParseMAC("02:5b:00:00:00:02")
	for _, v := range []struct{ ns, local, mac, dev string }{
		{node, topoNode.String(), nodeMAC.String(), "uplink0"},
		{peer, topoExt.String(), peerMAC.String(), "eth0"},
	} {
		ipCmd(t, "-n", v.ns, "link", "add", "sb.vxlan", "address", v.mac, "type", "vxlan", "id", "1",
			"local", v.local, "dev", v.dev, "dstport", "8472", "nolearning")
		ipCmd(t, "-n", v.ns, "link", "set", "sb.vxlan", "up")
	}
	ipCmd(t, "-n", node, "addr", "add", "10.244.1.0/32", "dev", "sb.vxlan")
	ipCmd(t, "-n", node, "neigh", "add", "10.244.2.0", "lladdr", peerMAC.String(), "dev", "sb.vxlan", "nud", "permanent")
	bridgeCmd(t, "-n", node, "fdb", "append", peerMAC.String(), "dev", "sb.vxlan", "dst", topoExt.String())
	// The peer is wired by the stack, its "pod" an address on lo.
	ipCmd(t, "-n", peer, "addr", "add", peerPod.String()+"/32", "dev", "lo")
	ipCmd(t, "-n", peer, "addr", "add", "10.244.2.0/32", "dev", "sb.vxlan")
	ipCmd(t, "-n", peer, "route", "add", "10.244.1.0/24", "via", "10.244.1.0", "dev", "sb.vxlan", "onlink")
	ipCmd(t, "-n", peer, "neigh", "add", "10.244.1.0", "lladdr", nodeMAC.String(), "dev", "sb.vxlan", "nud", "permanent")
	bridgeCmd(t, "-n", peer, "fdb", "append", nodeMAC.String(), "dev", "sb.vxlan", "dst", topoNode.String())
	topo.setForwarding(t, false)

	cfg := topo.config(t)
	if tunnel {
		cfg.VXLANPort, cfg.VXLANVNI = 8472, 1
	}
	d := topo.load(t, cfg)
	defer d.Close()
	vxlanIndex := in(t, topo.node, func() (int, error) {
		i, err := net.InterfaceByName("sb.vxlan")
		if err != nil {
			return 0, err
		}
		return i.Index, nil
	})
	if err := d.UpsertEndpoint(topo.podEndpoint); err != nil {
		t.Fatal(err)
	}
	for _, idx := range []int{topo.podEndpoint.Ifindex, vxlanIndex} {
		if err := netns.Do(topo.node, func() error { return d.AttachHostVeth(idx) }); err != nil {
			t.Fatal(err)
		}
	}

	ln := in(t, topo.ext, func() (net.Listener, error) { return net.Listen("tcp4", peerPod.String()+":8080") })
	defer ln.Close()
	echoServer(t, ln)
	dial := func() (net.Conn, error) { return net.DialTimeout("tcp4", peerPod.String()+":8080", time.Second) }
	if c, err := dialIn(topo.pod, dial); err == nil {
		c.Close()
		t.Fatal("the peer's pod was reached without a route or host routing")
	}

	remote := Remote{Prefix: netip.MustParsePrefix("10.244.2.0/24"), Ifindex: vxlanIndex, PeerMAC: peerMAC, LocalMAC: nodeMAC, VTEP: topoExt, NextHop: topoExt}
	if err := d.SetRemotes([]Remote{remote}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetVTEPPeers([]netip.Addr{topoExt}); err != nil {
		t.Fatal(err)
	}
	conn := in(t, topo.pod, dial)
	defer conn.Close()
	got, err := roundTrip(conn, bufio.NewReader(conn), "over the tunnel")
	if err != nil {
		t.Fatalf("pod to the peer's pod through host routing: %v", err)
	}
	if from, _, _ := strings.Cut(got, " "); netip.MustParseAddrPort(from).Addr() != topoPod {
		t.Errorf("the peer saw %s, want the unmasqueraded %v", from, topoPod)
	}
	// A datagram that fits the pod's MTU (1500 here) but not the uplink's
	// once encapsulated still arrives (the vxlan device fragments it).
	for _, size := range []string{"1400", "1472"} {
		if out, err := exec.Command("ip", "netns", "exec", filepath.Base(topo.pod), "ping", "-c", "1", "-W", "2", "-M", "dont", "-s", size, peerPod.String()).CombinedOutput(); err != nil {
			t.Errorf("ping -s %s from the pod to the peer's pod: %v\n%s", size, err, out)
		}
	}
	bulkExchange(t, topo.pod, topo.ext, peerPod, 32<<20)
	bulkExchange(t, topo.ext, topo.pod, topoPod, 32<<20)
	counters, err := Counters(d.objs.SbCounters)
	if err != nil {
		t.Fatal(err)
	}
	n := map[string]uint64{}
	for _, c := range counters {
		n[c.Program+"/"+c.Reason] = c.Packets
	}
	t.Logf("counters: %v", n)
	// Replies: at least SYN-ACK and the echo.
	back := "host_route/redirect_local"
	if tunnel {
		back = "masq_ingress/redirect_local"
		if n["masq_ingress/decap"] < 2 || n["host_route/encap"] < 3 {
			t.Errorf("masq_ingress decap = %d, host_route encap = %d; want >= 2 and >= 3",
				n["masq_ingress/decap"], n["host_route/encap"])
		}
	} else if n["host_route/encap"] != 0 {
		t.Errorf("host_route encap = %d without a VXLAN port", n["host_route/encap"])
	}
	if n["host_route/redirect_tunnel"] < 3 || n[back] < 2 {
		t.Errorf("host_route redirect_tunnel = %d, %s = %d; want >= 3 and >= 2",
			n["host_route/redirect_tunnel"], back, n[back])
	}

	// Without the prefix the packets go to the stack, which has no route.
	if err := d.SetRemotes(nil); err != nil {
		t.Fatal(err)
	}
	if c, err := dialIn(topo.pod, dial); err == nil {
		c.Close()
		t.Error("the peer's pod still reached after its prefix was removed")
	}
}

func bridgeCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("bridge", args...).CombinedOutput(); err != nil {
		t.Fatalf("bridge %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// bulkExchange sends n random bytes from namespace from to a server on
// addr in namespace to, which answers with their SHA-256: large writes
// make GSO packets, which take the same paths as single ones.
func bulkExchange(t *testing.T, from, to string, addr netip.Addr, n int) {
	t.Helper()
	ln := in(t, to, func() (net.Listener, error) { return net.Listen("tcp4", addr.String()+":8081") })
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		h := sha256.New()
		if _, err := io.Copy(h, c); err == nil {
			fmt.Fprintf(c, "%x", h.Sum(nil))
		}
	}()
	c := in(t, from, func() (net.Conn, error) { return net.DialTimeout("tcp4", addr.String()+":8081", time.Second) })
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	data := make([]byte, n)
	rand.Read(data)
	if _, err := c.Write(data); err != nil {
		t.Fatalf("bulk write: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if want := fmt.Sprintf("%x", sha256.Sum256(data)); err != nil || string(got) != want {
		t.Fatalf("bulk transfer of %d bytes: digest %q, %v; want %s", n, got, err, want)
	}
}
