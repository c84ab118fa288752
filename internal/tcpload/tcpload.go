//go:build linux

// Package tcpload is the TCP workload of the acceleration tests and
// benchmarks (pkg/sockmap, test/e2e): a server that speaks one operation
// per connection and clients that run named scenarios against it, checking
// every byte. Test binaries run both inside pod network namespaces.
package tcpload

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The server (Serve) speaks one operation per connection, chosen by its
// first byte:
//
//	'e' echo with io.Copy(conn, conn): Go splices socket → pipe → socket
//	'b' echo with a plain read/write loop
//	's' sink: read to EOF (the client half-closes), answer "<n> <sha256>"
//	'r' source: read size and chunk (2×uint64), send size bytes, close
//	'x' read 4 bytes, then reset the connection (SO_LINGER 0)
//	'q' answer the number of other connections still being handled
//	'u' read size (uint64), send size bytes with io.Copy from a Unix
//	    stream socket: Go splices unix → pipe → this TCP socket
//
// ServeHTTP answers GET /bytes?n=N with N bytes of the test stream and
// anything else with a fixed 64-byte body. Run (below) lists the client
// scenarios.

// Result is what a client scenario reports.
type Result struct {
	OK       bool   `json:"ok"`
	Err      string `json:"err,omitempty"`
	Sent     int64  `json:"sent"`
	Received int64  `json:"received"`
	SentSHA  string `json:"sent_sha,omitempty"`
	RecvSHA  string `json:"recv_sha,omitempty"`
	Note     string `json:"note,omitempty"`
	Nanos    int64  `json:"nanos"` // the scenario's duration
	// Conns and ConnectNanos: connections opened by many-for and the
	// time spent in their connect() calls (first-packet latency).
	Conns        int64 `json:"conns,omitempty"`
	ConnectNanos int64 `json:"connect_nanos,omitempty"`
}

var active atomic.Int64

// Serve runs the test server on ln until ln fails.
func Serve(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go handle(c.(*net.TCPConn))
	}
}

func handle(c *net.TCPConn) {
	active.Add(1)
	defer active.Add(-1)
	defer c.Close()
	var op [1]byte
	if _, err := io.ReadFull(c, op[:]); err != nil {
		return
	}
	switch op[0] {
	case 'e':
		io.Copy(c, c) // splice(2) through a pipe
		c.CloseWrite()
	case 'b':
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				break
			}
		}
		c.CloseWrite()
	case 's':
		h := sha256.New()
		n, _ := io.Copy(h, c)
		fmt.Fprintf(c, "%d %x\n", n, h.Sum(nil))
	case 'r':
		var hdr [16]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		size, chunk := binary.BigEndian.Uint64(hdr[:8]), binary.BigEndian.Uint64(hdr[8:])
		writeStream(c, int64(size), int(chunk), 2)
	case 'x':
		var b [4]byte
		io.ReadFull(c, b[:])
		c.SetLinger(0)
	case 'q':
		fmt.Fprintf(c, "%d\n", active.Load()-1)
	case 'd': // download: read size (uint64), send that many zero bytes
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		buf := make([]byte, 64<<10)
		for left := int64(binary.BigEndian.Uint64(hdr[:])); left > 0; left -= int64(len(buf)) {
			if left < int64(len(buf)) {
				buf = buf[:left]
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	case 'z': // a reader that stalls for 2 s, then drains
		time.Sleep(2 * time.Second)
		io.Copy(io.Discard, c)
	case 'u':
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		size := int64(binary.BigEndian.Uint64(hdr[:]))
		fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
		if err != nil {
			return
		}
		w, r := os.NewFile(uintptr(fds[0]), "w"), os.NewFile(uintptr(fds[1]), "r")
		rc, err := net.FileConn(r)
		r.Close()
		if err != nil {
			w.Close()
			return
		}
		defer rc.Close()
		go func() {
			writeStream(w, size, 64<<10, 2)
			w.Close()
		}()
		io.Copy(c, rc) // *TCPConn.ReadFrom(*UnixConn): splice
	}
}

// ServeHTTP runs the HTTP server on ln: the benchmark's same-node pod
// server (a fixed small body), and GET /bytes?n=N for the tests.
func ServeHTTP(ln net.Listener) error {
	body := bytes.Repeat([]byte("x"), 64)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/bytes" {
			n, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
			w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
			writeStream(w, n, 32<<10, 3)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})}
	return srv.Serve(ln)
}

