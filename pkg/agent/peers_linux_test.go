package agent

import (
	"fmt"
	"io"
	"log/slog"
	"testing"

	"k8s.io/apimachinery/pkg/runtime"
)

type recordedEvents []string

func (r *recordedEvents) Eventf(_ runtime.Object, eventtype, reason, messageFmt string, args ...any) {
	*r = append(*r, eventtype+" "+reason+" "+fmt.Sprintf(messageFmt, args...))
}

// TestCheckOwnPodCIDRs: a node whose own pod CIDR lies outside
// --cluster-cidr says so once (its peers skip it), and again only when the
// problem changes.
func TestCheckOwnPodCIDRs(t *testing.T) {
	var events recordedEvents
	a := &Agent{cfg: Config{NodeName: "a", ClusterCIDRs: prefixes("10.244.0.0/16")}, log: slog.New(slog.NewTextHandler(io.Discard, nil)), recorder: &events}
	n := node("a")
	for _, step := range []struct {
		cidrs      string
		wantEvents int
	}{
		{"10.244.1.0/24", 0},
		{"10.45.1.0/24", 1},
		{"10.45.1.0/24", 1}, // the same problem: no new Event
		{"10.46.1.0/24", 2},
		{"10.244.1.0/24", 2},
		{"10.45.1.0/24", 3}, // back again
	} {
		a.checkOwnPodCIDRs(n, nodeInfo{Name: "a", PodCIDRs: prefixes(step.cidrs)})
		if len(events) != step.wantEvents {
			t.Fatalf("after %s: %d events %q, want %d", step.cidrs, len(events), events, step.wantEvents)
		}
	}
	if want := "Warning SinabroPodCIDRRejected OutsideClusterCIDR"; len(events[0]) < len(want) || events[0][:len(want)] != want {
		t.Errorf("event %q, want it to start with %q", events[0], want)
	}
}
