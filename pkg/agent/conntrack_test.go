package agent

import "testing"

func TestParsePortRange(t *testing.T) {
	tests := []struct {
		in       string
		min, max uint16
		ok       bool
	}{
		{"61000-65535", 61000, 65535, true},
		{"1024 - 2048", 1024, 2048, true},
		{"5000-5000", 5000, 5000, true},
		{"0-100", 0, 0, false},
		{"2000-1000", 0, 0, false},
		{"1000-70000", 0, 0, false},
		{"1000", 0, 0, false},
		{"a-b", 0, 0, false},
	}
	for _, tt := range tests {
		var c ConntrackConfig
		err := c.ParsePortRange(tt.in)
		if (err == nil) != tt.ok || c.PortMin != tt.min || c.PortMax != tt.max {
			t.Errorf("ParsePortRange(%q) = %d-%d, %v; want %d-%d, ok %v", tt.in, c.PortMin, c.PortMax, err, tt.min, tt.max, tt.ok)
		}
	}
}