// stream is a deterministic pseudo-random byte source.
func stream(seed uint64) *rand.ChaCha8 {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	return rand.NewChaCha8(s)
}

// writeStream writes size bytes of stream(seed) in writes of chunk bytes
// and returns the sha256 of what it wrote.
func writeStream(w io.Writer, size int64, chunk int, seed uint64) (string, error) {
	src, h := stream(seed), sha256.New()
	buf := make([]byte, chunk)
	for left := size; left > 0; {
		n := int64(len(buf))
		if n > left {
			n = left
		}
		src.Read(buf[:n])
		h.Write(buf[:n])
		if _, err := w.Write(buf[:n]); err != nil {
			return "", err
		}
		left -= n
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func streamSHA(size int64, seed uint64) string {
	s, _ := writeStream(io.Discard, size, 64<<10, seed)
	return s
}

func dial(addr string, op byte) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	if _, err := tc.Write([]byte{op}); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

// Run runs "name:arg:arg..." against the server at addr (the HTTP
// server's for http):
//
//	pingpong:<rounds>:<size>:<op>    request/response (op b or e), every reply compared
//	pingpong-for:<secs>:<size>:<op>  the same for a duration
//	stream:<size>:<chunk>:<op>       stream out, half-close, the echo hashed and compared
//	sink:<size>:<chunk>              stream out, half-close, the server's hash compared
//	source:<size>:<chunk>            the server streams, hashed and compared
//	many:<conns>                     one small pingpong per connection
//	many-for:<secs>                  the same for a duration, connects timed
//	parallel:<n>:<scenario>          n copies at once
//	rst                              resets both ways
//	download:<size>                  request, then size bytes one way (speed, no hash)
//	stalled:<size>                   bytes accepted while the reader stalls
//	unixsplice:<size>                the server splices from a Unix socket
//	http:<size>                      GET /bytes?n=<size>, hashed and compared
func Run(addr, scenario string) Result {
	parts := strings.Split(scenario, ":")
	num := func(i int) int64 {
		if i >= len(parts) {
			return 0
		}
		n, _ := strconv.ParseInt(parts[i], 10, 64)
		return n
	}
	var r Result
	start := time.Now()
	err := func() error {
		switch parts[0] {
		case "pingpong": // pingpong:rounds:size:op
			return pingpong(addr, &r, int(num(1)), int(num(2)), parts[3][0], 0)
		case "pingpong-for": // pingpong-for:secs:size:op
			return pingpong(addr, &r, 0, int(num(2)), parts[3][0], time.Duration(num(1))*time.Second)
		case "http": // http:size
			return httpGet(addr, &r, num(1))
		case "stream": // stream:size:chunk:op — echo, half-close, compare
			return echoStream(addr, &r, num(1), int(num(2)), parts[3][0])
		case "sink": // sink:size:chunk
			return sink(addr, &r, num(1), int(num(2)))
		case "source": // source:size:chunk
			return source(addr, &r, num(1), int(num(2)))
		case "many": // many:conns
			for i := range int(num(1)) {
				if err := pingpong(addr, &r, 1, 100, 'b', 0); err != nil {
					return fmt.Errorf("connection %d: %w", i, err)
				}
			}
			return nil
		case "many-for": // many-for:secs — short connections for a duration
			for end := time.Now().Add(time.Duration(num(1)) * time.Second); time.Now().Before(end); {
				if err := shortConn(addr, &r); err != nil {
					return fmt.Errorf("connection %d: %w", r.Conns, err)
				}
			}
			return nil
		case "parallel": // parallel:n:<scenario> — n copies at once
			return parallel(addr, &r, int(num(1)), strings.Join(parts[2:], ":"))
		case "rst":
			return rst(addr, &r)
		case "download": // download:size — transport speed, no hashing
			return download(addr, &r, num(1))
		case "stalled": // stalled:size — bytes accepted while the reader stalls
			return stalled(addr, &r, num(1))
		case "unixsplice": // unixsplice:size
			return unixSplice(addr, &r, num(1))
		}
		return fmt.Errorf("unknown scenario %q", scenario)
	}()
	if err != nil {
		r.Err = err.Error()
	} else {
		r.OK = true
	}
	r.Nanos = time.Since(start).Nanoseconds()
	return r
}

// parallel runs n copies of scenario concurrently (each checks its own
// bytes) and adds up what they sent and received.
func parallel(addr string, r *Result, n int, scenario string) error {
	results := make([]Result, n)
	var wg sync.WaitGroup
	for i := range results {
		wg.Go(func() { results[i] = Run(addr, scenario) })
	}
	wg.Wait()
	var errs []error
	for i, c := range results {
		r.Sent += c.Sent
		r.Received += c.Received
		r.Conns += c.Conns
		r.ConnectNanos += c.ConnectNanos
		if !c.OK {
			errs = append(errs, fmt.Errorf("copy %d: %s", i, c.Err))
		}
	}
	return errors.Join(errs...)
}

// shortConn opens one connection, times its connect(), does one 100-byte
// round trip and closes it.
func shortConn(addr string, r *Result) error {
	start := time.Now()
	c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
	if err != nil {
		return err
	}
	r.ConnectNanos += time.Since(start).Nanoseconds()
	r.Conns++
	defer c.Close()
	tc := c.(*net.TCPConn)
	if _, err := tc.Write([]byte{'b'}); err != nil {
		return err
	}
	if err := roundTrips(tc, r, 1, 100); err != nil {
		return err
	}
	tc.CloseWrite()
	_, err = io.Copy(io.Discard, tc)
	return err
}

// pingpong runs rounds round trips, or as many as fit in d if d > 0.
func pingpong(addr string, r *Result, rounds, size int, op byte, d time.Duration) error {
	c, err := dial(addr, op)
	if err != nil {
		return err
	}
	defer c.Close()
	if d > 0 {
		for end := time.Now().Add(d); time.Now().Before(end); {
			if err := roundTrips(c, r, 100, size); err != nil {
				return err
			}
		}
	} else if err := roundTrips(c, r, rounds, size); err != nil {
		return err
	}
	c.CloseWrite()
	if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
		return fmt.Errorf("after half-close: %d extra bytes, %v", n, err)
	}
	return nil
}

func echoStream(addr string, r *Result, size int64, chunk int, op byte) error {
	c, err := dial(addr, op)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(120 * time.Second))
	var wg sync.WaitGroup
	var werr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		r.SentSHA, werr = writeStream(c, size, chunk, 1)
		r.Sent = size
		c.CloseWrite()
	}()
	h := sha256.New()
	r.Received, err = io.Copy(h, c)
	wg.Wait()
	r.RecvSHA = hex.EncodeToString(h.Sum(nil))
	if err = errors.Join(err, werr); err != nil {
		return err
	}
	if r.Received != size || r.RecvSHA != r.SentSHA {
		return fmt.Errorf("echo of %d bytes came back as %d bytes, sha %s want %s", size, r.Received, r.RecvSHA, r.SentSHA)
	}
	return nil
}

