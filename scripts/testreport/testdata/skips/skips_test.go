// Package skips is testreport's sample: tests that pass, fail and skip for
// allowed and unexpected reasons, chosen by TESTREPORT_SAMPLE.
package skips

import (
	"os"
	"testing"
)

func TestPasses(t *testing.T) { t.Log("noise that plain go test hides") }

func TestBenchmarkGate(t *testing.T) {
	if os.Getenv("SAMPLE_BENCH") == "" {
		t.Skip("benchmark: set SAMPLE_BENCH=1 to run")
	}
}

func TestNeedsCapability(t *testing.T) {
	if os.Getenv("TESTREPORT_SAMPLE") == "capability" {
		t.Skip("needs CAP_NET_ADMIN")
	}
}

func TestFails(t *testing.T) {
	if os.Getenv("TESTREPORT_SAMPLE") == "fail" {
		t.Error("wanted failure")
	}
}

func TestSub(t *testing.T) {
	t.Run("gated", func(t *testing.T) {
		if os.Getenv("TESTREPORT_SAMPLE") == "subskip" {
			t.Skip("needs a tool")
		}
	})
}

func TestPanics(t *testing.T) {
	if os.Getenv("TESTREPORT_SAMPLE") == "panic" {
		panic("sample panic")
	}
}
