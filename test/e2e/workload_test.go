//go:build linux

package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
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
	"time"
)

// The acceleration test runs its traffic as pod processes would: this test
// binary, re-executed inside a pod's network namespace and its node's pod
// cgroup, as a server (one per pod) or as a client running one scenario.
// SINABRO_E2E_HELPER selects the role (see TestMain).
const (
	helperEnv    = "SINABRO_E2E_HELPER"
	workloadPort = 7100 // raw TCP: the first byte picks the operation
	httpPort     = 7101 // GET /bytes?n=N
)

// workloadResult is a client's report, one JSON line on stdout.
type workloadResult struct {
	OK       bool   `json:"ok"`
	Err      string `json:"err,omitempty"`
	Sent     int64  `json:"sent"`
	Received int64  `json:"received"`
	Rounds   int    `json:"rounds,omitempty"`
}

func helperMain(role string) int {
	addr := os.Getenv("SINABRO_E2E_ADDR")
	switch role {
	case "server":
		return workloadServer(addr)
	case "client":
		r := runWorkload(addr, os.Getenv("SINABRO_E2E_SCENARIO"))
		json.NewEncoder(os.Stdout).Encode(r)
		return 0
	}
	fmt.Fprintf(os.Stderr, "unknown %s=%q\n", helperEnv, role)
	return 2
}

// workloadServer serves, on addr:
//   - workloadPort, operation byte first: 'b' echoes with read/write calls,
//     'e' echoes with io.Copy (splice(2) in Go), 's' hashes everything up
//     to the client's half-close and answers "<bytes> <sha256>\n";
//   - httpPort: GET /bytes?n=N answers N bytes of the test stream.
func workloadServer(addr string) int {
	tl, err := net.Listen("tcp", net.JoinHostPort(addr, strconv.Itoa(workloadPort)))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	hl, err := net.Listen("tcp", net.JoinHostPort(addr, strconv.Itoa(httpPort)))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/bytes", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		writeTestStream(w, n, 32<<10)
	})
	go http.Serve(hl, mux)
	fmt.Println("ready")
	for {
		c, err := tl.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go serveWorkload(c.(*net.TCPConn))
	}
}

func serveWorkload(c *net.TCPConn) {
	defer c.Close()
	var op [1]byte
	if _, err := io.ReadFull(c, op[:]); err != nil {
		return
	}
	switch op[0] {
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
	case 'e':
		io.Copy(c, c)
		c.CloseWrite()
	case 's':
		h := sha256.New()
		n, _ := io.Copy(h, c)
		fmt.Fprintf(c, "%d %x\n", n, h.Sum(nil))
	}
}

// writeTestStream writes size bytes of a fixed pseudo-random stream in
// chunk-sized writes and returns their sha256.
func writeTestStream(w io.Writer, size int64, chunk int) (string, error) {
	src := rand.NewChaCha8([32]byte{'s', 'i', 'n', 'a', 'b', 'r', 'o'})
	h := sha256.New()
	buf := make([]byte, chunk)
	for left := size; left > 0; {
		b := buf[:min(int64(chunk), left)]
		src.Read(b)
		h.Write(b)
		if _, err := w.Write(b); err != nil {
			return "", err
		}
		left -= int64(len(b))
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// runWorkload runs one client scenario against the server at addr:
//
//	pingpong:<rounds>:<size>   request/response, every reply compared
//	pingpong-for:<secs>:<size> the same for a duration (across an agent kill)
//	echo:<size>:<chunk>:<op>   stream out (op b or e), half-close, the echo hashed
//	sink:<size>:<chunk>        stream out, half-close, the server's hash compared
//	http:<size>                GET size bytes, hashed
func runWorkload(addr, scenario string) (r workloadResult) {
	f := strings.Split(scenario, ":")
	num := func(i int) int64 {
		if i >= len(f) {
			return 0
		}
		n, _ := strconv.ParseInt(f[i], 10, 64)
		return n
	}
	dial := func(op byte) (*net.TCPConn, error) {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(addr, strconv.Itoa(workloadPort)), 5*time.Second)
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		_, err = c.Write([]byte{op})
		return c.(*net.TCPConn), err
	}
	err := func() error {
		switch f[0] {
		case "pingpong", "pingpong-for":
			c, err := dial('b')
			if err != nil {
				return err
			}
			defer c.Close()
			size := int(num(2))
			out, in := make([]byte, size), make([]byte, size)
			until := time.Now().Add(time.Duration(num(1)) * time.Second)
			for i := 0; f[0] == "pingpong" && i < int(num(1)) || f[0] == "pingpong-for" && time.Now().Before(until); i++ {
				for j := range out {
					out[j] = byte(i + j)
				}
				if _, err := c.Write(out); err != nil {
					return fmt.Errorf("round %d: %w", i, err)
				}
				if _, err := io.ReadFull(c, in); err != nil {
					return fmt.Errorf("round %d: %w", i, err)
				}
				if !bytes.Equal(in, out) {
					return fmt.Errorf("round %d: reply differs", i)
				}
				r.Rounds++
				r.Sent += int64(size)
				r.Received += int64(size)
			}
			return nil
		case "echo":
			c, err := dial(f[3][0])
			if err != nil {
				return err
			}
			defer c.Close()
			var wg sync.WaitGroup
			var sent string
			var werr error
			wg.Go(func() {
				sent, werr = writeTestStream(c, num(1), int(num(2)))
				c.CloseWrite()
			})
			h := sha256.New()
			r.Received, err = io.Copy(h, c)
			wg.Wait()
			r.Sent = num(1)
			if err := errors.Join(err, werr); err != nil {
				return err
			}
			if got := hex.EncodeToString(h.Sum(nil)); r.Received != r.Sent || got != sent {
				return fmt.Errorf("echo of %d bytes came back as %d bytes (sha256 %s, want %s)", r.Sent, r.Received, got, sent)
			}
			return nil
		case "sink":
			c, err := dial('s')
			if err != nil {
				return err
			}
			defer c.Close()
			sent, err := writeTestStream(c, num(1), int(num(2)))
			if err != nil {
				return err
			}
			r.Sent = num(1)
			c.CloseWrite()
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				return fmt.Errorf("read the server's hash: %w", err)
			}
			if want := fmt.Sprintf("%d %s\n", r.Sent, sent); line != want {
				return fmt.Errorf("server received %q, want %q", strings.TrimSpace(line), strings.TrimSpace(want))
			}
			return nil
		case "http":
			want, _ := writeTestStream(io.Discard, num(1), 32<<10)
			cl := http.Client{Timeout: 2 * time.Minute}
			resp, err := cl.Get(fmt.Sprintf("http://%s/bytes?n=%d", net.JoinHostPort(addr, strconv.Itoa(httpPort)), num(1)))
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			h := sha256.New()
			r.Received, err = io.Copy(h, resp.Body)
			if err != nil {
				return err
			}
			if got := hex.EncodeToString(h.Sum(nil)); r.Received != num(1) || got != want {
				return fmt.Errorf("GET %d bytes: got %d bytes (sha256 %s, want %s)", num(1), r.Received, got, want)
			}
			return nil
		}
		return fmt.Errorf("unknown scenario %q", scenario)
	}()
	if err != nil {
		r.Err = err.Error()
	} else {
		r.OK = true
	}
	return r
}
