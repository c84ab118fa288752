package overlay

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/jsimonetti/rtnetlink/v2/driver"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Overhead is what VXLAN over an IPv4 underlay adds to every packet:
// outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
const Overhead = 50

// Manager programs the overlay through netlink in one network namespace.
type Manager struct {
	rt   *rtnetlink.Conn // links, addresses, routes
	nl   *netlink.Conn   // neighbours and FDB, encoded by hand
	hops hopCache        // NextHops answers
}

// Open connects to netlink in the network namespace referred to by nsFD, or
// in the caller's namespace when nsFD is 0.
func Open(nsFD int) (*Manager, error) {
	cfg := &netlink.Config{NetNS: nsFD, Strict: true}
	rt, err := rtnetlink.Dial(cfg)
	if err != nil {
		return nil, fmt.Errorf("dial rtnetlink: %w", err)
	}
	nl, err := netlink.Dial(unix.NETLINK_ROUTE, cfg)
	if err != nil {
		rt.Close()
		return nil, fmt.Errorf("dial netlink: %w", err)
	}
	return &Manager{rt: rt, nl: nl}, nil
}

// Close releases the netlink sockets.
func (m *Manager) Close() error {
	return errors.Join(m.rt.Close(), m.nl.Close())
}

// Link is a network interface as far as the overlay cares.
type Link struct {
	Index uint32
	Name  string
	MTU   int
	MAC   net.HardwareAddr
}

// LinkByAddr finds the interface holding addr: the underlay device is the one
// that carries the node's InternalIP.
func (m *Manager) LinkByAddr(addr netip.Addr) (Link, error) {
	addrs, err := m.rt.Address.List()
	if err != nil {
		return Link{}, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if a.Attributes == nil {
			continue
		}
		for _, ip := range []net.IP{a.Attributes.Local, a.Attributes.Address} {
			if got, ok := netip.AddrFromSlice(ip); ok && got.Unmap() == addr {
				return m.linkByIndex(a.Index)
			}
		}
	}
	return Link{}, fmt.Errorf("no interface holds %s", addr)
}

// NextHop asks the kernel's routing for the next hop towards dst, an IPv4
// underlay address: the gateway of the route, or dst itself when it is on
// link. The route must leave through interface oif (the underlay device).
func (m *Manager) NextHop(dst netip.Addr, oif uint32) (netip.Addr, error) {
	if !dst.Is4() {
		return netip.Addr{}, fmt.Errorf("next hop to %v: not IPv4", dst)
	}
	routes, err := m.rt.Route.Get(&rtnetlink.RouteMessage{
		Family:     unix.AF_INET,
		DstLength:  32,
		Attributes: rtnetlink.RouteAttributes{Dst: dst.AsSlice()},
	})
	if err != nil {
		return netip.Addr{}, fmt.Errorf("route to %v: %w", dst, err)
	}
	for _, r := range routes {
		if r.Type != unix.RTN_UNICAST || r.Attributes.OutIface != oif {
			continue
		}
		if gw, ok := netip.AddrFromSlice(r.Attributes.Gateway); ok && gw.Unmap().Is4() {
			return gw.Unmap(), nil
		}
		return dst, nil
	}
	return netip.Addr{}, fmt.Errorf("no unicast route to %v through interface %d", dst, oif)
}

func (m *Manager) linkByIndex(index uint32) (Link, error) {
	msg, err := m.rt.Link.Get(index)
	if err != nil {
		return Link{}, fmt.Errorf("get link %d: %w", index, err)
	}
	return toLink(&msg), nil
}

func toLink(msg *rtnetlink.LinkMessage) Link {
	l := Link{Index: msg.Index}
	if a := msg.Attributes; a != nil {
		l.Name, l.MTU, l.MAC = a.Name, int(a.MTU), a.Address
	}
	return l
}

// linkByName returns the link message for name, or an error wrapping
// unix.ENODEV when there is none.
func (m *Manager) linkByName(name string) (*rtnetlink.LinkMessage, error) {
	msgs, err := m.rt.Execute(&rtnetlink.LinkMessage{Attributes: &rtnetlink.LinkAttributes{Name: name}},
		unix.RTM_GETLINK, netlink.Request)
	if err != nil {
		return nil, err
	}
	for _, msg := range msgs {
		if l, ok := msg.(*rtnetlink.LinkMessage); ok {
			return l, nil
		}
	}
	return nil, unix.ENODEV
}

