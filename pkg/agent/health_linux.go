package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
)

// healthServer serves /healthz (the reconcile loop is alive), /readyz (the
// node is set up) and /metrics.
type healthServer struct {
	ln  net.Listener
	srv *http.Server
}

func (a *Agent) healthServer() (*healthServer, error) {
	ln, err := net.Listen("tcp", a.cfg.HealthAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on health address %s: %w", a.cfg.HealthAddr, err)
	}
	started := time.Now()
	// The loop passes at least once per resync interval; three missed
	// passes (plus slack for a slow API server at start) mean it is stuck.
	stale := 3*a.cfg.ResyncInterval + 30*time.Second
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		last := time.Unix(0, a.lastPass.Load())
		if a.lastPass.Load() == 0 {
			last = started
		}
		if age := time.Since(last); age > stale {
			http.Error(w, fmt.Sprintf("reconcile loop stuck: last pass %s ago", age.Round(time.Second)), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !a.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics.registry, promhttp.HandlerOpts{}))
	a.log.Info("serving health and metrics", "addr", ln.Addr().String())
	return &healthServer{ln: ln, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}}, nil
}

// run serves until ctx is done, then shuts down; both goroutines belong to g.
func (h *healthServer) run(ctx context.Context, g *errgroup.Group) {
	g.Go(func() error {
		if err := h.srv.Serve(h.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("health server: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return h.srv.Shutdown(shutdownCtx)
	})
}