func sink(addr string, r *Result, size int64, chunk int) error {
	c, err := dial(addr, 's')
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(120 * time.Second))
	if r.SentSHA, err = writeStream(c, size, chunk, 3); err != nil {
		return err
	}
	r.Sent = size
	if err := c.CloseWrite(); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read sink answer after half-close: %w", err)
	}
	var n int64
	if _, err := fmt.Sscanf(line, "%d %s", &n, &r.RecvSHA); err != nil {
		return fmt.Errorf("sink answer %q: %w", line, err)
	}
	r.Received = n
	if n != size || r.RecvSHA != r.SentSHA {
		return fmt.Errorf("server got %d bytes sha %s, sent %d sha %s", n, r.RecvSHA, size, r.SentSHA)
	}
	return nil
}

func source(addr string, r *Result, size int64, chunk int) error {
	c, err := dial(addr, 'r')
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(120 * time.Second))
	var hdr [16]byte
	binary.BigEndian.PutUint64(hdr[:8], uint64(size))
	binary.BigEndian.PutUint64(hdr[8:], uint64(chunk))
	if _, err := c.Write(hdr[:]); err != nil {
		return err
	}
	return readStream(c, r, size, 2)
}

// rst checks both directions of a reset: the server resets ('x') and the
// client must see an error or EOF, not hang; the client resets a 'b'
// connection and the server must finish handling it.
func rst(addr string, r *Result) error {
	c, err := dial(addr, 'x')
	if err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("ping"))
	_, err = io.Copy(io.Discard, c)
	c.Close()
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return fmt.Errorf("server reset: client read hung: %w", err)
	}
	r.Note = fmt.Sprintf("server reset seen as %v", err)

	c, err = dial(addr, 'b')
	if err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1000)
	c.Write(buf)
	io.ReadFull(c, buf)
	c.Write(buf) // unread by us when we reset
	c.SetLinger(0)
	c.Close()
	for deadline := time.Now().Add(10 * time.Second); ; {
		q, err := dial(addr, 'q')
		if err != nil {
			return err
		}
		line, err := bufio.NewReader(q).ReadString('\n')
		q.Close()
		if err != nil {
			return err
		}
		if strings.TrimSpace(line) == "0" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("server still handles %s connections after client reset", strings.TrimSpace(line))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func unixSplice(addr string, r *Result, size int64) error {
	c, err := dial(addr, 'u')
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(size))
	if _, err := c.Write(hdr[:]); err != nil {
		return err
	}
	return readStream(c, r, size, 2)
}

