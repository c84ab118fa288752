package cni_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

func TestAddPingCheckDel(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.1.0/24")
	p1, p2 := newNetns(t, "sbt-pod-"), newNetns(t, "sbt-pod-")
	r1 := b.mustAdd("pod-one", p1)
	r2 := b.mustAdd("pod-two", p2)

	ip1, ip2 := r1.IPs[0].Address.IP.String(), r2.IPs[0].Address.IP.String()
	if ip1 == ip2 {
		t.Fatalf("both pods got %s", ip1)
	}
	if got, want := r1.IPs[0].Address.String(), ip1+"/32"; got != want {
		t.Errorf("pod address = %s, want %s", got, want)
	}
	if got := r1.Interfaces[0].Name; got != cni.HostVethName("pod-one", "eth0") {
		t.Errorf("host veth = %s, want %s", got, cni.HostVethName("pod-one", "eth0"))
	}
	ping(t, p1, ip2)
	ping(t, p2, ip1)

	if err := b.check("pod-one", p1); err != nil {
		t.Fatalf("CHECK on a healthy pod: %v", err)
	}
	if out, err := run(p1, "ip", "route", "del", "default"); err != nil {
		t.Fatalf("delete default route: %v %s", err, out)
	}
	err := b.check("pod-one", p1)
	var cerr *types.Error
	if !errors.As(err, &cerr) || cerr.Code != cni.ErrDrift || !strings.Contains(cerr.Details, "0.0.0.0/0") {
		t.Fatalf("CHECK after deleting the route = %v, want code %d naming 0.0.0.0/0", err, cni.ErrDrift)
	}

	for i := 0; i < 2; i++ {
		if err := b.del("pod-one", p1); err != nil {
			t.Fatalf("DEL #%d: %v", i+1, err)
		}
	}
	if err := b.del("pod-two", p2); err != nil {
		t.Fatalf("DEL pod-two: %v", err)
	}
	if v := b.hostVeths(); len(v) != 0 {
		t.Errorf("host veths left after DEL: %v", v)
	}
	if a := b.allocations(); len(a) != 0 {
		t.Errorf("addresses left after DEL: %v", a)
	}
}

func TestAddFailsWhenInterfaceExists(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.2.0/24")
	p := newNetns(t, "sbt-pod-")
	first := b.mustAdd("pod", p)
	_, err := b.add("pod", p)
	var cerr *types.Error
	if !errors.As(err, &cerr) || cerr.Code != cni.ErrInterfaceExists {
		t.Fatalf("second ADD = %v, want code %d", err, cni.ErrInterfaceExists)
	}
	// The failed ADD must not disturb the working attachment.
	if err := b.check("pod", p); err != nil {
		t.Fatalf("CHECK after the refused ADD: %v", err)
	}
	if a := b.allocations(); len(a) != 1 || a[first.IPs[0].Address.IP.String()] != "pod" {
		t.Errorf("allocations = %v, want only %s", a, first.IPs[0].Address.IP)
	}
}

func TestRetriedAddReusesAddress(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.3.0/24")
	p := newNetns(t, "sbt-pod-")
	first := b.mustAdd("pod", p)
	// A runtime retrying after a failure deletes the interface but, having
	// no DEL result, calls ADD again: the pod keeps its address.
	if out, err := run(p, "ip", "link", "del", "eth0"); err != nil {
		t.Fatalf("delete eth0: %v %s", err, out)
	}
	again := b.mustAdd("pod", p)
	if got, want := again.IPs[0].Address.IP.String(), first.IPs[0].Address.IP.String(); got != want {
		t.Errorf("retried ADD got %s, want the same %s", got, want)
	}
}

func TestDelAfterNetnsGone(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.4.0/24")
	name := randName("sbt-gone-")
	p, err := netns.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(name) }) // in case the test fails before deleting it
	b.mustAdd("pod", p)
	if err := netns.Delete(name); err != nil {
		t.Fatal(err)
	}
	if err := b.del("pod", p); err != nil {
		t.Fatalf("DEL after the netns is gone: %v", err)
	}
	if err := b.del("never-added", "/run/netns/does-not-exist"); err != nil {
		t.Fatalf("DEL of an unknown container: %v", err)
	}
	if a := b.allocations(); len(a) != 0 {
		t.Errorf("addresses left: %v", a)
	}
}

