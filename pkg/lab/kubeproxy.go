package lab

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
)

// kube-proxy runs in every node's namespace, as the DaemonSet of most
// clusters does, so Services in the lab behave as they do next to Sinabro in
// a real cluster: ClusterIP and NodePort translation by kube-proxy's
// iptables or nftables rules, Sinabro routing the translated packets.

func kubeProxyName(node string) string { return "kube-proxy-" + node }

// writeKubeProxyConfig writes the node's KubeProxyConfiguration.
func (c *Config) writeKubeProxyConfig(node string, addr netip.Addr) error {
	l := c.layout()
	// conntrack: kube-proxy would raise nf_conntrack_max, which only the
	// initial network namespace may set; zero leaves it alone.
	data := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: %s
clusterCIDR: %s
detectLocalMode: ClusterCIDR
hostnameOverride: %s
bindAddress: %s
healthzBindAddress: %s
metricsBindAddress: %s
clientConnection:
  kubeconfig: %s
conntrack:
  maxPerCore: 0
  min: 0
`, c.KubeProxy, c.ClusterCIDR, node, addr, netip.AddrPortFrom(addr, kubeProxyHealthPort),
		kubeProxyMetricsAddr, l.KubeProxyKubeconfig())
	path := l.NodeKubeProxyConfig(node)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := atomicfile.Write(path, []byte(data), 0o644); err != nil {
		return fmt.Errorf("write kube-proxy config of %s: %w", node, err)
	}
	return nil
}

func (c *Config) kubeProxySpec(node string) procSpec {
	return procSpec{
		name: kubeProxyName(node), netns: c.NodeNetns(node), restart: true,
		argv: []string{filepath.Join(c.KubeBinDir, "kube-proxy"),
			"--config=" + c.layout().NodeKubeProxyConfig(node),
			"--v=1",
		},
	}
}

// kubeProxySynced returns when kube-proxy last wrote its rules (zero before
// its first sync), from its metrics in the node's namespace.
func kubeProxySynced(ctx context.Context, cfg *Config, node string) (time.Time, error) {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: dialIn(cfg.NodeNetns(node))}}
	defer c.CloseIdleConnections() // a Transport per call: its kept-alive connection would outlive it
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+kubeProxyMetricsAddr+"/metrics", nil)
	if err != nil {
		return time.Time{}, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return time.Time{}, fmt.Errorf("kube-proxy metrics of %s: %w", node, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// One gauge per IP family; the lab is IPv4.
		v, ok := strings.CutPrefix(sc.Text(), `kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} `)
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil {
			return time.Time{}, fmt.Errorf("kube-proxy metrics of %s: %w", node, err)
		}
		if f == 0 {
			return time.Time{}, nil
		}
		return time.Unix(0, int64(f*1e9)), nil
	}
	return time.Time{}, sc.Err()
}

// waitKubeProxySynced waits until every node's kube-proxy wrote its rules
// after since, i.e. saw the Services and endpoints of that moment.
func (s *supervisor) waitKubeProxySynced(ctx context.Context, nodes []string, since time.Time, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, n := range nodes {
		for {
			at, err := kubeProxySynced(ctx, s.cfg, n)
			if err == nil && at.After(since) {
				break
			}
			name := kubeProxyName(n)
			if _, ok := s.procs.running(name); !ok {
				return &componentError{name, s.cfg.layout().Log(name), fmt.Errorf("%w while waiting for its first sync", errExited)}
			}
			if time.Now().After(deadline) {
				last := "no sync since " + since.Format(time.TimeOnly)
				if err != nil {
					last = err.Error()
				}
				return &componentError{name, s.cfg.layout().Log(name), fmt.Errorf("rules not synced after %s: %s", timeout, last)}
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	return nil
}

// kubeProxyHealth asks a kube-proxy's /healthz, for `lab status`.
func kubeProxyHealth(ctx context.Context, cfg *Config, node string) string {
	addr, err := cfg.nodeAddr(node)
	if err != nil {
		return "healthz unknown"
	}
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: dialIn(cfg.NodeNetns(node))}}
	defer c.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+netip.AddrPortFrom(addr, kubeProxyHealthPort).String()+"/healthz", nil)
	if err != nil {
		return "healthz unknown"
	}
	resp, err := c.Do(req)
	if err != nil {
		return "healthz unreachable"
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		return cfg.KubeProxy + ", healthy"
	}
	return cfg.KubeProxy + ", healthz " + resp.Status
}
