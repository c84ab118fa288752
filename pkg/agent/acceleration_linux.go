package agent

import (
	"context"
	"fmt"
	"os"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/sockmap"
)

// kernelBTF is where the running kernel describes its types (CONFIG_DEBUG_INFO_BTF).
const kernelBTF = "/sys/kernel/btf/vmlinux"

// ensureAcceleration keeps same-node TCP acceleration (pkg/sockmap) in line
// with the node's --tcp-acceleration and the pods' and namespaces'
// annotations (see planAcceleration). The programs are attached only while
// something can be accelerated, and detached live otherwise (established
// connections continue on the normal path).
func (a *Agent) ensureAcceleration(ctx context.Context, self nodeInfo) error {
	if a.cfg.BPFRoot == "" {
		return a.disableAcceleration(ctx, "no bpffs root")
	}
	// Until the Pods and Namespaces are known, any decision could
	// accelerate a pod that opted out, or detach connections a restarted
	// agent should keep: leave things as they are (syncing triggers a pass).
	if a.accelSynced != nil && !a.accelSynced() {
		return nil
	}
	plan := a.accelerationPlan(self)
	for _, w := range plan.Warnings {
		if !a.accelWarned[w] {
			a.log.Warn("ignoring a TCP acceleration annotation that is neither true nor false", "annotation", w)
		}
	}
	a.accelWarned = map[string]bool{}
	for _, w := range plan.Warnings {
		a.accelWarned[w] = true
	}
	if !plan.active() {
		reason := "no pod opted in (sinabro.io/tcp-acceleration: \"true\" on the pod or its namespace)"
		if a.cfg.TCPAcceleration {
			reason = "the node has no IPv4 pod CIDR"
		}
		return a.disableAcceleration(ctx, reason)
	}
	logPlan := func(msg string) {
		if a.cfg.TCPAcceleration {
			a.log.Info(msg, "node_default", true, "pod_prefixes", plan.Prefixes, "opted_out", plan.Excluded)
		} else {
			a.log.Info(msg, "node_default", false, "opted_in", plan.Prefixes)
		}
	}
	if a.accel != nil {
		if slices.Equal(plan.Prefixes, a.accelPlan.Prefixes) && slices.Equal(plan.Excluded, a.accelPlan.Excluded) {
			return nil
		}
		if err := a.accel.SetPods(plan.Prefixes, plan.Excluded); err != nil {
			return err
		}
		a.accelPlan = plan
		logPlan("TCP acceleration pods changed")
		return nil
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
	cg, err := cgroup.V2Dir(a.cfg.PodCgroup)
	if err != nil {
		return fmt.Errorf("TCP acceleration needs a cgroup v2 (--pod-cgroup): %w", err)
	}
	acc, err := sockmap.Enable(ctx, sockmap.Config{BPFRoot: a.cfg.BPFRoot, CgroupPath: cg, PodPrefixes: plan.Prefixes, Excluded: plan.Excluded})
	if err != nil {
		return fmt.Errorf("enable TCP acceleration on cgroup %s: %w", cg, err)
	}
	a.accel, a.accelCollector, a.accelOff, a.accelPlan = acc, acc.Collector(), false, plan
	if err := a.metrics.registry.Register(a.accelCollector); err != nil {
		a.log.Warn("register TCP acceleration metrics", "err", err)
	}
	logPlan("TCP acceleration enabled on cgroup " + cg)
	return nil
}

// disableAcceleration detaches the programs, once: its own, or those a
// previous run left pinned under the bpffs root.
func (a *Agent) disableAcceleration(ctx context.Context, reason string) error {
	if a.accel != nil {
		a.metrics.registry.Unregister(a.accelCollector)
		err := a.accel.Disable(ctx)
		if cerr := a.accel.Close(); err == nil {
			err = cerr
		}
		a.accel, a.accelCollector, a.accelPlan, a.accelOff = nil, nil, accelerationPlan{}, true
		a.log.Info("TCP acceleration disabled", "reason", reason)
		return err
	}
	if !a.accelOff && a.cfg.BPFRoot != "" {
		// A previous run may have left it enabled.
		a.accelOff = true
		if err := sockmap.Disable(ctx, a.cfg.BPFRoot); err != nil {
			return fmt.Errorf("disable TCP acceleration of an earlier run: %w", err)
		}
		a.log.Debug("TCP acceleration off", "reason", reason)
	}
	return nil
}

// accelerationPlan decides from this node's Pods and the Namespaces.
func (a *Agent) accelerationPlan(self nodeInfo) accelerationPlan {
	var pods []*corev1.Pod
	if a.pods != nil {
		for _, obj := range a.pods.List() {
			if p, ok := obj.(*corev1.Pod); ok {
				pods = append(pods, p)
			}
		}
	}
	namespaces := map[string]*corev1.Namespace{}
	if a.namespaces != nil {
		for _, obj := range a.namespaces.List() {
			if ns, ok := obj.(*corev1.Namespace); ok {
				namespaces[ns.Name] = ns
			}
		}
	}
	return planAcceleration(a.cfg.TCPAcceleration, self.PodCIDRs, pods, namespaces)
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
