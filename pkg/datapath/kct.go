package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf/btf"
)

// kernelCT describes the kernel's conntrack kfuncs (bpf/lib/kct.h), with
// which the fast paths leave flows the kernel translated to the stack.
type kernelCT struct {
	// OptsSize is sizeof(struct bpf_ct_opts) in this kernel.
	OptsSize uint32
	// Where names the BTF the kfuncs are declared in.
	Where string
}

// probeKernelCT finds the conntrack kfuncs in the kernel's BTF; an error
// says why they cannot be used (kernel older than 6.0, no nf_conntrack, no
// BTF).
func probeKernelCT() (kernelCT, error) {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return kernelCT{}, fmt.Errorf("read kernel BTF: %w", err)
	}
	// Distribution kernels build nf_conntrack as a module: its kfuncs and
	// types are in the module's BTF (loaded once kube-proxy or any NAT
	// rule has pulled the module in).
	where := "vmlinux BTF"
	var fn *btf.Func
	if spec.TypeByName("bpf_skb_ct_lookup", &fn) != nil {
		where = "nf_conntrack module BTF"
		if spec, err = btf.LoadKernelModuleSpec("nf_conntrack"); err != nil {
			return kernelCT{}, fmt.Errorf("kfunc bpf_skb_ct_lookup is neither in vmlinux nor in a loaded nf_conntrack module: %w", err)
		}
	}
	for _, name := range []string{"bpf_skb_ct_lookup", "bpf_ct_release"} {
		var fn *btf.Func
		if err := spec.TypeByName(name, &fn); err != nil {
			return kernelCT{}, fmt.Errorf("kfunc %s: %w", name, err)
		}
	}
	var opts *btf.Struct
	if err := spec.TypeByName("bpf_ct_opts", &opts); err != nil {
		return kernelCT{}, fmt.Errorf("struct bpf_ct_opts: %w", err)
	}
	if opts.Size != 12 && opts.Size != 16 {
		return kernelCT{}, fmt.Errorf("struct bpf_ct_opts has an unknown size %d", opts.Size)
	}
	return kernelCT{OptsSize: opts.Size, Where: where}, nil
}

// ErrNoKernelCT is wrapped by Load when Config.KernelCT asks for the
// kernel's conntrack and the kernel does not offer it to eBPF.
var ErrNoKernelCT = errors.New("the kernel's conntrack kfuncs are unavailable")

// KernelCTAvailable reports whether the running kernel lets the datapath
// ask its conntrack (Linux >= 6.0 with nf_conntrack and BTF), and why not.
func KernelCTAvailable() error {
	_, err := KernelCTLocation()
	return err
}

// KernelCTLocation is KernelCTAvailable that also names the BTF the kfuncs
// were found in (vmlinux, or the nf_conntrack module's), for the preflight.
func KernelCTLocation() (string, error) {
	kct, err := probeKernelCT()
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrNoKernelCT, err)
	}
	return kct.Where, nil
}
