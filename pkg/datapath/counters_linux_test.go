package datapath

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestCollectorReportsWhatItCanRead gives the collector a counters map
// holding only the first program's slots: reads of the others fail, yet the
// scrape succeeds with the readable counters and counts the failures.
func TestCollectorReportsWhatItCanRead(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create eBPF maps")
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: uint32(reasonSlots)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	perCPU := make([]datapathCounter, ebpf.MustPossibleCPU())
	perCPU[0] = datapathCounter{Packets: 3, Bytes: 300}
	if err := m.Put(uint32(5), perCPU); err != nil { // masq_egress/snat
		t.Fatal(err)
	}
	unreadable := 0
	programNames, reasonNames := counterNames()
	for prog, pname := range programNames {
		for _, rname := range reasonNames {
			if prog > 0 && pname != "" && rname != "" {
				unreadable++
			}
		}
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(m))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("scrape failed: %v", err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			got[mf.GetName()+labelString(mt)] = mt.GetCounter().GetValue()
		}
	}
	for name, want := range map[string]float64{
		`sinabro_datapath_packets_total{program="masq_egress",reason="snat"}`: 3,
		`sinabro_datapath_bytes_total{program="masq_egress",reason="snat"}`:   300,
		`sinabro_datapath_counter_read_errors_total`:                          float64(unreadable),
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v (scrape: %v)", name, got[name], want, got)
		}
	}
}

func labelString(m *dto.Metric) string {
	if len(m.GetLabel()) == 0 {
		return ""
	}
	s := "{"
	for i, l := range m.GetLabel() {
		if i > 0 {
			s += ","
		}
		s += l.GetName() + `="` + l.GetValue() + `"`
	}
	return s + "}"
}

// TestCounterNamesFromC: the metric labels come from the C enums; these are
// the ones dashboards and the docs use.
func TestCounterNamesFromC(t *testing.T) {
	programNames, reasonNames := counterNames()
	if programNames[0] != "masq_egress" || programNames[1] != "masq_ingress" || programNames[2] != "host_route" {
		t.Errorf("program names %q", programNames)
	}
	for i, want := range map[int]string{0: "pass_not_ipv4", 5: "snat", 9: "redirect_local", 15: "pass_kernel_nat",
		22: "drop_vxlan_unknown_peer", 23: "pass_inbound_reply"} {
		if reasonNames[i] != want {
			t.Errorf("reason %d is %q, want %q", i, reasonNames[i], want)
		}
	}
}
