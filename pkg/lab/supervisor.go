package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/lab/images"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// componentError names the component that failed and its log file, so
// `lab up` can point at the right place.
type componentError struct {
	component, log string
	err            error
}

func (e *componentError) Error() string { return fmt.Sprintf("%s: %v", e.component, e.err) }
func (e *componentError) Unwrap() error { return e.err }

// supervisor owns every process of a running lab and the per-node kubelet
// stand-ins. It is started detached by `lab up` as `sinabro lab supervise`.
type supervisor struct {
	cfg      *Config
	procs    *procs
	progress *progress
	log      *slog.Logger
	admin    *kube.Client
	sa       *applied
	images   []images.Image // real nodes: the archives each node imports

	mu    sync.Mutex
	nodes map[string]*nodeRuntime
	wg    sync.WaitGroup
}

type nodeRuntime struct {
	kubelet *kubelet
	cancel  context.CancelFunc
	done    chan struct{}
}

// Supervise runs the lab described by dir/lab.json until ctx ends, then
// stops every process it started.
func Supervise(ctx context.Context, dir string) error {
	cfg, err := LoadConfig(dir)
	if err != nil {
		return err
	}
	l := cfg.layout()
	s := &supervisor{
		cfg: cfg, procs: newProcs(l), progress: &progress{path: l.Progress()},
		log:   slog.New(slog.NewTextHandler(os.Stderr, nil)),
		nodes: map[string]*nodeRuntime{},
	}
	if err := os.WriteFile(l.SupervisorPID(), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return fmt.Errorf("write supervisor pid: %w", err)
	}
	if cg, err := joinCgroup(cfg.LabName()); err != nil {
		s.log.Warn("no lab cgroup; lab down will kill by pid files only", "err", err)
	} else {
		s.cfg.CgroupPath = cg
		s.cfg.save()
	}

	// Cancelled on failure too, so the proxy, the control socket and the
	// kubelet stand-ins stop; processes are stopped in order by shutdown.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ctl, err := s.serveControl(ctx)
	if err != nil {
		return err
	}

	err = s.up(ctx)
	if err != nil {
		var ce *componentError
		if errors.As(err, &ce) {
			s.progress.fail(ce.component, ce.log, err.Error())
		} else {
			s.progress.fail("supervisor", l.Log("supervisor"), err.Error())
		}
		s.log.Error("lab up failed", "err", err)
	} else {
		s.progress.emit(Event{Kind: "ready", Msg: "lab is up"})
		<-ctx.Done()
	}
	ctl.Close()
	cancel()
	s.shutdown()
	return err
}

