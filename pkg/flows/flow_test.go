package flows

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"
	"time"
)

type testNamer struct{}

func (testNamer) Pod(ip netip.Addr) (string, string) {
	switch ip.String() {
	case "10.244.1.5":
		return "web", "front"
	case "10.244.2.7":
		return "db", "pg"
	}
	return "", ""
}

func (testNamer) Node(ip netip.Addr) string {
	if ip.String() == "192.168.1.12" {
		return "node-2"
	}
	return ""
}

func (testNamer) Rule(id uint32) (string, string) {
	if id == 101 {
		return "db/allow-web", "ingress rule 0"
	}
	return "", ""
}

func (testNamer) Policy(id uint32) string {
	if id == 7 {
		return "db/deny-all"
	}
	return ""
}

func (testNamer) Service(ip netip.Addr, port uint16, proto string) string {
	if ip.String() == "10.96.0.10" && port == 53 && proto == "UDP" {
		return "kube-system/kube-dns"
	}
	return ""
}

// raw builds a struct flow_event as the kernel writes it.
func raw(typ, reason, proto uint8, src, dst string, sport, dport uint16, fill func(b []byte)) []byte {
	b := make([]byte, RawSize)
	copy(b[24:], netip.MustParseAddr(src).AsSlice())
	copy(b[28:], netip.MustParseAddr(dst).AsSlice())
	binary.BigEndian.PutUint16(b[60:], sport)
	binary.BigEndian.PutUint16(b[62:], dport)
	b[68], b[70], b[71] = typ, reason, proto
	binary.LittleEndian.PutUint64(b[0:], uint64(5*time.Second))
	if fill != nil {
		fill(b)
	}
	return b
}

// TestBuild decodes events and names them: a new flow encapsulated to a
// node with its ingress rule, a policy drop, a Service translation; then
// the human line and the filters.
func TestBuild(t *testing.T) {
	names := Names{Reasons: map[uint32]string{14: "encap", 28: "drop_policy"}, Programs: map[uint32]string{2: "host_route"}}
	boot := time.Unix(1000, 0)
	build := func(b []byte) Flow {
		r, err := Decode(b)
		if err != nil {
			t.Fatal(err)
		}
		return Build(r, "node-1", boot, names, testNamer{})
	}
	nw := build(raw(TypeNew, 14, 6, "10.244.1.5", "10.244.2.7", 40000, 5432, func(b []byte) {
		copy(b[40:], netip.MustParseAddr("192.168.1.12").AsSlice())
		binary.LittleEndian.PutUint32(b[44:], 101)
		b[72], b[73], b[69] = VerdictAllowed, VerdictOpen, 2
	}))
	if nw.Type != "new" || nw.Verdict != "forwarded" || nw.Path != "encap" || nw.OverlayNode != "node-2" || nw.Program != "host_route" ||
		nw.Source.Pod != "front" || nw.Destination.Namespace != "db" || nw.Ingress == nil || nw.Ingress.Policy != "db/allow-web" ||
		nw.Egress == nil || nw.Egress.Verdict != "open" || !nw.Time.Equal(boot.Add(5*time.Second)) {
		t.Errorf("new flow = %+v", nw)
	}
	line := nw.String()
	for _, want := range []string{"web/front 10.244.1.5:40000 -> db/pg 10.244.2.7:5432 TCP encap to node node-2", "ingress allowed by db/allow-web (ingress rule 0)"} {
		if !strings.Contains(line, want) {
			t.Errorf("line %q lacks %q", line, want)
		}
	}
	drop := build(raw(TypeDrop, 28, 17, "10.244.1.5", "10.244.2.7", 40001, 5432, func(b []byte) {
		binary.LittleEndian.PutUint32(b[44:], 7)
		b[72] = VerdictDenied
	}))
	if drop.DropReason != "drop_policy" || drop.Ingress == nil || drop.Ingress.Verdict != "denied" || drop.Ingress.Policy != "db/deny-all" {
		t.Errorf("drop = %+v", drop)
	}
	svc := build(raw(TypeService, 0, 17, "0.0.0.0", "10.96.0.10", 0, 53, func(b []byte) {
		copy(b[36:], netip.MustParseAddr("10.244.2.7").AsSlice())
		binary.BigEndian.PutUint16(b[66:], 5353)
	}))
	if svc.Service != "kube-system/kube-dns" || svc.Source.IP.IsValid() || svc.TranslatedDestination == nil || svc.TranslatedDestination.Pod != "pg" ||
		svc.TranslatedDestination.Port != 5353 {
		t.Errorf("service = %+v", svc)
	}

	for _, c := range []struct {
		f    Filter
		want [3]bool // new, drop, service
	}{
		{Filter{}, [3]bool{true, true, true}},
		{Filter{Pod: "db/pg"}, [3]bool{true, true, true}}, // the Service's backend too
		{Filter{Pod: "front"}, [3]bool{true, true, false}},
		{Filter{Namespace: "web", Protocol: "udp"}, [3]bool{false, true, false}},
		{Filter{Verdict: "denied"}, [3]bool{false, true, false}},
		{Filter{Verdict: "allowed"}, [3]bool{true, false, false}},
		{Filter{Verdict: "translated"}, [3]bool{false, false, true}},
		{Filter{Port: 5353}, [3]bool{false, false, true}},
		{Filter{IP: "10.96.0.10"}, [3]bool{false, false, true}},
		{Filter{DropReason: "drop_policy"}, [3]bool{false, true, false}},
		{Filter{Type: "new", Node: "node-1"}, [3]bool{true, false, false}},
		{Filter{Node: "node-2"}, [3]bool{false, false, false}},
	} {
		for i, f := range []*Flow{&nw, &drop, &svc} {
			if got := c.f.Match(f); got != c.want[i] {
				t.Errorf("%+v matches %s: %v, want %v", c.f, f.Type, got, c.want[i])
			}
		}
	}
	for _, bad := range []Filter{{IP: "10.0.0"}, {Protocol: "gre"}, {Verdict: "maybe"}, {Type: "old"}} {
		if bad.Validate() == nil {
			t.Errorf("%+v: no error", bad)
		}
	}
	if _, err := Decode(make([]byte, RawSize-1)); err == nil {
		t.Error("a short event decoded")
	}
}
