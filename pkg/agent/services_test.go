package agent

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sinabro-io/sinabro/pkg/datapath"
	"github.com/sinabro-io/sinabro/pkg/service"
)

type testEP struct {
	addr, node       string
	ready, terminate bool
}

func testSlice(svc, portName string, proto corev1.Protocol, port int32, eps ...testEP) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: svc + "-x", Namespace: "ns", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Protocol: &proto, Port: &port}},
	}
	for _, e := range eps {
		ready, serving, term, node := e.ready, true, e.terminate, e.node
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{e.addr}, NodeName: &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &term}})
	}
	return s
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// TestDesiredServices: Services and EndpointSlices → the socket load
// balancer's frontends and the datapath's table for traffic from outside,
// with kube-proxy's rules for each field.
func TestDesiredServices(t *testing.T) {
	local := corev1.ServiceInternalTrafficPolicyLocal
	timeout := int32(60)
	svcs := []*corev1.Service{
		{ // NodePort, two ports matched by name, ClientIP affinity with a timeout, an external IP
			ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "ns"},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1", "fd00::1"},
				ExternalIPs:     []string{"192.0.2.9"},
				SessionAffinity: corev1.ServiceAffinityClientIP, SessionAffinityConfig: &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &timeout}},
				Ports: []corev1.ServicePort{
					{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, NodePort: 30080},
					{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, NodePort: 30053},
				}},
		},
		{ // internalTrafficPolicy Local; LoadBalancer with eTP Local and an ingress IP
			ObjectMeta: metav1.ObjectMeta{Name: "lb", Namespace: "ns"},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "10.96.0.2", ClusterIPs: []string{"10.96.0.2"},
				InternalTrafficPolicy: &local, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal, HealthCheckNodePort: 32000,
				Ports: []corev1.ServicePort{{Name: "", Protocol: corev1.ProtocolTCP, Port: 443, NodePort: 30443}}},
			Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "198.51.100.7"}}}},
		},
		{ // only terminating endpoints left: they serve
			ObjectMeta: metav1.ObjectMeta{Name: "old", Namespace: "ns"},
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.3", ClusterIPs: []string{"10.96.0.3"},
				Ports: []corev1.ServicePort{{Name: "p", Protocol: corev1.ProtocolTCP, Port: 8080}}},
		},
		{ObjectMeta: metav1.ObjectMeta{Name: "headless", Namespace: "ns"}, Spec: corev1.ServiceSpec{ClusterIP: "None",
			Ports: []corev1.ServicePort{{Port: 1}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "ext", Namespace: "ns"}, Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"}},
	}
	eps := []*discoveryv1.EndpointSlice{
		testSlice("web", "http", corev1.ProtocolTCP, 8080, testEP{"10.244.1.2", "a", true, false}, testEP{"10.244.2.2", "b", true, false},
			testEP{"10.244.2.3", "b", false, true}),
		testSlice("web", "dns", corev1.ProtocolUDP, 5353, testEP{"10.244.1.2", "a", true, false}),
		testSlice("lb", "", corev1.ProtocolTCP, 8443, testEP{"10.244.1.4", "a", true, false}, testEP{"10.244.2.4", "b", true, false}),
		testSlice("old", "p", corev1.ProtocolTCP, 9090, testEP{"10.244.2.5", "b", false, true}),
	}

	got := desiredServices(svcs, eps, locality{node: "a"})
	both := []netip.AddrPort{ap("10.244.1.2:8080"), ap("10.244.2.2:8080")}
	want := map[service.Frontend]service.Entry{
		{Addr: netip.MustParseAddr("10.96.0.1"), Port: 80, Proto: service.TCP}:  {Name: "ns/web:http", Backends: both, Affinity: time.Minute},
		{Addr: netip.MustParseAddr("192.0.2.9"), Port: 80, Proto: service.TCP}:  {Name: "ns/web:http", Backends: both, Affinity: time.Minute},
		{NodePort: true, Port: 30080, Proto: service.TCP}:                       {Name: "ns/web:http", Backends: both, Affinity: time.Minute},
		{Addr: netip.MustParseAddr("10.96.0.1"), Port: 53, Proto: service.UDP}:  {Name: "ns/web:dns", Backends: []netip.AddrPort{ap("10.244.1.2:5353")}, Affinity: time.Minute},
		{Addr: netip.MustParseAddr("192.0.2.9"), Port: 53, Proto: service.UDP}:  {Name: "ns/web:dns", Backends: []netip.AddrPort{ap("10.244.1.2:5353")}, Affinity: time.Minute},
		{NodePort: true, Port: 30053, Proto: service.UDP}:                       {Name: "ns/web:dns", Backends: []netip.AddrPort{ap("10.244.1.2:5353")}, Affinity: time.Minute},
		{Addr: netip.MustParseAddr("10.96.0.2"), Port: 443, Proto: service.TCP}: {Name: "ns/lb:443", Backends: []netip.AddrPort{ap("10.244.1.4:8443")}},
		{Addr: netip.MustParseAddr("198.51.100.7"), Port: 443, Proto: service.TCP}: {Name: "ns/lb:443",
			Backends: []netip.AddrPort{ap("10.244.1.4:8443"), ap("10.244.2.4:8443")}},
		{NodePort: true, Port: 30443, Proto: service.TCP}:                        {Name: "ns/lb:443", Backends: []netip.AddrPort{ap("10.244.1.4:8443"), ap("10.244.2.4:8443")}},
		{Addr: netip.MustParseAddr("10.96.0.3"), Port: 8080, Proto: service.TCP}: {Name: "ns/old:p", Backends: []netip.AddrPort{ap("10.244.2.5:9090")}},
	}
	for fe, w := range want {
		if g, ok := got[fe]; !ok || !g.Equal(w) {
			t.Errorf("%s: got %+v, want %+v", fe, g, w)
		}
	}
	for fe := range got {
		if _, ok := want[fe]; !ok {
			t.Errorf("unexpected frontend %s: %+v", fe, got[fe])
		}
	}

	// From outside: eTP Local keeps this node's endpoints only.
	ext := desiredExternal(svcs, eps, locality{node: "a"})
	// web has ClientIP affinity: one backend per client address.
	wantExt := map[datapath.LBFrontend]datapath.LBEntry{
		{NodePort: true, Port: 30080, Proto: 6}:                          {Backends: both, Affinity: true},
		{Addr: netip.MustParseAddr("192.0.2.9"), Port: 80, Proto: 6}:     {Backends: both, Affinity: true},
		{NodePort: true, Port: 30053, Proto: 17}:                         {Backends: []netip.AddrPort{ap("10.244.1.2:5353")}, Affinity: true},
		{Addr: netip.MustParseAddr("192.0.2.9"), Port: 53, Proto: 17}:    {Backends: []netip.AddrPort{ap("10.244.1.2:5353")}, Affinity: true},
		{NodePort: true, Port: 30443, Proto: 6}:                          {Backends: []netip.AddrPort{ap("10.244.1.4:8443")}},
		{Addr: netip.MustParseAddr("198.51.100.7"), Port: 443, Proto: 6}: {Backends: []netip.AddrPort{ap("10.244.1.4:8443")}},
	}
	if len(ext) != len(wantExt) {
		t.Errorf("external frontends %v, want %v", ext, wantExt)
	}
	for fe, w := range wantExt {
		if !ext[fe].Equal(w) {
			t.Errorf("external %s: got %v, want %v", fe, ext[fe], w)
		}
	}
	if hc := desiredHealthChecks(svcs, eps, "a"); len(hc) != 1 || hc[32000] != (healthCheck{Namespace: "ns", Name: "lb", LocalEndpoints: 1}) {
		t.Errorf("health checks %+v", hc)
	}
}

