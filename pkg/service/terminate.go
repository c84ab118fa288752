package service

import (
	"errors"
	"fmt"
	"io"
	"io/fs"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// Gone is a backend that left the UDP frontends on FrontendPort in a
// Sync: connected UDP sockets the load balancer sent there through such a
// frontend are terminated by TerminateUDP. (The frontend's address is not
// compared: two UDP frontends on one port with one backend that leaves
// only one of them are rare, and a terminated socket reconnects.)
type Gone struct {
	FrontendPort uint16
	Backend      Backend
}

// ErrTerminateUnsupported: this kernel cannot destroy sockets from BPF
// (bpf_sock_destroy, Linux 6.5, and kernel BTF).
var ErrTerminateUnsupported = errors.New("terminating UDP sockets needs bpf_sock_destroy (Linux >= 6.5) and kernel BTF")

// terminator is the loaded iterator of bpf/sockterm.c.
type terminator struct {
	objs socktermObjects
	iter *link.Iter
}

// svcTerminatedSize is sizeof(struct svc_terminated): one record of the
// iterator's output per destroyed socket.
const svcTerminatedSize = 16

// TerminateUDP destroys the connected UDP sockets that the load balancer
// sent to a backend in gone (for that frontend port), in this process's
// network namespace and in each namespace file of netnsPaths (the pods').
// Their owners get ECONNABORTED and reconnect to a live backend, as
// kube-proxy's conntrack flush makes their datagrams do. It returns how
// many sockets it destroyed; a namespace that vanished meanwhile is skipped.
func (lb *LoadBalancer) TerminateUDP(gone []Gone, netnsPaths []string) (int, error) {
	if len(gone) == 0 {
		return 0, nil
	}
	lb.mu.Lock()
	defer lb.mu.Unlock()
	if lb.termErr != nil {
		return 0, lb.termErr // this kernel cannot: not tried again
	}
	if lb.term == nil {
		t, err := lb.loadTerminator()
		if err != nil {
			if errors.Is(err, ErrTerminateUnsupported) {
				lb.termErr = err
			}
			return 0, err
		}
		lb.term = t
	}
	keys := make([]socktermSvcGoneKey, 0, len(gone))
	for _, g := range gone {
		b := backendValue(g.Backend)
		k := socktermSvcGoneKey{Addr: b.Addr, Port: b.Port, FrontendPort: portKey(g.FrontendPort)}
		if err := lb.term.objs.SbSvcGone.Put(k, uint8(1)); err != nil {
			return 0, fmt.Errorf("write removed backend %s: %w", g.Backend, err)
		}
		keys = append(keys, k)
	}
	defer func() {
		for _, k := range keys {
			lb.term.objs.SbSvcGone.Delete(k)
		}
	}()
	n, err := lb.term.run()
	if err != nil {
		return 0, fmt.Errorf("terminate UDP sockets in the host namespace: %w", err)
	}
	var errs []error
	for _, p := range netnsPaths {
		err := netns.Do(p, func() error {
			k, err := lb.term.run()
			n += k
			return err
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("terminate UDP sockets in %s: %w", p, err))
		}
	}
	return n, errors.Join(errs...)
}

// loadTerminator loads bpf/sockterm.c against the live sb_svc_revnat.
func (lb *LoadBalancer) loadTerminator() (*terminator, error) {
	spec, err := loadSockterm()
	if err != nil {
		return nil, fmt.Errorf("load socket terminator spec: %w", err)
	}
	t := &terminator{}
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{"sb_svc_revnat": lb.objs.SbSvcRevnat}}
	if err := spec.LoadAndAssign(&t.objs, opts); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrTerminateUnsupported, err)
	}
	if t.iter, err = link.AttachIter(link.IterOptions{Program: t.objs.SvcUdpTerminate}); err != nil {
		t.objs.Close()
		return nil, fmt.Errorf("%w: attach the UDP socket iterator: %v", ErrTerminateUnsupported, err)
	}
	return t, nil
}

// run walks the UDP sockets of the calling thread's network namespace (an
// iterator instance takes the namespace of whoever opens it).
func (t *terminator) run() (int, error) {
	rd, err := t.iter.Open()
	if err != nil {
		return 0, err
	}
	defer rd.Close()
	out, err := io.ReadAll(rd)
	return len(out) / svcTerminatedSize, err
}

func (t *terminator) close() error {
	return errors.Join(t.iter.Close(), t.objs.Close())
}

// goneOf lists the backends of old that new no longer has, for a UDP
// frontend.
func goneOf(fe Frontend, old, new []Backend) []Gone {
	if fe.Proto != UDP {
		return nil
	}
	var out []Gone
	for _, b := range old {
		if !containsBackend(new, b) {
			out = append(out, Gone{FrontendPort: fe.Port, Backend: b})
		}
	}
	return out
}

func containsBackend(list []Backend, b Backend) bool {
	for _, x := range list {
		if x == b {
			return true
		}
	}
	return false
}
