package datapath

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// Verdicts as BPF_PROG_RUN reports them.
const (
	verdictNext = uint32(0xffffffff) // TCX_NEXT (-1)
	verdictDrop = uint32(2)          // TCX_DROP
)

var (
	testNode    = netip.MustParseAddr("192.168.50.10")
	testPod     = netip.MustParseAddr("10.244.1.5")
	testRemote  = netip.MustParseAddr("1.1.1.1")
	testCluster = netip.MustParsePrefix("10.244.0.0/16")
	testNoMasq  = netip.MustParsePrefix("172.16.0.0/12")
)

func testConfig() Config {
	cfg := Config{
		BPFRoot:       "unused",
		UplinkIfindex: 1,
		NodeIP:        testNode,
		ClusterCIDRs:  []netip.Prefix{testCluster},
		NonMasqCIDRs:  []netip.Prefix{testNoMasq, netip.PrefixFrom(testNode, 32)},
		CTSize:        1024,
	}
	cfg.setDefaults()
	return cfg
}

// newTestObjects loads the datapath with unpinned maps, for BPF_PROG_RUN.
func newTestObjects(t *testing.T, cfg Config) *datapathObjects {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to load eBPF programs")
	}
	var objs datapathObjects
	if err := loadObjects(&objs, cfg, ""); err != nil {
		if errors.Is(err, os.ErrPermission) {
			t.Skipf("cannot load eBPF programs: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	if err := syncCIDRs(objs.SbMasqCidrs, cidrEntries(cfg.ClusterCIDRs, cfg.NonMasqCIDRs)); err != nil {
		t.Fatal(err)
	}
	return &objs
}

// pkt describes a test packet.
type pkt struct {
	proto    layers.IPProtocol
	src, dst netip.Addr
	sport    uint16 // ICMP: echo id
	dport    uint16
	icmpType uint8 // ICMP: type (code 0)
	tcpFlags string
	options  int // bytes of IPv4 options (multiple of 4)
	frag     bool
	zeroUDP  bool   // send a UDP checksum of zero
	inner    []byte // ICMP error: the quoted packet
	payload  []byte
}

func (p pkt) bytes(t *testing.T) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: p.proto, SrcIP: p.src.AsSlice(), DstIP: p.dst.AsSlice(), Flags: layers.IPv4DontFragment, Id: 0x1234}
	if p.frag {
		ip.Flags = layers.IPv4MoreFragments
	}
	for i := 0; i < p.options/4; i++ {
		// NOPs then End-of-list; gopacket pads to 4 bytes.
		ip.Options = append(ip.Options, layers.IPv4Option{OptionType: 1}, layers.IPv4Option{OptionType: 1}, layers.IPv4Option{OptionType: 1}, layers.IPv4Option{OptionType: 1})
	}
	payload := gopacket.Payload(p.payload)
	var l4 gopacket.SerializableLayer
	switch p.proto {
	case layers.IPProtocolTCP:
		tcp := &layers.TCP{SrcPort: layers.TCPPort(p.sport), DstPort: layers.TCPPort(p.dport), Seq: 1000, Window: 65535}
		for _, f := range p.tcpFlags {
			switch f {
			case 'S':
				tcp.SYN = true
			case 'A':
				tcp.ACK = true
			case 'F':
				tcp.FIN = true
			case 'R':
				tcp.RST = true
			}
		}
		tcp.SetNetworkLayerForChecksum(ip)
		l4 = tcp
	case layers.IPProtocolUDP:
		udp := &layers.UDP{SrcPort: layers.UDPPort(p.sport), DstPort: layers.UDPPort(p.dport)}
		udp.SetNetworkLayerForChecksum(ip)
		l4 = udp
	case layers.IPProtocolICMPv4:
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(p.icmpType, 0), Id: p.sport, Seq: 7}
		l4 = icmp
		if p.inner != nil {
			payload = gopacket.Payload(p.inner)
		}
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}
	if err := gopacket.SerializeLayers(buf, opts, eth, ip, l4, payload); err != nil {
		t.Fatalf("serialize: %v", err)
	}
	b := buf.Bytes()
	if p.zeroUDP {
		l4off := 14 + int(b[14]&0xf)*4
		b[l4off+6], b[l4off+7] = 0, 0
	}
	return b
}

