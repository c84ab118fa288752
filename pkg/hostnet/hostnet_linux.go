// Package hostnet keeps the node's kernel settings that pod networking relies
// on: IP forwarding and reverse-path filtering. It writes /proc/sys/net of the
// calling thread's network namespace.
package hostnet

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Config is what the node needs.
type Config struct {
	IPv6 bool // the node has an IPv6 pod CIDR: enable IPv6 forwarding too
	// LooseRPFilter lists devices on which strict reverse-path filtering
	// (rp_filter=1) is relaxed to loose (2). Replies from remote pods arrive
	// on the vxlan device, but a pod's traffic to another node's address
	// arrives on the underlay while the route back to the pod is the overlay:
	// strict filtering would drop it. The effective value is max(all, dev),
	// so 2 on the device wins over a strict "all"; 0 would not.
	LooseRPFilter []string
}

// Change is one sysctl that was changed.
type Change struct {
	Key      string
	Old, New string
}

// Ensure applies cfg and returns what it had to change (nothing on a
// converged node). ProcSys is the root of the sysctl tree, normally /proc/sys.
func Ensure(procSys string, cfg Config) ([]Change, error) {
	var changes []Change
	var errs []error
	set := func(key, value string, onlyIf func(old string) bool) {
		c, err := setSysctl(procSys, key, value, onlyIf)
		if err != nil {
			errs = append(errs, err)
		} else if c != nil {
			changes = append(changes, *c)
		}
	}
	set("net/ipv4/ip_forward", "1", nil)
	if cfg.IPv6 {
		set("net/ipv6/conf/all/forwarding", "1", nil)
	}
	for _, dev := range cfg.LooseRPFilter {
		set(filepath.Join("net/ipv4/conf", dev, "rp_filter"), "2", func(old string) bool { return old == "1" })
	}
	return changes, errors.Join(errs...)
}

// setSysctl writes value to key unless it already holds it, or onlyIf (when
// given) says the current value is fine.
func setSysctl(procSys, key, value string, onlyIf func(old string) bool) (*Change, error) {
	path := filepath.Join(procSys, key)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read sysctl %s: %w", key, err)
	}
	old := strings.TrimSpace(string(b))
	if old == value || (onlyIf != nil && !onlyIf(old)) {
		return nil, nil
	}
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return nil, fmt.Errorf("write sysctl %s=%s: %w", key, value, err)
	}
	return &Change{Key: key, Old: old, New: value}, nil
}
