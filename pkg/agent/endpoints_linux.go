package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/policy"
)

// Host routing keeps the datapath's endpoint map in line with the pods on
// this node. The CNI plugin leaves everything needed in the kernel: a host
// veth named like cni.HostVethName with the alias "sinabro:<container>/<if>",
// a /32 route (protocol cni.RouteProtocol) to each pod address over it, and
// a permanent neighbour entry holding the pod's MAC. The agent reads them
// back on every netlink notification that may concern them and on a short
// periodic resync, and converges the map and the host veths' attachments.

// endpointResync is the period of the full endpoint resync; notifications
// make changes visible sooner.
const endpointResync = 5 * time.Second

const hostVethAliasPrefix = "sinabro:"

// isHostVeth tells whether a link is a pod's host veth made by the plugin.
func isHostVeth(l *rtnetlink.LinkMessage) bool {
	a := l.Attributes
	if a == nil || a.Info == nil || a.Info.Kind != "veth" || a.Alias == nil || !strings.HasPrefix(*a.Alias, hostVethAliasPrefix) {
		return false
	}
	name := a.Name
	return len(name) == 13 && strings.HasPrefix(name, "sb") && strings.Trim(name[2:], "0123456789abcdef") == ""
}

// discoverEndpoints reads the local pods' endpoints from the kernel. A pod
// whose neighbour entry is not there yet (the plugin writes it last) is left
// for the next pass.
func discoverEndpoints(c *rtnetlink.Conn) (map[netip.Addr]datapath.Endpoint, map[netip.Addr]policy.Local, error) {
	links, err := c.Link.List()
	if err != nil {
		return nil, nil, fmt.Errorf("list links: %w", err)
	}
	veths := map[uint32]net.HardwareAddr{}
	pods := map[uint32]policy.Local{}
	for i := range links {
		l := &links[i]
		if l.Flags&unix.IFF_UP != 0 && isHostVeth(l) && len(l.Attributes.Address) == 6 {
			veths[l.Index] = l.Attributes.Address
			ns, name, uid := cni.PodFromAlias(*l.Attributes.Alias)
			pods[l.Index] = policy.Local{Ifindex: int(l.Index), Namespace: ns, Name: name, UID: uid}
		}
	}
	local := map[netip.Addr]policy.Local{}
	if len(veths) == 0 {
		return map[netip.Addr]datapath.Endpoint{}, local, nil
	}
	routes, err := c.Route.List()
	if err != nil {
		return nil, nil, fmt.Errorf("list routes: %w", err)
	}
	podIfindex := map[netip.Addr]uint32{}
	for _, r := range routes {
		table := uint32(r.Table)
		if r.Attributes.Table != 0 {
			table = r.Attributes.Table
		}
		if r.Family != unix.AF_INET || r.DstLength != 32 || r.Protocol != cni.RouteProtocol || table != unix.RT_TABLE_MAIN {
			continue
		}
		if _, ok := veths[r.Attributes.OutIface]; !ok {
			continue
		}
		if ip, ok := netip.AddrFromSlice(r.Attributes.Dst); ok {
			podIfindex[ip.Unmap()] = r.Attributes.OutIface
		}
	}
	neighs, err := c.Neigh.List()
	if err != nil {
		return nil, nil, fmt.Errorf("list neighbours: %w", err)
	}
	out := map[netip.Addr]datapath.Endpoint{}
	for _, n := range neighs {
		if n.Family != unix.AF_INET || n.State&unix.NUD_PERMANENT == 0 || n.Attributes == nil || len(n.Attributes.LLAddress) != 6 {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.Attributes.Address)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if idx, ok := podIfindex[ip]; !ok || idx != n.Index {
			continue
		}
		out[ip] = datapath.Endpoint{
			IP:      ip,
			Ifindex: int(n.Index),
			PodMAC:  slices.Clone(n.Attributes.LLAddress),
			HostMAC: slices.Clone(veths[n.Index]),
			Local:   true,
		}
		local[ip] = pods[n.Index]
	}
	return out, local, nil
}

func sameEndpoint(a, b datapath.Endpoint) bool {
	return a.IP == b.IP && a.Ifindex == b.Ifindex && a.Local == b.Local &&
		slices.Equal(a.PodMAC, b.PodMAC) && slices.Equal(a.HostMAC, b.HostMAC)
}

func (a *Agent) kickEndpoints() {
	select {
	case a.epKick <- struct{}{}:
	default:
	}
}

// runEndpoints owns host routing: it subscribes to link, neighbour and
// route notifications and converges the endpoint map on each of them and
// every endpointResync. Both goroutines belong to g.
func (a *Agent) runEndpoints(ctx context.Context, g *errgroup.Group) error {
	fd := 0
	if a.nsFile != nil {
		fd = int(a.nsFile.Fd())
	}
	sub, err := netlink.Dial(unix.NETLINK_ROUTE, &netlink.Config{
		NetNS:  fd,
		Groups: unix.RTMGRP_LINK | unix.RTMGRP_NEIGH | unix.RTMGRP_IPV4_ROUTE,
	})
	if err != nil {
		return fmt.Errorf("subscribe to link and route notifications: %w", err)
	}
	g.Go(func() error {
		defer sub.Close()
		stop := context.AfterFunc(ctx, func() { sub.SetReadDeadline(time.Now()) })
		defer stop()
		for {
			msgs, err := sub.Receive()
			if ctx.Err() != nil {
				return nil
			}
			if err != nil {
				// ENOBUFS: notifications were lost; a full pass catches up.
				if !errors.Is(err, unix.ENOBUFS) {
					a.log.Warn("receive netlink notifications", "err", err)
					time.Sleep(time.Second)
				}
				a.kickEndpoints()
				continue
			}
			if slices.ContainsFunc(msgs, endpointRelevant) {
				a.kickEndpoints()
			}
		}
	})
	g.Go(func() error {
		t := time.NewTicker(endpointResync)
		defer t.Stop()
		for {
			if err := a.syncEndpoints(); err != nil {
				a.metrics.endpointSyncs.WithLabelValues("error").Inc()
				a.log.Error("sync host routing endpoints", "err", err)
			} else {
				a.metrics.endpointSyncs.WithLabelValues("success").Inc()
			}
			select {
			case <-ctx.Done():
				return nil
			case <-a.epKick:
			case <-t.C:
			}
		}
	})
	return nil
}

