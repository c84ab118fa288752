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
	"github.com/sinabro-io/sinabro/pkg/lab/images"
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
			name, log := s.cfg.kubeProxyLog(n)
			if _, ok := s.procs.running(kubeProxyName(n)); !ok && !s.cfg.realNodes() {
				return &componentError{name, log, fmt.Errorf("%w while waiting for its first sync", errExited)}
			}
			if time.Now().After(deadline) {
				last := "no sync since " + since.Format(time.TimeOnly)
				if err != nil {
					last = err.Error()
				}
				return &componentError{name, log, fmt.Errorf("kube-proxy rules not synced after %s: %s", timeout, last)}
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

// kubeProxyDaemonSet is kube-proxy as kubeadm deploys it, for real nodes:
// a DaemonSet in the nodes' network namespaces (hostNetwork), its config
// and a kubeconfig that reaches the apiserver directly with the pod's
// service-account token (the kubernetes Service needs kube-proxy first),
// bound to system:node-proxier.
const kubeProxyDaemonSet = `apiVersion: v1
kind: ServiceAccount
metadata: {name: kube-proxy, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: sinabro-lab:node-proxier}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:node-proxier}
subjects:
- {kind: ServiceAccount, name: kube-proxy, namespace: kube-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: kube-proxy, namespace: kube-system}
data:
  config.conf: |
    apiVersion: kubeproxy.config.k8s.io/v1alpha1
    kind: KubeProxyConfiguration
    mode: %[1]s
    clusterCIDR: %[2]s
    detectLocalMode: ClusterCIDR
    healthzBindAddress: 0.0.0.0:%[4]d
    metricsBindAddress: %[5]s
    clientConnection:
      kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
    # nf_conntrack_max can only be set from the initial network namespace.
    conntrack:
      maxPerCore: 0
      min: 0
  kubeconfig.conf: |
    apiVersion: v1
    kind: Config
    clusters:
    - name: default
      cluster:
        server: %[3]s
        certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
    users:
    - name: default
      user:
        tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
    contexts:
    - name: default
      context: {cluster: default, user: default}
    current-context: default
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: kube-proxy
  namespace: kube-system
  labels: {k8s-app: kube-proxy}
spec:
  selector:
    matchLabels: {k8s-app: kube-proxy}
  template:
    metadata:
      labels: {k8s-app: kube-proxy}
    spec:
      serviceAccountName: kube-proxy
      hostNetwork: true
      priorityClassName: system-node-critical
      tolerations:
      - operator: Exists
      containers:
      - name: kube-proxy
        image: %[6]s
        imagePullPolicy: IfNotPresent
        command: ["/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=$(NODE_NAME)", "--v=1"]
        env:
        - name: NODE_NAME
          valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
        securityContext: {privileged: true}
        volumeMounts:
        - {name: kube-proxy, mountPath: /var/lib/kube-proxy}
        - {name: xtables-lock, mountPath: /run/xtables.lock}
        - {name: lib-modules, mountPath: /lib/modules, readOnly: true}
      volumes:
      - name: kube-proxy
        configMap: {name: kube-proxy}
      - name: xtables-lock
        hostPath: {path: /run/xtables.lock, type: FileOrCreate}
      - name: lib-modules
        hostPath: {path: /lib/modules}
`

// deployKubeProxy applies the kube-proxy DaemonSet of real nodes.
func (s *supervisor) deployKubeProxy(ctx context.Context) error {
	s.progress.step(fmt.Sprintf("applying the kube-proxy DaemonSet (%s mode)", s.cfg.KubeProxy))
	src := fmt.Sprintf(kubeProxyDaemonSet, s.cfg.KubeProxy, s.cfg.ClusterCIDR, s.cfg.apiserverURL(),
		kubeProxyHealthPort, kubeProxyMetricsAddr, images.KubeProxyRef)
	if err := applyYAML(ctx, s.cfg.certConfig(s.cfg.nsControlPlane(), "admin"), src); err != nil {
		return &componentError{"kube-proxy", s.cfg.layout().Log("supervisor"), err}
	}
	s.progress.done("kube-proxy DaemonSet applied")
	return nil
}

// kubeProxyLog is where a node's kube-proxy logs: its own file as a lab
// process, the kubelet's (which runs its pod) on real nodes.
func (c *Config) kubeProxyLog(node string) (component, path string) {
	if c.realNodes() {
		return "kubelet-" + node, c.layout().Log("kubelet-" + node)
	}
	return kubeProxyName(node), c.layout().Log(kubeProxyName(node))
}
