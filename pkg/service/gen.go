package service

// The eBPF C source is bpf/service.c; the generated object is committed so
// `go build` needs no clang. Its enums come to Go with -type, so the
// counter names are not kept twice.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -type svc_reason -type svc_scope -type svc_flags -type svc_key -type svc_frontend -type svc_backend_key -type svc_backend -type svc_stat -type svc_name service ../../bpf/service.c -- -I../../bpf/include -I../../bpf
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel sockterm ../../bpf/sockterm.c -- -I../../bpf/include -I../../bpf
