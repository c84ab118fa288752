package sockmap

import (
	"context"
	"encoding/binary"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestSettings(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cfg     Config
		enabled bool
		want    sockopsSockCfg
	}{
		{"defaults", Config{}, true, sockopsSockCfg{Enabled: 1, Window: DefaultWindow}},
		{"unlimited window", Config{Window: Unlimited}, true, sockopsSockCfg{Enabled: 1}},
		{"threshold and window", Config{Window: 1 << 20, MsgThreshold: 16 << 10}, true, sockopsSockCfg{Enabled: 1, Window: 1 << 20, MsgThreshold: 16 << 10}},
		{"disabled", Config{}, false, sockopsSockCfg{Window: DefaultWindow}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.cfg.settings(tc.enabled); got != tc.want {
				t.Errorf("settings = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	ok := Config{BPFRoot: "/sys/fs/bpf/x", CgroupPath: "/sys/fs/cgroup/unified/x"}
	for _, tc := range []struct {
		name    string
		mod     func(*Config)
		wantErr bool
	}{
		{"ok", func(*Config) {}, false},
		{"no root", func(c *Config) { c.BPFRoot = "" }, true},
		{"no cgroup", func(c *Config) { c.CgroupPath = "" }, true},
		{"ipv6 prefix", func(c *Config) { c.PodPrefixes = []netip.Prefix{netip.MustParsePrefix("fd00::/64")} }, true},
		{"pod addresses", func(c *Config) { c.PodPrefixes = []netip.Prefix{netip.MustParsePrefix("10.244.1.2/32")} }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.mod(&c)
			if err := c.validate(); (err != nil) != tc.wantErr {
				t.Errorf("validate() = %v, want error %v", err, tc.wantErr)
			}
		})
	}
}

func TestPodKey(t *testing.T) {
	for _, s := range []string{"10.244.1.2/32", "10.244.0.0/16", "0.0.0.0/0"} {
		p := netip.MustParsePrefix(s)
		if got := podPrefix(podKey(p)); got != p {
			t.Errorf("podPrefix(podKey(%v)) = %v", p, got)
		}
	}
	// The key's memory holds the address in network order.
	k := podKey(netip.MustParsePrefix("10.244.1.2/32"))
	if b := [4]byte{byte(k.Addr), byte(k.Addr >> 8), byte(k.Addr >> 16), byte(k.Addr >> 24)}; b != [4]byte{10, 244, 1, 2} {
		t.Errorf("key address bytes %v, want network order", b)
	}
}

func TestPairs(t *testing.T) {
	ap := netip.MustParseAddrPort
	srv := Socket{Local: ap("10.0.0.2:80"), Remote: ap("10.0.0.3:40000"), Cookie: 1}
	cli := Socket{Local: ap("10.0.0.3:40000"), Remote: ap("10.0.0.2:80"), Cookie: 2}
	lone := Socket{Local: ap("10.0.0.4:41000"), Remote: ap("10.0.0.2:80"), Cookie: 3}
	for _, tc := range []struct {
		name  string
		socks []Socket
		want  []Pair
	}{
		{"empty", nil, nil},
		{"pair, server first", []Socket{cli, srv}, []Pair{{A: srv, B: &cli}}},
		{"half a pair", []Socket{lone}, []Pair{{A: lone}}},
		{"both", []Socket{lone, srv, cli}, []Pair{{A: srv, B: &cli}, {A: lone}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := pairs(tc.socks); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("pairs = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestCounterNames(t *testing.T) {
	messageResults, socketEvents := counterNames()
	if messageResults[0] != "redirect" || messageResults[3] != "fallback_bulk" || socketEvents[7] != "added" || socketEvents[12] != "drained" {
		t.Errorf("names from enum sock_counter: %v %v", messageResults, socketEvents)
	}
	seen := map[string]bool{}
	for id, name := range messageResults {
		if int(id) >= cntSlots || seen[name] {
			t.Errorf("message counter %d %q: out of range or duplicate", id, name)
		}
		seen[name] = true
	}
	for id, name := range socketEvents {
		if int(id) >= cntSlots || seen[name] {
			t.Errorf("socket counter %d %q: out of range or duplicate", id, name)
		}
		seen[name] = true
	}
}

func TestProgramsLoadSpec(t *testing.T) {
	spec, err := loadSockops()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"sock_ops", "sock_redirect"} {
		if spec.Programs[name] == nil {
			t.Errorf("program %s missing from the object", name)
		}
	}
	for _, name := range []string{"sb_sock_hash", "sb_sock_pods", "sb_sock_conns", "sb_sock_cfg", "sb_sock_counters"} {
		if spec.Maps[name] == nil {
			t.Errorf("map %s missing from the object", name)
		}
	}
}

// Disable, Cleanup and ListPairs on a root that never had acceleration
// (an agent started with --tcp-acceleration=false) do nothing and succeed.
func TestNothingEnabled(t *testing.T) {
	root := t.TempDir()
	if err := Disable(context.Background(), root); err != nil {
		t.Errorf("Disable: %v", err)
	}
	if p, err := ListPairs(root); err != nil || p != nil {
		t.Errorf("ListPairs = %v, %v; want nothing", p, err)
	}
	if err := Cleanup(root); err != nil {
		t.Errorf("Cleanup: %v", err)
	}
}

func TestWriteStatus(t *testing.T) {
	ap := netip.MustParseAddrPort
	srv := Socket{Local: ap("10.0.0.2:80"), Remote: ap("10.0.0.3:40000")}
	cli := Socket{Local: ap("10.0.0.3:40000"), Remote: ap("10.0.0.2:80")}
	stats := Stats{
		Messages: map[string]Stat{"redirect": {Count: 3, Bytes: 300}, "pass": {}},
		Sockets:  map[string]Stat{"added": {Count: 2}},
	}
	var b strings.Builder
	if err := writeStatus(&b, "enabled", stats, []Pair{{A: srv, B: &cli}}); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(strings.Fields(b.String()), " ")
	for _, want := range []string{"TCP acceleration: enabled", "redirect 3 300", "added 2", "ACCELERATED CONNECTIONS: 1", "10.0.0.2:80 <-> 10.0.0.3:40000"} {
		if !strings.Contains(got, want) {
			t.Errorf("status lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	if err := WriteStatus(&b, t.TempDir()); err != nil || !strings.Contains(b.String(), "not set up") {
		t.Errorf("WriteStatus on an empty root = %v, %q", err, b.String())
	}
}

// TestConnKey: both sockets of a connection find one state entry, on
// opposite sides, as conn_key in bpf/sockops.c orders them (lower
// address, then lower port, first).
func TestConnKey(t *testing.T) {
	key := func(local, remote string) sockopsSockKey {
		l, r := netip.MustParseAddrPort(local), netip.MustParseAddrPort(remote)
		var lp, rp [2]byte
		binary.BigEndian.PutUint16(lp[:], l.Port())
		binary.BigEndian.PutUint16(rp[:], r.Port())
		return sockopsSockKey{Sip: nativeFromBytes(l.Addr().As4()), Dip: nativeFromBytes(r.Addr().As4()),
			Sport: binary.NativeEndian.Uint16(lp[:]), Dport: binary.NativeEndian.Uint16(rp[:])}
	}
	for _, c := range []struct{ a, b string }{
		{"10.244.1.2:7000", "10.244.1.3:40000"},  // lower address first
		{"10.244.1.2:40000", "10.244.1.3:7000"},  // address decides before port
		{"10.244.1.2:7000", "10.244.1.2:40000"},  // same address: lower port
		{"10.244.1.9:7000", "10.244.1.10:40000"}, // numeric, not textual, order
	} {
		ka, sa := connKey(key(c.a, c.b))
		kb, sb := connKey(key(c.b, c.a))
		if ka != kb || sa != 0 || sb != 1 || ka != key(c.a, c.b) {
			t.Errorf("%s ⇄ %s: keys %+v/%+v sides %d/%d, want one key (the first socket's) and sides 0/1", c.a, c.b, ka, kb, sa, sb)
		}
	}
}