func TestGCWithPartialValidList(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.5.0/24")
	pods := map[string]string{}
	for _, id := range []string{"keep", "drop-a", "drop-b"} {
		pods[id] = newNetns(t, "sbt-pod-")
		b.mustAdd(id, pods[id])
	}
	if err := b.gc("keep"); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if got := b.hostVeths(); len(got) != 1 || got[0] != cni.HostVethName("keep", "eth0") {
		t.Errorf("host veths after GC = %v, want only keep's", got)
	}
	for ip, id := range b.allocations() {
		if id != "keep" {
			t.Errorf("GC left %s allocated to %s", ip, id)
		}
	}
	if err := b.check("keep", pods["keep"]); err != nil {
		t.Errorf("CHECK of the kept pod after GC: %v", err)
	}
}

func TestGCReleasesUncachedLeftovers(t *testing.T) {
	// Attachments the runtime has no cache entry for (e.g. the runtime lost
	// its state) are still removed by the plugin's own GC.
	b := newBed(t, "1.1.0", "10.88.6.0/24")
	p := newNetns(t, "sbt-pod-")
	b.mustAdd("orphan", p)
	fresh := newBed(t, "1.1.0", "10.88.6.0/24")
	fresh.node, fresh.dataDir, fresh.list = b.node, b.dataDir, b.list
	if err := fresh.gc(); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if v := b.hostVeths(); len(v) != 0 {
		t.Errorf("host veths left: %v", v)
	}
	if a := b.allocations(); len(a) != 0 {
		t.Errorf("addresses left: %v", a)
	}
}

// TestGCKeepsAddressOfUndeletableVeth: when GC cannot delete a stale
// attachment's host interface, the attachment's address stays recorded, so
// a later GC tries again; released, nothing would point at the interface.
// The node's loopback device, renamed to the veth's name, cannot be deleted.
func TestGCKeepsAddressOfUndeletableVeth(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.10.0/24")
	b.mustAdd("stuck", newNetns(t, "sbt-pod-"))
	name := cni.HostVethName("stuck", "eth0")
	for _, args := range [][]string{{"link", "del", name}, {"link", "set", "lo", "down"}, {"link", "set", "lo", "name", name}} {
		if out, err := run(b.node, "ip", args...); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	if err := b.gc(); err == nil {
		t.Fatal("GC deleted the node's loopback device, want an error")
	}
	if a := b.allocations(); len(a) != 1 {
		t.Errorf("addresses after a failed GC = %v, want stuck's kept", a)
	}
}

// TestGCLeavesOtherNetworks runs two networks of the plugin on one node (a
// second conflist with another name): GC of one, with no valid
// attachments, removes its own pods only.
func TestGCLeavesOtherNetworks(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.8.0/24")
	other := newBed(t, "1.1.0", "10.88.9.0/24")
	other.node, other.dataDir, other.name = b.node, b.dataDir, "sinabro-other"
	other.list = other.confList("1.1.0", "10.88.9.0/24")
	mine, theirs := newNetns(t, "sbt-pod-"), newNetns(t, "sbt-pod-")
	b.mustAdd("mine", mine)
	other.mustAdd("theirs", theirs)

	if err := b.gc(); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if got, want := b.hostVeths(), []string{cni.HostVethName("theirs", "eth0")}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("host veths after GC of %s = %v, want only the other network's %v", b.name, got, want)
	}
	if a := b.allocations(); len(a) != 0 {
		t.Errorf("addresses left in %s: %v", b.name, a)
	}
	if a := other.allocations(); len(a) != 1 {
		t.Errorf("addresses of %s after GC of %s = %v, want theirs", other.name, b.name, a)
	}
	if err := other.check("theirs", theirs); err != nil {
		t.Errorf("CHECK of the other network's pod after GC: %v", err)
	}
}

func TestStatus(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.7.0/24")
	if err := b.inNode(func() error { return b.cni.GetStatusNetworkList(context.Background(), b.list) }); err != nil {
		t.Errorf("STATUS with a pod CIDR: %v", err)
	}
	b.list = b.confList("1.1.0") // no podCIDRs: the agent has not configured the node yet
	err := b.inNode(func() error { return b.cni.GetStatusNetworkList(context.Background(), b.list) })
	var cerr *types.Error
	if !errors.As(err, &cerr) || cerr.Code != types.ErrPluginNotAvailable {
		t.Errorf("STATUS without a pod CIDR = %v, want code 50", err)
	}
}

