package service

import (
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
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
		out[strings.ToLower(strings.TrimPrefix(name, "SVC_"))] = sum
	}
	return out, errors.Join(errs...)
}

// reasonNames reads enum svc_reason from the object's BTF, so the names
// come from the C source alone: value → "SVC_…".
func reasonNames() (map[uint32]string, error) {
	spec, err := loadService()
	if err != nil {
		return nil, err
	}
	var e *btf.Enum
	if err := spec.Types.TypeByName("svc_reason", &e); err != nil {
		return nil, fmt.Errorf("find enum svc_reason: %w", err)
	}
	out := map[uint32]string{}
	for _, v := range e.Values {
		if uint32(v.Value) < uint32(serviceSvcReasonSVC_REASON_MAX) {
			out[uint32(v.Value)] = v.Name
		}
	}
	return out, nil
}

// Counters of this load balancer.
func (lb *LoadBalancer) Counters() (map[string]uint64, error) {
	return readCounters(lb.objs.SbSvcCounters)
}
