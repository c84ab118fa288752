// Package lab runs a local multi-node Kubernetes cluster on one Linux box: a
// real control plane (etcd, kube-apiserver, kube-controller-manager) and
// nodes, pods, a router and an external host, each in a network namespace the
// lab creates and joins over an underlay bridge. Nodes run the real sinabro
// agent and CNI plugin and, as in most clusters, the real kube-proxy; a
// kubelet stand-in per node wires pods through libcni as containerd does —
// or, with the containerd runtime (node_linux.go), a real kubelet and
// containerd per node run the sinabro DaemonSet from the manifests.
// Nothing in the root network namespace is touched.
package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
)

// Defaults of `sinabro lab up`.
const (
	DefaultDir         = "/var/lib/sinabro-lab"
	DefaultClusterCIDR = "10.244.0.0/16"
	DefaultServiceCIDR = "10.96.0.0/16"
	DefaultUnderlay    = "172.31.250.0/24"
	DefaultBPFRoot     = "/sys/fs/bpf/sinabro-lab"
	DefaultProxyAddr   = "127.0.0.1:16443"
	DefaultNodes       = 2
	DefaultPodsPerNode = 2
	// DefaultKubeProxy: Sinabro serves Services, on stand-in and real
	// nodes alike.
	DefaultKubeProxy = KubeProxyNone

	// DefaultName is the name of a lab made without --name. Every name a lab
	// makes outside its dir derives from its name (see NetnsPrefix,
	// BPFRootFor, CgroupNameFor), so labs of different names and dirs run
	// side by side.
	DefaultName = "sblab"

	// Ports of the test server in pods, nodes and the external host.
	ServeTCPPort = 8080
	ServeUDPPort = 8081

	// agentHealthAddr is where each agent serves /healthz, /readyz and
	// /metrics, on the loopback of its own node namespace.
	agentHealthAddr = "127.0.0.1:9962"

	// kubeProxyHealthPort serves kube-proxy's /healthz on each node's
	// underlay address; kubeProxyMetricsAddr its /metrics on the node's
	// loopback.
	kubeProxyHealthPort  = 10256
	kubeProxyMetricsAddr = "127.0.0.1:10249"

	podNamespace = "default"
	labelApp     = "sinabro-lab"
	apiPort      = 6443
)

// Config is the lab's desired shape, saved as lab.json in the lab dir.
type Config struct {
	// Name is the lab's name ("" in a lab.json of before names: DefaultName).
	Name        string   `json:"name,omitempty"`
	Dir         string   `json:"dir"`
	KubeBinDir  string   `json:"kubeBinDir"`
	Executable  string   `json:"executable"` // the sinabro binary installed on nodes
	Manifests   string   `json:"manifests,omitempty"`
	ClusterCIDR string   `json:"clusterCIDR"`
	ServiceCIDR string   `json:"serviceCIDR"`
	Underlay    string   `json:"underlay"`
	BPFRoot     string   `json:"bpfRoot"`
	ProxyAddr   string   `json:"proxyAddr"`
	Nodes       []string `json:"nodes"`
	PodsPerNode int      `json:"podsPerNode"`
	CgroupPath  string   `json:"cgroupPath,omitempty"`
	// KubeProxy is the mode of the kube-proxy run in every node
	// ("iptables", "nftables"), or "none".
	KubeProxy string `json:"kubeProxy,omitempty"`
	// AgentArgs are extra flags for every agent (a development knob, e.g.
	// --host-routing=false).
	AgentArgs []string `json:"agentArgs,omitempty"`
	// Runtime runs the nodes: RuntimeStandin ("" in older lab.json) or
	// RuntimeContainerd (real kubelets and containerd, see node_linux.go).
	Runtime string `json:"runtime,omitempty"`
	// Containerd picks the real nodes' containerd: ContainerdV2 ("" too),
	// ContainerdV1 or ContainerdMixed.
	Containerd string `json:"containerd,omitempty"`
}

// kube-proxy modes of `lab up --kube-proxy`.
const (
	KubeProxyNone     = "none"
	KubeProxyIPTables = "iptables"
	KubeProxyNFTables = "nftables"
)

