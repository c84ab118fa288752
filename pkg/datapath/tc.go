package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Classic tc over netlink: the clsact qdisc and direct-action cls_bpf
// filters, for kernels without tcx (< 6.6). rtnetlink/v2 has no traffic
// control messages, so they are encoded here (linux/rtnetlink.h struct
// tcmsg, linux/pkt_cls.h TCA_BPF_*).

const (
	tcHandleClsact     = 0xffff0000 // TC_H_MAKE(TC_H_CLSACT, 0)
	tcParentClsact     = 0xfffffff1 // TC_H_CLSACT
	tcParentIngress    = 0xfffffff2 // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
	tcParentEgress     = 0xfffffff3 // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
	tcaBPFFD           = 6          // TCA_BPF_FD
	tcaBPFName         = 7          // TCA_BPF_NAME
	tcaBPFFlags        = 8          // TCA_BPF_FLAGS
	tcaBPFID           = 11         // TCA_BPF_ID
	tcaBPFFlagDirect   = 1          // TCA_BPF_FLAG_ACT_DIRECT
	sizeofTcMsg        = 20
	sizeofIfInfoMsg    = 16
	tcFilterPriority   = 1    // first in the chain: ours decide before anyone else's
	tcFilterHandle     = 0x5b // one filter per interface and direction
	tcFilterNamePrefix = "sinabro:"
)

// direction is the side of an interface a program runs on.
type direction int

const (
	ingress direction = iota
	egress
)

func (d direction) String() string {
	if d == egress {
		return "egress"
	}
	return "ingress"
}

func (d direction) tcParent() uint32 {
	if d == egress {
		return tcParentEgress
	}
	return tcParentIngress
}

// tcFilter is one of our cls_bpf filters as the kernel reports it.
type tcFilter struct {
	Ifindex int
	Dir     direction
	ProgID  uint32
	Name    string
}

// tcConn is a rtnetlink socket for traffic control. Its network namespace
// is the one it was opened in, whichever thread uses it later.
type tcConn struct{ c *netlink.Conn }

func dialTC() (*tcConn, error) {
	c, err := netlink.Dial(unix.NETLINK_ROUTE, &netlink.Config{Strict: true})
	if err != nil {
		return nil, fmt.Errorf("dial rtnetlink for tc: %w", err)
	}
	return &tcConn{c: c}, nil
}

func (t *tcConn) Close() error { return t.c.Close() }

func tcMsg(ifindex int, handle, parent, info uint32) []byte {
	b := make([]byte, sizeofTcMsg)
	b[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(b[4:], uint32(int32(ifindex)))
	binary.NativeEndian.PutUint32(b[8:], handle)
	binary.NativeEndian.PutUint32(b[12:], parent)
	binary.NativeEndian.PutUint32(b[16:], info)
	return b
}

// filterInfo is tcm_info of our filters: priority and protocol ETH_P_ALL
// (network order).
func filterInfo() uint32 {
	var proto [2]byte
	binary.BigEndian.PutUint16(proto[:], unix.ETH_P_ALL)
	return tcFilterPriority<<16 | uint32(binary.NativeEndian.Uint16(proto[:]))
}

func (t *tcConn) execute(typ uint16, flags netlink.HeaderFlags, data []byte) ([]netlink.Message, error) {
	return t.c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(typ), Flags: netlink.Request | flags},
		Data:   data,
	})
}

func kindAttr(kind string) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.TCA_KIND, kind)
	return ae.Encode()
}

// ensureClsact adds the clsact qdisc to ifindex; created reports whether
// it was not there before.
func (t *tcConn) ensureClsact(ifindex int) (created bool, err error) {
	attrs, err := kindAttr("clsact")
	if err != nil {
		return false, err
	}
	_, err = t.execute(unix.RTM_NEWQDISC, netlink.Create|netlink.Excl|netlink.Acknowledge,
		append(tcMsg(ifindex, tcHandleClsact, tcParentClsact, 0), attrs...))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EEXIST):
		return false, nil
	}
	return false, fmt.Errorf("add clsact qdisc to ifindex %d: %w", ifindex, err)
}

// deleteClsact removes the clsact qdisc of ifindex (and any filter left on
// it); a missing qdisc or interface is not an error.
func (t *tcConn) deleteClsact(ifindex int) error {
	attrs, err := kindAttr("clsact")
	if err != nil {
		return err
	}
	_, err = t.execute(unix.RTM_DELQDISC, netlink.Acknowledge, append(tcMsg(ifindex, tcHandleClsact, tcParentClsact, 0), attrs...))
	if err != nil && !isGone(err) {
		return fmt.Errorf("delete clsact qdisc of ifindex %d: %w", ifindex, err)
	}
	return nil
}

// replaceFilter makes our filter on ifindex's dir run fd as a
// direct-action cls_bpf program. An existing filter (same priority and
// handle) switches to the new program atomically: no packet goes unseen.
func (t *tcConn) replaceFilter(ifindex int, dir direction, fd int, name string) error {
	return t.addFilter(ifindex, dir, fd, name, tcFilterHandle)
}

// tcProbeHandle is the handle of HaveClassicTC's filter.
const tcProbeHandle = 0x5c

