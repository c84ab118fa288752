package cmd

import (
	"fmt"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/agent"
	"github.com/sinabro-io/sinabro/pkg/cni"
)

func newUninstallCmd() *cobra.Command {
	var (
		cfg = agent.UninstallConfig{
			BPFRoot:     agent.DefaultBPFRoot,
			VXLANDevice: agent.DefaultVXLANDevice,
			CNIBinDir:   cni.DefaultBinDir,
			CNIBinName:  cni.DefaultBinName,
			CNIConfDir:  cni.DefaultConfDir,
			StateDir:    cni.DefaultDataDir,
		}
		wait     bool
		logLevel string
	)
	c := &cobra.Command{
		Use:   "uninstall",
		Short: "Remove everything Sinabro put on this node (run in the node's network namespace)",
		Long: `Removes, from this node and without the API server: the eBPF programs on
every interface (tcx links or classic tc filters) and every pin under
--bpf-root, TCP acceleration's cgroup programs, the vxlan device, the agent's
routes (protocol 201) and masquerade table, the pods' host interfaces and
routes (protocol 200), the CNI conflist, the plugin executable and the state
directory. Running it again finds nothing to do.

Stop the agent first (delete the sinabro DaemonSet: a running agent puts the
datapath back) and delete the node's pods: once the plugin is gone the
runtime cannot tear their network down. In a cluster, run it on every node
with manifests/uninstall/uninstall.yaml (its pods stay Running, with --wait,
once done; then delete that DaemonSet too).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logLevel, "text")
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			if err := agent.Uninstall(ctx, cfg, log); err != nil {
				return fmt.Errorf("uninstall: %w", err)
			}
			log.Info("sinabro uninstalled from this node", "bpf_root", cfg.BPFRoot, "cni_bin_dir", cfg.CNIBinDir, "cni_conf_dir", cfg.CNIConfDir)
			if wait {
				log.Info("waiting to be stopped (--wait)")
				<-ctx.Done()
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.BPFRoot, "bpf-root", cfg.BPFRoot, "the agent's bpffs directory (its --bpf-root)")
	f.StringVar(&cfg.VXLANDevice, "vxlan-device", cfg.VXLANDevice, "the agent's VXLAN device (its --vxlan-device)")
	f.StringVar(&cfg.CNIBinDir, "cni-bin-dir", cfg.CNIBinDir, `directory the plugin was installed into ("" leaves it)`)
	f.StringVar(&cfg.CNIBinName, "bin-name", cfg.CNIBinName, "file name of the plugin in --cni-bin-dir")
	f.StringVar(&cfg.CNIConfDir, "cni-conf-dir", cfg.CNIConfDir, `directory holding the conflist ("" leaves it)`)
	f.StringVar(&cfg.StateDir, "state-dir", cfg.StateDir, `agent and IPAM state directory, emptied and removed ("" leaves it)`)
	f.BoolVar(&wait, "wait", false, "after uninstalling, wait for SIGTERM (as a DaemonSet's container, so it is not restarted)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return c
}
