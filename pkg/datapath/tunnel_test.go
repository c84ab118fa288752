package datapath

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// vxlanFrame wraps inner (an Ethernet frame) in outer Ethernet, IPv4, UDP
// and VXLAN headers addressed to the node.
func vxlanFrame(t *testing.T, inner []byte, dport uint16, vni uint32) []byte {
	return vxlanFrameFrom(t, testPeer, inner, dport, vni)
}

// testPeer is the peer node the VXLAN test frames come from.
var testPeer = netip.MustParseAddr("192.168.0.9")

// vxlanFrameFrom is vxlanFrame with outer source src.
func vxlanFrameFrom(t *testing.T, src netip.Addr, inner []byte, dport uint16, vni uint32) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 1, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 1, 2}, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: src.AsSlice(), DstIP: testNode.AsSlice()}
	udp := &layers.UDP{SrcPort: 40000, DstPort: layers.UDPPort(dport)}
	udp.SetNetworkLayerForChecksum(ip)
	vx := &layers.VXLAN{ValidIDFlag: true, VNI: vni}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}
	if err := gopacket.SerializeLayers(buf, opts, eth, ip, udp, vx, gopacket.Payload(inner)); err != nil {
		t.Fatalf("serialize: %v", err)
	}
	return buf.Bytes()
}

func TestVXLANDecap(t *testing.T) {
	cfg := testConfig()
	cfg.VXLANPort, cfg.VXLANVNI = 8472, 7
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	local := Endpoint{IP: netip.MustParseAddr("10.244.1.7"), Ifindex: 43,
		PodMAC: net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 7}, HostMAC: net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 7}, Local: true}
	if err := d.UpsertEndpoint(local); err != nil {
		t.Fatal(err)
	}
	if err := d.SetVTEPPeers([]netip.Addr{testPeer}); err != nil {
		t.Fatal(err)
	}
	remotePod := netip.MustParseAddr("10.244.2.9")
	stranger := netip.MustParseAddr("192.168.0.66")
	payload := []byte("across the overlay")
	inner := func(dst netip.Addr, ttl uint8) []byte {
		return setIPv4Byte(pkt{proto: layers.IPProtocolTCP, src: remotePod, dst: dst, sport: 1234, dport: 80, tcpFlags: "A", payload: payload}.bytes(t), 14, 8, ttl)
	}

	tests := []struct {
		name  string
		frame []byte
		want  uint32
	}{
		{"local pod", vxlanFrame(t, inner(local.IP, 64), 8472, 7), verdictRedirect},
		{"pod of another node", vxlanFrame(t, inner(netip.MustParseAddr("10.244.1.8"), 64), 8472, 7), verdictNext},
		{"other port", vxlanFrame(t, inner(local.IP, 64), 4789, 7), verdictNext},
		{"other VNI", vxlanFrame(t, inner(local.IP, 64), 8472, 8), verdictNext},
		{"expiring TTL", vxlanFrame(t, inner(local.IP, 1), 8472, 7), verdictNext},
		// Injection past the node's firewall: only peer nodes may send.
		{"no peer node", vxlanFrameFrom(t, stranger, inner(local.IP, 64), 8472, 7), verdictDrop},
		{"no peer node, pod of another node", vxlanFrameFrom(t, stranger, inner(netip.MustParseAddr("10.244.1.8"), 64), 8472, 7), verdictDrop},
		{"no peer node, other VNI", vxlanFrameFrom(t, stranger, inner(local.IP, 64), 8472, 8), verdictNext},
		{"no peer node, other port", vxlanFrameFrom(t, stranger, inner(local.IP, 64), 4789, 7), verdictNext},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ret, out := run(t, objs.MasqIngress, tt.frame)
			if ret != tt.want {
				t.Fatalf("verdict = %d, want %d", int32(ret), tt.want)
			}
			if tt.want != verdictRedirect {
				if !bytes.Equal(out, tt.frame) {
					t.Errorf("packet modified")
				}
				return
			}
			// What is left is the inner IPv4 packet behind an Ethernet
			// header addressed to the pod, one hop later.
			if want := len(tt.frame) - 50; len(out) != want {
				t.Fatalf("length %d after decapsulation, want %d", len(out), want)
			}
			if got := net.HardwareAddr(out[0:6]); got.String() != local.PodMAC.String() {
				t.Errorf("destination MAC = %v, want %v", got, local.PodMAC)
			}
			if got := net.HardwareAddr(out[6:12]); got.String() != local.HostMAC.String() {
				t.Errorf("source MAC = %v, want %v", got, local.HostMAC)
			}
			if out[12] != 0x08 || out[13] != 0x00 {
				t.Errorf("ethertype %#x, want IPv4", out[12:14])
			}
			if out[14+8] != 63 {
				t.Errorf("TTL = %d, want 63", out[14+8])
			}
			p := parse(t, out) // checksums still valid
			if p.src != remotePod || p.dst != local.IP || !bytes.HasSuffix(p.l4, payload) {
				t.Errorf("inner packet %v → %v (%q), want %v → %v with the payload", p.src, p.dst, p.l4, remotePod, local.IP)
			}
		})
	}
	if n := counter(t, objs, "masq_ingress", "decap"); n != 1 {
		t.Errorf("decap = %d, want 1", n)
	}
	if n := counter(t, objs, "masq_ingress", "drop_vxlan_unknown_peer"); n != 2 {
		t.Errorf("drop_vxlan_unknown_peer = %d, want 2", n)
	}
	// A peer removed is a stranger.
	if err := d.SetVTEPPeers(nil); err != nil {
		t.Fatal(err)
	}
	if ret, _ := run(t, objs.MasqIngress, tests[0].frame); ret != verdictDrop {
		t.Errorf("after the peer left: verdict = %d, want %d", int32(ret), verdictDrop)
	}

	// Without a port configured nothing is decapsulated.
	cfg.VXLANPort = 0
	off := newTestObjects(t, cfg)
	if err := (&Datapath{cfg: cfg, objs: *off}).UpsertEndpoint(local); err != nil {
		t.Fatal(err)
	}
	if ret, _ := run(t, off.MasqIngress, tests[0].frame); ret != verdictNext {
		t.Errorf("decapsulation disabled: verdict = %d, want %d", int32(ret), verdictNext)
	}
}

