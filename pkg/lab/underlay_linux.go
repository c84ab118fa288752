package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/jsimonetti/rtnetlink/v2/driver"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// The underlay is a bridge in its own namespace; every lab host (control
// plane, nodes, external host) hangs off it by a veth whose host end is eth0.
const (
	underlayBridge = "br0"
	hostIfName     = "eth0"
	underlayMTU    = 1500
)

// dialNetns opens an rtnetlink socket inside the named lab namespace.
func dialNetns(name string) (*rtnetlink.Conn, error) {
	f, err := os.Open(netns.Path(name))
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	defer f.Close()
	c, err := rtnetlink.Dial(&netlink.Config{NetNS: int(f.Fd()), Strict: true})
	if err != nil {
		return nil, fmt.Errorf("dial rtnetlink in %s: %w", name, err)
	}
	return c, nil
}

// ensureNetns creates the named namespace unless it exists.
func ensureNetns(name string) error {
	if fileExists(netns.Path(name)) {
		return nil
	}
	if _, err := netns.Create(name); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return nil
}

// setupUnderlay creates the underlay namespace and its bridge.
func (cfg *Config) setupUnderlay() error {
	if err := ensureNetns(cfg.nsUnderlay()); err != nil {
		return err
	}
	c, err := dialNetns(cfg.nsUnderlay())
	if err != nil {
		return err
	}
	defer c.Close()
	if err := linkUp(c, "lo"); err != nil {
		return err
	}
	if _, err := linkByName(c, underlayBridge); err != nil {
		req := &rtnetlink.LinkMessage{
			Family: unix.AF_UNSPEC,
			Attributes: &rtnetlink.LinkAttributes{
				Name: underlayBridge,
				MTU:  underlayMTU,
				Info: &rtnetlink.LinkInfo{Kind: "bridge", Data: &driver.Bridge{}},
			},
		}
		if err := c.Link.New(req); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("create bridge %s in %s: %w", underlayBridge, cfg.nsUnderlay(), err)
		}
	}
	return linkUp(c, underlayBridge)
}

// attachHost creates the namespace name (unless it exists) and plugs it into
// the underlay bridge with addr/len on its eth0. port names the bridge-side
// veth (at most 15 bytes).
func (cfg *Config) attachHost(name, port string, addr netip.Prefix) error {
	if err := ensureNetns(name); err != nil {
		return err
	}
	uc, err := dialNetns(cfg.nsUnderlay())
	if err != nil {
		return err
	}
	defer uc.Close()
	hc, err := dialNetns(name)
	if err != nil {
		return err
	}
	defer hc.Close()

	if _, err := linkByName(hc, hostIfName); err != nil {
		target, err := os.Open(netns.Path(name))
		if err != nil {
			return fmt.Errorf("open netns %s: %w", name, err)
		}
		defer target.Close()
		req := &rtnetlink.LinkMessage{
			Family: unix.AF_UNSPEC,
			Attributes: &rtnetlink.LinkAttributes{
				Name: port,
				MTU:  underlayMTU,
				Info: &rtnetlink.LinkInfo{Kind: "veth", Data: &driver.Veth{PeerInfo: &rtnetlink.LinkMessage{
					Family: unix.AF_UNSPEC,
					Attributes: &rtnetlink.LinkAttributes{
						Name:  hostIfName,
						MTU:   underlayMTU,
						NetNS: rtnetlink.NetNSForFD(uint32(target.Fd())),
					},
				}}},
			},
		}
		if err := uc.Link.New(req); err != nil {
			return fmt.Errorf("create veth %s/%s into %s: %w", port, hostIfName, name, err)
		}
	}
	br, err := linkByName(uc, underlayBridge)
	if err != nil {
		return err
	}
	p, err := linkByName(uc, port)
	if err != nil {
		return err
	}
	if err := uc.Link.Set(&rtnetlink.LinkMessage{
		Family: unix.AF_UNSPEC, Index: p.Index,
		Attributes: &rtnetlink.LinkAttributes{Master: &br.Index},
	}); err != nil {
		return fmt.Errorf("enslave %s to %s: %w", port, underlayBridge, err)
	}
	if err := linkUp(uc, port); err != nil {
		return err
	}

	for _, l := range []string{"lo", hostIfName} {
		if err := linkUp(hc, l); err != nil {
			return err
		}
	}
	eth, err := linkByName(hc, hostIfName)
	if err != nil {
		return err
	}
	a := addr.Addr()
	if err := hc.Address.New(&rtnetlink.AddressMessage{
		Family:       unix.AF_INET,
		PrefixLength: uint8(addr.Bits()),
		Index:        eth.Index,
		Attributes: &rtnetlink.AddressAttributes{
			Address: net.IP(a.AsSlice()),
			Local:   net.IP(a.AsSlice()),
		},
	}); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add %s to %s in %s: %w", addr, hostIfName, name, err)
	}
	return nil
}

func linkByName(c *rtnetlink.Conn, name string) (rtnetlink.LinkMessage, error) {
	links, err := c.Link.List()
	if err != nil {
		return rtnetlink.LinkMessage{}, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if l.Attributes != nil && l.Attributes.Name == name {
			return l, nil
		}
	}
	return rtnetlink.LinkMessage{}, fmt.Errorf("link %s: %w", name, os.ErrNotExist)
}

func linkUp(c *rtnetlink.Conn, name string) error {
	l, err := linkByName(c, name)
	if err != nil {
		return err
	}
	if err := c.Link.Set(&rtnetlink.LinkMessage{
		Family: unix.AF_UNSPEC, Index: l.Index,
		Flags: unix.IFF_UP, Change: unix.IFF_UP,
	}); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// setSysctl writes a sysctl inside the named namespace, as a host
// provisioned for Kubernetes has it (ip_forward=1).
func setSysctl(ns, key, value string) error {
	return netns.Do(netns.Path(ns), func() error {
		p := "/proc/sys/" + key
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("write %s in %s: %w", p, ns, err)
		}
		return nil
	})
}

// setDefaultRoute routes everything off-link in the named namespace via gw
// on its eth0, as a real node's default route through its uplink router.
func setDefaultRoute(ns string, gw netip.Addr) error {
	return setRoute(ns, netip.Prefix{}, gw)
}

// setRoute routes dst (the default route when invalid) in the named
// namespace via gw on its eth0.
func setRoute(ns string, dst netip.Prefix, gw netip.Addr) error {
	c, err := dialNetns(ns)
	if err != nil {
		return err
	}
	defer c.Close()
	eth, err := linkByName(c, hostIfName)
	if err != nil {
		return err
	}
	msg := &rtnetlink.RouteMessage{
		Family:   unix.AF_INET,
		Table:    unix.RT_TABLE_MAIN,
		Protocol: unix.RTPROT_STATIC,
		Scope:    unix.RT_SCOPE_UNIVERSE,
		Type:     unix.RTN_UNICAST,
		Attributes: rtnetlink.RouteAttributes{
			OutIface: eth.Index, Gateway: net.IP(gw.AsSlice()), Table: unix.RT_TABLE_MAIN,
		},
	}
	what := "default route"
	if dst.IsValid() {
		msg.DstLength = uint8(dst.Bits())
		msg.Attributes.Dst = net.IP(dst.Addr().AsSlice())
		what = "route to " + dst.String()
	}
	if err := c.Route.Replace(msg); err != nil {
		return fmt.Errorf("add %s via %s in %s: %w", what, gw, ns, err)
	}
	return nil
}
