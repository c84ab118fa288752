package lab

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/flows"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// CheckOptions are the flags of `sinabro lab check`.
type CheckOptions struct {
	Dir     string
	Verbose bool
	Timeout time.Duration // per probe
}

// Endpoint is something the check sends from or to.
type Endpoint struct {
	Name  string
	Kind  string // "pod", "node" or "external"
	Netns string
	IP    string
	Node  string // the node a pod runs on; a node's own name
	// Cgroup is the cgroup v2 directory a process of this endpoint would
	// be in (lab nodes and stand-in pods): probe sockets are opened there
	// so the node's socket programs (Service load balancing) see them.
	Cgroup string
}

// Probe is one connectivity test.
type Probe struct {
	Category string
	Src, Dst Endpoint
	Proto    string // "tcp", "udp" or "icmp"
	Port     int    // tcp, udp: destination port; 0 is the test server's
	OK       bool
	Latency  time.Duration
	Seen     string // source address the server saw (tcp, udp)
	Want     string // required Seen, if any
	Err      string
}

// StateCheck is one cluster-state assertion.
type StateCheck struct {
	What   string
	OK     bool
	Detail string
}

// CheckResult holds every probe and state check.
type CheckResult struct {
	State     []StateCheck
	Probes    []Probe
	Shortcuts []ShortcutProbe // same-node TCP acceleration, one per node with two pods
	Policy    []PolicyProbe   // NetworkPolicy, with a temporary policy (checkpolicy.go)
}

// Categories of probes, in print order.
var categories = []string{"pod↔pod same node", "pod↔pod across nodes", "node→pod", "pod→node", "pod→external",
	catSvcSameNode, catSvcOtherNode, catSvcOutside, catSvcHairpin, catNodeSvc, catNodePort, catNodePortLocal, catPodNodePort}

const (
	catSvcSameNode   = "pod→ClusterIP backend same node"
	catSvcOtherNode  = "pod→ClusterIP backend other node"
	catSvcOutside    = "pod→ClusterIP backend outside"
	catSvcHairpin    = "pod→own ClusterIP (hairpin)"
	catNodeSvc       = "node→ClusterIP"
	catNodePort      = "external→NodePort"
	catNodePortLocal = "external→NodePort eTP=Local"
	catPodNodePort   = "pod→NodePort other node"
)