// Topology hints narrow a Cluster policy's endpoints as kube-proxy does:
// node hints first, then zone hints, only when every ready endpoint has
// them and one is for here; Local policies ignore them.
func TestBackendsForTopologyHints(t *testing.T) {
	hinted := func(zones, nodes []string, eps ...testEP) []*discoveryv1.EndpointSlice {
		s := testSlice("web", "http", corev1.ProtocolTCP, 80, eps...)
		for i := range s.Endpoints {
			h := &discoveryv1.EndpointHints{}
			if i < len(zones) && zones[i] != "" {
				h.ForZones = []discoveryv1.ForZone{{Name: zones[i]}}
			}
			if i < len(nodes) && nodes[i] != "" {
				h.ForNodes = []discoveryv1.ForNode{{Name: nodes[i]}}
			}
			s.Endpoints[i].Hints = h
		}
		return []*discoveryv1.EndpointSlice{s}
	}
	eps := []testEP{{"10.0.0.1", "n1", true, false}, {"10.0.0.2", "n2", true, false}, {"10.0.0.3", "n3", true, false}}
	all := []service.Backend{ap("10.0.0.1:80"), ap("10.0.0.2:80"), ap("10.0.0.3:80")}
	for _, tt := range []struct {
		name         string
		zones, nodes []string
		here         locality
		local        bool
		want         []service.Backend
	}{
		{"no hints", nil, nil, locality{"n1", "a"}, false, all},
		{"zone hints for here", []string{"a", "b", "a"}, nil, locality{"n2", "a"}, false, []service.Backend{ap("10.0.0.1:80"), ap("10.0.0.3:80")}},
		{"zone hints, none for here", []string{"a", "b", "a"}, nil, locality{"n2", "c"}, false, all},
		{"zone hints, node without a zone", []string{"a", "b", "a"}, nil, locality{"n2", ""}, false, all},
		{"one endpoint without a hint", []string{"a", "", "a"}, nil, locality{"n1", "a"}, false, all},
		{"node hints win over zone hints", []string{"a", "a", "a"}, []string{"n1", "n2", "n3"}, locality{"n2", "a"}, false, []service.Backend{ap("10.0.0.2:80")}},
		{"node hints, none for here: zone hints", []string{"a", "b", "b"}, []string{"n1", "n2", "n3"}, locality{"n9", "b"}, false, []service.Backend{ap("10.0.0.2:80"), ap("10.0.0.3:80")}},
		{"Local policy ignores hints", []string{"b", "b", "b"}, nil, locality{"n1", "a"}, true, []service.Backend{ap("10.0.0.1:80")}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := backendsFor(hinted(tt.zones, tt.nodes, eps...), "http", corev1.ProtocolTCP, tt.here, tt.local)
			if !slices.Equal(got, tt.want) {
				t.Errorf("backends = %v, want %v", got, tt.want)
			}
		})
	}
}
