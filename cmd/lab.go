package cmd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/lab"
)

func newLabCmd() *cobra.Command {
	var dir string
	c := &cobra.Command{
		Use:   "lab",
		Short: "A local multi-node Kubernetes cluster on this box, in network namespaces",
		Long: `The lab runs a real Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager), nodes running the sinabro agent, the CNI plugin and
kube-proxy, test pods and their Services, a router and an external host, each
in a network namespace joined by an underlay bridge. Nothing in the root
network namespace is changed. Needs root.`,
	}
	c.PersistentFlags().StringVar(&dir, "dir", lab.DefaultDir, "lab state directory")
	c.AddCommand(
		newLabUpCmd(&dir),
		newLabDownCmd(&dir),
		newLabStatusCmd(&dir),
		newLabCheckCmd(&dir),
		newLabObserveCmd(&dir),
		newLabNodeCmd(&dir),
		newLabKubeconfigCmd(&dir),
		newLabSuperviseCmd(&dir),
		newLabServeCmd(),
		newLabExchangeCmd(),
		newLabImagesCmd(),
	)
	return c
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func newLabUpCmd(dir *string) *cobra.Command {
	o := lab.UpOptions{}
	c := &cobra.Command{
		Use:   "up",
		Short: "Start the lab and wait until nodes are Ready and pods Running",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Dir = *dir
			if o.KubeBinDir == "" {
				o.KubeBinDir = os.Getenv("SINABRO_KUBE_BIN_DIR")
			}
			if o.KubeBinDir == "" {
				return errors.New("--kube-bin-dir is required (the output of scripts/build-kube.sh), or set SINABRO_KUBE_BIN_DIR")
			}
			ctx, cancel := signalContext()
			defer cancel()
			return lab.Up(ctx, o, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.StringVar(&o.KubeBinDir, "kube-bin-dir", "", "directory with etcd, kube-apiserver, kube-controller-manager and kube-proxy (default $SINABRO_KUBE_BIN_DIR)")
	f.StringVar(&o.Manifests, "manifests", "", "directory of sinabro manifests to take the agent's RBAC from (default: ./manifests or next to the executable)")
	f.StringVar(&o.Name, "name", lab.DefaultName, "lab name: prefix of its network namespaces (NAME-*), suffix of its bpffs root and cgroup; labs of different names and --dir run side by side (other subcommands read it from the dir's lab.json)")
	f.IntVar(&o.Nodes, "nodes", lab.DefaultNodes, "number of nodes")
	f.IntVar(&o.PodsPerNode, "pods-per-node", lab.DefaultPodsPerNode, "test pods per node")
	f.StringVar(&o.ClusterCIDR, "cluster-cidr", lab.DefaultClusterCIDR, "pod CIDR of the cluster (one /24 per node)")
	f.StringVar(&o.ServiceCIDR, "service-cidr", lab.DefaultServiceCIDR, "service ClusterIP range")
	f.StringVar(&o.ProxyAddr, "api-proxy", "", "loopback address where the admin kubeconfig reaches the apiserver (default "+lab.DefaultProxyAddr+" for the default --name, a free loopback port for any other)")
	f.StringVar(&o.KubeProxy, "kube-proxy", "", "run the real kube-proxy in every node in this mode (iptables, nftables; Sinabro then leaves Services to it), or none (Sinabro serves Services; the default)")
	f.StringVar(&o.Runtime, "runtime", lab.RuntimeStandin, "what runs the nodes: "+lab.RuntimeStandin+" (a kubelet stand-in that wires pods through libcni; fast) or "+lab.RuntimeContainerd+" (a real kubelet and containerd per node, the sinabro DaemonSet from the manifests, CoreDNS)")
	f.StringVar(&o.Containerd, "containerd", lab.ContainerdV2, "with --runtime containerd: "+lab.ContainerdV2+" (2.x, built from the module proxy), "+lab.ContainerdV1+" (Debian's 1.x: apt install containerd) or "+lab.ContainerdMixed+" (1.x on even-numbered nodes)")
	f.StringArrayVar(&o.AgentArgs, "agent-arg", nil, "extra flag for every agent, repeatable (development: e.g. --agent-arg=--host-routing=false)")
	f.MarkHidden("agent-arg")
	f.DurationVar(&o.Timeout, "timeout", 5*time.Minute, "give up after this long")
	return c
}

func newLabDownCmd(dir *string) *cobra.Command {
	var keepLogs bool
	var name string
	c := &cobra.Command{
		Use:   "down",
		Short: "Stop the lab and remove everything it created (idempotent)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return lab.Down(cmd.Context(), lab.DownOptions{Dir: *dir, Name: name, KeepLogs: keepLogs}, cmd.OutOrStdout())
		},
	}
	c.Flags().BoolVar(&keepLogs, "keep-logs", false, "keep the logs directory")
	c.Flags().StringVar(&name, "name", "", "the lab's name, for a dir whose lab.json is gone (a crash); default: the name in lab.json, else "+lab.DefaultName)
	return c
}

func newLabStatusCmd(dir *string) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show lab processes (with RSS), nodes and pods",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return lab.PrintStatus(cmd.Context(), *dir, cmd.OutOrStdout())
		},
	}
}

