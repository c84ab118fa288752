package agent

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/overlay"
)

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestDatapathCIDRs(t *testing.T) {
	sel := Selection{
		ExcludeCIDRs: prefixes("10.244.1.0/24", "10.244.2.0/24", "fd00:10:244:1::/64"),
		NodeIPs:      []netip.Addr{netip.MustParseAddr("192.168.1.2"), netip.MustParseAddr("192.168.1.1"), netip.MustParseAddr("fd00::1")},
	}
	tests := []struct {
		name        string
		cfg         Config
		wantCluster []netip.Prefix
		wantNoMasq  []netip.Prefix
	}{
		{
			name:        "ebpf masquerade: cluster CIDR and every node's pod CIDR, IPv4 only, those inside the cluster CIDR folded into it",
			cfg:         Config{Masquerade: true, MasqueradeBackend: BackendEBPF, ClusterCIDRs: prefixes("10.244.0.0/16"), NonMasqueradeCIDRs: prefixes("10.96.0.0/12", "10.96.1.1/12")},
			wantCluster: prefixes("10.244.0.0/16"),
			wantNoMasq:  prefixes("10.96.0.0/12", "192.168.1.1/32", "192.168.1.2/32"),
		},
		{
			name:        "ebpf masquerade without a cluster CIDR: every node's pod CIDR",
			cfg:         Config{Masquerade: true, MasqueradeBackend: BackendEBPF, NonMasqueradeCIDRs: prefixes("192.168.0.0/16", "10.244.2.0/28")},
			wantCluster: prefixes("10.244.1.0/24", "10.244.2.0/24"),
			wantNoMasq:  prefixes("192.168.0.0/16"),
		},
		{
			name:       "nftables masquerade: no pod prefixes, so the uplink programs pass everything",
			cfg:        Config{Masquerade: true, MasqueradeBackend: BackendNFTables, ClusterCIDRs: prefixes("10.244.0.0/16")},
			wantNoMasq: prefixes("192.168.1.1/32", "192.168.1.2/32"),
		},
		{
			name:       "masquerade off",
			cfg:        Config{Masquerade: false, MasqueradeBackend: BackendEBPF, ClusterCIDRs: prefixes("10.244.0.0/16")},
			wantNoMasq: prefixes("192.168.1.1/32", "192.168.1.2/32"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := &Agent{cfg: tt.cfg}
			cluster, noMasq := a.datapathCIDRs(sel)
			if !slices.Equal(cluster, tt.wantCluster) || !slices.Equal(noMasq, tt.wantNoMasq) {
				t.Errorf("datapathCIDRs = %v, %v; want %v, %v", cluster, noMasq, tt.wantCluster, tt.wantNoMasq)
			}
		})
	}
}

