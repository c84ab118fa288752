package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/sockmap"
)

// kernelBTF is where the running kernel describes its types (CONFIG_DEBUG_INFO_BTF).
const kernelBTF = "/sys/kernel/btf/vmlinux"

// ensureAcceleration keeps same-node TCP acceleration (pkg/sockmap) in line
// with the configuration: enabled for this node's IPv4 pod CIDRs, or
// disabled live (established connections continue on the normal path).
func (a *Agent) ensureAcceleration(ctx context.Context, self nodeInfo) error {
	if !a.cfg.TCPAcceleration || a.cfg.BPFRoot == "" {
		if a.accel != nil {
			a.metrics.registry.Unregister(a.accelCollector)
			err := a.accel.Disable(ctx)
			a.accel, a.accelCollector = nil, nil
			a.log.Info("TCP acceleration disabled")
			return err
		}
		if !a.accelOff && a.cfg.BPFRoot != "" {
			// A previous run may have left it enabled.
			a.accelOff = true
			if err := sockmap.Disable(ctx, a.cfg.BPFRoot); err != nil {
				return fmt.Errorf("disable TCP acceleration of an earlier run: %w", err)
			}
		}
		return nil
	}
	var prefixes []netip.Prefix
	for _, p := range self.PodCIDRs {
		if p.Addr().Is4() {
			prefixes = append(prefixes, p)
		}
	}
	excluded := a.accelerationExcluded()
	if a.accel != nil {
		return a.accel.SetPods(prefixes, excluded)
	}
	// The programs read socket internals through the kernel's BTF: without
	// it the node runs unaccelerated (an optimisation, not a failure).
	if _, err := os.Stat(kernelBTF); err != nil {
		if !a.accelNoBTF {
			a.accelNoBTF = true
			a.log.Warn("TCP acceleration needs kernel BTF; running without it", "btf", kernelBTF, "err", err)
		}
		return nil
	}
	cg := a.cfg.PodCgroup
	if cg == "" {
		var err error
		if cg, err = cgroup.V2Mount(); err != nil {
			return fmt.Errorf("TCP acceleration needs a cgroup v2 (set --pod-cgroup): %w", err)
		}
	}
	acc, err := sockmap.Enable(ctx, sockmap.Config{BPFRoot: a.cfg.BPFRoot, CgroupPath: cg, PodPrefixes: prefixes, Excluded: excluded})
	if err != nil {
		return fmt.Errorf("enable TCP acceleration on cgroup %s (--tcp-acceleration=false turns it off): %w", cg, err)
	}
	a.accel, a.accelCollector, a.accelOff = acc, acc.Collector(), false
	if err := a.metrics.registry.Register(a.accelCollector); err != nil {
		a.log.Warn("register TCP acceleration metrics", "err", err)
	}
	a.log.Info("TCP acceleration enabled", "cgroup", cg, "pod_prefixes", prefixes)
	return nil
}

// closeAcceleration releases the handles; acceleration keeps running.
func (a *Agent) closeAcceleration() error {
	if a.accel == nil {
		return nil
	}
	a.metrics.registry.Unregister(a.accelCollector)
	err := a.accel.Close()
	a.accel, a.accelCollector = nil, nil
	return err
}

// AnnotationTCPAcceleration set to "false" on a Pod keeps its connections
// off the socket shortcut: needed by pods that read sockets with splice(2)
// (e.g. Go's io.Copy between two TCP connections), which do not see
// redirected data on current kernels.
const AnnotationTCPAcceleration = "sinabro.io/tcp-acceleration"

func accelerationOptOut(p *corev1.Pod) bool {
	return p.Annotations[AnnotationTCPAcceleration] == "false"
}

// accelerationExcluded lists the IPv4 addresses of this node's pods that
// opted out of TCP acceleration.
func (a *Agent) accelerationExcluded() []netip.Addr {
	if a.pods == nil {
		return nil
	}
	var out []netip.Addr
	for _, obj := range a.pods.List() {
		p, ok := obj.(*corev1.Pod)
		if !ok || !accelerationOptOut(p) {
			continue
		}
		ips := []string{p.Status.PodIP}
		for _, ip := range p.Status.PodIPs {
			ips = append(ips, ip.IP)
		}
		for _, ip := range ips {
			if addr, err := netip.ParseAddr(ip); err == nil && addr.Is4() && !slices.Contains(out, addr) {
				out = append(out, addr)
			}
		}
	}
	return out
}
