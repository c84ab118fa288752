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
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
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
	binary string // plugin executable name in -bin-dir, for the init trace
	subnet *net.IPNet
	list   *libcni.NetworkConfigList
	add    []time.Duration
	del    []time.Duration
	sum    []time.Duration
}

func main() {
	var (
		binDir   = flag.String("bin-dir", "", "directory holding the plugin executables (CNI_PATH)")
		workDir  = flag.String("work", "", "scratch directory for pod netns mounts, data dirs and the libcni cache")
		rounds   = flag.Int("rounds", 40, "measured rounds (one ADD+DEL per plugin per round)")
		warmup   = flag.Int("warmup", 2, "unmeasured rounds first (page cache, first-exec costs)")
		plugins  = flag.String("plugins", "sinabro,ptp", "plugins to compare, in the ratio's order: sinabro,ptp")
		sbCIDR   = flag.String("sinabro-cidr", "10.244.1.0/24", "podCIDR for sinabro")
		ptpCIDR  = flag.String("ptp-cidr", "10.245.1.0/24", "host-local subnet for ptp")
		mtu      = flag.Int("mtu", 1450, "pod interface MTU for both plugins")
		ifName   = flag.String("ifname", "eth0", "pod interface name")
		verify   = flag.Bool("verify", true, "check (untimed) the pod interface after ADD and leftover node links after DEL")
		initRuns = flag.Int("init-runs", 20, "VERSION execs per plugin for the startup figures (0 to skip)")
	)
	flag.Parse()
	if *binDir == "" || *workDir == "" {
		fmt.Fprintln(os.Stderr, "benchcni: -bin-dir and -work are required")
		os.Exit(2)
	}
	if err := run(*binDir, *workDir, *rounds, *warmup, strings.Split(*plugins, ","), *sbCIDR, *ptpCIDR, *mtu, *ifName, *verify, *initRuns); err != nil {
		fmt.Fprintf(os.Stderr, "benchcni: %v\n", err)
		os.Exit(1)
	}
}

func run(binDir, workDir string, rounds, warmup int, names []string, sbCIDR, ptpCIDR string, mtu int, ifName string, verify bool, initRuns int) error {
	var ps []*plugin
	for _, name := range names {
		p, err := newPlugin(name, workDir, sbCIDR, ptpCIDR, mtu)
		if err != nil {
			return err
		}
		ps = append(ps, p)
	}
	nsDir := filepath.Join(workDir, "netns")
	if err := os.MkdirAll(nsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", nsDir, err)
	}
	cfg := libcni.NewCNIConfigWithCacheDir([]string{binDir}, filepath.Join(workDir, "cni-cache"), nil)
	ctx := context.Background()

	baseline, err := nodeLinks()
	if err != nil {
		return err
	}
	for r := -warmup; r < rounds; r++ {
		// Interleave: alternate which plugin goes first each round so neither
		// systematically inherits the other's cache or allocator state.
		order := slices.Clone(ps)
		if r%2 != 0 {
			slices.Reverse(order)
		}
		for _, p := range order {
			add, del, err := once(ctx, cfg, p, nsDir, fmt.Sprintf("sbbench-%s-%d", p.name, r+warmup), ifName, verify, baseline)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r, p.label, err)
			}
			if r >= 0 {
				p.add = append(p.add, add)
				p.del = append(p.del, del)
				p.sum = append(p.sum, add+del)
			}
		}
	}

	report(os.Stdout, ps, rounds)
	if initRuns > 0 {
		startup(os.Stdout, binDir, ps, initRuns)
	}
	return nil
}

func newPlugin(name, workDir, sbCIDR, ptpCIDR string, mtu int) (*plugin, error) {
	var conf map[string]any
	var cidr string
	p := &plugin{name: name}
	switch name {
	case "sinabro":
		cidr = sbCIDR
		p.label, p.binary = "sinabro", "sinabro"
		conf = map[string]any{
			"type":     "sinabro",
			"mtu":      mtu,
			"podCIDRs": []string{cidr},
			"dataDir":  filepath.Join(workDir, "data-sinabro"),
		}
	case "ptp":
		cidr = ptpCIDR
		p.label, p.binary = "ptp+host-local", "ptp"
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
		return nil, fmt.Errorf("unknown plugin %q (want sinabro or ptp)", name)
	}
	_, subnet, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, fmt.Errorf("parse %s subnet %q: %w", name, cidr, err)
	}
	p.subnet = subnet
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