func TestEndpointRelevant(t *testing.T) {
	route := func(fam, dstLen, proto byte) []byte {
		return []byte{fam, dstLen, 0, 0, unix.RT_TABLE_MAIN, proto, 0, 0, 0, 0, 0, 0}
	}
	neigh := func(fam byte, state uint16) []byte {
		b := make([]byte, 12)
		b[0] = fam
		binary.NativeEndian.PutUint16(b[8:], state)
		return b
	}
	tests := []struct {
		name string
		typ  netlink.HeaderType
		data []byte
		want bool
	}{
		{"new link", unix.RTM_NEWLINK, make([]byte, 16), true},
		{"deleted link", unix.RTM_DELLINK, make([]byte, 16), true},
		{"pod route", unix.RTM_NEWROUTE, route(unix.AF_INET, 32, 200), true},
		{"pod route deleted", unix.RTM_DELROUTE, route(unix.AF_INET, 32, 200), true},
		{"overlay route", unix.RTM_NEWROUTE, route(unix.AF_INET, 24, 201), false},
		{"kernel route", unix.RTM_NEWROUTE, route(unix.AF_INET, 32, unix.RTPROT_KERNEL), false},
		{"IPv6 route", unix.RTM_NEWROUTE, route(unix.AF_INET6, 32, 200), false},
		{"permanent neighbour", unix.RTM_NEWNEIGH, neigh(unix.AF_INET, unix.NUD_PERMANENT), true},
		{"learned neighbour", unix.RTM_NEWNEIGH, neigh(unix.AF_INET, unix.NUD_REACHABLE), false},
		{"bridge fdb", unix.RTM_NEWNEIGH, neigh(unix.AF_BRIDGE, unix.NUD_PERMANENT), false},
		{"truncated", unix.RTM_NEWNEIGH, []byte{unix.AF_INET}, false},
		{"address", unix.RTM_NEWADDR, make([]byte, 8), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := netlink.Message{Header: netlink.Header{Type: tt.typ}, Data: tt.data}
			if got := endpointRelevant(m); got != tt.want {
				t.Errorf("endpointRelevant = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestDatapathConfig(t *testing.T) {
	self := nodeInfo{InternalIP: netip.MustParseAddr("192.168.1.1")}
	under := overlay.Link{Index: 2}
	tests := []struct {
		name         string
		cfg          Config
		wantKernelCT bool
		wantRouteOut bool
		wantVXLAN    bool
	}{
		{"host routing with coexistence asks the kernel's conntrack",
			Config{HostRouting: true, KubeProxyCoexistence: true, Masquerade: true, MasqueradeBackend: BackendEBPF, VXLANPort: 8472, VXLANVNI: 1}, true, true, true},
		{"host routing without coexistence",
			Config{HostRouting: true, Masquerade: true, MasqueradeBackend: BackendNFTables, VXLANPort: 8472, VXLANVNI: 1}, false, false, true},
		// New turns host routing off where the kfuncs are missing: the
		// masquerade-only datapath must then load without them.
		{"masquerading only: no kfuncs needed",
			Config{KubeProxyCoexistence: true, Masquerade: true, MasqueradeBackend: BackendEBPF, VXLANPort: 8472, VXLANVNI: 1}, false, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := &Agent{cfg: tt.cfg}
			got := a.datapathConfig(self, under, nil, nil)
			if got.KernelCT != tt.wantKernelCT || got.RouteOut != tt.wantRouteOut || (got.VXLANPort != 0) != tt.wantVXLAN {
				t.Errorf("KernelCT, RouteOut, VXLAN = %v, %v, %v; want %v, %v, %v",
					got.KernelCT, got.RouteOut, got.VXLANPort != 0, tt.wantKernelCT, tt.wantRouteOut, tt.wantVXLAN)
			}
		})
	}
}

func TestDatapathRemotes(t *testing.T) {
	local, _ := net.ParseMAC("02:00:00:00:00:01")
	peerB, _ := net.ParseMAC("02:00:00:00:00:02")
	peerC, _ := net.ParseMAC("02:00:00:00:00:03")
	dev := overlay.Link{Index: 7, MAC: local}
	sel := Selection{Peers: []overlay.Peer{
		{Name: "b", MAC: peerB, PodCIDRs: prefixes("10.244.2.0/24", "fd00:10:244:2::/64")},
		{Name: "c", MAC: peerC, PodCIDRs: prefixes("10.244.3.1/24")},
	}}
	str := func(rs []datapath.Remote) []string {
		var out []string
		for _, r := range rs {
			out = append(out, fmt.Sprintf("%v %d %v %v", r.Prefix, r.Ifindex, r.PeerMAC, r.LocalMAC))
		}
		return out
	}
	tests := []struct {
		name string
		cfg  Config
		dev  overlay.Link
		want []string
	}{
		{"every peer's IPv4 pod CIDR", Config{HostRouting: true}, dev, []string{
			"10.244.2.0/24 7 02:00:00:00:00:02 02:00:00:00:00:01",
			"10.244.3.0/24 7 02:00:00:00:00:03 02:00:00:00:00:01",
		}},
		{"host routing off: the stack forwards", Config{HostRouting: false}, dev, nil},
		{"no vxlan device yet", Config{HostRouting: true}, overlay.Link{}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := &Agent{cfg: tt.cfg}
			if got := str(a.datapathRemotes(tt.dev, overlay.Link{}, sel)); !slices.Equal(got, tt.want) {
				t.Errorf("datapathRemotes = %q, want %q", got, tt.want)
			}
		})
	}
}
