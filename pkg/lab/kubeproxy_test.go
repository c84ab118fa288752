package lab

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/yaml"
)

func TestCheckKubeBins(t *testing.T) {
	dir := t.TempDir()
	for _, b := range controlPlaneBins {
		if err := os.WriteFile(filepath.Join(dir, b), nil, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		mode    string
		withKP  bool
		wantErr string
	}{
		{KubeProxyNone, false, ""},
		{"", false, ""},
		{KubeProxyNFTables, false, "--kube-proxy none"},
		{KubeProxyIPTables, true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.mode, func(t *testing.T) {
			kp := filepath.Join(dir, "kube-proxy")
			os.Remove(kp)
			if tt.withKP {
				if err := os.WriteFile(kp, nil, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			err := CheckKubeBins(dir, tt.mode, RuntimeStandin)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("CheckKubeBins(%q) = %v, want nil", tt.mode, err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("CheckKubeBins(%q) = %v, want an error mentioning %q", tt.mode, err, tt.wantErr)
			}
		})
	}
}

func TestParseKubeProxyMode(t *testing.T) {
	for in, want := range map[string]string{"": "none", "none": "none", "iptables": "iptables", "nftables": "nftables", "ipvs": ""} {
		got, err := ParseKubeProxyMode(in)
		if got != want || (err != nil) != (want == "") {
			t.Errorf("ParseKubeProxyMode(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestKubeProxyConfig(t *testing.T) {
	cfg := &Config{Dir: t.TempDir(), ClusterCIDR: DefaultClusterCIDR, Underlay: DefaultUnderlay, KubeProxy: KubeProxyNFTables}
	if err := cfg.writeKubeProxyConfig("node-2", netip.MustParseAddr("172.31.250.12")); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(cfg.layout().NodeKubeProxyConfig("node-2"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var got map[string]any
	if err := yaml.NewYAMLOrJSONDecoder(f, 4096).Decode(&got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"kind": "KubeProxyConfiguration", "mode": "nftables", "clusterCIDR": "10.244.0.0/16",
		"detectLocalMode": "ClusterCIDR", "hostnameOverride": "node-2", "bindAddress": "172.31.250.12",
		"healthzBindAddress": "172.31.250.12:10256", "metricsBindAddress": "127.0.0.1:10249",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	ct, _ := got["conntrack"].(map[string]any)
	if fmt.Sprint(ct["maxPerCore"]) != "0" || fmt.Sprint(ct["min"]) != "0" {
		t.Errorf("conntrack = %v, want maxPerCore 0 and min 0 (nf_conntrack_max is not settable in a node netns)", ct)
	}
	cc, _ := got["clientConnection"].(map[string]any)
	if cc["kubeconfig"] != cfg.layout().KubeProxyKubeconfig() {
		t.Errorf("clientConnection.kubeconfig = %v", cc["kubeconfig"])
	}
}

func TestServiceRulesDiff(t *testing.T) {
	want := &serviceRules{
		clusterIPs: []string{"10.96.0.20"},
		endpoints:  map[string]bool{"10.244.1.4:8080": true, "10.244.1.4:8081": true},
	}
	tests := []struct {
		name, dump     string
		missing, stale string
	}{
		{"nftables current", `
	chain endpoint-ABC-default/svc-node-1-pod-1/tcp/tcp__10.244.1.4/8080 {
		ip saddr 10.244.1.4 jump mark-for-masquerade
		meta l4proto tcp dnat to 10.244.1.4:8080
	}
	chain endpoint-DEF-default/svc-node-1-pod-1/udp/udp__10.244.1.4/8081 {
		meta l4proto udp dnat to 10.244.1.4:8081
	}
	map service-ips { elements = { 10.96.0.20 . tcp . 80 : goto service-X, 10.96.0.1 . tcp . 443 : goto service-K } }
	chain endpoint-K { meta l4proto tcp dnat to 172.31.250.2:6443 }`, "[]", "[]"},
		{"iptables stale endpoint", `
-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment "default/svc-node-1-pod-1:tcp cluster IP" -m tcp --dport 80 -j KUBE-SVC-X
-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080
-A KUBE-SEP-B -p tcp -m tcp -j DNAT --to-destination 10.244.1.4:8080
-A KUBE-SEP-C -p udp -m udp -j DNAT --to-destination 10.244.1.4:8081`, "[]", "[10.244.1.2:8080]"},
		{"not programmed", `-A KUBE-SEP-C -p udp -m udp -j DNAT --to-destination 10.244.1.4:8081`, "[10.244.1.4:8080 10.96.0.20]", "[]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			missing, stale := want.diff(tt.dump)
			if fmt.Sprint(missing) != tt.missing || fmt.Sprint(stale) != tt.stale {
				t.Errorf("diff = missing %v, stale %v; want missing %s, stale %s", missing, stale, tt.missing, tt.stale)
			}
		})
	}
}
