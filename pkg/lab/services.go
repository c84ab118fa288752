package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sinabro-io/sinabro/pkg/kube"
	"github.com/sinabro-io/sinabro/pkg/netns"
	"github.com/sinabro-io/sinabro/pkg/service"
)

// The lab's Services, all in podNamespace and labelled labelApp=service:
//   - svc-<pod>: a ClusterIP per test pod, selecting only that pod, so a
//     probe can pick a backend on its own node or on another one;
//   - svc-external: no selector, one manual EndpointSlice whose only
//     endpoint is the external host (a Service backed outside the cluster);
//   - svc-nodeport, svc-nodeport-local: NodePort over every test pod, with
//     externalTrafficPolicy Cluster and Local.
//
// Each exposes the test server's TCP and UDP ports as servicePort (both
// protocols on one port number; the targets differ).
const (
	servicePort        = 80
	svcExternal        = "svc-external"
	svcNodePort        = "svc-nodeport"
	svcNodePortLocal   = "svc-nodeport-local"
	labelPod           = "lab.sinabro.io/pod" // on each test pod: its name, for svc-<pod>
	endpointSliceOwner = "sinabro-lab"
)

// podServiceName names the ClusterIP Service of one test pod.
func podServiceName(pod string) string { return "svc-" + pod }

func servicePorts() []corev1.ServicePort {
	return []corev1.ServicePort{
		{Name: "tcp", Protocol: corev1.ProtocolTCP, Port: servicePort, TargetPort: intstr.FromInt32(ServeTCPPort)},
		{Name: "udp", Protocol: corev1.ProtocolUDP, Port: servicePort, TargetPort: intstr.FromInt32(ServeUDPPort)},
	}
}

func labService(name string, selector map[string]string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: podNamespace, Labels: map[string]string{labelApp: "service"}},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, Selector: selector, Ports: servicePorts()},
	}
}

func createService(ctx context.Context, cs *kube.Client, svc *corev1.Service) error {
	_, err := cs.Services(podNamespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create service %s: %w", svc.Name, err)
	}
	return nil
}

// createPodService creates the ClusterIP Service of one test pod.
func createPodService(ctx context.Context, cs *kube.Client, pod string) error {
	return createService(ctx, cs, labService(podServiceName(pod), map[string]string{labelPod: pod}))
}

// ensureSharedServices creates the external-endpoint and NodePort Services
// (unless they exist).
func (c *Config) ensureSharedServices(ctx context.Context, cs *kube.Client) error {
	if err := createService(ctx, cs, labService(svcExternal, nil)); err != nil {
		return err
	}
	ext := c.externalAddr().String()
	ready := true
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: svcExternal, Namespace: podNamespace, Labels: map[string]string{
			discoveryv1.LabelServiceName: svcExternal,
			discoveryv1.LabelManagedBy:   endpointSliceOwner,
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{ext}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
		Ports: []discoveryv1.EndpointPort{
			{Name: ptrTo("tcp"), Protocol: ptrTo(corev1.ProtocolTCP), Port: ptrTo[int32](ServeTCPPort)},
			{Name: ptrTo("udp"), Protocol: ptrTo(corev1.ProtocolUDP), Port: ptrTo[int32](ServeUDPPort)},
		},
	}
	if _, err := cs.EndpointSlices(podNamespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create endpointslice %s: %w", svcExternal, err)
	}
	for _, np := range []struct {
		name   string
		policy corev1.ServiceExternalTrafficPolicy
	}{{svcNodePort, corev1.ServiceExternalTrafficPolicyCluster}, {svcNodePortLocal, corev1.ServiceExternalTrafficPolicyLocal}} {
		svc := labService(np.name, map[string]string{labelApp: "pod"})
		svc.Spec.Type = corev1.ServiceTypeNodePort
		svc.Spec.ExternalTrafficPolicy = np.policy
		if err := createService(ctx, cs, svc); err != nil {
			return err
		}
	}
	return nil
}

// labServices returns the lab's Services by name.
func labServices(ctx context.Context, cs *kube.Client) (map[string]*corev1.Service, error) {
	list, err := cs.Services(podNamespace).List(ctx, metav1.ListOptions{LabelSelector: labelApp + "=service"})
	if err != nil {
		return nil, fmt.Errorf("list services: %w", err)
	}
	out := map[string]*corev1.Service{}
	for i := range list.Items {
		out[list.Items[i].Name] = &list.Items[i]
	}
	return out, nil
}

