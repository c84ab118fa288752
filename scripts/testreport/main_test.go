package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

const sampleAllow = `
# the sample's benchmark gate
testdata/skips  TestBenchmarkGate  benchmark: set SAMPLE_BENCH=1
`

// TestReport runs go test -json on a sample package and checks what the
// report prints and whether it fails.
func TestReport(t *testing.T) {
	allow, err := parseAllowList(strings.NewReader(sampleAllow))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		sample   string
		wantOK   bool
		want     []string // in the output
		dontWant []string
	}{
		{sample: "allowed", wantOK: true,
			want:     []string{"ok  \tgithub.com/sinabro-io/sinabro/scripts/testreport/testdata/skips", "1 skipped test(s) on the allow-list", "TestBenchmarkGate: skips_test.go:14: benchmark: set SAMPLE_BENCH=1 to run"},
			dontWant: []string{"noise", "=== RUN", "--- PASS", "\nPASS\n", "without an allow-list entry"}},
		{sample: "capability", wantOK: false,
			want: []string{"--- SKIP: TestNeedsCapability", "FAIL: 1 test(s) skipped without an allow-list entry",
				"testdata/skips TestNeedsCapability: skips_test.go:20: needs CAP_NET_ADMIN", "ok  \tgithub.com/sinabro-io/sinabro/scripts/testreport/testdata/skips"}},
		{sample: "subskip", wantOK: false,
			want: []string{"TestSub/gated: skips_test.go:33: needs a tool"}},
		{sample: "panic", wantOK: false,
			want: []string{"--- FAIL: TestPanics", "panic: sample panic", "FAIL\tgithub.com/sinabro-io/sinabro/scripts/testreport/testdata/skips"}},
		{sample: "fail", wantOK: false,
			want:     []string{"--- FAIL: TestFails", "wanted failure", "FAIL\tgithub.com/sinabro-io/sinabro/scripts/testreport/testdata/skips"},
			dontWant: []string{"without an allow-list entry"}},
	} {
		t.Run(tc.sample, func(t *testing.T) {
			cmd := exec.Command("go", "test", "-json", "-count=1", "./testdata/skips")
			cmd.Env = append(os.Environ(), "TESTREPORT_SAMPLE="+tc.sample, "SAMPLE_BENCH=")
			raw, _ := cmd.CombinedOutput() // fails with the sample; the report says so
			var out bytes.Buffer
			sum, err := report(bytes.NewReader(raw), &out, allow)
			if err != nil {
				t.Fatal(err)
			}
			if sum.ok() != tc.wantOK {
				t.Errorf("ok = %v, want %v; output:\n%s", sum.ok(), tc.wantOK, out.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
			for _, w := range tc.dontWant {
				if strings.Contains(out.String(), w) {
					t.Errorf("output has %q:\n%s", w, out.String())
				}
			}
		})
	}
}

func TestParseAllowListRejectsEntryWithoutReason(t *testing.T) {
	if _, err := parseAllowList(strings.NewReader("pkg/x TestY\n")); err == nil {
		t.Error("entry without a reason accepted")
	}
}

// TestAllowListFile keeps the repository's allow-list parseable and small:
// every entry names an environment-gated benchmark, never a missing
// capability or tool.
func TestAllowListFile(t *testing.T) {
	f, err := os.Open("../skip-allowlist.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	entries, err := parseAllowList(f)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.reason, "benchmark: set ") {
			t.Errorf("%s %s: reason %q is not a benchmark gate", e.pkg, e.test, e.reason)
		}
	}
}
