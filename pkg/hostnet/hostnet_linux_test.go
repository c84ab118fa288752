package hostnet

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestEnsure(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		initial map[string]string
		want    map[string]string
		changes int
	}{
		{
			name:    "enables forwarding",
			initial: map[string]string{"net/ipv4/ip_forward": "0"},
			want:    map[string]string{"net/ipv4/ip_forward": "1"},
			changes: 1,
		},
		{
			name:    "converged node changes nothing",
			initial: map[string]string{"net/ipv4/ip_forward": "1"},
			want:    map[string]string{"net/ipv4/ip_forward": "1"},
		},
		{
			name: "ipv6 and rp_filter",
			cfg:  Config{IPv6: true, LooseRPFilter: []string{"sinabro.vxlan", "eth0", "eth1"}},
			initial: map[string]string{
				"net/ipv4/ip_forward":                   "1",
				"net/ipv6/conf/all/forwarding":          "0",
				"net/ipv4/conf/sinabro.vxlan/rp_filter": "1",
				"net/ipv4/conf/eth0/rp_filter":          "0",
				"net/ipv4/conf/eth1/rp_filter":          "2",
			},
			want: map[string]string{
				"net/ipv4/ip_forward":                   "1",
				"net/ipv6/conf/all/forwarding":          "1",
				"net/ipv4/conf/sinabro.vxlan/rp_filter": "2",
				"net/ipv4/conf/eth0/rp_filter":          "0", // off already: not made stricter
				"net/ipv4/conf/eth1/rp_filter":          "2",
			},
			changes: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for k, v := range tt.initial {
				p := filepath.Join(root, k)
				os.MkdirAll(filepath.Dir(p), 0o755)
				if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			changes, err := Ensure(root, tt.cfg)
			if err != nil {
				t.Fatalf("Ensure: %v", err)
			}
			if len(changes) != tt.changes {
				t.Errorf("changes = %+v, want %d", changes, tt.changes)
			}
			got := map[string]string{}
			for k := range tt.want {
				b, _ := os.ReadFile(filepath.Join(root, k))
				got[k] = strings.TrimSpace(string(b))
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("sysctls = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestEnsureMissingDevice(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "net/ipv4"), 0o755)
	os.WriteFile(filepath.Join(root, "net/ipv4/ip_forward"), []byte("1"), 0o644)
	if _, err := Ensure(root, Config{LooseRPFilter: []string{"nope"}}); err == nil {
		t.Error("Ensure with a missing device succeeded, want an error")
	}
}