func TestVersion(t *testing.T) {
	needRoot(t)
	b := newBed(t, "1.1.0", "10.88.8.0/24")
	info, err := b.cni.GetVersionInfo(context.Background(), "sinabro")
	if err != nil {
		t.Fatalf("VERSION: %v", err)
	}
	got := info.SupportedVersions()
	sort.Strings(got)
	if want := strings.Join(cni.SupportedVersions, ","); strings.Join(got, ",") != want {
		t.Errorf("supported versions = %v, want %s", got, want)
	}
}

func TestOlderSpecVersions(t *testing.T) {
	for i, v := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			b := newBed(t, v, fmt.Sprintf("10.88.%d.0/24", 20+i))
			p := newNetns(t, "sbt-pod-")
			var res types.Result
			err := b.inNode(func() (err error) {
				res, err = b.cni.AddNetworkList(context.Background(), b.list, rt("pod", p))
				return err
			})
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if got := res.Version(); got != v {
				t.Errorf("result version = %s, want %s", got, v)
			}
			if v != "0.3.0" && v != "0.3.1" {
				if err := b.check("pod", p); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			if err := b.del("pod", p); err != nil {
				t.Errorf("DEL: %v", err)
			}
			if a := b.allocations(); len(a) != 0 {
				t.Errorf("addresses left: %v", a)
			}
		})
	}
}

func TestDualStack(t *testing.T) {
	b := newBed(t, "1.1.0", "10.88.9.0/24", "fd00:88:9::/64")
	p1, p2 := newNetns(t, "sbt-pod-"), newNetns(t, "sbt-pod-")
	r1 := b.mustAdd("a", p1)
	r2 := b.mustAdd("b", p2)
	if len(r1.IPs) != 2 || len(r2.IPs) != 2 {
		t.Fatalf("want an IPv4 and an IPv6 address, got %v and %v", r1.IPs, r2.IPs)
	}
	for _, ipc := range r2.IPs {
		ping(t, p1, ipc.Address.IP.String())
	}
	if err := b.check("a", p1); err != nil {
		t.Errorf("CHECK: %v", err)
	}
}

