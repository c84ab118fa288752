package cni

import (
	"bytes"
	"io"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// TestRunCapsStdin: a config beyond MaxConfigSize is refused with code 7
// without reading it all; one just under the bound is read and parsed.
func TestRunCapsStdin(t *testing.T) {
	env := func(k string) string {
		return map[string]string{"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}[k]
	}
	conf := `{"cniVersion":"1.1.0","name":"n","type":"sinabro"}`
	pad := func(n int) io.Reader { return strings.NewReader(conf + strings.Repeat(" ", n-len(conf))) }

	huge := io.MultiReader(strings.NewReader(conf), io.LimitReader(zeros{}, 64<<20))
	for _, tc := range []struct {
		name  string
		stdin io.Reader
		want  uint
	}{
		{"just under the bound", pad(MaxConfigSize), types.ErrPluginNotAvailable}, // parsed: no pod CIDR
		{"one byte over", pad(MaxConfigSize + 1), types.ErrInvalidNetworkConfig},
		{"64 MiB", huge, types.ErrInvalidNetworkConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Run(env, tc.stdin, &bytes.Buffer{})
			if err == nil || err.Code != tc.want {
				t.Fatalf("Run = %v, want code %d", err, tc.want)
			}
			if tc.want == types.ErrInvalidNetworkConfig && !strings.Contains(err.Msg, "too large") {
				t.Errorf("msg = %q, want it to say the config is too large", err.Msg)
			}
		})
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
