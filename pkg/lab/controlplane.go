package lab

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Control-plane components and the binaries they run.
var controlPlaneBins = []string{"etcd", "kube-apiserver", "kube-controller-manager"}

// kcmControllers are the controllers the lab runs: node IPAM (pod CIDRs),
// node lifecycle, service accounts and their tokens, endpoint slices,
// namespaces and garbage collection. No scheduler: pods carry spec.nodeName.
var kcmControllers = []string{
	"node-ipam-controller",
	"node-lifecycle-controller",
	"serviceaccount-controller",
	"serviceaccount-token-controller",
	"endpointslice-controller",
	"endpointslice-mirroring-controller",
	"namespace-controller",
	"garbage-collector-controller",
	"root-ca-certificate-publisher-controller",
	"pod-garbage-collector-controller",
	"service-cidr-controller",
}

// CheckKubeBins verifies dir holds the control-plane binaries, kube-proxy
// unless kubeProxyMode is "none" (or ""), and the nodes' binaries for
// the containerd runtime.
func CheckKubeBins(dir, kubeProxyMode, runtime string) error {
	bins := controlPlaneBins
	if kubeProxyMode != "" && kubeProxyMode != KubeProxyNone {
		bins = append(bins[:len(bins):len(bins)], "kube-proxy")
	}
	if runtime == RuntimeContainerd {
		bins = append(bins[:len(bins):len(bins)], nodeBins...)
	}
	for _, b := range bins {
		st, err := os.Stat(filepath.Join(dir, b))
		if err != nil && b == "kube-proxy" {
			return fmt.Errorf("kube binaries in %s: %w (--kube-proxy %s needs it: rebuild with scripts/build-kube.sh, or pass --kube-proxy none)", dir, err, kubeProxyMode)
		}
		if err != nil {
			return fmt.Errorf("kube binaries in %s: %w (build them with scripts/build-kube.sh)", dir, err)
		}
		if st.Mode()&0o111 == 0 {
			return fmt.Errorf("kube binary %s is not executable", filepath.Join(dir, b))
		}
	}
	return nil
}

// writeControlPlanePKI creates the CA, the apiserver serving cert, the admin
// and controller-manager client certs and the service-account key pair.
func (c *Config) writeControlPlanePKI() error {
	pki := c.layout().PKI()
	ca, err := loadOrCreateCA(pki)
	if err != nil {
		return err
	}
	svcIP, err := firstServiceIP(c.ServiceCIDR)
	if err != nil {
		return err
	}
	certs := map[string]certSpec{
		"apiserver": {
			commonName: "kube-apiserver", server: true,
			ips: []net.IP{net.IP(c.controlPlaneAddr().AsSlice()), net.IPv4(127, 0, 0, 1), svcIP},
			dnsNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc.cluster.local"},
		},
		"admin":                   {commonName: "sinabro-lab-admin", orgs: []string{"system:masters"}},
		"kube-controller-manager": {commonName: "system:kube-controller-manager"},
		// The bootstrap ClusterRoleBinding system:node-proxier grants this
		// user what kube-proxy needs, as in kubeadm clusters.
		"kube-proxy":     {commonName: "system:kube-proxy"},
		"kube-scheduler": {commonName: "system:kube-scheduler"},
	}
	for name, spec := range certs {
		if err := ca.issue(filepath.Join(pki, name+".crt"), filepath.Join(pki, name+".key"), spec); err != nil {
			return err
		}
	}
	if err := serviceAccountKey(pki); err != nil {
		return err
	}
	l := c.layout()
	caFile := filepath.Join(pki, "ca.crt")
	admin := kubeconfig{server: "https://" + c.ProxyAddr, caFile: caFile, user: "admin",
		certFile: filepath.Join(pki, "admin.crt"), keyFile: filepath.Join(pki, "admin.key")}
	if err := admin.write(l.AdminKubeconfig()); err != nil {
		return err
	}
	admin.server = c.apiserverURL()
	if err := admin.write(l.InternalKubeconfig()); err != nil {
		return err
	}
	kcm := kubeconfig{server: c.apiserverURL(), caFile: caFile, user: "kube-controller-manager",
		certFile: filepath.Join(pki, "kube-controller-manager.crt"), keyFile: filepath.Join(pki, "kube-controller-manager.key")}
	if err := kcm.write(filepath.Join(l.Dir, "kube-controller-manager.kubeconfig")); err != nil {
		return err
	}
	sched := kubeconfig{server: c.apiserverURL(), caFile: caFile, user: "kube-scheduler",
		certFile: filepath.Join(pki, "kube-scheduler.crt"), keyFile: filepath.Join(pki, "kube-scheduler.key")}
	if err := sched.write(filepath.Join(l.Dir, "kube-scheduler.kubeconfig")); err != nil {
		return err
	}
	kp := kubeconfig{server: c.apiserverURL(), caFile: caFile, user: "kube-proxy",
		certFile: filepath.Join(pki, "kube-proxy.crt"), keyFile: filepath.Join(pki, "kube-proxy.key")}
	return kp.write(l.KubeProxyKubeconfig())
}

