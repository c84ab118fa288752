// Package datapath loads, pins, adopts and attaches sinabro's eBPF
// datapath: masquerading on the node's uplink with its conntrack table,
// host routing between local pods, and per-program counters.
//
// Everything lives under one bpffs root per agent (Config.BPFRoot):
//
//	<root>/maps/<map name>   maps, pinned by name (LIBBPF_PIN_BY_NAME)
//	<root>/links/<program>   tcx links, or with classic tc the programs
//	                         of the cls_bpf filters (see AttachMode)
//
// A restarted agent adopts what it finds there: maps keep their contents
// (conntrack is never flushed at start) and links are switched to the newly
// loaded programs atomically with link.Update (classic tc: the filter is
// replaced in place), so traffic never sees a detached interface.
//
// The agent, running in the node's network namespace, uses it like this:
//
//	d, err := datapath.Load(ctx, datapath.Config{
//		BPFRoot: root, UplinkIfindex: uplink, NodeIP: nodeIP,
//		ClusterCIDRs: clusterCIDRs, NonMasqCIDRs: append(nonMasq, nodeIPs...),
//	})
//	defer d.Close()                                 // leaves the datapath running
//	prometheus.MustRegister(d.Collector())
//	g.Go(func() error { return d.RunGC(ctx, 10*time.Second, logf) })
//	d.SetCIDRs(clusterCIDRs, append(nonMasq, nodeIPs...)) // node set changed
//	d.UpsertEndpoint(ep); d.AttachHostVeth(ep.Ifindex)    // per local pod
//
// and a full teardown (uninstall) calls Cleanup(root).
package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
)

// Defaults for Config fields left zero.
const (
	// DefaultCTSize is the number of conntrack entries; each flow uses two.
	DefaultCTSize = 1 << 18
	// DefaultPortMin and DefaultPortMax bound the masquerade source ports.
	// They sit above Linux's default ephemeral range (32768-60999) so the
	// node's own connections do not compete for the same ports.
	DefaultPortMin = 61000
	DefaultPortMax = 65535
)

// Config describes the datapath of one node.
type Config struct {
	// BPFRoot is this agent's directory on bpffs, e.g. /sys/fs/bpf/sinabro.
	// Agents sharing a kernel (the lab) need distinct roots.
	BPFRoot string
	// UplinkIfindex is the interface, in the caller's network namespace,
	// whose egress masquerades and whose ingress translates replies back.
	UplinkIfindex int
	// NodeIP is the address pod traffic is masqueraded to.
	NodeIP netip.Addr
	// ClusterCIDRs hold pod addresses: their traffic is masqueraded, and it
	// never is when sent to them.
	ClusterCIDRs []netip.Prefix
	// NonMasqCIDRs are further destinations reached without masquerading
	// (node addresses, service ranges, peered networks).
	NonMasqCIDRs []netip.Prefix
	// PortMin and PortMax bound the NAT source ports (and ICMP echo ids).
	PortMin, PortMax uint16
	// CTSize is the conntrack table's capacity in entries (two per flow).
	// An existing pinned table keeps its size: resizing needs Cleanup.
	CTSize uint32
	// Timeouts for conntrack GC; zero fields take the defaults.
	Timeouts Timeouts
	// VXLANPort and VXLANVNI identify the overlay's packets. With a port
	// set, the uplink's ingress decapsulates those for local pods itself
	// and hands them straight to the pod (see bpf/lib/tunnel.h); zero
	// leaves every VXLAN packet to the vxlan device.
	VXLANPort uint16
	VXLANVNI  uint32
	// RouteOut lets host routing send pod traffic for the outside straight
	// out of the uplink (FIB and neighbour lookups in eBPF) instead of
	// through the node's IP forwarding. Only with masquerading done here
	// or not at all: it skips the stack's netfilter hooks, nftables
	// masquerade included.
	RouteOut bool
	// KernelCT makes host routing, decapsulation and masquerading's
	// reverse path ask the kernel's conntrack for each TCP/UDP packet and
	// leave flows the kernel translated (kube-proxy's Services, portmap's
	// hostPorts, any netfilter NAT) to the stack, which must undo the
	// translation (bpf/lib/kct.h). Load fails with ErrNoKernelCT where the
	// kernel lacks the conntrack kfuncs.
	KernelCT bool
	// Policy turns on NetworkPolicy enforcement (bpf/lib/policy.h): the
	// checks in host routing and a program on each host veth's egress.
	// The agent fills its maps (SetPolicy); an empty state allows all.
	Policy bool
	// Attach is how programs attach to interfaces; "" is AttachAuto,
	// which Load resolves to AttachTCX or AttachClassic.
	Attach AttachMode
}

