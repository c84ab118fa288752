package cmd

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/kernel"
)

func newDebugPreflightCmd() *cobra.Command {
	var output string
	c := &cobra.Command{
		Use:   "preflight",
		Short: "List the kernel features Sinabro uses: present or missing, and what is off without each",
		Long: `Probes this node's kernel as the agent does at start: eBPF program and map
types and helpers, tcx and classic tc, BTF, cgroup v2, sock_ops/sk_msg, the
conntrack kfuncs and bpffs. Each line says whether the feature is there, the
first Linux release with it, and what Sinabro does without it. Run it as root
(or with the agent's capabilities) on the node, or in the agent's container.
Exits non-zero when something is missing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fs := kernel.Preflight()
			w := cmd.OutOrStdout()
			switch output {
			case "json":
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				if err := enc.Encode(fs); err != nil {
					return err
				}
			case "text":
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "FEATURE\tSTATE\tSINCE\tWITHOUT IT / DETAIL")
				for _, f := range fs {
					state, note := "ok", f.Detail
					if !f.Present {
						state, note = "MISSING", f.Without+" ("+f.Detail+")"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Name, state, f.Kernel, note)
				}
				tw.Flush()
			default:
				return fmt.Errorf("-o %q: want text or json", output)
			}
			if m := kernel.Missing(fs); len(m) > 0 {
				return fmt.Errorf("%d kernel features missing", len(m))
			}
			return nil
		},
	}
	c.Flags().StringVarP(&output, "output", "o", "text", "text or json")
	return c
}

// logPreflight logs one line per kernel feature at the agent's start:
// missing ones as warnings, with what is turned off without them.
func logPreflight(log *slog.Logger) {
	for _, f := range kernel.Preflight() {
		if f.Present {
			log.Info("kernel feature present", "feature", f.Name, "detail", f.Detail)
			continue
		}
		log.Warn("kernel feature missing", "feature", f.Name, "since", "Linux "+f.Kernel, "without_it", f.Without, "why", f.Detail)
	}
}
