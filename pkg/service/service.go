package service

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
)

// Protocol is an IP protocol number a frontend answers on.
type Protocol uint8

const (
	TCP  Protocol = unix.IPPROTO_TCP
	UDP  Protocol = unix.IPPROTO_UDP
	SCTP Protocol = unix.IPPROTO_SCTP
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	case SCTP:
		return "SCTP"
	}
	return fmt.Sprintf("proto-%d", uint8(p))
}

// Frontend is where a Service answers: an address (ClusterIP, external IP,
// load-balancer IP) and port, or, with NodePort set and Addr invalid, a
// port on every address of the node.
type Frontend struct {
	Addr     netip.Addr
	Port     uint16
	Proto    Protocol
	NodePort bool
}

func (f Frontend) String() string {
	if f.NodePort {
		return fmt.Sprintf("*:%d/%s", f.Port, f.Proto)
	}
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.Addr, f.Port), f.Proto)
}

// Backend is one endpoint address and port.
type Backend = netip.AddrPort

// Entry is what a frontend does.
type Entry struct {
	// Name is "namespace/name:port", shown by `sinabro debug services`.
	Name string
	// Backends to choose from; none refuses connections at once.
	Backends []Backend
	// Affinity, when positive, keeps each client (network namespace) on
	// the backend it got for this long after its last connection
	// (sessionAffinity: ClientIP).
	Affinity time.Duration
}

// Equal reports whether two entries program the same.
func (e Entry) Equal(o Entry) bool {
	return e.Name == o.Name && e.Affinity == o.Affinity && slices.Equal(e.Backends, o.Backends)
}

// Config describes where load balancing runs.
type Config struct {
	// BPFRoot is the agent's bpffs directory; pins go to BPFRoot/service.
	BPFRoot string
	// CgroupPath is the cgroup v2 directory whose sockets (its own and its
	// descendants') see Services: the node's root cgroup in a cluster.
	CgroupPath string
}

const (
	linkConnect     = "connect4"
	linkSendmsg     = "sendmsg4"
	linkRecvmsg     = "recvmsg4"
	linkGetpeername = "getpeername4"
)

func dir(root string) string      { return filepath.Join(root, "service") }
func mapsDir(root string) string  { return filepath.Join(dir(root), "maps") }
func linksDir(root string) string { return filepath.Join(dir(root), "links") }

// maxFrontends is the size of the frontend, name and per-frontend counter
// maps in bpf/service.c; frontend ids are below it.
const maxFrontends = 131072

// programmed is a frontend as the maps hold it.
type programmed struct {
	id    uint32
	set   uint32
	entry Entry
}

// LoadBalancer is a loaded and attached Service load balancer.
type LoadBalancer struct {
	cfg   Config
	objs  serviceObjects
	links []link.Link

	mu      sync.Mutex
	term    *terminator // loaded on the first TerminateUDP
	termErr error       // ErrTerminateUnsupported, once found
	state   map[Frontend]programmed
	freeIDs []uint32 // ids released by deleted frontends
	nextID  uint32   // lowest id never used
	nextSet uint32
}

