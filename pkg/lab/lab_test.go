package lab

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/client-go/tools/clientcmd"
)

func TestNodeAddr(t *testing.T) {
	cfg := &Config{Underlay: DefaultUnderlay}
	tests := []struct {
		name    string
		want    string
		wantErr bool
	}{
		{"node-1", "172.31.250.11", false},
		{"node-42", "172.31.250.52", false},
		{"node-0", "", true},
		{"worker", "", true},
		{"node-201", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cfg.nodeAddr(tt.name)
			if (err != nil) != tt.wantErr {
				t.Fatalf("nodeAddr(%q) error = %v, wantErr %v", tt.name, err, tt.wantErr)
			}
			if err == nil && got.String() != tt.want {
				t.Errorf("nodeAddr(%q) = %s, want %s", tt.name, got, tt.want)
			}
		})
	}
	if got := cfg.controlPlaneAddr().String(); got != "172.31.250.2" {
		t.Errorf("controlPlaneAddr = %s", got)
	}
	if got := cfg.routerAddr().String(); got != "172.31.250.1" {
		t.Errorf("routerAddr = %s", got)
	}
}

func TestParsePeer(t *testing.T) {
	tests := []struct{ in, want string }{
		{"sinabro-lab default/a peer=10.244.1.2:40000\n", "10.244.1.2"},
		{"sinabro-lab x peer=[fd00::1]:5\n", "fd00::1"},
		{"garbage", ""},
	}
	for _, tt := range tests {
		if got := parsePeer(tt.in); got != tt.want {
			t.Errorf("parsePeer(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestPodNetnsName(t *testing.T) {
	got := (&Config{}).PodNetns("0e6a1b2c-3d4e-5f60-7182-93a4b5c6d7e8")
	if want := "sblab-pod-0e6a1b2c3d4e5f60"; got != want {
		t.Errorf("podNetns = %q, want %q", got, want)
	}
}

// TestLabNames: every name a lab makes outside its dir derives from its
// name; the default lab keeps the names of before --name.
func TestLabNames(t *testing.T) {
	tests := []struct {
		name                                string
		wantNode, wantPod, wantBPF, wantCgr string
	}{
		{"", "sblab-node-1", "sblab-pod-0e6a1b2c3d4e5f60", "/sys/fs/bpf/sinabro-lab", "sinabro-lab"},
		{DefaultName, "sblab-node-1", "sblab-pod-0e6a1b2c3d4e5f60", "/sys/fs/bpf/sinabro-lab", "sinabro-lab"},
		{"sbe2eab12", "sbe2eab12-node-1", "sbe2eab12-pod-0e6a1b2c3d4e5f60", "/sys/fs/bpf/sinabro-lab-sbe2eab12", "sinabro-lab-sbe2eab12"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &Config{Name: tt.name}
			if got := c.NodeNetns("node-1"); got != tt.wantNode {
				t.Errorf("NodeNetns = %q, want %q", got, tt.wantNode)
			}
			if got := c.PodNetns("0e6a1b2c-3d4e-5f60-7182-93a4b5c6d7e8"); got != tt.wantPod {
				t.Errorf("PodNetns = %q, want %q", got, tt.wantPod)
			}
			if got := BPFRootFor(c.LabName()); got != tt.wantBPF {
				t.Errorf("BPFRootFor = %q, want %q", got, tt.wantBPF)
			}
			if got := CgroupNameFor(c.LabName()); got != tt.wantCgr {
				t.Errorf("CgroupNameFor = %q, want %q", got, tt.wantCgr)
			}
		})
	}
}

func TestValidateName(t *testing.T) {
	for _, name := range []string{"sblab", "sbe2eab12", "a", "lab2"} {
		if err := ValidateName(name); err != nil {
			t.Errorf("ValidateName(%q) = %v, want nil", name, err)
		}
	}
	// A dash would let one lab's prefix ("sblab-") match another's
	// namespaces ("sblab-x-node-1"), and `lab down` remove them.
	for _, name := range []string{"", "sblab-x", "Lab", "2lab", "a_b", "abcdefghijklm"} {
		if err := ValidateName(name); err == nil {
			t.Errorf("ValidateName(%q) = nil, want an error", name)
		}
	}
}

// TestDownName: `lab down` takes the name from lab.json and refuses another
// --name (it would remove that lab's namespaces); without lab.json, a bad
// --name is refused before anything is touched.
func TestDownName(t *testing.T) {
	dir := t.TempDir()
	cfg := &Config{Name: "laba", Dir: dir}
	if err := cfg.save(); err != nil {
		t.Fatal(err)
	}
	err := Down(context.Background(), DownOptions{Dir: dir, Name: "labb"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), `named "laba"`) {
		t.Errorf("Down(--name labb) of lab laba = %v, want a name mismatch", err)
	}
	err = Down(context.Background(), DownOptions{Dir: t.TempDir(), Name: "sblab-x"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "lab name") {
		t.Errorf("Down(--name sblab-x) = %v, want an invalid name", err)
	}
}

// TestUpRefusesDirOutsideVarLib: a --dir outside /var/lib is refused
// before anything else is checked or done; a lab left in it (here its
// lab.json) is not taken down first.
func TestUpRefusesDirOutsideVarLib(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("lab up refuses to start without root before looking at --dir")
	}
	dir := t.TempDir() // under /tmp
	cfg := &Config{Name: "laba", Dir: dir}
	if err := cfg.save(); err != nil {
		t.Fatal(err)
	}
	err := Up(context.Background(), UpOptions{Dir: dir, Nodes: 1, ClusterCIDR: "10.244.0.0/16", KubeBinDir: t.TempDir()}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "must lie under /var/lib") {
		t.Errorf("Up(--dir %s) = %v, want the dir refused", dir, err)
	}
	if _, err := LoadConfig(dir); err != nil {
		t.Errorf("the lab left in %s was touched: %v", dir, err)
	}
}

func TestFirstServiceIP(t *testing.T) {
	tests := []struct{ cidr, want string }{
		{"10.96.0.0/16", "10.96.0.1"},
		{"10.0.0.0/24", "10.0.0.1"},
	}
	for _, tt := range tests {
		got, err := firstServiceIP(tt.cidr)
		if err != nil || got.String() != tt.want {
			t.Errorf("firstServiceIP(%s) = %v, %v; want %s", tt.cidr, got, err, tt.want)
		}
	}
	if _, err := firstServiceIP("fd00::/112"); err == nil {
		t.Error("firstServiceIP accepted IPv6")
	}
}

// TestPKI checks the certificates chain to the CA, carry the identities
// Kubernetes authorizes on, and the kubeconfigs load.
func TestPKI(t *testing.T) {
	dir := t.TempDir()
	cfg := &Config{Dir: dir, Underlay: DefaultUnderlay, ServiceCIDR: DefaultServiceCIDR, ProxyAddr: DefaultProxyAddr}
	if err := cfg.writeControlPlanePKI(); err != nil {
		t.Fatal(err)
	}
	pki := cfg.layout().PKI()
	pool := x509.NewCertPool()
	pool.AddCert(readCert(t, filepath.Join(pki, "ca.crt")))
	tests := []struct {
		file  string
		usage x509.ExtKeyUsage
		cn    string
		org   string
		ip    string
	}{
		{"apiserver.crt", x509.ExtKeyUsageServerAuth, "kube-apiserver", "", "172.31.250.2"},
		{"admin.crt", x509.ExtKeyUsageClientAuth, "sinabro-lab-admin", "system:masters", ""},
		{"kube-controller-manager.crt", x509.ExtKeyUsageClientAuth, "system:kube-controller-manager", "", ""},
		{"kube-proxy.crt", x509.ExtKeyUsageClientAuth, "system:kube-proxy", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			c := readCert(t, filepath.Join(pki, tt.file))
			if _, err := c.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{tt.usage}}); err != nil {
				t.Fatalf("verify: %v", err)
			}
			if c.Subject.CommonName != tt.cn {
				t.Errorf("CN = %q, want %q", c.Subject.CommonName, tt.cn)
			}
			if tt.org != "" && (len(c.Subject.Organization) != 1 || c.Subject.Organization[0] != tt.org) {
				t.Errorf("O = %v, want %s", c.Subject.Organization, tt.org)
			}
			if tt.ip != "" {
				if err := c.VerifyHostname(tt.ip); err != nil {
					t.Errorf("hostname: %v", err)
				}
				if err := c.VerifyHostname("10.96.0.1"); err != nil {
					t.Errorf("service IP: %v", err)
				}
			}
		})
	}
	for _, kc := range []string{cfg.layout().AdminKubeconfig(), cfg.layout().InternalKubeconfig()} {
		rc, err := clientcmd.BuildConfigFromFlags("", kc)
		if err != nil {
			t.Fatalf("load %s: %v", kc, err)
		}
		if !strings.HasPrefix(rc.Host, "https://") {
			t.Errorf("%s: host %q", kc, rc.Host)
		}
	}
	// Issuing again keeps the existing key pair.
	before, _ := os.ReadFile(filepath.Join(pki, "admin.crt"))
	if err := cfg.writeControlPlanePKI(); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(filepath.Join(pki, "admin.crt"))
	if string(before) != string(after) {
		t.Error("second writeControlPlanePKI replaced admin.crt")
	}
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestReadManifests(t *testing.T) {
	objs, err := readManifests("")
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, o := range objs {
		kinds = append(kinds, o.GetKind())
	}
	if got, want := strings.Join(kinds, ","), "ServiceAccount,ClusterRole,ClusterRoleBinding"; got != want {
		t.Errorf("fallback kinds = %s, want %s", got, want)
	}
	// The repository's manifests, when present, must decode too.
	if dir := FindManifests(filepath.Join("..", "..", "manifests")); dir != "" {
		if _, err := os.Stat(dir); err == nil {
			if _, err := readManifests(dir); err != nil {
				t.Errorf("repository manifests: %v", err)
			}
		}
	}
}
