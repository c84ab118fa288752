package datapath

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// topology is pod -- node -- external, each in its own network namespace:
//
//	pod  eth0 10.244.1.5/32, default via 169.254.1.1 (permanent neighbour)
//	node sb<pod> (host veth, /32 route to the pod), uplink0 192.168.50.10/24
//	ext  eth0 192.168.50.1/24, no route back to the pod network
//
// so a pod connection to the external namespace only works masqueraded.
type topology struct {
	base           string // netns name prefix
	pod, node, ext string // netns paths
	uplinkIfindex  int
	podEndpoint    Endpoint   // the first pod
	attach         AttachMode // how config's datapath attaches ("" = auto)
}

// attachModes runs fn once per attach mode this kernel has: every
// topology test proves the datapath both with tcx and with classic tc
// (clsact + direct-action cls_bpf, the path of kernels before 6.6).
func attachModes(t *testing.T, fn func(t *testing.T, mode AttachMode)) {
	for _, mode := range []AttachMode{AttachTCX, AttachClassic} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == AttachTCX {
				if err := HaveTCX(); err != nil {
					t.Skipf("kernel without tcx: %v", err)
				}
			}
			fn(t, mode)
		})
	}
}

// progsOn lists the programs attached to ifindex's dir in the node
// namespace: by tcx, and by our classic tc filters (others counts foreign
// filters).
func (topo *topology) progsOn(t *testing.T, ifindex int, dir direction) (tcx, classic []uint32, others int) {
	t.Helper()
	attach := ebpf.AttachTCXIngress
	if dir == egress {
		attach = ebpf.AttachTCXEgress
	}
	err := netns.Do(topo.node, func() error {
		if HaveTCX() == nil {
			res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: attach})
			if err != nil {
				return err
			}
			for _, p := range res.Programs {
				tcx = append(tcx, uint32(p.ID))
			}
		}
		tc, err := dialTC()
		if err != nil {
			return err
		}
		defer tc.Close()
		ours, n, err := tc.filters(ifindex, dir)
		for _, f := range ours {
			classic = append(classic, f.ProgID)
		}
		others = n
		return err
	})
	if err != nil {
		t.Fatalf("programs on ifindex %d %s: %v", ifindex, dir, err)
	}
	return tcx, classic, others
}

// wantAttached fails unless exactly prog runs on ifindex's dir, attached
// in mode.
func (topo *topology) wantAttached(t *testing.T, mode AttachMode, ifindex int, dir direction, prog *ebpf.Program) {
	t.Helper()
	id, err := progID(prog)
	if err != nil {
		t.Fatal(err)
	}
	tcx, classic, _ := topo.progsOn(t, ifindex, dir)
	want := []uint32{id}
	got := tcx
	if mode == AttachClassic {
		got = classic
		if len(tcx) != 0 {
			t.Errorf("ifindex %d %s: tcx programs %v left beside classic tc", ifindex, dir, tcx)
		}
	} else if len(classic) != 0 {
		t.Errorf("ifindex %d %s: classic tc filters %v left beside tcx", ifindex, dir, classic)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("ifindex %d %s: %s programs %v, want %v", ifindex, dir, mode, got, want)
	}
}

// wantNothingOn fails if any program of ours runs on ifindex.
func (topo *topology) wantNothingOn(t *testing.T, ifindex int) {
	t.Helper()
	for _, dir := range []direction{ingress, egress} {
		if tcx, classic, _ := topo.progsOn(t, ifindex, dir); len(tcx)+len(classic) != 0 {
			t.Errorf("ifindex %d %s: tcx %v, classic %v; want nothing", ifindex, dir, tcx, classic)
		}
	}
}

