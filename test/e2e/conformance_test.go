//go:build linux

package e2e

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sinabro-io/sinabro/pkg/lab"
)

// conformanceFocus selects Kubernetes' own network conformance specs: every
// [sig-network] spec tagged [Conformance] (45 in v1.34.4).
const conformanceFocus = `\[sig-network\].*\[Conformance\]`

// TestConformance runs the upstream sig-network conformance specs (e2e.test
// built from the pinned Kubernetes module by `scripts/build-kube.sh
// --with-e2e`) against labs of real nodes — kubelet + containerd per node
// (2.x and 1.x), Sinabro installed by its DaemonSet from manifests/,
// CoreDNS — and fails on any failed spec, twice: with Sinabro alone
// serving Services (no kube-proxy: the socket load balancer and the
// datapath's NodePorts) and next to kube-proxy (nftables), where Sinabro
// leaves Services to it. Each prints one line per spec and "N passed, M
// failed". $SINABRO_CONFORMANCE_FOCUS narrows the focus (a regular
// expression over spec names, for development); $SINABRO_CONFORMANCE_MODES
// picks the modes ("none,nftables" by default).
func TestConformance(t *testing.T) {
	if skipReason != "" {
		t.Skip(skipReason)
	}
	e2eTest := filepath.Join(kubeBinDir, "e2e.test")
	if !exists(e2eTest) {
		t.Fatalf("%s missing: build it with scripts/build-kube.sh --with-e2e (just conformance does)", e2eTest)
	}
	focus := conformanceFocus
	if f := os.Getenv("SINABRO_CONFORMANCE_FOCUS"); f != "" {
		focus = f
	}
	modes := strings.Split(cmp.Or(os.Getenv("SINABRO_CONFORMANCE_MODES"), lab.KubeProxyNone+","+lab.KubeProxyNFTables), ",")
	for _, mode := range modes {
		name := "services-by-sinabro"
		if mode != lab.KubeProxyNone {
			name = "services-by-kube-proxy-" + mode
		}
		t.Run(name, func(t *testing.T) { conformance(t, e2eTest, focus, mode) })
	}
}

// conformance runs the specs of focus against a new lab of real nodes
// whose Services are served as kubeProxy says.
func conformance(t *testing.T, e2eTest, focus, kubeProxy string) {
	// node-1 on containerd 2.x, node-2 on Debian's 1.6: both generations
	// of the CNI library run the conflist.
	l, took := newNamedLab(t, randomLabName("sbconf"), 2, 0, kubeProxy,
		"--runtime="+lab.RuntimeContainerd, "--containerd="+lab.ContainerdMixed, "--timeout=15m")
	t.Logf("lab of real nodes (kube-proxy %s) up in %s", kubeProxy, took.Round(time.Second))

	report := filepath.Join(t.TempDir(), "report.json")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()
	// Inside the control plane's namespace: some specs reach nodes and
	// NodePorts from the test runner, which must be on the lab's underlay.
	cmd := exec.CommandContext(ctx, "nsenter", "--net=/run/netns/"+lab.NetnsPrefix(l.name)+"cp", "--",
		e2eTest,
		"--kubeconfig="+filepath.Join(l.dir, "admin-underlay.kubeconfig"),
		"--provider=skeleton",
		"--ginkgo.focus="+focus,
		"--ginkgo.skip=\\[Serial\\]|\\[Disruptive\\]|\\[Flaky\\]",
		"--ginkgo.no-color",
		"--ginkgo.json-report="+report,
		"--ginkgo.timeout=45m",
		"--report-dir="+t.TempDir(),
	)
	cmd.Env = append(os.Environ(), "PATH="+kubeBinDir+":"+os.Getenv("PATH"), "KUBECONFIG="+filepath.Join(l.dir, "admin-underlay.kubeconfig"))
	logPath := filepath.Join(os.TempDir(), "sinabro-conformance-"+kubeProxy+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	start := time.Now()
	runErr := cmd.Run()
	t.Logf("e2e.test ran %s (%v); full output in %s", time.Since(start).Round(time.Second), runErr, logPath)

	specs, err := readGinkgoReport(report)
	if err != nil {
		t.Fatalf("read the e2e report: %v (e2e.test: %v; see %s)", err, runErr, logPath)
	}
	passed, failed := 0, 0
	var lines []string
	for _, s := range specs {
		switch s.State {
		case "passed":
			passed++
		case "skipped", "pending":
			continue
		default:
			failed++
		}
		lines = append(lines, fmt.Sprintf("%-7s %5.0fs  %s", s.State, s.Seconds, s.Name))
	}
	sort.Strings(lines)
	t.Logf("conformance (%s):\n%s\n%d passed, %d failed", focus, strings.Join(lines, "\n"), passed, failed)
	for _, s := range specs {
		if s.State != "passed" && s.State != "skipped" && s.State != "pending" {
			t.Errorf("%s: %s\n%s", s.State, s.Name, s.Failure)
		}
	}
	if passed == 0 {
		t.Errorf("no spec passed (e2e.test: %v)", runErr)
	}
}

type specResult struct {
	Name, State, Failure string
	Seconds              float64
}

// readGinkgoReport reads the specs of a ginkgo v2 JSON report.
func readGinkgoReport(path string) ([]specResult, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var reports []struct {
		SpecReports []struct {
			ContainerHierarchyTexts []string
			LeafNodeText            string
			LeafNodeType            string
			State                   string
			RunTime                 int64 // nanoseconds
			Failure                 *struct {
				Message  string
				Location struct {
					FileName   string
					LineNumber int
				}
			}
		}
	}
	if err := json.Unmarshal(b, &reports); err != nil {
		return nil, err
	}
	var out []specResult
	for _, r := range reports {
		for _, s := range r.SpecReports {
			if s.LeafNodeType != "It" {
				continue // suite setup and teardown nodes
			}
			res := specResult{
				Name:    strings.Join(append(s.ContainerHierarchyTexts, s.LeafNodeText), " "),
				State:   s.State,
				Seconds: float64(s.RunTime) / 1e9,
			}
			if s.Failure != nil {
				res.Failure = fmt.Sprintf("%s:%d: %s", s.Failure.Location.FileName, s.Failure.Location.LineNumber, headLines(s.Failure.Message, 8))
			}
			out = append(out, res)
		}
	}
	return out, nil
}

func headLines(s string, n int) string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() && len(out) < n {
		out = append(out, sc.Text())
	}
	return strings.Join(out, "\n")
}
