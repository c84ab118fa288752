package agent

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"sync/atomic"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/flows"
	"github.com/sinabro-io/sinabro/pkg/policy"
)

// FlowConfig is flow telemetry's part of the agent's Config.
type FlowConfig struct {
	// Enabled turns the datapath's flow events on (`sinabro observe`).
	Enabled bool
	// FlowRate and DropRate bound the events per second and CPU.
	FlowRate, DropRate uint32
	// Buffer is how many flows the agent keeps for `observe --last`.
	Buffer int
	// Socket is the unix socket `sinabro observe` reads (0600).
	Socket string
}

// flowsController reads the datapath's flow events into the buffer
// `sinabro observe` reads, naming pods, nodes, policies and Services from
// the informers.
type flowsController struct {
	a        *Agent
	pods     cache.SharedIndexInformer // every pod: both ends get names
	nodes    cache.SharedIndexInformer
	services cache.SharedIndexInformer
	coll     atomic.Pointer[flows.Collector] // set once run has it
}

const (
	indexPodIP       = "sinabro-pod-ip"
	indexServiceIP   = "sinabro-service-ip"
	indexNodePort    = "sinabro-nodeport" // "TCP/30080"
	indexNodeAddress = "sinabro-node-address"
)

func newFlowsController(a *Agent, inf *informers) (*flowsController, error) {
	c := &flowsController{a: a, pods: inf.AllPods(), nodes: inf.Nodes(), services: inf.Services()}
	if err := c.pods.AddIndexers(cache.Indexers{indexPodIP: func(obj any) ([]string, error) {
		p, ok := obj.(*corev1.Pod)
		if !ok || p.Spec.HostNetwork {
			return nil, nil
		}
		var out []string
		for _, ip := range p.Status.PodIPs {
			out = append(out, ip.IP)
		}
		return out, nil
	}}); err != nil {
		return nil, fmt.Errorf("index pods by address: %w", err)
	}
	if err := c.services.AddIndexers(cache.Indexers{indexServiceIP: func(obj any) ([]string, error) {
		s, ok := obj.(*corev1.Service)
		if !ok {
			return nil, nil
		}
		out := append([]string{}, s.Spec.ClusterIPs...)
		out = append(out, s.Spec.ExternalIPs...)
		for _, in := range s.Status.LoadBalancer.Ingress {
			out = append(out, in.IP)
		}
		return out, nil
	}, indexNodePort: func(obj any) ([]string, error) {
		s, ok := obj.(*corev1.Service)
		if !ok {
			return nil, nil
		}
		var out []string
		for _, p := range s.Spec.Ports {
			if p.NodePort != 0 {
				out = append(out, fmt.Sprintf("%s/%d", p.Protocol, p.NodePort))
			}
		}
		return out, nil
	}}); err != nil {
		return nil, fmt.Errorf("index services by address: %w", err)
	}
	if err := c.nodes.AddIndexers(cache.Indexers{indexNodeAddress: func(obj any) ([]string, error) {
		n, ok := obj.(*corev1.Node)
		if !ok {
			return nil, nil
		}
		var out []string
		for _, a := range n.Status.Addresses {
			out = append(out, a.Address)
		}
		if v := n.Annotations[AnnotationVTEPIP]; v != "" {
			out = append(out, v)
		}
		return out, nil
	}}); err != nil {
		return nil, fmt.Errorf("index nodes by address: %w", err)
	}
	// A deleted pod's series leave /metrics with it.
	if _, err := c.pods.AddEventHandler(cache.ResourceEventHandlerFuncs{DeleteFunc: func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		if p, ok := obj.(*corev1.Pod); ok {
			if coll := c.coll.Load(); coll != nil {
				coll.ForgetPod(p.Namespace, p.Name)
			}
		}
	}}); err != nil {
		return nil, fmt.Errorf("add event handler: %w", err)
	}
	return c, nil
}

