package masquerade

import (
	"net/netip"
	"reflect"
	"testing"
)

func TestRanges(t *testing.T) {
	r := func(from, to string) Range {
		return Range{From: netip.MustParseAddr(from), To: netip.MustParseAddr(to)}
	}
	p := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	tests := []struct {
		name string
		in   []netip.Prefix
		want []Range
	}{
		{name: "empty"},
		{name: "one", in: p("10.244.0.0/16"), want: []Range{r("10.244.0.0", "10.244.255.255")}},
		{name: "unmasked input", in: p("10.244.1.7/24"), want: []Range{r("10.244.1.0", "10.244.1.255")}},
		{name: "contained", in: p("10.244.1.0/24", "10.244.0.0/16", "10.244.2.0/24"), want: []Range{r("10.244.0.0", "10.244.255.255")}},
		{name: "adjacent merged", in: p("10.0.1.0/24", "10.0.0.0/24"), want: []Range{r("10.0.0.0", "10.0.1.255")}},
		{name: "disjoint sorted", in: p("10.96.0.0/12", "10.244.0.0/16"), want: []Range{r("10.96.0.0", "10.111.255.255"), r("10.244.0.0", "10.244.255.255")}},
		{name: "families apart", in: p("fd00::/48", "10.244.0.0/16", "fd00:0:0:1::/64"),
			want: []Range{r("10.244.0.0", "10.244.255.255"), r("fd00::", "fd00::ffff:ffff:ffff:ffff:ffff")}},
		{name: "whole space", in: p("0.0.0.0/0"), want: []Range{r("0.0.0.0", "255.255.255.255")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Ranges(tt.in); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Ranges(%v) = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
}
