package sockmap

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
)

// TestCollectorReportsWhatItCanRead gives the collector a counters map too
// small for the socket events and a sockhash stand-in it cannot iterate:
// the scrape still succeeds with the message counters and counts the
// failed reads.
func TestCollectorReportsWhatItCanRead(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create eBPF maps")
	}
	counters, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: uint32(sockopsSockCounterCNT_SOCK_ADDED)})
	if err != nil {
		t.Fatal(err)
	}
	defer counters.Close()
	perCPU := make([]sockopsCounter, ebpf.MustPossibleCPU())
	perCPU[0] = sockopsCounter{Packets: 4, Bytes: 400}
	if err := counters.Put(uint32(sockopsSockCounterCNT_REDIRECT), perCPU); err != nil {
		t.Fatal(err)
	}
	// Keys of the wrong size: listing the sockets fails.
	hash, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 8, MaxEntries: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer hash.Close()
	if err := hash.Put(uint32(1), uint64(1)); err != nil {
		t.Fatal(err)
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(counters, hash))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("scrape failed: %v", err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, l := range m.GetLabel() {
				name += "/" + l.GetValue()
			}
			got[name] = m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	sends, sockets := counterNames()
	past := 1 // the sockets listing
	for id := range sends {
		if id >= uint32(sockopsSockCounterCNT_SOCK_ADDED) {
			past++
		}
	}
	for id := range sockets {
		if id >= uint32(sockopsSockCounterCNT_SOCK_ADDED) {
			past++
		}
	}
	for name, want := range map[string]float64{
		"sinabro_sockmap_messages_total/redirect": 4,
		"sinabro_sockmap_bytes_total/redirect":    400,
		"sinabro_sockmap_read_errors_total":       float64(past), // every counter past the small map
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v (scrape: %v)", name, got[name], want, got)
		}
	}
	if _, ok := got["sinabro_sockmap_accelerated_sockets"]; ok {
		t.Error("accelerated sockets reported although the sockhash could not be read")
	}
}