// endpointRelevant filters notifications: every link change (rare), and
// routes and neighbours only when they could be a pod's.
func endpointRelevant(m netlink.Message) bool {
	switch m.Header.Type {
	case unix.RTM_NEWLINK, unix.RTM_DELLINK:
		return true
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		// struct rtmsg: family, dst_len, src_len, tos, table, protocol, ...
		return len(m.Data) >= 6 && m.Data[0] == unix.AF_INET && m.Data[1] == 32 && m.Data[5] == cni.RouteProtocol
	case unix.RTM_NEWNEIGH, unix.RTM_DELNEIGH:
		// struct ndmsg: family, pad, pad, ifindex (4), state (2), ...
		if len(m.Data) < 10 || m.Data[0] != unix.AF_INET {
			return false
		}
		return binary.NativeEndian.Uint16(m.Data[8:10])&unix.NUD_PERMANENT != 0
	}
	return false
}

// syncEndpoints converges the endpoint map and the host veth attachments
// with the pods found in the kernel (none when host routing is off).
//
// It holds the datapath's read lock: map updates are safe alongside GC
// and metrics, and only this goroutine attaches or detaches host veths,
// while a reload takes the write lock.
func (a *Agent) syncEndpoints() error {
	a.dpMu.RLock()
	defer a.dpMu.RUnlock()
	d := a.dp
	if d == nil {
		return nil
	}
	if a.epFor != d {
		a.epFor, a.attached = d, map[int]bool{}
	}
	want := map[netip.Addr]datapath.Endpoint{}
	local := map[netip.Addr]policy.Local{}
	if a.cfg.HostRouting {
		var err error
		if want, local, err = discoverEndpoints(a.epConn); err != nil {
			return err
		}
	}
	have, err := datapath.Endpoints(a.dpEndpoints)
	if err != nil {
		return err
	}
	wantIfindex := map[int]bool{}
	for _, ep := range want {
		wantIfindex[ep.Ifindex] = true
	}
	// Packets decapsulated from other nodes get the same treatment on the
	// vxlan device's ingress: handed straight to the local pod instead of
	// being forwarded by the node's stack.
	if idx := int(a.vxlanIndex.Load()); a.cfg.HostRouting && idx > 0 && len(want) > 0 {
		wantIfindex[idx] = true
	}

	var errs []error
	var added, removed int
	// Stale first: an address may move to a new veth.
	detach := maps.Clone(a.attached)
	for _, ep := range have {
		if _, ok := want[ep.IP]; !ok {
			if err := d.DeleteEndpoint(ep.IP); err != nil {
				errs = append(errs, err)
				continue
			}
			removed++
			a.log.Debug("endpoint removed", "ip", ep.IP, "ifindex", ep.Ifindex)
		}
		detach[ep.Ifindex] = true
	}
	for idx := range detach {
		if wantIfindex[idx] {
			continue
		}
		if err := d.DetachHostVeth(idx); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(a.attached, idx)
	}

	var toAttach []int
	for idx := range wantIfindex {
		if !a.attached[idx] {
			toAttach = append(toAttach, idx)
		}
	}
	if len(toAttach) > 0 {
		if err := a.inNetNS(func() error {
			for _, idx := range toAttach {
				if err := d.AttachHostVeth(idx); err != nil {
					errs = append(errs, err)
					continue
				}
				a.attached[idx] = true
			}
			return nil
		}); err != nil {
			errs = append(errs, err)
		}
	}
	haveByIP := map[netip.Addr]datapath.Endpoint{}
	for _, ep := range have {
		haveByIP[ep.IP] = ep
	}
	for ip, ep := range want {
		if cur, ok := haveByIP[ip]; ok && sameEndpoint(cur, ep) {
			continue
		}
		if err := d.UpsertEndpoint(ep); err != nil {
			errs = append(errs, err)
			continue
		}
		added++
		a.log.Debug("endpoint programmed", "ip", ip, "ifindex", ep.Ifindex, "pod_mac", ep.PodMAC.String(), "host_mac", ep.HostMAC.String())
	}
	a.metrics.endpoints.Set(float64(len(want)))
	if added > 0 || removed > 0 {
		a.metrics.endpointChanges.WithLabelValues("upsert").Add(float64(added))
		a.metrics.endpointChanges.WithLabelValues("delete").Add(float64(removed))
		a.log.Info("host routing endpoints updated", "endpoints", len(want), "upserted", added, "deleted", removed)
	}
	if a.policy != nil {
		// After the attachments, and only pods whose veth has them: the
		// policy entry the CNI plugin waits for means the veth is checked.
		maps.DeleteFunc(local, func(_ netip.Addr, l policy.Local) bool { return !a.attached[l.Ifindex] })
		a.policy.setLocal(local)
	}
	return errors.Join(errs...)
}
