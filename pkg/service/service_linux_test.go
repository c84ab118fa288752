package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/rlimit"

	"github.com/sinabro-io/sinabro/pkg/cgroup"
	"github.com/sinabro-io/sinabro/pkg/netns"
)

// bed is a network namespace with backends on loopback and a cgroup whose
// sockets the load balancer sees; sockets are opened in both by dial.
type bed struct {
	t      *testing.T
	ns     string // netns path
	cgroup string
	root   string
	lb     *LoadBalancer
}

func newBed(t *testing.T) *bed {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (netns, cgroups, BPF)")
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatalf("remove memlock rlimit: %v", err)
	}
	mnt, err := cgroup.V2Mount()
	if err != nil {
		t.Fatalf("cgroup v2: %v", err)
	}
	id := fmt.Sprintf("sbsvc%d-%s", os.Getpid()%100000, t.Name())
	b := &bed{t: t, cgroup: filepath.Join(mnt, id), root: filepath.Join("/sys/fs/bpf", id)}
	if b.ns, err = netns.Create(id); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if b.lb != nil {
			b.lb.Close()
		}
		if err := Cleanup(b.root); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		os.RemoveAll(b.root)
		os.Remove(b.cgroup)
		netns.Remove(b.ns)
	})
	if err := os.Mkdir(b.cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	netns.Do(b.ns, func() error { return exec("ip", "link", "set", "lo", "up") })
	b.enable()
	return b
}

func exec(args ...string) error {
	pid, err := syscall.ForkExec("/usr/sbin/"+args[0], args, &syscall.ProcAttr{Files: []uintptr{0, 1, 2}})
	if err != nil {
		pid, err = syscall.ForkExec("/sbin/"+args[0], args, &syscall.ProcAttr{Files: []uintptr{0, 1, 2}})
	}
	if err != nil {
		return err
	}
	var ws syscall.WaitStatus
	syscall.Wait4(pid, &ws, 0, nil)
	if ws.ExitStatus() != 0 {
		return fmt.Errorf("%v: exit %d", args, ws.ExitStatus())
	}
	return nil
}

func (b *bed) enable() {
	b.t.Helper()
	lb, err := Enable(context.Background(), Config{BPFRoot: b.root, CgroupPath: b.cgroup})
	if err != nil {
		b.t.Fatalf("enable: %v", err)
	}
	b.lb = lb
}

// server listens on loopback in the bed's netns and answers every TCP
// connection and UDP datagram with its name.
func (b *bed) server(name string, port uint16) Backend {
	b.t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	err := netns.Do(b.ns, func() error {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			return err
		}
		b.t.Cleanup(func() { l.Close(); u.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Write([]byte(name))
				c.Close()
			}
		}()
		go func() {
			buf := make([]byte, 64)
			for {
				_, from, err := u.ReadFrom(buf)
				if err != nil {
					return
				}
				u.WriteTo([]byte(name), from)
			}
		}()
		return nil
	})
	if err != nil {
		b.t.Fatal(err)
	}
	return netip.MustParseAddrPort(addr)
}

// socket runs open inside the bed's netns and cgroup.
func (b *bed) socket(open func() error) error {
	return netns.Do(b.ns, func() error {
		leave, err := cgroup.Enter(b.cgroup)
		if err != nil {
			return err
		}
		err = open()
		return errors.Join(err, leave())
	})
}

// tcp connects to dst and returns who answered and the peer address the
// socket reports (getpeername).
func (b *bed) tcp(dst string) (string, string, error) {
	var c net.Conn
	err := b.socket(func() (err error) {
		c, err = net.DialTimeout("tcp", dst, time.Second)
		return err
	})
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	got, err := io.ReadAll(c)
	return string(got), c.RemoteAddr().String(), err
}

// udp sends one datagram to dst from an unconnected socket and returns who
// answered and the source address recvmsg reported.
func (b *bed) udp(dst string) (string, string, error) {
	var c net.PacketConn
	err := b.socket(func() (err error) {
		c, err = net.ListenPacket("udp", "127.0.0.1:0")
		return err
	})
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	to, _ := net.ResolveUDPAddr("udp", dst)
	if _, err := c.WriteTo([]byte("hi"), to); err != nil {
		return "", "", err
	}
	c.SetDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 64)
	n, from, err := c.ReadFrom(buf)
	if err != nil {
		return "", "", err
	}
	return string(buf[:n]), from.String(), nil
}

var vip = netip.MustParseAddr("10.96.0.10")

