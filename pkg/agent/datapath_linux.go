package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/masquerade"
	"github.com/sinabro-io/sinabro/pkg/netns"
	"github.com/sinabro-io/sinabro/pkg/overlay"
)

// Masquerade backends (--masquerade-backend).
const (
	// BackendEBPF masquerades with the eBPF datapath on the uplink, with
	// its own conntrack pinned on bpffs: flows survive agent restarts.
	BackendEBPF = "ebpf"
	// BackendNFTables masquerades with an nftables table (the baseline).
	BackendNFTables = "nftables"
)

// gcInterval is the period of the datapath's conntrack GC.
const gcInterval = 10 * time.Second

// datapathWanted reports whether this configuration uses the eBPF datapath.
func (a *Agent) datapathWanted() bool {
	return a.cfg.Masquerade && a.cfg.MasqueradeBackend == BackendEBPF || a.cfg.HostRouting
}

// inNetNS runs fn in the namespace the agent programs: eBPF attachments
// resolve interface indexes in the calling thread's namespace.
func (a *Agent) inNetNS(fn func() error) error {
	if a.cfg.NetNS == "" {
		return fn()
	}
	return netns.Do(a.cfg.NetNS, fn)
}

// datapathCIDRs returns the eBPF datapath's pod prefixes (sources to
// masquerade, never masqueraded to) and further non-masquerade
// destinations. Without eBPF masquerading the pod set is empty, so the
// uplink programs pass everything and only host routing is active.
func (a *Agent) datapathCIDRs(sel Selection) (cluster, nonMasq []netip.Prefix) {
	if a.cfg.Masquerade && a.cfg.MasqueradeBackend == BackendEBPF {
		for _, p := range append(slices.Clone(a.cfg.ClusterCIDRs), sel.ExcludeCIDRs...) {
			if p.Addr().Is4() {
				cluster = append(cluster, p.Masked())
			}
		}
	}
	for _, ip := range sel.NodeIPs {
		if ip.Is4() {
			nonMasq = append(nonMasq, netip.PrefixFrom(ip, 32))
		}
	}
	for _, p := range a.cfg.NonMasqueradeCIDRs {
		if p.Addr().Is4() {
			nonMasq = append(nonMasq, p.Masked())
		}
	}
	return pruneCovered(compactPrefixes(cluster), compactPrefixes(nonMasq))
}

// pruneCovered drops the prefixes an LPM lookup does not need: every
// prefix inside a pod prefix (all of it is pod and non-masquerade already),
// and non-masquerade prefixes inside other non-masquerade ones. With
// --cluster-cidr set, the nodes' pod CIDRs all fold into it, so the
// datapath's prefix map holds about one entry per node address, not two.
// Linear in the number of prefixes (times the distinct lengths).
func pruneCovered(cluster, nonMasq []netip.Prefix) ([]netip.Prefix, []netip.Prefix) {
	pods, other := newPrefixIndex(nil), newPrefixIndex(nil)
	for _, p := range cluster {
		pods.insert(p, "")
	}
	for _, p := range nonMasq {
		other.insert(p, "")
	}
	keptPods := slices.DeleteFunc(slices.Clone(cluster), func(p netip.Prefix) bool { return pods.within(p, false) })
	keptOther := slices.DeleteFunc(slices.Clone(nonMasq), func(p netip.Prefix) bool {
		return pods.within(p, true) || other.within(p, false)
	})
	return keptPods, keptOther
}

func compactPrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(ps)
}

// datapathRemotes returns the peers' pod prefixes that host routing hands
// straight to the vxlan device dev (or encapsulates itself and sends out
// of the underlay device under), with the MACs the overlay's routes and
// neighbour entries would give them; none without host routing.
func (a *Agent) datapathRemotes(dev, under overlay.Link, sel Selection) []datapath.Remote {
	if !a.cfg.HostRouting || dev.Index == 0 || len(dev.MAC) != 6 {
		return nil
	}
	var vteps []netip.Addr // eBPF encapsulation needs an IPv4 underlay
	for _, peer := range sel.Peers {
		if peer.Underlay.Is4() {
			vteps = append(vteps, peer.Underlay)
		}
	}
	// One request per new peer, not per peer and pass: the answers are
	// kept while the underlay's routing stays the same.
	var hops map[netip.Addr]netip.Addr
	var hopErrs map[netip.Addr]error
	if len(vteps) > 0 {
		var err error
		if hops, hopErrs, err = a.overlay.NextHops(vteps, under.Index); err != nil {
			a.log.Warn("next hops for eBPF encapsulation", "err", err)
		}
	}
	var out []datapath.Remote
	for _, peer := range sel.Peers {
		var vtep, nh netip.Addr
		if peer.Underlay.Is4() {
			vtep, nh = peer.Underlay, hops[peer.Underlay]
			if err := hopErrs[vtep]; err != nil {
				// Still encapsulated; each packet then takes a route lookup.
				a.log.Debug("no next hop for eBPF encapsulation", "node", peer.Name, "underlay", vtep, "err", err)
			}
		}
		for _, p := range peer.PodCIDRs {
			if p.Addr().Is4() {
				out = append(out, datapath.Remote{Prefix: p.Masked(), Ifindex: int(dev.Index), PeerMAC: peer.MAC, LocalMAC: dev.MAC, VTEP: vtep, NextHop: nh})
			}
		}
	}
	return out
}

