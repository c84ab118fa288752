//go:build linux

package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sinabro-io/sinabro/pkg/lab"
)

// TestServices runs the real kube-proxy next to Sinabro, in each of its
// modes, and requires every Service row of `lab check` to pass along with
// the rest: ClusterIP over TCP and UDP with the backend on the client's node,
// on another node and outside the cluster, hairpin, node→ClusterIP,
// NodePort from the external host, and externalTrafficPolicy=Local keeping
// the client's address. Nodes have a default route through the lab's
// router, as real nodes do: that is what sends pod→ClusterIP packets the
// datapath does not translate itself towards the uplink.
func TestServices(t *testing.T) {
	const nodes, podsPerNode = 2, 2
	for _, mode := range []string{lab.KubeProxyIPTables, lab.KubeProxyNFTables} {
		t.Run(mode, func(t *testing.T) {
			l, took := newLabWith(t, nodes, podsPerNode, mode)
			t.Logf("figure: lab up %d×%d with kube-proxy %s took %s", nodes, podsPerNode, mode, took.Round(100*time.Millisecond))

			out, err := l.sinabro("check")
			t.Log(out)
			if err != nil {
				t.Errorf("lab check: %v", err)
			}
			checkServiceRows(t, out, nodes, podsPerNode)
			for i := 1; i <= nodes; i++ {
				if want := fmt.Sprintf("✓ kube-proxy (%s) on node-%d synced", mode, i); !strings.Contains(out, want) {
					t.Errorf("check lacks %q", want)
				}
			}

			// Sinabro found kube-proxy's rules and stays out of its way.
			cfg, err := lab.LoadConfig(l.dir)
			if err != nil {
				t.Fatal(err)
			}
			for i := 1; i <= nodes; i++ {
				root := filepath.Join(cfg.BPFRoot, fmt.Sprintf("node-%d", i))
				out, err := exec.Command(binary, "debug", "services", "--bpf-root", root).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "socket load balancer: detached") {
					t.Errorf("node-%d: the socket load balancer should be detached next to kube-proxy: %v\n%s", i, err, out)
				}
			}

			st := l.mustSinabro(t, "status")
			t.Log(st)
			for i := 1; i <= nodes; i++ {
				if want := fmt.Sprintf("kube-proxy-node-%d", i); !strings.Contains(st, want) {
					t.Errorf("status lacks %s", want)
				}
			}
			if got := strings.Count(st, mode+", healthy"); got != nodes {
				t.Errorf("status shows %d healthy kube-proxies, want %d", got, nodes)
			}
		})
	}
}

// checkServiceRows counts the Service rows of a `lab check` output per
// category (a failed row still prints, so the counts also catch probes the
// check forgot).
func checkServiceRows(t *testing.T, out string, nodes, podsPerNode int) {
	t.Helper()
	pods := nodes * podsPerNode
	for _, c := range []struct {
		cat  string
		want int
	}{
		{"pod→ClusterIP backend same node", pods * (podsPerNode - 1)},
		{"pod→ClusterIP backend other node", pods * (pods - podsPerNode)},
		{"pod→ClusterIP backend outside", pods},
		{"pod→own ClusterIP (hairpin)", pods},
		{"node→ClusterIP", nodes * pods},
		{"external→NodePort", nodes},
		{"external→NodePort eTP=Local", nodes},
		{"pod→NodePort other node", pods * (nodes - 1)},
	} {
		// Cells are padded by at least two spaces.
		if got := strings.Count(out, "  "+c.cat+"  "); got != c.want {
			t.Errorf("check has %d %q rows, want %d", got, c.cat, c.want)
		}
	}
}
