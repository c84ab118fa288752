package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// controlClient talks to the supervisor's unix socket.
func controlClient(dir string) *http.Client {
	sock := Layout{dir}.Socket()
	return &http.Client{
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}
}

// controlCall sends a request to the supervisor and returns the body.
func controlCall(ctx context.Context, dir, method, path string, timeout time.Duration) ([]byte, error) {
	if _, ok := supervisorAlive(dir); !ok {
		return nil, errNotRunning
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, "http://supervisor"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := controlClient(dir).Do(req)
	if err != nil {
		return nil, fmt.Errorf("ask supervisor: %w", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("supervisor: %s", strings.TrimSpace(string(b)))
	}
	return b, nil
}

// SupervisorStatus fetches the supervisor's view of the lab.
func SupervisorStatus(ctx context.Context, dir string) (*Status, error) {
	b, err := controlCall(ctx, dir, http.MethodGet, "/status", 5*time.Second)
	if err != nil {
		return nil, err
	}
	var st Status
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decode status: %w", err)
	}
	return &st, nil
}

// AddNode asks the supervisor to add a node and waits until it is Ready.
func AddNode(ctx context.Context, dir, name string) error {
	_, err := controlCall(ctx, dir, http.MethodPost, "/nodes/"+name, 3*time.Minute)
	return err
}

// DeleteNode asks the supervisor to tear a node down.
func DeleteNode(ctx context.Context, dir, name string) error {
	_, err := controlCall(ctx, dir, http.MethodDelete, "/nodes/"+name, 2*time.Minute)
	return err
}

// RSS returns a process's resident set size in KiB (0 if unknown).
func RSS(pid int) int { return procKB(fmt.Sprintf("/proc/%d/status", pid), "VmRSS:") }

// PSS returns a process's proportional set size in KiB: shared pages (the
// sinabro executable's text, mapped by every agent and test server) count
// divided by the number of processes sharing them.
func PSS(pid int) int { return procKB(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss:") }

func procKB(path, key string) int {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	return 0
}

func mib(kb int) string { return fmt.Sprintf("%.1f MiB", float64(kb)/1024) }

// PrintStatus writes the processes (with RSS and restarts) and the cluster
// state of the lab in dir.
func PrintStatus(ctx context.Context, dir string, out io.Writer) error {
	st, err := SupervisorStatus(ctx, dir)
	if err != nil {
		return fmt.Errorf("lab in %s: %w", dir, err)
	}
	cfg, err := LoadConfig(dir)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	fmt.Fprintln(tw, "COMPONENT\tNETNS\tPID\tSTATE\tRESTARTS\tRSS\tPSS\tUPTIME")
	for _, p := range st.Procs {
		state, rss, pss, up := "exited: "+p.LastExit, "-", "-", "-"
		if p.Running {
			state = "running"
			if strings.HasPrefix(p.Name, "agent-") {
				state += ", " + agentReadiness(ctx, p.Netns)
			}
			if node, ok := strings.CutPrefix(p.Name, "kube-proxy-"); ok {
				state += ", " + kubeProxyHealth(ctx, cfg, node)
			}
			rss, pss = mib(RSS(p.PID)), mib(PSS(p.PID))
			up = time.Since(p.Started).Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%s\t%s\t%s\n", p.Name, p.Netns, p.PID, state, p.Restarts, rss, pss, up)
	}
	if pid, ok := supervisorAlive(dir); ok {
		fmt.Fprintf(tw, "supervisor\t-\t%d\trunning\t0\t%s\t%s\t-\n", pid, mib(RSS(pid)), mib(PSS(pid)))
	}
	tw.Flush()

	cs, err := AdminClient(dir)
	if err != nil {
		return err
	}
	nodes, err := cs.Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list nodes: %w", err)
	}
	fmt.Fprintln(out)
	tw = tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tREADY\tINTERNAL-IP\tPOD-CIDR\tANNOTATIONS")
	for _, n := range nodes.Items {
		var ann []string
		for k := range n.Annotations {
			if strings.Contains(k, "sinabro") {
				ann = append(ann, k)
			}
		}
		fmt.Fprintf(tw, "%s\t%v\t%s\t%s\t%s\n", n.Name, nodeReady(&n), internalIP(&n), n.Spec.PodCIDR, strings.Join(ann, ","))
	}
	tw.Flush()
	pods, err := cs.Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list pods: %w", err)
	}
	fmt.Fprintln(out)
	tw = tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tNODE\tPHASE\tIP\tNETNS")
	var real map[string]realPod
	if cfg.realNodes() {
		real = realPods(cfg.LabName())
	}
	for _, p := range pods.Items {
		ns := cfg.PodNetns(string(p.UID))
		if cfg.realNodes() {
			// The runtime's namespace: reachable through the test server's
			// process; "-" for other pods (nsenter -t <pid> -n).
			ns = "-"
			if n, ok := real[p.Name]; ok && p.Namespace == podNamespace {
				ns = n.netns
			}
		}
		fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%s\t%s\n", p.Namespace, p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.PodIP, ns)
	}
	return tw.Flush()
}

func internalIP(n *corev1.Node) string {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			return a.Address
		}
	}
	return ""
}

// agentReadiness asks an agent's /readyz inside its node's namespace.
func agentReadiness(ctx context.Context, ns string) string {
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: dialIn(ns)}}
	defer c.CloseIdleConnections() // a Transport per call: its kept-alive connection would outlive it
	resp, err := c.Get("http://" + agentHealthAddr + "/readyz")
	if err != nil {
		return "readyz unreachable"
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		return "ready"
	}
	return "readyz " + resp.Status
}