// DeviceConfig describes the vxlan device.
type DeviceConfig struct {
	Name     string
	VNI      uint32
	Port     uint16
	MTU      int
	Underlay uint32     // ifindex of the underlay device
	Local    netip.Addr // the node's underlay (InternalIP) address, IPv4
	MAC      net.HardwareAddr
}

// EnsureDevice creates the vxlan device or brings an existing one in line
// with cfg: attributes that can only be set at creation (VNI, port, local
// address, underlay, learning) recreate it; MTU, MAC and up state are fixed in
// place.
func (m *Manager) EnsureDevice(cfg DeviceConfig) (Link, error) {
	if !cfg.Local.Is4() {
		return Link{}, fmt.Errorf("vxlan %s: local address %s is not IPv4", cfg.Name, cfg.Local)
	}
	cur, err := m.linkByName(cfg.Name)
	switch {
	case errors.Is(err, unix.ENODEV):
	case err != nil:
		return Link{}, fmt.Errorf("get link %s: %w", cfg.Name, err)
	case !sameVxlan(cur, cfg):
		if err := m.rt.Link.Delete(cur.Index); err != nil && !errors.Is(err, unix.ENODEV) {
			return Link{}, fmt.Errorf("delete outdated vxlan %s: %w", cfg.Name, err)
		}
		cur = nil
	}
	if cur == nil {
		if err := m.createVxlan(cfg); err != nil {
			return Link{}, err
		}
		if cur, err = m.linkByName(cfg.Name); err != nil {
			return Link{}, fmt.Errorf("get link %s: %w", cfg.Name, err)
		}
	}
	a := cur.Attributes
	if int(a.MTU) != cfg.MTU || !equalMAC(a.Address, cfg.MAC) || cur.Flags&unix.IFF_UP == 0 {
		set := &rtnetlink.LinkMessage{
			Index:      cur.Index,
			Flags:      unix.IFF_UP,
			Change:     unix.IFF_UP,
			Attributes: &rtnetlink.LinkAttributes{MTU: uint32(cfg.MTU), Address: cfg.MAC},
		}
		if err := m.rt.Link.Set(set); err != nil {
			return Link{}, fmt.Errorf("set mtu %d, mac %s, up on %s: %w", cfg.MTU, cfg.MAC, cfg.Name, err)
		}
		if cur, err = m.linkByName(cfg.Name); err != nil {
			return Link{}, fmt.Errorf("get link %s: %w", cfg.Name, err)
		}
	}
	return toLink(cur), nil
}

func (m *Manager) createVxlan(cfg DeviceConfig) error {
	learning := false
	msg := &rtnetlink.LinkMessage{
		Family: unix.AF_UNSPEC,
		Attributes: &rtnetlink.LinkAttributes{
			Name:    cfg.Name,
			MTU:     uint32(cfg.MTU),
			Address: cfg.MAC,
			Info: &rtnetlink.LinkInfo{Kind: "vxlan", Data: &driver.Vxlan{
				ID:       &cfg.VNI,
				Port:     &cfg.Port,
				Local:    cfg.Local.AsSlice(),
				Link:     &cfg.Underlay,
				Learning: &learning,
			}},
		},
	}
	if err := m.rt.Link.New(msg); err != nil {
		return fmt.Errorf("create vxlan %s (vni %d, port %d, local %s): %w", cfg.Name, cfg.VNI, cfg.Port, cfg.Local, err)
	}
	return nil
}

// sameVxlan reports whether an existing link matches the creation-time
// attributes of cfg.
func sameVxlan(l *rtnetlink.LinkMessage, cfg DeviceConfig) bool {
	if l.Attributes == nil || l.Attributes.Info == nil || l.Attributes.Info.Kind != "vxlan" {
		return false
	}
	v, ok := l.Attributes.Info.Data.(*driver.Vxlan)
	if !ok {
		return false
	}
	local, _ := netip.AddrFromSlice(v.Local)
	return v.ID != nil && *v.ID == cfg.VNI &&
		v.Port != nil && *v.Port == cfg.Port &&
		local.Unmap() == cfg.Local &&
		v.Link != nil && *v.Link == cfg.Underlay &&
		v.Learning != nil && !*v.Learning
}

