package datapath

// The eBPF C sources live in bpf/ at the repository root; the generated
// objects are committed so `go build` needs no clang.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type prog_id -type reason -type lb_backend -type pol_endpoint -type pol_rule_key -type pol_ct_key -type pol_ct -type pol_drop_key datapath ../../bpf/datapath.c -- -I../../bpf/include -I../../bpf
