package datapath

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
)

func TestConntrackGC(t *testing.T) {
	cfg := testConfig()
	objs := newTestObjects(t, cfg)
	ctx := context.Background()

	send := func(p pkt) uint16 {
		t.Helper()
		ret, out := run(t, objs.MasqEgress, p.bytes(t))
		if ret != verdictNext {
			t.Fatalf("egress verdict %d", int32(ret))
		}
		return parse(t, out).sport
	}
	reply := func(p pkt) {
		t.Helper()
		if ret, _ := run(t, objs.MasqIngress, p.bytes(t)); ret != verdictNext {
			t.Fatalf("ingress verdict %d", int32(ret))
		}
	}
	tcp := func(sport uint16, flags string) pkt {
		return pkt{proto: layers.IPProtocolTCP, src: testPod, dst: testRemote, sport: sport, dport: 80, tcpFlags: flags}
	}
	tcpReply := func(nat uint16, flags string) pkt {
		return pkt{proto: layers.IPProtocolTCP, src: testRemote, dst: testNode, sport: 80, dport: nat, tcpFlags: flags}
	}

	// established: SYN, SYN-ACK, ACK.
	est := send(tcp(1000, "S"))
	reply(tcpReply(est, "SA"))
	send(tcp(1000, "A"))
	// syn-sent: no answer.
	send(tcp(1001, "S"))
	// reset by the remote.
	rst := send(tcp(1002, "S"))
	reply(tcpReply(rst, "R"))
	// closed: FIN both ways.
	fin := send(tcp(1003, "S"))
	reply(tcpReply(fin, "SA"))
	send(tcp(1003, "FA"))
	reply(tcpReply(fin, "FA"))
	// udp and icmp.
	send(pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 2000, dport: 53})
	send(pkt{proto: layers.IPProtocolICMPv4, src: testPod, dst: testRemote, sport: 3000, icmpType: 8})

	states := map[uint16]string{}
	flows, err := Flows(objs.SbCt)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		states[f.Src.Port()] = f.State
	}
	want := map[uint16]string{1000: "established", 1001: "syn-sent", 1002: "reset", 1003: "closed", 2000: "unreplied", 3000: "unreplied"}
	for port, w := range want {
		if states[port] != w {
			t.Errorf("flow from port %d: state %q, want %q", port, states[port], w)
		}
	}

	start := Monotonic()
	for _, step := range []struct {
		after time.Duration
		left  []uint16
	}{
		{5 * time.Second, []uint16{1000, 1001, 1002, 1003, 2000, 3000}},
		{15 * time.Second, []uint16{1000, 1001, 2000, 3000}}, // closing timeout 10s
		{45 * time.Second, []uint16{1000, 1001, 2000}},       // icmp 30s
		{2 * time.Minute, []uint16{1000}},                    // syn 60s, udp 60s
		{7 * time.Hour, nil},                                 // established 6h
	} {
		if _, err := gcConntrack(ctx, objs.SbCt, cfg.Timeouts, start+step.after); err != nil {
			t.Fatal(err)
		}
		flows, err := Flows(objs.SbCt)
		if err != nil {
			t.Fatal(err)
		}
		var left []uint16
		for _, f := range flows {
			if f.Orphan {
				t.Errorf("after %v: half-deleted flow %+v", step.after, f)
			}
			left = append(left, f.Src.Port())
		}
		slices.Sort(left)
		if !slices.Equal(left, step.left) {
			t.Errorf("after %v: flows from ports %v remain, want %v", step.after, left, step.left)
		}
	}
}

func TestCIDREntries(t *testing.T) {
	p := netip.MustParsePrefix
	tests := []struct {
		name             string
		cluster, nonMasq []netip.Prefix
		want             map[netip.Prefix]uint32
	}{
		{"disjoint", []netip.Prefix{p("10.244.0.0/16")}, []netip.Prefix{p("192.168.0.0/16")},
			map[netip.Prefix]uint32{p("10.244.0.0/16"): cidrPod | cidrNoMasq, p("192.168.0.0/16"): cidrNoMasq}},
		{"non-masquerade inside the cluster", []netip.Prefix{p("10.0.0.0/8")}, []netip.Prefix{p("10.1.2.0/24")},
			map[netip.Prefix]uint32{p("10.0.0.0/8"): cidrPod | cidrNoMasq, p("10.1.2.0/24"): cidrPod | cidrNoMasq}},
		{"cluster inside non-masquerade", []netip.Prefix{p("10.244.0.0/16")}, []netip.Prefix{p("10.0.0.0/8")},
			map[netip.Prefix]uint32{p("10.244.0.0/16"): cidrPod | cidrNoMasq, p("10.0.0.0/8"): cidrNoMasq}},
		{"unmasked input", []netip.Prefix{p("10.244.1.7/16")}, nil,
			map[netip.Prefix]uint32{p("10.244.0.0/16"): cidrPod | cidrNoMasq}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := cidrEntries(tt.cluster, tt.nonMasq)
			if len(got) != len(tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
			for k, v := range tt.want {
				if got[k] != v {
					t.Errorf("%v: got flags %#x, want %#x", k, got[k], v)
				}
			}
		})
	}
}