// Check probes the lab's connectivity from inside its namespaces.
func Check(ctx context.Context, o CheckOptions) (*CheckResult, error) {
	if o.Timeout == 0 {
		o.Timeout = 2 * time.Second
	}
	cfg, err := LoadConfig(o.Dir)
	if err != nil {
		return nil, err
	}
	cs, err := AdminClient(o.Dir)
	if err != nil {
		return nil, err
	}
	res := &CheckResult{}
	began := time.Now()
	nodeList, err := cs.Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	var nodes, pods []Endpoint
	nodeIP := map[string]string{}
	for _, n := range nodeList.Items {
		ready := nodeReady(&n)
		res.State = append(res.State, StateCheck{What: "node " + n.Name + " Ready", OK: ready,
			Detail: fmt.Sprintf("InternalIP %s, podCIDR %s", internalIP(&n), n.Spec.PodCIDR)})
		nodeIP[n.Name] = internalIP(&n)
		ep := Endpoint{Name: n.Name, Kind: "node", Netns: cfg.NodeNetns(n.Name), IP: internalIP(&n), Node: n.Name,
			Cgroup: cfg.NodeCgroup(n.Name)}
		if cfg.realNodes() {
			ep.Cgroup = cfg.realNodeProbeCgroup(n.Name)
		}
		nodes = append(nodes, ep)
	}
	podList, err := cs.Pods(podNamespace).List(ctx, metav1.ListOptions{LabelSelector: labelApp + "=pod"})
	if err != nil {
		return nil, fmt.Errorf("list pods: %w", err)
	}
	var real map[string]realPod
	if cfg.realNodes() {
		real = realPods(cfg.LabName())
	}
	for _, p := range podList.Items {
		running := p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" && p.DeletionTimestamp == nil
		ns := cfg.PodNetns(string(p.UID))
		if cfg.realNodes() {
			ns = real[p.Name].netns
			running = running && ns != ""
		}
		res.State = append(res.State, StateCheck{What: "pod " + p.Name + " Running", OK: running,
			Detail: fmt.Sprintf("on %s, IP %s, netns %s", p.Spec.NodeName, p.Status.PodIP, ns)})
		if running {
			ep := Endpoint{Name: p.Name, Kind: "pod", Netns: ns, IP: p.Status.PodIP, Node: p.Spec.NodeName,
				Cgroup: cfg.NodePodCgroup(p.Spec.NodeName)}
			if cfg.realNodes() {
				ep.Cgroup = real[p.Name].cgroup
			}
			pods = append(pods, ep)
		}
	}
	ext := Endpoint{Name: "external", Kind: "external", Netns: cfg.nsExternal(), IP: cfg.externalAddr().String()}

	var probes []Probe
	add := func(cat string, src, dst Endpoint, want string) {
		for _, proto := range []string{"tcp", "udp", "icmp"} {
			w := want
			if proto == "icmp" {
				w = ""
			}
			probes = append(probes, Probe{Category: cat, Src: src, Dst: dst, Proto: proto, Want: w})
		}
	}
	for _, a := range pods {
		for _, b := range pods {
			switch {
			case a.Name == b.Name:
			case a.Node == b.Node:
				add(categories[0], a, b, a.IP) // no NAT between pods
			default:
				add(categories[1], a, b, a.IP)
			}
		}
	}
	for _, n := range nodes {
		for _, p := range pods {
			add(categories[2], n, p, "")
		}
	}
	for _, p := range pods {
		for _, n := range nodes {
			add(categories[3], p, n, "")
		}
	}
	for _, p := range pods {
		// Masquerade: the external host must see the pod's node address.
		add(categories[4], p, ext, nodeIP[p.Node])
	}
	svcProbes, state, err := serviceProbes(ctx, cfg, cs, nodes, pods, ext, nodeIP)
	if err != nil {
		return nil, err
	}
	probes = append(probes, svcProbes...)
	res.State = append(res.State, state...)
	if cfg.realNodes() {
		res.State = append(res.State, dnsChecks(ctx, cfg, cs, pods, o.Timeout)...)
	}

	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := range probes {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			runProbe(ctx, &probes[i], o.Timeout)
		})
	}
	wg.Wait()
	res.Probes = probes

	// NetworkPolicy last: its temporary policy must not touch the probes above.
	if res.Policy, err = checkPolicy(ctx, cs, nodes, pods); err != nil {
		return nil, err
	}

	// TCP acceleration: one same-node pod pair per node.
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	byNode := map[string][]Endpoint{}
	for _, p := range pods {
		byNode[p.Node] = append(byNode[p.Node], p)
	}
	for _, n := range nodes {
		if ps := byNode[n.Name]; len(ps) >= 2 && !cfg.realNodes() {
			sp := ShortcutProbe{Node: n.Name, Src: ps[0], Dst: ps[1]}
			cfg.probeShortcut(ctx, exe, &sp)
			res.Shortcuts = append(res.Shortcuts, sp)
		}
	}
	if !cfg.realNodes() && !slices.Contains(cfg.AgentArgs, "--flow-telemetry=false") {
		res.State = append(res.State, flowChecks(ctx, cfg, began, len(res.Policy) > 0)...)
	}
	return res, nil
}

func runProbe(ctx context.Context, p *Probe, timeout time.Duration) {
	var err error
	// A Service's rules may lag its endpoints by kube-proxy's sync period:
	// a refused or unreachable connection (no endpoint or no rule yet: the
	// ClusterIP is routed to the router) is tried again until timeout.
	retry := p.Dst.Kind == "service" || p.Dst.Kind == "nodeport"
	switch p.Proto {
	case "tcp":
		p.Seen, p.Latency, err = probeTCP(p.Src, p.Dst.IP, cmp.Or(p.Port, ServeTCPPort), timeout, retry)
	case "udp":
		p.Seen, p.Latency, err = probeUDP(p.Src, p.Dst.IP, cmp.Or(p.Port, ServeUDPPort), timeout, retry)
	case "icmp":
		p.Latency, err = probeICMP(p.Src.Netns, p.Dst.IP, timeout)
	}
	switch {
	case err != nil:
		p.Err = err.Error()
	case p.Want != "" && p.Seen != p.Want:
		p.Err = fmt.Sprintf("server saw source %s, want %s", p.Seen, p.Want)
	default:
		p.OK = true
	}
}

