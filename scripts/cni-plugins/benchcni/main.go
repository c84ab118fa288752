// Command benchcni measures CNI ADD and DEL latency of several plugins in the
// same run, interleaved round by round, executing them through libcni exactly
// as a container runtime does (config list, runtime cache, CNI_PATH, stdin).
//
// It must run inside a dedicated "node" network namespace (scripts/bench-cni.sh
// uses `ip netns exec sbbench-node`): the plugins configure the node side of
// each pod (host veth, routes, sysctls) in the namespace they are executed in.
// Each ADD gets a fresh pod network namespace, bind-mounted under -work.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// plugin is one contestant: a named CNI config list and the subnet its
// addresses must come from.
type plugin struct {
	name   string // short name: container IDs, config list name
	label  string
	binary string // path of the plugin executable, for the startup figures
	cfg    *libcni.CNIConfig
	subnet *net.IPNet
	list   *libcni.NetworkConfigList
	add    []time.Duration
	del    []time.Duration
	sum    []time.Duration
}

type options struct {
	binDir, workDir string
	binDirB         string
	rounds, warmup  int
	parallel        int
	plugins         []string
	sbCIDR, ptpCIDR string
	sbBCIDR         string
	mtu             int
	ifName          string
	verify          bool
	initRuns        int
}

func main() {
	var o options
	var plugins string
	flag.StringVar(&o.binDir, "bin-dir", "", "directory holding the plugin executables (CNI_PATH)")
	flag.StringVar(&o.binDirB, "bin-dir-b", "", "CNI_PATH of sinabro-b: a directory holding another build of sinabro, named sinabro")
	flag.StringVar(&o.workDir, "work", "", "scratch directory for pod netns mounts, data dirs and the libcni cache")
	flag.IntVar(&o.rounds, "rounds", 40, "measured rounds (per plugin per round: -parallel pods ADDed, then DELed)")
	flag.IntVar(&o.warmup, "warmup", 2, "unmeasured rounds first (page cache, first-exec costs)")
	flag.IntVar(&o.parallel, "parallel", 1, "pods per round, ADDed concurrently then DELed concurrently (a runtime runs ADDs of different pods concurrently)")
	flag.StringVar(&plugins, "plugins", "sinabro,ptp", "plugins to compare (sinabro, sinabro-b, ptp); ratios are the first against each other")
	flag.StringVar(&o.sbCIDR, "sinabro-cidr", "10.244.1.0/24", "podCIDR for sinabro (a small one, e.g. /28, turns the run into an IPAM leak check)")
	flag.StringVar(&o.sbBCIDR, "sinabro-b-cidr", "10.246.1.0/24", "podCIDR for sinabro-b (a second sinabro build, executable sinabro-b in -bin-dir)")
	flag.StringVar(&o.ptpCIDR, "ptp-cidr", "10.245.1.0/24", "host-local subnet for ptp")
	flag.IntVar(&o.mtu, "mtu", 1450, "pod interface MTU for both plugins")
	flag.StringVar(&o.ifName, "ifname", "eth0", "pod interface name")
	flag.BoolVar(&o.verify, "verify", true, "check (untimed) the pod interface and address uniqueness after ADD, leftover node links after DEL")
	flag.IntVar(&o.initRuns, "init-runs", 20, "VERSION execs per plugin for the startup figures (0 to skip)")
	flag.Parse()
	o.plugins = strings.Split(plugins, ",")
	if o.binDir == "" || o.workDir == "" || o.rounds < 1 || o.parallel < 1 {
		fmt.Fprintln(os.Stderr, "benchcni: -bin-dir and -work are required; -rounds and -parallel must be >= 1")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "benchcni: %v\n", err)
		os.Exit(1)
	}
}

