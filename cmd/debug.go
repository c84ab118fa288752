package cmd

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/datapath"
)

func newDebugCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "debug",
		Short: "Inspect the node's live datapath",
	}
	cmd.AddCommand(newDebugMapsCmd())
	return cmd
}

func newDebugMapsCmd() *cobra.Command {
	var root, output string
	cmd := &cobra.Command{
		Use:   "maps [NAME]",
		Short: "List the datapath's pinned eBPF maps, or dump one",
		Long: `Without NAME, lists every map pinned under the bpffs root: name, type,
entries, capacity and pin path. With NAME, dumps that map decoded:
sb_ct as masqueraded flows, sb_counters as named counters, sb_masq_cidrs
as prefixes, sb_endpoints as pods.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("unknown output format %q (text or json)", output)
			}
			w := cmd.OutOrStdout()
			if len(args) == 0 {
				maps, err := datapath.ListMaps(root)
				if err != nil {
					return err
				}
				if output == "json" {
					return writeJSON(w, maps)
				}
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tTYPE\tENTRIES\tMAX\tPIN")
				for _, m := range maps {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\n", m.Name, m.Type, m.Entries, m.MaxEntries, m.PinPath)
				}
				return tw.Flush()
			}
			return dumpMap(w, root, args[0], output == "json")
		},
	}
	cmd.Flags().StringVar(&root, "bpf-root", datapath.DefaultBPFRoot, "bpffs directory the agent pins its datapath under")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func dumpMap(w io.Writer, root, name string, asJSON bool) error {
	m, err := datapath.OpenMap(root, name)
	if err != nil {
		return err
	}
	defer m.Close()
	switch name {
	case "sb_ct":
		flows, err := datapath.Flows(m)
		if err != nil {
			return err
		}
		now := datapath.Monotonic()
		if asJSON {
			type flowView struct {
				datapath.Flow
				Protocol    string  `json:"protocol"`
				AgeSeconds  float64 `json:"ageSeconds"`
				IdleSeconds float64 `json:"idleSeconds"`
			}
			views := make([]flowView, 0, len(flows))
			for _, f := range flows {
				views = append(views, flowView{f, datapath.ProtoName(f.Proto), (now - f.Created).Seconds(), (now - f.LastSeen).Seconds()})
			}
			return writeJSON(w, views)
		}
		for _, f := range flows {
			orphan := ""
			if f.Orphan {
				orphan = ", half"
			}
			fmt.Fprintf(w, "%s %v → %v ⇢ %v, %s, age %v, idle %v%s\n", datapath.ProtoName(f.Proto), f.Src, f.Dst, f.NAT,
				f.State, roundAge(now-f.Created), roundAge(now-f.LastSeen), orphan)
		}
		return nil
	case "sb_counters":
		counters, err := datapath.Counters(m)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(w, counters)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PROGRAM\tREASON\tPACKETS\tBYTES")
		for _, c := range counters {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\n", c.Program, c.Reason, c.Packets, c.Bytes)
		}
		return tw.Flush()
	case "sb_masq_cidrs":
		cidrs, err := datapath.CIDRs(m)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(w, cidrs)
		}
		for _, c := range cidrs {
			kind := "no-masquerade"
			if c.Pod {
				kind = "pods"
			}
			fmt.Fprintf(w, "%v %s\n", c.Prefix, kind)
		}
		return nil
	case "sb_endpoints":
		eps, err := datapath.Endpoints(m)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(w, eps)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "IP\tIFINDEX\tPOD MAC\tHOST MAC\tLOCAL")
		for _, e := range eps {
			fmt.Fprintf(tw, "%v\t%d\t%v\t%v\t%v\n", e.IP, e.Ifindex, e.PodMAC, e.HostMAC, e.Local)
		}
		return tw.Flush()
	}
	return fmt.Errorf("no decoder for map %s (see `sinabro debug maps` for the list)", name)
}

func roundAge(d time.Duration) time.Duration { return d.Round(time.Second) }

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