// DeleteDevice removes the named vxlan device, and with it every address,
// route, neighbour and FDB entry bound to it. A missing device is not an error;
// a device of another kind is left alone.
func (m *Manager) DeleteDevice(name string) error {
	cur, err := m.linkByName(name)
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("get link %s: %w", name, err)
	}
	if cur.Attributes == nil || cur.Attributes.Info == nil || cur.Attributes.Info.Kind != "vxlan" {
		return fmt.Errorf("delete %s: not a vxlan device, leaving it alone", name)
	}
	if err := m.rt.Link.Delete(cur.Index); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete vxlan %s: %w", name, err)
	}
	return nil
}

// Cleanup removes the vxlan device and every route marked with RouteProtocol.
func (m *Manager) Cleanup(name string) error {
	errs := []error{m.DeleteDevice(name)}
	routes, err := m.routes()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, r := range routes {
		if err := m.delRoute(r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", r, err))
		}
	}
	return errors.Join(errs...)
}

// Actual reads the sinabro-owned state: the addresses, permanent neighbours
// and FDB entries of the vxlan device and the routes marked RouteProtocol.
func (m *Manager) Actual(dev Link) (State, error) {
	var s State
	var err error
	if s.Addresses, err = m.addresses(dev.Index); err != nil {
		return State{}, err
	}
	if s.Routes, err = m.routes(); err != nil {
		return State{}, err
	}
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		entries, err := dumpNeighbours(m.nl, fam, dev.Index)
		if err != nil {
			return State{}, fmt.Errorf("list neighbours on %s: %w", dev.Name, err)
		}
		for _, e := range entries {
			if e.State&unix.NUD_PERMANENT != 0 && e.Dst.IsValid() && e.LLAddr != nil {
				s.Neighbours = append(s.Neighbours, Neighbour{IP: e.Dst, MAC: e.LLAddr.String()})
			}
		}
	}
	fdb, err := dumpNeighbours(m.nl, unix.AF_BRIDGE, dev.Index)
	if err != nil {
		return State{}, fmt.Errorf("list fdb on %s: %w", dev.Name, err)
	}
	for _, e := range fdb {
		if e.State&unix.NUD_PERMANENT != 0 && e.LLAddr != nil {
			s.FDB = append(s.FDB, FDBEntry{MAC: e.LLAddr.String(), Dst: e.Dst})
		}
	}
	s.sort()
	return s, nil
}

// addresses lists the global addresses of a link (link-local ones belong to
// the kernel).
func (m *Manager) addresses(index uint32) ([]netip.Prefix, error) {
	msgs, err := m.rt.Address.List()
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range msgs {
		if a.Index != index || a.Attributes == nil {
			continue
		}
		ip := a.Attributes.Local
		if ip == nil {
			ip = a.Attributes.Address
		}
		addr, ok := netip.AddrFromSlice(ip)
		if !ok || addr.Unmap().IsLinkLocalUnicast() {
			continue
		}
		out = append(out, netip.PrefixFrom(addr.Unmap(), int(a.PrefixLength)))
	}
	return out, nil
}

func addressMessage(index uint32, p netip.Prefix) *rtnetlink.AddressMessage {
	ip := net.IP(p.Addr().AsSlice())
	msg := &rtnetlink.AddressMessage{
		Family:       familyOf(p.Addr()),
		PrefixLength: uint8(p.Bits()),
		Scope:        unix.RT_SCOPE_UNIVERSE,
		Index:        index,
		Attributes:   &rtnetlink.AddressAttributes{Address: ip, Local: ip},
	}
	if p.Addr().Is6() {
		msg.Attributes.Local = nil
		msg.Attributes.Flags = unix.IFA_F_NODAD // usable at once, nobody else can hold it
	}
	return msg
}