func (s *supervisor) shutdown() {
	s.mu.Lock()
	for _, n := range s.nodes {
		n.cancel()
	}
	s.mu.Unlock()
	s.wg.Wait()
	if s.cfg.realNodes() {
		s.stopRealNodes()
	}
	s.procs.stopAll("pod-", "serve-", "kube-proxy-", "agent-", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
}

func (s *supervisor) up(ctx context.Context) error {
	l := s.cfg.layout()
	s.progress.step("creating the underlay network (namespaces " + NetnsPrefix(s.cfg.LabName()) + "*, bridge " + underlayBridge + " " + s.cfg.Underlay + ", router " + s.cfg.routerAddr().String() + ")")
	if err := ensureBPFFS(); err != nil {
		return err
	}
	if err := s.cfg.setupUnderlay(); err != nil {
		return err
	}
	cpPrefix := netip.PrefixFrom(s.cfg.controlPlaneAddr(), s.cfg.underlayPrefix().Bits())
	if err := s.cfg.attachHost(s.cfg.nsControlPlane(), "u-cp", cpPrefix); err != nil {
		return err
	}
	extPrefix := netip.PrefixFrom(s.cfg.externalAddr(), s.cfg.underlayPrefix().Bits())
	if err := s.cfg.attachHost(s.cfg.nsExternal(), "u-ext", extPrefix); err != nil {
		return err
	}
	// The router stands for the uplink of real nodes: their default
	// gateway, which forwards (and here has nowhere further to go).
	routerPrefix := netip.PrefixFrom(s.cfg.routerAddr(), s.cfg.underlayPrefix().Bits())
	if err := s.cfg.attachHost(s.cfg.nsRouter(), "u-router", routerPrefix); err != nil {
		return err
	}
	if err := setSysctl(s.cfg.nsRouter(), "net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	s.progress.done("underlay ready")

	if err := s.startAndWait(ctx, s.cfg.etcdSpec(), "http://127.0.0.1:2379/health", waitPlain, 60*time.Second); err != nil {
		return err
	}
	if err := s.startAndWait(ctx, s.cfg.apiserverSpec(), s.cfg.apiserverURL()+"/readyz", waitLabCA, 120*time.Second); err != nil {
		return err
	}
	admin, err := s.cfg.clientset(s.cfg.nsControlPlane(), "admin")
	if err != nil {
		return err
	}
	s.admin = admin
	if err := s.startProxy(ctx); err != nil {
		return &componentError{"apiserver proxy", l.Log("supervisor"), err}
	}
	if err := s.startAndWait(ctx, s.cfg.controllerManagerSpec(), "https://127.0.0.1:10257/healthz", waitInsecure, 90*time.Second); err != nil {
		return err
	}
	if s.cfg.realNodes() {
		if err := s.startAndWait(ctx, s.cfg.schedulerSpec(), "https://127.0.0.1:10259/healthz", waitInsecure, 90*time.Second); err != nil {
			return err
		}
	}

	src := s.cfg.Manifests
	if src == "" {
		src = "built-in RBAC (no manifests directory found)"
	}
	if s.cfg.realNodes() {
		s.progress.step("applying " + src + " (the sinabro DaemonSet runs on the real nodes)")
	} else {
		s.progress.step("applying agent RBAC from " + src + " and dry-running its DaemonSet")
	}
	sa, err := applyManifests(ctx, s.cfg.certConfig(s.cfg.nsControlPlane(), "admin"), s.cfg.Manifests, s.cfg.realNodes(), s.cfg.adaptManifest)
	if err != nil {
		return &componentError{"manifests", l.Log("supervisor"), err}
	}
	s.sa = sa
	s.progress.done(fmt.Sprintf("applied; agent identity serviceaccount %s/%s; dry-run ok: %v", sa.saNamespace, sa.saName, sa.dryRun))

	s.progress.step("waiting for the default ServiceAccount (serviceaccount controller)")
	if err := s.waitDefaultSA(ctx); err != nil {
		return &componentError{"kube-controller-manager", l.Log("kube-controller-manager"), err}
	}
	s.progress.done("default ServiceAccount exists")

	if err := s.procs.start(ctx, procSpec{name: "serve-external", netns: s.cfg.nsExternal(), restart: true,
		argv: []string{s.cfg.Executable, "lab", "serve", "--name", "external"}}); err != nil {
		return &componentError{"serve-external", l.Log("serve-external"), err}
	}

	if s.cfg.realNodes() {
		if err := s.buildImages(ctx); err != nil {
			return err
		}
		if s.cfg.kubeProxy() {
			if err := s.deployKubeProxy(ctx); err != nil {
				return err
			}
		}
	}
	errc := make(chan error, len(s.cfg.Nodes))
	for _, n := range s.cfg.Nodes {
		go func() { errc <- s.addNode(ctx, n) }()
	}
	for range s.cfg.Nodes {
		if err := <-errc; err != nil {
			return err
		}
	}
	if err := s.waitNodesReady(ctx, s.cfg.Nodes, 120*time.Second); err != nil {
		return err
	}
	if s.cfg.kubeProxy() {
		s.progress.step(fmt.Sprintf("waiting for kube-proxy (%s) on %d nodes to sync its rules", s.cfg.KubeProxy, len(s.cfg.Nodes)))
		start := time.Now()
		if err := s.waitKubeProxySynced(ctx, s.cfg.Nodes, time.Time{}, 60*time.Second); err != nil {
			return err
		}
		s.progress.done(fmt.Sprintf("kube-proxy synced on every node in %.1fs", time.Since(start).Seconds()))
	}
	if s.cfg.realNodes() {
		if err := s.deployClusterDNS(ctx); err != nil {
			return err
		}
	}
	if err := s.ensurePods(ctx); err != nil {
		return err
	}
	if s.cfg.PodsPerNode == 0 {
		// The lab's Services select its test pods: without pods they
		// would never have a ready endpoint.
		return nil
	}
	return s.ensureServices(ctx)
}

type waitMode int

const (
	waitPlain waitMode = iota
	waitLabCA
	waitInsecure
)

func (s *supervisor) startAndWait(ctx context.Context, spec procSpec, url string, mode waitMode, timeout time.Duration) error {
	l := s.cfg.layout()
	s.progress.step(fmt.Sprintf("starting %s in netns %s, waiting for %s", spec.name, spec.netns, url))
	start := time.Now()
	if err := s.procs.start(ctx, spec); err != nil {
		return &componentError{spec.name, l.Log(spec.name), err}
	}
	if err := s.waitHTTP(ctx, spec.name, spec.netns, url, mode, timeout); err != nil {
		return &componentError{spec.name, l.Log(spec.name), err}
	}
	s.progress.done(fmt.Sprintf("%s ready in %.1fs", spec.name, time.Since(start).Seconds()))
	return nil
}

func (s *supervisor) waitDefaultSA(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		_, err := s.admin.ServiceAccounts(podNamespace).Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("default service account: %w (last: %v)", ctx.Err(), err)
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// addNode creates a node: its namespace on the underlay, credentials, the
// CNI plugin installed by `sinabro install`, the kubelet stand-in and the
// agent.
func (s *supervisor) addNode(ctx context.Context, name string) error {
	l := s.cfg.layout()
	fail := func(component string, err error) error {
		return &componentError{component, l.Log(component), fmt.Errorf("%s: %w", name, err)}
	}
	s.mu.Lock()
	_, exists := s.nodes[name]
	s.mu.Unlock()
	if exists {
		return nil
	}
	addr, err := s.cfg.nodeAddr(name)
	if err != nil {
		return err
	}
	s.progress.step(fmt.Sprintf("%s: netns %s, underlay %s", name, s.cfg.NodeNetns(name), addr))
	if err := s.cfg.attachHost(s.cfg.NodeNetns(name), "u-"+name, netip.PrefixFrom(addr, s.cfg.underlayPrefix().Bits())); err != nil {
		return fail("supervisor", err)
	}
	if err := setSysctl(s.cfg.NodeNetns(name), "net/ipv4/ip_forward", "1"); err != nil {
		return fail("supervisor", err)
	}
	if err := setDefaultRoute(s.cfg.NodeNetns(name), s.cfg.routerAddr()); err != nil {
		return fail("supervisor", err)
	}

	// Credentials: a node client cert for the kubelet stand-in, a bound
	// service-account token for the agent.
	pki := l.PKI()
	ca, err := loadOrCreateCA(pki)
	if err != nil {
		return fail("supervisor", err)
	}
	user := "node-" + name
	if err := ca.issue(filepath.Join(pki, user+".crt"), filepath.Join(pki, user+".key"),
		certSpec{commonName: "system:node:" + name, orgs: []string{"system:nodes"}}); err != nil {
		return fail("supervisor", err)
	}
	if s.cfg.realNodes() {
		kc := filepath.Join(l.Node(name), "kubelet.kubeconfig")
		if err := (kubeconfig{server: s.cfg.apiserverURL(), caFile: filepath.Join(pki, "ca.crt"), user: user,
			certFile: filepath.Join(pki, user+".crt"), keyFile: filepath.Join(pki, user+".key")}).write(kc); err != nil {
			return fail("supervisor", err)
		}
		return s.addRealNode(ctx, name, addr, kc)
	}
	token, err := agentToken(ctx, s.admin, s.sa.saNamespace, s.sa.saName)
	if err != nil {
		return fail("supervisor", err)
	}
	agentKC := filepath.Join(l.Node(name), "agent.kubeconfig")
	if err := (kubeconfig{server: s.cfg.apiserverURL(), caFile: filepath.Join(pki, "ca.crt"),
		user: s.sa.saName, token: token}).write(agentKC); err != nil {
		return fail("supervisor", err)
	}

	s.progress.step(fmt.Sprintf("%s: sinabro install into %s", name, l.NodeCNIBin(name)))
	if err := s.install(name); err != nil {
		return fail("install-"+name, err)
	}

	cs, err := s.cfg.clientset(s.cfg.NodeNetns(name), user)
	if err != nil {
		return fail("supervisor", err)
	}
	// Each kubelet stand-in logs to its own file, like a real kubelet; the
	// file stays open for the teardown in removeNode.
	klog, err := os.OpenFile(l.Log("kubelet-"+name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fail("supervisor", err)
	}
	kl, err := newKubelet(s.cfg, name, cs, s.procs, slog.New(slog.NewTextHandler(klog, nil)))
	if err != nil {
		klog.Close()
		return fail("supervisor", err)
	}
	kctx, cancel := context.WithCancel(ctx)
	rt := &nodeRuntime{kubelet: kl, cancel: cancel, done: make(chan struct{})}
	s.mu.Lock()
	s.nodes[name] = rt
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(rt.done)
		if err := kl.run(kctx); err != nil && kctx.Err() == nil {
			s.log.Error("kubelet stand-in stopped", "node", name, "err", err)
		}
	}()

	s.progress.step(fmt.Sprintf("%s: starting sinabro agent (bpf root %s), waiting for it to write %s", name,
		s.cfg.nodeBPFRoot(name), filepath.Join(l.NodeCNIConf(name), "10-sinabro.conflist")))
	if cg := s.cfg.NodePodCgroup(name); cg != "" {
		if err := os.MkdirAll(cg, 0o755); err != nil {
			return fmt.Errorf("create pod cgroup of %s: %w", name, err)
		}
	}
	if err := s.procs.start(ctx, s.agentSpec(name, agentKC)); err != nil {
		return fail("agent-"+name, err)
	}
	if err := s.procs.start(ctx, procSpec{name: "serve-" + name, netns: s.cfg.NodeNetns(name), restart: true,
		argv: []string{s.cfg.Executable, "lab", "serve", "--name", name}}); err != nil {
		return fail("serve-"+name, err)
	}
	if s.cfg.kubeProxy() {
		s.progress.step(fmt.Sprintf("%s: starting kube-proxy (%s mode, config %s)", name, s.cfg.KubeProxy, l.NodeKubeProxyConfig(name)))
		if err := s.cfg.writeKubeProxyConfig(name, addr); err != nil {
			return fail("supervisor", err)
		}
		if err := s.procs.start(ctx, s.cfg.kubeProxySpec(name)); err != nil {
			return fail(kubeProxyName(name), err)
		}
	}
	return nil
}

func (s *supervisor) agentSpec(name, kubeconfig string) procSpec {
	l := s.cfg.layout()
	spec := procSpec{
		name: "agent-" + name, netns: s.cfg.NodeNetns(name), restart: true,
		argv: []string{s.cfg.Executable, "agent",
			"--node-name", name,
			"--kubeconfig", kubeconfig,
			"--cni-conf-dir", l.NodeCNIConf(name),
			"--state-dir", filepath.Join(l.Node(name), "state"),
			"--observe-socket", l.ObserveSocket(name),
			"--bpf-root", s.cfg.nodeBPFRoot(name),
			"--health-addr", agentHealthAddr,
			"--cluster-cidr", s.cfg.ClusterCIDR,
			"--tcp-acceleration", // off by default; `lab check` proves it on every node
		},
	}
	if cg := s.cfg.NodePodCgroup(name); cg != "" {
		spec.argv = append(spec.argv, "--pod-cgroup", cg, "--service-cgroup", s.cfg.NodeCgroup(name))
	}
	spec.argv = append(spec.argv, s.cfg.AgentArgs...)
	return spec
}

// install runs `sinabro install` inside the node's namespace, as the
// DaemonSet's init container would.
func (s *supervisor) install(name string) error {
	l := s.cfg.layout()
	logf, err := os.OpenFile(l.Log("install-"+name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(s.cfg.Executable, "install", "--cni-bin-dir", l.NodeCNIBin(name), "--cni-conf-dir", l.NodeCNIConf(name))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := netns.Do(netns.Path(s.cfg.NodeNetns(name)), cmd.Run); err != nil {
		return fmt.Errorf("sinabro install: %w", err)
	}
	return nil
}

// waitNodesReady waits until every named Node reports Ready, naming the
// agent of the first node still not ready on timeout.
func (s *supervisor) waitNodesReady(ctx context.Context, names []string, timeout time.Duration) error {
	l := s.cfg.layout()
	deadline := time.Now().Add(timeout)
	reported := map[string]bool{}
	for {
		var pending []string
		for _, n := range names {
			node, err := s.admin.Nodes().Get(ctx, n, metav1.GetOptions{})
			if err == nil && nodeReady(node) {
				if !reported[n] {
					if err := s.routePodCIDRs(node); err != nil {
						return &componentError{"supervisor", l.Log("supervisor"), err}
					}
					reported[n] = true
					s.progress.done(fmt.Sprintf("%s Ready: podCIDR %s, agent wrote the CNI config", n, node.Spec.PodCIDR))
				}
				continue
			}
			pending = append(pending, n)
		}
		if len(pending) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			n := pending[0]
			component := "agent-" + n
			if s.cfg.realNodes() {
				component = "kubelet-" + n // the agent's pod logs are the kubelet's node's
			}
			return &componentError{component, l.Log(component),
				fmt.Errorf("node %s not Ready after %s (the agent never wrote %s)", n, timeout, filepath.Join(l.NodeCNIConf(n), "10-sinabro.conflist"))}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// ensurePods creates PodsPerNode test pods per node (unless they exist) and
// waits for them to run.
func (s *supervisor) ensurePods(ctx context.Context) error {
	var want []string
	for _, n := range s.cfg.Nodes {
		for i := 1; i <= s.cfg.PodsPerNode; i++ {
			p := fmt.Sprintf("%s-pod-%d", n, i)
			want = append(want, p)
			if err := createPod(ctx, s.admin, p, n, s.cfg.podRuntime()); err != nil {
				return &componentError{"supervisor", s.cfg.layout().Log("supervisor"), err}
			}
		}
	}
	by := "the kubelet stand-ins"
	if s.cfg.realNodes() {
		by = "the kubelets and containerd"
	}
	s.progress.step(fmt.Sprintf("waiting for %d pods to run (CNI ADD by %s)", len(want), by))
	return s.waitPodsRunning(ctx, want, 120*time.Second)
}

// CreatePod creates a lab test pod bound to node (no scheduler in the lab)
// and its ClusterIP Service (see services.go), unless they exist, for a lab
// of kubelet stand-ins.
func CreatePod(ctx context.Context, cs *kube.Client, name, node string) error {
	return createPod(ctx, cs, name, node, podRuntime{})
}

// podRuntime is what a test pod needs to know of real nodes: the image
// holding the sinabro binary (the test server) and the lab's name, set in
// the pod's environment so `lab check` finds its process (the pod's
// network namespace is the runtime's, not one of the lab's).
type podRuntime struct{ image, lab string }

func (c *Config) podRuntime() podRuntime {
	if !c.realNodes() {
		return podRuntime{}
	}
	return podRuntime{image: images.SinabroRef, lab: c.LabName()}
}

// labPodEnv names a real pod's lab and pod in its environment.
const labPodEnv = "SINABRO_LAB_POD"

func createPod(ctx context.Context, cs *kube.Client, name, node string, rt podRuntime) error {
	if err := createPodService(ctx, cs, name); err != nil {
		return err
	}
	image, command := "sinabro-lab/serve", []string{"sinabro", "lab", "serve"}
	var env []corev1.EnvVar
	if rt.image != "" {
		image, command = rt.image, []string{"/usr/local/bin/sinabro", "lab", "serve", "--name", podNamespace + "/" + name}
		env = []corev1.EnvVar{{Name: labPodEnv, Value: rt.lab + "/" + name}}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: podNamespace, Labels: map[string]string{labelApp: "pod", labelPod: name}},
		Spec: corev1.PodSpec{
			NodeName: node,
			Containers: []corev1.Container{{
				Name: "serve", Image: image, ImagePullPolicy: corev1.PullIfNotPresent,
				Command: command, Env: env,
				Ports: []corev1.ContainerPort{
					{Name: "tcp", ContainerPort: ServeTCPPort, Protocol: corev1.ProtocolTCP},
					{Name: "udp", ContainerPort: ServeUDPPort, Protocol: corev1.ProtocolUDP},
				},
			}},
			AutomountServiceAccountToken:  ptrTo(false),
			TerminationGracePeriodSeconds: ptrTo[int64](1),
		},
	}
	_, err := cs.Pods(podNamespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create pod %s: %w", name, err)
	}
	return nil
}

func (s *supervisor) waitPodsRunning(ctx context.Context, names []string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var pending []string
		for _, n := range names {
			p, err := s.admin.Pods(podNamespace).Get(ctx, n, metav1.GetOptions{})
			if err != nil || p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
				pending = append(pending, n)
			}
		}
		if len(pending) == 0 {
			s.progress.done(fmt.Sprintf("%d pods running", len(names)))
			return nil
		}
		if time.Now().After(deadline) {
			return &componentError{"kubelet stand-ins", s.cfg.layout().Log("kubelet-" + s.cfg.Nodes[0]),
				fmt.Errorf("pods not running after %s: %v (CNI ADD failing? see the kubelet-<node> logs)", timeout, pending)}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// removeNode tears a node down: its pods (CNI DEL), agent, kubelet
// stand-in, Node object, namespace, bpffs root and state.
func (s *supervisor) removeNode(ctx context.Context, name string) error {
	s.mu.Lock()
	rt, ok := s.nodes[name]
	delete(s.nodes, name)
	s.mu.Unlock()
	if ok {
		rt.cancel()
		<-rt.done
		rt.kubelet.shutdown(ctx)
	}
	s.procs.stop("serve-" + name)
	s.procs.stop(kubeProxyName(name))
	s.procs.stop("agent-" + name)
	if s.cfg.realNodes() {
		if err := s.stopRealNode(name); err != nil {
			return err
		}
	}
	zero := int64(0)
	pods, err := s.admin.Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + name})
	if err == nil {
		for _, p := range pods.Items {
			s.admin.Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		}
	}
	if err := s.admin.Nodes().Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete node %s: %w", name, err)
	}
	if err := netns.Delete(s.cfg.NodeNetns(name)); err != nil {
		return err
	}
	os.RemoveAll(s.cfg.nodeBPFRoot(name))
	os.RemoveAll(s.cfg.layout().Node(name))
	s.mu.Lock()
	defer s.mu.Unlock()
	var keep []string
	for _, n := range s.cfg.Nodes {
		if n != name {
			keep = append(keep, n)
		}
	}
	s.cfg.Nodes = keep
	return s.cfg.save()
}

// startProxy forwards the loopback ProxyAddr of the root namespace to the
// apiserver's underlay address, so kubectl on the host can use the admin
// kubeconfig. Only loopback is bound; no route or interface is added.
func (s *supervisor) startProxy(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.ProxyAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", s.cfg.ProxyAddr, err)
	}
	target := netip.AddrPortFrom(s.cfg.controlPlaneAddr(), apiPort).String()
	dial := dialIn(s.cfg.nsControlPlane())
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		<-ctx.Done()
		ln.Close()
	}()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := dial(ctx, "tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				done := make(chan struct{}, 2)
				go func() { io.Copy(u, c); done <- struct{}{} }()
				go func() { io.Copy(c, u); done <- struct{}{} }()
				select {
				case <-done:
				case <-ctx.Done():
				}
			}()
		}
	}()
	return nil
}

