package cmd

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/service"
)

func newDebugServicesCmd() *cobra.Command {
	var root, output string
	cmd := &cobra.Command{
		Use:   "services",
		Short: "Show the Services the socket load balancer serves, as the datapath sees them",
		Long: `Reads the pinned Service maps under the bpffs root: one row per frontend
(ClusterIP, external or load-balancer IP, or "*" for a NodePort on every
node address) with its Service and port name, its backends in slot order,
sessionAffinity, and how many connections or datagrams were sent to a
backend (TRANSLATED) or refused for want of one (REFUSED). Then the
socket-call counters by reason.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("unknown output format %q (text or json)", output)
			}
			rows, err := service.List(root)
			if err != nil {
				return err
			}
			counters, err := service.Counters(root)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if output == "json" {
				return writeJSON(w, struct {
					Attached bool              `json:"attached"`
					Services []service.Row     `json:"services"`
					Counters map[string]uint64 `json:"counters"`
				}{service.Attached(root), rows, counters})
			}
			state := "attached"
			if !service.Attached(root) {
				state = "detached (kube-proxy serves Services, or --kube-proxy-replacement=false)"
			}
			fmt.Fprintf(w, "socket load balancer: %s, %d frontends\n", state, len(rows))
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SERVICE\tFRONTEND\tBACKENDS\tAFFINITY\tTRANSLATED\tREFUSED")
			for _, r := range rows {
				aff := "-"
				if r.Affinity > 0 {
					aff = "ClientIP " + r.Affinity.String()
				}
				backends := strings.Join(r.Backends, ",")
				if backends == "" {
					backends = "(none: refused)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\n", r.Name, r.Frontend, backends, aff, r.Translated, r.Refused)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintln(w, "\ncounters")
			for _, k := range sortedKeys(counters) {
				fmt.Fprintf(w, "  %-14s %d\n", k, counters[k])
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&root, "bpf-root", datapath.DefaultBPFRoot, "bpffs directory the agent pins its datapath under")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}
