package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	ktypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"

	"github.com/sinabro-io/sinabro/pkg/atomicfile"
	"github.com/sinabro-io/sinabro/pkg/cni"
	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// kubelet stands in for the kubelet and container runtime of one lab node:
// it registers the Node, renews its lease, reports it Ready once the agent
// wrote the CNI config, and runs the node's pods as network namespaces with
// a test server, wired through libcni exactly as containerd does.
type kubelet struct {
	cfg   *Config
	node  string
	addr  netip.Addr
	cs    *kube.Client
	procs *procs
	log   *slog.Logger

	binDir, confDir, cacheDir, podsDir string

	kick  chan struct{}
	mu    sync.Mutex
	ready bool
}

// sandbox is the stand-in's record of a pod it wired, kept on disk so a
// restarted supervisor can still tear it down.
type sandbox struct {
	Namespace   string   `json:"namespace"`
	Name        string   `json:"name"`
	UID         string   `json:"uid"`
	Netns       string   `json:"netns"`
	ContainerID string   `json:"containerID"`
	IPs         []string `json:"ips,omitempty"`
	Wired       bool     `json:"wired"`
}

func newKubelet(cfg *Config, node string, cs *kube.Client, p *procs, log *slog.Logger) (*kubelet, error) {
	addr, err := cfg.nodeAddr(node)
	if err != nil {
		return nil, err
	}
	l := cfg.layout()
	return &kubelet{
		cfg: cfg, node: node, addr: addr, cs: cs, procs: p, log: log.With("node", node),
		binDir:   l.NodeCNIBin(node),
		confDir:  l.NodeCNIConf(node),
		cacheDir: filepath.Join(l.Node(node), "cni", "cache"),
		podsDir:  filepath.Join(l.Node(node), "pods"),
		kick:     make(chan struct{}, 1),
	}, nil
}

func (k *kubelet) conflist() string { return filepath.Join(k.confDir, cni.ConfListName) }

func (k *kubelet) trigger() {
	select {
	case k.kick <- struct{}{}:
	default:
	}
}

// run registers the node and serves until ctx ends.
func (k *kubelet) run(ctx context.Context) error {
	if err := k.register(ctx); err != nil {
		return err
	}
	podInf := k.cs.Pods("").Informer(ctx, 0, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.node).String()
	})
	podInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { k.trigger() },
		UpdateFunc: func(any, any) { k.trigger() },
		DeleteFunc: func(any) { k.trigger() },
	})
	var informerDone sync.WaitGroup
	informerDone.Add(1)
	go func() { defer informerDone.Done(); podInf.Run(ctx.Done()) }()
	defer informerDone.Wait() // the informer stops with ctx
	if !cache.WaitForCacheSync(ctx.Done(), podInf.HasSynced) {
		return ctx.Err()
	}

	heartbeat := time.NewTicker(10 * time.Second)
	defer heartbeat.Stop()
	netPoll := time.NewTicker(500 * time.Millisecond)
	defer netPoll.Stop()
	k.heartbeat(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-heartbeat.C:
			k.heartbeat(ctx)
			k.trigger()
		case <-netPoll.C:
			// The Node turns Ready as soon as the agent wrote its conflist
			// (and the plugin answers STATUS), and NotReady when it is gone.
			if ready := k.isReady(); !ready && k.networkReady(ctx) == nil || ready && !fileExists(k.conflist()) {
				k.heartbeat(ctx)
				k.trigger()
			}
		case <-k.kick:
			k.syncPods(ctx, podInf.GetStore())
		}
	}
}

func (k *kubelet) isReady() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.ready
}