// nodePorts returns a Service's TCP and UDP node ports.
func nodePorts(svc *corev1.Service) (tcp, udp int) {
	for _, p := range svc.Spec.Ports {
		switch p.Protocol {
		case corev1.ProtocolTCP:
			tcp = int(p.NodePort)
		case corev1.ProtocolUDP:
			udp = int(p.NodePort)
		}
	}
	return tcp, udp
}

// ensureServices creates the Services and waits until every node's
// kube-proxy has programmed them as the API has them.
func (s *supervisor) ensureServices(ctx context.Context) error {
	l := s.cfg.layout()
	s.progress.step(fmt.Sprintf("creating Services (a ClusterIP per pod, %s, %s, %s); waiting for %s to program them on %d nodes",
		svcExternal, svcNodePort, svcNodePortLocal, s.cfg.servicesBy(), len(s.cfg.Nodes)))
	start := time.Now()
	if err := s.cfg.ensureSharedServices(ctx, s.admin); err != nil {
		return &componentError{"supervisor", l.Log("supervisor"), err}
	}
	deadline := time.Now().Add(60 * time.Second)
	// Every Service gets its ClusterIP and ready endpoints first.
	for {
		want, err := desiredServiceRules(ctx, s.admin)
		if err == nil && len(want.empty) == 0 {
			break
		}
		if err == nil {
			err = fmt.Errorf("services without a ready endpoint: %s", strings.Join(want.empty, ", "))
		}
		if time.Now().After(deadline) {
			return &componentError{"kube-controller-manager", l.Log("kube-controller-manager"), err}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
	for _, n := range s.cfg.Nodes {
		if err := waitServicesProgrammed(ctx, s.admin, s.cfg, n, time.Until(deadline)); err != nil {
			name, log := s.cfg.kubeProxyLog(n)
			if !s.cfg.kubeProxy() {
				name, log = "agent-"+n, l.Log("agent-"+n)
			}
			return &componentError{name, log, err}
		}
	}
	s.progress.done(fmt.Sprintf("Services programmed by %s on every node in %.1fs", s.cfg.servicesBy(), time.Since(start).Seconds()))
	return nil
}

// serviceRules is what kube-proxy's rules hold for the lab's Services once
// it has caught up with the API: the ClusterIP of each Service with a ready
// endpoint, and each ready endpoint as ip:port — both iptables-save and nft
// print DNAT targets so, and only lab Services target the test server's
// ports.
type serviceRules struct {
	clusterIPs []string
	endpoints  map[string]bool
	empty      []string // Services without ClusterIP or ready endpoint
}

func desiredServiceRules(ctx context.Context, cs *kube.Client) (*serviceRules, error) {
	svcs, err := labServices(ctx, cs)
	if err != nil {
		return nil, err
	}
	slices, err := cs.EndpointSlices(podNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list endpointslices: %w", err)
	}
	ready := map[string][]string{} // service → ready endpoint addresses
	for _, sl := range slices.Items {
		svc := sl.Labels[discoveryv1.LabelServiceName]
		for _, e := range sl.Endpoints {
			if e.Conditions.Ready == nil || *e.Conditions.Ready {
				ready[svc] = append(ready[svc], e.Addresses...)
			}
		}
	}
	out := &serviceRules{endpoints: map[string]bool{}}
	for name, svc := range svcs {
		if svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == corev1.ClusterIPNone || len(ready[name]) == 0 {
			out.empty = append(out.empty, name)
			continue
		}
		out.clusterIPs = append(out.clusterIPs, svc.Spec.ClusterIP)
		for _, a := range ready[name] {
			out.endpoints[fmt.Sprintf("%s:%d", a, ServeTCPPort)] = true
			out.endpoints[fmt.Sprintf("%s:%d", a, ServeUDPPort)] = true
		}
	}
	sort.Strings(out.empty)
	return out, nil
}

var endpointToken = regexp.MustCompile(fmt.Sprintf(`\b(\d+\.\d+\.\d+\.\d+:(?:%d|%d))\b`, ServeTCPPort, ServeUDPPort))

// diff compares a dump of kube-proxy's rules with r: what is missing (a
// ClusterIP or endpoint not programmed yet) and what is stale (an endpoint
// the API no longer has).
func (r *serviceRules) diff(dump string) (missing, stale []string) {
	for _, ip := range r.clusterIPs {
		if !strings.Contains(dump, ip) {
			missing = append(missing, ip)
		}
	}
	have := map[string]bool{}
	for _, m := range endpointToken.FindAllStringSubmatch(dump, -1) {
		have[m[1]] = true
	}
	for e := range r.endpoints {
		if !have[e] {
			missing = append(missing, e)
		}
	}
	for e := range have {
		if !r.endpoints[e] {
			stale = append(stale, e)
		}
	}
	sort.Strings(missing)
	sort.Strings(stale)
	return missing, stale
}

// waitServicesProgrammed waits until a node's kube-proxy rules match the
// lab's Services and their ready endpoints in the API (kube-proxy lags
// endpoint changes by up to its minimum sync period).
func waitServicesProgrammed(ctx context.Context, cs *kube.Client, cfg *Config, node string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		want, err := desiredServiceRules(ctx, cs)
		if err != nil {
			return err
		}
		dump, err := kubeProxyRules(cfg, node)
		if err == nil {
			missing, stale := want.diff(dump)
			if len(missing)+len(stale) == 0 {
				return nil
			}
			err = fmt.Errorf("rules of %s lack %v, still have %v", node, missing, stale)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not catch up with the Services within %s: %w", cfg.servicesBy(), timeout.Round(time.Second), err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// kubeProxyRules dumps the NAT rules kube-proxy wrote in a node's
// namespace or, without kube-proxy, Sinabro's Service table of the node.
func kubeProxyRules(cfg *Config, node string) (string, error) {
	if !cfg.kubeProxy() {
		rows, err := cfg.nodeServices(node)
		if err != nil {
			return "", err
		}
		var b strings.Builder
		for _, r := range rows {
			fmt.Fprintf(&b, "%s %s -> %s\n", r.Name, r.Frontend, strings.Join(r.Backends, " "))
		}
		return b.String(), nil
	}
	argv := []string{"nft", "list", "table", "ip", "kube-proxy"}
	if cfg.KubeProxy == KubeProxyIPTables {
		argv = []string{"iptables-save", "-t", "nat"}
	}
	var out, errb bytes.Buffer
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := netns.Do(netns.Path(cfg.NodeNetns(node)), cmd.Run); err != nil {
		return "", fmt.Errorf("%s in %s: %w: %s", strings.Join(argv, " "), cfg.NodeNetns(node), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// realNodeBPFRoot is the DaemonSet's --bpf-root, in a real node's bpffs.
const realNodeBPFRoot = "/sys/fs/bpf/sinabro"

// nodeServices reads a node's Service table. A real node's agent pins it
// in the node's own bpffs, seen only in the node's mount namespace (which
// a Go process cannot enter): ask `sinabro debug services` there.
func (c *Config) nodeServices(node string) ([]service.Row, error) {
	if !c.realNodes() {
		return service.List(c.nodeBPFRoot(node))
	}
	argv := append([]string{"nsenter", "--mount=" + c.layout().nodeMountNS(node), "--"},
		c.Executable, "debug", "services", "-o", "json", "--bpf-root", realNodeBPFRoot)
	var out, errb bytes.Buffer
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("sinabro debug services on %s: %w: %s", node, err, strings.TrimSpace(errb.String()))
	}
	var table struct {
		Services []service.Row `json:"services"`
	}
	if err := json.Unmarshal(out.Bytes(), &table); err != nil {
		return nil, fmt.Errorf("sinabro debug services on %s: %w", node, err)
	}
	return table.Services, nil
}

// serviceProbes are the Service rows of `lab check`: pod→ClusterIP with the
// backend on the pod's node, on another node and outside the cluster;
// pod→its own ClusterIP (hairpin); node→ClusterIP; external host→NodePort
// on every node, and →eTP=Local NodePort on nodes with a backend, where the
// pod must see the external host's address; pod→NodePort of every other
// node. Also a state check per kube-proxy.
func serviceProbes(ctx context.Context, cfg *Config, cs *kube.Client, nodes, pods []Endpoint, ext Endpoint, nodeIP map[string]string) ([]Probe, []StateCheck, error) {
	var state []StateCheck
	// Probe what the API says, once kube-proxy has caught up with it (a
	// pod just recreated may still have its old endpoint in the rules).
	programmed := make([]StateCheck, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			err := fmt.Errorf("no network namespace %s (not a lab node)", n.Netns)
			if fileExists(netns.Path(n.Netns)) {
				err = waitServicesProgrammed(ctx, cs, cfg, n.Name, 10*time.Second)
			}
			programmed[i] = StateCheck{What: fmt.Sprintf("%s on %s programmed the Services", cfg.servicesBy(), n.Name), OK: err == nil,
				Detail: "rules match the API's Services and ready endpoints"}
			if err != nil {
				programmed[i].Detail = err.Error()
			}
		})
	}
	wg.Wait()
	state = append(state, programmed...)
	for _, n := range nodes {
		if !cfg.kubeProxy() {
			break
		}
		at, err := kubeProxySynced(ctx, cfg, n.Name)
		sc := StateCheck{What: fmt.Sprintf("kube-proxy (%s) on %s synced", cfg.KubeProxy, n.Name), OK: err == nil && !at.IsZero()}
		switch {
		case err != nil:
			sc.Detail = err.Error()
		case at.IsZero():
			sc.Detail = "no rules sync yet"
		default:
			sc.Detail = fmt.Sprintf("last sync %s ago", time.Since(at).Round(time.Second))
		}
		state = append(state, sc)
	}
	svcs, err := labServices(ctx, cs)
	if err != nil {
		return nil, nil, err
	}
	var probes []Probe
	add := func(cat string, src, dst Endpoint, want string, tcpPort, udpPort int) {
		probes = append(probes,
			Probe{Category: cat, Src: src, Dst: dst, Proto: "tcp", Port: tcpPort, Want: want},
			Probe{Category: cat, Src: src, Dst: dst, Proto: "udp", Port: udpPort, Want: want})
	}
	// A missing Service is a failed state check, not an error: the other
	// rows still tell what works.
	missing := func(name string) {
		state = append(state, StateCheck{What: "service " + name + " exists", Detail: "not found"})
	}
	clusterIP := func(name, backendNode string) (Endpoint, bool) {
		svc, ok := svcs[name]
		if !ok {
			missing(name)
			return Endpoint{}, false
		}
		return Endpoint{Name: name, Kind: "service", IP: svc.Spec.ClusterIP, Node: backendNode}, true
	}
	for _, a := range pods {
		for _, b := range pods {
			dst, ok := clusterIP(podServiceName(b.Name), b.Node)
			if !ok {
				continue
			}
			switch {
			case a.Name == b.Name:
				add(catSvcHairpin, a, dst, "", servicePort, servicePort)
			case a.Node == b.Node:
				add(catSvcSameNode, a, dst, a.IP, servicePort, servicePort) // no NAT of the source
			default:
				add(catSvcOtherNode, a, dst, a.IP, servicePort, servicePort)
			}
		}
		if dst, ok := clusterIP(svcExternal, ""); ok {
			// The external host sees the pod's node address (masquerade).
			add(catSvcOutside, a, dst, nodeIP[a.Node], servicePort, servicePort)
		}
	}
	for _, n := range nodes {
		for _, p := range pods {
			if dst, ok := clusterIP(podServiceName(p.Name), p.Node); ok {
				add(catNodeSvc, n, dst, "", servicePort, servicePort)
			}
		}
	}
	hasBackend := map[string]bool{}
	for _, p := range pods {
		hasBackend[p.Node] = true
	}
	for _, np := range []string{svcNodePort, svcNodePortLocal} {
		svc, ok := svcs[np]
		if !ok {
			missing(np)
			continue
		}
		tcp, udp := nodePorts(svc)
		for _, n := range nodes {
			dst := Endpoint{Name: np + "@" + n.Name, Kind: "nodeport", IP: n.IP, Node: n.Name}
			if np == svcNodePort {
				add(catNodePort, ext, dst, "", tcp, udp)
				// A pod reaching another node's address: that node's
				// datapath translates, and replies of backends anywhere
				// must find the pod back.
				for _, p := range pods {
					if p.Node != n.Name {
						add(catPodNodePort, p, dst, "", tcp, udp)
					}
				}
			} else if hasBackend[n.Name] {
				// externalTrafficPolicy=Local keeps the client's address.
				add(catNodePortLocal, ext, dst, ext.IP, tcp, udp)
			}
		}
	}
	return probes, state, nil
}
