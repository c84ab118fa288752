package flows

import (
	"encoding/json"
	"os"
	"regexp"
	"testing"
)

// dashboardMetrics are the metrics the Grafana dashboard may query: the
// flow telemetry of this package and the datapath and NetworkPolicy drops.
var dashboardMetrics = map[string]bool{
	"sinabro_flow_events_total":             true,
	"sinabro_flow_drops_total":              true,
	"sinabro_flows_total":                   true,
	"sinabro_flow_events_lost_total":        true,
	"sinabro_flow_events_sampled_out_total": true,
	"sinabro_datapath_packets_total":        true,
	"sinabro_policy_drops_total":            true,
}

var metricName = regexp.MustCompile(`sinabro_[a-z_]+`)

// TestDashboardUsesKnownMetrics: the dashboard is valid JSON with panels,
// and its queries only name metrics the agent exposes, from the datasource
// variable.
func TestDashboardUsesKnownMetrics(t *testing.T) {
	b, err := os.ReadFile("../../manifests/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d map[string]any
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("dashboard is not valid JSON: %v", err)
	}
	panels, ok := d["panels"].([]any)
	if !ok || len(panels) == 0 {
		t.Fatalf("dashboard has no panels array")
	}

	var exprs []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && k == "expr" {
					exprs = append(exprs, s)
					continue
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(panels)
	if len(exprs) == 0 {
		t.Fatal("no expr in the dashboard's panels")
	}
	for _, e := range exprs {
		names := metricName.FindAllString(e, -1)
		if len(names) == 0 {
			t.Errorf("expr names no sinabro metric: %s", e)
		}
		for _, n := range names {
			if !dashboardMetrics[n] {
				t.Errorf("expr uses unknown metric %s: %s", n, e)
			}
		}
	}

	for i, p := range panels {
		pm, _ := p.(map[string]any)
		ds, _ := pm["datasource"].(map[string]any)
		if ds["uid"] != "${datasource}" {
			t.Errorf("panel %d (%v) does not use the datasource variable", i, pm["title"])
		}
	}
}
