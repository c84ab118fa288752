package cni

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/jsimonetti/rtnetlink/v2"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/ipam"
)

// cmdCheck verifies the attachment against prevResult and the IPAM state,
// and reports every difference it finds (code 101), not just the first.
func cmdCheck(args *cmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "CHECK needs prevResult", "the runtime must pass the ADD result")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "convert prevResult", err.Error())
	}
	s, err := openSides(args.Netns)
	if err != nil {
		return err
	}
	defer s.Close()
	hostConn, podConn := s.host, s.pod

	var drift []string
	driftf := func(format string, a ...any) { drift = append(drift, fmt.Sprintf(format, a...)) }

	hostName := HostVethName(args.ContainerID, args.IfName)
	host, err := linkByName(hostConn, hostName)
	if err != nil {
		return err
	}
	pod, err := linkByName(podConn, args.IfName)
	if err != nil {
		return err
	}
	switch {
	case host == nil:
		driftf("host veth %s is missing", hostName)
	case host.Flags&unix.IFF_UP == 0:
		driftf("host veth %s is down", hostName)
	}
	if pod == nil {
		driftf("interface %s is missing in %s", args.IfName, args.Netns)
		return types.NewError(ErrDrift, "attachment drifted", strings.Join(drift, "; "))
	}
	if pod.Flags&unix.IFF_UP == 0 {
		driftf("interface %s is down", args.IfName)
	}
	if pod.Attributes.MTU != uint32(conf.MTU) {
		driftf("interface %s has MTU %d, want %d", args.IfName, pod.Attributes.MTU, conf.MTU)
	}
	for _, iface := range prev.Interfaces {
		if iface.Sandbox != "" && iface.Name == args.IfName && iface.Mac != "" && iface.Mac != pod.Attributes.Address.String() {
			driftf("interface %s has MAC %s, prevResult says %s", args.IfName, pod.Attributes.Address, iface.Mac)
		}
	}

	podAddrs, err := addressesOf(podConn, pod.Index)
	if err != nil {
		return err
	}
	podRoutes, err := podConn.Route.List()
	if err != nil {
		return fmt.Errorf("list pod routes: %w", err)
	}
	var hostRoutes []rtnetlink.RouteMessage
	if host != nil {
		if hostRoutes, err = hostConn.Route.List(); err != nil {
			return fmt.Errorf("list host routes: %w", err)
		}
	}
	for _, ipc := range prev.IPs {
		ip, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			driftf("prevResult address %s is not valid", ipc.Address.IP)
			continue
		}
		ip = ip.Unmap()
		if !podAddrs[ip] {
			driftf("address %s is missing on %s", ip, args.IfName)
		}
		if host != nil && !hasRoute(hostRoutes, netip.PrefixFrom(ip, ip.BitLen()), host.Index, netip.Addr{}) {
			driftf("host route %s dev %s is missing", ip, hostName)
		}
	}
	for _, r := range prev.Routes {
		dst, _ := netip.AddrFromSlice(r.Dst.IP)
		ones, _ := r.Dst.Mask.Size()
		gw, _ := netip.AddrFromSlice(r.GW)
		p := netip.PrefixFrom(dst.Unmap(), ones)
		if !hasRoute(podRoutes, p, pod.Index, gw.Unmap()) {
			driftf("route %s via %s is missing in the pod", p, gw.Unmap())
		}
	}

	store, err := openStore(conf)
	if err != nil {
		return err
	}
	allocs, err := store.List()
	if err != nil {
		return fmt.Errorf("read ipam state: %w", err)
	}
	att := ipam.Attachment{ContainerID: args.ContainerID, IfName: args.IfName}
	held := 0
	for _, a := range allocs {
		if a.Attachment == att {
			held++
			if !podAddrs[a.IP] {
				driftf("ipam holds %s for this attachment but the pod does not have it", a.IP)
			}
		}
	}
	if held == 0 {
		driftf("ipam holds no address for %s/%s", args.ContainerID, args.IfName)
	}
	if len(drift) > 0 {
		return types.NewError(ErrDrift, "attachment drifted", strings.Join(drift, "; "))
	}
	return nil
}

func addressesOf(c *rtnetlink.Conn, index uint32) (map[netip.Addr]bool, error) {
	msgs, err := c.Address.List()
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	out := map[netip.Addr]bool{}
	for _, m := range msgs {
		if m.Index != index || m.Attributes == nil {
			continue
		}
		if a, ok := netip.AddrFromSlice(m.Attributes.Address); ok {
			out[a.Unmap()] = true
		}
	}
	return out, nil
}

func hasRoute(routes []rtnetlink.RouteMessage, dst netip.Prefix, index uint32, gw netip.Addr) bool {
	for _, r := range routes {
		if r.Attributes.OutIface != index || int(r.DstLength) != dst.Bits() || r.Table != unix.RT_TABLE_MAIN {
			continue
		}
		if dst.Bits() > 0 {
			d, ok := netip.AddrFromSlice(r.Attributes.Dst)
			if !ok || d.Unmap() != dst.Addr() {
				continue
			}
		} else if family(dst.Addr()) != r.Family {
			continue
		}
		if gw.IsValid() {
			g, ok := netip.AddrFromSlice(r.Attributes.Gateway)
			if !ok || g.Unmap() != gw {
				continue
			}
		}
		return true
	}
	return false
}
