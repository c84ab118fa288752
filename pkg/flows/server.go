package flows

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"
)

// DefaultSocket is where the agent serves flows and `sinabro observe`
// reads them: a unix socket, 0600 (root only), never a network listener.
const DefaultSocket = "/var/run/sinabro/observe.sock"

// Defaults: enough for a busy node's new connections; a drop flood is
// summarised (each event says how many were left out before it).
const (
	DefaultFlowRate = 20000
	DefaultDropRate = 1000
)

// Request is what a client asks for, as one JSON line: the last Last
// flows matching Filter (0: all the buffer holds, negative: none), then
// (Follow) every new one until it hangs up.
type Request struct {
	Last   int    `json:"last"`
	Follow bool   `json:"follow"`
	Filter Filter `json:"filter"`
}

// Message is one JSON line of the answer: a flow or an error. (A follower
// too slow to read loses flows; the agent logs how many.)
type Message struct {
	Flow *Flow `json:"flow,omitempty"`
	// Error ends an answer to a bad request.
	Error string `json:"error,omitempty"`
}

// Serve answers requests on a unix socket at path until ctx ends.
func Serve(ctx context.Context, path string, buf *Buffer, log *slog.Logger) error {
	l, err := listen(path)
	if err != nil {
		return fmt.Errorf("observe socket: %w", err)
	}
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	log.Info("serving flows", "socket", path)
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				os.Remove(path)
				return nil
			}
			return fmt.Errorf("observe socket: %w", err)
		}
		go serveConn(ctx, c, buf, log)
	}
}

// listen binds the socket in a private directory (0700) next to path,
// makes it 0600, then moves it into place: nobody else can connect at any
// moment, whatever the umask and the parent directory's mode.
func listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	private, err := os.MkdirTemp(filepath.Dir(path), ".observe-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(private)
	tmp := filepath.Join(private, "sock")
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	if err := os.Rename(tmp, path); err != nil { // replaces a stale socket
		l.Close()
		return nil, err
	}
	return l, nil
}

func serveConn(ctx context.Context, c net.Conn, buf *Buffer, log *slog.Logger) {
	defer c.Close()
	enc := json.NewEncoder(c)
	var req Request
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
		enc.Encode(Message{Error: "bad request: " + err.Error()})
		return
	}
	if err := req.Filter.Validate(); err != nil {
		enc.Encode(Message{Error: err.Error()})
		return
	}
	c.SetReadDeadline(time.Time{})
	var ch <-chan Flow
	var stop func() uint64
	if req.Follow { // subscribe before reading the buffer: nothing falls between
		ch, stop = buf.Follow(req.Filter)
		defer func() {
			if lost := stop(); lost > 0 {
				log.Info("an observe client lost flows it read too slowly", "lost", lost)
			}
		}()
	}
	if req.Last >= 0 { // negative: only what follows
		for _, f := range buf.Last(req.Last, req.Filter) {
			if err := enc.Encode(Message{Flow: &f}); err != nil {
				return
			}
		}
	}
	if !req.Follow {
		return
	}
	// A client hanging up is seen as a failed read.
	gone := make(chan struct{})
	go func() {
		var b [1]byte
		c.Read(b[:])
		close(gone)
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-gone:
			return
		case f := <-ch:
			if err := enc.Encode(Message{Flow: &f}); err != nil {
				return
			}
		}
	}
}

// Observe asks the agent at socket for flows and calls fn for each until
// the answer ends (Follow: until ctx ends).
func Observe(ctx context.Context, socket string, req Request, fn func(Flow) error) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return fmt.Errorf("reach the agent's flow socket (is the agent running with flow telemetry on, and are you root?): %w", err)
	}
	defer c.Close()
	go func() {
		<-ctx.Done()
		c.Close()
	}()
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return fmt.Errorf("send request: %w", err)
	}
	dec := json.NewDecoder(bufio.NewReader(c))
	for {
		var m Message
		if err := dec.Decode(&m); err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("read flows: %w", err)
		}
		switch {
		case m.Error != "":
			return errors.New(m.Error)
		case m.Flow != nil:
			if err := fn(*m.Flow); err != nil {
				return err
			}
		}
	}
}
