package overlay

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Neighbour and FDB messages are encoded here on a plain netlink socket:
// rtnetlink/v2's NeighService creates exclusively (no replace), always sends
// NDA_IFINDEX (which the vxlan FDB code rejects) and cannot express the
// AF_BRIDGE/NTF_SELF entries a vxlan device needs.

// ndmsg is struct ndmsg from linux/neighbour.h.
type ndmsg struct {
	Family  uint8
	Ifindex uint32
	State   uint16
	Flags   uint8
	Type    uint8
}

const sizeofNdmsg = 12

func (m ndmsg) marshal() []byte {
	b := make([]byte, sizeofNdmsg)
	b[0] = m.Family
	binary.NativeEndian.PutUint32(b[4:8], m.Ifindex)
	binary.NativeEndian.PutUint16(b[8:10], m.State)
	b[10] = m.Flags
	b[11] = m.Type
	return b
}

// neighEntry is a decoded RTM_NEWNEIGH message.
type neighEntry struct {
	ndmsg
	Dst    netip.Addr
	LLAddr net.HardwareAddr
}

func (e *neighEntry) unmarshal(b []byte) error {
	if len(b) < sizeofNdmsg {
		return fmt.Errorf("neighbour message too short: %d bytes", len(b))
	}
	e.Family = b[0]
	e.Ifindex = binary.NativeEndian.Uint32(b[4:8])
	e.State = binary.NativeEndian.Uint16(b[8:10])
	e.Flags = b[10]
	e.Type = b[11]
	ad, err := netlink.NewAttributeDecoder(b[sizeofNdmsg:])
	if err != nil {
		return err
	}
	for ad.Next() {
		switch ad.Type() {
		case unix.NDA_DST:
			if a, ok := netip.AddrFromSlice(ad.Bytes()); ok {
				e.Dst = a.Unmap()
			}
		case unix.NDA_LLADDR:
			e.LLAddr = net.HardwareAddr(append([]byte(nil), ad.Bytes()...))
		}
	}
	return ad.Err()
}

// neighRequest builds an RTM_NEWNEIGH/RTM_DELNEIGH request. NDA_IFINDEX is
// never sent: the interface is in the header.
func neighRequest(typ netlink.HeaderType, flags netlink.HeaderFlags, hdr ndmsg, dst netip.Addr, lladdr net.HardwareAddr) (netlink.Message, error) {
	ae := netlink.NewAttributeEncoder()
	if dst.IsValid() {
		ae.Bytes(unix.NDA_DST, dst.AsSlice())
	}
	if lladdr != nil {
		ae.Bytes(unix.NDA_LLADDR, lladdr)
	}
	attrs, err := ae.Encode()
	if err != nil {
		return netlink.Message{}, err
	}
	return netlink.Message{
		Header: netlink.Header{Type: typ, Flags: netlink.Request | netlink.Acknowledge | flags},
		Data:   append(hdr.marshal(), attrs...),
	}, nil
}

// dumpNeighbours lists the neighbour (or, for AF_BRIDGE, FDB) entries of one
// interface.
func dumpNeighbours(c *netlink.Conn, family uint8, ifindex uint32) ([]neighEntry, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(unix.NDA_IFINDEX, ifindex) // the dump filter; strict mode wants it as an attribute
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	req := netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETNEIGH, Flags: netlink.Request | netlink.Dump},
		Data:   append(ndmsg{Family: family}.marshal(), attrs...),
	}
	msgs, err := c.Execute(req)
	if err != nil {
		return nil, err
	}
	var out []neighEntry
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWNEIGH {
			continue
		}
		var e neighEntry
		if err := e.unmarshal(m.Data); err != nil {
			return nil, err
		}
		if e.Ifindex == ifindex {
			out = append(out, e)
		}
	}
	return out, nil
}

func familyOf(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// setNeighbour creates or replaces a permanent neighbour entry ip → mac.
func setNeighbour(c *netlink.Conn, ifindex uint32, n Neighbour) error {
	mac, err := net.ParseMAC(n.MAC)
	if err != nil {
		return err
	}
	req, err := neighRequest(unix.RTM_NEWNEIGH, netlink.Create|netlink.Replace,
		ndmsg{Family: familyOf(n.IP), Ifindex: ifindex, State: unix.NUD_PERMANENT}, n.IP, mac)
	if err != nil {
		return err
	}
	_, err = c.Execute(req)
	return err
}

func delNeighbour(c *netlink.Conn, ifindex uint32, n Neighbour) error {
	req, err := neighRequest(unix.RTM_DELNEIGH, 0,
		ndmsg{Family: familyOf(n.IP), Ifindex: ifindex}, n.IP, nil)
	if err != nil {
		return err
	}
	_, err = c.Execute(req)
	return err
}

// setFDB creates or replaces the vxlan FDB entry mac → dst (bridge fdb
// replace <mac> dev <vxlan> dst <dst> self permanent).
func setFDB(c *netlink.Conn, ifindex uint32, f FDBEntry) error {
	mac, err := net.ParseMAC(f.MAC)
	if err != nil {
		return err
	}
	req, err := neighRequest(unix.RTM_NEWNEIGH, netlink.Create|netlink.Replace,
		ndmsg{Family: unix.AF_BRIDGE, Ifindex: ifindex, State: unix.NUD_PERMANENT | unix.NUD_NOARP, Flags: unix.NTF_SELF},
		f.Dst, mac)
	if err != nil {
		return err
	}
	_, err = c.Execute(req)
	return err
}

// delFDB removes the whole FDB entry for a MAC, whatever its destinations.
func delFDB(c *netlink.Conn, ifindex uint32, f FDBEntry) error {
	mac, err := net.ParseMAC(f.MAC)
	if err != nil {
		return err
	}
	req, err := neighRequest(unix.RTM_DELNEIGH, 0,
		ndmsg{Family: unix.AF_BRIDGE, Ifindex: ifindex, Flags: unix.NTF_SELF}, netip.Addr{}, mac)
	if err != nil {
		return err
	}
	_, err = c.Execute(req)
	return err
}
