package lab

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// Real nodes (`lab up --runtime containerd`): every node runs a real
// containerd and a real kubelet, as a machine of a cluster does. Each node
// is three namespaces the lab keeps: its network namespace (as with the
// stand-in), a mount namespace and a UTS namespace (hostname = node name).
// The mount namespace gives the node the well-known paths of a machine
// (/opt/cni/bin, /etc/cni/net.d, /var/lib/kubelet, /var/lib/containerd,
// /run/containerd, /var/log, a bpffs of its own on /sys/fs/bpf) bound to
// directories under the node's dir, so the DaemonSet's hostPath volumes,
// the runtime's CNI paths and the kubelet's hard-coded paths work unchanged
// and no two nodes share one. The namespaces persist as bind mounts of
// their nsfs files (like /run/netns), so containerd, the kubelet and a
// restarted process all enter the same ones.

// Runtimes of `lab up --runtime`.
const (
	RuntimeStandin    = "standin"
	RuntimeContainerd = "containerd"
)

// ParseRuntime validates a --runtime value.
func ParseRuntime(s string) (string, error) {
	switch s {
	case "", RuntimeStandin:
		return RuntimeStandin, nil
	case RuntimeContainerd:
		return s, nil
	}
	return "", fmt.Errorf("--runtime %q: want %s or %s", s, RuntimeStandin, RuntimeContainerd)
}

// realNodes reports whether the lab's nodes run containerd and kubelet.
func (c *Config) realNodes() bool { return c.Runtime == RuntimeContainerd }

// containerd versions of `lab up --containerd`: v2 (built from the module
// proxy, on every node), v1 (Debian's 1.6, on every node) or mixed (v1 on
// even-numbered nodes): CNI libraries of both generations run the conflist.
const (
	ContainerdV2    = "v2"
	ContainerdV1    = "v1"
	ContainerdMixed = "mixed"

	// containerd1 is Debian's containerd 1.x (apt install containerd).
	containerd1 = "/usr/bin/containerd"
)

// ParseContainerd validates a --containerd value.
func ParseContainerd(s string) (string, error) {
	switch s {
	case "", ContainerdV2:
		return ContainerdV2, nil
	case ContainerdV1, ContainerdMixed:
		if _, err := os.Stat(containerd1); err != nil {
			return "", fmt.Errorf("--containerd %s: %w (apt install containerd)", s, err)
		}
		return s, nil
	}
	return "", fmt.Errorf("--containerd %q: want %s, %s or %s", s, ContainerdV2, ContainerdV1, ContainerdMixed)
}

// containerd1 reports whether node runs Debian's containerd 1.x.
func (c *Config) nodeContainerd1(node string) bool {
	switch c.Containerd {
	case ContainerdV1:
		return true
	case ContainerdMixed:
		n, err := nodeIndex(node)
		return err == nil && n%2 == 0
	}
	return false
}

// ctr is the containerd client matching the node's daemon.
func (c *Config) ctr(node string) string {
	if c.nodeContainerd1(node) {
		return "/usr/bin/ctr"
	}
	return filepath.Join(c.KubeBinDir, "ctr")
}

// nodeBins are the binaries real nodes need besides the control plane's.
var nodeBins = []string{"kubelet", "kube-scheduler", "containerd", "containerd-shim-runc-v2", "ctr", "portmap", "loopback"}

// Paths inside a node's mount namespace, bound to dirs of the node.
var nodeBinds = []struct{ target, under string }{
	{"/opt/cni/bin", "cni/bin"},
	{"/etc/cni/net.d", "cni/net.d"},
	{"/var/lib/kubelet", "kubelet"},
	{"/var/lib/cni", "var-lib-cni"},
	{"/var/lib/sinabro", "state"},
	{"/var/lib/containerd", "containerd/root"},
	{"/run/containerd", "containerd/state"},
	{"/var/log", "log"},
}

// nsDir holds the nsfs bind mounts of the nodes' mount and UTS namespaces;
// itself a private mount, since a mount namespace file may only be bound
// where the mount cannot propagate into that namespace.
func (l Layout) nsDir() string                  { return l.path("ns") }
func (l Layout) nodeMountNS(node string) string { return l.path("ns", node+".mnt") }
func (l Layout) nodeUTSNS(node string) string   { return l.path("ns", node+".uts") }
func (l Layout) containerdSocket(node string) string {
	return filepath.Join(l.Node(node), "containerd", "state", "containerd.sock")
}