func run(o options) error {
	var ps []*plugin
	for _, name := range o.plugins {
		p, err := newPlugin(name, o)
		if err != nil {
			return err
		}
		ps = append(ps, p)
	}
	nsDir := filepath.Join(o.workDir, "netns")
	if err := os.MkdirAll(nsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", nsDir, err)
	}
	ctx := context.Background()

	baseline, err := nodeLinks()
	if err != nil {
		return err
	}
	for r := -o.warmup; r < o.rounds; r++ {
		// Interleave: rotate which plugin goes first each round so none
		// systematically inherits another's cache or allocator state.
		k := ((r % len(ps)) + len(ps)) % len(ps)
		order := append(slices.Clone(ps[k:]), ps[:k]...)
		for _, p := range order {
			add, del, err := round(ctx, p.cfg, p, nsDir, fmt.Sprintf("sbbench-%s-%d", p.name, r+o.warmup), o, baseline)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r, p.label, err)
			}
			if r >= 0 {
				p.add = append(p.add, add...)
				p.del = append(p.del, del...)
				for i := range add {
					p.sum = append(p.sum, add[i]+del[i])
				}
			}
		}
	}

	report(os.Stdout, ps, o)
	if o.initRuns > 0 {
		startup(os.Stdout, ps, o.initRuns)
	}
	return nil
}

func newPlugin(name string, o options) (*plugin, error) {
	var conf map[string]any
	var cidr string
	p := &plugin{name: name}
	workDir, mtu := o.workDir, o.mtu
	binDir := o.binDir
	switch name {
	case "sinabro", "sinabro-b":
		// Both builds are type "sinabro" (the plugin checks its type); they
		// differ by CNI_PATH, network name, podCIDR and data dir.
		cidr = o.sbCIDR
		if name == "sinabro-b" {
			if o.binDirB == "" {
				return nil, errors.New("sinabro-b needs -bin-dir-b")
			}
			cidr, binDir = o.sbBCIDR, o.binDirB
		}
		p.label, p.binary = name, filepath.Join(binDir, "sinabro")
		conf = map[string]any{
			"type":     "sinabro",
			"mtu":      mtu,
			"podCIDRs": []string{cidr},
			"dataDir":  filepath.Join(workDir, "data-"+name),
		}
	case "ptp":
		cidr = o.ptpCIDR
		p.label, p.binary = "ptp+host-local", filepath.Join(binDir, "ptp")
		conf = map[string]any{
			"type": "ptp",
			"mtu":  mtu,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": cidr}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": filepath.Join(workDir, "data-host-local"),
			},
		}
	default:
		return nil, fmt.Errorf("unknown plugin %q (want sinabro, sinabro-b or ptp)", name)
	}
	_, subnet, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, fmt.Errorf("parse %s subnet %q: %w", name, cidr, err)
	}
	p.subnet = subnet
	p.cfg = libcni.NewCNIConfigWithCacheDir([]string{binDir}, filepath.Join(workDir, "cni-cache"), nil)
	list := map[string]any{
		"cniVersion": "1.1.0",
		"name":       "sbbench-" + name,
		"plugins":    []any{conf},
	}
	b, err := json.Marshal(list)
	if err != nil {
		return nil, err
	}
	if p.list, err = libcni.NetworkConfFromBytes(b); err != nil {
		return nil, fmt.Errorf("parse %s config list: %w", name, err)
	}
	return p, nil
}