func TestVXLANEncap(t *testing.T) {
	cfg := testConfig()
	cfg.VXLANPort, cfg.VXLANVNI = 4789, 7 // the port gopacket decodes as VXLAN
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	peer := Remote{
		Prefix:   netip.MustParsePrefix("10.244.2.0/24"),
		Ifindex:  42,
		PeerMAC:  net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 2},
		LocalMAC: net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 1},
		VTEP:     netip.MustParseAddr("192.168.0.9"),
	}
	noVTEP := peer
	noVTEP.Prefix, noVTEP.VTEP = netip.MustParsePrefix("10.244.3.0/24"), netip.Addr{}
	routed := peer // next hop known: no route lookup per packet
	routed.Prefix, routed.NextHop = netip.MustParsePrefix("10.244.4.0/24"), netip.MustParseAddr("192.168.0.1")
	if err := d.SetRemotes([]Remote{peer, noVTEP, routed}); err != nil {
		t.Fatal(err)
	}
	if got, err := d.Remotes(); err != nil || len(got) != 3 || got[0].VTEP != peer.VTEP || got[1].VTEP.IsValid() ||
		got[2].NextHop != routed.NextHop || got[0].NextHop.IsValid() {
		t.Fatalf("Remotes() = %v, %v; want the VTEPs and next hop kept", got, err)
	}
	if err := d.SetRemotes([]Remote{peer, noVTEP, {Prefix: routed.Prefix, Ifindex: 42, PeerMAC: peer.PeerMAC, LocalMAC: peer.LocalMAC, NextHop: routed.NextHop}}); err == nil {
		t.Errorf("SetRemotes with a next hop but no VTEP: no error")
	}
	payload := []byte("to another node")
	dst := netip.MustParseAddr("10.244.2.9")
	in := pkt{proto: layers.IPProtocolTCP, src: testPod, dst: dst, sport: 1234, dport: 80, tcpFlags: "A", payload: payload}.bytes(t)
	ret, out := run(t, objs.HostRoute, in)
	if ret != verdictRedirect {
		t.Fatalf("verdict = %d, want %d", int32(ret), verdictRedirect)
	}
	if len(out) != len(in)+50 {
		t.Fatalf("length %d after encapsulation, want %d", len(out), len(in)+50)
	}
	// The kernel's own parser must read it as the vxlan device would.
	p := gopacket.NewPacket(out, layers.LayerTypeEthernet, gopacket.Default)
	ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	udp, _ := p.Layer(layers.LayerTypeUDP).(*layers.UDP)
	vx, _ := p.Layer(layers.LayerTypeVXLAN).(*layers.VXLAN)
	if ip == nil || udp == nil || vx == nil {
		t.Fatalf("not a VXLAN packet: %v", p)
	}
	if !ip.SrcIP.Equal(testNode.AsSlice()) || !ip.DstIP.Equal(peer.VTEP.AsSlice()) || ip.TTL != 64 || ip.Length != uint16(len(out)-14) {
		t.Errorf("outer IPv4 %v → %v ttl %d len %d", ip.SrcIP, ip.DstIP, ip.TTL, ip.Length)
	}
	if sum := csum(0, out[14:34]); sum != 0xffff {
		t.Errorf("outer IPv4 checksum invalid (sum %#x)", sum)
	}
	if udp.DstPort != 4789 || udp.SrcPort < 32768 || udp.SrcPort >= 61000 || udp.Length != uint16(len(out)-34) || udp.Checksum != 0 {
		t.Errorf("UDP %d → %d len %d csum %#x", udp.SrcPort, udp.DstPort, udp.Length, udp.Checksum)
	}
	if !vx.ValidIDFlag || vx.VNI != 7 {
		t.Errorf("VXLAN flags/VNI = %v/%d, want valid/7", vx.ValidIDFlag, vx.VNI)
	}
	inner := out[50:] // outer Ethernet, IPv4, UDP, VXLAN
	if got := net.HardwareAddr(inner[0:6]); got.String() != peer.PeerMAC.String() {
		t.Errorf("inner destination MAC = %v, want %v", got, peer.PeerMAC)
	}
	if got := net.HardwareAddr(inner[6:12]); got.String() != peer.LocalMAC.String() {
		t.Errorf("inner source MAC = %v, want %v", got, peer.LocalMAC)
	}
	if inner[14+8] != 63 {
		t.Errorf("inner TTL = %d, want 63", inner[14+8])
	}
	if ip := parse(t, inner); ip.src != testPod || ip.dst != dst || !bytes.HasSuffix(ip.l4, payload) {
		t.Errorf("inner packet %v → %v, want %v → %v with the payload", ip.src, ip.dst, testPod, dst)
	}
	if n := counter(t, objs, "host_route", "encap"); n != 1 {
		t.Errorf("encap = %d, want 1", n)
	}

	// Without a VTEP the packet goes to the vxlan device as before.
	in = pkt{proto: layers.IPProtocolTCP, src: testPod, dst: netip.MustParseAddr("10.244.3.9"), sport: 1234, dport: 80, tcpFlags: "A"}.bytes(t)
	ret, out = run(t, objs.HostRoute, in)
	if ret != verdictRedirect || net.HardwareAddr(out[0:6]).String() != peer.PeerMAC.String() {
		t.Errorf("no VTEP: verdict %d, destination MAC %v; want a redirect to the vxlan device", int32(ret), net.HardwareAddr(out[0:6]))
	}
	if n := counter(t, objs, "host_route", "encap"); n != 1 {
		t.Errorf("encap = %d after a packet without VTEP, want 1", n)
	}
}

