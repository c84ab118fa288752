// Package sockmap accelerates TCP between pods of one node: a sock_ops
// program on the node's pod cgroup puts established sockets whose both
// ends are local pods in a sockhash, and an sk_msg program on that
// sockhash hands each send directly to the peer socket's receive queue
// (bpf_msg_redirect_hash with BPF_F_INGRESS), skipping TCP/IP, the veths
// and the host's routing.
//
// Everything lives under <Config.BPFRoot>/sockmap:
//
//	maps/<map name>   sockhash, pod prefixes, connection state, settings, counters
//	links/sock_ops    cgroup link on Config.CgroupPath
//	links/sk_msg      sockmap link on the sockhash
//
// A restarted agent adopts what it finds (links are re-pointed to the new
// programs with link.Update). The agent uses it like this:
//
//	a, err := sockmap.Enable(ctx, sockmap.Config{BPFRoot: root, CgroupPath: cg, PodPrefixes: pods, Excluded: optedOut})
//	defer a.Close()                          // leaves acceleration running
//	prometheus.MustRegister(a.Collector())
//	a.SetPods(pods, optedOut)                // local pods or annotations changed
//
// and, while nothing is to be accelerated (--tcp-acceleration off and no
// pod opted in), calls Disable(ctx, root) (a.Disable in a process that
// holds an Accelerator): no new socket is accelerated and
// established ones move to the normal TCP path at their next send, without
// losing queued data. Cleanup(root) removes everything (uninstall).
// For `sinabro debug`: ListPairs(root) and ListStats(root).
//
// Correctness rules the programs follow (see bpf/sockops.c):
//   - A socket redirects only if every byte it sent so far was redirected,
//     and stops for good otherwise: the receiver reads redirected data
//     first, so mixing paths the other way round would reorder the stream.
//   - Redirected data has no flow control: a side that sent Window bytes
//     without hearing back moves to TCP, which bounds what a stalled
//     reader can queue. A TCP-bound socket leaves the sockhash (and its
//     tcp_bpf send path, which costs bulk streams a third of their
//     throughput) when nothing was or can be redirected to it: at once
//     if its peer never redirected; otherwise its peer is moved to TCP
//     too and it leaves once its queue of redirected data is empty
//     (sock_ops reads the psock's queue through kernel BTF, CO-RE) and no
//     redirect of the peer is in flight. A download after a redirected
//     request is the case this serves. "In flight" is the subtle part: the
//     kernel queues a redirect at the receiver after the sk_msg program
//     returned, with the sender's lock released, so a count kept by the
//     program cannot see it (an earlier attempt lost data that way). What
//     does cover it is the sender's sendmsg, which holds a reference on
//     the sender's psock from start to end: a side on TCP for good whose
//     psock holds only the sockhash's reference (and, seen from its own
//     sk_msg, its own sendmsg's) has nothing in flight and never will.
//   - A socket that reads with splice(2) (Go's io.Copy between two TCP
//     connections) never sees redirected data: the kernel (6.18) queues
//     it where splice does not look. Pods doing that must be left out of
//     PodPrefixes.
//   - A socket leaves the sockhash only as above or when it is closed
//     (the kernel's doing; a socket reaching TCP_CLOSE, e.g. a half-closer
//     entering TIME_WAIT, stays until close() so its owner can still read).
//     Leaving drops data redirected to it and not yet read, which is why
//     userspace never deletes sockets and Cleanup is for uninstalling.
//   - The peer socket is found by the reversed 4-tuple: addresses must not
//     be translated between the two sockets (a ClusterIP connection is
//     seen as pod→VIP by the client and is not accelerated; socket-level
//     service translation at connect() would make it eligible).
package sockmap

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sinabro-io/sinabro/pkg/bpffs"
)

// DefaultWindow is the default Config.Window.
const DefaultWindow = 4 << 20

// Unlimited as Config.Window lets redirected data queue without bound.
const Unlimited = ^uint64(0)

// Config describes the acceleration of one node.
type Config struct {
	// BPFRoot is this agent's bpffs directory (e.g. /sys/fs/bpf/sinabro);
	// pins go to BPFRoot/sockmap. Agents sharing a kernel need distinct roots.
	BPFRoot string
	// CgroupPath is the cgroup v2 directory holding the node's pod
	// processes (and only them): sock_ops attaches there.
	CgroupPath string
	// PodPrefixes are the local pods' addresses (/32) or the node's pod
	// CIDRs: a socket is accelerated only when both its ends are inside.
	// Leave out pods that read sockets with splice(2) (see package doc).
	PodPrefixes []netip.Prefix
	// Excluded are pod addresses inside PodPrefixes that are never
	// accelerated (pods that opted out).
	Excluded []netip.Addr
	// Window bounds the data queued for a peer that does not read:
	// redirected bytes have no TCP flow control, so a side that has sent
	// Window bytes since its peer last sent anything moves to TCP for
	// good (request/response traffic never gets there; one-way streams
	// do). Zero takes DefaultWindow; Unlimited removes the bound.
	Window uint64
	// PolicyEpoch: see SetPolicyEpoch.
	PolicyEpoch uint32
	// MsgThreshold: a send of at least this many bytes moves its side to
	// TCP for good. Zero means no threshold (redirecting measured faster
	// at every send size while the reader keeps up).
	MsgThreshold uint32
}