// run opens the shared maps, turns events on and reads them
// until ctx ends. It fails alone: without telemetry the datapath runs on.
func (c *flowsController) run(ctx context.Context) error {
	cfg, log := c.a.cfg.Flows, c.a.log.With("controller", "flows")
	if err := bpffs.Ensure(c.a.cfg.BPFRoot); err != nil {
		log.Error("flow telemetry unavailable", "err", err)
		return nil
	}
	maps, err := datapath.FlowMaps(c.a.cfg.BPFRoot)
	if err != nil {
		log.Error("flow telemetry unavailable", "err", err)
		return nil
	}
	defer func() {
		for _, m := range maps {
			m.Close()
		}
	}()
	if err := flows.Configure(maps["sb_flow_cfg"], flows.Settings{Enabled: true, FlowRate: cfg.FlowRate, DropRate: cfg.DropRate}); err != nil {
		log.Error("flow telemetry unavailable", "err", err)
		return nil
	}
	progs, reasons, err := datapath.FlowNames()
	if err != nil {
		log.Error("flow telemetry unavailable", "err", err)
		return nil
	}
	buf := flows.NewBuffer(cfg.Buffer)
	coll, err := flows.NewCollector(c.a.cfg.NodeName, maps, flows.Names{Programs: progs, Reasons: reasons}, c, c.local, buf, log)
	if err != nil {
		log.Error("flow telemetry unavailable", "err", err)
		return nil
	}
	c.coll.Store(coll)
	if err := c.a.metrics.registry.Register(coll); err != nil {
		log.Warn("flow metrics not on /metrics", "err", err)
	}
	go func() {
		if err := flows.Serve(ctx, cfg.Socket, buf, log); err != nil {
			log.Error("`sinabro observe` cannot reach this agent", "err", err)
		}
	}()
	log.Info("flow telemetry on", "flowRate", cfg.FlowRate, "dropRate", cfg.DropRate, "buffer", cfg.Buffer)
	if err := coll.Run(ctx); err != nil {
		log.Error("flow telemetry stopped", "err", err)
	}
	return nil
}

// local tells whether the pod runs on this node (pod labels on metrics).
func (c *flowsController) local(ns, name string) bool {
	obj, ok, _ := c.pods.GetIndexer().GetByKey(ns + "/" + name)
	p, _ := obj.(*corev1.Pod)
	return ok && p != nil && p.Spec.NodeName == c.a.cfg.NodeName
}

// Pod, Node, Rule, Policy and Service make the controller a flows.Namer.
func (c *flowsController) Pod(ip netip.Addr) (string, string) {
	objs, _ := c.pods.GetIndexer().ByIndex(indexPodIP, ip.String())
	for _, obj := range objs {
		if p, ok := obj.(*corev1.Pod); ok && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			return p.Namespace, p.Name
		}
	}
	return "", ""
}

func (c *flowsController) Node(ip netip.Addr) string {
	objs, _ := c.nodes.GetIndexer().ByIndex(indexNodeAddress, ip.String())
	for _, obj := range objs {
		if n, ok := obj.(*corev1.Node); ok {
			return n.Name
		}
	}
	return ""
}

func (c *flowsController) meta() *policy.Meta {
	if c.a.policy == nil {
		return nil
	}
	c.a.policy.mu.Lock()
	defer c.a.policy.mu.Unlock()
	return c.a.policy.meta
}

func (c *flowsController) Rule(id uint32) (string, string) {
	m := c.meta()
	if m == nil {
		return "", ""
	}
	r, ok := m.Rules[id]
	if !ok {
		return "", "rule " + strconv.FormatUint(uint64(id), 10)
	}
	if id == policy.HostRule {
		return "", r.Text
	}
	p := m.Policies[r.Policy]
	return p.String(), fmt.Sprintf("%s rule %d", r.Dir, r.Index)
}

func (c *flowsController) Policy(id uint32) string {
	if m := c.meta(); m != nil {
		if p, ok := m.Policies[id]; ok {
			return p.String()
		}
	}
	return ""
}

func (c *flowsController) Service(ip netip.Addr, port uint16, protocol string) string {
	objs, _ := c.services.GetIndexer().ByIndex(indexServiceIP, ip.String())
	for _, obj := range objs {
		s, ok := obj.(*corev1.Service)
		if !ok {
			continue
		}
		for _, p := range s.Spec.Ports {
			if uint16(p.Port) == port && string(p.Protocol) == protocol {
				return s.Namespace + "/" + s.Name
			}
		}
	}
	if c.Node(ip) != "" { // a NodePort
		objs, _ := c.services.GetIndexer().ByIndex(indexNodePort, fmt.Sprintf("%s/%d", protocol, port))
		for _, obj := range objs {
			if s, ok := obj.(*corev1.Service); ok {
				return s.Namespace + "/" + s.Name
			}
		}
	}
	return ""
}

// flowsOff switches the datapath's events off (--flow-telemetry=false):
// the pinned settings of an earlier run may have them on.
func (a *Agent) flowsOff() {
	err := bpffs.Ensure(a.cfg.BPFRoot)
	var maps map[string]*ebpf.Map
	if err == nil {
		maps, err = datapath.FlowMaps(a.cfg.BPFRoot)
	}
	if err == nil {
		err = flows.Configure(maps["sb_flow_cfg"], flows.Settings{})
		for _, m := range maps {
			m.Close()
		}
	}
	if err != nil {
		a.log.Warn("switch flow telemetry off", "err", err)
		return
	}
	a.log.Info("flow telemetry is off (--flow-telemetry=false)")
}
