package sockmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"text/tabwriter"

	"github.com/cilium/ebpf"
)

// Socket is one accelerated socket: its own and its peer's address, the
// kernel's socket cookie and how its sends go (Send*, from the connection
// state; empty when there is none).
type Socket struct {
	Local  netip.AddrPort `json:"local"`
	Remote netip.AddrPort `json:"remote"`
	Cookie uint64         `json:"cookie"`
	Send   string         `json:"send,omitempty"`
}

// A socket's send path, as struct conn_state's mode in bpf/sockops.c.
const (
	SendUndecided = "undecided"          // nothing sent yet
	SendRedirect  = "redirect"           // every send so far went to the peer socket
	SendTCP       = "tcp"                // TCP for good, nothing redirected
	SendTCPAfter  = "tcp after redirect" // TCP for good after redirecting (leaves the sockhash once drained)
)

var sendModes = []string{SendUndecided, SendRedirect, SendTCP, SendTCPAfter}

// Pair is an accelerated connection: both sockets are in the sockhash
// (B is invalid when only A is, e.g. while the other end closes).
type Pair struct {
	A Socket  `json:"a"`
	B *Socket `json:"b,omitempty"`
}

// Sockets lists the sockets in this accelerator's sockhash.
func (a *Accelerator) Sockets() ([]Socket, error) {
	return listSockets(a.objs.SbSockHash, a.objs.SbSockConns)
}

// Pairs lists this accelerator's accelerated connections.
func (a *Accelerator) Pairs() ([]Pair, error) {
	s, err := a.Sockets()
	if err != nil {
		return nil, err
	}
	return pairs(s), nil
}

// ListPairs lists the accelerated connections pinned under root, for
// `sinabro debug`; no acceleration under root yields none.
func ListPairs(root string) ([]Pair, error) {
	path := filepath.Join(mapsDir(root), "sb_sock_hash")
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	defer m.Close()
	// The connection state only adds each socket's send path.
	conns, _ := ebpf.LoadPinnedMap(filepath.Join(mapsDir(root), "sb_sock_conns"), nil)
	if conns != nil {
		defer conns.Close()
	}
	s, err := listSockets(m, conns)
	if err != nil {
		return nil, err
	}
	return pairs(s), nil
}

// ListStats reads the counters pinned under root.
func ListStats(root string) (Stats, error) {
	path := filepath.Join(mapsDir(root), "sb_sock_counters")
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return Stats{}, fmt.Errorf("load %s: %w", path, err)
	}
	defer m.Close()
	return ReadStats(m)
}

// WriteStatus prints, for `sinabro debug sockmap`, the counters and the
// accelerated connections pinned under root.
func WriteStatus(w io.Writer, root string) error {
	if _, err := os.Stat(mapsDir(root)); errors.Is(err, os.ErrNotExist) {
		_, err := fmt.Fprintf(w, "TCP acceleration: not set up under %s\n", root)
		return err
	}
	enabled := "disabled"
	if Attached(root) {
		enabled = "enabled"
	}
	stats, err := ListStats(root)
	if err != nil {
		return err
	}
	p, err := ListPairs(root)
	if err != nil {
		return err
	}
	return writeStatus(w, enabled, stats, p)
}

func writeStatus(w io.Writer, enabled string, stats Stats, p []Pair) error {
	fmt.Fprintf(w, "TCP acceleration: %s\n\n", enabled)
	// One tabwriter per table, so each aligns on its own.
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "SENDS\tCOUNT\tBYTES\n")
	for _, name := range sortedKeys(stats.Messages) {
		fmt.Fprintf(tw, "%s\t%d\t%d\n", name, stats.Messages[name].Count, stats.Messages[name].Bytes)
	}
	tw.Flush()
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "\nSOCKETS\tCOUNT\n")
	for _, name := range sortedKeys(stats.Sockets) {
		fmt.Fprintf(tw, "%s\t%d\n", name, stats.Sockets[name].Count)
	}
	tw.Flush()
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "\nACCELERATED CONNECTIONS: %d\n", len(p))
	for _, c := range p {
		b, sends := "(peer not in the sockhash)", c.A.Send
		if c.B != nil {
			b, sends = c.B.Local.String(), c.A.Send+" / "+c.B.Send
		}
		fmt.Fprintf(tw, "%s\t<->\t%s\t%s\n", c.A.Local, b, sends)
	}
	return tw.Flush()
}

