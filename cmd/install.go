package cmd

import (
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/install"
)

func newInstallCmd() *cobra.Command {
	var o install.Options
	c := &cobra.Command{
		Use:   "install",
		Short: "Install sinabro as a CNI plugin (the DaemonSet's init container)",
		Long: `Copies this executable into the CNI bin dir atomically (skipped when an
identical copy is there) and, when --pod-cidr is given, writes the CNI
conflist. Without --pod-cidr the agent writes the conflist once the node has
a pod CIDR, so the runtime does not consider the network ready too early.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, c := range o.PodCIDRs {
				if _, err := netip.ParsePrefix(c); err != nil {
					return fmt.Errorf("invalid --pod-cidr %q: %w", c, err)
				}
			}
			res, err := install.Install(o)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if res.BinUpdated {
				fmt.Fprintf(out, "installed %s\n", res.BinPath)
			} else {
				fmt.Fprintf(out, "%s is up to date\n", res.BinPath)
			}
			if res.ConfPath != "" {
				fmt.Fprintf(out, "wrote %s\n", res.ConfPath)
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&o.BinDir, "cni-bin-dir", cni.DefaultBinDir, "directory the container runtime executes CNI plugins from")
	f.StringVar(&o.BinName, "bin-name", cni.DefaultBinName, "file name of the plugin in --cni-bin-dir")
	f.StringVar(&o.ConfDir, "cni-conf-dir", cni.DefaultConfDir, "directory the container runtime reads CNI configs from")
	f.StringSliceVar(&o.PodCIDRs, "pod-cidr", nil, "the node's pod CIDR (repeat for dual-stack); writes the conflist when set")
	f.IntVar(&o.MTU, "mtu", cni.DefaultMTU, "pod interface MTU")
	f.StringVar(&o.DataDir, "data-dir", cni.DefaultDataDir, "directory for the plugin's IPAM state")
	return c
}
