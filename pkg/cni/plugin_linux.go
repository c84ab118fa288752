package cni

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/jsimonetti/rtnetlink/v2"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/ipam"
)

// SupportedVersions are the CNI spec versions the plugin accepts; results
// are converted to the version of the incoming configuration.
var SupportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

func openStore(conf *PluginConf) (*ipam.Store, error) {
	st, err := ipam.Open(conf.ipamDir(), conf.ranges)
	if err != nil {
		return nil, types.NewError(types.ErrIOFailure, "open ipam state", err.Error())
	}
	return st, nil
}

func notReady(conf *PluginConf) error {
	if len(conf.ranges) == 0 {
		return types.NewError(types.ErrPluginNotAvailable, "node not ready: no pod CIDR configured",
			"the sinabro agent writes \"podCIDRs\" into the CNI config once the Node has spec.podCIDRs")
	}
	return nil
}

// sides are the two ends of an attachment: the pod's namespace and an
// rtnetlink socket on each side (the node's is the plugin's own namespace).
type sides struct {
	podNS     *os.File
	host, pod *rtnetlink.Conn
}

func openSides(netnsPath string) (*sides, error) {
	podNS, err := openNetNS(netnsPath)
	if err != nil {
		return nil, err
	}
	s := &sides{podNS: podNS}
	if s.host, err = dial(-1); err != nil {
		s.Close()
		return nil, fmt.Errorf("dial rtnetlink: %w", err)
	}
	if s.pod, err = dial(int(podNS.Fd())); err != nil {
		s.Close()
		return nil, fmt.Errorf("dial rtnetlink in %s: %w", netnsPath, err)
	}
	return s, nil
}

func (s *sides) Close() {
	if s.pod != nil {
		s.pod.Close()
	}
	if s.host != nil {
		s.host.Close()
	}
	s.podNS.Close()
}

// openNetNS opens the pod's network namespace, mapping failures to code 4
// (CNI_NETNS is an invalid environment variable).
func openNetNS(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables,
			"invalid CNI_NETNS: cannot open network namespace", err.Error())
	}
	return f, nil
}

func cmdAdd(args *cmdArgs) (retErr error) {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if err := notReady(conf); err != nil {
		return err
	}
	s, err := openSides(args.Netns)
	if err != nil {
		return err
	}
	defer s.Close()
	podNS, hostConn, podConn := s.podNS, s.host, s.pod

	// The spec requires ADD to fail when the interface already exists.
	if l, err := linkByName(podConn, args.IfName); err != nil {
		return err
	} else if l != nil {
		return types.NewError(ErrInterfaceExists, fmt.Sprintf("interface %s already exists in %s", args.IfName, args.Netns),
			"delete the attachment (CNI DEL) before adding it again")
	}

	store, err := openStore(conf)
	if err != nil {
		return err
	}
	att := ipam.Attachment{ContainerID: args.ContainerID, IfName: args.IfName}
	allocs, err := store.Allocate(att, func(a ipam.Allocation) bool {
		l, err := linkByName(hostConn, HostVethName(a.ContainerID, a.IfName))
		return err != nil || l != nil // when unsure, keep the address
	})
	if errors.Is(err, ipam.ErrExhausted) {
		return types.NewError(types.ErrTryAgainLater, "pod address range exhausted", err.Error())
	}
	if err != nil {
		return fmt.Errorf("allocate address: %w", err)
	}

	hostName := HostVethName(args.ContainerID, args.IfName)
	err = createVeth(hostConn, hostName, args.IfName, podNS, conf.MTU)
	if errors.Is(err, unix.EEXIST) {
		// A host veth left by an ADD that died half-way has lost its pod
		// end (the interface check above passed), so it is safe to replace.
		if _, err := deleteLink(hostConn, hostName); err != nil {
			return err
		}
		err = createVeth(hostConn, hostName, args.IfName, podNS, conf.MTU)
	}
	if err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			// Leave the addresses pending: a retried ADD reuses them, and DEL,
			// GC or the next ADD (once this process is gone) releases them.
			_, _ = deleteLink(hostConn, hostName)
		}
	}()

	result, err := configure(hostConn, podConn, conf, args, hostName, allocs)
	if err != nil {
		return err
	}
	if err := store.Commit(att); err != nil {
		return fmt.Errorf("commit address: %w", err)
	}
	result.DNS = conf.DNS
	return types.PrintResult(result, conf.CNIVersion)
}