// ParseKubeProxyMode validates a --kube-proxy value.
func ParseKubeProxyMode(s string) (string, error) {
	switch s {
	case KubeProxyNone, KubeProxyIPTables, KubeProxyNFTables:
		return s, nil
	case "":
		return KubeProxyNone, nil
	}
	return "", fmt.Errorf("--kube-proxy %q: want %s, %s or %s", s, KubeProxyNone, KubeProxyIPTables, KubeProxyNFTables)
}

// kubeProxy reports whether the lab runs kube-proxy.
func (c *Config) kubeProxy() bool { return c.KubeProxy != "" && c.KubeProxy != KubeProxyNone }

// Layout names the files of a lab dir.
type Layout struct{ Dir string }

func (l Layout) path(elem ...string) string {
	return filepath.Join(append([]string{l.Dir}, elem...)...)
}

func (l Layout) Config() string          { return l.path("lab.json") }
func (l Layout) PKI() string             { return l.path("pki") }
func (l Layout) Logs() string            { return l.path("logs") }
func (l Layout) Log(name string) string  { return l.path("logs", name+".log") }
func (l Layout) AdminKubeconfig() string { return l.path("admin.kubeconfig") }
func (l Layout) Progress() string        { return l.path("progress.jsonl") }
func (l Layout) SupervisorPID() string   { return l.path("supervisor.pid") }
func (l Layout) Socket() string          { return l.path("supervisor.sock") }
func (l Layout) Pids() string            { return l.path("pids") }
func (l Layout) Node(name string) string { return l.path("nodes", name) }
func (l Layout) NodeCNIBin(name string) string {
	return l.path("nodes", name, "cni", "bin")
}
func (l Layout) KubeProxyKubeconfig() string { return l.path("kube-proxy.kubeconfig") }
func (l Layout) NodeKubeProxyConfig(name string) string {
	return l.path("nodes", name, "kube-proxy.yaml")
}
func (l Layout) NodeCNIConf(name string) string {
	return l.path("nodes", name, "cni", "net.d")
}

// InternalKubeconfig is the admin kubeconfig pointing at the apiserver's
// underlay address, for tools run inside the lab's namespaces.
func (l Layout) InternalKubeconfig() string { return l.path("admin-underlay.kubeconfig") }

// ObserveSocket is where a stand-in node's agent serves its flows.
func (l Layout) ObserveSocket(node string) string {
	return filepath.Join(l.Node(node), "state", "observe.sock")
}

// ObserveSockets names the flow socket of every node's agent, for `lab
// observe`. Real nodes run the agent in a pod: its socket is in the
// container (kubectl exec into it and run sinabro observe).
func (c *Config) ObserveSockets() (map[string]string, error) {
	if c.Runtime == RuntimeContainerd {
		return nil, errors.New("lab observe reads the agents of stand-in nodes; on real nodes run `sinabro observe` in an agent pod (kubectl -n kube-system exec ds/sinabro -c agent -- sinabro observe)")
	}
	out := map[string]string{}
	for _, n := range c.Nodes {
		out[n] = c.layout().ObserveSocket(n)
	}
	return out, nil
}

// LoadConfig reads lab.json from dir.
func LoadConfig(dir string) (*Config, error) {
	b, err := os.ReadFile(Layout{dir}.Config())
	if err != nil {
		return nil, fmt.Errorf("read lab config: %w", err)
	}
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("decode lab config: %w", err)
	}
	return &c, nil
}

func (c *Config) save() error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(Layout{c.Dir}.Config(), b, 0o644); err != nil {
		return fmt.Errorf("write lab config: %w", err)
	}
	return nil
}

func (c *Config) layout() Layout { return Layout{c.Dir} }

// Addresses on the underlay: the router is .1 (every node's default
// gateway), the control plane .2, the external host .254 and node i
// (1-based) .10+i.
func (c *Config) underlayPrefix() netip.Prefix { return netip.MustParsePrefix(c.Underlay) }

func (c *Config) hostAddr(n int) netip.Addr {
	a := c.underlayPrefix().Addr().As4()
	a[3] = byte(n)
	return netip.AddrFrom4(a)
}

func (c *Config) routerAddr() netip.Addr       { return c.hostAddr(1) }
func (c *Config) controlPlaneAddr() netip.Addr { return c.hostAddr(2) }
func (c *Config) externalAddr() netip.Addr     { return c.hostAddr(254) }

