package cni_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// These tests drive the built binary the way container runtimes do, through
// libcni, against real network namespaces. The "node" is a namespace of its
// own: the plugin is executed inside it, so the root namespace is untouched.

var pluginDir string // holds the built binary, named "sinabro"

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("skipping CNI integration tests: they need root to create network namespaces")
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "sinabro-cni-test-")
	if err != nil {
		panic(err)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(dir, "sinabro"), "../..")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := build.CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build sinabro: %v\n%s", err, out)
		os.Exit(1)
	}
	pluginDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
}

func randName(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// newNetns creates a named network namespace that is removed at cleanup.
func newNetns(t testing.TB, prefix string) string {
	t.Helper()
	name := randName(prefix)
	path, err := netns.Create(name)
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() { _ = netns.Delete(name) })
	return path
}

// newDataDir makes an IPAM data dir for one test, removed at cleanup. It
// must lie under /var/lib (cni.DataDirRoot), like the real one.
func newDataDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp(cni.DataDirRoot, "sinabro-cni-test-")
	if err != nil {
		t.Fatalf("create data dir: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// bed is one node: its namespace, a CNI config list and libcni.
type bed struct {
	t       testing.TB
	name    string // the network's name
	node    string
	dataDir string
	cni     *libcni.CNIConfig
	list    *libcni.NetworkConfigList
}

func newBed(t testing.TB, cniVersion string, podCIDRs ...string) *bed {
	t.Helper()
	needRoot(t)
	b := &bed{t: t, name: "sinabro-test", node: newNetns(t, "sbt-node-"), dataDir: newDataDir(t)}
	b.cni = libcni.NewCNIConfigWithCacheDir([]string{pluginDir}, t.TempDir(), nil)
	b.list = b.confList(cniVersion, podCIDRs...)
	// The node needs an address of its own to talk to its pods from.
	if out, err := run(b.node, "ip", "addr", "add", "192.0.2.10/32", "dev", "lo"); err != nil {
		t.Fatalf("address the node: %v %s", err, out)
	}
	if out, err := run(b.node, "ip", "link", "set", "lo", "up"); err != nil {
		t.Fatalf("set node lo up: %v %s", err, out)
	}
	return b
}

func (b *bed) confList(cniVersion string, podCIDRs ...string) *libcni.NetworkConfigList {
	b.t.Helper()
	plugin := map[string]any{"type": "sinabro", "dataDir": b.dataDir}
	if len(podCIDRs) > 0 {
		plugin["podCIDRs"] = podCIDRs
	}
	raw, _ := json.Marshal(map[string]any{"cniVersion": cniVersion, "name": b.name, "plugins": []any{plugin}})
	list, err := libcni.ConfListFromBytes(raw)
	if err != nil {
		b.t.Fatalf("parse conflist: %v", err)
	}
	return list
}

// inNode runs fn inside the node namespace, so plugins exec'd by fn run there.
func (b *bed) inNode(fn func() error) error { return netns.Do(b.node, fn) }

func rt(id, podNS string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: id, NetNS: podNS, IfName: "eth0"}
}

func (b *bed) add(id, podNS string) (*current.Result, error) {
	var res types.Result
	err := b.inNode(func() (err error) {
		res, err = b.cni.AddNetworkList(context.Background(), b.list, rt(id, podNS))
		return err
	})
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(res)
}

func (b *bed) mustAdd(id, podNS string) *current.Result {
	b.t.Helper()
	r, err := b.add(id, podNS)
	if err != nil {
		b.t.Fatalf("ADD %s: %v", id, err)
	}
	return r
}

func (b *bed) del(id, podNS string) error {
	return b.inNode(func() error { return b.cni.DelNetworkList(context.Background(), b.list, rt(id, podNS)) })
}

func (b *bed) check(id, podNS string) error {
	return b.inNode(func() error { return b.cni.CheckNetworkList(context.Background(), b.list, rt(id, podNS)) })
}

func (b *bed) gc(valid ...string) error {
	args := &libcni.GCArgs{}
	for _, id := range valid {
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: id, IfName: "eth0"})
	}
	return b.inNode(func() error { return b.cni.GCNetworkList(context.Background(), b.list, args) })
}

// run executes a command inside the namespace at path.
func run(path string, name string, args ...string) (string, error) {
	var out []byte
	err := netns.Do(path, func() (err error) {
		out, err = exec.Command(name, args...).CombinedOutput()
		return err
	})
	return string(out), err
}

func ping(t testing.TB, from, to string) {
	t.Helper()
	if out, err := run(from, "ping", "-c1", "-W2", to); err != nil {
		t.Errorf("ping %s from %s: %v\n%s", to, from, err, out)
	}
}

// hostVeths lists the sinabro host veths in the node namespace.
func (b *bed) hostVeths() []string {
	b.t.Helper()
	out, err := run(b.node, "ip", "-o", "link", "show")
	if err != nil {
		b.t.Fatalf("ip link: %v", err)
	}
	var names []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && strings.HasPrefix(f[1], "sb") {
			names = append(names, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
		}
	}
	return names
}

// allocations reads the IPAM state file of the test network.
func (b *bed) allocations() map[string]string {
	b.t.Helper()
	data, err := os.ReadFile(filepath.Join(b.dataDir, "ipam", b.name, "state.json"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		b.t.Fatalf("read ipam state: %v", err)
	}
	var st struct {
		Allocations map[string]struct {
			ContainerID string `json:"containerID"`
		} `json:"allocations"`
	}
	if err := json.Unmarshal(data, &st); err != nil {
		b.t.Fatalf("decode ipam state: %v", err)
	}
	out := map[string]string{}
	for ip, a := range st.Allocations {
		out[ip] = a.ContainerID
	}
	return out
}

// execPlugin runs the binary directly with env and stdin, as a runtime
// would, and decodes the error JSON it prints on failure.
func execPlugin(t testing.TB, nodeNS string, env map[string]string, stdin string) (stdout string, cniErr *types.Error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(pluginDir, "sinabro"))
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	var err error
	if nodeNS != "" {
		err = netns.Do(nodeNS, cmd.Run)
	} else {
		err = cmd.Run()
	}
	if err == nil {
		return out.String(), nil
	}
	e := &types.Error{}
	if jerr := json.Unmarshal(out.Bytes(), e); jerr != nil {
		t.Fatalf("plugin failed (%v) without error JSON on stdout: %q", err, out.String())
	}
	return out.String(), e
}