// addFilter adds or replaces the direct-action cls_bpf filter with handle
// on ifindex's dir.
func (t *tcConn) addFilter(ifindex int, dir direction, fd int, name string, handle uint32) error {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.TCA_KIND, "bpf")
	ae.Nested(unix.TCA_OPTIONS, func(nae *netlink.AttributeEncoder) error {
		nae.Uint32(tcaBPFFD, uint32(fd))
		nae.String(tcaBPFName, tcFilterNamePrefix+name)
		nae.Uint32(tcaBPFFlags, tcaBPFFlagDirect)
		return nil
	})
	attrs, err := ae.Encode()
	if err != nil {
		return err
	}
	_, err = t.execute(unix.RTM_NEWTFILTER, netlink.Create|netlink.Replace|netlink.Acknowledge,
		append(tcMsg(ifindex, handle, dir.tcParent(), filterInfo()), attrs...))
	if err != nil {
		return fmt.Errorf("replace cls_bpf filter %s on ifindex %d %s: %w", name, ifindex, dir, err)
	}
	return nil
}

// deleteFilter removes our filter from ifindex's dir; a missing filter,
// qdisc or interface is not an error.
func (t *tcConn) deleteFilter(ifindex int, dir direction) error {
	return t.deleteFilterHandle(ifindex, dir, tcFilterHandle)
}

func (t *tcConn) deleteFilterHandle(ifindex int, dir direction, handle uint32) error {
	attrs, err := kindAttr("bpf")
	if err != nil {
		return err
	}
	_, err = t.execute(unix.RTM_DELTFILTER, netlink.Acknowledge,
		append(tcMsg(ifindex, handle, dir.tcParent(), filterInfo()), attrs...))
	if err != nil && !isGone(err) {
		return fmt.Errorf("delete cls_bpf filter on ifindex %d %s: %w", ifindex, dir, err)
	}
	return nil
}

// isGone reports errors meaning the interface, qdisc or filter is not
// there.
func isGone(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.EINVAL)
}

// filters lists the bpf filters on ifindex's dir; ours reports whether
// each is one of ours (our priority and handle). A missing interface or
// qdisc gives none.
func (t *tcConn) filters(ifindex int, dir direction) (ours []tcFilter, others int, err error) {
	msgs, err := t.execute(unix.RTM_GETTFILTER, netlink.Dump, tcMsg(ifindex, 0, dir.tcParent(), 0))
	if err != nil {
		if isGone(err) {
			return nil, 0, nil
		}
		return nil, 0, fmt.Errorf("list tc filters of ifindex %d %s: %w", ifindex, dir, err)
	}
	for _, m := range msgs {
		if len(m.Data) < sizeofTcMsg {
			continue
		}
		handle := binary.NativeEndian.Uint32(m.Data[8:])
		info := binary.NativeEndian.Uint32(m.Data[16:])
		if handle == 0 { // a chain's head, not a filter
			continue
		}
		f := tcFilter{Ifindex: ifindex, Dir: dir}
		ad, err := netlink.NewAttributeDecoder(m.Data[sizeofTcMsg:])
		if err != nil {
			return nil, 0, err
		}
		kind := ""
		for ad.Next() {
			switch ad.Type() {
			case unix.TCA_KIND:
				kind = ad.String()
			case unix.TCA_OPTIONS:
				if kind != "bpf" {
					continue
				}
				ad.Nested(func(nad *netlink.AttributeDecoder) error {
					for nad.Next() {
						switch nad.Type() {
						case tcaBPFID:
							f.ProgID = nad.Uint32()
						case tcaBPFName:
							f.Name = nad.String()
						}
					}
					return nad.Err()
				})
			}
		}
		if err := ad.Err(); err != nil {
			return nil, 0, fmt.Errorf("decode tc filter of ifindex %d: %w", ifindex, err)
		}
		if kind == "bpf" && handle == tcFilterHandle && info>>16 == tcFilterPriority {
			ours = append(ours, f)
		} else {
			others++
		}
	}
	return ours, others, nil
}

// links lists the ifindexes of the namespace's interfaces.
func (t *tcConn) links() ([]int, error) {
	msgs, err := t.execute(unix.RTM_GETLINK, netlink.Dump, make([]byte, sizeofIfInfoMsg))
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []int
	for _, m := range msgs {
		if len(m.Data) >= sizeofIfInfoMsg {
			out = append(out, int(int32(binary.NativeEndian.Uint32(m.Data[4:]))))
		}
	}
	return out, nil
}

// removeFilters deletes our filters, on any interface of the namespace,
// that run one of the programs ids, then the clsact qdiscs left empty.
func (t *tcConn) removeFilters(ids map[uint32]bool) error {
	ifindexes, err := t.links()
	if err != nil {
		return err
	}
	var errs []error
	for _, ifindex := range ifindexes {
		removed, left := false, 0
		for _, dir := range []direction{ingress, egress} {
			ours, others, err := t.filters(ifindex, dir)
			if err != nil {
				errs = append(errs, err)
				left++
				continue
			}
			left += others
			for _, f := range ours {
				if !ids[f.ProgID] {
					left++
					continue
				}
				if err := t.deleteFilter(ifindex, dir); err != nil {
					errs = append(errs, err)
					left++
					continue
				}
				removed = true
			}
		}
		// The qdisc only served our filters: an empty clsact does nothing,
		// and removing it leaves the interface as we found it.
		if removed && left == 0 {
			errs = append(errs, t.deleteClsact(ifindex))
		}
	}
	return errors.Join(errs...)
}