func newLabCheckCmd(dir *string) *cobra.Command {
	o := lab.CheckOptions{}
	c := &cobra.Command{
		Use:   "check",
		Short: "Check connectivity (pod↔pod, node↔pod, pod→external over TCP, UDP, ICMP; Services through Sinabro or kube-proxy) and cluster state",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Dir = *dir
			ctx, cancel := signalContext()
			defer cancel()
			res, err := lab.Check(ctx, o)
			if err != nil {
				return err
			}
			res.Print(cmd.OutOrStdout(), o.Verbose)
			if n := res.Failures(); n > 0 {
				return errors.New("lab check: " + res.Summary())
			}
			return nil
		},
	}
	c.Flags().BoolVarP(&o.Verbose, "verbose", "v", false, "one line per probe")
	c.Flags().DurationVar(&o.Timeout, "timeout", 2*time.Second, "per-probe timeout")
	return c
}

func newLabNodeCmd(dir *string) *cobra.Command {
	c := &cobra.Command{Use: "node", Short: "Add or delete lab nodes"}
	c.AddCommand(&cobra.Command{
		Use:   "add NAME",
		Short: "Add a node (named node-<n>) and wait until it is Ready",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return lab.AddNode(cmd.Context(), *dir, args[0])
		},
	}, &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a node: its pods, agent, Node object and namespace",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return lab.DeleteNode(cmd.Context(), *dir, args[0])
		},
	})
	return c
}

func newLabSuperviseCmd(dir *string) *cobra.Command {
	return &cobra.Command{
		Use:    "supervise",
		Short:  "Run the lab supervisor (started by lab up)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			return lab.Supervise(ctx, *dir)
		},
	}
}

func newLabServeCmd() *cobra.Command {
	var name string
	c := &cobra.Command{
		Use:    "serve",
		Short:  "Run the lab test server (TCP and UDP echo of the peer address)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			return lab.Serve(ctx, name)
		},
	}
	c.Flags().StringVar(&name, "name", "", "name put in replies")
	return c
}

func newLabExchangeCmd() *cobra.Command {
	var to string
	var count int
	c := &cobra.Command{
		Use:    "exchange",
		Short:  "Exchange request/response lines with a lab test server (the acceleration check's client)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			return lab.Exchange(ctx, to, count)
		},
	}
	c.Flags().StringVar(&to, "to", "", "server address (ip:port)")
	c.Flags().IntVar(&count, "count", 100, "number of exchanges")
	return c
}

func newLabKubeconfigCmd(dir *string) *cobra.Command {
	var internal bool
	c := &cobra.Command{
		Use:   "kubeconfig",
		Short: "Print the lab's admin kubeconfig",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l := lab.Layout{Dir: *dir}
			path := l.AdminKubeconfig()
			if internal {
				path = l.InternalKubeconfig()
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("read kubeconfig (is the lab up?): %w", err)
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	}
	c.Flags().BoolVar(&internal, "internal", false, "the kubeconfig for use inside the lab's namespaces (apiserver underlay address)")
	return c
}
