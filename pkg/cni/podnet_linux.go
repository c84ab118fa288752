package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/jsimonetti/rtnetlink/v2/driver"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The pod's default gateways. They are link-local so they never collide with
// a pod or node address; the pod resolves them through a permanent neighbour
// entry pointing at the host veth's MAC, so no proxy ARP is needed.
var (
	GatewayV4 = netip.MustParseAddr("169.254.1.1")
	GatewayV6 = netip.MustParseAddr("fe80::1")
)

// RouteProtocol marks the host routes the plugin installs (rtm_protocol), so
// they can be told apart from anyone else's.
const RouteProtocol = 200

// aliasPrefix starts the IFLA_IFALIAS of every host veth the plugin creates,
// naming its attachment for operators and the agent. It does not name the
// network: GC finds a network's veths through its IPAM state.
const aliasPrefix = "sinabro:"

// HostVethName derives the host-side interface name from the attachment, so
// DEL, CHECK and GC find it without any state. 13 characters fit IFNAMSIZ.
func HostVethName(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + "/" + ifName))
	return "sb" + hex.EncodeToString(sum[:])[:11]
}

// hostVethAlias names the attachment and, when the runtime passed them
// (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID), the pod: the agent learns
// a new pod's address from the kernel before the kubelet reports it, and
// compiles its NetworkPolicy while ADD waits (PodFromAlias). 255 bytes at
// most: a name too long for it gives way to the pod's UID.
func hostVethAlias(containerID, ifName string, pod podRef) string {
	alias := aliasPrefix + containerID + "/" + ifName
	if pod.Namespace != "" && pod.Name != "" {
		if withPod := alias + " pod=" + pod.Namespace + "/" + pod.Name; len(withPod) <= 255 {
			return withPod
		}
	}
	if pod.UID != "" && len(pod.UID) <= 64 {
		return alias + " uid=" + pod.UID
	}
	return alias
}

// dial opens an rtnetlink socket in the namespace behind nsFD (-1: ours).
func dial(nsFD int) (*rtnetlink.Conn, error) {
	cfg := &netlink.Config{Strict: true}
	if nsFD >= 0 {
		cfg.NetNS = nsFD
	}
	return rtnetlink.Dial(cfg)
}

// linkByName returns the named link, or nil when it does not exist.
func linkByName(c *rtnetlink.Conn, name string) (*rtnetlink.LinkMessage, error) {
	msgs, err := c.Execute(&rtnetlink.LinkMessage{Attributes: &rtnetlink.LinkAttributes{Name: name}},
		unix.RTM_GETLINK, netlink.Request)
	if errors.Is(err, unix.ENODEV) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get link %s: %w", name, err)
	}
	for _, m := range msgs {
		if l, ok := m.(*rtnetlink.LinkMessage); ok && l.Attributes != nil && l.Attributes.Name == name {
			return l, nil
		}
	}
	return nil, nil
}

// createVeth creates the pair in one request: the host end in c's namespace,
// the pod end directly inside the pod namespace under its final name.
func createVeth(c *rtnetlink.Conn, host, pod string, podNS *os.File, mtu int) error {
	req := &rtnetlink.LinkMessage{
		Family: unix.AF_UNSPEC,
		Attributes: &rtnetlink.LinkAttributes{
			Name: host,
			MTU:  uint32(mtu),
			Info: &rtnetlink.LinkInfo{
				Kind: "veth",
				Data: &driver.Veth{PeerInfo: &rtnetlink.LinkMessage{
					Family: unix.AF_UNSPEC,
					Attributes: &rtnetlink.LinkAttributes{
						Name:  pod,
						MTU:   uint32(mtu),
						NetNS: rtnetlink.NetNSForFD(uint32(podNS.Fd())),
					},
				}},
			},
		},
	}
	if err := c.Link.New(req); err != nil {
		return fmt.Errorf("create veth %s (peer %s): %w", host, pod, err)
	}
	return nil
}