var (
	topoPod    = netip.MustParseAddr("10.244.1.5")
	topoNode   = netip.MustParseAddr("192.168.50.10")
	topoExt    = netip.MustParseAddr("192.168.50.1")
	topoPrefix = netip.MustParsePrefix("10.244.0.0/16")
)

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func (topo *topology) newNetns(t *testing.T, role string) string {
	t.Helper()
	name := topo.base + "-" + role
	path, err := netns.Create(name)
	if err != nil {
		t.Fatalf("create %s netns: %v", role, err)
	}
	t.Cleanup(func() {
		if err := netns.Delete(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	ipCmd(t, "-n", name, "link", "set", "lo", "up")
	return path
}

func newTopology(t *testing.T) *topology {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and eBPF")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip to build the test topology")
	}
	topo := &topology{base: fmt.Sprintf("sbdp%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)}
	topo.node = topo.newNetns(t, "node")
	topo.ext = topo.newNetns(t, "ext")
	node, ext := topo.base+"-node", topo.base+"-ext"
	ipCmd(t, "-n", node, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", ext)
	ipCmd(t, "-n", node, "addr", "add", topoNode.String()+"/24", "dev", "uplink0")
	ipCmd(t, "-n", node, "link", "set", "uplink0", "up")
	ipCmd(t, "-n", ext, "addr", "add", topoExt.String()+"/24", "dev", "eth0")
	ipCmd(t, "-n", ext, "link", "set", "eth0", "up")
	topo.setForwarding(t, true)
	err := netns.Do(topo.node, func() error {
		up, err := net.InterfaceByName("uplink0")
		if err != nil {
			return err
		}
		topo.uplinkIfindex = up.Index
		return nil
	})
	if err != nil {
		t.Fatalf("configure node netns: %v", err)
	}
	topo.pod, topo.podEndpoint = topo.addPod(t, "pod", topoPod)
	return topo
}

func (topo *topology) setForwarding(t *testing.T, on bool) {
	t.Helper()
	v := []byte("0")
	if on {
		v = []byte("1")
	}
	err := netns.Do(topo.node, func() error { return os.WriteFile("/proc/sys/net/ipv4/ip_forward", v, 0o644) })
	if err != nil {
		t.Fatalf("set ip_forward in node netns: %v", err)
	}
}

// addPod wires a pod netns as the CNI plugin does: eth0 with addr/32, a
// default route via 169.254.1.1 whose neighbour is the host veth's MAC, and
// a /32 route to the pod on the node.
func (topo *topology) addPod(t *testing.T, role string, addr netip.Addr) (string, Endpoint) {
	t.Helper()
	path := topo.newNetns(t, role)
	pod, node := topo.base+"-"+role, topo.base+"-node"
	hostVeth := "sb" + role
	ipCmd(t, "-n", node, "link", "add", hostVeth, "type", "veth", "peer", "name", "eth0", "netns", pod)
	ipCmd(t, "-n", node, "link", "set", hostVeth, "up")
	ipCmd(t, "-n", node, "route", "add", addr.String()+"/32", "dev", hostVeth)
	ipCmd(t, "-n", pod, "addr", "add", addr.String()+"/32", "dev", "eth0")
	ipCmd(t, "-n", pod, "link", "set", "eth0", "up")
	ipCmd(t, "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
	ipCmd(t, "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
	ep := Endpoint{IP: addr, Local: true}
	err := netns.Do(topo.node, func() error {
		veth, err := net.InterfaceByName(hostVeth)
		if err != nil {
			return err
		}
		ep.Ifindex, ep.HostMAC = veth.Index, veth.HardwareAddr
		return nil
	})
	if err == nil {
		err = netns.Do(path, func() error {
			eth0, err := net.InterfaceByName("eth0")
			if err != nil {
				return err
			}
			ep.PodMAC = eth0.HardwareAddr
			return nil
		})
	}
	if err != nil {
		t.Fatalf("read pod %s interfaces: %v", role, err)
	}
	ipCmd(t, "-n", pod, "neigh", "add", "169.254.1.1", "lladdr", ep.HostMAC.String(), "dev", "eth0", "nud", "permanent")
	return path, ep
}

func (topo *topology) config(t *testing.T) Config {
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("sinabro-test-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6))
	t.Cleanup(func() {
		if err := Cleanup(root); err != nil {
			t.Errorf("cleanup %s: %v", root, err)
		}
	})
	return Config{
		BPFRoot:       root,
		UplinkIfindex: topo.uplinkIfindex,
		NodeIP:        topoNode,
		ClusterCIDRs:  []netip.Prefix{topoPrefix},
		NonMasqCIDRs:  []netip.Prefix{netip.PrefixFrom(topoNode, 32)},
		CTSize:        4096,
		Attach:        topo.attach,
	}
}

func (topo *topology) load(t *testing.T, cfg Config) *Datapath {
	t.Helper()
	var d *Datapath
	err := netns.Do(topo.node, func() (err error) {
		d, err = Load(context.Background(), cfg)
		return err
	})
	if err != nil {
		t.Fatalf("load datapath: %v", err)
	}
	return d
}

// in runs fn inside the namespace; sockets it creates stay there.
func in[T any](t *testing.T, path string, fn func() (T, error)) T {
	t.Helper()
	var v T
	if err := netns.Do(path, func() (err error) { v, err = fn(); return err }); err != nil {
		t.Fatalf("in %s: %v", filepath.Base(path), err)
	}
	return v
}

// echoServer accepts TCP connections in the external namespace and answers
// each line with "<remote address> <line>".
func echoServer(t *testing.T, ln net.Listener) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					fmt.Fprintf(c, "%s %s", c.RemoteAddr(), line)
				}
			}()
		}
	}()
}

func roundTrip(c net.Conn, r *bufio.Reader, msg string) (string, error) {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return "", err
	}
	line, err := r.ReadString('\n')
	return strings.TrimSpace(line), err
}

func TestMasqueradeTopology(t *testing.T) { attachModes(t, testMasqueradeTopology) }

func testMasqueradeTopology(t *testing.T, mode AttachMode) {
	topo := newTopology(t)
	topo.attach = mode
	cfg := topo.config(t)
	d := topo.load(t, cfg)
	defer func() { d.Close() }()

	ln := in(t, topo.ext, func() (net.Listener, error) { return net.Listen("tcp4", topoExt.String()+":8080") })
	defer ln.Close()
	echoServer(t, ln)

	// TCP: the server sees the node address and a port from the range.
	conn := in(t, topo.pod, func() (net.Conn, error) {
		return net.DialTimeout("tcp4", topoExt.String()+":8080", 3*time.Second)
	})
	defer conn.Close()
	r := bufio.NewReader(conn)
	got, err := roundTrip(conn, r, "one")
	if err != nil {
		t.Fatalf("tcp round trip: %v", err)
	}
	remote, _, _ := strings.Cut(got, " ")
	seen := netip.MustParseAddrPort(remote)
	if seen.Addr() != topoNode || seen.Port() < DefaultPortMin {
		t.Errorf("server saw the client as %v, want %v with a port >= %d", seen, topoNode, DefaultPortMin)
	}

	// UDP.
	udpSrv := in(t, topo.ext, func() (net.PacketConn, error) { return net.ListenPacket("udp4", topoExt.String()+":5353") })
	defer udpSrv.Close()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := udpSrv.ReadFrom(buf)
			if err != nil {
				return
			}
			udpSrv.WriteTo([]byte(from.String()+" "+string(buf[:n])), from)
		}
	}()
	udpConn := in(t, topo.pod, func() (net.Conn, error) { return net.Dial("udp4", topoExt.String()+":5353") })
	defer udpConn.Close()
	udpConn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := udpConn.Write([]byte("dns?")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	n, err := udpConn.Read(buf)
	if err != nil {
		t.Fatalf("udp reply: %v", err)
	}
	if from, _, _ := strings.Cut(string(buf[:n]), " "); netip.MustParseAddrPort(from).Addr() != topoNode {
		t.Errorf("udp server saw %s, want %v", from, topoNode)
	}

	// ICMP echo, through ping(8) in the pod.
	if _, err := exec.LookPath("ping"); err == nil {
		err := netns.Do(topo.pod, func() error {
			out, err := exec.Command("ping", "-c", "2", "-W", "2", "-i", "0.2", topoExt.String()).CombinedOutput()
			if err != nil {
				return fmt.Errorf("ping: %v: %s", err, out)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	} else {
		t.Log("ping not installed: ICMP echo not exercised end to end")
	}

	counters, err := Counters(d.objs.SbCounters)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("counters: %+v", counters)
	flows, err := Flows(d.objs.SbCt)
	if err != nil {
		t.Fatal(err)
	}
	var tcpFlow *Flow
	for i, f := range flows {
		t.Logf("flow: %d %v -> %v nat %v %s", f.Proto, f.Src, f.Dst, f.NAT, f.State)
		if f.Proto == 6 && f.NAT == seen {
			tcpFlow = &flows[i]
		}
	}
	if tcpFlow == nil || tcpFlow.State != "established" || tcpFlow.Src.Addr() != topoPod {
		t.Fatalf("no established conntrack entry for the TCP flow NATed to %v: %+v", seen, flows)
	}
	ids := linkIDs(t, d)
	if got := d.Config().Attach; got != mode {
		t.Errorf("datapath attached with %s, want %s", got, mode)
	}
	topo.wantAttached(t, mode, topo.uplinkIfindex, egress, d.objs.MasqEgress)
	topo.wantAttached(t, mode, topo.uplinkIfindex, ingress, d.objs.MasqIngress)

	// What `sinabro debug maps` and the metrics endpoint see.
	maps, err := ListMaps(cfg.BPFRoot)
	if err != nil {
		t.Fatal(err)
	}
	entries := map[string]int{}
	for _, m := range maps {
		t.Logf("map: %+v", m)
		entries[m.Name] = m.Entries
	}
	if entries["sb_ct"] != 2*len(flows) || entries["sb_masq_cidrs"] != 2 || entries["sb_counters"] != programSlots*reasonSlots {
		t.Errorf("map entries = %v, want sb_ct %d, sb_masq_cidrs 2, sb_counters %d", entries, 2*len(flows), programSlots*reasonSlots)
	}
	if n, err := d.GC(context.Background()); err != nil || n != 0 {
		t.Errorf("GC of fresh flows = %d, %v; want nothing deleted", n, err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(d.Collector())
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var snat float64
	for _, fam := range families {
		for _, m := range fam.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if fam.GetName() == "sinabro_datapath_packets_total" && labels["program"] == "masq_egress" && labels["reason"] == "snat" {
				snat = m.GetCounter().GetValue()
			}
			if fam.GetName() == "sinabro_datapath_conntrack_flows" && m.GetGauge().GetValue() != float64(len(flows)) {
				t.Errorf("sinabro_datapath_conntrack_flows = %v, want %d", m.GetGauge().GetValue(), len(flows))
			}
		}
	}
	if snat < 3 {
		t.Errorf("sinabro_datapath_packets_total{program=masq_egress,reason=snat} = %v, want >= 3", snat)
	}

	// The agent goes away: the pinned datapath keeps forwarding.
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := roundTrip(conn, r, "two"); err != nil {
		t.Fatalf("tcp after the loader closed: %v", err)
	}

	// A new agent adopts the maps and links: same links (classic tc: the
	// same filters, now running the new programs), same conntrack.
	cfg.PortMin, cfg.PortMax = 62000, 63000 // an upgrade with new constants
	d = topo.load(t, cfg)
	if got := linkIDs(t, d); got != ids {
		t.Errorf("links after reload = %v, want the adopted %v", got, ids)
	}
	topo.wantAttached(t, mode, topo.uplinkIfindex, egress, d.objs.MasqEgress)
	topo.wantAttached(t, mode, topo.uplinkIfindex, ingress, d.objs.MasqIngress)
	if got, err := roundTrip(conn, r, "three"); err != nil || !strings.HasPrefix(got, seen.String()+" ") {
		t.Fatalf("tcp after reload: %q, %v (want it still NATed to %v)", got, err, seen)
	}
	conn2 := in(t, topo.pod, func() (net.Conn, error) {
		return net.DialTimeout("tcp4", topoExt.String()+":8080", 3*time.Second)
	})
	defer conn2.Close()
	got2, err := roundTrip(conn2, bufio.NewReader(conn2), "new")
	if err != nil {
		t.Fatalf("new tcp connection after reload: %v", err)
	}
	remote2, _, _ := strings.Cut(got2, " ")
	if p := netip.MustParseAddrPort(remote2).Port(); p < 62000 || p > 63000 {
		t.Errorf("new connection NAT port %d, want one from the upgraded range 62000-63000", p)
	}

	// Cleanup detaches everything: the old connection's replies are no
	// longer translated. (Classic tc filters are found in the caller's
	// namespace.)
	d.Close()
	if err := netns.Do(topo.node, func() error { return Cleanup(cfg.BPFRoot) }); err != nil {
		t.Fatal(err)
	}
	topo.wantNothingOn(t, topo.uplinkIfindex)
	if _, err := os.Stat(cfg.BPFRoot); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bpf root still present after Cleanup: %v", err)
	}
	if _, err := roundTrip(conn, r, "four"); err == nil {
		t.Errorf("tcp still works after Cleanup: the datapath was not detached")
	}
}

type linkPair [2]string

// linkIDs identifies the uplink attachments: tcx link IDs, or classic
// tc filters (interface and direction: our priority and handle are fixed).
func linkIDs(t *testing.T, d *Datapath) linkPair {
	t.Helper()
	var ids linkPair
	for i, name := range []string{"masq_egress", "masq_ingress"} {
		ids[i] = attachmentID(t, d.links[name])
	}
	return ids
}

func attachmentID(t *testing.T, a attachment) string {
	t.Helper()
	switch a := a.(type) {
	case link.Link:
		info, err := a.Info()
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("tcx link %d on %d", info.ID, info.TCX().Ifindex)
	case tcAttachment:
		return fmt.Sprintf("tc filter on %d %s", a.Ifindex, a.Dir)
	}
	t.Fatalf("unknown attachment %T", a)
	return ""
}

func TestHostRoutingTopology(t *testing.T) { attachModes(t, testHostRoutingTopology) }

func testHostRoutingTopology(t *testing.T, mode AttachMode) {
	topo := newTopology(t)
	topo.attach = mode
	pod2Addr := netip.MustParseAddr("10.244.1.6")
	pod2, ep2 := topo.addPod(t, "pod2", pod2Addr)
	cfg := topo.config(t)
	d := topo.load(t, cfg)
	defer func() { d.Close() }()

	// Without forwarding in the node, only the datapath can join the pods.
	topo.setForwarding(t, false)
	ln := in(t, pod2, func() (net.Listener, error) { return net.Listen("tcp4", pod2Addr.String()+":8080") })
	defer ln.Close()
	echoServer(t, ln)
	dial := func() (net.Conn, error) {
		return net.DialTimeout("tcp4", pod2Addr.String()+":8080", time.Second)
	}
	if c, err := dialIn(topo.pod, dial); err == nil {
		c.Close()
		t.Fatal("pods reached each other without forwarding or host routing")
	}

	for _, ep := range []Endpoint{topo.podEndpoint, ep2} {
		if err := d.UpsertEndpoint(ep); err != nil {
			t.Fatal(err)
		}
		if err := netns.Do(topo.node, func() error { return d.AttachHostVeth(ep.Ifindex) }); err != nil {
			t.Fatal(err)
		}
	}
	conn := in(t, topo.pod, dial)
	defer conn.Close()
	r := bufio.NewReader(conn)
	got, err := roundTrip(conn, r, "hi")
	if err != nil {
		t.Fatalf("pod to pod through host routing: %v", err)
	}
	if from, _, _ := strings.Cut(got, " "); netip.MustParseAddrPort(from).Addr() != topoPod {
		t.Errorf("pod2 saw %s, want the unmasqueraded %v", from, topoPod)
	}

	// A restarted agent re-points the pinned host links at its programs.
	before := attachmentID(t, d.links[hostRouteLink.name(ep2.Ifindex)])
	d.Close()
	d = topo.load(t, cfg)
	after, ok := d.links[hostRouteLink.name(ep2.Ifindex)]
	if !ok {
		t.Fatalf("host link of ifindex %d not adopted: %v", ep2.Ifindex, d.links)
	}
	if got := attachmentID(t, after); got != before {
		t.Errorf("host attachment %s after reload, want the adopted %s", got, before)
	}
	topo.wantAttached(t, mode, ep2.Ifindex, ingress, d.objs.HostRoute)
	topo.wantAttached(t, mode, topo.podEndpoint.Ifindex, ingress, d.objs.HostRoute)
	if _, err := roundTrip(conn, r, "again"); err != nil {
		t.Fatalf("pod to pod after reload: %v", err)
	}

	// Replies from outside are handed straight to the pod too.
	topo.setForwarding(t, true)
	extLn := in(t, topo.ext, func() (net.Listener, error) { return net.Listen("tcp4", topoExt.String()+":8080") })
	defer extLn.Close()
	echoServer(t, extLn)
	extConn := in(t, topo.pod, func() (net.Conn, error) { return net.DialTimeout("tcp4", topoExt.String()+":8080", 3*time.Second) })
	defer extConn.Close()
	if _, err := roundTrip(extConn, bufio.NewReader(extConn), "out"); err != nil {
		t.Fatalf("pod to outside: %v", err)
	}
	counters, err := Counters(d.objs.SbCounters)
	if err != nil {
		t.Fatal(err)
	}
	got2 := map[string]uint64{}
	for _, c := range counters {
		got2[c.Program+"/"+c.Reason] = c.Packets
	}
	t.Logf("counters: %v", got2)
	if got2["host_route/redirect_local"] < 4 || got2["masq_ingress/redirect_local"] < 1 {
		t.Errorf("redirect counters = host_route %d, masq_ingress %d; want >= 4 and >= 1",
			got2["host_route/redirect_local"], got2["masq_ingress/redirect_local"])
	}

	if err := d.DetachHostVeth(ep2.Ifindex); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(hostLinkPath(cfg.BPFRoot, hostRouteLink, ep2.Ifindex)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("host link pin still present after DetachHostVeth: %v", err)
	}
	topo.wantNothingOn(t, ep2.Ifindex)
}

func dialIn(path string, dial func() (net.Conn, error)) (net.Conn, error) {
	var c net.Conn
	err := netns.Do(path, func() (err error) { c, err = dial(); return err })
	return c, err
}

func TestLoadMovesToNewUplink(t *testing.T) { attachModes(t, testLoadMovesToNewUplink) }

func testLoadMovesToNewUplink(t *testing.T, mode AttachMode) {
	topo := newTopology(t)
	topo.attach = mode
	cfg := topo.config(t)
	d := topo.load(t, cfg)
	old := linkIDs(t, d)
	d.Close()

	// The uplink changed (say, a bond was rebuilt): the pinned links are
	// replaced by links on the new interface.
	cfg.UplinkIfindex = topo.podEndpoint.Ifindex
	d = topo.load(t, cfg)
	defer d.Close()
	topo.wantNothingOn(t, topo.uplinkIfindex)
	topo.wantAttached(t, mode, cfg.UplinkIfindex, egress, d.objs.MasqEgress)
	topo.wantAttached(t, mode, cfg.UplinkIfindex, ingress, d.objs.MasqIngress)
	// New attachments (tcx: new links) on the new interface.
	got := linkIDs(t, d)
	for i := range got {
		if got[i] == old[i] {
			t.Errorf("attachment %s after the move, want a new one on ifindex %d", got[i], cfg.UplinkIfindex)
		}
	}
}

func TestLoadRejectsBadConfig(t *testing.T) {
	good := Config{BPFRoot: "/sys/fs/bpf/x", UplinkIfindex: 2, NodeIP: topoNode}
	tests := []struct {
		name string
		edit func(*Config)
	}{
		{"no root", func(c *Config) { c.BPFRoot = "" }},
		{"no uplink", func(c *Config) { c.UplinkIfindex = 0 }},
		{"IPv6 node", func(c *Config) { c.NodeIP = netip.MustParseAddr("fd00::1") }},
		{"inverted ports", func(c *Config) { c.PortMin, c.PortMax = 2000, 1000 }},
		{"IPv6 prefix", func(c *Config) { c.NonMasqCIDRs = []netip.Prefix{netip.MustParsePrefix("fd00::/8")} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := good
			tt.edit(&cfg)
			if _, err := Load(context.Background(), cfg); err == nil {
				t.Errorf("Load accepted %+v", cfg)
			}
		})
	}
}

// TestHostRoutingToOutside sends a pod's traffic for the outside straight
// out of the uplink (route_out): a FORWARD rule in the node that drops pod
// traffic does not see it, the uplink still masquerades it, and without
// RouteOut the same rule stops it (the test can fail).
func TestHostRoutingToOutside(t *testing.T) { attachModes(t, testHostRoutingToOutside) }

func testHostRoutingToOutside(t *testing.T, mode AttachMode) {
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nft for the FORWARD rule")
	}
	topo := newTopology(t)
	topo.attach = mode
	topo.setForwarding(t, true)
	node := topo.base + "-node"
	nft := exec.Command("ip", "netns", "exec", node, "nft", "-f", "-")
	nft.Stdin = strings.NewReader(`table ip sbfwd {
	chain forward {
		type filter hook forward priority 0; policy accept;
		ip saddr 10.244.0.0/16 counter drop
	}
}`)
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	extLn := in(t, topo.ext, func() (net.Listener, error) { return net.Listen("tcp4", topoExt.String()+":8080") })
	defer extLn.Close()
	echoServer(t, extLn)
	dial := func() (net.Conn, error) { return net.DialTimeout("tcp4", topoExt.String()+":8080", time.Second) }

	for _, routeOut := range []bool{true, false} {
		cfg := topo.config(t)
		cfg.RouteOut = routeOut
		d := topo.load(t, cfg)
		if err := d.UpsertEndpoint(topo.podEndpoint); err != nil {
			t.Fatal(err)
		}
		if err := netns.Do(topo.node, func() error { return d.AttachHostVeth(topo.podEndpoint.Ifindex) }); err != nil {
			t.Fatal(err)
		}
		conn, err := dialIn(topo.pod, dial)
		if !routeOut {
			if err == nil {
				conn.Close()
				t.Error("without RouteOut the pod's traffic skipped the node's FORWARD drop rule")
			}
			d.Close()
			continue
		}
		if err != nil {
			t.Fatalf("pod to outside with RouteOut: %v", err)
		}
		got, err := roundTrip(conn, bufio.NewReader(conn), "out")
		conn.Close()
		if err != nil {
			t.Fatalf("pod to outside with RouteOut: %v", err)
		}
		if from, _, _ := strings.Cut(got, " "); netip.MustParseAddrPort(from).Addr() != topoNode {
			t.Errorf("the outside saw %s, want the node address %v", from, topoNode)
		}
		if out, snat := counter(t, &d.objs, "host_route", "redirect_neigh"), counter(t, &d.objs, "masq_egress", "snat"); out < 3 || snat < 3 {
			t.Errorf("host_route redirect_neigh = %d, masq_egress snat = %d; want >= 3 each", out, snat)
		}
		if err := netns.Do(topo.node, func() error { return d.DetachHostVeth(topo.podEndpoint.Ifindex) }); err != nil {
			t.Fatal(err)
		}
		d.Close()
		Cleanup(cfg.BPFRoot)
	}
}

// TestAttachModeSwitch restarts the datapath in the other attach mode
// (an upgrade to a kernel with tcx, or --tc-attach changed): the new
// attachments take over and the old ones go, uplink and host veths alike,
// and the pod keeps reaching the outside throughout.
func TestAttachModeSwitch(t *testing.T) {
	if err := HaveTCX(); err != nil {
		t.Skipf("kernel without tcx: %v", err)
	}
	topo := newTopology(t)
	ep := topo.podEndpoint
	ln := in(t, topo.ext, func() (net.Listener, error) { return net.Listen("tcp4", topoExt.String()+":8080") })
	defer ln.Close()
	echoServer(t, ln)
	var (
		cfg  Config
		conn net.Conn
		r    *bufio.Reader
	)
	for i, mode := range []AttachMode{AttachTCX, AttachClassic, AttachTCX} {
		topo.attach = mode
		if i == 0 {
			cfg = topo.config(t)
		}
		cfg.Attach = mode
		d := topo.load(t, cfg)
		if err := d.UpsertEndpoint(ep); err != nil {
			t.Fatal(err)
		}
		if err := netns.Do(topo.node, func() error { return d.AttachHostVeth(ep.Ifindex) }); err != nil {
			t.Fatal(err)
		}
		topo.wantAttached(t, mode, topo.uplinkIfindex, egress, d.objs.MasqEgress)
		topo.wantAttached(t, mode, topo.uplinkIfindex, ingress, d.objs.MasqIngress)
		topo.wantAttached(t, mode, ep.Ifindex, ingress, d.objs.HostRoute)
		if i == 0 {
			conn = in(t, topo.pod, func() (net.Conn, error) {
				return net.DialTimeout("tcp4", topoExt.String()+":8080", 3*time.Second)
			})
			defer conn.Close()
			r = bufio.NewReader(conn)
		}
		if _, err := roundTrip(conn, r, fmt.Sprintf("with %s", mode)); err != nil {
			t.Fatalf("pod to outside, attached with %s: %v", mode, err)
		}
		d.Close()
	}
	// The last switch back to tcx removed the clsact qdiscs it found only
	// our filters on.
	out, err := exec.Command("ip", "netns", "exec", topo.base+"-node", "tc", "qdisc", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("tc qdisc show: %v: %s", err, out)
	}
	if strings.Contains(string(out), "clsact") {
		t.Errorf("clsact qdisc left after switching back to tcx:\n%s", out)
	}
	if err := netns.Do(topo.node, func() error { return Cleanup(cfg.BPFRoot) }); err != nil {
		t.Fatal(err)
	}
	topo.wantNothingOn(t, topo.uplinkIfindex)
	topo.wantNothingOn(t, ep.Ifindex)
}
