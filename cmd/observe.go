package cmd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/spf13/cobra"

	"github.com/sinabro-io/sinabro/pkg/flows"
	"github.com/sinabro-io/sinabro/pkg/lab"
)

// observeOptions are the flags `sinabro observe` and `sinabro lab observe`
// share.
type observeOptions struct {
	req    flows.Request
	output string
}

func (o *observeOptions) flags(c *cobra.Command) {
	f := c.Flags()
	f.IntVar(&o.req.Last, "last", 20, "show the last N flows the agent keeps (0: all of them), then stop unless --follow")
	f.BoolVarP(&o.req.Follow, "follow", "f", false, "then show new flows as they happen, until interrupted")
	f.StringVarP(&o.output, "output", "o", "text", "text (one line per flow) or json (one object per line)")
	f.StringVar(&o.req.Filter.Pod, "pod", "", "flows with this pod at either end: namespace/name, or a name in any namespace")
	f.StringVarP(&o.req.Filter.Namespace, "namespace", "n", "", "flows with a pod of this namespace at either end")
	f.StringVar(&o.req.Filter.IP, "ip", "", "flows with this address at either end (before or after translation)")
	f.Uint16Var(&o.req.Filter.Port, "port", 0, "flows with this port at either end")
	f.StringVar(&o.req.Filter.Protocol, "protocol", "", "tcp, udp, icmp or sctp")
	f.StringVar(&o.req.Filter.Verdict, "verdict", "", "forwarded, dropped, translated or closed; or a NetworkPolicy verdict: allowed, denied, open, deferred")
	f.StringVar(&o.req.Filter.DropReason, "drop-reason", "", "drops for this reason (drop_policy, drop_policy_spoof, drop_lb_no_backend, ...: the reasons of sinabro_datapath_packets_total)")
	f.StringVar(&o.req.Filter.Type, "type", "", "new, drop, translate, service or accel-end")
	f.StringVar(&o.req.Filter.Node, "node", "", "flows reported by this node")
}

func (o *observeOptions) validate() error {
	if o.output != "text" && o.output != "json" {
		return fmt.Errorf("--output %q: want text or json", o.output)
	}
	if o.req.Last < 0 {
		return fmt.Errorf("--last %d: want 0 or more", o.req.Last)
	}
	return o.req.Filter.Validate()
}

func (o *observeOptions) printer(w io.Writer) func(flows.Flow) error {
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	return func(f flows.Flow) error {
		mu.Lock()
		defer mu.Unlock()
		if o.output == "json" {
			return enc.Encode(f)
		}
		_, err := fmt.Fprintln(w, f.String())
		return err
	}
}

// observe reads the flows of the agents at sockets (node → path): the
// last ones of all nodes merged in time order, then, following, each new
// one as it comes. A node whose agent cannot be reached is reported and
// left out; all of them unreachable is an error.
func (o *observeOptions) observe(ctx context.Context, w, errw io.Writer, sockets map[string]string) error {
	print := o.printer(w)
	if len(sockets) == 1 {
		for _, s := range sockets {
			return flows.Observe(ctx, s, o.req, print)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Following: subscribe first, holding what comes until the backlog is
	// shown, so nothing falls between the two.
	live := make(chan flows.Flow, 65536)
	var followers sync.WaitGroup
	var reached sync.Map
	if o.req.Follow {
		follow := o.req
		follow.Last = -1 // nothing from the buffer: the backlog below has it
		for node, s := range sockets {
			followers.Add(1)
			go func() {
				defer followers.Done()
				err := flows.Observe(ctx, s, follow, func(f flows.Flow) error {
					live <- f
					return nil
				})
				if err != nil && ctx.Err() == nil {
					fmt.Fprintf(errw, "node %s: %v\n", node, err)
				}
			}()
		}
	}
	var mu sync.Mutex
	var backlog []flows.Flow
	last := o.req
	last.Follow = false
	var wg sync.WaitGroup
	for node, s := range sockets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := flows.Observe(ctx, s, last, func(f flows.Flow) error {
				mu.Lock()
				defer mu.Unlock()
				backlog = append(backlog, f)
				return nil
			})
			if err != nil {
				fmt.Fprintf(errw, "node %s: %v\n", node, err)
				return
			}
			reached.Store(node, true)
		}()
	}
	wg.Wait()
	n := 0
	reached.Range(func(any, any) bool { n++; return true })
	if n == 0 {
		return errors.New("no node's agent could be reached")
	}
	sort.SliceStable(backlog, func(i, j int) bool { return backlog[i].Time.Before(backlog[j].Time) })
	if o.req.Last > 0 && len(backlog) > o.req.Last {
		backlog = backlog[len(backlog)-o.req.Last:]
	}
	shown := map[string]bool{}
	for _, f := range backlog {
		shown[flowKey(f)] = true
		if err := print(f); err != nil {
			return err
		}
	}
	if !o.req.Follow {
		return nil
	}
	done := make(chan struct{})
	go func() { followers.Wait(); close(done) }()
	for {
		select {
		case f := <-live:
			if shown[flowKey(f)] { // arrived while the backlog was read
				delete(shown, flowKey(f))
				continue
			}
			if err := print(f); err != nil {
				return err
			}
		case <-done:
			return nil
		}
	}
}

// flowKey tells a flow from the others of the same agent.
func flowKey(f flows.Flow) string {
	return fmt.Sprintf("%s %d %s %s %s", f.Node, f.Time.UnixNano(), f.Type, f.Source.String(), f.Destination.String())
}

func newObserveCmd() *cobra.Command {
	o := &observeOptions{}
	var socket string
	c := &cobra.Command{
		Use:   "observe",
		Short: "Show this node's flows and drops, live: what the eBPF datapath forwarded, dropped (and why), translated or accelerated",
		Long: `observe reads the flow events of the node's agent through its local unix
socket (root only; no network listener): new flows with their NetworkPolicy
verdicts and where they went (another pod of the node, the overlay to which
node, the uplink), drops with their reason (and the policy), masquerading and
Service translations, and accelerated connections with the bytes they
redirected at socket level. Pods, namespaces, nodes, policies and Services are
named from the agent's view of the cluster.

In a cluster, run it in the agent's pod:
  kubectl -n kube-system exec ds/sinabro -c agent -- sinabro observe -f
In the lab, sinabro lab observe reads every node.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			return o.observe(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), map[string]string{"": socket})
		},
	}
	c.Flags().StringVar(&socket, "socket", flows.DefaultSocket, "the agent's flow socket (its --observe-socket)")
	o.flags(c)
	return c
}

func newLabObserveCmd(dir *string) *cobra.Command {
	o := &observeOptions{}
	c := &cobra.Command{
		Use:   "observe",
		Short: "Show the flows and drops of every lab node, live (sinabro observe across the lab)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			cfg, err := lab.LoadConfig(*dir)
			if err != nil {
				return err
			}
			sockets, err := cfg.ObserveSockets()
			if err != nil {
				return err
			}
			if o.req.Filter.Node != "" {
				s, ok := sockets[o.req.Filter.Node]
				if !ok {
					return fmt.Errorf("--node %q: the lab's nodes are %v", o.req.Filter.Node, cfg.Nodes)
				}
				sockets = map[string]string{o.req.Filter.Node: s}
			}
			ctx, cancel := signalContext()
			defer cancel()
			return o.observe(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), sockets)
		},
	}
	o.flags(c)
	return c
}