// register creates the Node as a kubelet would: InternalIP is the
// underlay address, the pod CIDR is left to the controller manager.
func (k *kubelet) register(ctx context.Context) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: k.node,
			Labels: map[string]string{
				"kubernetes.io/hostname": k.node, "kubernetes.io/os": "linux",
				"kubernetes.io/arch": runtime.GOARCH, labelApp: "node",
			},
		},
	}
	for {
		_, err := k.cs.Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err == nil || apierrors.IsAlreadyExists(err) {
			return nil
		}
		k.log.Warn("register node", "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// heartbeat renews the node lease and writes the node status.
func (k *kubelet) heartbeat(ctx context.Context) {
	netErr := k.networkReady(ctx)
	ready := netErr == nil
	if err := k.updateNodeStatus(ctx, netErr); err != nil {
		k.log.Warn("update node status", "err", err)
	} else {
		k.mu.Lock()
		k.ready = ready
		k.mu.Unlock()
	}
	if err := k.renewLease(ctx); err != nil {
		k.log.Warn("renew node lease", "err", err)
	}
}

// networkReady is the runtime's network status as containerd derives it:
// a loadable CNI config whose plugin answers STATUS (CNI ≥ 1.1.0).
func (k *kubelet) networkReady(ctx context.Context) error {
	list, err := libcni.ConfListFromFile(k.conflist())
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("sinabro agent has not written %s yet", cni.ConfListName)
		}
		return fmt.Errorf("load %s: %w", k.conflist(), err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return netns.Do(netns.Path(k.cfg.NodeNetns(k.node)), func() error {
		if err := k.cniConfig().GetStatusNetworkList(ctx, list); err != nil {
			return fmt.Errorf("CNI STATUS: %w", err)
		}
		return nil
	})
}

func (k *kubelet) updateNodeStatus(ctx context.Context, netErr error) error {
	ready := netErr == nil
	node, err := k.cs.Nodes().Get(ctx, k.node, metav1.GetOptions{})
	if err != nil {
		return err
	}
	now := metav1.Now()
	cond := corev1.NodeCondition{
		Type: corev1.NodeReady, Status: corev1.ConditionFalse, LastHeartbeatTime: now,
		Reason: "NetworkPluginNotReady", Message: fmt.Sprint(netErr),
	}
	if ready {
		cond.Status, cond.Reason, cond.Message = corev1.ConditionTrue, "KubeletReady", "sinabro lab kubelet stand-in is ready"
	}
	cond.LastTransitionTime = now
	conds := []corev1.NodeCondition{cond}
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady {
			if c.Status == cond.Status {
				conds[0].LastTransitionTime = c.LastTransitionTime
			}
			continue
		}
		conds = append(conds, c)
	}
	node.Status.Conditions = conds
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: k.addr.String()},
		{Type: corev1.NodeHostName, Address: k.node},
	}
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("2"),
		corev1.ResourceMemory: resource.MustParse("4Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	node.Status.Capacity, node.Status.Allocatable = capacity, capacity
	node.Status.NodeInfo = corev1.NodeSystemInfo{
		KubeletVersion: "v1.34.4-sinabro-lab", OperatingSystem: "linux", Architecture: runtime.GOARCH,
		ContainerRuntimeVersion: "sinabro-lab://1",
	}
	_, err = k.cs.Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

func (k *kubelet) renewLease(ctx context.Context) error {
	leases := k.cs.Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	dur := int32(40)
	l, err := leases.Get(ctx, k.node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		node, err := k.cs.Nodes().Get(ctx, k.node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: k.node, OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
			}}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &k.node, LeaseDurationSeconds: &dur, RenewTime: &now},
		}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	l.Spec.RenewTime = &now
	_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	return err
}

// syncPods converges the node's sandboxes to its pods.
func (k *kubelet) syncPods(ctx context.Context, store cache.Store) {
	pods := map[string]*corev1.Pod{}
	for _, o := range store.List() {
		p := o.(*corev1.Pod)
		pods[string(p.UID)] = p
	}
	records := k.loadSandboxes()
	// Tear down what no live pod wants any more.
	for uid, sb := range records {
		p, ok := pods[uid]
		if ok && p.DeletionTimestamp == nil {
			continue
		}
		if err := k.teardown(ctx, sb); err != nil {
			k.log.Warn("tear down pod", "pod", sb.Namespace+"/"+sb.Name, "err", err)
			continue
		}
		delete(records, uid)
	}
	for uid, p := range pods {
		if p.DeletionTimestamp != nil {
			if _, wired := records[uid]; !wired {
				k.finalize(ctx, p)
			}
			continue
		}
		if p.Spec.HostNetwork {
			// No sandbox namespace and no CNI for host-network pods: they
			// share the node's namespace and address.
			if p.Status.Phase != corev1.PodRunning {
				sb := &sandbox{UID: uid, ContainerID: strings.ReplaceAll(uid, "-", ""), IPs: []string{k.addr.String()}}
				if err := k.reportRunning(ctx, p, sb); err != nil {
					k.log.Warn("report pod status", "pod", p.Namespace+"/"+p.Name, "err", err)
				}
			}
			continue
		}
		if !k.isReady() {
			continue // no CNI config yet: pods wait, as with a real kubelet
		}
		sb := records[uid]
		if sb == nil || !sb.Wired {
			var err error
			if sb, err = k.setup(ctx, p); err != nil {
				k.log.Warn("set up pod", "pod", p.Namespace+"/"+p.Name, "err", err)
				continue
			}
		}
		if err := k.startServer(ctx, sb); err != nil {
			k.log.Warn("start pod server", "pod", p.Namespace+"/"+p.Name, "err", err)
			continue
		}
		if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			if err := k.reportRunning(ctx, p, sb); err != nil {
				k.log.Warn("report pod status", "pod", p.Namespace+"/"+p.Name, "err", err)
			}
		}
	}
}