// createdDirsFile lists the mount points the lab created on the host (for
// the nodes' binds), removed again by `lab down` when empty.
func (l Layout) createdDirsFile() string { return l.path("created-dirs") }

// nodeCgroupRoot is the kubelet's cgroupRoot of a node (the same path in
// every cgroup v1 hierarchy and in the v2 one).
func (c *Config) nodeCgroupRoot(node string) string { return "/" + c.LabName() + "-" + node }

// nsenter runs argv inside the node's network, mount and UTS namespaces.
// (Not `ip netns exec`: it remounts /sys, hiding the cgroup v1 mounts the
// kubelet and runc need.)
func (c *Config) nsenter(node string, argv ...string) []string {
	l := c.layout()
	return append([]string{"nsenter", "--net=" + netns.Path(c.NodeNetns(node)),
		"--mount=" + l.nodeMountNS(node), "--uts=" + l.nodeUTSNS(node), "--"}, argv...)
}

// setupNodeNamespaces creates the node's mount and UTS namespaces with its
// binds, own bpffs and hostname, and its cgroup roots. Idempotent: an
// existing mount namespace is kept.
func (c *Config) setupNodeNamespaces(node string) error {
	l := c.layout()
	if err := ensurePrivateDir(l.nsDir()); err != nil {
		return err
	}
	if isMountPoint(l.nodeMountNS(node)) {
		return nil
	}
	var script strings.Builder
	fmt.Fprintf(&script, "set -e\nhostname %s\nmount -t bpf bpf /sys/fs/bpf\n", node)
	for _, b := range nodeBinds {
		src := filepath.Join(l.Node(node), b.under)
		if err := os.MkdirAll(src, 0o755); err != nil {
			return err
		}
		if err := c.ensureMountPoint(b.target); err != nil {
			return err
		}
		fmt.Fprintf(&script, "mount --bind %s %s\n", src, b.target)
	}
	// Shared inside the node, as on a systemd machine: HostToContainer and
	// Bidirectional volume mounts (the agent's bpffs) need it. The node's
	// peer groups are its own: nothing propagates to the host.
	script.WriteString("mount --make-rshared /\n")
	for _, f := range []string{l.nodeMountNS(node), l.nodeUTSNS(node)} {
		if err := os.WriteFile(f, nil, 0o444); err != nil {
			return err
		}
	}
	out, err := exec.Command("unshare", "--mount="+l.nodeMountNS(node), "--uts="+l.nodeUTSNS(node),
		"--propagation", "private", "sh", "-c", script.String()).CombinedOutput()
	if err != nil {
		return fmt.Errorf("create mount and UTS namespaces of %s: %w: %s", node, err, out)
	}
	return c.createNodeCgroups(node)
}

// ensureMountPoint creates dir on the host when missing and records it.
func (c *Config) ensureMountPoint(dir string) error {
	if fileExists(dir) {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create mount point %s: %w", dir, err)
	}
	f, err := os.OpenFile(c.layout().createdDirsFile(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintln(f, dir)
	return err
}

func ensurePrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if !isMountPoint(dir) {
		if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", dir, err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make %s private: %w", dir, err)
	}
	return nil
}

// mountPoints lists the mount points of this process's mount namespace.
func mountPoints() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fs := strings.Fields(sc.Text()); len(fs) > 4 {
			out = append(out, fs[4])
		}
	}
	return out
}

func isMountPoint(path string) bool {
	for _, m := range mountPoints() {
		if m == path {
			return true
		}
	}
	return false
}

// cgroupV1Hierarchies lists the mount points of the cgroup v1 hierarchies.
func cgroupV1Hierarchies() []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if !ok || !strings.HasPrefix(post, "cgroup ") {
			continue
		}
		if fs := strings.Fields(pre); len(fs) > 4 {
			out = append(out, fs[4])
		}
	}
	return out
}