// Enable loads the programs, adopts or creates the pinned maps, reads back
// what they hold (Sync then writes only differences) and attaches, or
// re-points, the four cgroup links.
func Enable(ctx context.Context, cfg Config) (*LoadBalancer, error) {
	switch {
	case cfg.BPFRoot == "":
		return nil, errors.New("service config: BPFRoot is required")
	case cfg.CgroupPath == "":
		return nil, errors.New("service config: CgroupPath is required")
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := bpffs.Ensure(cfg.BPFRoot, mapsDir(cfg.BPFRoot), linksDir(cfg.BPFRoot)); err != nil {
		return nil, err
	}
	spec, err := loadService()
	if err != nil {
		return nil, fmt.Errorf("load service spec: %w", err)
	}
	lb := &LoadBalancer{cfg: cfg, state: map[Frontend]programmed{}, nextID: 1, nextSet: 1}
	// Node addresses are written again right after; everything else is
	// adopted (frontends keep answering while the agent restarts).
	if err := bpffs.LoadPinnedShared(spec, &lb.objs, mapsDir(cfg.BPFRoot), bpffs.SharedDir(cfg.BPFRoot), "service", ebpf.ProgramOptions{}, "sb_svc_node_addrs"); err != nil {
		return nil, err
	}
	if err := lb.adopt(); err != nil {
		lb.Close()
		return nil, err
	}
	for _, p := range []struct {
		name   string
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{linkConnect, lb.objs.SvcConnect4, ebpf.AttachCGroupInet4Connect},
		{linkSendmsg, lb.objs.SvcSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{linkRecvmsg, lb.objs.SvcRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
		{linkGetpeername, lb.objs.SvcGetpeername4, ebpf.AttachCgroupInet4GetPeername},
	} {
		l, err := bpffs.AttachCgroup(filepath.Join(linksDir(cfg.BPFRoot), p.name), cfg.CgroupPath, p.prog, p.attach)
		if err != nil {
			lb.Close()
			return nil, err
		}
		lb.links = append(lb.links, l)
	}
	return lb, nil
}

// adopt reads the frontends, names and backend sets already pinned.
func (lb *LoadBalancer) adopt() error {
	var (
		k   serviceSvcKey
		v   serviceSvcFrontend
		max uint32
	)
	used := map[uint32]bool{}
	it := lb.objs.SbSvcFrontends.Iterate()
	for it.Next(&k, &v) {
		fe := frontendFromKey(k)
		p := programmed{id: v.Id, set: v.Set, entry: Entry{Affinity: time.Duration(v.AffinityTimeout) * time.Second}}
		if v.Flags&uint16(serviceSvcFlagsSVC_F_AFFINITY) == 0 {
			p.entry.Affinity = 0
		}
		var n serviceSvcName
		if err := lb.objs.SbSvcNames.Lookup(v.Id, &n); err == nil {
			p.entry.Name = nameString(n)
		}
		for slot := uint32(0); slot < uint32(v.Count); slot++ {
			var b serviceSvcBackend
			if err := lb.objs.SbSvcBackends.Lookup(serviceSvcBackendKey{Set: v.Set, Slot: slot}, &b); err != nil {
				return fmt.Errorf("read backend %d of %s: %w", slot, fe, err)
			}
			p.entry.Backends = append(p.entry.Backends, backendFrom(b))
		}
		lb.state[fe] = p
		used[v.Id] = true
		max = maxOf(max, v.Id)
		lb.nextSet = maxOf(lb.nextSet, v.Set+1)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read service frontends: %w", err)
	}
	lb.nextID = max + 1
	for id := uint32(1); id < lb.nextID; id++ {
		if !used[id] {
			lb.freeIDs = append(lb.freeIDs, id)
		}
	}
	// Sets no frontend points at are left from a crash mid-update.
	var bk serviceSvcBackendKey
	var bv serviceSvcBackend
	var orphans []serviceSvcBackendKey
	live := map[uint32]bool{}
	for _, p := range lb.state {
		live[p.set] = true
	}
	bit := lb.objs.SbSvcBackends.Iterate()
	for bit.Next(&bk, &bv) {
		if !live[bk.Set] {
			orphans = append(orphans, bk)
		}
		lb.nextSet = maxOf(lb.nextSet, bk.Set+1)
	}
	if err := bit.Err(); err != nil {
		return fmt.Errorf("read service backends: %w", err)
	}
	for _, k := range orphans {
		lb.objs.SbSvcBackends.Delete(k)
	}
	return nil
}

func maxOf(a, b uint32) uint32 {
	if a > b {
		return a
	}
	return b
}

// SyncStats says what one Sync wrote.
type SyncStats struct {
	Frontends int // frontends programmed after the sync
	Written   int // frontends created or changed
	Deleted   int
	// GoneUDP: backends that left UDP frontends, for TerminateUDP.
	GoneUDP []Gone
}

// Sync makes the programmed frontends exactly desired. Frontends whose
// entry did not change are not touched.
func (lb *LoadBalancer) Sync(desired map[Frontend]Entry) (SyncStats, error) {
	lb.mu.Lock()
	defer lb.mu.Unlock()
	var st SyncStats
	var errs []error
	for fe, e := range desired {
		if fe.Port == 0 || (!fe.NodePort && !fe.Addr.Is4()) {
			continue // IPv6 frontends: not served yet
		}
		cur, ok := lb.state[fe]
		if ok && cur.entry.Equal(e) {
			continue
		}
		if err := lb.write(fe, e); err != nil {
			errs = append(errs, err)
			continue
		}
		st.Written++
		st.GoneUDP = append(st.GoneUDP, goneOf(fe, cur.entry.Backends, e.Backends)...)
	}
	for fe := range lb.state {
		if _, ok := desired[fe]; ok {
			continue
		}
		gone := goneOf(fe, lb.state[fe].entry.Backends, nil)
		if err := lb.remove(fe); err != nil {
			errs = append(errs, err)
			continue
		}
		st.Deleted++
		st.GoneUDP = append(st.GoneUDP, gone...)
	}
	st.Frontends = len(lb.state)
	return st, errors.Join(errs...)
}

// write programs one frontend: the new backend set first, then the
// frontend pointing at it, then the old set goes.
func (lb *LoadBalancer) write(fe Frontend, e Entry) error {
	backends := e.Backends
	if len(backends) > 0xffff {
		backends = backends[:0xffff]
	}
	cur, exists := lb.state[fe]
	id := cur.id
	if !exists {
		switch {
		case len(lb.freeIDs) > 0:
			id = lb.freeIDs[len(lb.freeIDs)-1]
			lb.freeIDs = lb.freeIDs[:len(lb.freeIDs)-1]
		case lb.nextID < maxFrontends:
			id = lb.nextID
			lb.nextID++
		default:
			return fmt.Errorf("program %s: all %d frontends in use", fe, maxFrontends-1)
		}
		// A new frontend starts its counters at zero.
		zero := make([]serviceSvcStat, ebpfPossibleCPUs())
		lb.objs.SbSvcStats.Put(id, zero)
	}
	set := lb.nextSet
	lb.nextSet++
	for i, b := range backends {
		if err := lb.objs.SbSvcBackends.Put(serviceSvcBackendKey{Set: set, Slot: uint32(i)}, backendValue(b)); err != nil {
			lb.deleteSet(set, i)
			if !exists {
				lb.freeIDs = append(lb.freeIDs, id)
			}
			return fmt.Errorf("write backend %s of %s: %w", b, fe, err)
		}
	}
	if err := lb.objs.SbSvcNames.Put(id, nameValue(e.Name)); err != nil {
		return fmt.Errorf("write name of %s: %w", fe, err)
	}
	v := serviceSvcFrontend{Id: id, Set: set, Count: uint16(len(backends))}
	if e.Affinity > 0 {
		v.Flags |= uint16(serviceSvcFlagsSVC_F_AFFINITY)
		v.AffinityTimeout = uint32(max(e.Affinity/time.Second, 1))
	}
	if err := lb.objs.SbSvcFrontends.Put(keyOf(fe), v); err != nil {
		lb.deleteSet(set, len(backends))
		return fmt.Errorf("write frontend %s: %w", fe, err)
	}
	if exists {
		lb.deleteSet(cur.set, len(cur.entry.Backends))
	}
	lb.state[fe] = programmed{id: id, set: set, entry: Entry{Name: e.Name, Backends: slices.Clone(backends), Affinity: e.Affinity}}
	return nil
}

func (lb *LoadBalancer) remove(fe Frontend) error {
	cur := lb.state[fe]
	if err := lb.objs.SbSvcFrontends.Delete(keyOf(fe)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete frontend %s: %w", fe, err)
	}
	lb.deleteSet(cur.set, len(cur.entry.Backends))
	lb.objs.SbSvcNames.Delete(cur.id)
	delete(lb.state, fe)
	lb.freeIDs = append(lb.freeIDs, cur.id)
	return nil
}

func (lb *LoadBalancer) deleteSet(set uint32, n int) {
	for i := range n {
		lb.objs.SbSvcBackends.Delete(serviceSvcBackendKey{Set: set, Slot: uint32(i)})
	}
}

// SetNodeAddrs makes addrs the node addresses where NodePorts answer
// (loopback always does).
func (lb *LoadBalancer) SetNodeAddrs(addrs []netip.Addr) error {
	want := map[uint32]bool{}
	for _, a := range addrs {
		if a.Is4() {
			want[addrKey(a)] = true
		}
	}
	var errs []error
	for k := range want {
		if err := lb.objs.SbSvcNodeAddrs.Put(k, uint8(1)); err != nil {
			errs = append(errs, fmt.Errorf("write node address: %w", err))
		}
	}
	var k uint32
	var v uint8
	var stale []uint32
	it := lb.objs.SbSvcNodeAddrs.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	for _, k := range stale {
		lb.objs.SbSvcNodeAddrs.Delete(k)
	}
	return errors.Join(append(errs, it.Err())...)
}

// Close releases the process's handles; load balancing keeps running.
func (lb *LoadBalancer) Close() error {
	var errs []error
	for _, l := range lb.links {
		errs = append(errs, l.Close())
	}
	lb.links = nil
	if lb.term != nil {
		errs = append(errs, lb.term.close())
		lb.term = nil
	}
	errs = append(errs, lb.objs.Close())
	return errors.Join(errs...)
}

// Disable detaches the programs under root (new sockets are no longer
// translated; connected ones keep their backend) and keeps the maps for a
// later Enable. A root without them is not an error.
func Disable(ctx context.Context, root string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var errs []error
	for _, name := range []string{linkConnect, linkSendmsg, linkRecvmsg, linkGetpeername} {
		errs = append(errs, bpffs.UnpinLink(filepath.Join(linksDir(root), name)))
	}
	return errors.Join(errs...)
}

// Attached reports whether the programs are attached under root.
func Attached(root string) bool {
	_, err := os.Stat(filepath.Join(linksDir(root), linkConnect))
	return err == nil
}

// Cleanup detaches the programs and removes every pin under root/service.
func Cleanup(root string) error {
	err := Disable(context.Background(), root)
	if rerr := os.RemoveAll(dir(root)); rerr != nil {
		err = errors.Join(err, fmt.Errorf("remove %s: %w", dir(root), rerr))
	}
	return errors.Join(err, bpffs.RemoveSharedIfAlone(root))
}

// Map encodings: addresses and ports are kept in network byte order, as
// the socket context carries them.

func addrKey(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func addrFrom(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func portKey(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func portFrom(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

func keyOf(fe Frontend) serviceSvcKey {
	k := serviceSvcKey{Port: portKey(fe.Port), Proto: uint8(fe.Proto), Scope: uint8(serviceSvcScopeSVC_SCOPE_ADDR)}
	if fe.NodePort {
		k.Scope = uint8(serviceSvcScopeSVC_SCOPE_NODEPORT)
	} else {
		k.Addr = addrKey(fe.Addr)
	}
	return k
}

func frontendFromKey(k serviceSvcKey) Frontend {
	fe := Frontend{Port: portFrom(k.Port), Proto: Protocol(k.Proto)}
	if k.Scope == uint8(serviceSvcScopeSVC_SCOPE_NODEPORT) {
		fe.NodePort = true
	} else {
		fe.Addr = addrFrom(k.Addr)
	}
	return fe
}

func backendValue(b Backend) serviceSvcBackend {
	return serviceSvcBackend{Addr: addrKey(b.Addr()), Port: portKey(b.Port())}
}

func backendFrom(b serviceSvcBackend) Backend {
	return netip.AddrPortFrom(addrFrom(b.Addr), portFrom(b.Port))
}

func nameValue(s string) serviceSvcName {
	var n serviceSvcName
	for i := 0; i < len(s) && i < len(n.Name)-1; i++ {
		n.Name[i] = int8(s[i])
	}
	return n
}

func nameString(n serviceSvcName) string {
	b := make([]byte, 0, len(n.Name))
	for _, c := range n.Name {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

func ebpfPossibleCPUs() int {
	n, err := ebpf.PossibleCPU()
	if err != nil || n < 1 {
		return 1
	}
	return n
}

// Supported loads the programs and maps once, unpinned, and frees them:
// nil when this kernel runs Service load balancing (cgroup sock_addr
// programs for connect4, sendmsg4, recvmsg4 and getpeername4, and
// bpf_set_retval: Linux 5.18).
func Supported() error {
	spec, err := loadService()
	if err != nil {
		return err
	}
	var objs serviceObjects
	if err := bpffs.LoadPinned(spec, &objs, "", "service"); err != nil {
		return err
	}
	return objs.Close()
}