func (k *kubelet) recordPath(uid string) string { return filepath.Join(k.podsDir, uid+".json") }

func (k *kubelet) loadSandboxes() map[string]*sandbox {
	out := map[string]*sandbox{}
	files, _ := filepath.Glob(filepath.Join(k.podsDir, "*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var sb sandbox
		if json.Unmarshal(b, &sb) == nil && sb.UID != "" {
			out[sb.UID] = &sb
		}
	}
	return out
}

func (k *kubelet) saveSandbox(sb *sandbox) error {
	b, err := json.Marshal(sb)
	if err != nil {
		return err
	}
	return atomicfile.Write(k.recordPath(sb.UID), b, 0o644)
}

func (k *kubelet) cniConfig() *libcni.CNIConfig {
	return libcni.NewCNIConfigWithCacheDir([]string{k.binDir}, k.cacheDir, nil)
}

func (k *kubelet) runtimeConf(sb *sandbox) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: sb.ContainerID,
		NetNS:       netns.Path(sb.Netns),
		IfName:      "eth0",
		// The CNI_ARGS containerd passes for a Kubernetes pod.
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", sb.Namespace},
			{"K8S_POD_NAME", sb.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", sb.ContainerID},
			{"K8S_POD_UID", sb.UID},
		},
	}
}

// setup creates the pod's namespace and runs CNI ADD from the node's netns.
func (k *kubelet) setup(ctx context.Context, p *corev1.Pod) (*sandbox, error) {
	uid := string(p.UID)
	sb := &sandbox{
		Namespace: p.Namespace, Name: p.Name, UID: uid, Netns: k.cfg.PodNetns(uid),
		ContainerID: strings.ReplaceAll(uid, "-", ""),
	}
	// The record goes first, so a crash between here and ADD leaves
	// something `lab down` or the next sync can clean.
	if err := k.saveSandbox(sb); err != nil {
		return nil, err
	}
	if err := ensureNetns(sb.Netns); err != nil {
		return nil, err
	}
	list, err := libcni.ConfListFromFile(k.conflist())
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", k.conflist(), err)
	}
	addCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var res100 *types100.Result
	err = netns.Do(netns.Path(k.cfg.NodeNetns(k.node)), func() error {
		res, err := k.cniConfig().AddNetworkList(addCtx, list, k.runtimeConf(sb))
		if err != nil {
			return err
		}
		res100, err = types100.NewResultFromResult(res)
		return err
	})
	if err != nil {
		// As containerd does: a failed ADD is followed by a DEL so a retry
		// starts clean.
		netns.Do(netns.Path(k.cfg.NodeNetns(k.node)), func() error {
			return k.cniConfig().DelNetworkList(ctx, list, k.runtimeConf(sb))
		})
		return nil, fmt.Errorf("CNI ADD for %s/%s: %w", p.Namespace, p.Name, err)
	}
	for _, ip := range res100.IPs {
		sb.IPs = append(sb.IPs, ip.Address.IP.String())
	}
	if len(sb.IPs) == 0 {
		return nil, fmt.Errorf("CNI ADD for %s/%s returned no IP", p.Namespace, p.Name)
	}
	sb.Wired = true
	if err := k.saveSandbox(sb); err != nil {
		return nil, err
	}
	k.log.Info("pod wired", "pod", p.Namespace+"/"+p.Name, "ips", sb.IPs, "netns", sb.Netns)
	return sb, nil
}

