package service

import (
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
)

// Row is one frontend as the datapath sees it, for `sinabro debug services`.
type Row struct {
	Name       string        `json:"name"`
	Frontend   string        `json:"frontend"`
	Backends   []string      `json:"backends"`
	Affinity   time.Duration `json:"affinity,omitempty"`
	Translated uint64        `json:"translated"` // connects and datagrams sent to a backend
	Refused    uint64        `json:"refused"`    // refused for want of a backend
}

// List reads the pinned maps under root.
func List(root string) ([]Row, error) {
	open := func(name string) (*ebpf.Map, error) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(root), name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("open %s (is Service load balancing on?): %w", name, err)
		}
		return m, nil
	}
	var maps [4]*ebpf.Map
	for i, name := range []string{"sb_svc_frontends", "sb_svc_backends", "sb_svc_names", "sb_svc_stats"} {
		m, err := open(name)
		if err != nil {
			return nil, err
		}
		defer m.Close()
		maps[i] = m
	}
	frontends, backends, names, stats := maps[0], maps[1], maps[2], maps[3]
	var rows []Row
	var k serviceSvcKey
	var v serviceSvcFrontend
	it := frontends.Iterate()
	for it.Next(&k, &v) {
		r := Row{Frontend: frontendFromKey(k).String()}
		var n serviceSvcName
		if names.Lookup(v.Id, &n) == nil {
			r.Name = nameString(n)
		}
		if v.Flags&uint16(serviceSvcFlagsSVC_F_AFFINITY) != 0 {
			r.Affinity = time.Duration(v.AffinityTimeout) * time.Second
		}
		r.Backends = []string{}
		for slot := uint32(0); slot < uint32(v.Count); slot++ {
			var b serviceSvcBackend
			if backends.Lookup(serviceSvcBackendKey{Set: v.Set, Slot: slot}, &b) == nil {
				r.Backends = append(r.Backends, backendFrom(b).String())
			}
		}
		var per []serviceSvcStat
		if stats.Lookup(v.Id, &per) == nil {
			for _, s := range per {
				r.Translated += s.Translated
				r.Refused += s.Refused
			}
		}
		rows = append(rows, r)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read frontends: %w", err)
	}
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].Name != rows[j].Name {
			return rows[i].Name < rows[j].Name
		}
		return rows[i].Frontend < rows[j].Frontend
	})
	return rows, nil
}

// Counters reads the socket-call counters under root, by reason name
// (the names of enum svc_reason in bpf/service.c, lower case).
func Counters(root string) (map[string]uint64, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(root), "sb_svc_counters"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer m.Close()
	return readCounters(m)
}

func readCounters(m *ebpf.Map) (map[string]uint64, error) {
	names, err := reasonNames()
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	var errs []error
	for r, name := range names {
		var per []uint64
		if err := m.Lookup(r, &per); err != nil {
			errs = append(errs, err)
			continue
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out[name] = sum
	}
	return out, errors.Join(errs...)
}

// reasonNames names the counters from enum svc_reason in the object's
// BTF: SVC_NO_BACKEND is "no_backend".
func reasonNames() (map[uint32]string, error) {
	spec, err := loadService()
	if err != nil {
		return nil, err
	}
	return bpffs.EnumNames(spec, "svc_reason", "SVC_", uint64(serviceSvcReasonSVC_REASON_MAX))
}