func sortedKeys(m map[string]Stat) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// listSockets reads the sockhash and, if conns is not nil, each socket's
// send path from the connection state.
func listSockets(m, conns *ebpf.Map) ([]Socket, error) {
	var out []Socket
	var k sockopsSockKey
	var cookie uint64
	it := m.Iterate()
	for it.Next(&k, &cookie) {
		s := Socket{
			Local:  netip.AddrPortFrom(addrFromNative(k.Sip), portFromNative(k.Sport)),
			Remote: netip.AddrPortFrom(addrFromNative(k.Dip), portFromNative(k.Dport)),
			Cookie: cookie,
		}
		if conns != nil {
			ck, side := connKey(k)
			var st sockopsConnState
			if conns.Lookup(ck, &st) == nil && int(st.Mode[side]) < len(sendModes) {
				s.Send = sendModes[st.Mode[side]]
			}
		}
		out = append(out, s)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list sockhash: %w", err)
	}
	return out, nil
}

// connKey is conn_key in bpf/sockops.c: the tuple with the lower
// address:port first, and the side k is on.
func connKey(k sockopsSockKey) (sockopsSockKey, int) {
	l, r := addrFromNative(k.Sip), addrFromNative(k.Dip)
	if c := l.Compare(r); c < 0 || c == 0 && portFromNative(k.Sport) < portFromNative(k.Dport) {
		return k, 0
	}
	return sockopsSockKey{Sip: k.Dip, Dip: k.Sip, Sport: k.Dport, Dport: k.Sport}, 1
}

// pairs matches each socket with its peer (the reversed tuple), sorted.
func pairs(socks []Socket) []Pair {
	type tuple struct{ l, r netip.AddrPort }
	byTuple := map[tuple]Socket{}
	for _, s := range socks {
		byTuple[tuple{s.Local, s.Remote}] = s
	}
	var out []Pair
	seen := map[tuple]bool{}
	for _, s := range socks {
		t := tuple{s.Local, s.Remote}
		if seen[t] {
			continue
		}
		seen[t] = true
		p := Pair{A: s}
		if peer, ok := byTuple[tuple{s.Remote, s.Local}]; ok {
			seen[tuple{s.Remote, s.Local}] = true
			p.B = &peer
			// Show the connecting side (the higher, ephemeral port) second.
			if s.Local.Port() > peer.Local.Port() {
				p.A, p.B = peer, &s
			}
		}
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].A.Local.Compare(out[j].A.Local); c != 0 {
			return c < 0
		}
		return out[i].A.Remote.Compare(out[j].A.Remote) < 0
	})
	return out
}

// Keys hold addresses and ports as native integers whose memory layout is
// network order (__be32, __be16).
func nativeFromBytes(b [4]byte) uint32 { return binary.NativeEndian.Uint32(b[:]) }

func addrFromNative(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func portFromNative(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

// PodEntry is one entry of the pod-prefix map: a socket is accelerated
// when both its addresses' longest matching entries are Accelerated (the
// node's pod CIDRs and opted-out pods' /32s, or opted-in pods' /32s).
type PodEntry struct {
	Prefix      netip.Prefix `json:"prefix"`
	Accelerated bool         `json:"accelerated"`
}

// ListPods lists the pod-prefix map pinned under root, by address.
func ListPods(root string) ([]PodEntry, error) {
	path := filepath.Join(mapsDir(root), "sb_sock_pods")
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	defer m.Close()
	var out []PodEntry
	var k sockopsPodKey
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, PodEntry{Prefix: podPrefix(k), Accelerated: v != 0})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list %s: %w", path, err)
	}
	sort.Slice(out, func(i, j int) bool {
		if c := out[i].Prefix.Addr().Compare(out[j].Prefix.Addr()); c != 0 {
			return c < 0
		}
		return out[i].Prefix.Bits() < out[j].Prefix.Bits()
	})
	return out, nil
}