func (c *Config) setDefaults() {
	if c.PortMin == 0 && c.PortMax == 0 {
		c.PortMin, c.PortMax = DefaultPortMin, DefaultPortMax
	}
	if c.CTSize == 0 {
		c.CTSize = DefaultCTSize
	}
	c.Timeouts.setDefaults()
	if c.Attach == "" {
		c.Attach = AttachAuto
	}
}

func (c *Config) validate() error {
	switch {
	case c.BPFRoot == "":
		return errors.New("BPFRoot is required")
	case c.UplinkIfindex <= 0:
		return fmt.Errorf("invalid uplink ifindex %d", c.UplinkIfindex)
	case !c.NodeIP.Is4():
		return fmt.Errorf("node IP %v is not IPv4", c.NodeIP)
	case c.PortMin == 0 || c.PortMin > c.PortMax:
		return fmt.Errorf("invalid port range %d-%d", c.PortMin, c.PortMax)
	case c.CTSize < 2:
		return fmt.Errorf("conntrack size %d is too small", c.CTSize)
	case c.VXLANVNI >= 1<<24:
		return fmt.Errorf("VXLAN VNI %d does not fit in 24 bits", c.VXLANVNI)
	}
	if _, err := ParseAttachMode(string(c.Attach)); err != nil {
		return err
	}
	for _, p := range append(append([]netip.Prefix(nil), c.ClusterCIDRs...), c.NonMasqCIDRs...) {
		if !p.IsValid() || !p.Addr().Is4() {
			return fmt.Errorf("prefix %v is not IPv4", p)
		}
	}
	return nil
}

// Datapath is a loaded and attached datapath. Close releases this process's
// handles; the pinned datapath keeps forwarding.
type Datapath struct {
	cfg   Config
	objs  datapathObjects
	links map[string]attachment
	// tc programs classic tc and removes filters left by the other mode;
	// opened by Load, so in the uplink's network namespace.
	tc *tcConn
	gc gcStats
}

// Pin-path layout under the root.
func mapsDir(root string) string  { return filepath.Join(root, "maps") }
func linksDir(root string) string { return filepath.Join(root, "links") }

// FlowMaps creates, or adopts, the flow telemetry maps the datapath shares
// with the other objects (bpf/lib/flow.h) under root: sb_flow_events,
// sb_flow_cfg, sb_flow_state.
func FlowMaps(root string) (map[string]*ebpf.Map, error) {
	spec, err := loadDatapath()
	if err != nil {
		return nil, fmt.Errorf("load datapath spec: %w", err)
	}
	return bpffs.OpenShared(spec, bpffs.SharedDir(root))
}

// FlowNames are the names flow events carry as numbers (from the object's
// BTF, as the counters' metrics).
func FlowNames() (map[uint32]string, map[uint32]string, error) {
	spec, err := loadDatapath()
	if err != nil {
		return nil, nil, fmt.Errorf("load datapath spec: %w", err)
	}
	progs, err := bpffs.EnumNames(spec, "prog_id", "PROG_", uint64(programSlots))
	if err != nil {
		return nil, nil, err
	}
	reasons, err := bpffs.EnumNames(spec, "reason", "REASON_", uint64(reasonSlots))
	return progs, reasons, err
}

// sharedDir holds the maps shared with the other objects (flow telemetry),
// for a pinDir under an agent's root; none for unpinned loads (tests).
func sharedDir(pinDir string) string {
	if pinDir == "" {
		return ""
	}
	return bpffs.SharedDir(filepath.Dir(pinDir))
}