// TestVXLANECN checks that ECN crosses the tunnel as the kernel's tunnels
// carry it (RFC 6040 normal mode): the inner field is copied out (CE as
// ECT(0)), and congestion marked on the outer header reaches an
// ECN-capable inner header.
func TestVXLANECN(t *testing.T) {
	cfg := testConfig()
	cfg.VXLANPort, cfg.VXLANVNI = 4789, 7
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	peer := Remote{Prefix: netip.MustParsePrefix("10.244.2.0/24"), Ifindex: 42,
		PeerMAC: net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 2}, LocalMAC: net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 1},
		VTEP: netip.MustParseAddr("192.168.0.9")}
	local := Endpoint{IP: netip.MustParseAddr("10.244.1.7"), Ifindex: 43,
		PodMAC: net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 7}, HostMAC: net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 7}, Local: true}
	if err := d.SetRemotes([]Remote{peer}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetVTEPPeers([]netip.Addr{peer.VTEP}); err != nil {
		t.Fatal(err)
	}
	if err := d.UpsertEndpoint(local); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ inner, outer byte }{{0, 0}, {1, 1}, {2, 2}, {3, 2}} {
		in := setIPv4Byte(pkt{proto: layers.IPProtocolTCP, src: testPod, dst: netip.MustParseAddr("10.244.2.9"), sport: 1, dport: 2, tcpFlags: "A"}.bytes(t), 14, 1, tt.inner)
		ret, out := run(t, objs.HostRoute, in)
		if ret != verdictRedirect || len(out) != len(in)+50 {
			t.Fatalf("encap of ECN %d: verdict %d, length %d", tt.inner, int32(ret), len(out))
		}
		if got := out[15] & 3; got != tt.outer {
			t.Errorf("inner ECN %d: outer ECN %d, want %d", tt.inner, got, tt.outer)
		}
		if sum := csum(0, out[14:34]); sum != 0xffff {
			t.Errorf("inner ECN %d: outer IPv4 checksum invalid", tt.inner)
		}
	}
	for _, tt := range []struct{ outer, inner, want byte }{{3, 2, 3}, {3, 1, 3}, {3, 0, 0}, {2, 1, 1}, {0, 2, 2}} {
		inner := setIPv4Byte(pkt{proto: layers.IPProtocolTCP, src: netip.MustParseAddr("10.244.2.9"), dst: local.IP, sport: 1, dport: 2, tcpFlags: "A"}.bytes(t), 14, 1, tt.inner)
		frame := setIPv4Byte(vxlanFrame(t, inner, 4789, 7), 14, 1, tt.outer)
		ret, out := run(t, objs.MasqIngress, frame)
		if ret != verdictRedirect || len(out) != len(frame)-50 {
			t.Fatalf("decap of outer ECN %d: verdict %d, length %d", tt.outer, int32(ret), len(out))
		}
		if got := out[15] & 3; got != tt.want {
			t.Errorf("outer ECN %d, inner %d: inner now %d, want %d", tt.outer, tt.inner, got, tt.want)
		}
		parse(t, out) // checksums still valid
	}
}
