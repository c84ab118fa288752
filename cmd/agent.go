package cmd

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/sinabro-io/sinabro/pkg/agent"
	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/flows"
	"github.com/sinabro-io/sinabro/pkg/version"
)

func newAgentCmd() *cobra.Command {
	var (
		cfg = agent.Config{
			CNIConfDir:           cni.DefaultConfDir,
			StateDir:             cni.DefaultDataDir,
			BPFRoot:              agent.DefaultBPFRoot,
			HealthAddr:           agent.DefaultHealthAddr,
			VXLANVNI:             agent.DefaultVXLANVNI,
			VXLANPort:            agent.DefaultVXLANPort,
			VXLANDevice:          agent.DefaultVXLANDevice,
			Masquerade:           true,
			MasqueradeBackend:    agent.BackendEBPF,
			HostRouting:          true,
			KubeProxyCoexistence: true,
			NetworkPolicy:        true,
			Flows: agent.FlowConfig{Enabled: true, FlowRate: flows.DefaultFlowRate, DropRate: flows.DefaultDropRate,
				Buffer: 8192, Socket: flows.DefaultSocket},
			ResyncInterval: agent.DefaultResyncInterval,
		}
		kubeconfig   string
		clusterCIDRs []string
		nonMasqCIDRs []string
		cleanup      bool
		portRange    string
		tcAttach     string
		logLevel     string
		logFormat    string
	)
	for _, p := range agent.DefaultClusterCIDRs {
		clusterCIDRs = append(clusterCIDRs, p.String())
	}
	c := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent: VXLAN overlay, eBPF datapath, host setup, CNI config",
		Long: `The node agent watches the cluster's Nodes and keeps this node's networking
in line with them: IP forwarding, a VXLAN device and, for every other node, a
route, neighbour and FDB entry; the eBPF datapath, which masquerades pod
traffic leaving the cluster (with its own conntrack) and routes traffic
between the node's pods without the host stack; and the CNI configuration
once the Node has spec.podCIDRs.

Same-node TCP acceleration is opt-in: a pod, or a namespace for its pods,
turns it on with the annotation sinabro.io/tcp-acceleration: "true";
--tcp-acceleration turns it on for every pod of the node, and "false" on a
pod or namespace opts out (a pod's annotation wins over its namespace's,
which wins over the node's default).

Stopping the agent leaves the datapath in place, pinned under --bpf-root:
established connections survive a restart. --cleanup removes it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logLevel, logFormat)
			if err != nil {
				return err
			}
			// client-go logs through klog; send it to the same handler.
			klog.SetSlogLogger(log)
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()

			if cleanup {
				if err := agent.Cleanup(ctx, cfg.VXLANDevice, cfg.BPFRoot); err != nil {
					return fmt.Errorf("cleanup: %w", err)
				}
				log.Info("removed the eBPF datapath, the vxlan device, sinabro routes and the masquerade table",
					"bpf_root", cfg.BPFRoot, "device", cfg.VXLANDevice)
				return nil
			}
			if cfg.NodeName == "" {
				return fmt.Errorf("--node-name (or $NODE_NAME) is required")
			}
			if cfg.ClusterCIDRs, err = parsePrefixes(clusterCIDRs); err != nil {
				return fmt.Errorf("--cluster-cidr: %w", err)
			}
			if cfg.NonMasqueradeCIDRs, err = parsePrefixes(nonMasqCIDRs); err != nil {
				return fmt.Errorf("--non-masquerade-cidr: %w", err)
			}
			if b := cfg.MasqueradeBackend; b != agent.BackendEBPF && b != agent.BackendNFTables {
				return fmt.Errorf("--masquerade-backend %q: want %s or %s", b, agent.BackendEBPF, agent.BackendNFTables)
			}
			if err := cfg.Conntrack.ParsePortRange(portRange); err != nil {
				return fmt.Errorf("--masquerade-port-range: %w", err)
			}
			if cfg.TCAttach, err = datapath.ParseAttachMode(tcAttach); err != nil {
				return fmt.Errorf("--tc-attach: %w", err)
			}
			switch cfg.CNIPortMap {
			case "auto", "true", "false":
			default:
				return fmt.Errorf("--cni-portmap %q: want auto, true or false", cfg.CNIPortMap)
			}
			if cfg.MTU < 0 || cfg.MTU > 0 && cfg.MTU < 576 {
				return fmt.Errorf("--mtu %d: want 0 (auto) or at least 576", cfg.MTU)
			}
			cluster, err := agent.KubeCluster(kubeconfig)
			if err != nil {
				return err
			}
			// What the kernel offers, and what is off without the rest.
			logPreflight(log)
			a, err := agent.New(cfg, cluster, log)
			if err != nil {
				return err
			}
			defer a.Close()
			log.Info("starting sinabro agent", "version", version.String(), "node", cfg.NodeName,
				"vxlan_device", cfg.VXLANDevice, "vni", cfg.VXLANVNI, "port", cfg.VXLANPort,
				"cluster_cidrs", clusterCIDRs, "masquerade", cfg.Masquerade, "masquerade_backend", cfg.MasqueradeBackend,
				"host_routing", cfg.HostRouting, "tc_attach", cfg.TCAttach, "tcp_acceleration", cfg.TCPAcceleration, "bpf_root", cfg.BPFRoot, "resync", cfg.ResyncInterval.String())
			if err := a.Run(ctx); err != nil {
				return err
			}
			log.Info("sinabro agent stopped")
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "name of this node's Node object (default $NODE_NAME)")
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster service account)")
	f.StringVar(&cfg.CNIConfDir, "cni-conf-dir", cfg.CNIConfDir, "directory to write the CNI conflist into")
	f.StringVar(&cfg.CNIBinDir, "cni-bin-dir", cni.DefaultBinDir, "the runtime's CNI plugin directory (where --cni-portmap=auto looks for portmap)")
	f.StringVar(&cfg.CNIPortMap, "cni-portmap", "auto", `chain the reference portmap plugin for pods' hostPort: "auto" (when --cni-bin-dir has it), "true" or "false"`)
	f.StringVar(&cfg.StateDir, "state-dir", cfg.StateDir, "agent and IPAM state directory (the conflist's dataDir)")
	f.StringVar(&cfg.BPFRoot, "bpf-root", cfg.BPFRoot, "bpffs directory for pinned eBPF objects")
	f.StringVar(&cfg.HealthAddr, "health-addr", cfg.HealthAddr, `address serving /healthz, /readyz and /metrics ("" disables)`)
	f.Uint32Var(&cfg.VXLANVNI, "vxlan-vni", cfg.VXLANVNI, "VXLAN network identifier")
	f.Uint16Var(&cfg.VXLANPort, "vxlan-port", cfg.VXLANPort, "VXLAN UDP port")
	f.StringVar(&cfg.VXLANDevice, "vxlan-device", cfg.VXLANDevice, "name of the VXLAN device")
	f.IntVar(&cfg.MTU, "mtu", 0, "pod MTU; 0 = underlay MTU - 50")
	f.StringSliceVar(&clusterCIDRs, "cluster-cidr", clusterCIDRs, "cluster pod CIDR(s), repeatable or comma-separated: other nodes' pod CIDRs must lie inside (\"\" accepts any that passes the other checks), and traffic to them is not masqueraded")
	f.StringSliceVar(&nonMasqCIDRs, "non-masquerade-cidr", nil, "further destinations pods reach with their own address, repeatable or comma-separated (node addresses and --cluster-cidr always are)")
	f.BoolVar(&cfg.Masquerade, "masquerade", cfg.Masquerade, "masquerade pod traffic leaving the cluster to the node address")
	f.StringVar(&cfg.MasqueradeBackend, "masquerade-backend", cfg.MasqueradeBackend, `masquerading with "ebpf" (the datapath on the uplink, conntrack survives agent restarts) or "nftables" (baseline)`)
	f.Uint32Var(&cfg.Conntrack.Size, "conntrack-size", datapath.DefaultCTSize, "eBPF masquerading's conntrack table entries (two per flow; an LRU: see README); an existing table keeps its size until uninstalled")
	f.StringVar(&portRange, "masquerade-port-range", fmt.Sprintf("%d-%d", datapath.DefaultPortMin, datapath.DefaultPortMax), "NAT source ports of eBPF masquerading, MIN-MAX (keep it outside net.ipv4.ip_local_port_range)")
	f.DurationVar(&cfg.Conntrack.Timeouts.TCPSyn, "conntrack-timeout-tcp-syn", 60*time.Second, "idle timeout of a TCP flow not (yet) answered")
	f.DurationVar(&cfg.Conntrack.Timeouts.TCPEstablished, "conntrack-timeout-tcp-established", 6*time.Hour, "idle timeout of an established TCP flow")
	f.DurationVar(&cfg.Conntrack.Timeouts.TCPClosing, "conntrack-timeout-tcp-closing", 10*time.Second, "idle timeout of a TCP flow after FIN both ways or RST")
	f.DurationVar(&cfg.Conntrack.Timeouts.UDP, "conntrack-timeout-udp", 60*time.Second, "idle timeout of a UDP flow")
	f.DurationVar(&cfg.Conntrack.Timeouts.ICMP, "conntrack-timeout-icmp", 30*time.Second, "idle timeout of an ICMP echo flow")
	f.BoolVar(&cfg.HostRouting, "host-routing", cfg.HostRouting, "route traffic between this node's pods in eBPF (bpf_redirect_peer), skipping the host stack")
	f.StringVar(&tcAttach, "tc-attach", string(datapath.AttachAuto), `how the eBPF datapath attaches to interfaces: "tcx" (Linux >= 6.6), "classic" (clsact qdisc + direct-action cls_bpf, older kernels) or "auto" (tcx where the kernel has it)`)
	f.BoolVar(&cfg.KubeProxyCoexistence, "kube-proxy-coexistence", cfg.KubeProxyCoexistence, "leave flows that netfilter translated (kube-proxy's Services, hostPort DNAT) to the kernel stack, asking the kernel's conntrack per TCP/UDP packet; where the kernel cannot be asked, host routing is turned off. false only where nothing on the node translates pod traffic")
	f.BoolVar(&cfg.TCPAcceleration, "tcp-acceleration", cfg.TCPAcceleration, `redirect TCP between all of this node's pods at the socket layer (sock_ops + sk_msg), except those annotated sinabro.io/tcp-acceleration: "false" (pod or namespace); when false, only between pods that opt in with "true", and the programs are detached live while none does`)
	f.StringVar(&cfg.PodCgroup, "pod-cgroup", "", "cgroup v2 directory holding this node's pods, for TCP acceleration (default: the cgroup v2 root)")
	f.BoolVar(&cfg.Flows.Enabled, "flow-telemetry", cfg.Flows.Enabled, "report flows and drops as events from the eBPF datapath, read with `sinabro observe` on the node (--observe-socket) and counted on /metrics")
	f.Uint32Var(&cfg.Flows.FlowRate, "flow-rate", cfg.Flows.FlowRate, "flow events (new flows, translations) the datapath sends at most per second and CPU; the rest are counted as sampled out (0: no limit)")
	f.Uint32Var(&cfg.Flows.DropRate, "flow-drop-rate", cfg.Flows.DropRate, "drop events the datapath sends at most per second and CPU, apart from flows: a drop flood never pushes flows out (0: no limit)")
	f.IntVar(&cfg.Flows.Buffer, "flow-buffer", cfg.Flows.Buffer, "flows the agent keeps in memory for `sinabro observe --last`")
	f.StringVar(&cfg.Flows.Socket, "observe-socket", cfg.Flows.Socket, "unix socket (0600) where `sinabro observe` reads this agent's flows")
	f.BoolVar(&cfg.NetworkPolicy, "network-policy", cfg.NetworkPolicy, "enforce Kubernetes NetworkPolicy in the eBPF datapath (needs --host-routing); the CNI plugin's ADD then waits until a new pod's policy state is in the datapath (fail closed)")
	f.StringVar(&cfg.KubeProxyReplacement, "kube-proxy-replacement", agent.KPRAuto, `Service load balancing in eBPF at the socket (connect/sendmsg): "auto" serves Services unless kube-proxy's rules are found in the node's network namespace (rechecked every 10 s), "true" serves them anyway, "false" leaves them to kube-proxy`)
	f.StringVar(&cfg.ServiceCgroup, "service-cgroup", "", "cgroup v2 directory whose processes (and their children) reach Services through the socket load balancer (default: the cgroup v2 root, every pod and host process)")
	f.StringVar(&cfg.NetnsDir, "netns-dir", "/var/run/netns", "directory of the pods' network namespace files (the container runtime's), searched for connected UDP sockets to a removed Service backend, which are terminated")
	f.DurationVar(&cfg.ResyncInterval, "resync-interval", cfg.ResyncInterval, "period of the full reconciliation against the kernel")
	f.StringVar(&cfg.ProcSys, "proc-sys", "/proc/sys", "the node's sysctl tree (an unprivileged container mounts the host's /proc/sys/net elsewhere, since its own /proc/sys is read-only)")
	f.BoolVar(&cleanup, "cleanup", false, "remove the eBPF datapath under --bpf-root, the vxlan device, sinabro routes and the masquerade table, then exit")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&logFormat, "log-format", "text", "text or json")
	return c
}

func newLogger(level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

func parsePrefixes(ss []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range ss {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p.Masked())
	}
	return out, nil
}
