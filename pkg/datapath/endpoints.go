package datapath

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

const epLocal = 0x1 // see bpf/lib/host.h

// Endpoint is a pod known to the datapath.
type Endpoint struct {
	IP netip.Addr `json:"ip"`
	// Ifindex is the pod's host-side veth in the node's network namespace.
	Ifindex int              `json:"ifindex"`
	PodMAC  net.HardwareAddr `json:"podMAC"`
	HostMAC net.HardwareAddr `json:"hostMAC"`
	// Local pods get same-node traffic redirected straight to them.
	Local bool `json:"local"`
}

// MarshalJSON writes MACs as text rather than base64 bytes.
func (ep Endpoint) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		IP      netip.Addr `json:"ip"`
		Ifindex int        `json:"ifindex"`
		PodMAC  string     `json:"podMAC"`
		HostMAC string     `json:"hostMAC"`
		Local   bool       `json:"local"`
	}{ep.IP, ep.Ifindex, ep.PodMAC.String(), ep.HostMAC.String(), ep.Local})
}

// UpsertEndpoint adds or replaces the endpoint of ep.IP.
func (d *Datapath) UpsertEndpoint(ep Endpoint) error {
	if !ep.IP.Is4() || len(ep.PodMAC) != 6 || len(ep.HostMAC) != 6 {
		return fmt.Errorf("invalid endpoint %+v: want an IPv4 address and two MACs", ep)
	}
	v := datapathEndpoint{Ifindex: uint32(ep.Ifindex)}
	if ep.Local {
		v.Flags = epLocal
	}
	copy(v.PodMac[:], ep.PodMAC)
	copy(v.HostMac[:], ep.HostMAC)
	if err := d.objs.SbEndpoints.Put(be32(ep.IP), v); err != nil {
		return fmt.Errorf("put endpoint %v: %w", ep.IP, err)
	}
	return nil
}

// DeleteEndpoint removes the endpoint of ip; a missing one is not an error.
func (d *Datapath) DeleteEndpoint(ip netip.Addr) error {
	if err := d.objs.SbEndpoints.Delete(be32(ip)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %v: %w", ip, err)
	}
	return nil
}

