package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/sync/errgroup"
)

// Serve runs the lab's test server in the current network namespace: a TCP
// server on ServeTCPPort that answers each line (or an HTTP GET) with the
// peer address it sees, and a UDP echo on ServeUDPPort that does the same.
// The reply "sinabro-lab <name> peer=<ip:port>" lets `lab check` see NAT.
func Serve(ctx context.Context, name string) error {
	var lc net.ListenConfig
	tl, err := lc.Listen(ctx, "tcp", fmt.Sprintf(":%d", ServeTCPPort))
	if err != nil {
		return fmt.Errorf("listen tcp: %w", err)
	}
	ul, err := lc.ListenPacket(ctx, "udp4", fmt.Sprintf(":%d", ServeUDPPort))
	if err != nil {
		tl.Close()
		return fmt.Errorf("listen udp: %w", err)
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		<-ctx.Done()
		tl.Close()
		ul.Close()
		return nil
	})
	g.Go(func() error {
		for {
			c, err := tl.Accept()
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("accept: %w", err)
			}
			go serveConn(c, name)
		}
	})
	// Reply from the address the datagram was sent to: on a node with
	// several addresses the routing choice could differ, and a connected
	// client socket drops replies from another source.
	pc := ipv4.NewPacketConn(ul)
	if err := pc.SetControlMessage(ipv4.FlagDst, true); err != nil {
		tl.Close()
		ul.Close()
		return fmt.Errorf("enable IP_PKTINFO: %w", err)
	}
	g.Go(func() error {
		buf := make([]byte, 2048)
		for {
			_, cm, peer, err := pc.ReadFrom(buf)
			if err != nil {
				if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
					return nil
				}
				return fmt.Errorf("read udp: %w", err)
			}
			var out *ipv4.ControlMessage
			if cm != nil && cm.Dst != nil {
				out = &ipv4.ControlMessage{Src: cm.Dst}
			}
			pc.WriteTo([]byte(reply(name, peer)), out, peer)
		}
	})
	return g.Wait()
}

func reply(name string, peer net.Addr) string {
	return fmt.Sprintf("sinabro-lab %s peer=%s\n", name, peer)
}

func serveConn(c net.Conn, name string) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		msg := reply(name, c.RemoteAddr())
		if strings.HasPrefix(line, "GET ") {
			// Enough HTTP for curl: skip the headers, answer, close.
			for {
				h, err := r.ReadString('\n')
				if err != nil || strings.TrimSpace(h) == "" {
					break
				}
			}
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(msg), msg)
			return
		}
		if _, err := c.Write([]byte(msg)); err != nil {
			return
		}
	}
}

// parsePeer extracts the peer IP from a server reply.
func parsePeer(reply string) string {
	_, after, ok := strings.Cut(reply, "peer=")
	if !ok {
		return ""
	}
	host, _, err := net.SplitHostPort(strings.TrimSpace(after))
	if err != nil {
		return ""
	}
	return host
}
