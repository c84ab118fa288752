package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"

	"github.com/cilium/ebpf"
)

// DefaultBPFRoot is the agent's default pin root.
const DefaultBPFRoot = "/sys/fs/bpf/sinabro"

// MapInfo describes one pinned datapath map.
type MapInfo struct {
	Name       string `json:"name"`
	Type       string `json:"type"`
	Entries    int    `json:"entries"`
	MaxEntries uint32 `json:"maxEntries"`
	PinPath    string `json:"pinPath"`
}

// ListMaps describes every map pinned under root.
func ListMaps(root string) ([]MapInfo, error) {
	dir := mapsDir(root)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no datapath pinned under %s (wrong --bpf-root, or bpffs not mounted here?): %w", root, err)
	}
	if err != nil {
		return nil, fmt.Errorf("list pinned maps: %w", err)
	}
	var out []MapInfo
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w", path, err)
		}
		info, err := describeMap(m, e.Name(), path)
		m.Close()
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func describeMap(m *ebpf.Map, name, path string) (MapInfo, error) {
	info := MapInfo{Name: name, Type: m.Type().String(), MaxEntries: m.MaxEntries(), PinPath: path}
	switch m.Type() {
	case ebpf.Array, ebpf.PerCPUArray:
		info.Entries = int(m.MaxEntries()) // arrays are always full
		return info, nil
	case ebpf.RingBuf:
		return info, nil // a stream: no entries to count
	}
	key := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	var prev any // nil: start from the first key
	for {
		err := m.NextKey(prev, &next)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return info, nil
		}
		if err != nil {
			return info, fmt.Errorf("count entries of %s: %w", name, err)
		}
		info.Entries++
		if info.Entries > int(m.MaxEntries())*2 { // a map changing under us
			return info, nil
		}
		copy(key, next)
		prev = key
	}
}

// OpenMap opens the map pinned under root by name, read-only.
func OpenMap(root, name string) (*ebpf.Map, error) {
	path := filepath.Join(mapsDir(root), name)
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open pinned map %s: %w", path, err)
	}
	return m, nil
}

// CIDR is one entry of the masquerade prefixes map.
type CIDR struct {
	Prefix netip.Prefix `json:"prefix"`
	Pod    bool         `json:"pod"`
	NoMasq bool         `json:"noMasquerade"`
}

// CIDRs lists the masquerade prefixes map.
func CIDRs(m *ebpf.Map) ([]CIDR, error) {
	var (
		k   datapathLpmV4Key
		v   uint32
		out []CIDR
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, CIDR{Prefix: prefixFromKey(k), Pod: v&cidrPod != 0, NoMasq: v&cidrNoMasq != 0})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list masquerade CIDRs: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Prefix.String() < out[j].Prefix.String() })
	return out, nil
}

// ProtoName names an IP protocol number.
func ProtoName(p uint8) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	}
	return fmt.Sprintf("proto-%d", p)
}
