package cmd

import (
	"errors"
	"fmt"
	"os"
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
frontends reachable from outside the node (NodePorts on the node address,
external and load-balancer IPs), translated per packet on the uplink, with
their backends and Maglev slots, and the socket-call counters by reason.`,
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
			// The datapath's table for traffic from outside (absent while
			// the datapath is not loaded).
			external, err := datapath.ListLB(root)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			w := cmd.OutOrStdout()
			if output == "json" {
				return writeJSON(w, struct {
					Attached bool              `json:"attached"`
					Services []service.Row     `json:"services"`
					Counters map[string]uint64 `json:"counters"`
					External []datapath.LBRow  `json:"external"`
				}{service.Attached(root), rows, counters, external})
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
			fmt.Fprintf(w, "\nfrom outside the node (uplink, per packet, Maglev): %d frontends\n", len(external))
			tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "FRONTEND\tBACKENDS (MAGLEV SLOTS)\tAFFINITY")
			for _, r := range external {
				var bs []string
				for i, b := range r.Backends {
					bs = append(bs, fmt.Sprintf("%s (%d)", b, r.Slots[i]))
				}
				if len(bs) == 0 {
					bs = []string{"(none: ICMP port unreachable)"}
				}
				aff := "-"
				if r.Affinity {
					aff = "ClientIP"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Frontend, strings.Join(bs, ", "), aff)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintln(w, "\nsocket counters (the per-packet path counts lb_* reasons: sinabro debug maps sb_counters)")
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
