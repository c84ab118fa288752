package sockmap

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	if kind := os.Getenv("SOCKMAP_HELPER"); kind != "" {
		os.Exit(helperMain(kind))
	}
	os.Exit(m.Run())
}
