package lab

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/jsimonetti/rtnetlink/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/sinabro-io/sinabro/pkg/netns"
)

// Exchange sends count request lines to addr over one TCP connection and
// waits for each reply: the client side of the acceleration check, run by
// `sinabro lab exchange` inside a pod's namespace and cgroup.
func Exchange(ctx context.Context, addr string, count int) error {
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	for i := 0; i < count; i++ {
		if _, err := c.Write([]byte("exchange\n")); err != nil {
			return fmt.Errorf("exchange %d: %w", i, err)
		}
		if _, err := r.ReadString('\n'); err != nil {
			return fmt.Errorf("exchange %d: read reply: %w", i, err)
		}
	}
	return nil
}

// shortcutExchanges is how many request/response pairs the check sends.
const shortcutExchanges = 500

// ShortcutProbe checks that TCP between two pods of one node took the
// socket-level shortcut (TCP acceleration): the client's eth0 packet
// counters must stay nearly flat while it exchanges shortcutExchanges
// messages with the other pod (over the normal path that is at least two
// packets per exchange).
type ShortcutProbe struct {
	Node     string
	Src, Dst Endpoint
	Packets  uint64 // packets the client's eth0 sent during the exchanges
	OK       bool
	Err      string
}

func (c *Config) probeShortcut(ctx context.Context, exe string, p *ShortcutProbe) {
	before, err := txPackets(p.Src.Netns)
	if err != nil {
		p.Err = err.Error()
		return
	}
	cmd := exec.CommandContext(ctx, exe, "lab", "exchange", "--to",
		net.JoinHostPort(p.Dst.IP, strconv.Itoa(ServeTCPPort)), "--count", strconv.Itoa(shortcutExchanges))
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	// The client runs as a pod process would: in the pod's namespace and in
	// the node's pod cgroup, where the agent attached its sock_ops program.
	if cg := c.NodePodCgroup(p.Node); cg != "" {
		f, err := os.Open(cg)
		if err != nil {
			p.Err = err.Error()
			return
		}
		defer f.Close()
		cmd.SysProcAttr = &unix.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	}
	if err := netns.Do(netns.Path(p.Src.Netns), cmd.Run); err != nil {
		p.Err = fmt.Sprintf("exchange: %v: %s", err, strings.TrimSpace(out.String()))
		return
	}
	after, err := txPackets(p.Src.Netns)
	if err != nil {
		p.Err = err.Error()
		return
	}
	p.Packets = after - before
	// Handshake, FIN and stray ACKs are fine; the exchanges themselves
	// would be at least shortcutExchanges packets.
	p.OK = p.Packets < shortcutExchanges/10
	if !p.OK {
		p.Err = fmt.Sprintf("%d packets left the pod for %d exchanges: not accelerated", p.Packets, shortcutExchanges)
	}
}

// txPackets reads the packets eth0 sent in the pod namespace ns.
func txPackets(ns string) (uint64, error) {
	f, err := os.Open(netns.Path(ns))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	c, err := rtnetlink.Dial(&netlink.Config{NetNS: int(f.Fd())})
	if err != nil {
		return 0, fmt.Errorf("dial rtnetlink in %s: %w", ns, err)
	}
	defer c.Close()
	links, err := c.Link.List()
	if err != nil {
		return 0, fmt.Errorf("list links in %s: %w", ns, err)
	}
	for _, l := range links {
		if l.Attributes != nil && l.Attributes.Name == "eth0" && l.Attributes.Stats64 != nil {
			return l.Attributes.Stats64.TXPackets, nil
		}
	}
	return 0, fmt.Errorf("no eth0 statistics in %s", ns)
}
