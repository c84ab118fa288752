package cni

import (
	"errors"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

func TestParseConf(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		code    uint // 0: valid
		mtu     int
		nRanges int
	}{
		{"defaults", `{"cniVersion":"1.1.0","name":"n","type":"sinabro"}`, 0, DefaultMTU, 0},
		{"dual stack", `{"name":"n","podCIDRs":["10.1.0.0/24","fd00::/64"],"mtu":1400}`, 0, 1400, 2},
		{"ipv6 only", `{"name":"n","podCIDRs":["fd00::/64"]}`, types.ErrInvalidNetworkConfig, 0, 0},
		{"two ipv4", `{"name":"n","podCIDRs":["10.1.0.0/24","10.2.0.0/24"]}`, types.ErrInvalidNetworkConfig, 0, 0},
		{"too small", `{"name":"n","podCIDRs":["10.1.0.0/31"]}`, types.ErrInvalidNetworkConfig, 0, 0},
		{"other type", `{"name":"n","type":"bridge"}`, types.ErrInvalidNetworkConfig, 0, 0},
		{"ipam null is fine", `{"name":"n","ipam":null}`, 0, DefaultMTU, 0},
		{"dataDir under /var/lib", `{"name":"n","dataDir":"/var/lib/sinabro-x/../sinabro-y"}`, 0, DefaultMTU, 0},
		{"dataDir outside /var/lib", `{"name":"n","dataDir":"/tmp/sinabro"}`, types.ErrInvalidNetworkConfig, 0, 0},
		{"dataDir escaping /var/lib", `{"name":"n","dataDir":"/var/lib/../../etc"}`, types.ErrInvalidNetworkConfig, 0, 0},
		{"dataDir /var/lib itself", `{"name":"n","dataDir":"/var/lib/"}`, types.ErrInvalidNetworkConfig, 0, 0},
		{"dataDir /var/library", `{"name":"n","dataDir":"/var/library"}`, types.ErrInvalidNetworkConfig, 0, 0},
		{"bad prevResult", `{"cniVersion":"1.1.0","name":"n","prevResult":{"ips":"x"}}`, types.ErrDecodingFailure, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseConf([]byte(tc.in))
			if tc.code != 0 {
				var te *types.Error
				if !errors.As(err, &te) || te.Code != tc.code {
					t.Fatalf("err = %v, want code %d", err, tc.code)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if c.MTU != tc.mtu || len(c.ranges) != tc.nRanges {
				t.Errorf("got mtu %d, %d ranges; want %d, %d", c.MTU, len(c.ranges), tc.mtu, tc.nRanges)
			}
		})
	}
}

// FuzzParseConf: any input yields a valid config or a typed CNI error, never a panic.
func FuzzParseConf(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"n","type":"sinabro","podCIDRs":["10.1.0.0/24"],"mtu":1450}`))
	f.Add([]byte(`{"name":"n","podCIDRs":["10.1.0.0/24","fd00::/64"],"dataDir":"/x"}`))
	f.Add([]byte(`{"name":"n","prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.1.0.2/32"}]}}`))
	f.Add([]byte(`{"ipam":{}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parseConf(data)
		if err != nil {
			var te *types.Error
			if !errors.As(err, &te) || te.Code == 0 || te.Msg == "" {
				t.Fatalf("error without a CNI code and message: %#v", err)
			}
			return
		}
		if c.MTU < 576 || c.MTU > 65535 {
			t.Fatalf("accepted mtu %d", c.MTU)
		}
		for _, r := range c.ranges {
			if r != r.Masked() {
				t.Fatalf("accepted range %s with host bits", r)
			}
		}
	})
}