func serverProcName(sb *sandbox) string { return "pod-" + sb.Namespace + "-" + sb.Name }

func (k *kubelet) startServer(ctx context.Context, sb *sandbox) error {
	exe := k.cfg.Executable
	return k.procs.start(ctx, procSpec{
		name: serverProcName(sb), netns: sb.Netns, restart: true, cgroup: k.cfg.NodePodCgroup(k.node),
		argv: []string{exe, "lab", "serve", "--name", sb.Namespace + "/" + sb.Name},
	})
}

// teardown stops the pod's server, runs CNI DEL and removes its namespace.
func (k *kubelet) teardown(ctx context.Context, sb *sandbox) error {
	k.procs.stop(serverProcName(sb))
	if list, err := libcni.ConfListFromFile(k.conflist()); err == nil {
		delCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		err := netns.Do(netns.Path(k.cfg.NodeNetns(k.node)), func() error {
			return k.cniConfig().DelNetworkList(delCtx, list, k.runtimeConf(sb))
		})
		if err != nil {
			return fmt.Errorf("CNI DEL for %s/%s: %w", sb.Namespace, sb.Name, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		k.log.Warn("no CNI config for DEL", "pod", sb.Namespace+"/"+sb.Name, "err", err)
	}
	if err := netns.Delete(sb.Netns); err != nil {
		return err
	}
	if err := os.Remove(k.recordPath(sb.UID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	k.log.Info("pod torn down", "pod", sb.Namespace+"/"+sb.Name, "netns", sb.Netns)
	k.finalizeByName(ctx, sb.Namespace, sb.Name, sb.UID)
	return nil
}

// finalize deletes a terminating pod for good, as the kubelet does once its
// containers and sandbox are gone.
func (k *kubelet) finalize(ctx context.Context, p *corev1.Pod) {
	k.finalizeByName(ctx, p.Namespace, p.Name, string(p.UID))
}

func (k *kubelet) finalizeByName(ctx context.Context, ns, name, uid string) {
	zero := int64(0)
	u := ktypes.UID(uid)
	err := k.cs.Pods(ns).Delete(ctx, name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &u},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		k.log.Warn("finalize pod", "pod", ns+"/"+name, "err", err)
	}
}

func (k *kubelet) reportRunning(ctx context.Context, p *corev1.Pod, sb *sandbox) error {
	p = p.DeepCopy()
	now := metav1.Now()
	st := &p.Status
	st.Phase = corev1.PodRunning
	st.HostIP = k.addr.String()
	st.HostIPs = []corev1.HostIP{{IP: k.addr.String()}}
	st.PodIP = sb.IPs[0]
	st.PodIPs = nil
	for _, ip := range sb.IPs {
		st.PodIPs = append(st.PodIPs, corev1.PodIP{IP: ip})
	}
	if st.StartTime == nil {
		st.StartTime = &now
	}
	st.Conditions = nil
	for _, t := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.PodReadyToStartContainers, corev1.ContainersReady, corev1.PodReady} {
		st.Conditions = append(st.Conditions, corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now})
	}
	st.ContainerStatuses = nil
	for _, c := range p.Spec.Containers {
		st.ContainerStatuses = append(st.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Ready: true, Started: ptrTo(true), Image: c.Image, ImageID: c.Image,
			ContainerID: "sinabro-lab://" + sb.ContainerID,
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	_, err := k.cs.Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	return err
}

// shutdown tears down every sandbox of the node (used by `lab node delete`).
func (k *kubelet) shutdown(ctx context.Context) {
	for _, sb := range k.loadSandboxes() {
		if err := k.teardown(ctx, sb); err != nil {
			// The node goes away regardless: drop the namespace anyway.
			k.log.Warn("tear down pod, removing its netns anyway", "pod", sb.Namespace+"/"+sb.Name, "err", err)
			netns.Delete(sb.Netns)
			os.Remove(k.recordPath(sb.UID))
		}
	}
}

func ptrTo[T any](v T) *T { return &v }
