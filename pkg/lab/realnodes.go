package lab

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
	"github.com/sinabro-io/sinabro/pkg/lab/images"
)

// buildImages builds (or finds cached) the image archives real nodes import:
// there is no registry.
func (s *supervisor) buildImages(ctx context.Context) error {
	l := s.cfg.layout()
	s.progress.step("building image archives (cached by content; the first build bootstraps a Debian base, a few minutes)")
	start := time.Now()
	logf, err := os.OpenFile(l.Log("images"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	imgs, err := images.Build(ctx, images.Options{KubeBinDir: s.cfg.KubeBinDir, Sinabro: s.cfg.Executable}, logf)
	if err != nil {
		return &componentError{"images", l.Log("images"), err}
	}
	s.images = imgs
	s.progress.done(fmt.Sprintf("%d images ready in %.1fs", len(imgs), time.Since(start).Seconds()))
	return nil
}

// addRealNode starts a node's containerd, imports the images into it and
// starts its kubelet; the Sinabro DaemonSet then installs the CNI plugin and
// runs the agent there.
func (s *supervisor) addRealNode(ctx context.Context, name string, addr netip.Addr, kubeletKC string) error {
	l := s.cfg.layout()
	fail := func(component string, err error) error {
		return &componentError{component, l.Log(component), fmt.Errorf("%s: %w", name, err)}
	}
	version := "containerd 2.x"
	if s.cfg.nodeContainerd1(name) {
		version = "containerd 1.x (Debian's)"
	}
	s.progress.step(fmt.Sprintf("%s: mount and UTS namespaces (hostname %s), %s", name, name, version))
	if err := s.cfg.setupNodeNamespaces(name); err != nil {
		return fail("supervisor", err)
	}
	ccfg, err := s.cfg.writeContainerdConfig(name)
	if err != nil {
		return fail("supervisor", err)
	}
	if err := s.procs.start(ctx, s.cfg.containerdSpec(name, ccfg)); err != nil {
		return fail("containerd-"+name, err)
	}
	if err := s.waitContainerd(ctx, name, 60*time.Second); err != nil {
		return fail("containerd-"+name, err)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(s.images))
	for i, img := range s.images {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = images.Import(ctx, s.cfg.ctr(name), l.containerdSocket(name), img)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return fail("containerd-"+name, err)
		}
	}
	s.progress.done(fmt.Sprintf("%s: containerd up, %d images imported in %.1fs", name, len(s.images), time.Since(start).Seconds()))

	// The node's OS ships the reference portmap plugin, as kubeadm nodes
	// do (kubernetes-cni): the agent chains it for hostPort.
	for _, p := range []string{"portmap", "loopback"} {
		if err := copyExecutable(filepath.Join(s.cfg.KubeBinDir, p), filepath.Join(l.NodeCNIBin(name), p)); err != nil {
			return fail("supervisor", err)
		}
	}
	kcfg, err := s.cfg.writeKubeletConfig(name)
	if err != nil {
		return fail("supervisor", err)
	}
	s.progress.step(fmt.Sprintf("%s: starting kubelet (cgroup root %s); the sinabro DaemonSet installs the CNI plugin", name, s.cfg.nodeCgroupRoot(name)))
	if err := s.procs.start(ctx, s.cfg.kubeletSpec(name, kcfg, kubeletKC, addr.String())); err != nil {
		return fail("kubelet-"+name, err)
	}
	if err := s.procs.start(ctx, procSpec{name: "serve-" + name, netns: s.cfg.NodeNetns(name), restart: true,
		argv: []string{s.cfg.Executable, "lab", "serve", "--name", name}}); err != nil {
		return fail("serve-"+name, err)
	}
	return nil
}

// routePodCIDRs routes a node's pod CIDRs to it from the control plane's
// namespace, as a control-plane host on the pod network has them: the
// apiserver reaches pods (its pod proxy, webhooks) and so does the e2e
// suite run there.
func (s *supervisor) routePodCIDRs(n *corev1.Node) error {
	ip, err := netip.ParseAddr(internalIP(n))
	if err != nil {
		return fmt.Errorf("node %s: InternalIP: %w", n.Name, err)
	}
	for _, c := range n.Spec.PodCIDRs {
		p, err := netip.ParsePrefix(c)
		if err != nil || !p.Addr().Is4() {
			continue
		}
		if err := setRoute(s.cfg.nsControlPlane(), p, ip); err != nil {
			return err
		}
	}
	return nil
}

// waitContainerd waits until the node's containerd answers on its socket.
func (s *supervisor) waitContainerd(ctx context.Context, node string, timeout time.Duration) error {
	ctr := s.cfg.ctr(node)
	sock := s.cfg.layout().containerdSocket(node)
	deadline := time.Now().Add(timeout)
	for {
		out, err := exec.CommandContext(ctx, ctr, "-a", sock, "version").CombinedOutput()
		if err == nil {
			return nil
		}
		if _, ok := s.procs.running("containerd-" + node); !ok {
			return fmt.Errorf("%w before its socket answered", errExited)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no answer on %s after %s: %s", sock, timeout, out)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// stopRealNodes stops the kubelets, kills every container (runc put them
// in the nodes' cgroups, out of the lab's), then stops containerd.
func (s *supervisor) stopRealNodes() {
	s.procs.stopAll("kubelet-")
	if n, err := killNodeCgroups(s.cfg.LabName()); err != nil {
		s.log.Warn("containers left", "killed", n, "err", err)
	}
	s.procs.stopAll("containerd-")
}

// waitDeployment waits until a Deployment has all its replicas available.
func (s *supervisor) waitDeployment(ctx context.Context, ns, name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		d, err := s.admin.Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil && deploymentAvailable(d) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("deployment %s/%s not available after %s", ns, name, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func deploymentAvailable(d *appsv1.Deployment) bool {
	want := int32(1)
	if d.Spec.Replicas != nil {
		want = *d.Spec.Replicas
	}
	return d.Status.ObservedGeneration >= d.Generation && d.Status.AvailableReplicas >= want && d.Status.UpdatedReplicas >= want
}

// copyExecutable copies an executable file (atomically: temp file + rename).
func copyExecutable(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("read %s: %w", src, err)
	}
	if err := atomicfile.Write(dst, b, 0o755); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return nil
}