// setUp brings a link up and optionally sets its alias.
func setUp(c *rtnetlink.Conn, index uint32, alias string) error {
	attrs := &rtnetlink.LinkAttributes{}
	if alias != "" {
		attrs.Alias = &alias
	}
	return c.Link.Set(&rtnetlink.LinkMessage{
		Family: unix.AF_UNSPEC, Index: index,
		Flags: unix.IFF_UP, Change: unix.IFF_UP,
		Attributes: attrs,
	})
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// addAddress adds ip as a host address (/32 or /128) without a prefix route.
// IPv6 skips duplicate address detection: the pod owns the address alone
// and must be able to use it as soon as ADD returns.
func addAddress(c *rtnetlink.Conn, index uint32, ip netip.Addr) error {
	flags := uint32(unix.IFA_F_NOPREFIXROUTE)
	if ip.Is6() {
		flags |= unix.IFA_F_NODAD
	}
	err := c.Address.New(&rtnetlink.AddressMessage{
		Family:       family(ip),
		PrefixLength: uint8(ip.BitLen()),
		Scope:        unix.RT_SCOPE_UNIVERSE,
		Index:        index,
		Attributes: &rtnetlink.AddressAttributes{
			Address: ip.AsSlice(),
			Local:   ip.AsSlice(),
			Flags:   flags,
		},
	})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add address %s: %w", ip, err)
	}
	return nil
}

// replaceRoute installs dst (a host route or the default route) on link
// index, via gw when gw is valid, replacing an existing route to dst.
func replaceRoute(c *rtnetlink.Conn, index uint32, dst netip.Prefix, gw netip.Addr, proto uint8) error {
	scope := uint8(unix.RT_SCOPE_UNIVERSE)
	if !gw.IsValid() {
		scope = unix.RT_SCOPE_LINK
	}
	attrs := rtnetlink.RouteAttributes{OutIface: index, Table: unix.RT_TABLE_MAIN}
	if dst.Bits() > 0 {
		attrs.Dst = dst.Addr().AsSlice()
	}
	if gw.IsValid() {
		attrs.Gateway = gw.AsSlice()
	}
	err := c.Route.Replace(&rtnetlink.RouteMessage{
		Family:     family(dst.Addr()),
		DstLength:  uint8(dst.Bits()),
		Table:      unix.RT_TABLE_MAIN,
		Protocol:   proto,
		Scope:      scope,
		Type:       unix.RTN_UNICAST,
		Attributes: attrs,
	})
	if err != nil {
		return fmt.Errorf("replace route %s via %v dev %d: %w", dst, gw, index, err)
	}
	return nil
}

// replaceNeighbour writes a permanent neighbour entry. rtnetlink/v2's
// NeighService.New is create-exclusive, so the request is sent with
// Create|Replace to make ADD idempotent.
func replaceNeighbour(c *rtnetlink.Conn, index uint32, ip netip.Addr, mac net.HardwareAddr) error {
	_, err := c.Execute(&rtnetlink.NeighMessage{
		Family: uint16(family(ip)),
		Index:  index,
		State:  unix.NUD_PERMANENT,
		Type:   unix.RTN_UNICAST,
		Attributes: &rtnetlink.NeighAttributes{
			Address:   ip.AsSlice(),
			LLAddress: mac,
			IfIndex:   index,
		},
	}, unix.RTM_NEWNEIGH, netlink.Request|netlink.Acknowledge|netlink.Create|netlink.Replace)
	if err != nil {
		return fmt.Errorf("set neighbour %s lladdr %s: %w", ip, mac, err)
	}
	return nil
}

// deleteLink removes the named link; a missing one is not an error.
func deleteLink(c *rtnetlink.Conn, name string) (bool, error) {
	l, err := linkByName(c, name)
	if err != nil || l == nil {
		return false, err
	}
	if err := c.Link.Delete(l.Index); err != nil && !errors.Is(err, unix.ENODEV) {
		return false, fmt.Errorf("delete link %s: %w", name, err)
	}
	return true, nil
}

// enableForwarding turns on IP forwarding in the node's namespace for the
// families in use; pods reach each other and the world through the host.
func enableForwarding(v4, v6 bool) error {
	set := func(path string) error {
		cur, err := os.ReadFile(path)
		if err == nil && strings.TrimSpace(string(cur)) == "1" {
			return nil
		}
		if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
			return fmt.Errorf("enable forwarding %s: %w", path, err)
		}
		return nil
	}
	if v4 {
		if err := set("/proc/sys/net/ipv4/ip_forward"); err != nil {
			return err
		}
	}
	if v6 {
		return set("/proc/sys/net/ipv6/conf/all/forwarding")
	}
	return nil
}