func TestBadInput(t *testing.T) {
	needRoot(t)
	node := newNetns(t, "sbt-node-")
	pod, pod2 := newNetns(t, "sbt-pod-"), newNetns(t, "sbt-pod-")
	data := newDataDir(t)
	good := func(extra string) string {
		return `{"cniVersion":"1.1.0","name":"bad-input","type":"sinabro","dataDir":"` + data + `","podCIDRs":["10.88.10.0/30"]` + extra + `}`
	}
	env := func(cmd string, drop ...string) map[string]string {
		e := map[string]string{"CNI_COMMAND": cmd, "CNI_CONTAINERID": "c1", "CNI_NETNS": pod, "CNI_IFNAME": "eth0", "CNI_PATH": pluginDir}
		for _, d := range drop {
			delete(e, d)
		}
		return e
	}
	with := func(e map[string]string, k, v string) map[string]string { e[k] = v; return e }

	// Exhaust the /30 (one usable address) so the next ADD must fail.
	if _, cerr := execPlugin(t, node, env("ADD"), good("")); cerr != nil {
		t.Fatalf("first ADD into the /30: %v", cerr)
	}

	tests := []struct {
		name  string
		env   map[string]string
		stdin string
		code  uint
	}{
		{"broken JSON", env("ADD"), `{"cniVersion":`, types.ErrDecodingFailure},
		{"not an object", env("ADD"), `[1,2]`, types.ErrDecodingFailure},
		{"missing name", env("ADD"), `{"cniVersion":"1.1.0","type":"sinabro","podCIDRs":["10.1.0.0/24"]}`, types.ErrInvalidNetworkConfig},
		{"mtu of wrong type", env("ADD"), good(`,"mtu":"big"`), types.ErrDecodingFailure},
		{"podCIDRs of wrong type", env("ADD"), `{"cniVersion":"1.1.0","name":"x","type":"sinabro","podCIDRs":"10.1.0.0/24"}`, types.ErrDecodingFailure},
		{"mtu out of range", env("ADD"), good(`,"mtu":20`), types.ErrInvalidNetworkConfig},
		{"malformed pod CIDR", env("ADD"), `{"cniVersion":"1.1.0","name":"x","type":"sinabro","podCIDRs":["10.1.0.300/24"]}`, types.ErrInvalidNetworkConfig},
		{"pod CIDR with host bits", env("ADD"), `{"cniVersion":"1.1.0","name":"x","type":"sinabro","podCIDRs":["10.1.0.5/24"]}`, types.ErrInvalidNetworkConfig},
		{"relative dataDir", env("ADD"), `{"cniVersion":"1.1.0","name":"x","type":"sinabro","dataDir":"rel","podCIDRs":["10.1.0.0/24"]}`, types.ErrInvalidNetworkConfig},
		{"dataDir outside /var/lib", env("ADD"), `{"cniVersion":"1.1.0","name":"x","type":"sinabro","dataDir":"/tmp/sinabro","podCIDRs":["10.1.0.0/24"]}`, types.ErrInvalidNetworkConfig},
		{"delegated ipam", env("ADD"), good(`,"ipam":{"type":"host-local"}`), types.ErrUnsupportedField},
		{"unknown cniVersion", env("ADD"), `{"cniVersion":"9.9.9","name":"x","type":"sinabro"}`, types.ErrIncompatibleCNIVersion},
		{"GC on an old cniVersion", env("GC"), `{"cniVersion":"1.0.0","name":"x","type":"sinabro"}`, types.ErrIncompatibleCNIVersion},
		{"missing CNI_COMMAND value", with(env("ADD"), "CNI_COMMAND", "FROB"), good(""), types.ErrInvalidEnvironmentVariables},
		{"missing CNI_CONTAINERID", env("ADD", "CNI_CONTAINERID"), good(""), types.ErrInvalidEnvironmentVariables},
		{"missing CNI_NETNS", env("ADD", "CNI_NETNS"), good(""), types.ErrInvalidEnvironmentVariables},
		{"missing CNI_IFNAME", env("DEL", "CNI_IFNAME"), good(""), types.ErrInvalidEnvironmentVariables},
		{"missing CNI_PATH", env("ADD", "CNI_PATH"), good(""), types.ErrInvalidEnvironmentVariables},
		{"invalid CNI_IFNAME", with(env("ADD"), "CNI_IFNAME", "eth0/../x"), good(""), types.ErrInvalidEnvironmentVariables},
		{"too long CNI_IFNAME", with(env("ADD"), "CNI_IFNAME", "averyveryverylongname"), good(""), types.ErrInvalidEnvironmentVariables},
		{"invalid CNI_CONTAINERID", with(env("ADD"), "CNI_CONTAINERID", "bad id!"), good(""), types.ErrInvalidEnvironmentVariables},
		{"non-existent netns", with(env("ADD"), "CNI_NETNS", "/run/netns/sbt-no-such-netns"), good(""), types.ErrInvalidEnvironmentVariables},
		{"exhausted range", with(with(env("ADD"), "CNI_CONTAINERID", "c2"), "CNI_NETNS", pod2), good(""), types.ErrTryAgainLater},
		{"STATUS without pod CIDR", env("STATUS"), `{"cniVersion":"1.1.0","name":"x","type":"sinabro"}`, types.ErrPluginNotAvailable},
		{"CHECK without prevResult", env("CHECK"), good(""), types.ErrInvalidNetworkConfig},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, cerr := execPlugin(t, node, tc.env, tc.stdin)
			if cerr == nil {
				t.Fatalf("succeeded, want code %d", tc.code)
			}
			if cerr.Code != tc.code {
				t.Errorf("code = %d (%s: %s), want %d", cerr.Code, cerr.Msg, cerr.Details, tc.code)
			}
			if cerr.Msg == "" {
				t.Errorf("error has no msg")
			}
		})
	}
}

// TestConcurrentAdds runs 100 ADDs as parallel processes, as a runtime
// starting many pods at once does, then 100 parallel DELs.
func TestConcurrentAdds(t *testing.T) {
	const n = 100
	b := newBed(t, "1.1.0", "10.88.64.0/24")
	pods := make([]string, n)
	for i := range pods {
		pods[i] = newNetns(t, "sbt-pod-")
	}
	ips := make([]string, n)
	errs := parallel(n, func(i int) error {
		r, err := b.add(fmt.Sprintf("pod-%03d", i), pods[i])
		if err == nil {
			ips[i] = r.IPs[0].Address.IP.String()
		}
		return err
	})
	for _, err := range errs {
		t.Fatalf("parallel ADD: %v", err)
	}
	seen := map[string]int{}
	for i, ip := range ips {
		if j, dup := seen[ip]; dup {
			t.Fatalf("pods %d and %d both got %s", j, i, ip)
		}
		seen[ip] = i
	}
	for i, ip := range ips {
		if out, err := run(b.node, "ping", "-c1", "-W2", ip); err != nil {
			t.Errorf("node -> pod %d (%s): %v %s", i, ip, err, out)
		}
	}
	errs = parallel(n, func(i int) error { return b.del(fmt.Sprintf("pod-%03d", i), pods[i]) })
	for _, err := range errs {
		t.Fatalf("parallel DEL: %v", err)
	}
	if a := b.allocations(); len(a) != 0 {
		t.Errorf("%d addresses left after DEL", len(a))
	}
	if v := b.hostVeths(); len(v) != 0 {
		t.Errorf("%d host veths left after DEL", len(v))
	}
}