// Load loads the datapath programs, creates or adopts the pinned maps under
// cfg.BPFRoot and attaches (or atomically re-points) the uplink's programs
// with tcx or classic tc (cfg.Attach). It must run in the network namespace
// of the uplink; the Datapath keeps working there from any thread.
func Load(ctx context.Context, cfg Config) (*Datapath, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("datapath config: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := bpffs.Ensure(cfg.BPFRoot, mapsDir(cfg.BPFRoot), linksDir(cfg.BPFRoot)); err != nil {
		return nil, err
	}

	// Adopt an existing table as it is: resizing would mean flushing it.
	if info, err := pinnedMapInfo(filepath.Join(mapsDir(cfg.BPFRoot), "sb_ct")); err == nil {
		cfg.CTSize = info.MaxEntries
	}
	d := &Datapath{cfg: cfg, links: map[string]attachment{}}
	d.cfg.Attach = cfg.Attach.Resolve()
	tc, err := dialTC()
	if err != nil {
		return nil, err
	}
	d.tc = tc
	if err := loadObjects(&d.objs, d.cfg, mapsDir(cfg.BPFRoot)); err != nil {
		tc.Close()
		return nil, err
	}
	if err := d.SetCIDRs(d.cfg.ClusterCIDRs, d.cfg.NonMasqCIDRs); err != nil {
		d.Close()
		return nil, err
	}
	for _, a := range []struct {
		name string
		prog *ebpf.Program
		dir  direction
	}{
		{"masq_egress", d.objs.MasqEgress, egress},
		{"masq_ingress", d.objs.MasqIngress, ingress},
	} {
		l, err := d.attach(a.name, cfg.UplinkIfindex, a.prog, a.dir)
		if err != nil {
			d.Close()
			return nil, err
		}
		d.links[a.name] = l
	}
	if err := d.adoptHostLinks(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// loadObjects loads the programs and maps configured by cfg. Maps are
// pinned in (and adopted from) pinDir; an empty pinDir loads unpinned maps,
// for tests.
func loadObjects(objs *datapathObjects, cfg Config, pinDir string) error {
	var kct kernelCT
	if cfg.KernelCT {
		var err error
		if kct, err = probeKernelCT(); err != nil {
			return fmt.Errorf("%w: %w", ErrNoKernelCT, err)
		}
	}
	return loadObjectsCT(objs, cfg, pinDir, kct)
}

// loadObjectsCT is loadObjects with the kernel's conntrack kfuncs as kct
// describes them (used with cfg.KernelCT).
func loadObjectsCT(objs *datapathObjects, cfg Config, pinDir string, kct kernelCT) error {
	spec, err := loadDatapath()
	if err != nil {
		return fmt.Errorf("load datapath spec: %w", err)
	}
	vars := map[string]any{
		"node_ip":           be32(cfg.NodeIP),
		"port_min":          cfg.PortMin,
		"port_max":          cfg.PortMax,
		"vxlan_port":        cfg.VXLANPort,
		"vxlan_vni":         cfg.VXLANVNI,
		"uplink_ifindex":    uint32(cfg.UplinkIfindex),
		"route_out_enabled": cfg.RouteOut,
		"kernel_ct_enabled": cfg.KernelCT,
		"policy_enabled":    cfg.Policy,
	}
	if cfg.KernelCT {
		vars["kernel_ct_opts_size"] = kct.OptsSize
	}
	for name, v := range vars {
		if err := spec.Variables[name].Set(v); err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
	}
	spec.Maps["sb_ct"].MaxEntries = cfg.CTSize
	sizePrefixMaps(spec)
	// The prefix and endpoint maps are rewritten by the agent after every
	// load; conntrack and counters are kept. sb_lb_ct is kept too, unless
	// its layout changed (an upgrade: flows from outside to Services start
	// afresh, those to a remote backend are cut).
	progs, err := programOptions(cfg)
	if err != nil {
		return err
	}
	return bpffs.LoadPinnedShared(spec, objs, pinDir, sharedDir(pinDir), "datapath", progs, "sb_remote_cidrs", "sb_masq_cidrs", "sb_endpoints", "sb_vtep_peers", "sb_lb_ct",
		"sb_pol_endpoints", "sb_pol_ipcache", "sb_pol_rules", "sb_pol_veths")
}

// programOptions are the options the programs load with. The programs'
// only CO-RE read (nf_conn's status, bpf/lib/kct.h) is dead code without
// cfg.KernelCT: it is then relocated against no types at all (the read is
// poisoned, and the verifier never reaches it), so that a kernel without
// BTF still loads the datapath, and no module's BTF is read at load.
func programOptions(cfg Config) (ebpf.ProgramOptions, error) {
	if cfg.KernelCT {
		return ebpf.ProgramOptions{}, nil
	}
	none, err := btf.NewBuilder(nil, nil)
	if err != nil {
		return ebpf.ProgramOptions{}, fmt.Errorf("empty BTF for CO-RE: %w", err)
	}
	spec, err := none.Spec()
	if err != nil {
		return ebpf.ProgramOptions{}, fmt.Errorf("empty BTF for CO-RE: %w", err)
	}
	return ebpf.ProgramOptions{KernelTypes: spec}, nil
}

// Close releases the process's handles. The pinned maps and links, and so
// the datapath in the kernel, stay in place for the next Load to adopt.
func (d *Datapath) Close() error {
	var errs []error
	for _, l := range d.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, d.objs.Close(), d.tc.Close())
	return errors.Join(errs...)
}

// Config returns the effective configuration (defaults applied, adopted
// conntrack size).
func (d *Datapath) Config() Config { return d.cfg }

// Cleanup detaches and removes everything the datapath pinned under root:
// links and classic tc filters first (so no program runs on half-removed
// maps), then maps, then the directories, and the maps shared with the
// other components once none of theirs is left. Classic tc filters are
// found in the calling thread's network namespace: call it where Load ran.
// A missing root is not an error.
func Cleanup(root string) error { return cleanup(root, true) }

// CleanupKeepingShared is Cleanup leaving the maps shared with the other
// components (flow telemetry), for an agent that keeps running without
// the datapath: its socket load balancer, TCP acceleration and flows
// controller still use them.
func CleanupKeepingShared(root string) error { return cleanup(root, false) }

func cleanup(root string, shared bool) error {
	var errs []error
	entries, err := os.ReadDir(linksDir(root))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("list links in %s: %w", root, err)
	}
	progs := map[uint32]bool{} // classic tc: programs whose filters go
	for _, e := range entries {
		path := filepath.Join(linksDir(root), e.Name())
		p, err := loadPin(path)
		switch {
		case err != nil:
			errs = append(errs, err)
		case p.link != nil:
			// Unpinning drops the last reference, which detaches the link.
			errs = append(errs, p.link.Unpin())
		case p.prog != nil:
			id, err := progID(p.prog)
			errs = append(errs, err)
			progs[id] = true
		}
		p.Close()
	}
	if len(progs) > 0 {
		tc, err := dialTC()
		if err == nil {
			err = tc.removeFilters(progs)
			tc.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove tc filters of %s: %w", root, err))
		}
	}
	for _, dir := range []string{linksDir(root), mapsDir(root)} {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	if shared {
		errs = append(errs, bpffs.RemoveSharedIfAlone(root))
	}
	// The root may hold pins of other components: leave it then.
	if err := os.Remove(root); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTEMPTY) {
		errs = append(errs, fmt.Errorf("remove %s: %w", root, err))
	}
	return errors.Join(errs...)
}

func pinnedMapInfo(path string) (*ebpf.MapInfo, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	return m.Info()
}

// be32 returns the IPv4 address as the native-endian integer whose memory
// layout is network order, as __be32 fields are stored.
func be32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func addrFromBE32(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// be16 converts a port to the native integer holding it in network order.
func be16(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func portFromBE16(v uint16) uint16 { return be16(v) }