// configure sets up both ends of a freshly created veth and returns the result.
func configure(hostConn, podConn *rtnetlink.Conn, conf *PluginConf, args *cmdArgs, hostName string, allocs []ipam.Allocation) (*current.Result, error) {
	host, err := linkByName(hostConn, hostName)
	if err != nil || host == nil {
		return nil, fmt.Errorf("find host veth %s: %v", hostName, err)
	}
	pod, err := linkByName(podConn, args.IfName)
	if err != nil || pod == nil {
		return nil, fmt.Errorf("find pod interface %s: %v", args.IfName, err)
	}
	hostMAC := host.Attributes.Address
	if err := setUp(hostConn, host.Index, hostVethAlias(args.ContainerID, args.IfName, podArgs(args.Args))); err != nil {
		return nil, fmt.Errorf("set up host veth %s: %w", hostName, err)
	}
	if err := setUp(podConn, pod.Index, ""); err != nil {
		return nil, fmt.Errorf("set up %s in pod: %w", args.IfName, err)
	}
	// Bring the pod's loopback (always ifindex 1) up too, so pod-local
	// services work even when the runtime runs no loopback plugin.
	_ = setUp(podConn, loopbackIndex, "")

	result := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: hostName, Mac: hostMAC.String()},
			{Name: args.IfName, Mac: pod.Attributes.Address.String(), Mtu: conf.MTU, Sandbox: args.Netns},
		},
	}
	var v4, v6 bool
	for _, a := range allocs {
		gw := GatewayV4
		if a.IP.Is6() {
			gw, v6 = GatewayV6, true
		} else {
			v4 = true
		}
		if err := addAddress(podConn, pod.Index, a.IP); err != nil {
			return nil, err
		}
		if a.IP.Is4() {
			// The link-local gateway needs an on-link route before it can
			// be used as a next hop; fe80::/64 is on-link by default.
			if err := replaceRoute(podConn, pod.Index, netip.PrefixFrom(gw, 32), netip.Addr{}, unix.RTPROT_BOOT); err != nil {
				return nil, err
			}
		}
		if err := replaceNeighbour(podConn, pod.Index, gw, hostMAC); err != nil {
			return nil, err
		}
		def := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if a.IP.Is6() {
			def = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		if err := replaceRoute(podConn, pod.Index, def, gw, unix.RTPROT_BOOT); err != nil {
			return nil, err
		}
		if err := replaceRoute(hostConn, host.Index, netip.PrefixFrom(a.IP, a.IP.BitLen()), netip.Addr{}, RouteProtocol); err != nil {
			return nil, err
		}
		// The host knows the pod's MAC already: a permanent entry spares
		// the first packet an ARP/NDP round trip, and IPv6 does not wait
		// for the host veth's link-local address to finish DAD.
		if err := replaceNeighbour(hostConn, host.Index, a.IP, pod.Attributes.Address); err != nil {
			return nil, err
		}
		idx := 1
		result.IPs = append(result.IPs, &current.IPConfig{
			Interface: &idx,
			Address:   net.IPNet{IP: a.IP.AsSlice(), Mask: net.CIDRMask(a.IP.BitLen(), a.IP.BitLen())},
			Gateway:   gw.AsSlice(),
		})
		_, defNet, _ := net.ParseCIDR(def.String())
		result.Routes = append(result.Routes, &types.Route{Dst: *defNet, GW: gw.AsSlice()})
	}
	if err := enableForwarding(v4, v6); err != nil {
		return nil, err
	}
	if conf.PolicyMap != "" {
		for _, a := range allocs {
			if a.IP.Is4() {
				if err := waitForPolicy(conf.PolicyMap, a.IP, host.Index); err != nil {
					return nil, err
				}
			}
		}
	}
	return result, nil
}

// loopbackIndex is lo's ifindex in every network namespace.
const loopbackIndex = 1

func cmdDel(args *cmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	hostConn, err := dial(-1)
	if err != nil {
		return fmt.Errorf("dial rtnetlink: %w", err)
	}
	defer hostConn.Close()
	// Deleting the host end removes the pod end and the host routes with it;
	// a veth already gone (netns deleted, earlier DEL) is fine.
	if _, err := deleteLink(hostConn, HostVethName(args.ContainerID, args.IfName)); err != nil {
		return err
	}
	store, err := openStore(conf)
	if err != nil {
		return err
	}
	if _, err := store.Release(ipam.Attachment{ContainerID: args.ContainerID, IfName: args.IfName}); err != nil {
		return fmt.Errorf("release address: %w", err)
	}
	return nil
}

func cmdStatus(args *cmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if err := notReady(conf); err != nil {
		return err
	}
	store, err := ipam.Open(conf.ipamDir(), conf.ranges)
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "ipam state not usable", err.Error())
	}
	if _, err := store.List(); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "ipam state not readable", err.Error())
	}
	return nil
}

// cmdGC removes the attachments of this network that are not in
// cni.dev/valid-attachments: their host veths and addresses. A network's
// attachments are those its IPAM state records (ADD records the address
// before it creates the veth, DEL releases it only after deleting the veth),
// so GC of one network never touches the veths of another network served
// by the same plugin — the veth's name and alias do not say which network
// it belongs to.
func cmdGC(args *cmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	valid := map[ipam.Attachment]bool{}
	for _, a := range conf.ValidAttachments {
		valid[ipam.Attachment{ContainerID: a.ContainerID, IfName: a.IfName}] = true
	}
	store, err := openStore(conf)
	if err != nil {
		return err
	}
	allocs, err := store.List()
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	hostConn, err := dial(-1)
	if err != nil {
		return fmt.Errorf("dial rtnetlink: %w", err)
	}
	defer hostConn.Close()
	var errs []string
	stale := map[string]bool{}
	// keep is valid plus the attachments whose veth could not be deleted:
	// their addresses stay recorded, so the next GC finds the veth again
	// (released, nothing would ever point at it).
	keep := maps.Clone(valid)
	for _, a := range allocs {
		name := HostVethName(a.ContainerID, a.IfName)
		if valid[a.Attachment] || stale[name] {
			continue
		}
		stale[name] = true
		if _, err := deleteLink(hostConn, name); err != nil {
			errs = append(errs, err.Error())
			keep[a.Attachment] = true
		}
	}
	if _, err := store.ReleaseExcept(keep); err != nil {
		errs = append(errs, err.Error())
	}
	if len(errs) > 0 {
		return fmt.Errorf("gc: %s", strings.Join(errs, "; "))
	}
	return nil
}
