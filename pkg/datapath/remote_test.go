package datapath

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"
)

func TestHostRouteRemote(t *testing.T) {
	cfg := testConfig()
	objs := newTestObjects(t, cfg)
	d := &Datapath{cfg: cfg, objs: *objs}
	vxlan := Remote{
		Prefix:   netip.MustParsePrefix("10.244.2.0/24"),
		Ifindex:  42,
		PeerMAC:  net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 2},
		LocalMAC: net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 1},
	}
	// BPF_PROG_RUN runs programs on the loopback device (ifindex 1): an
	// entry pointing there stands for packets arriving from the vxlan device.
	loop := vxlan
	loop.Prefix = netip.MustParsePrefix("10.244.3.0/24")
	loop.Ifindex = 1
	stale := vxlan
	stale.Prefix = netip.MustParsePrefix("10.244.9.0/24")
	if err := d.SetRemotes([]Remote{vxlan, loop, stale}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetRemotes([]Remote{vxlan, loop}); err != nil {
		t.Fatal(err)
	}
	got, err := d.Remotes()
	if err != nil || len(got) != 2 || got[0].Prefix != vxlan.Prefix || got[0].Ifindex != 42 ||
		got[0].PeerMAC.String() != vxlan.PeerMAC.String() || got[0].LocalMAC.String() != vxlan.LocalMAC.String() || got[1].Prefix != loop.Prefix {
		t.Fatalf("Remotes() = %v, %v; want %v and %v", got, err, vxlan, loop)
	}
	// A local endpoint wins over the remote prefix holding it.
	local := Endpoint{IP: netip.MustParseAddr("10.244.2.77"), Ifindex: 43,
		PodMAC: net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 7}, HostMAC: net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 7}, Local: true}
	if err := d.UpsertEndpoint(local); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		dst     netip.Addr
		ttl     uint8
		want    uint32
		wantDst net.HardwareAddr // nil: packet untouched
		wantSrc net.HardwareAddr
	}{
		{"pod on another node", netip.MustParseAddr("10.244.2.9"), 64, verdictRedirect, vxlan.PeerMAC, vxlan.LocalMAC},
		{"local pod inside a remote prefix", local.IP, 64, verdictRedirect, local.PodMAC, local.HostMAC},
		{"arrived on the vxlan device", netip.MustParseAddr("10.244.3.9"), 64, verdictNext, nil, nil},
		{"expiring TTL", netip.MustParseAddr("10.244.2.9"), 1, verdictNext, nil, nil},
		{"removed prefix", netip.MustParseAddr("10.244.9.9"), 64, verdictNext, nil, nil},
		{"outside", testRemote, 64, verdictNext, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := setIPv4Byte(pkt{proto: layers.IPProtocolTCP, src: testPod, dst: tt.dst, sport: 1234, dport: 80, tcpFlags: "S", options: 4}.bytes(t), 14, 8, tt.ttl)

			ret, out := run(t, objs.HostRoute, in)
			if ret != tt.want {
				t.Fatalf("verdict = %d, want %d", int32(ret), tt.want)
			}
			if tt.wantDst == nil {
				if !bytes.Equal(in, out) {
					t.Errorf("packet modified")
				}
				return
			}
			if got := net.HardwareAddr(out[0:6]); got.String() != tt.wantDst.String() {
				t.Errorf("destination MAC = %v, want %v", got, tt.wantDst)
			}
			if got := net.HardwareAddr(out[6:12]); got.String() != tt.wantSrc.String() {
				t.Errorf("source MAC = %v, want %v", got, tt.wantSrc)
			}
			if out[14+8] != tt.ttl-1 {
				t.Errorf("TTL = %d, want %d", out[14+8], tt.ttl-1)
			}
			if p := parse(t, out); p.dst != tt.dst || p.src != testPod { // checksums still valid
				t.Errorf("addresses = %v → %v, want %v → %v", p.src, p.dst, testPod, tt.dst)
			}
		})
	}
	if n := counter(t, objs, "host_route", "redirect_tunnel"); n != 1 {
		t.Errorf("redirect_tunnel = %d, want 1", n)
	}

	if err := d.SetRemotes(nil); err != nil {
		t.Fatal(err)
	}
	if got, err := d.Remotes(); err != nil || len(got) != 0 {
		t.Errorf("Remotes() after clearing = %v, %v; want none", got, err)
	}
	if err := d.SetRemotes([]Remote{{Prefix: vxlan.Prefix, Ifindex: 42}}); err == nil {
		t.Errorf("SetRemotes without MACs: no error")
	}
}
