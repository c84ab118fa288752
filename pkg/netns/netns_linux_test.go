package netns

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestDoReturnsPanicAsError: a panic inside the namespace comes back from
// Do as an error instead of killing the process, and Do keeps working.
func TestDoReturnsPanicAsError(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	name := fmt.Sprintf("sbt-panic-%d", os.Getpid())
	path, err := Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer Delete(name)

	err = Do(path, func() error { panic("boom") })
	if err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("Do with a panicking fn = %v, want an error naming the panic", err)
	}
	if err := Do(path, func() error { return nil }); err != nil {
		t.Fatalf("Do after a panic: %v", err)
	}
}
