package agent

import (
	"cmp"
	"net/netip"
	"slices"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/service"
)

// Kube-proxy replacement modes (--kube-proxy-replacement).
const (
	// KPRAuto serves Services unless kube-proxy's rules are found in the
	// node's network namespace.
	KPRAuto = "auto"
	// KPRTrue serves Services even next to kube-proxy.
	KPRTrue = "true"
	// KPRFalse leaves Services to kube-proxy.
	KPRFalse = "false"
)

// defaultAffinityTimeout is Kubernetes' default sessionAffinity timeout.
const defaultAffinityTimeout = 10800 * time.Second

// desiredServices computes what the load balancer of node must hold: one
// frontend per Service port and address (ClusterIPs, external IPs,
// load-balancer ingress IPs, the NodePort on every node address) with the
// backends kube-proxy would use from this node:
//   - ready endpoints; serving-and-terminating ones only when no endpoint
//     is ready (graceful termination);
//   - for ClusterIPs with internalTrafficPolicy Local, only endpoints on
//     this node;
//   - external addresses and NodePorts reached from inside the node use
//     every endpoint, as kube-proxy does for traffic that starts in the
//     cluster whatever the externalTrafficPolicy;
//   - topology hints narrow the endpoints of Cluster policies to this
//     node's or zone's (backendsFor).
//
// IPv6 addresses are skipped (the datapath is IPv4 today).
func desiredServices(svcs []*corev1.Service, eps []*discoveryv1.EndpointSlice, here locality) map[service.Frontend]service.Entry {
	bySvc := slicesByService(eps)
	out := map[service.Frontend]service.Entry{}
	for _, svc := range svcs {
		if !loadBalanced(svc) {
			continue
		}
		var affinity time.Duration
		if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
			affinity = defaultAffinityTimeout
			if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
				affinity = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
			}
		}
		itpLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
		slicesOf := bySvc[[2]string{svc.Namespace, svc.Name}]
		for _, sp := range svc.Spec.Ports {
			proto, ok := protocolOf(sp.Protocol)
			if !ok {
				continue
			}
			name := svc.Namespace + "/" + svc.Name + ":" + cmp.Or(sp.Name, strconv.Itoa(int(sp.Port)))
			all := backendsFor(slicesOf, sp.Name, sp.Protocol, here, false)
			entry := service.Entry{Name: name, Backends: all, Affinity: affinity}
			internal := entry
			if itpLocal {
				internal.Backends = backendsFor(slicesOf, sp.Name, sp.Protocol, here, true)
			}
			for _, ip := range svc.Spec.ClusterIPs {
				if a, err := netip.ParseAddr(ip); err == nil && a.Is4() {
					out[service.Frontend{Addr: a, Port: uint16(sp.Port), Proto: proto}] = internal
				}
			}
			for _, ip := range externalAddrs(svc) {
				if a, err := netip.ParseAddr(ip); err == nil && a.Is4() {
					out[service.Frontend{Addr: a, Port: uint16(sp.Port), Proto: proto}] = entry
				}
			}
			if sp.NodePort != 0 && (svc.Spec.Type == corev1.ServiceTypeNodePort || svc.Spec.Type == corev1.ServiceTypeLoadBalancer) {
				out[service.Frontend{NodePort: true, Port: uint16(sp.NodePort), Proto: proto}] = entry
			}
		}
	}
	return out
}

// desiredExternal computes the Service frontends reachable from outside
// the node, for the datapath's per-packet load balancing (bpf/lib/lb.h):
// each NodePort on the node address, each external IP and load-balancer
// ingress IP with its port, TCP and UDP. Their backends are all ready
// endpoints, or with externalTrafficPolicy Local only this node's (none
// left: packets are rejected, as kube-proxy does, and the load balancer in
// front picks another node through healthCheckNodePort); sessionAffinity
// ClientIP keeps each client address on one backend.
func desiredExternal(svcs []*corev1.Service, eps []*discoveryv1.EndpointSlice, here locality) map[datapath.LBFrontend]datapath.LBEntry {
	bySvc := slicesByService(eps)
	out := map[datapath.LBFrontend]datapath.LBEntry{}
	for _, svc := range svcs {
		if !loadBalanced(svc) {
			continue
		}
		local := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
		slicesOf := bySvc[[2]string{svc.Namespace, svc.Name}]
		for _, sp := range svc.Spec.Ports {
			proto, ok := protocolOf(sp.Protocol)
			if !ok || proto == service.SCTP {
				continue
			}
			entry := datapath.LBEntry{Backends: backendsFor(slicesOf, sp.Name, sp.Protocol, here, local),
				Affinity: svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP}
			if sp.NodePort != 0 && (svc.Spec.Type == corev1.ServiceTypeNodePort || svc.Spec.Type == corev1.ServiceTypeLoadBalancer) {
				out[datapath.LBFrontend{NodePort: true, Port: uint16(sp.NodePort), Proto: uint8(proto)}] = entry
			}
			for _, ip := range externalAddrs(svc) {
				if a, err := netip.ParseAddr(ip); err == nil && a.Is4() {
					out[datapath.LBFrontend{Addr: a, Port: uint16(sp.Port), Proto: uint8(proto)}] = entry
				}
			}
		}
	}
	return out
}