// quote returns the IPv4 packet inside an Ethernet frame, truncated to its
// header plus n bytes of L4, as ICMP errors quote it.
func quote(frame []byte, n int) []byte {
	ip := frame[14:]
	ihl := int(ip[0]&0xf) * 4
	return append([]byte(nil), ip[:ihl+n]...)
}

// run runs prog on the frame in and returns its verdict and the frame it
// left (shorter or longer when it removed or added headers).
func run(t *testing.T, prog *ebpf.Program, in []byte) (uint32, []byte) {
	t.Helper()
	opts := ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256)}
	ret, err := prog.Run(&opts)
	if err != nil {
		t.Fatalf("run %v: %v", prog, err)
	}
	return ret, opts.DataOut
}

// setIPv4Byte sets byte i of the IPv4 header at off in frame b (8: TTL,
// 1: TOS) and recomputes the header checksum; it returns b.
func setIPv4Byte(b []byte, off, i int, v byte) []byte {
	b[off+i] = v
	b[off+10], b[off+11] = 0, 0
	c := ^csum(0, b[off:off+int(b[off]&0xf)*4])
	b[off+10], b[off+11] = byte(c>>8), byte(c)
	return b
}

// parsed holds the fields tests check in a rewritten packet.
type parsed struct {
	src, dst     netip.Addr
	sport, dport uint16 // ICMP: id, 0
	icmpType     uint8
	l4           []byte
}

func parse(t *testing.T, frame []byte) parsed {
	t.Helper()
	ip := frame[14:]
	ihl := int(ip[0]&0xf) * 4
	total := int(binary.BigEndian.Uint16(ip[2:]))
	ip = ip[:total]
	if sum := csum(0, ip[:ihl]); sum != 0xffff {
		t.Errorf("IPv4 header checksum invalid (sum %#x)", sum)
	}
	p := parsed{src: netip.AddrFrom4([4]byte(ip[12:16])), dst: netip.AddrFrom4([4]byte(ip[16:20])), l4: ip[ihl:]}
	switch ip[9] {
	case 6, 17:
		p.sport = binary.BigEndian.Uint16(p.l4[0:])
		p.dport = binary.BigEndian.Uint16(p.l4[2:])
		if ip[9] == 17 && binary.BigEndian.Uint16(p.l4[6:]) == 0 {
			break // no checksum
		}
		var pseudo [12]byte
		copy(pseudo[0:], ip[12:20])
		pseudo[9] = ip[9]
		binary.BigEndian.PutUint16(pseudo[10:], uint16(len(p.l4)))
		if sum := csum(uint32(csum(0, pseudo[:])), p.l4); sum != 0xffff {
			t.Errorf("L4 checksum invalid (sum %#x)", sum)
		}
	case 1:
		p.icmpType = p.l4[0]
		p.sport = binary.BigEndian.Uint16(p.l4[4:])
		if sum := csum(0, p.l4); sum != 0xffff {
			t.Errorf("ICMP checksum invalid (sum %#x)", sum)
		}
	}
	return p
}

// csum is the ones'-complement sum used by IP checksums (not inverted).
func csum(sum uint32, b []byte) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

func counter(t *testing.T, objs *datapathObjects, prog, reason string) uint64 {
	t.Helper()
	cs, err := Counters(objs.SbCounters)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		if c.Program == prog && c.Reason == reason {
			return c.Packets
		}
	}
	return 0
}

