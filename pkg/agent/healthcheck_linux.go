package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// healthChecks serves each externalTrafficPolicy=Local Service's
// healthCheckNodePort as kube-proxy does: an external load balancer asks
// every node and sends traffic only to those answering 200 (this node has
// ready endpoints of the Service), not to those answering 503.
type healthChecks struct {
	log     *slog.Logger
	netns   string // "" = this process's network namespace
	mu      sync.Mutex
	servers map[uint16]*hcServer
}

type hcServer struct {
	srv *http.Server
	mu  sync.Mutex
	hc  healthCheck
}

type healthCheck struct {
	Namespace, Name string
	LocalEndpoints  int
}

// desiredHealthChecks: healthCheckNodePort → the Service and its ready
// endpoints on node.
func desiredHealthChecks(svcs []*corev1.Service, eps []*discoveryv1.EndpointSlice, node string) map[uint16]healthCheck {
	out := map[uint16]healthCheck{}
	for _, svc := range svcs {
		if svc.Spec.HealthCheckNodePort == 0 || svc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal {
			continue
		}
		local := map[string]bool{}
		for _, s := range eps {
			if s.Namespace != svc.Namespace || s.Labels[discoveryv1.LabelServiceName] != svc.Name {
				continue
			}
			for _, e := range s.Endpoints {
				if ptrString(e.NodeName) == node && (e.Conditions.Ready == nil || *e.Conditions.Ready) {
					for _, a := range e.Addresses {
						local[a] = true
					}
				}
			}
		}
		out[uint16(svc.Spec.HealthCheckNodePort)] = healthCheck{Namespace: svc.Namespace, Name: svc.Name, LocalEndpoints: len(local)}
	}
	return out
}

// sync serves exactly desired (nil: nothing, kube-proxy serves them).
func (h *healthChecks) sync(desired map[uint16]healthCheck) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.servers == nil {
		h.servers = map[uint16]*hcServer{}
	}
	var errs []error
	for port, s := range h.servers {
		if _, ok := desired[port]; !ok {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			s.srv.Shutdown(ctx)
			cancel()
			delete(h.servers, port)
		}
	}
	for port, hc := range desired {
		if s, ok := h.servers[port]; ok {
			s.mu.Lock()
			s.hc = hc
			s.mu.Unlock()
			continue
		}
		s := &hcServer{hc: hc}
		var ln net.Listener
		listen := func() (err error) {
			ln, err = net.Listen("tcp", ":"+strconv.Itoa(int(port)))
			return err
		}
		var err error
		if h.netns != "" {
			err = netns.Do(h.netns, listen)
		} else {
			err = listen()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("serve healthCheckNodePort %d of %s/%s: %w", port, hc.Namespace, hc.Name, err))
			continue
		}
		s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				h.log.Error("healthCheckNodePort server", "port", port, "err", err)
			}
		}()
		h.servers[port] = s
	}
	return errors.Join(errs...)
}

// ServeHTTP answers as kube-proxy's health check server does.
func (s *hcServer) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	hc := s.hc
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(hc.LocalEndpoints))
	if hc.LocalEndpoints == 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	json.NewEncoder(w).Encode(map[string]any{
		"service":             map[string]string{"namespace": hc.Namespace, "name": hc.Name},
		"localEndpoints":      hc.LocalEndpoints,
		"serviceProxyHealthy": true,
	})
}