// slicesByService indexes the IPv4 EndpointSlices by their Service's
// namespace and name.
func slicesByService(eps []*discoveryv1.EndpointSlice) map[[2]string][]*discoveryv1.EndpointSlice {
	out := map[[2]string][]*discoveryv1.EndpointSlice{}
	for _, s := range eps {
		if name := s.Labels[discoveryv1.LabelServiceName]; name != "" && s.AddressType == discoveryv1.AddressTypeIPv4 {
			k := [2]string{s.Namespace, name}
			out[k] = append(out[k], s)
		}
	}
	return out
}

// loadBalanced reports whether kube-proxy would program svc: not an
// ExternalName, not headless, with a ClusterIP.
func loadBalanced(svc *corev1.Service) bool {
	return svc.Spec.Type != corev1.ServiceTypeExternalName && svc.Spec.ClusterIP != corev1.ClusterIPNone && svc.Spec.ClusterIP != ""
}

// externalAddrs are a Service's external IPs and load-balancer ingress IPs.
func externalAddrs(svc *corev1.Service) []string {
	out := slices.Clone(svc.Spec.ExternalIPs)
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		out = append(out, ing.IP)
	}
	return out
}

func protocolOf(p corev1.Protocol) (service.Protocol, bool) {
	switch p {
	case corev1.ProtocolTCP, "":
		return service.TCP, true
	case corev1.ProtocolUDP:
		return service.UDP, true
	case corev1.ProtocolSCTP:
		return service.SCTP, true
	}
	return 0, false
}

// backendsFor collects the endpoints of one Service port (matched by port
// name and protocol, as kube-proxy does), sorted: with local, only this
// node's; otherwise, as kube-proxy does, only those whose topology hints
// name this node (trafficDistribution PreferSameNode) or else its zone
// (PreferClose, topology-mode Auto) — when every ready endpoint has such
// hints and one is for here; else all of them.
func backendsFor(eps []*discoveryv1.EndpointSlice, portName string, proto corev1.Protocol, here locality, local bool) []service.Backend {
	type candidate struct {
		b            service.Backend
		zones, nodes []string
	}
	var ready []candidate
	var terminating []service.Backend
	for _, s := range eps {
		for _, p := range s.Ports {
			if p.Port == nil || cmp.Or(ptrString(p.Name), "") != portName || cmp.Or(ptrProto(p.Protocol), corev1.ProtocolTCP) != cmp.Or(proto, corev1.ProtocolTCP) {
				continue
			}
			for _, e := range s.Endpoints {
				if local && ptrString(e.NodeName) != here.node {
					continue
				}
				isReady := e.Conditions.Ready == nil || *e.Conditions.Ready
				serving := isReady
				if e.Conditions.Serving != nil {
					serving = *e.Conditions.Serving
				}
				term := e.Conditions.Terminating != nil && *e.Conditions.Terminating
				var zones, nodes []string
				if h := e.Hints; h != nil {
					for _, z := range h.ForZones {
						zones = append(zones, z.Name)
					}
					for _, n := range h.ForNodes {
						nodes = append(nodes, n.Name)
					}
				}
				for _, ip := range e.Addresses {
					a, err := netip.ParseAddr(ip)
					if err != nil || !a.Is4() {
						continue
					}
					b := netip.AddrPortFrom(a, uint16(*p.Port))
					switch {
					case isReady:
						ready = append(ready, candidate{b: b, zones: zones, nodes: nodes})
					case serving && term:
						terminating = append(terminating, b)
					}
				}
			}
		}
	}
	hinted := func(hints func(candidate) []string, want string) []service.Backend {
		var out []service.Backend
		for _, c := range ready {
			if len(hints(c)) == 0 {
				return nil // not every endpoint has hints: ignore them
			}
			if want != "" && slices.Contains(hints(c), want) {
				out = append(out, c.b)
			}
		}
		return out
	}
	var out []service.Backend
	if !local {
		out = hinted(func(c candidate) []string { return c.nodes }, here.node)
		if len(out) == 0 {
			out = hinted(func(c candidate) []string { return c.zones }, here.zone)
		}
	}
	if len(out) == 0 {
		for _, c := range ready {
			out = append(out, c.b)
		}
	}
	if len(out) == 0 {
		out = terminating
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return slices.Compact(out)
}

// locality is where the node is, for topology hints: its name and its
// topology.kubernetes.io/zone label.
type locality struct{ node, zone string }

func ptrString(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func ptrProto(p *corev1.Protocol) corev1.Protocol {
	if p == nil {
		return ""
	}
	return *p
}