func TestMasqueradeRoundTrip(t *testing.T) {
	cfg := testConfig()
	objs := newTestObjects(t, cfg)
	payload := []byte("hello, masquerade")
	tests := []struct {
		name  string
		out   pkt
		reply func(natPort uint16) pkt
	}{
		{
			name: "tcp syn",
			out:  pkt{proto: layers.IPProtocolTCP, src: testPod, dst: testRemote, sport: 40000, dport: 80, tcpFlags: "S"},
			reply: func(p uint16) pkt {
				return pkt{proto: layers.IPProtocolTCP, src: testRemote, dst: testNode, sport: 80, dport: p, tcpFlags: "SA"}
			},
		},
		{
			name: "tcp with IPv4 options",
			out:  pkt{proto: layers.IPProtocolTCP, src: testPod, dst: testRemote, sport: 40001, dport: 443, tcpFlags: "S", options: 8, payload: payload},
			reply: func(p uint16) pkt {
				return pkt{proto: layers.IPProtocolTCP, src: testRemote, dst: testNode, sport: 443, dport: p, tcpFlags: "A", options: 12, payload: payload}
			},
		},
		{
			name: "udp",
			out:  pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 5353, dport: 53, payload: payload},
			reply: func(p uint16) pkt {
				return pkt{proto: layers.IPProtocolUDP, src: testRemote, dst: testNode, sport: 53, dport: p, payload: payload}
			},
		},
		{
			name: "udp odd length with options",
			out:  pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 5354, dport: 53, options: 4, payload: payload[:5]},
			reply: func(p uint16) pkt {
				return pkt{proto: layers.IPProtocolUDP, src: testRemote, dst: testNode, sport: 53, dport: p, payload: payload[:5]}
			},
		},
		{
			name: "udp zero checksum",
			out:  pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 5355, dport: 53, zeroUDP: true, payload: payload},
			reply: func(p uint16) pkt {
				return pkt{proto: layers.IPProtocolUDP, src: testRemote, dst: testNode, sport: 53, dport: p, zeroUDP: true, payload: payload}
			},
		},
		{
			name: "icmp echo",
			out:  pkt{proto: layers.IPProtocolICMPv4, src: testPod, dst: testRemote, sport: 0x4242, icmpType: 8, payload: payload},
			reply: func(p uint16) pkt {
				return pkt{proto: layers.IPProtocolICMPv4, src: testRemote, dst: testNode, sport: p, icmpType: 0, payload: payload}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := tt.out.bytes(t)
			ret, out := run(t, objs.MasqEgress, in)
			if ret != verdictNext {
				t.Fatalf("egress verdict = %d, want TCX_NEXT", int32(ret))
			}
			got := parse(t, out)
			if got.src != testNode || got.dst != testRemote {
				t.Errorf("egress addresses = %v -> %v, want %v -> %v", got.src, got.dst, testNode, testRemote)
			}
			if got.sport < cfg.PortMin || got.sport > cfg.PortMax {
				t.Errorf("egress source port %d not in %d-%d", got.sport, cfg.PortMin, cfg.PortMax)
			}
			if got.dport != tt.out.dport {
				t.Errorf("egress destination port = %d, want %d", got.dport, tt.out.dport)
			}
			if tt.out.zeroUDP && binary.BigEndian.Uint16(got.l4[6:]) != 0 {
				t.Errorf("zero UDP checksum became %#x", binary.BigEndian.Uint16(got.l4[6:]))
			}
			// A second packet of the flow keeps the same mapping.
			_, out2 := run(t, objs.MasqEgress, in)
			if p2 := parse(t, out2); p2.sport != got.sport {
				t.Errorf("second packet NAT port = %d, want %d", p2.sport, got.sport)
			}

			ret, back := run(t, objs.MasqIngress, tt.reply(got.sport).bytes(t))
			if ret != verdictNext {
				t.Fatalf("ingress verdict = %d, want TCX_NEXT", int32(ret))
			}
			r := parse(t, back)
			if r.src != testRemote || r.dst != testPod || r.dport != tt.out.sport && tt.out.proto != layers.IPProtocolICMPv4 {
				t.Errorf("reply = %v:%d -> %v:%d, want %v -> %v:%d", r.src, r.sport, r.dst, r.dport, testRemote, testPod, tt.out.sport)
			}
			if tt.out.proto == layers.IPProtocolICMPv4 && r.sport != tt.out.sport {
				t.Errorf("echo reply id = %#x, want %#x", r.sport, tt.out.sport)
			}
		})
	}
	if n := counter(t, objs, "masq_egress", "snat_new"); n != uint64(len(tests)) {
		t.Errorf("snat_new counter = %d, want %d", n, len(tests))
	}
	flows, err := Flows(objs.SbCt)
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) != len(tests) {
		t.Errorf("conntrack holds %d flows, want %d: %+v", len(flows), len(tests), flows)
	}
	for _, f := range flows {
		if f.Orphan || f.NAT.Addr() != testNode {
			t.Errorf("flow %+v: want both halves and NAT address %v", f, testNode)
		}
	}
}

