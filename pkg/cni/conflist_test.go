package cni

import (
	"encoding/json"
	"testing"
)

// TestConfListPortMap checks that PortMap chains the reference portmap
// plugin, with the portMappings capability the runtime fills in from pods'
// hostPorts, after ours; without it the list is ours alone.
func TestConfListPortMap(t *testing.T) {
	for _, tt := range []struct {
		portMap bool
		want    []string
	}{
		{false, []string{PluginType}},
		{true, []string{PluginType, PortMapPlugin}},
	} {
		b, err := ConfList(NetworkConfig{PodCIDRs: []string{"10.244.1.0/24"}, PortMap: tt.portMap})
		if err != nil {
			t.Fatal(err)
		}
		var list struct {
			Plugins []struct {
				Type         string          `json:"type"`
				Capabilities map[string]bool `json:"capabilities"`
			} `json:"plugins"`
		}
		if err := json.Unmarshal(b, &list); err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, p := range list.Plugins {
			got = append(got, p.Type)
			if p.Type == PortMapPlugin && !p.Capabilities["portMappings"] {
				t.Errorf("portmap without the portMappings capability: %s", b)
			}
		}
		if len(got) != len(tt.want) || got[0] != tt.want[0] || len(got) > 1 && got[1] != tt.want[1] {
			t.Errorf("PortMap=%v: plugins %v, want %v", tt.portMap, got, tt.want)
		}
	}
}