// setRemotes converges d's remote pod prefixes, logging changes of their
// number.
func (a *Agent) setRemotes(d *datapath.Datapath, want []datapath.Remote, sel Selection) error {
	// The peers' VXLAN is let in before their prefixes are used.
	var peers []netip.Addr
	for _, p := range sel.Peers {
		peers = append(peers, p.Underlay)
	}
	if err := d.SetVTEPPeers(peers); err != nil {
		return fmt.Errorf("update datapath VTEP peers: %w", err)
	}
	if err := d.SetRemotes(want); err != nil {
		return fmt.Errorf("update datapath remote pod prefixes: %w", err)
	}
	if a.remotes != len(want) {
		a.remotes = len(want)
		a.log.Info("host routing remote pod prefixes updated", "prefixes", len(want))
	}
	return nil
}

// datapathConfig is the configuration the datapath is loaded with.
func (a *Agent) datapathConfig(self nodeInfo, under overlay.Link, cluster, nonMasq []netip.Prefix) datapath.Config {
	cfg := datapath.Config{
		BPFRoot:       a.cfg.BPFRoot,
		UplinkIfindex: int(under.Index),
		NodeIP:        self.InternalIP,
		ClusterCIDRs:  cluster,
		NonMasqCIDRs:  nonMasq,
		Attach:        a.cfg.TCAttach,
	}
	if a.cfg.HostRouting { // decapsulation hands packets straight to pods
		cfg.VXLANPort, cfg.VXLANVNI = a.cfg.VXLANPort, a.cfg.VXLANVNI
		// Straight out of the uplink only where no nftables masquerade
		// in the stack would be skipped.
		cfg.RouteOut = !a.cfg.Masquerade || a.cfg.MasqueradeBackend == BackendEBPF
		// Only host routing's shortcuts (redirects, decapsulation, the
		// reply path into local pods) can skip a translation the stack
		// made. Masquerading alone hands every reply to the stack, so it
		// needs no kfuncs: on a kernel without them (New turned host
		// routing off) Load must not fail for want of them.
		cfg.KernelCT = a.cfg.KubeProxyCoexistence
		// NetworkPolicy is checked on host routing's paths and on the
		// host veths host routing attaches to.
		cfg.Policy = a.cfg.NetworkPolicy
	}
	return cfg
}

