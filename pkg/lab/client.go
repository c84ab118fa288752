package lab

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// dialIn returns a dialer whose sockets live in the named lab namespace, so
// a process in the root namespace can reach the apiserver's underlay address
// without any route there.
func dialIn(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var conn net.Conn
		err := netns.Do(netns.Path(ns), func() error {
			var err error
			d := net.Dialer{Timeout: 10 * time.Second}
			conn, err = d.DialContext(ctx, network, addr)
			return err
		})
		return conn, err
	}
}

// certConfig is a rest.Config authenticating with a client certificate of
// the lab PKI, dialing from inside ns.
func (c *Config) certConfig(ns, user string) *rest.Config {
	pki := c.layout().PKI()
	return &rest.Config{
		Host: c.apiserverURL(),
		TLSClientConfig: rest.TLSClientConfig{
			CAFile:   filepath.Join(pki, "ca.crt"),
			CertFile: filepath.Join(pki, user+".crt"),
			KeyFile:  filepath.Join(pki, user+".key"),
		},
		Dial:      dialIn(ns),
		QPS:       50,
		Burst:     100,
		UserAgent: "sinabro-lab/" + user,
	}
}

func (c *Config) clientset(ns, user string) (*kube.Client, error) {
	cs, err := kube.New(c.certConfig(ns, user), "sinabro-lab")
	if err != nil {
		return nil, fmt.Errorf("client for %s: %w", user, err)
	}
	return cs, nil
}

// AdminClient returns a clientset using the lab's admin kubeconfig (which
// goes through the supervisor's loopback proxy).
func AdminClient(dir string) (*kube.Client, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", Layout{dir}.AdminKubeconfig())
	if err != nil {
		return nil, fmt.Errorf("load admin kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	cs, err := kube.New(cfg, "sinabro-lab")
	if err != nil {
		return nil, fmt.Errorf("admin client: %w", err)
	}
	return cs, nil
}

// kubeconfig is the content of a one-cluster, one-user kubeconfig. Exactly
// one of (certFile, keyFile) or token is set.
type kubeconfig struct {
	server, caFile    string
	certFile, keyFile string
	token             string
	user              string
}

func (k kubeconfig) write(path string) error {
	auth := fmt.Sprintf("    client-certificate: %s\n    client-key: %s\n", k.certFile, k.keyFile)
	if k.token != "" {
		auth = fmt.Sprintf("    token: %s\n", k.token)
	}
	data := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: sinabro-lab
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
%scontexts:
- name: sinabro-lab
  context:
    cluster: sinabro-lab
    user: %s
current-context: sinabro-lab
`, k.server, k.caFile, k.user, auth, k.user)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := atomicfile.Write(path, []byte(data), 0o600); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}