func TestMasqueradeUntouched(t *testing.T) {
	cfg := testConfig()
	objs := newTestObjects(t, cfg)
	other := netip.MustParseAddr("10.244.7.9")
	tests := []struct {
		name   string
		in     pkt
		reason string
	}{
		{"to cluster CIDR", pkt{proto: layers.IPProtocolTCP, src: testPod, dst: other, sport: 1, dport: 2, tcpFlags: "S"}, "pass_no_masq"},
		{"to non-masquerade CIDR", pkt{proto: layers.IPProtocolUDP, src: testPod, dst: netip.MustParseAddr("172.20.1.1"), sport: 1, dport: 2}, "pass_no_masq"},
		{"to node IP", pkt{proto: layers.IPProtocolTCP, src: testPod, dst: testNode, sport: 1, dport: 2, tcpFlags: "S"}, "pass_no_masq"},
		{"from host", pkt{proto: layers.IPProtocolTCP, src: testNode, dst: testRemote, sport: 1, dport: 2, tcpFlags: "S"}, "pass_not_pod"},
		// Answers to connections opened from outside to the pod's own
		// address (routed pod CIDRs): the client must see that address.
		{"TCP answer without entry", pkt{proto: layers.IPProtocolTCP, src: testPod, dst: testRemote, sport: 8080, dport: 40000, tcpFlags: "SA"}, "pass_inbound_reply"},
		{"TCP ACK without entry", pkt{proto: layers.IPProtocolTCP, src: testPod, dst: testRemote, sport: 8080, dport: 40000, tcpFlags: "A"}, "pass_inbound_reply"},
		{"ICMP echo reply", pkt{proto: layers.IPProtocolICMPv4, src: testPod, dst: testRemote, icmpType: 0}, "pass_inbound_reply"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := counter(t, objs, "masq_egress", tt.reason)
			in := tt.in.bytes(t)
			ret, out := run(t, objs.MasqEgress, in)
			if ret != verdictNext {
				t.Errorf("verdict = %d, want TCX_NEXT", int32(ret))
			}
			if string(out) != string(in) {
				t.Errorf("packet was modified")
			}
			if got := counter(t, objs, "masq_egress", tt.reason); got != before+1 {
				t.Errorf("%s counter = %d, want %d", tt.reason, got, before+1)
			}
		})
	}
	// Host traffic arriving at the node is not ours to translate.
	in := pkt{proto: layers.IPProtocolTCP, src: testRemote, dst: testNode, sport: 80, dport: 61234, tcpFlags: "SA"}.bytes(t)
	if ret, out := run(t, objs.MasqIngress, in); ret != verdictNext || string(out) != string(in) {
		t.Errorf("ingress without conntrack entry: verdict %d, modified %v", int32(ret), string(out) != string(in))
	}
	if n, err := objs.SbCt.Info(); err == nil {
		_ = n
	}
	flows, _ := Flows(objs.SbCt)
	if len(flows) != 0 {
		t.Errorf("untouched traffic created conntrack entries: %+v", flows)
	}
}

func TestMasqueradeDrops(t *testing.T) {
	cfg := testConfig()
	objs := newTestObjects(t, cfg)
	tests := []struct {
		name   string
		in     pkt
		reason string
	}{
		{"fragment", pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 1, dport: 2, frag: true, payload: []byte("x")}, "drop_fragment"},
		{"unsupported protocol", pkt{proto: layers.IPProtocolICMPv4, src: testPod, dst: testRemote, icmpType: 13}, "drop_unsupported"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if ret, _ := run(t, objs.MasqEgress, tt.in.bytes(t)); ret != verdictDrop {
				t.Errorf("verdict = %d, want TCX_DROP", int32(ret))
			}
			if got := counter(t, objs, "masq_egress", tt.reason); got != 1 {
				t.Errorf("%s counter = %d, want 1", tt.reason, got)
			}
		})
	}
}

