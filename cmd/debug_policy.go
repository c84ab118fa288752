package cmd

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/agent"
	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/policy"
)

// policyState opens what `debug policy` reads: the pinned maps and the
// names the agent wrote beside them.
type policyState struct {
	maps *datapath.PolicyMaps
	meta *policy.Meta
}

func openPolicyState(root, stateDir string) (*policyState, error) {
	m, err := datapath.OpenPolicyMaps(root)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(stateDir, agent.PolicyMetaFile)
	b, err := os.ReadFile(path)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("read the agent's policy explanation: %w", err)
	}
	var meta policy.Meta
	if err := json.Unmarshal(b, &meta); err != nil {
		m.Close()
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	return &policyState{maps: m, meta: &meta}, nil
}

func newDebugPolicyCmd() *cobra.Command {
	var root, stateDir, output string
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Show each local pod's NetworkPolicy state, as the datapath holds it",
		Long: `Reads the pinned NetworkPolicy maps under the bpffs root and the names the
agent writes beside them (policy.json under --state-dir): one row per pod of
this node with its address, whether policy isolates it for ingress and
egress, the policies selecting it, and how many rule entries the datapath
holds for it; then drops per policy. "explain" answers for one flow.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("unknown output format %q (text or json)", output)
			}
			st, err := openPolicyState(root, stateDir)
			if err != nil {
				return err
			}
			defer st.maps.Close()
			state, err := st.maps.Read()
			if err != nil {
				return err
			}
			drops, err := st.maps.PolicyDrops()
			if err != nil {
				return err
			}
			type row struct {
				Pod      string      `json:"pod"`
				IP       netip.Addr  `json:"ip"`
				Isolated [2]bool     `json:"isolated"`
				Selected [2][]string `json:"selectedBy"`
				Rules    []string    `json:"rules"`
			}
			var rows []row
			for _, ip := range slices.SortedFunc(maps.Keys(state.Endpoints), netip.Addr.Compare) {
				ep := state.Endpoints[ip]
				em := st.meta.Endpoints[ip]
				r := row{Pod: em.Pod, IP: ip, Isolated: ep.Isolated}
				for d := range 2 {
					for _, n := range em.Selected[d] {
						r.Selected[d] = append(r.Selected[d], st.meta.Policies[n].String())
					}
				}
				for k, n := range state.Rules {
					if k.Pod == ip {
						r.Rules = append(r.Rules, ruleEntry(st.meta, k, n))
					}
				}
				slices.Sort(r.Rules)
				rows = append(rows, r)
			}
			type dropRow struct {
				Policy    string `json:"policy"`
				Direction string `json:"direction"`
				Packets   uint64 `json:"packets"`
			}
			var dropRows []dropRow
			for k, n := range drops {
				dropRows = append(dropRows, dropRow{st.meta.Policies[k[0]].String(), datapath.PolicyDir(k[1]).String(), n})
			}
			slices.SortFunc(dropRows, func(a, b dropRow) int { return strings.Compare(a.Policy+a.Direction, b.Policy+b.Direction) })
			w := cmd.OutOrStdout()
			if output == "json" {
				return writeJSON(w, struct {
					Pods  []row     `json:"pods"`
					Drops []dropRow `json:"drops"`
				}{rows, dropRows})
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "POD\tIP\tINGRESS\tEGRESS\tRULE ENTRIES")
			for _, r := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\n", r.Pod, r.IP, isolation(r.Isolated[0], r.Selected[0]), isolation(r.Isolated[1], r.Selected[1]), len(r.Rules))
			}
			tw.Flush()
			if len(dropRows) > 0 {
				fmt.Fprintln(w)
				tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "DROPPED UNDER POLICY\tDIRECTION\tPACKETS")
				for _, d := range dropRows {
					fmt.Fprintf(tw, "%s\t%s\t%d\n", d.Policy, d.Direction, d.Packets)
				}
				tw.Flush()
			}
			return nil
		},
	}
	cmd.PersistentFlags().StringVar(&root, "bpf-root", datapath.DefaultBPFRoot, "bpffs directory the agent pins its datapath under")
	cmd.PersistentFlags().StringVar(&stateDir, "state-dir", cni.DefaultDataDir, "the agent's --state-dir (where it writes policy.json)")
	cmd.PersistentFlags().StringVarP(&output, "output", "o", "text", "text or json")
	cmd.AddCommand(newDebugPolicyExplainCmd(&root, &stateDir, &output))
	return cmd
}

func isolation(isolated bool, by []string) string {
	if !isolated {
		return "open"
	}
	return "isolated by " + strings.Join(by, ",")
}

func ruleEntry(meta *policy.Meta, k datapath.PolicyRuleKey, n uint32) string {
	peer := fmt.Sprintf("identity %d", k.Identity)
	if k.Identity == policy.AnyIdentity {
		peer = "any peer"
	}
	ports := "any protocol"
	if k.Proto != 0 {
		ports = fmt.Sprintf("proto %d port %d/%d", k.Proto, k.Port, k.PortBits)
	}
	return fmt.Sprintf("%s %s %s ← %s", k.Dir, peer, ports, meta.Rules[n].Text)
}

func newDebugPolicyExplainCmd(root, stateDir, output *string) *cobra.Command {
	var from, to, port string
	cmd := &cobra.Command{
		Use:   "explain --from POD|IP --to POD|IP --port N/PROTO",
		Short: "Say whether a new flow is allowed, by which rule, or why not",
		Long: `Makes the datapath's own lookups on the pinned maps (the pod's entry, the
peer's identity in the ipcache, the rule trie) for a new flow, and names what
they found: the verdict for the source pod's egress and the destination
pod's ingress (each where it is a pod of this node; another node decides for
its own pods), the allowing policy and rule, or "default deny" with the
policies selecting the pod, and for every rule of those policies whether the
peer and the port match. Pods are namespace/name (default/ may be left out).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if *output != "text" && *output != "json" {
				return fmt.Errorf("unknown output format %q (text or json)", *output)
			}
			if from == "" || to == "" || port == "" {
				return errors.New("--from, --to and --port are required")
			}
			proto, num, err := policy.ParsePort(port)
			if err != nil {
				return err
			}
			st, err := openPolicyState(*root, *stateDir)
			if err != nil {
				return err
			}
			defer st.maps.Close()
			src, err := st.meta.Resolve(from)
			if err != nil {
				return err
			}
			dst, err := st.meta.Resolve(to)
			if err != nil {
				return err
			}
			e, err := policy.Explain(st.meta, st.maps, src, dst, proto, num)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if *output == "json" {
				return writeJSON(w, e)
			}
			verdict := "ALLOWED"
			if !e.Allowed {
				verdict = "DENIED"
			}
			fmt.Fprintf(w, "%s → %s %s: %s\n", e.From, e.To, e.Port, verdict)
			for _, c := range e.Checks {
				fmt.Fprintf(w, "  %s of %s: %s\n", c.Dir, c.Pod, c.Verdict)
				for _, y := range c.Why {
					fmt.Fprintf(w, "    - %s\n", y)
				}
			}
			if len(e.Checks) == 0 {
				fmt.Fprintln(w, "  neither end is a pod: no NetworkPolicy applies")
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&from, "from", "", "source pod (namespace/name) or address")
	cmd.Flags().StringVar(&to, "to", "", "destination pod (namespace/name) or address")
	cmd.Flags().StringVar(&port, "port", "", "destination port and protocol: 80/tcp, 53/udp, 9/sctp, or icmp")
	return cmd
}