// inEndpoint creates a socket inside src's namespace and cgroup; it stays
// in both afterwards.
//
// Every probe socket goes through here, with or without a cgroup: while
// one is opened in a node's cgroup the whole process is there, and another
// opened meanwhile would be seen by that node's socket programs.
func inEndpoint[T any](src Endpoint, fn func() (T, error)) (T, error) {
	return inNetns(src.Netns, func() (T, error) {
		var zero T
		leave, err := cgroup.Enter(src.Cgroup)
		if err != nil {
			return zero, err
		}
		out, err := fn()
		if lerr := leave(); lerr != nil && err == nil {
			return out, lerr
		}
		return out, err
	})
}

// inNetns creates a socket inside the namespace; it stays there afterwards.
func inNetns[T any](ns string, fn func() (T, error)) (T, error) {
	var out T
	err := netns.Do(nsPath(ns), func() error {
		var err error
		out, err = fn()
		return err
	})
	return out, err
}

// nsPath is the file of a namespace named ns: a lab namespace's name, or a
// path already (a real pod's /proc/PID/ns/net).
func nsPath(ns string) string {
	if strings.HasPrefix(ns, "/") {
		return ns
	}
	return netns.Path(ns)
}

// realPod is where a test pod of a real node runs: its network namespace
// (/proc/PID/ns/net) and the cgroup v2 directory of its container, where
// a probe's socket must be opened for the node's socket programs to see it.
type realPod struct{ netns, cgroup string }

// realPods finds the test pods of real nodes by the lab's variable in
// their server's environment.
func realPods(lab string) map[string]realPod {
	out := map[string]realPod{}
	envs, _ := filepath.Glob("/proc/[0-9]*/environ")
	want := []byte(labPodEnv + "=" + lab + "/")
	for _, e := range envs {
		b, err := os.ReadFile(e)
		if err != nil || !bytes.Contains(b, want) {
			continue
		}
		for _, kv := range bytes.Split(b, []byte{0}) {
			if pod, ok := bytes.CutPrefix(kv, want); ok {
				dir := filepath.Dir(e)
				out[string(pod)] = realPod{netns: filepath.Join(dir, "ns", "net"), cgroup: cgroupOf(dir)}
			}
		}
	}
	return out
}

// cgroupOf is the cgroup v2 directory of the process /proc/PID; "" when
// unknown (the probe then runs in the lab's own cgroup).
func cgroupOf(proc string) string {
	dir, _ := cgroup.Of(proc)
	return dir
}

// realNodeProbeCgroup is a leaf cgroup in a real node's cgroup root (the
// kubelet's), standing for the node's host processes: probes from the node
// open their sockets there. Created on first use; "" when the node has no
// cgroup root (yet).
func (c *Config) realNodeProbeCgroup(node string) string {
	mnt, err := cgroup.V2Mount()
	if err != nil {
		return ""
	}
	root := filepath.Join(mnt, c.nodeCgroupRoot(node))
	if !fileExists(root) {
		return ""
	}
	dir := filepath.Join(root, "lab-probes")
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		return ""
	}
	return dir
}

// The probes time one request/reply exchange (after the TCP handshake).