// Interactive keeps one 'b' connection open and, for each stdin line
// "N SIZE", runs N echo round trips of SIZE bytes and prints a Result.
// It exits when stdin closes.
func Interactive(addr string) int {
	c, err := dial(addr, 'b')
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	fmt.Println("ready")
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var n, size int
		fmt.Sscanf(sc.Text(), "%d %d", &n, &size)
		var r Result
		if err := roundTrips(c, &r, n, size); err != nil {
			r.Err = err.Error()
		} else {
			r.OK = true
		}
		b, _ := json.Marshal(r)
		fmt.Println(string(b))
	}
	return 0
}

func roundTrips(c *net.TCPConn, r *Result, rounds, size int) error {
	deadline := 20 * time.Second
	if s, err := strconv.Atoi(os.Getenv("TCPLOAD_DEADLINE")); err == nil {
		deadline = time.Duration(s) * time.Second
	}
	c.SetDeadline(time.Now().Add(deadline))
	src := stream(uint64(size))
	out, in := make([]byte, size), make([]byte, size)
	for i := range rounds {
		src.Read(out)
		if _, err := c.Write(out); err != nil {
			return fmt.Errorf("round %d: %w", i, err)
		}
		if _, err := io.ReadFull(c, in); err != nil {
			return fmt.Errorf("round %d: %w", i, err)
		}
		if !bytes.Equal(in, out) {
			return fmt.Errorf("round %d: echo differs", i)
		}
		r.Sent += int64(size)
		r.Received += int64(size)
	}
	return nil
}

// stalled writes up to size bytes to a reader that does not read for 2 s
// and reports in Sent how many the kernel accepted within 1 s: the
// backpressure a slow reader exerts.
func stalled(addr string, r *Result, size int64) error {
	c, err := dial(addr, 'z')
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 64<<10)
	for r.Sent < size {
		n, err := c.Write(buf)
		r.Sent += int64(n)
		if err != nil {
			break
		}
	}
	return nil
}

func download(addr string, r *Result, size int64) error {
	c, err := dial(addr, 'd')
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(size))
	if _, err := c.Write(hdr[:]); err != nil {
		return err
	}
	buf := make([]byte, 256<<10)
	for r.Received < size {
		n, err := c.Read(buf)
		r.Received += int64(n)
		if err != nil {
			return fmt.Errorf("after %d of %d bytes: %w", r.Received, size, err)
		}
	}
	return nil
}

func httpGet(addr string, r *Result, size int64) error {
	cl := http.Client{Timeout: 2 * time.Minute}
	resp, err := cl.Get(fmt.Sprintf("http://%s/bytes?n=%d", addr, size))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return readStream(resp.Body, r, size, 3)
}

// readStream reads rd to EOF and checks it is size bytes of stream(seed).
func readStream(rd io.Reader, r *Result, size int64, seed uint64) error {
	h := sha256.New()
	var err error
	if r.Received, err = io.Copy(h, rd); err != nil {
		return err
	}
	r.RecvSHA, r.SentSHA, r.Sent = hex.EncodeToString(h.Sum(nil)), streamSHA(size, seed), size
	if r.Received != size || r.RecvSHA != r.SentSHA {
		return fmt.Errorf("got %d bytes sha %s, want %d sha %s", r.Received, r.RecvSHA, size, r.SentSHA)
	}
	return nil
}