// ensureDatapath loads (or adopts) the eBPF datapath on the underlay device
// and keeps its prefixes in line with the cluster, or removes a datapath
// left by an earlier run when this configuration uses none. The peers' pod
// prefixes it is given reach the vxlan device dev directly.
func (a *Agent) ensureDatapath(ctx context.Context, self nodeInfo, under, dev overlay.Link, sel Selection) error {
	if !a.datapathWanted() {
		if !a.dpRemoved && a.cfg.BPFRoot != "" {
			a.dpRemoved = true
			if err := datapath.CleanupKeepingShared(a.cfg.BPFRoot); err != nil {
				a.log.Warn("remove the eBPF datapath of an earlier run", "bpf_root", a.cfg.BPFRoot, "err", err)
			} else {
				a.log.Info("eBPF datapath not in use; removed any left by an earlier run", "bpf_root", a.cfg.BPFRoot)
			}
		}
		return nil
	}
	cluster, nonMasq := a.datapathCIDRs(sel)
	remotes := a.datapathRemotes(dev, under, sel)

	a.dpMu.Lock()
	defer a.dpMu.Unlock()
	if d := a.dp; d != nil && d.Config().UplinkIfindex == int(under.Index) && d.Config().NodeIP == self.InternalIP {
		old := d.Config()
		if err := d.SetCIDRs(cluster, nonMasq); err != nil {
			return fmt.Errorf("update datapath prefixes: %w", err)
		}
		if !slices.Equal(old.ClusterCIDRs, cluster) || !slices.Equal(old.NonMasqCIDRs, nonMasq) {
			a.log.Info("datapath prefixes updated", "pod_cidrs", cluster, "non_masquerade", nonMasq)
		}
		return a.setRemotes(d, remotes, sel)
	}

	// First load, or the node's address or uplink changed (the node IP is
	// compiled into the programs): load anew. Links are re-pointed
	// atomically and the pinned maps, conntrack included, are kept.
	cfg := a.datapathConfig(self, under, cluster, nonMasq)
	var d *datapath.Datapath
	if err := a.inNetNS(func() (err error) {
		d, err = datapath.Load(ctx, cfg)
		return err
	}); err != nil {
		return fmt.Errorf("load eBPF datapath on %s (use --masquerade-backend=nftables --host-routing=false to run without eBPF): %w", under.Name, err)
	}
	// Before the new datapath is used: an adopted map may hold the
	// prefixes of an earlier run.
	if err := a.setRemotes(d, remotes, sel); err != nil {
		d.Close()
		return err
	}
	eps, err := datapath.OpenMap(a.cfg.BPFRoot, "sb_endpoints")
	if err != nil {
		d.Close()
		return err
	}
	if a.dp != nil {
		a.metrics.registry.Unregister(a.dpCollector)
		a.dpEndpoints.Close()
		a.dp.Close()
	}
	a.dp, a.dpEndpoints, a.dpCollector = d, eps, d.Collector()
	if err := a.metrics.registry.Register(a.dpCollector); err != nil {
		a.log.Warn("register datapath metrics", "err", err)
	}
	eff := d.Config()
	a.log.Info("eBPF datapath loaded", "bpf_root", eff.BPFRoot, "uplink", under.Name, "uplink_index", under.Index,
		"node_ip", eff.NodeIP, "masquerade", len(cluster) > 0, "host_routing", a.cfg.HostRouting, "kernel_ct", eff.KernelCT,
		"pod_cidrs", cluster, "non_masquerade", nonMasq, "ct_size", eff.CTSize, "ports", fmt.Sprintf("%d-%d", eff.PortMin, eff.PortMax), "attach", eff.Attach)
	a.kickEndpoints()
	return nil
}

// closeDatapath releases the agent's handles on the datapath; the pinned
// datapath keeps forwarding (established flows survive a restart).
func (a *Agent) closeDatapath() error {
	a.dpMu.Lock()
	defer a.dpMu.Unlock()
	if a.dp == nil {
		return nil
	}
	a.metrics.registry.Unregister(a.dpCollector)
	a.dpEndpoints.Close()
	err := a.dp.Close()
	a.dp, a.dpEndpoints, a.dpCollector = nil, nil, nil
	return err
}

// runGC expires conntrack entries of the loaded datapath until ctx is done.
// It runs d.GC itself rather than d.RunGC so that a datapath reloaded
// after a node address change is picked up.
func (a *Agent) runGC(ctx context.Context) error {
	t := time.NewTicker(gcInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		a.dpMu.RLock()
		if a.dp != nil {
			n, err := a.dp.GC(ctx)
			if err != nil && ctx.Err() == nil {
				a.log.Warn("conntrack gc", "err", err)
			} else if n > 0 {
				a.log.Debug("conntrack gc", "expired_flows", n)
			}
		}
		a.dpMu.RUnlock()
	}
}

// ensureMasquerade keeps the nftables backend's table when it is in use,
// and removes a table left by an earlier run otherwise. The table is
// replaced atomically each time, which also repairs hand edits.
func (a *Agent) ensureMasquerade(ctx context.Context, self nodeInfo, sel Selection) error {
	if !a.cfg.Masquerade || a.cfg.MasqueradeBackend != BackendNFTables {
		// Once: a node without nftables must not turn unready for a
		// backend it does not use.
		if !a.nftRemoved {
			a.nftRemoved = true
			if err := a.masq.Remove(ctx); err != nil {
				a.log.Warn("remove masquerade rules of an earlier run", "backend", a.masq.Name(), "err", err)
			}
		}
		return nil
	}
	if len(self.PodCIDRs) == 0 {
		return nil
	}
	cfg := masquerade.Config{
		PodCIDRs:     self.PodCIDRs,
		ExcludeCIDRs: append(append(slices.Clone(a.cfg.ClusterCIDRs), sel.ExcludeCIDRs...), a.cfg.NonMasqueradeCIDRs...),
		NodeIPs:      sel.NodeIPs,
	}
	if err := a.masq.Ensure(ctx, cfg); err != nil {
		return fmt.Errorf("masquerade (%s): %w", a.masq.Name(), err)
	}
	return nil
}
