// Package install puts the sinabro executable where container runtimes look
// for CNI plugins and, when the pod CIDRs are known, writes the CNI config.
package install

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
	"github.com/sinabro-io/sinabro/pkg/cni"
)

// Options say where to install and what to configure.
type Options struct {
	Source   string // the executable to copy; "" means the running one
	BinDir   string // CNI bin dir, e.g. /opt/cni/bin
	BinName  string // file name in BinDir, default "sinabro"
	ConfDir  string // CNI conf dir, e.g. /etc/cni/net.d
	PodCIDRs []string
	MTU      int
	DataDir  string
}

// Result tells what Install did.
type Result struct {
	BinPath    string
	BinUpdated bool   // false: an identical copy was already there
	ConfPath   string // "" when no conflist was written
}

// Install copies the executable atomically (temp file + rename, so a runtime
// executing the old copy never hits ETXTBSY or a half-written file) and
// writes the conflist when pod CIDRs are given. Without them the agent
// writes the conflist later: a runtime must not see the network as ready
// before the node has a pod CIDR.
func Install(o Options) (Result, error) {
	src := o.Source
	if src == "" {
		exe, err := os.Executable()
		if err != nil {
			return Result{}, fmt.Errorf("find running executable: %w", err)
		}
		src = exe
	}
	name := o.BinName
	if name == "" {
		name = cni.DefaultBinName
	}
	res := Result{BinPath: filepath.Join(o.BinDir, name)}
	data, err := os.ReadFile(src)
	if err != nil {
		return res, fmt.Errorf("read %s: %w", src, err)
	}
	if !sameContent(res.BinPath, data) {
		if err := atomicfile.Write(res.BinPath, data, 0o755); err != nil {
			return res, fmt.Errorf("install %s: %w", res.BinPath, err)
		}
		res.BinUpdated = true
	}
	if len(o.PodCIDRs) > 0 {
		path, err := cni.WriteConfList(o.ConfDir, cni.NetworkConfig{MTU: o.MTU, PodCIDRs: o.PodCIDRs, DataDir: o.DataDir})
		if err != nil {
			return res, err
		}
		res.ConfPath = path
	}
	return res, nil
}

func sameContent(path string, want []byte) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false
	}
	w := sha256.Sum256(want)
	return bytes.Equal(h.Sum(nil), w[:])
}