// routes lists the routes marked RouteProtocol in the main table.
func (m *Manager) routes() ([]Route, error) {
	var out []Route
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		msgs, err := m.rt.Route.ListMatch(&rtnetlink.RouteMessage{Family: fam, Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN})
		if err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		for _, r := range msgs {
			if r.Protocol != RouteProtocol || r.Table != unix.RT_TABLE_MAIN || r.Flags&unix.RTM_F_CLONED != 0 {
				continue
			}
			dst := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
			if fam == unix.AF_INET6 {
				dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
			}
			if a, ok := netip.AddrFromSlice(r.Attributes.Dst); ok {
				dst = netip.PrefixFrom(a.Unmap(), int(r.DstLength))
			}
			route := Route{Dst: dst, Metric: r.Attributes.Priority}
			if r.Type != unix.RTN_UNREACHABLE {
				route.Gateway, _ = netip.AddrFromSlice(r.Attributes.Gateway)
				route.Gateway = route.Gateway.Unmap()
				if !route.Gateway.IsValid() {
					// Ours but malformed (no gateway): make sure a diff replaces it.
					route.Gateway = netip.IPv4Unspecified()
				}
			}
			out = append(out, route)
		}
	}
	return out, nil
}

func routeMessage(r Route, dev uint32) *rtnetlink.RouteMessage {
	msg := &rtnetlink.RouteMessage{
		Family:     familyOf(r.Dst.Addr()),
		DstLength:  uint8(r.Dst.Bits()),
		Table:      unix.RT_TABLE_MAIN,
		Protocol:   RouteProtocol,
		Scope:      unix.RT_SCOPE_UNIVERSE,
		Type:       unix.RTN_UNICAST,
		Attributes: rtnetlink.RouteAttributes{Dst: r.Dst.Addr().AsSlice(), Priority: r.Metric},
	}
	if r.Unreachable() {
		msg.Type = unix.RTN_UNREACHABLE
		return msg
	}
	msg.Flags = unix.RTNH_F_ONLINK
	msg.Attributes.Gateway = r.Gateway.AsSlice()
	msg.Attributes.OutIface = dev
	return msg
}

func (m *Manager) delRoute(r Route) error {
	msg := routeMessage(r, 0)
	msg.Type = unix.RTN_UNSPEC // match any type
	msg.Scope = unix.RT_SCOPE_NOWHERE
	msg.Flags = 0
	msg.Attributes.Gateway = nil
	return m.rt.Route.Delete(msg)
}

// Sync converges the overlay state of dev to desired and returns the plan it
// applied. Every change is attempted; the errors of those that failed are
// joined.
func (m *Manager) Sync(dev Link, desired State) (Plan, error) {
	actual, err := m.Actual(dev)
	if err != nil {
		return Plan{}, err
	}
	plan := Diff(desired, actual)
	return plan, m.Apply(dev, plan)
}

// Apply carries out a plan on dev: additions first (addresses, FDB,
// neighbours, then the routes that use them), deletions afterwards.
func (m *Manager) Apply(dev Link, p Plan) error {
	var errs []error
	try := func(err error, format string, args ...any) {
		if err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf(format+": %w", append(args, err)...))
		}
	}
	gone := func(err error, format string, args ...any) {
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf(format+": %w", append(args, err)...))
		}
	}
	for _, a := range p.AddAddresses {
		try(m.rt.Address.New(addressMessage(dev.Index, a)), "add address %s to %s", a, dev.Name)
	}
	for _, f := range p.UpsertFDB {
		try(setFDB(m.nl, dev.Index, f), "set fdb %s dst %s on %s", f.MAC, f.Dst, dev.Name)
	}
	for _, n := range p.UpsertNeighbours {
		try(setNeighbour(m.nl, dev.Index, n), "set neighbour %s lladdr %s on %s", n.IP, n.MAC, dev.Name)
	}
	for _, r := range p.UpsertRoutes {
		try(m.rt.Route.Replace(routeMessage(r, dev.Index)), "replace route %s dev %s", r, dev.Name)
	}
	for _, r := range p.DelRoutes {
		gone(m.delRoute(r), "delete route %s", r)
	}
	for _, n := range p.DelNeighbours {
		gone(delNeighbour(m.nl, dev.Index, n), "delete neighbour %s on %s", n.IP, dev.Name)
	}
	for _, f := range p.DelFDB {
		gone(delFDB(m.nl, dev.Index, f), "delete fdb %s on %s", f.MAC, dev.Name)
	}
	for _, a := range p.DelAddresses {
		gone(m.rt.Address.Delete(addressMessage(dev.Index, a)), "delete address %s from %s", a, dev.Name)
	}
	return errors.Join(errs...)
}