// Endpoints lists an endpoints map.
func Endpoints(m *ebpf.Map) ([]Endpoint, error) {
	var (
		k   uint32
		v   datapathEndpoint
		out []Endpoint
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, Endpoint{
			IP:      addrFromBE32(k),
			Ifindex: int(v.Ifindex),
			PodMAC:  net.HardwareAddr(append([]byte(nil), v.PodMac[:]...)),
			HostMAC: net.HardwareAddr(append([]byte(nil), v.HostMac[:]...)),
			Local:   v.Flags&epLocal != 0,
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints: %w", err)
	}
	return out, nil
}

// hostLink is a program the datapath attaches to every pod's host veth.
type hostLink struct {
	prefix string // of its pin's name, followed by the ifindex
	dir    direction
	prog   func(*datapathObjects) *ebpf.Program
}

// hostLinks: host routing on the veth's ingress (packets leaving the pod)
// and, with NetworkPolicy, the ingress check on its egress (packets the
// stack hands to the pod).
var (
	hostRouteLink = hostLink{"host_route_", ingress, func(o *datapathObjects) *ebpf.Program { return o.HostRoute }}
	polToPodLink  = hostLink{"pol_to_pod_", egress, func(o *datapathObjects) *ebpf.Program { return o.PolToPod }}
	hostLinks     = []hostLink{hostRouteLink, polToPodLink}
)

func (h hostLink) name(ifindex int) string { return h.prefix + strconv.Itoa(ifindex) }

func hostLinkPath(root string, h hostLink, ifindex int) string {
	return filepath.Join(linksDir(root), h.name(ifindex))
}

// wantedHostLinks are the programs this configuration attaches to a veth.
func (d *Datapath) wantedHostLinks() []hostLink {
	if d.cfg.Policy {
		return hostLinks
	}
	return hostLinks[:1]
}

// AttachHostVeth attaches host routing (and the policy check) to a pod's
// host-side veth (idempotent; the links are pinned and survive the agent).
func (d *Datapath) AttachHostVeth(ifindex int) error {
	for _, h := range d.wantedHostLinks() {
		name := h.name(ifindex)
		if _, ok := d.links[name]; ok {
			continue
		}
		l, err := d.attach(name, ifindex, h.prog(&d.objs), h.dir)
		if err != nil {
			return err
		}
		d.links[name] = l
	}
	return nil
}

// DetachHostVeth removes our programs from a veth. Deleting the veth
// detaches them too; this also removes the pins.
func (d *Datapath) DetachHostVeth(ifindex int) error {
	var errs []error
	for _, h := range hostLinks {
		errs = append(errs, d.detachHostLink(h, ifindex))
	}
	return errors.Join(errs...)
}

func (d *Datapath) detachHostLink(h hostLink, ifindex int) error {
	name := h.name(ifindex)
	path := hostLinkPath(d.cfg.BPFRoot, h, ifindex)
	if l, ok := d.links[name]; ok {
		delete(d.links, name)
		l.Close()
	}
	old, err := loadPin(path)
	if err != nil {
		return nil // nothing pinned
	}
	defer old.Close()
	if old.prog != nil {
		// Classic tc: the filter is not tied to the pin. Only ours, and
		// only while it still runs this pin's program (the ifindex may have
		// been reused).
		id, err := progID(old.prog)
		if err != nil {
			return err
		}
		ours, _, err := d.tc.filters(ifindex, h.dir)
		if err != nil {
			return err
		}
		if len(ours) == 1 && ours[0].ProgID == id {
			if err := d.tc.deleteFilter(ifindex, h.dir); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unpin host link %s: %w", path, err)
	}
	return nil
}

// adoptHostLinks points every pinned host-veth link at the newly loaded
// program, and drops the pins of veths that are gone (and of the policy
// check when NetworkPolicy is now off).
func (d *Datapath) adoptHostLinks() error {
	entries, err := os.ReadDir(linksDir(d.cfg.BPFRoot))
	if err != nil {
		return fmt.Errorf("list pinned links: %w", err)
	}
	for _, e := range entries {
		for _, h := range hostLinks {
			idx, ok := strings.CutPrefix(e.Name(), h.prefix)
			if !ok {
				continue
			}
			ifindex, err := strconv.Atoi(idx)
			if err != nil {
				continue
			}
			if err := d.adoptHostLink(h, ifindex); err != nil {
				return err
			}
		}
	}
	return nil
}

func (d *Datapath) adoptHostLink(h hostLink, ifindex int) error {
	path := hostLinkPath(d.cfg.BPFRoot, h, ifindex)
	if h.dir == egress && !d.cfg.Policy {
		return d.detachHostLink(h, ifindex)
	}
	alive, err := d.hostAttachmentAlive(path, ifindex, h.dir)
	if err != nil {
		return err
	}
	if !alive {
		// The veth went away with its pod.
		os.Remove(path)
		return nil
	}
	// Re-pointed in place (tcx: link.Update; classic: the filter is
	// replaced), or moved to the configured mode.
	l, err := d.attach(h.name(ifindex), ifindex, h.prog(&d.objs), h.dir)
	if err != nil {
		return fmt.Errorf("adopt host attachment %s: %w", path, err)
	}
	d.links[h.name(ifindex)] = l
	return nil
}

// hostAttachmentAlive reports whether the pin at path records host
// routing still attached to ifindex: a tcx link on it, or our filter on it
// running the pinned program.
func (d *Datapath) hostAttachmentAlive(path string, ifindex int, dir direction) (bool, error) {
	p, err := loadPin(path)
	if err != nil {
		return false, nil // not ours to understand: dropped
	}
	defer p.Close()
	switch {
	case p.link != nil:
		info, err := p.link.Info()
		return err == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex, nil
	case p.prog != nil:
		id, err := progID(p.prog)
		if err != nil {
			return false, err
		}
		ours, _, err := d.tc.filters(ifindex, dir)
		if err != nil {
			return false, err
		}
		return len(ours) == 1 && ours[0].ProgID == id, nil
	}
	return false, nil
}