// createNodeCgroups makes the node's cgroupRoot in every v1 hierarchy (the
// kubelet expects it to exist), with cpuset's cpus and mems filled in.
func (c *Config) createNodeCgroups(node string) error {
	root := c.nodeCgroupRoot(node)
	for _, h := range cgroupV1Hierarchies() {
		dir := filepath.Join(h, root)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("create cgroup %s: %w", dir, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if v, err := os.ReadFile(filepath.Join(h, f)); err == nil {
				os.WriteFile(filepath.Join(dir, f), v, 0o644)
			}
		}
	}
	return nil
}

// killNodeCgroups kills every process in the cgroups of the lab named
// name's nodes (containers: runc moves them there, out of the lab's own
// cgroup) and removes the cgroups, deepest first. It returns how many
// processes it killed.
func killNodeCgroups(name string) (int, error) { return killCgroupRoots(name + "-node-*") }

// killCgroupRoots does the same for the cgroup roots named by pattern
// (one node's: "<lab>-<node>").
func killCgroupRoots(pattern string) (int, error) {
	hier := cgroupV1Hierarchies()
	if mnt, err := cgroup.V2Mount(); err == nil {
		hier = append(hier, mnt)
	}
	var roots []string
	for _, h := range hier {
		m, _ := filepath.Glob(filepath.Join(h, pattern))
		roots = append(roots, m...)
	}
	if len(roots) == 0 {
		return 0, nil
	}
	var dirs []string
	for _, r := range roots {
		filepath.WalkDir(r, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	killed := map[int]bool{}
	deadline := time.Now().Add(15 * time.Second)
	for {
		alive := 0
		for _, d := range dirs {
			for _, pid := range cgroupPids(d) {
				alive++
				if !killed[pid] {
					unix.Kill(pid, unix.SIGKILL)
					killed[pid] = true
				}
			}
		}
		if alive == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Deepest first.
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
	var errs []error
	for _, d := range dirs {
		var err error
		for range 40 {
			if err = unix.Rmdir(d); err == nil || errors.Is(err, unix.ENOENT) {
				err = nil
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return len(killed), errors.Join(errs...)
}

// releaseNodeNamespaces unmounts the nodes' namespace files: with no
// process left in them, the mount namespaces go and with them every mount
// the nodes made (overlays, pod netns files, their bpffs).
func releaseNodeNamespaces(l Layout) error {
	dir := l.nsDir()
	var errs []error
	for _, m := range mountPoints() {
		if strings.HasPrefix(m, dir+"/") {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
			}
		}
	}
	for isMountPoint(dir) {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", dir, err))
			break
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// stopRealNode stops one real node: its kubelet, containers and containerd,
// then its cgroups and namespaces.
func (s *supervisor) stopRealNode(node string) error {
	s.procs.stop("kubelet-" + node)
	_, err := killCgroupRoots(strings.TrimPrefix(s.cfg.nodeCgroupRoot(node), "/"))
	s.procs.stop("containerd-" + node)
	l := s.cfg.layout()
	for _, f := range []string{l.nodeMountNS(node), l.nodeUTSNS(node)} {
		if uerr := unix.Unmount(f, unix.MNT_DETACH); uerr != nil && !errors.Is(uerr, unix.EINVAL) && !errors.Is(uerr, unix.ENOENT) {
			err = errors.Join(err, fmt.Errorf("unmount %s: %w", f, uerr))
		}
		os.Remove(f)
	}
	return err
}

// removeCreatedDirs removes the mount points the lab created on the host,
// if they are still empty.
func removeCreatedDirs(l Layout) {
	b, err := os.ReadFile(l.createdDirsFile())
	if err != nil {
		return
	}
	dirs := strings.Fields(string(b))
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
	for _, d := range dirs {
		// Parents the lab created too (MkdirAll) go when empty.
		for p := d; p != "/" && p != "."; p = filepath.Dir(p) {
			if os.Remove(p) != nil {
				break
			}
		}
	}
	os.Remove(l.createdDirsFile())
}

// writeContainerdConfig writes the node's containerd (v2, config version 3)
// configuration. Paths are the node's own through its mount namespace.
func (c *Config) writeContainerdConfig(node string) (string, error) {
	path := filepath.Join(c.layout().Node(node), "containerd.toml")
	runc, err := exec.LookPath("runc")
	if err != nil {
		return "", fmt.Errorf("real nodes need runc (apt install runc): %w", err)
	}
	data := fmt.Sprintf(containerd2Config, pauseImage, runc)
	if c.nodeContainerd1(node) {
		data = fmt.Sprintf(containerd1Config, pauseImage, runc)
	}
	if err := atomicfile.Write(path, []byte(data), 0o644); err != nil {
		return "", fmt.Errorf("write containerd config of %s: %w", node, err)
	}
	return path, nil
}

// containerd 2.x configuration (version 3).
const containerd2Config = `version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "%s"

[plugins.'io.containerd.cri.v1.runtime']
  # Root here may lack CAP_SYS_RESOURCE: runc could not lower a sandbox's
  # oom_score_adj to -998.
  restrict_oom_score_adj = true
  # Pod network namespaces under /run/containerd (the node's own), not in
  # the host's /run/netns.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
    use_internal_loopback = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "%s"
      Root = "/run/containerd/runc"
      SystemdCgroup = false
`

// containerd 1.x configuration (version 2), same settings. Its CNI library
// runs the loopback plugin from the bin dir.
const containerd1Config = `version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "%s"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "%s"
        Root = "/run/containerd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
`

// pauseImage is the sandbox image of the lab's containerd (imported, never
// pulled).
const pauseImage = "registry.k8s.io/pause:3.10"

// clusterDNSIP is the kube-dns Service's ClusterIP: the tenth address of the
// service range, as kubeadm picks it.
func (c *Config) clusterDNSIP() (string, error) {
	ip, err := firstServiceIP(c.ServiceCIDR)
	if err != nil {
		return "", err
	}
	ip[3] += 9
	return ip.String(), nil
}

// writeKubeletConfig writes the node's KubeletConfiguration.
func (c *Config) writeKubeletConfig(node string) (string, error) {
	l := c.layout()
	dns, err := c.clusterDNSIP()
	if err != nil {
		return "", err
	}
	path := filepath.Join(l.Node(node), "kubelet.yaml")
	data := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 hosts: kept explicit, since later kubelets refuse v1 by default.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %s
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: 0.0.0.0
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
# The apiserver reaches the kubelet for exec, logs and port-forward without
# a client certificate; a lab, not a production node.
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
# Never garbage-collect the imported images: there is no registry.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDomain: cluster.local
clusterDNS: [%s]
resolvConf: %s
serializeImagePulls: false
# Not the host's /usr/libexec: nothing of a node outside its dirs.
volumePluginDir: /var/lib/kubelet/volume-plugins
`, c.nodeCgroupRoot(node), dns, filepath.Join(l.Node(node), "resolv.conf"))
	if err := atomicfile.Write(path, []byte(data), 0o644); err != nil {
		return "", fmt.Errorf("write kubelet config of %s: %w", node, err)
	}
	// The host's resolver is not reachable from the lab's namespaces; pods
	// of dnsPolicy Default get an empty search list and no servers.
	if err := atomicfile.Write(filepath.Join(l.Node(node), "resolv.conf"), []byte("search .\n"), 0o644); err != nil {
		return "", err
	}
	return path, nil
}

func (c *Config) containerdSpec(node, config string) procSpec {
	if c.nodeContainerd1(node) {
		// Debian's, with its own shim from /usr/bin.
		return procSpec{name: "containerd-" + node, restart: true, argv: c.nsenter(node, containerd1, "--config", config)}
	}
	return procSpec{
		name: "containerd-" + node, restart: true,
		// Its shim first in PATH (a Debian containerd 1.x may be installed).
		env:  []string{"PATH=" + c.KubeBinDir + ":" + os.Getenv("PATH")},
		argv: c.nsenter(node, filepath.Join(c.KubeBinDir, "containerd"), "--config", config),
	}
}

func (c *Config) kubeletSpec(node, config, kubeconfig string, addr string) procSpec {
	return procSpec{
		name: "kubelet-" + node, restart: true,
		argv: c.nsenter(node, filepath.Join(c.KubeBinDir, "kubelet"),
			"--config="+config,
			"--kubeconfig="+kubeconfig,
			"--hostname-override="+node,
			"--node-ip="+addr,
			"--v=1"),
	}
}