// once runs one ADD and one DEL of p against a fresh pod netns and returns
// their wall times. Netns creation, checks and teardown are not timed.
func once(ctx context.Context, cfg *libcni.CNIConfig, p *plugin, nsDir, id, ifName string, verify bool, baseline map[string]bool) (time.Duration, time.Duration, error) {
	nsPath := filepath.Join(nsDir, id)
	if err := newNetNS(nsPath); err != nil {
		return 0, 0, err
	}
	defer removeNetNS(nsPath)
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: nsPath, IfName: ifName}

	t0 := time.Now()
	res, err := cfg.AddNetworkList(ctx, p.list, rt)
	add := time.Since(t0)
	if err != nil {
		return 0, 0, fmt.Errorf("ADD: %w", err)
	}
	if verify {
		if err := checkAdd(res, p.subnet, nsPath, ifName); err != nil {
			return 0, 0, fmt.Errorf("after ADD: %w", err)
		}
	}

	t0 = time.Now()
	err = cfg.DelNetworkList(ctx, p.list, rt)
	del := time.Since(t0)
	if err != nil {
		return 0, 0, fmt.Errorf("DEL: %w", err)
	}
	if verify {
		// Checked before the pod netns goes: destroying it would take the
		// host-side veth with it and hide a DEL that forgot to.
		now, err := nodeLinks()
		if err != nil {
			return 0, 0, err
		}
		for l := range now {
			if !baseline[l] {
				return 0, 0, fmt.Errorf("after DEL: link %s left in the node netns", l)
			}
		}
	}
	return add, del, nil
}

// checkAdd checks that the result holds one address from subnet and that the
// pod interface carries it.
func checkAdd(r types.Result, subnet *net.IPNet, nsPath, ifName string) error {
	res, ok := r.(*types100.Result)
	if !ok {
		return fmt.Errorf("result is %T, want a 1.x result", r)
	}
	if len(res.IPs) != 1 || !subnet.Contains(res.IPs[0].Address.IP) {
		return fmt.Errorf("result IPs %v, want one address in %s", res.IPs, subnet)
	}
	want := res.IPs[0].Address.IP
	return ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
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

func report(w *os.File, ps []*plugin, rounds int) {
	fmt.Fprintf(w, "CNI ADD/DEL wall time via libcni, %d rounds interleaved (nearest-rank percentiles; with n<100, p99 is the max)\n", rounds)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "plugin\tn\tADD p50\tADD p99\tDEL p50\tDEL p99\tADD+DEL p50\tADD+DEL p99\t")
	for _, p := range ps {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t\n", p.label, len(p.add),
			ms(pct(p.add, 50)), ms(pct(p.add, 99)), ms(pct(p.del, 50)), ms(pct(p.del, 99)), ms(pct(p.sum, 50)), ms(pct(p.sum, 99)))
	}
	if len(ps) == 2 {
		a, b := ps[0], ps[1]
		r := func(x, y []time.Duration, q float64) string {
			return fmt.Sprintf("%.2fx", float64(pct(x, q))/float64(pct(y, q)))
		}
		fmt.Fprintf(tw, "ratio %s/%s\t\t%s\t%s\t%s\t%s\t%s\t%s\t\n", a.label, b.label,
			r(a.add, b.add, 50), r(a.add, b.add, 99), r(a.del, b.del, 50), r(a.del, b.del, 99), r(a.sum, b.sum, 50), r(a.sum, b.sum, 99))
	}
	tw.Flush()
}

// startup prints, per plugin binary, the p50 wall time of a CNI VERSION exec
// and the Go package init cost reported by GODEBUG=inittrace=1.
func startup(w *os.File, binDir string, ps []*plugin, runs int) {
	fmt.Fprintf(w, "\nstartup (CNI_COMMAND=VERSION, %d execs each; init = sum over GODEBUG=inittrace=1 lines)\n", runs)
	for _, p := range ps {
		bin := filepath.Join(binDir, p.binary)
		var wall []time.Duration
		for range runs {
			cmd := exec.Command(bin)
			cmd.Env = append(os.Environ(), "CNI_COMMAND=VERSION")
			cmd.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
			t0 := time.Now()
			err := cmd.Run()
			wall = append(wall, time.Since(t0))
			if err != nil {
				fmt.Fprintf(w, "%s: VERSION failed: %v\n", p.binary, err)
				break
			}
		}
		it, err := initTrace(bin)
		if err != nil {
			fmt.Fprintf(w, "%-8s VERSION exec p50 %s; inittrace: %v\n", p.binary, ms(pct(wall, 50)), err)
			continue
		}
		fmt.Fprintf(w, "%-8s VERSION exec p50 %s; init: %d packages, %.3f ms clock, %d bytes, %d allocs (heaviest: %s %.3f ms)\n",
			p.binary, ms(pct(wall, 50)), it.pkgs, it.clockMS, it.bytes, it.allocs, it.topPkg, it.topMS)
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