// Status is what the supervisor reports on its control socket.
type Status struct {
	Nodes []string    `json:"nodes"`
	Procs []procState `json:"procs"`
}

// serveControl serves the supervisor's API on a unix socket in the lab dir:
// GET /status, POST /nodes/{name}, DELETE /nodes/{name}.
func (s *supervisor) serveControl(ctx context.Context) (io.Closer, error) {
	sock := s.cfg.layout().Socket()
	os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", sock, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		nodes := append([]string(nil), s.cfg.Nodes...)
		s.mu.Unlock()
		sort.Strings(nodes)
		json.NewEncoder(w).Encode(Status{Nodes: nodes, Procs: s.procs.states()})
	})
	mux.HandleFunc("POST /nodes/{name}", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("name")
		if _, err := nodeIndex(name); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		known := false
		for _, n := range s.cfg.Nodes {
			known = known || n == name
		}
		if !known {
			s.cfg.Nodes = append(s.cfg.Nodes, name)
		}
		err := s.cfg.save()
		s.mu.Unlock()
		if err == nil {
			err = s.addNode(ctx, name)
		}
		if err == nil {
			err = s.waitNodesReady(r.Context(), []string{name}, 120*time.Second)
		}
		if err == nil && s.cfg.kubeProxy() {
			err = s.waitKubeProxySynced(r.Context(), []string{name}, time.Time{}, 60*time.Second)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, name)
	})
	mux.HandleFunc("DELETE /nodes/{name}", func(w http.ResponseWriter, r *http.Request) {
		if err := s.removeNode(r.Context(), r.PathValue("name")); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "deleted")
	})
	srv := &http.Server{Handler: mux}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		srv.Serve(ln)
	}()
	return srv, nil
}
