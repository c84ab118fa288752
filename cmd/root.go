// Package cmd holds the cobra command tree of the sinabro executable.
package cmd

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
)

// Execute runs the command named by argv and returns the process exit code.
// An argv[0] of the form "sinabro-<sub>" (a busybox-style symlink) runs that
// subcommand, so `sinabro-agent --node-name x` equals `sinabro agent --node-name x`.
func Execute(argv []string) int {
	root := newRootCmd()
	root.SetArgs(argsFor(argv))
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		return 1
	}
	return 0
}

func argsFor(argv []string) []string {
	if len(argv) == 0 {
		return nil
	}
	args := argv[1:]
	if sub, ok := strings.CutPrefix(filepath.Base(argv[0]), "sinabro-"); ok && sub != "" {
		return append([]string{sub}, args...)
	}
	return args
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "sinabro",
		Short: "Kubernetes networking on eBPF",
		Long: `Sinabro is Kubernetes networking on eBPF in one executable.

Run by a container runtime with CNI_COMMAND set, it is the CNI plugin.
Otherwise its subcommands are the node agent, the installer, the debug CLI
and a local multi-node lab.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(
		newVersionCmd(),
		newInstallCmd(),
		newUninstallCmd(),
		newAgentCmd(),
		newDebugCmd(),
		newObserveCmd(),
		newLabCmd(),
	)
	return root
}