func TestMasqueradePortCollision(t *testing.T) {
	cfg := testConfig()
	cfg.PortMin, cfg.PortMax = 61000, 61001 // two ports per remote endpoint
	objs := newTestObjects(t, cfg)

	// Another flow already owns 61000 towards the remote.
	taken := datapathCtKey{Saddr: be32(testRemote), Daddr: be32(testNode), Sport: be16(80), Dport: be16(61000), Proto: 6, Dir: ctRev}
	owner := datapathCtEntry{Addr: be32(netip.MustParseAddr("10.244.9.9")), Port: be16(1111), LastSeen: uint64(Monotonic())}
	if err := objs.SbCt.Put(taken, owner); err != nil {
		t.Fatal(err)
	}
	flow := func(src netip.Addr, sport uint16, dst netip.Addr) []byte {
		return pkt{proto: layers.IPProtocolTCP, src: src, dst: dst, sport: sport, dport: 80, tcpFlags: "S"}.bytes(t)
	}
	ret, out := run(t, objs.MasqEgress, flow(testPod, 40000, testRemote))
	if ret != verdictNext {
		t.Fatalf("first flow verdict = %d", int32(ret))
	}
	if p := parse(t, out); p.sport != 61001 {
		t.Errorf("first flow NAT port = %d, want the free 61001", p.sport)
	}
	// The range is now exhausted for this remote: only this flow fails.
	if ret, _ := run(t, objs.MasqEgress, flow(testPod, 40001, testRemote)); ret != verdictDrop {
		t.Errorf("flow beyond the range: verdict = %d, want TCX_DROP", int32(ret))
	}
	if got := counter(t, objs, "masq_egress", "drop_no_port"); got != 1 {
		t.Errorf("drop_no_port = %d, want 1", got)
	}
	// Ports are per remote endpoint: another destination still works, and
	// so does the established flow.
	if ret, _ := run(t, objs.MasqEgress, flow(testPod, 40001, netip.MustParseAddr("8.8.8.8"))); ret != verdictNext {
		t.Errorf("flow to another remote: verdict = %d, want TCX_NEXT", int32(ret))
	}
	if ret, _ := run(t, objs.MasqEgress, flow(testPod, 40000, testRemote)); ret != verdictNext {
		t.Errorf("existing flow: verdict = %d, want TCX_NEXT", int32(ret))
	}
}

func TestMasqueradeFullTable(t *testing.T) {
	cfg := testConfig()
	cfg.CTSize = 64
	objs := newTestObjects(t, cfg)
	// The table is an LRU: when full, new flows evict the least recently
	// used instead of failing, so no flow is refused wholesale.
	dropsBefore := counter(t, objs, "masq_egress", "drop_ct_full")
	for i := range 200 {
		in := pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: uint16(10000 + i), dport: 53}.bytes(t)
		if ret, _ := run(t, objs.MasqEgress, in); ret != verdictNext {
			t.Fatalf("flow %d: verdict = %d, want TCX_NEXT", i, int32(ret))
		}
	}
	if got := counter(t, objs, "masq_egress", "drop_ct_full"); got != dropsBefore {
		t.Errorf("drop_ct_full = %d", got)
	}
	var (
		k datapathCtKey
		v datapathCtEntry
		n int
	)
	for it := objs.SbCt.Iterate(); it.Next(&k, &v); {
		n++
	}
	if n > int(cfg.CTSize) {
		t.Errorf("table holds %d entries, max %d", n, cfg.CTSize)
	}
	// The newest flow works both ways.
	last := pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 10199, dport: 53}.bytes(t)
	_, out := run(t, objs.MasqEgress, last)
	p := parse(t, out)
	_, back := run(t, objs.MasqIngress, pkt{proto: layers.IPProtocolUDP, src: testRemote, dst: testNode, sport: 53, dport: p.sport}.bytes(t))
	if r := parse(t, back); r.dst != testPod || r.dport != 10199 {
		t.Errorf("reply to newest flow = %v:%d, want %v:10199", r.dst, r.dport, testPod)
	}
}

