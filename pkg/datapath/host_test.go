package datapath

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"
)

const verdictRedirect = uint32(7) // TC_ACT_REDIRECT

func TestHostRoute(t *testing.T) {
	cfg := testConfig()
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	local := Endpoint{
		IP:      netip.MustParseAddr("10.244.1.6"),
		Ifindex: 42,
		PodMAC:  net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 6},
		HostMAC: net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 6},
		Local:   true,
	}
	remote := local
	remote.IP = netip.MustParseAddr("10.244.2.9")
	remote.Local = false
	for _, ep := range []Endpoint{local, remote} {
		if err := d.UpsertEndpoint(ep); err != nil {
			t.Fatal(err)
		}
	}
	eps, err := Endpoints(objs.SbEndpoints)
	if err != nil || len(eps) != 2 {
		t.Fatalf("Endpoints() = %v, %v; want 2", eps, err)
	}

	tests := []struct {
		name     string
		dst      netip.Addr
		ttl      uint8
		want     uint32
		rewrites bool
	}{
		{"local pod", local.IP, 64, verdictRedirect, true},
		{"pod on another node", remote.IP, 64, verdictNext, false},
		{"outside", testRemote, 64, verdictNext, false},
		{"expiring TTL", local.IP, 1, verdictNext, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := setIPv4Byte(pkt{proto: layers.IPProtocolTCP, src: testPod, dst: tt.dst, sport: 1234, dport: 80, tcpFlags: "S", options: 4}.bytes(t), 14, 8, tt.ttl)

			ret, out := run(t, objs.HostRoute, in)
			if ret != tt.want {
				t.Fatalf("verdict = %d, want %d", int32(ret), tt.want)
			}
			if !tt.rewrites {
				if !bytes.Equal(in, out) {
					t.Errorf("packet modified")
				}
				return
			}
			if got := net.HardwareAddr(out[0:6]); got.String() != local.PodMAC.String() {
				t.Errorf("destination MAC = %v, want %v", got, local.PodMAC)
			}
			if got := net.HardwareAddr(out[6:12]); got.String() != local.HostMAC.String() {
				t.Errorf("source MAC = %v, want %v", got, local.HostMAC)
			}
			if out[14+8] != tt.ttl-1 {
				t.Errorf("TTL = %d, want %d", out[14+8], tt.ttl-1)
			}
			parse(t, out) // checksums still valid
		})
	}
	if n := counter(t, objs, "host_route", "redirect_local"); n != 1 {
		t.Errorf("redirect_local = %d, want 1", n)
	}

	// A reply translated back to a local pod is handed straight to it.
	if err := d.UpsertEndpoint(Endpoint{IP: testPod, Ifindex: 43, PodMAC: local.PodMAC, HostMAC: local.HostMAC, Local: true}); err != nil {
		t.Fatal(err)
	}
	_, sent := run(t, objs.MasqEgress, pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 999, dport: 53}.bytes(t))
	ret, back := run(t, objs.MasqIngress, pkt{proto: layers.IPProtocolUDP, src: testRemote, dst: testNode, sport: 53, dport: parse(t, sent).sport}.bytes(t))
	if ret != verdictRedirect {
		t.Errorf("reply to a local pod: verdict = %d, want TC_ACT_REDIRECT", int32(ret))
	}
	if r := parse(t, back); r.dst != testPod || r.dport != 999 {
		t.Errorf("reply = %v:%d, want %v:999", r.dst, r.dport, testPod)
	}
	if err := d.DeleteEndpoint(testPod); err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteEndpoint(testPod); err != nil {
		t.Errorf("deleting a missing endpoint: %v", err)
	}
}
