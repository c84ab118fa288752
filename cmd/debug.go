package cmd

import (
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/sockmap"
)

func newDebugCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "debug",
		Short: "Inspect the node's live datapath",
	}
	cmd.AddCommand(newDebugMapsCmd(), newDebugServicesCmd(), newDebugPolicyCmd(), newDebugPreflightCmd())
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
as prefixes, sb_endpoints as pods, sb_remote_cidrs as other nodes' pod
prefixes with their vxlan MACs, sb_sock_hash as accelerated TCP
socket pairs, sb_sock_pods as the pod addresses TCP acceleration covers
(or excludes) and sb_sock_counters as TCP acceleration counters.`,
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
				// TCP acceleration and Service load balancing pin their
				// maps in their own directories.
				for _, sub := range []string{"sockmap", "service/maps"} {
					if more, err := datapath.ListMaps(filepath.Join(root, sub)); err == nil {
						maps = append(maps, more...)
					}
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
	switch name {
	case "sb_sock_hash":
		pairs, err := sockmap.ListPairs(root)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(w, pairs)
		}
		for _, p := range pairs {
			if p.B == nil {
				fmt.Fprintf(w, "tcp %v → %v (peer socket gone)\n", p.A.Local, p.A.Remote)
				continue
			}
			fmt.Fprintf(w, "tcp %v ⇄ %v accelerated, sends: %s / %s\n", p.A.Local, p.A.Remote, p.A.Send, p.B.Send)
		}
		return nil
	case "sb_sock_pods":
		pods, err := sockmap.ListPods(root)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(w, pods)
		}
		for _, p := range pods {
			what := "accelerated"
			if !p.Accelerated {
				what = "excluded (opted out)"
			}
			fmt.Fprintf(w, "%v %s\n", p.Prefix, what)
		}
		return nil
	case "sb_sock_counters":
		st, err := sockmap.ListStats(root)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(w, st)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "KIND\tRESULT\tCOUNT\tBYTES")
		for _, k := range sortedKeys(st.Messages) {
			fmt.Fprintf(tw, "message\t%s\t%d\t%d\n", k, st.Messages[k].Count, st.Messages[k].Bytes)
		}
		for _, k := range sortedKeys(st.Sockets) {
			fmt.Fprintf(tw, "socket\t%s\t%d\t\n", k, st.Sockets[k].Count)
		}
		return tw.Flush()
	}
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
	case "sb_remote_cidrs":
		remotes, err := datapath.Remotes(m)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(w, remotes)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PREFIX\tIFINDEX\tPEER MAC\tLOCAL MAC\tVTEP\tNEXT HOP")
		for _, r := range remotes {
			vtep, nh := "- (vxlan device only)", "- (route lookup)"
			if r.VTEP.IsValid() {
				vtep = r.VTEP.String()
			}
			if r.NextHop.IsValid() {
				nh = r.NextHop.String()
			}
			fmt.Fprintf(tw, "%v\t%d\t%v\t%v\t%s\t%s\n", r.Prefix, r.Ifindex, r.PeerMAC, r.LocalMAC, vtep, nh)
		}
		return tw.Flush()
	}
	return fmt.Errorf("no decoder for map %s (see `sinabro debug maps` for the list)", name)
}

func roundAge(d time.Duration) time.Duration { return d.Round(time.Second) }

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
