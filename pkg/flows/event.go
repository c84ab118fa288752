// Package flows is Sinabro's flow telemetry: the events the eBPF programs
// send through their shared ring buffer (bpf/lib/flow.h), decoded, named
// (pods, nodes, policies, Services) and kept in a per-node buffer that
// `sinabro observe` reads over a local unix socket; and the metrics
// counted from them.
package flows

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Event types, verdicts and classes as bpf/lib/flow.h numbers them.
const (
	TypeNew       = 1
	TypeDrop      = 2
	TypeTranslate = 3
	TypeService   = 4
	TypeAccelEnd  = 5

	VerdictNone     = 0
	VerdictOpen     = 1
	VerdictAllowed  = 2
	VerdictDenied   = 3
	VerdictDeferred = 4
)

// RawSize is sizeof(struct flow_event) (checked against the object's BTF).
const RawSize = 80

// Raw is one struct flow_event as the kernel wrote it.
type Raw struct {
	TS, Bytes, Cookie uint64
	Src, Dst          netip.Addr
	XSrc, XDst        netip.Addr
	Node              netip.Addr
	Rule              [2]uint32 // [ingress, egress]
	Ifindex           uint32
	Suppressed        uint32
	SPort, DPort      uint16
	XSPort, XDPort    uint16
	Type, Prog        uint8
	Reason, Proto     uint8
	Verdict           [2]uint8
}

// Decode reads one event (host byte order: little-endian, as bpf2go's
// bpfel objects are built; addresses and ports in network order).
func Decode(b []byte) (Raw, error) {
	if len(b) < RawSize {
		return Raw{}, fmt.Errorf("flow event of %d bytes, want %d", len(b), RawSize)
	}
	le := binary.LittleEndian
	addr := func(off int) netip.Addr {
		a := netip.AddrFrom4([4]byte(b[off : off+4]))
		if a.IsUnspecified() {
			return netip.Addr{}
		}
		return a
	}
	port := func(off int) uint16 { return binary.BigEndian.Uint16(b[off:]) }
	return Raw{
		TS: le.Uint64(b[0:]), Bytes: le.Uint64(b[8:]), Cookie: le.Uint64(b[16:]),
		Src: addr(24), Dst: addr(28), XSrc: addr(32), XDst: addr(36), Node: addr(40),
		Rule:    [2]uint32{le.Uint32(b[44:]), le.Uint32(b[48:])},
		Ifindex: le.Uint32(b[52:]), Suppressed: le.Uint32(b[56:]),
		SPort: port(60), DPort: port(62), XSPort: port(64), XDPort: port(66),
		Type: b[68], Prog: b[69], Reason: b[70], Proto: b[71],
		Verdict: [2]uint8{b[72], b[73]},
	}, nil
}