// round ADDs o.parallel pods of p concurrently, each into a fresh netns,
// then DELs them all concurrently, and returns each pod's ADD and DEL wall
// time. Netns creation, checks and teardown are not timed.
func round(ctx context.Context, cfg *libcni.CNIConfig, p *plugin, nsDir, id string, o options, baseline map[string]bool) ([]time.Duration, []time.Duration, error) {
	n := o.parallel
	rts := make([]*libcni.RuntimeConf, n)
	for i := range rts {
		cid := id
		if n > 1 {
			cid = fmt.Sprintf("%s-%d", id, i)
		}
		nsPath := filepath.Join(nsDir, cid)
		if err := newNetNS(nsPath); err != nil {
			return nil, nil, err
		}
		defer removeNetNS(nsPath)
		rts[i] = &libcni.RuntimeConf{ContainerID: cid, NetNS: nsPath, IfName: o.ifName}
	}

	add := make([]time.Duration, n)
	res := make([]types.Result, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, rt := range rts {
		wg.Go(func() {
			t0 := time.Now()
			res[i], errs[i] = cfg.AddNetworkList(ctx, p.list, rt)
			add[i] = time.Since(t0)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, nil, fmt.Errorf("ADD: %w", err)
	}
	if o.verify {
		seen := map[string]string{}
		for i, r := range res {
			ip, err := checkAdd(r, p.subnet, rts[i].NetNS, o.ifName)
			if err != nil {
				return nil, nil, fmt.Errorf("after ADD of %s: %w", rts[i].ContainerID, err)
			}
			if other, dup := seen[ip]; dup {
				return nil, nil, fmt.Errorf("after ADD: %s and %s both got %s", other, rts[i].ContainerID, ip)
			}
			seen[ip] = rts[i].ContainerID
		}
	}

	del := make([]time.Duration, n)
	for i, rt := range rts {
		wg.Go(func() {
			t0 := time.Now()
			errs[i] = cfg.DelNetworkList(ctx, p.list, rt)
			del[i] = time.Since(t0)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, nil, fmt.Errorf("DEL: %w", err)
	}
	if o.verify {
		// Checked before the pod netns goes: destroying it would take the
		// host-side veth with it and hide a DEL that forgot to.
		now, err := nodeLinks()
		if err != nil {
			return nil, nil, err
		}
		for l := range now {
			if !baseline[l] {
				return nil, nil, fmt.Errorf("after DEL: link %s left in the node netns", l)
			}
		}
	}
	return add, del, nil
}

// checkAdd checks that the result holds one address from subnet and that the
// pod interface carries it; it returns that address.
func checkAdd(r types.Result, subnet *net.IPNet, nsPath, ifName string) (string, error) {
	res, ok := r.(*types100.Result)
	if !ok {
		return "", fmt.Errorf("result is %T, want a 1.x result", r)
	}
	if len(res.IPs) != 1 || !subnet.Contains(res.IPs[0].Address.IP) {
		return "", fmt.Errorf("result IPs %v, want one address in %s", res.IPs, subnet)
	}
	want := res.IPs[0].Address.IP
	return want.String(), ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		ifc, err := net.InterfaceByName(ifName)
		if err != nil {
			return fmt.Errorf("pod interface %s: %w", ifName, err)
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", ifName, err)
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.Equal(want) {
				return nil
			}
		}
		return fmt.Errorf("pod interface %s has %v, want %s", ifName, addrs, want)
	})
}

func nodeLinks() (map[string]bool, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list node links: %w", err)
	}
	m := make(map[string]bool, len(ifs))
	for _, i := range ifs {
		m[i.Name] = true
	}
	return m, nil
}

// newNetNS creates a network namespace bind-mounted at path, from a thread
// that unshares and is then discarded (never returned to the Go scheduler).
func newNetNS(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create netns file %s: %w", path, err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: the thread exits with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind-mount netns on %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

func removeNetNS(path string) {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
		fmt.Fprintf(os.Stderr, "benchcni: unmount %s: %v\n", path, err)
	}
	os.Remove(path)
}

// pct returns the nearest-rank percentile q (0..100) of d.
func pct(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	k := int(float64(len(s))*q/100+0.999999) - 1
	k = max(0, min(k, len(s)-1))
	return s[k]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/1e6) }

func report(w io.Writer, ps []*plugin, o options) {
	conc := ""
	if o.parallel > 1 {
		conc = fmt.Sprintf(", %d pods ADDed/DELed concurrently per round", o.parallel)
	}
	fmt.Fprintf(w, "CNI ADD/DEL wall time via libcni, %d rounds interleaved%s (nearest-rank percentiles; with n<100, p99 is the max)\n", o.rounds, conc)
	row := func(label, n string, cells ...string) {
		fmt.Fprintf(w, "%-30s %3s", label, n)
		for _, c := range cells {
			fmt.Fprintf(w, " %11s", c)
		}
		fmt.Fprintln(w)
	}
	row("plugin", "n", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "ADD+DEL p50", "ADD+DEL p99")
	for _, p := range ps {
		row(p.label, strconv.Itoa(len(p.add)),
			ms(pct(p.add, 50)), ms(pct(p.add, 99)), ms(pct(p.del, 50)), ms(pct(p.del, 99)), ms(pct(p.sum, 50)), ms(pct(p.sum, 99)))
	}
	r := func(x, y []time.Duration, q float64) string {
		return fmt.Sprintf("%.2fx", float64(pct(x, q))/float64(pct(y, q)))
	}
	for _, b := range ps[1:] {
		a := ps[0]
		row("ratio "+a.name+"/"+b.label, "",
			r(a.add, b.add, 50), r(a.add, b.add, 99), r(a.del, b.del, 50), r(a.del, b.del, 99), r(a.sum, b.sum, 50), r(a.sum, b.sum, 99))
	}
}

// startup prints, per plugin binary, the p50 wall time of a CNI VERSION exec
// and the Go package init cost reported by GODEBUG=inittrace=1.
func startup(w io.Writer, ps []*plugin, runs int) {
	fmt.Fprintf(w, "\nstartup (CNI_COMMAND=VERSION, %d execs each; init = sum over GODEBUG=inittrace=1 lines)\n", runs)
	for _, p := range ps {
		bin := p.binary
		var wall []time.Duration
		for range runs {
			cmd := exec.Command(bin)
			cmd.Env = append(os.Environ(), "CNI_COMMAND=VERSION")
			cmd.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
			t0 := time.Now()
			err := cmd.Run()
			wall = append(wall, time.Since(t0))
			if err != nil {
				fmt.Fprintf(w, "%s: VERSION failed: %v\n", p.name, err)
				break
			}
		}
		it, err := initTrace(bin)
		if err != nil {
			fmt.Fprintf(w, "%-9s VERSION exec p50 %s; inittrace: %v\n", p.name, ms(pct(wall, 50)), err)
			continue
		}
		fmt.Fprintf(w, "%-9s VERSION exec p50 %s; init: %d packages, %.3f ms clock, %d bytes, %d allocs (heaviest: %s %.3f ms)\n",
			p.name, ms(pct(wall, 50)), it.pkgs, it.clockMS, it.bytes, it.allocs, it.topPkg, it.topMS)
	}
}

type initSummary struct {
	pkgs          int
	clockMS       float64
	bytes, allocs int64
	topPkg        string
	topMS         float64
}

// e.g. "init internal/bytealg @0.002 ms, 0.002 ms clock, 0 bytes, 0 allocs"
var initLine = regexp.MustCompile(`^init (\S+) @\S+ ms, ([0-9.]+) ms clock, ([0-9]+) bytes, ([0-9]+) allocs`)

func initTrace(bin string) (initSummary, error) {
	var s initSummary
	var stderr bytes.Buffer
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "CNI_COMMAND=VERSION", "GODEBUG=inittrace=1")
	cmd.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return s, fmt.Errorf("run %s: %w", bin, err)
	}
	sc := bufio.NewScanner(&stderr)
	for sc.Scan() {
		m := initLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		c, _ := strconv.ParseFloat(m[2], 64)
		b, _ := strconv.ParseInt(m[3], 10, 64)
		a, _ := strconv.ParseInt(m[4], 10, 64)
		s.pkgs++
		s.clockMS += c
		s.bytes += b
		s.allocs += a
		if c > s.topMS {
			s.topPkg, s.topMS = m[1], c
		}
	}
	if s.pkgs == 0 {
		return s, errors.New("no init lines on stderr")
	}
	return s, nil
}