func (c *Config) validate() error {
	switch {
	case c.BPFRoot == "":
		return errors.New("BPFRoot is required")
	case c.CgroupPath == "":
		return errors.New("CgroupPath is required")
	}
	for _, p := range c.PodPrefixes {
		if !p.IsValid() || !p.Addr().Is4() {
			return fmt.Errorf("pod prefix %v is not IPv4", p)
		}
	}
	return nil
}

// settings mirrors struct sock_cfg in bpf/sockops.c.
func (c *Config) settings(enabled bool) sockopsSockCfg {
	s := sockopsSockCfg{MsgThreshold: c.MsgThreshold, Window: c.Window, PolicyEpoch: c.PolicyEpoch}
	switch c.Window {
	case 0:
		s.Window = DefaultWindow
	case Unlimited:
		s.Window = 0
	}
	if enabled {
		s.Enabled = 1
	}
	return s
}

// Pin-path layout.
func dir(root string) string      { return filepath.Join(root, "sockmap") }
func mapsDir(root string) string  { return filepath.Join(dir(root), "maps") }
func linksDir(root string) string { return filepath.Join(dir(root), "links") }

const (
	linkSockOps = "sock_ops"
	linkSkMsg   = "sk_msg"
)

// Accelerator is enabled acceleration. Close releases this process's
// handles; the pinned programs keep running.
type Accelerator struct {
	cfg     Config
	objs    sockopsObjects
	sockOps link.Link
	skMsg   link.Link
}

// Enable loads the programs, creates or adopts the pinned maps, fills the
// pod prefixes and attaches (or re-points) both links.
func Enable(ctx context.Context, cfg Config) (*Accelerator, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("sockmap config: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := bpffs.Ensure(cfg.BPFRoot, mapsDir(cfg.BPFRoot), linksDir(cfg.BPFRoot)); err != nil {
		return nil, err
	}
	a := &Accelerator{cfg: cfg}
	if err := loadObjects(&a.objs, mapsDir(cfg.BPFRoot), bpffs.SharedDir(cfg.BPFRoot)); err != nil {
		return nil, err
	}
	if err := a.SetPods(cfg.PodPrefixes, cfg.Excluded); err != nil {
		a.Close()
		return nil, err
	}
	// Settings before links: a socket added by the new sock_ops must find
	// acceleration enabled.
	if err := a.objs.SbSockCfg.Put(uint32(0), cfg.settings(true)); err != nil {
		a.Close()
		return nil, fmt.Errorf("write sockmap settings: %w", err)
	}
	var err error
	if a.skMsg, err = attachSkMsg(filepath.Join(linksDir(cfg.BPFRoot), linkSkMsg), a.objs.SbSockHash, a.objs.SockRedirect); err != nil {
		a.Close()
		return nil, err
	}
	if a.sockOps, err = bpffs.AttachCgroup(filepath.Join(linksDir(cfg.BPFRoot), linkSockOps), cfg.CgroupPath, a.objs.SockOps, ebpf.AttachCGroupSockOps); err != nil {
		a.Close()
		return nil, err
	}
	return a, nil
}

func loadObjects(objs *sockopsObjects, pinDir, sharedDir string) error {
	spec, err := loadSockops()
	if err != nil {
		return fmt.Errorf("load sockops spec: %w", err)
	}
	// Connection state of an older layout is dropped on upgrade: its
	// sockets then pass through TCP (never redirect again, which keeps
	// their streams in order) and stay in the sockhash until closed.
	return bpffs.LoadPinnedShared(spec, objs, pinDir, sharedDir, "sockops", ebpf.ProgramOptions{}, "sb_sock_conns", "sb_sock_cfg")
}

// attachSkMsg attaches prog as the sk_msg verdict of the sockhash with a
// pinned bpf_link (kernel >= 6.10), updating an existing one in place.
func attachSkMsg(path string, hash *ebpf.Map, prog *ebpf.Program) (link.Link, error) {
	if l, err := link.LoadPinnedLink(path, nil); err == nil {
		if err := l.Update(prog); err == nil {
			return l, nil
		}
		// A link to an older sockhash (recreated maps): replace it.
		l.Unpin()
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("load pinned link %s: %w", path, err)
	}
	l, err := link.AttachRawLink(link.RawLinkOptions{Target: hash.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict})
	if err != nil {
		return nil, fmt.Errorf("attach sk_msg to sockhash: %w", err)
	}
	if err := l.Pin(path); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin sk_msg link %s: %w", path, err)
	}
	return l, nil
}