func probeTCP(src Endpoint, ip string, port int, timeout time.Duration, retry bool) (string, time.Duration, error) {
	addr := net.JoinHostPort(ip, fmt.Sprint(port))
	deadline := time.Now().Add(timeout)
	var c net.Conn
	var err error
	for {
		c, err = inEndpoint(src, func() (net.Conn, error) { return net.DialTimeout("tcp", addr, time.Until(deadline)) })
		if err == nil || !retry || !transient(err) || time.Until(deadline) < 200*time.Millisecond {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return "", 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	start := time.Now()
	if _, err := c.Write([]byte("probe\n")); err != nil {
		return "", 0, err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", 0, fmt.Errorf("read reply: %w", err)
	}
	return parsePeer(line), time.Since(start), nil
}

func probeUDP(src Endpoint, ip string, port int, timeout time.Duration, retry bool) (string, time.Duration, error) {
	addr := net.JoinHostPort(ip, fmt.Sprint(port))
	c, err := inEndpoint(src, func() (net.Conn, error) { return net.Dial("udp", addr) })
	if err != nil {
		return "", 0, err
	}
	defer c.Close()
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 512)
	// Datagrams may be lost (first packet while ARP resolves): retry.
	for time.Now().Before(deadline) {
		start := time.Now()
		c.Write([]byte("probe\n"))
		c.SetReadDeadline(minTime(deadline, time.Now().Add(timeout/4)))
		n, err := c.Read(buf)
		if err == nil {
			return parsePeer(string(buf[:n])), time.Since(start), nil
		}
		if retry && transient(err) {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return "", 0, err
		}
	}
	return "", 0, errors.New("no UDP reply")
}

// transient tells the errors of a Service not programmed yet.
func transient(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EHOSTUNREACH)
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func probeICMP(ns, ip string, timeout time.Duration) (time.Duration, error) {
	dst := net.ParseIP(ip)
	c, err := inNetns(ns, func() (*icmp.PacketConn, error) { return icmp.ListenPacket("ip4:icmp", "0.0.0.0") })
	if err != nil {
		return 0, fmt.Errorf("icmp socket: %w", err)
	}
	defer c.Close()
	id, seq := rand.IntN(0xffff), rand.IntN(0xffff)
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("sinabro-lab")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return 0, err
	}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 1500)
	for time.Now().Before(deadline) {
		start := time.Now()
		if _, err := c.WriteTo(b, &net.IPAddr{IP: dst}); err != nil {
			return 0, fmt.Errorf("send echo: %w", err)
		}
		c.SetReadDeadline(minTime(deadline, time.Now().Add(timeout/4)))
		for {
			n, peer, err := c.ReadFrom(buf)
			if err != nil {
				break // resend on timeout
			}
			rm, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || rm.Type != ipv4.ICMPTypeEchoReply {
				continue
			}
			if e, ok := rm.Body.(*icmp.Echo); ok && e.ID == id && e.Seq == seq && peer.(*net.IPAddr).IP.Equal(dst) {
				return time.Since(start), nil
			}
		}
	}
	return 0, errors.New("no echo reply")
}

// Failures counts failed probes and state checks.
func (r *CheckResult) Failures() int {
	n := 0
	for _, s := range r.State {
		if !s.OK {
			n++
		}
	}
	for _, p := range r.Probes {
		if !p.OK {
			n++
		}
	}
	for _, p := range r.Shortcuts {
		if !p.OK {
			n++
		}
	}
	for _, p := range r.Policy {
		if !p.OK {
			n++
		}
	}
	return n
}

// Summary is a one-line count.
func (r *CheckResult) Summary() string {
	ok := 0
	for _, p := range r.Probes {
		if p.OK {
			ok++
		}
	}
	sok := 0
	for _, s := range r.State {
		if s.OK {
			sok++
		}
	}
	aok := 0
	for _, p := range r.Shortcuts {
		if p.OK {
			aok++
		}
	}
	pok := 0
	for _, p := range r.Policy {
		if p.OK {
			pok++
		}
	}
	return fmt.Sprintf("%d/%d probes ok, %d/%d accelerated, %d/%d NetworkPolicy verdicts ok, %d/%d state checks ok",
		ok, len(r.Probes), aok, len(r.Shortcuts), pok, len(r.Policy), sok, len(r.State))
}

func mark(ok bool) string {
	if ok {
		return "✓"
	}
	return "✗"
}