// nodeAddr derives a node's underlay address from its name ("node-3" → .13).
func (c *Config) nodeAddr(name string) (netip.Addr, error) {
	n, err := nodeIndex(name)
	if err != nil {
		return netip.Addr{}, err
	}
	return c.hostAddr(10 + n), nil
}

func (c *Config) apiserverURL() string {
	return fmt.Sprintf("https://%s", netip.AddrPortFrom(c.controlPlaneAddr(), apiPort))
}

func nodeName(i int) string { return fmt.Sprintf("node-%d", i) }

func nodeIndex(name string) (int, error) {
	var n int
	if _, err := fmt.Sscanf(name, "node-%d", &n); err != nil || n < 1 || n > 200 {
		return 0, fmt.Errorf("node name %q: want node-<1..200>", name)
	}
	return n, nil
}

var validName = regexp.MustCompile(`^[a-z][a-z0-9]{0,11}$`)

// ValidateName checks a lab name: a lowercase letter, then up to 11
// lowercase letters or digits. No dash, so no lab's namespace prefix
// (name + "-") is a prefix of another's.
func ValidateName(name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("lab name %q: want a lowercase letter, then up to 11 lowercase letters or digits", name)
	}
	return nil
}

// NetnsPrefix starts the name of every network namespace of the lab named
// name, so `lab down` can find them all, even after a crash.
func NetnsPrefix(name string) string { return name + "-" }

// PodNetnsOf names the network namespace of the pod with this UID in the lab
// named name: after the UID, so a recreated pod of the same name never
// reuses its predecessor's.
func PodNetnsOf(name, uid string) string {
	return NetnsPrefix(name) + "pod-" + strings.ReplaceAll(uid, "-", "")[:16]
}

// BPFRootFor is the bpffs directory of the lab named name: DefaultBPFRoot
// for the default lab, DefaultBPFRoot-<name> for any other.
func BPFRootFor(name string) string { return scopedName(DefaultBPFRoot, name) }

// CgroupNameFor names the cgroup (under the cgroup v2 mount) holding every
// process of the lab named name.
func CgroupNameFor(name string) string { return scopedName(cgroupName, name) }

func scopedName(base, name string) string {
	if name == "" || name == DefaultName {
		return base
	}
	return base + "-" + name
}

// LabName is the lab's name, DefaultName for a lab.json without one.
func (c *Config) LabName() string {
	if c.Name == "" {
		return DefaultName
	}
	return c.Name
}

func (c *Config) netns(suffix string) string { return NetnsPrefix(c.LabName()) + suffix }

// Network namespace names.
func (c *Config) nsUnderlay() string     { return c.netns("underlay") }
func (c *Config) nsControlPlane() string { return c.netns("cp") }
func (c *Config) nsExternal() string     { return c.netns("ext") }
func (c *Config) nsRouter() string       { return c.netns("router") }

// NodeNetns names a node's network namespace.
func (c *Config) NodeNetns(node string) string { return c.netns(node) }

// PodNetns names the network namespace of the pod with this UID.
func (c *Config) PodNetns(uid string) string { return PodNetnsOf(c.LabName(), uid) }

func (c *Config) nodeBPFRoot(node string) string { return filepath.Join(c.BPFRoot, node) }

// NodeCgroup is the cgroup v2 directory standing for a node's root cgroup
// (its pods are below it), where the node's agent attaches Service load
// balancing; "" without a lab cgroup.
func (c *Config) NodeCgroup(node string) string {
	if c.CgroupPath == "" {
		return ""
	}
	return filepath.Join(c.CgroupPath, "node-"+node)
}

// NodePodCgroup is the cgroup v2 directory of a node's pod processes, where
// the node's agent attaches TCP acceleration; "" without a lab cgroup.
func (c *Config) NodePodCgroup(node string) string {
	if c.CgroupPath == "" {
		return ""
	}
	return filepath.Join(c.NodeCgroup(node), "pods")
}

// servicesBy names who serves the lab's Services.
func (c *Config) servicesBy() string {
	if c.kubeProxy() {
		return "kube-proxy (" + c.KubeProxy + ")"
	}
	return "sinabro"
}