func TestClusterIPTCPAndUDP(t *testing.T) {
	b := newBed(t)
	one, two := b.server("one", 18001), b.server("two", 18002)
	desired := map[Frontend]Entry{
		{Addr: vip, Port: 80, Proto: TCP}: {Name: "default/web:http", Backends: []Backend{one, two}},
		{Addr: vip, Port: 80, Proto: UDP}: {Name: "default/web:dns", Backends: []Backend{one, two}},
	}
	if st, err := b.lb.Sync(desired); err != nil || st.Written != 2 {
		t.Fatalf("sync: %+v %v", st, err)
	}
	seen := map[string]int{}
	for range 40 {
		who, peer, err := b.tcp("10.96.0.10:80")
		if err != nil {
			t.Fatalf("tcp: %v", err)
		}
		if peer != "10.96.0.10:80" {
			t.Fatalf("getpeername says %s, want the Service address", peer)
		}
		seen[who]++
		who, from, err := b.udp("10.96.0.10:80")
		if err != nil {
			t.Fatalf("udp: %v", err)
		}
		if from != "10.96.0.10:80" {
			t.Fatalf("reply seen from %s, want the Service address", from)
		}
		seen[who]++
	}
	if seen["one"] == 0 || seen["two"] == 0 {
		t.Fatalf("both backends should be used: %v", seen)
	}
	// Sockets outside the cgroup are not translated.
	err := netns.Do(b.ns, func() error {
		c, err := net.DialTimeout("tcp", "10.96.0.10:80", 200*time.Millisecond)
		if err == nil {
			c.Close()
			return errors.New("connected without a translation")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	rows, err := List(b.root)
	if err != nil || len(rows) != 2 || rows[0].Translated != 40 || len(rows[0].Backends) != 2 {
		t.Fatalf("list: %+v %v", rows, err)
	}
	c, err := Counters(b.root)
	if err != nil || c["connect"] != 40 || c["sendmsg"] != 40 || c["recvmsg"] < 40 || c["getpeername"] < 40 {
		t.Fatalf("counters: %v %v", c, err)
	}
}

func TestNoBackendRefusesAtOnce(t *testing.T) {
	b := newBed(t)
	b.lb.Sync(map[Frontend]Entry{{Addr: vip, Port: 80, Proto: TCP}: {Name: "default/empty:http"}})
	start := time.Now()
	_, _, err := b.tcp("10.96.0.10:80")
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("want connection refused, got %v", err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("refusal took %v", d)
	}
	rows, _ := List(b.root)
	if len(rows) != 1 || rows[0].Refused != 1 {
		t.Fatalf("rows: %+v", rows)
	}
}

func TestNodePortOnNodeAddresses(t *testing.T) {
	b := newBed(t)
	one := b.server("one", 18001)
	netns.Do(b.ns, func() error { return exec("ip", "addr", "add", "192.0.2.7/24", "dev", "lo") })
	if err := b.lb.SetNodeAddrs([]netip.Addr{netip.MustParseAddr("192.0.2.7")}); err != nil {
		t.Fatal(err)
	}
	b.lb.Sync(map[Frontend]Entry{{NodePort: true, Port: 30080, Proto: TCP}: {Name: "default/np:http", Backends: []Backend{one}}})
	for _, dst := range []string{"192.0.2.7:30080", "127.0.0.1:30080"} {
		if who, _, err := b.tcp(dst); err != nil || who != "one" {
			t.Fatalf("%s: %q %v", dst, who, err)
		}
	}
	// Not on an address that is not the node's.
	b.lb.SetNodeAddrs(nil)
	if _, _, err := b.tcp("192.0.2.7:30080"); err == nil {
		t.Fatal("NodePort answered on an address no longer listed")
	}
}

func TestAffinityKeepsClientOnBackend(t *testing.T) {
	b := newBed(t)
	one, two := b.server("one", 18001), b.server("two", 18002)
	b.lb.Sync(map[Frontend]Entry{{Addr: vip, Port: 80, Proto: TCP}: {Name: "default/sticky:http", Backends: []Backend{one, two}, Affinity: time.Hour}})
	first, _, err := b.tcp("10.96.0.10:80")
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if who, _, _ := b.tcp("10.96.0.10:80"); who != first {
			t.Fatalf("affinity broken: %s after %s", who, first)
		}
	}
	// The remembered backend leaves: the client moves to one that is left.
	left := two
	if first == "two" {
		left = one
	}
	b.lb.Sync(map[Frontend]Entry{{Addr: vip, Port: 80, Proto: TCP}: {Name: "default/sticky:http", Backends: []Backend{left}, Affinity: time.Hour}})
	if who, _, _ := b.tcp("10.96.0.10:80"); who == first {
		t.Fatalf("still sent to removed backend %s", first)
	}
}

// TestUpdatesNeverEmpty flips a Service between two backend sets while
// clients connect without pause: no connect may fail, and an agent
// restart (close, enable again) in the middle changes nothing.
func TestUpdatesNeverEmptyAndRestartAdopts(t *testing.T) {
	b := newBed(t)
	one, two, three := b.server("one", 18001), b.server("two", 18002), b.server("three", 18003)
	fe := Frontend{Addr: vip, Port: 80, Proto: TCP}
	sets := [][]Backend{{one, two}, {three}, {two, three}}
	b.lb.Sync(map[Frontend]Entry{fe: {Name: "default/flip:http", Backends: sets[0]}})
	var stop atomic.Bool
	var failures, ok atomic.Int64
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for !stop.Load() {
				if _, _, err := b.tcp("10.96.0.10:80"); err != nil {
					failures.Add(1)
					t.Logf("connect: %v", err)
				} else {
					ok.Add(1)
				}
			}
		})
	}
	for i := range 300 {
		if _, err := b.lb.Sync(map[Frontend]Entry{fe: {Name: "default/flip:http", Backends: sets[i%3]}}); err != nil {
			t.Fatal(err)
		}
		if i == 150 {
			b.lb.Close()
			b.enable()
			if st, err := b.lb.Sync(map[Frontend]Entry{fe: {Name: "default/flip:http", Backends: sets[i%3]}}); err != nil || st.Written != 0 {
				t.Fatalf("after restart the same state wrote %+v, %v", st, err)
			}
		}
		time.Sleep(time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	if failures.Load() != 0 || ok.Load() < 50 {
		t.Fatalf("%d connects failed, %d succeeded", failures.Load(), ok.Load())
	}
	// Nothing is left of the old sets.
	n := 0
	var k serviceSvcBackendKey
	var v serviceSvcBackend
	for it := b.lb.objs.SbSvcBackends.Iterate(); it.Next(&k, &v); {
		n++
	}
	if n != len(sets[299%3]) {
		t.Fatalf("%d backend slots left, want %d", n, len(sets[299%3]))
	}
	// Deleting the Service leaves the maps empty.
	if st, err := b.lb.Sync(nil); err != nil || st.Deleted != 1 || st.Frontends != 0 {
		t.Fatalf("delete: %+v %v", st, err)
	}
}

// A connected UDP socket keeps its backend; when the backend leaves the
// Service, TerminateUDP destroys the socket (ECONNABORTED) and a new one
// reaches a live backend. Unconnected sockets, sockets of other ports and
// sockets not connected through the load balancer are left alone.
func TestUDPSocketsToRemovedBackendTerminated(t *testing.T) {
	b := newBed(t)
	one, two := b.server("one", 18011), b.server("two", 18012)
	dns := Frontend{Addr: vip, Port: 53, Proto: UDP}
	if _, err := b.lb.Sync(map[Frontend]Entry{dns: {Name: "kube-system/dns:dns", Backends: []Backend{one}}}); err != nil {
		t.Fatal(err)
	}
	var conn, direct *net.UDPConn
	err := b.socket(func() (err error) {
		if conn, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(vip, 53))); err != nil {
			return err
		}
		direct, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(one))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	defer direct.Close()
	ask := func(c *net.UDPConn) (string, error) {
		if _, err := c.Write([]byte("hi")); err != nil {
			return "", err
		}
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		return string(buf[:n]), err
	}
	if who, err := ask(conn); err != nil || who != "one" {
		t.Fatalf("connected socket: %q, %v; want one", who, err)
	}

	st, err := b.lb.Sync(map[Frontend]Entry{dns: {Name: "kube-system/dns:dns", Backends: []Backend{two}}})
	if err != nil || len(st.GoneUDP) != 1 || st.GoneUDP[0] != (Gone{FrontendPort: 53, Backend: one}) {
		t.Fatalf("sync: %+v, %v; want one gone from port 53", st, err)
	}
	// Without termination the connected socket would stay on "one".
	if who, err := ask(conn); err != nil || who != "one" {
		t.Fatalf("before TerminateUDP: %q, %v; want still one", who, err)
	}
	n, err := b.lb.TerminateUDP(st.GoneUDP, []string{b.ns, "/run/netns/sinabro-no-such-netns"})
	if errors.Is(err, ErrTerminateUnsupported) {
		t.Skipf("this kernel cannot destroy sockets from BPF: %v", err)
	}
	if err != nil || n != 1 {
		t.Fatalf("TerminateUDP = %d, %v; want 1 socket", n, err)
	}
	// The owner learns it on its next read; the socket is disconnected,
	// so a write without an address fails too.
	conn.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := conn.Read(make([]byte, 64)); !errors.Is(err, syscall.ECONNABORTED) {
		t.Errorf("read on the terminated socket: %v, want ECONNABORTED", err)
	}
	if _, err := conn.Write([]byte("hi")); !errors.Is(err, syscall.EDESTADDRREQ) {
		t.Errorf("write on the terminated socket: %v, want EDESTADDRREQ", err)
	}
	if who, err := ask(direct); err != nil || who != "one" {
		t.Errorf("a socket connected to the backend's own address: %q, %v; want it untouched (one)", who, err)
	}
	var again *net.UDPConn
	if err := b.socket(func() (err error) {
		again, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(vip, 53)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if who, err := ask(again); err != nil || who != "two" {
		t.Errorf("a new socket: %q, %v; want two", who, err)
	}
	// Nothing left to terminate.
	if n, err := b.lb.TerminateUDP(st.GoneUDP, []string{b.ns}); err != nil || n != 0 {
		t.Errorf("second TerminateUDP = %d, %v; want 0", n, err)
	}
}