func TestMasqueradeICMPErrors(t *testing.T) {
	cfg := testConfig()
	objs := newTestObjects(t, cfg)
	router := netip.MustParseAddr("9.9.9.9")

	for _, tt := range []struct {
		name  string
		out   pkt
		quote int // bytes of L4 quoted
	}{
		{"udp port unreachable", pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 7000, dport: 9999, payload: []byte("abc")}, 8},
		{"tcp full quote", pkt{proto: layers.IPProtocolTCP, src: testPod, dst: testRemote, sport: 7001, dport: 80, tcpFlags: "S"}, 20},
		{"echo time exceeded", pkt{proto: layers.IPProtocolICMPv4, src: testPod, dst: testRemote, sport: 77, icmpType: 8}, 8},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, sent := run(t, objs.MasqEgress, tt.out.bytes(t))
			natPort := parse(t, sent).sport
			// A router answers the translated packet with an ICMP error.
			icmpErr := pkt{proto: layers.IPProtocolICMPv4, src: router, dst: testNode, icmpType: 3, inner: quote(sent, tt.quote)}
			if tt.out.proto == layers.IPProtocolICMPv4 {
				icmpErr.icmpType = 11
			}
			ret, back := run(t, objs.MasqIngress, icmpErr.bytes(t))
			if ret != verdictNext {
				t.Fatalf("verdict = %d", int32(ret))
			}
			r := parse(t, back)
			if r.dst != testPod {
				t.Errorf("outer destination = %v, want %v", r.dst, testPod)
			}
			inner := r.l4[8:]
			ihl := int(inner[0]&0xf) * 4
			if sum := csum(0, inner[:ihl]); sum != 0xffff {
				t.Errorf("quoted IPv4 header checksum invalid (sum %#x)", sum)
			}
			if src := netip.AddrFrom4([4]byte(inner[12:16])); src != testPod {
				t.Errorf("quoted source = %v, want %v", src, testPod)
			}
			off := 0
			if tt.out.proto == layers.IPProtocolICMPv4 {
				off = 4
			}
			if port := binary.BigEndian.Uint16(inner[ihl+off:]); port != tt.out.sport {
				t.Errorf("quoted source port = %d, want %d (NAT port was %d)", port, tt.out.sport, natPort)
			}
		})
	}

	t.Run("pod error about a reply", func(t *testing.T) {
		_, sent := run(t, objs.MasqEgress, pkt{proto: layers.IPProtocolUDP, src: testPod, dst: testRemote, sport: 7100, dport: 53}.bytes(t))
		natPort := parse(t, sent).sport
		// The reply as the pod received it, quoted in its port unreachable.
		reply := pkt{proto: layers.IPProtocolUDP, src: testRemote, dst: testPod, sport: 53, dport: 7100}.bytes(t)
		podErr := pkt{proto: layers.IPProtocolICMPv4, src: testPod, dst: testRemote, icmpType: 3, inner: quote(reply, 8)}
		ret, out := run(t, objs.MasqEgress, podErr.bytes(t))
		if ret != verdictNext {
			t.Fatalf("verdict = %d", int32(ret))
		}
		r := parse(t, out)
		inner := r.l4[8:]
		if r.src != testNode || netip.AddrFrom4([4]byte(inner[16:20])) != testNode || binary.BigEndian.Uint16(inner[22:]) != natPort {
			t.Errorf("pod's ICMP error not translated: outer src %v, quoted dst %v:%d, want %v:%d",
				r.src, netip.AddrFrom4([4]byte(inner[16:20])), binary.BigEndian.Uint16(inner[22:]), testNode, natPort)
		}
	})
	if n := counter(t, objs, "masq_ingress", "icmp_error_nat"); n != 3 {
		t.Errorf("ingress icmp_error_nat = %d, want 3", n)
	}
}