func parallel(n int, fn func(i int) error) []error {
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(i); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errs
}

// TestCrashDuringAdds SIGKILLs plugin processes at random points of their
// ADD and checks that GC and later ADDs leave no duplicate and no leak.
func TestCrashDuringAdds(t *testing.T) {
	const n = 30
	b := newBed(t, "1.1.0", "10.88.65.0/24")
	conf := b.list.Plugins[0].Bytes
	// The plugin needs the network name and version next to its own keys.
	stdin := strings.Replace(string(conf), "{", `{"cniVersion":"1.1.0","name":"sinabro-test",`, 1)
	pods := make([]string, n)
	for i := range pods {
		pods[i] = newNetns(t, "sbt-pod-")
	}
	completed := map[string]bool{}
	var mu sync.Mutex
	parallel(n, func(i int) error {
		id := fmt.Sprintf("crash-%02d", i)
		cmd := exec.Command(filepath.Join(pluginDir, "sinabro"))
		cmd.Env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=" + id, "CNI_NETNS=" + pods[i], "CNI_IFNAME=eth0", "CNI_PATH=" + pluginDir}
		cmd.Stdin = strings.NewReader(stdin)
		err := b.inNode(func() error {
			if err := cmd.Start(); err != nil {
				return err
			}
			// Kill after 0..9 ms: some before IPAM, some between IPAM and
			// the interface, some after.
			time.Sleep(time.Duration(i%10) * time.Millisecond)
			_ = cmd.Process.Signal(syscall.SIGKILL)
			return nil
		})
		if err != nil {
			return err
		}
		if cmd.Wait() == nil {
			mu.Lock()
			completed[id] = true
			mu.Unlock()
		}
		return nil
	})
	t.Logf("%d of %d ADDs completed before SIGKILL", len(completed), n)
	assertNoDuplicates(t, b)

	// A new ADD reclaims what dead processes left pending without an interface.
	extra := newNetns(t, "sbt-pod-")
	b.mustAdd("after-crash", extra)
	assertNoDuplicates(t, b)

	var valid []string
	for id := range completed {
		valid = append(valid, id)
	}
	valid = append(valid, "after-crash")
	if err := b.gc(valid...); err != nil {
		t.Fatalf("GC: %v", err)
	}
	for ip, id := range b.allocations() {
		if id != "after-crash" && !completed[id] {
			t.Errorf("GC left %s to killed ADD %s", ip, id)
		}
	}
	if got, want := len(b.hostVeths()), len(valid); got != want {
		out, _ := run(b.node, "ip", "-d", "link")
		t.Errorf("%d host veths after GC, want %d:\n%s", got, want, out)
	}
	// The runtime now retries the killed pods: all must come up, distinct.
	for i := range pods {
		id := fmt.Sprintf("crash-%02d", i)
		if completed[id] {
			continue
		}
		if _, err := b.add(id, pods[i]); err != nil {
			t.Errorf("retry ADD %s: %v", id, err)
		}
	}
	assertNoDuplicates(t, b)
	if got, want := len(b.allocations()), n+1; got != want {
		t.Errorf("%d allocations after the retries, want %d", got, want)
	}
}

func assertNoDuplicates(t *testing.T, b *bed) {
	t.Helper()
	// The state file maps address -> owner, so an address cannot appear
	// twice there; check that no owner holds two IPv4 addresses and that
	// every address on a pod interface is the one IPAM recorded.
	owners := map[string]string{}
	for ip, id := range b.allocations() {
		if prev, dup := owners[id]; dup {
			t.Errorf("%s holds both %s and %s", id, prev, ip)
		}
		owners[id] = ip
		if net.ParseIP(ip) == nil {
			t.Errorf("bad address %q in state", ip)
		}
	}
}
