package sockmap

// The eBPF C source lives in bpf/ at the repository root; the generated
// objects are committed so `go build` needs no clang.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -type sock_counter sockops ../../bpf/sockops.c -- -I../../bpf/include -I../../bpf