// SetPolicyEpoch moves the policy epoch: connections established before
// leave acceleration (TCP for good) at their next send, so that their
// bytes cross tc, where a NetworkPolicy change that denies them applies.
func (a *Accelerator) SetPolicyEpoch(epoch uint32) error {
	if a.cfg.PolicyEpoch == epoch {
		return nil
	}
	a.cfg.PolicyEpoch = epoch
	if err := a.objs.SbSockCfg.Put(uint32(0), a.cfg.settings(true)); err != nil {
		return fmt.Errorf("write sockmap settings: %w", err)
	}
	return nil
}

// SetPods makes the local pod set exactly prefixes minus the excluded
// addresses (stored as /32 entries with value 0, which the longest-prefix
// match finds first). Sockets already accelerated stay so.
func (a *Accelerator) SetPods(prefixes []netip.Prefix, excluded []netip.Addr) error {
	want := map[sockopsPodKey]uint8{}
	for _, p := range prefixes {
		if !p.IsValid() || !p.Addr().Is4() {
			return fmt.Errorf("pod prefix %v is not IPv4", p)
		}
		want[podKey(p.Masked())] = 1
	}
	for _, ip := range excluded {
		if ip.Is4() {
			want[podKey(netip.PrefixFrom(ip, 32))] = 0
		}
	}
	m := a.objs.SbSockPods
	var stale []sockopsPodKey
	var k sockopsPodKey
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list pod prefixes: %w", err)
	}
	for k, member := range want {
		if err := m.Put(k, member); err != nil {
			return fmt.Errorf("add pod prefix %v: %w", podPrefix(k), err)
		}
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete pod prefix %v: %w", podPrefix(k), err)
		}
	}
	a.cfg.PodPrefixes, a.cfg.Excluded = prefixes, excluded
	return nil
}

func podKey(p netip.Prefix) sockopsPodKey {
	b := p.Addr().As4()
	return sockopsPodKey{Prefixlen: uint32(p.Bits()), Addr: nativeFromBytes(b)}
}

func podPrefix(k sockopsPodKey) netip.Prefix {
	return netip.PrefixFrom(addrFromNative(k.Addr), int(k.Prefixlen))
}

// Close releases the process's handles; acceleration keeps running.
func (a *Accelerator) Close() error {
	var errs []error
	for _, l := range []link.Link{a.sockOps, a.skMsg} {
		if l != nil {
			errs = append(errs, l.Close())
		}
	}
	errs = append(errs, a.objs.Close())
	return errors.Join(errs...)
}

// Disable stops acceleration under root: no new socket is accelerated,
// and accelerated sockets move to the normal TCP path at their next send
// (their already redirected data is still read first, in order). Sockets
// stay in the pinned sockhash until they close. A root without
// acceleration is not an error.
func Disable(ctx context.Context, root string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var errs []error
	cfgPath := filepath.Join(mapsDir(root), "sb_sock_cfg")
	if m, err := ebpf.LoadPinnedMap(cfgPath, nil); err == nil {
		// The sk_msg program of already accelerated sockets keeps running
		// after its link is gone (a socket holds the program it was added
		// with), so it is told here, before detaching.
		var s sockopsSockCfg
		if err := m.Lookup(uint32(0), &s); err != nil {
			errs = append(errs, fmt.Errorf("read sockmap settings: %w", err))
		}
		s.Enabled = 0
		if err := m.Put(uint32(0), s); err != nil {
			errs = append(errs, fmt.Errorf("disable sockmap settings: %w", err))
		}
		m.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("load %s: %w", cfgPath, err))
	}
	for _, name := range []string{linkSockOps, linkSkMsg} {
		if err := bpffs.UnpinLink(filepath.Join(linksDir(root), name)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Attached reports whether the programs are attached under root: Enable
// was called and neither Disable nor Cleanup since.
func Attached(root string) bool {
	_, err := os.Stat(filepath.Join(linksDir(root), linkSockOps))
	return err == nil
}

// Disable is Disable(ctx, root) for this accelerator's root, closing its
// link handles too so the programs are detached at once.
func (a *Accelerator) Disable(ctx context.Context) error {
	err := Disable(ctx, a.cfg.BPFRoot)
	for _, l := range []*link.Link{&a.sockOps, &a.skMsg} {
		if *l != nil {
			err = errors.Join(err, (*l).Close())
			*l = nil
		}
	}
	return err
}

// Cleanup disables acceleration and removes every pin under root's
// sockmap directory. Sockets still in the sockhash return to plain TCP;
// data redirected to them and not yet read is lost, so this is for
// uninstalling, not for turning acceleration off (Disable).
func Cleanup(root string) error {
	errs := []error{Disable(context.Background(), root)}
	if err := os.RemoveAll(dir(root)); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir(root), err))
	}
	errs = append(errs, bpffs.RemoveSharedIfAlone(root))
	return errors.Join(errs...)
}