// Print writes the state checks and a table with one row per (src, dst)
// pair and a column per protocol. Failures always get their error line.
func (r *CheckResult) Print(out io.Writer, verbose bool) {
	fmt.Fprintln(out, "cluster state")
	for _, s := range r.State {
		fmt.Fprintf(out, "  %s %s (%s)\n", mark(s.OK), s.What, s.Detail)
	}
	type key struct{ cat, src, dst string }
	rows := map[key][]Probe{}
	var keys []key
	for _, p := range r.Probes {
		k := key{p.Category, p.Src.Name, p.Dst.Name}
		if _, ok := rows[k]; !ok {
			keys = append(keys, k)
		}
		rows[k] = append(rows[k], p)
	}
	catIdx := map[string]int{}
	for i, c := range categories {
		catIdx[c] = i
	}
	sort.SliceStable(keys, func(i, j int) bool { return catIdx[keys[i].cat] < catIdx[keys[j].cat] })

	fmt.Fprintln(out, "\nconnectivity")
	tw := tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	fmt.Fprintln(tw, "  CHECK\tFROM\tTO\tTCP\tUDP\tICMP\tSOURCE SEEN")
	var errs []string
	for _, k := range keys {
		ps := rows[k]
		cols := map[string]string{}
		seen := ""
		for _, p := range ps {
			cols["icmp"] = cmp.Or(cols["icmp"], "-")
			cols[p.Proto] = "✗"
			if p.OK {
				cols[p.Proto] = "✓ " + fmtLatency(p.Latency)
			}
			if p.Proto == "tcp" && p.Seen != "" {
				seen = p.Seen
			}
			if !p.OK || verbose && p.Err != "" {
				errs = append(errs, fmt.Sprintf("  ✗ %s %s→%s %s: %s", p.Category, p.Src.Name, p.Dst.Name, p.Proto, p.Err))
			}
		}
		src, dst := ps[0].Src, ps[0].Dst
		fmt.Fprintf(tw, "  %s\t%s (%s)\t%s (%s)\t%s\t%s\t%s\t%s\n", k.cat, src.Name, src.IP, dst.Name, dst.IP,
			cols["tcp"], cols["udp"], cols["icmp"], seen)
	}
	tw.Flush()
	if len(r.Shortcuts) > 0 {
		fmt.Fprintf(out, "\nsame-node TCP acceleration (%d request/response exchanges; packets on the client pod's eth0)\n", shortcutExchanges)
		tw = tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
		for _, p := range r.Shortcuts {
			fmt.Fprintf(tw, "  %s\t%s (%s) → %s (%s)\t%s %d packets\n", p.Node, p.Src.Name, p.Src.IP, p.Dst.Name, p.Dst.IP, mark(p.OK), p.Packets)
			if !p.OK {
				errs = append(errs, fmt.Sprintf("  ✗ TCP acceleration %s→%s: %s", p.Src.Name, p.Dst.Name, p.Err))
			}
		}
		tw.Flush()
	}
	errs = append(errs, printPolicyProbes(out, r.Policy)...)
	if len(errs) > 0 {
		fmt.Fprintln(out, "\nfailures")
		fmt.Fprintln(out, strings.Join(errs, "\n"))
	}
	fmt.Fprintf(out, "\n%s\n", r.Summary())
}

func fmtLatency(d time.Duration) string {
	return fmt.Sprintf("%.2fms", float64(d.Microseconds())/1000)
}

// flowChecks: every node's agent reports the flows the probes above just
// made (`sinabro lab observe`; new flows need NetworkPolicy on, the other
// events are enough without), and the NetworkPolicy check's denials as
// drops. Stand-in nodes only: real nodes' agents serve inside their pods.
func flowChecks(ctx context.Context, cfg *Config, since time.Time, denials bool) []StateCheck {
	sockets, err := cfg.ObserveSockets()
	if err != nil {
		return nil
	}
	var out []StateCheck
	var drops int
	for _, node := range cfg.Nodes {
		var flowsSeen, events, nodeDrops int
		deadline := time.Now().Add(3 * time.Second) // the agent reads every 100 ms
		for {
			flowsSeen, events, nodeDrops = 0, 0, 0
			err = flows.Observe(ctx, sockets[node], flows.Request{}, func(f flows.Flow) error {
				if f.Time.Before(since) {
					return nil
				}
				events++
				switch {
				case f.Type == "new":
					flowsSeen++
				case f.DropReason == "drop_policy":
					nodeDrops++
				}
				return nil
			})
			if (err == nil && flowsSeen > 0) || time.Now().After(deadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		drops += nodeDrops
		c := StateCheck{What: "node " + node + " flow telemetry", OK: err == nil && events > 0,
			Detail: fmt.Sprintf("%d events, %d of them new flows, observed since the check began", events, flowsSeen)}
		if err != nil {
			c.Detail = err.Error()
		}
		out = append(out, c)
	}
	if denials {
		out = append(out, StateCheck{What: "NetworkPolicy denials observed as drops", OK: drops > 0, Detail: fmt.Sprintf("%d drop_policy events", drops)})
	}
	return out
}