// firstServiceIP is the ClusterIP of the kubernetes Service (first host of
// the service range), which the apiserver's certificate must name.
func firstServiceIP(cidr string) (net.IP, error) {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, fmt.Errorf("parse service CIDR %q: %w", cidr, err)
	}
	ip := n.IP.To4()
	if ip == nil {
		return nil, fmt.Errorf("service CIDR %q: only IPv4 is supported by the lab", cidr)
	}
	out := append(net.IP(nil), ip...)
	out[3]++
	return out, nil
}

func (c *Config) etcdSpec() procSpec {
	d := filepath.Join(c.Dir, "etcd")
	return procSpec{
		name: "etcd", netns: c.nsControlPlane(), restart: true,
		argv: []string{filepath.Join(c.KubeBinDir, "etcd"),
			"--name=lab", "--data-dir=" + d,
			"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
			"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
			"--initial-cluster=lab=http://127.0.0.1:2380",
			"--listen-metrics-urls=http://127.0.0.1:2381",
			// A lab cluster is disposable: fsync only slows its start.
			"--unsafe-no-fsync=true",
			"--log-level=warn",
		},
	}
}

func (c *Config) apiserverSpec() procSpec {
	pki := c.layout().PKI()
	f := func(n string) string { return filepath.Join(pki, n) }
	addr := c.controlPlaneAddr().String()
	return procSpec{
		name: "kube-apiserver", netns: c.nsControlPlane(), restart: true,
		argv: []string{filepath.Join(c.KubeBinDir, "kube-apiserver"),
			"--etcd-servers=http://127.0.0.1:2379",
			"--bind-address=" + addr, "--advertise-address=" + addr,
			fmt.Sprintf("--secure-port=%d", apiPort),
			"--tls-cert-file=" + f("apiserver.crt"), "--tls-private-key-file=" + f("apiserver.key"),
			"--client-ca-file=" + f("ca.crt"),
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + f("sa.pub"),
			"--service-account-signing-key-file=" + f("sa.key"),
			"--authorization-mode=Node,RBAC",
			"--enable-admission-plugins=NodeRestriction",
			"--service-cluster-ip-range=" + c.ServiceCIDR,
			"--allow-privileged=true",
			// exec, logs and port-forward reach kubelets by address: node
			// names resolve nowhere.
			"--kubelet-preferred-address-types=InternalIP",
			"--profiling=false",
			"--v=1",
		},
	}
}

func (c *Config) controllerManagerSpec() procSpec {
	pki := c.layout().PKI()
	kc := filepath.Join(c.Dir, "kube-controller-manager.kubeconfig")
	return procSpec{
		name: "kube-controller-manager", netns: c.nsControlPlane(), restart: true,
		argv: []string{filepath.Join(c.KubeBinDir, "kube-controller-manager"),
			"--kubeconfig=" + kc, "--authentication-kubeconfig=" + kc, "--authorization-kubeconfig=" + kc,
			"--bind-address=127.0.0.1", "--secure-port=10257",
			"--leader-elect=false",
			"--allocate-node-cidrs=true", "--cluster-cidr=" + c.ClusterCIDR, "--node-cidr-mask-size=24",
			"--service-cluster-ip-range=" + c.ServiceCIDR,
			"--use-service-account-credentials=true",
			"--service-account-private-key-file=" + filepath.Join(pki, "sa.key"),
			"--root-ca-file=" + filepath.Join(pki, "ca.crt"),
			"--controllers=" + strings.Join(c.controllers(), ","),
			"--profiling=false",
			"--v=1",
		},
	}
}

// controllers are the controller manager's: all of its defaults with real
// nodes (Deployments, DaemonSets, Jobs… the conformance specs use them),
// the few the kubelet stand-ins need otherwise.
func (c *Config) controllers() []string {
	if c.realNodes() {
		return []string{"*"}
	}
	return kcmControllers
}

func (c *Config) schedulerSpec() procSpec {
	kc := filepath.Join(c.Dir, "kube-scheduler.kubeconfig")
	return procSpec{
		name: "kube-scheduler", netns: c.nsControlPlane(), restart: true,
		argv: []string{filepath.Join(c.KubeBinDir, "kube-scheduler"),
			"--kubeconfig=" + kc, "--authentication-kubeconfig=" + kc, "--authorization-kubeconfig=" + kc,
			"--bind-address=127.0.0.1", "--secure-port=10259",
			"--leader-elect=false",
			"--profiling=false",
			"--v=1",
		},
	}
}

// waitHTTP polls url from inside ns until it answers 200 "ok", the process
// named proc dies, or ctx ends.
func (s *supervisor) waitHTTP(ctx context.Context, proc, ns, url string, mode waitMode, timeout time.Duration) error {
	tr := &http.Transport{DialContext: dialIn(ns)}
	if mode == waitInsecure {
		// The controller manager serves a self-signed cert of its own.
		tr.TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
	}
	if mode == waitLabCA {
		pki := s.cfg.layout().PKI()
		caPEM, err := os.ReadFile(filepath.Join(pki, "ca.crt"))
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(caPEM)
		cert, err := tls.LoadX509KeyPair(filepath.Join(pki, "admin.crt"), filepath.Join(pki, "admin.key"))
		if err != nil {
			return err
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 3 * time.Second}
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for {
		resp, err := client.Get(url)
		if err == nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
		} else {
			last = err.Error()
		}
		if _, ok := s.procs.running(proc); !ok {
			return fmt.Errorf("%s: %w (last probe: %s)", proc, errExited, last)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %s", proc, timeout, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
}
