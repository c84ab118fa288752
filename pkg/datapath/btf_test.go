package datapath

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// TestLoadNeedsNoKernelBTF: without KernelCT the programs are relocated
// against no kernel types at all, as on a kernel without BTF, and still
// load (the README asks for BTF only for TCP acceleration and the
// conntrack kfuncs); with KernelCT they are relocated against the
// kernel's.
func TestLoadNeedsNoKernelBTF(t *testing.T) {
	cfg := testConfig()
	opts, err := programOptions(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if opts.KernelTypes == nil {
		t.Fatal("KernelCT off: programs relocated against the kernel's BTF, want no types")
	}
	if _, err := opts.KernelTypes.AnyTypeByName("nf_conn"); !errors.Is(err, btf.ErrNotFound) {
		t.Fatalf("KernelCT off: CO-RE target has nf_conn (err %v), want no types", err)
	}
	newTestObjects(t, cfg) // loads with those options

	cfg.KernelCT = true
	if opts, err := programOptions(cfg); err != nil || opts.KernelTypes != nil {
		t.Errorf("KernelCT on: KernelTypes %v, err %v; want the kernel's (nil)", opts.KernelTypes, err)
	}
}
