package datapath

import (
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/gopacket/gopacket/layers"
)

// TestKernelCTFailedLookup: a conntrack lookup the kernel refuses (here an
// opts size it does not accept: -EINVAL, not -ENOENT) says nothing about
// the flow, so host routing leaves the packet to the stack instead of
// taking it as one the stack never saw; a lookup that finds no entry
// keeps the fast path.
func TestKernelCTFailedLookup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load eBPF programs")
	}
	kct, err := probeKernelCT()
	if err != nil {
		t.Skipf("kernel without conntrack kfuncs: %v", err)
	}
	local := Endpoint{IP: netip.MustParseAddr("10.244.1.6"), Ifindex: 42,
		PodMAC: net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 6}, HostMAC: net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 6}, Local: true}
	frame := pkt{proto: layers.IPProtocolTCP, src: testPod, dst: local.IP, sport: 40000, dport: 80, tcpFlags: "A", payload: []byte("x")}.bytes(t)
	for _, tt := range []struct {
		name     string
		optsSize uint32
		reason   string
	}{
		{"no entry", kct.OptsSize, "redirect_local"},
		{"lookup refused", 8, "pass_kernel_nat"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.KernelCT = true
			var objs datapathObjects
			if err := loadObjectsCT(&objs, cfg, "", kernelCT{OptsSize: tt.optsSize}); err != nil {
				t.Fatal(err)
			}
			defer objs.Close()
			if err := (&Datapath{cfg: cfg, objs: objs}).UpsertEndpoint(local); err != nil {
				t.Fatal(err)
			}
			run(t, objs.HostRoute, frame)
			if n := counter(t, &objs, "host_route", tt.reason); n != 1 {
				t.Errorf("host_route %s = %d, want 1", tt.reason, n)
			}
		})
	}
}

// TestKernelCTICMPErrors: with the conntrack check on, an ICMP error for a
// local pod (say "fragmentation needed" about a Service flow, which the
// stack's conntrack translates as related traffic) takes the stack, while
// an echo reply keeps the fast path; with the check off both are
// redirected, as before.
func TestKernelCTICMPErrors(t *testing.T) {
	if err := KernelCTAvailable(); err != nil {
		t.Skipf("kernel without conntrack kfuncs: %v", err)
	}
	local := Endpoint{IP: netip.MustParseAddr("10.244.1.6"), Ifindex: 42,
		PodMAC: net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 6}, HostMAC: net.HardwareAddr{0x02, 0xbb, 0, 0, 0, 6}, Local: true}
	quoted := quote(pkt{proto: layers.IPProtocolTCP, src: local.IP, dst: netip.MustParseAddr("10.96.0.10"), sport: 40000, dport: 80, tcpFlags: "A"}.bytes(t), 8)
	unreach := pkt{proto: layers.IPProtocolICMPv4, src: testPod, dst: local.IP, icmpType: 3, inner: quoted}.bytes(t)
	echo := pkt{proto: layers.IPProtocolICMPv4, src: testPod, dst: local.IP, icmpType: 0, sport: 9}.bytes(t)
	for _, kernelCT := range []bool{false, true} {
		cfg := testConfig()
		cfg.KernelCT = kernelCT
		objs := newTestObjects(t, cfg)
		if err := (&Datapath{cfg: cfg, objs: *objs}).UpsertEndpoint(local); err != nil {
			t.Fatal(err)
		}
		wantUnreach := verdictRedirect
		if kernelCT {
			wantUnreach = verdictNext
		}
		if ret, _ := run(t, objs.HostRoute, unreach); ret != wantUnreach {
			t.Errorf("KernelCT=%v: ICMP unreachable verdict %d, want %d", kernelCT, int32(ret), int32(wantUnreach))
		}
		if ret, _ := run(t, objs.HostRoute, echo); ret != verdictRedirect {
			t.Errorf("KernelCT=%v: ICMP echo reply verdict %d, want redirect", kernelCT, int32(ret))
		}
	}
}
