// Command testreport turns `go test -json` (on stdin) into what `go test`
// prints without -v — the output of failed tests and each package's closing
// ok/FAIL line — and fails when a test skipped without a matching entry on
// the skip allow-list. CI runs as root with every tool installed, so a test
// that skips there has not run: only skips that are meant (benchmarks gated
// by an environment variable) may pass.
//
//	go test -json ./... 2>&1 | go run ./scripts/testreport -allow scripts/skip-allowlist.txt
//
// The allow-list has one entry a line: the package (its import path or a
// suffix of it), an anchored regular expression for the test name, and the
// reason, which the skip message must contain. '#' starts a comment.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
)

func main() {
	allowPath := flag.String("allow", "", "skip allow-list file")
	flag.Parse()
	var allow []allowEntry
	if *allowPath != "" {
		f, err := os.Open(*allowPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testreport:", err)
			os.Exit(2)
		}
		allow, err = parseAllowList(f)
		f.Close()
		if err != nil {
			fmt.Fprintf(os.Stderr, "testreport: %s: %v\n", *allowPath, err)
			os.Exit(2)
		}
	}
	sum, err := report(os.Stdin, os.Stdout, allow)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(2)
	}
	if !sum.ok() {
		os.Exit(1)
	}
}

// allowEntry permits skips of matching tests whose message holds reason.
type allowEntry struct {
	pkg    string
	test   *regexp.Regexp
	reason string
}

func (e allowEntry) allows(s skip) bool {
	return (s.pkg == e.pkg || strings.HasSuffix(s.pkg, "/"+e.pkg)) &&
		e.test.MatchString(s.test) && strings.Contains(s.message, e.reason)
}

func parseAllowList(r io.Reader) ([]allowEntry, error) {
	var out []allowEntry
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = strings.TrimSpace(line[:i])
		}
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return nil, fmt.Errorf("line %d: want \"package test-regexp reason\", got %q", n, line)
		}
		re, err := regexp.Compile("^(?:" + f[1] + ")$")
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		out = append(out, allowEntry{pkg: f[0], test: re, reason: strings.Join(f[2:], " ")})
	}
	return out, sc.Err()
}

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

type skip struct {
	pkg, test, message string
	allowed            bool
}

type summary struct {
	failed bool // a test or package failed, or the input ended early
	skips  []skip
}

func (s summary) ok() bool {
	if s.failed {
		return false
	}
	for _, sk := range s.skips {
		if !sk.allowed {
			return false
		}
	}
	return true
}

// report copies the readable part of the event stream to out as it comes,
// then lists the skips. Lines that are not JSON (go command messages) are
// copied as they are.
func report(in io.Reader, out io.Writer, allow []allowEntry) (summary, error) {
	var sum summary
	type key struct{ pkg, test string }
	buf := map[key][]string{} // output of tests still running
	var order []key           // tests in the order they started, for flushing
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var ev event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &ev) != nil {
			fmt.Fprintf(out, "%s\n", line)
			continue
		}
		k := key{ev.Package, ev.Test}
		switch {
		case ev.Action == "build-output":
			fmt.Fprint(out, ev.Output)
		case ev.Action == "build-fail":
			sum.failed = true
		case ev.Test == "" && ev.Action == "output":
			// Package-level: TestMain's output and the closing lines. The
			// bare "PASS" before "ok" is -v's; plain go test omits it.
			if ev.Output != "PASS\n" {
				fmt.Fprint(out, ev.Output)
			}
		case ev.Test == "" && (ev.Action == "pass" || ev.Action == "fail" || ev.Action == "skip"):
			if ev.Action == "fail" {
				sum.failed = true
			}
			// Tests that never finished (timeout, crash): show what they said.
			for _, t := range order {
				if lines, running := buf[t]; running && t.pkg == ev.Package {
					fmt.Fprintf(out, "--- unfinished: %s\n%s", t.test, strings.Join(lines, ""))
					delete(buf, t)
				}
			}
		case ev.Test == "":
		case ev.Action == "run":
			if _, seen := buf[k]; !seen {
				buf[k] = nil
				order = append(order, k)
			}
		case ev.Action == "output":
			if !strings.HasPrefix(ev.Output, "=== ") {
				buf[k] = append(buf[k], ev.Output)
			}
		case ev.Action == "pass":
			delete(buf, k)
		case ev.Action == "fail":
			sum.failed = true
			fmt.Fprint(out, strings.Join(buf[k], ""))
			delete(buf, k)
		case ev.Action == "skip":
			s := skip{pkg: ev.Package, test: ev.Test, message: skipMessage(buf[k])}
			for _, e := range allow {
				if e.allows(s) {
					s.allowed = true
					break
				}
			}
			sum.skips = append(sum.skips, s)
			if !s.allowed {
				fmt.Fprint(out, strings.Join(buf[k], ""))
			}
			delete(buf, k)
		}
	}
	if err := sc.Err(); err != nil {
		return sum, fmt.Errorf("read go test -json: %w", err)
	}
	if len(buf) > 0 {
		sum.failed = true
		for _, t := range order {
			if lines, running := buf[t]; running {
				fmt.Fprintf(out, "--- unfinished: %s %s\n%s", t.pkg, t.test, strings.Join(lines, ""))
			}
		}
	}
	printSkips(out, sum.skips)
	return sum, nil
}

// skipMessage is what a skipped test logged, without go test's own lines.
func skipMessage(lines []string) string {
	var msg []string
	for _, l := range lines {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "--- SKIP:") {
			continue
		}
		msg = append(msg, l)
	}
	return strings.Join(msg, " | ")
}

func printSkips(out io.Writer, skips []skip) {
	var allowed, unexpected []skip
	for _, s := range skips {
		if s.allowed {
			allowed = append(allowed, s)
		} else {
			unexpected = append(unexpected, s)
		}
	}
	if len(allowed) > 0 {
		fmt.Fprintf(out, "\n%d skipped test(s) on the allow-list:\n", len(allowed))
		for _, s := range allowed {
			fmt.Fprintf(out, "  %s %s: %s\n", s.pkg, s.test, s.message)
		}
	}
	if len(unexpected) > 0 {
		fmt.Fprintf(out, "\nFAIL: %d test(s) skipped without an allow-list entry (scripts/skip-allowlist.txt); CI must run them:\n", len(unexpected))
		for _, s := range unexpected {
			fmt.Fprintf(out, "  %s %s: %s\n", s.pkg, s.test, s.message)
		}
	}
}
