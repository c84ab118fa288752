package cgroup

import (
	"os"
	"path/filepath"
	"testing"
)

func TestV2Dir(t *testing.T) {
	mnt, err := V2Mount()
	if err != nil {
		t.Skipf("no cgroup v2 hierarchy on this host: %v", err)
	}
	child, err := os.MkdirTemp(mnt, "sinabro-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(child) })
	for _, c := range []struct{ in, want string }{
		{"", mnt},
		{mnt, mnt},
		{child, child},
	} {
		if got, err := V2Dir(c.in); err != nil || got != c.want {
			t.Errorf("V2Dir(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	if _, err := V2Dir(t.TempDir()); err == nil {
		t.Error("V2Dir(a directory outside any cgroup hierarchy) succeeded")
	}
	// On a hybrid host the v1 root names the unified hierarchy below it.
	if filepath.Base(mnt) == "unified" {
		root := filepath.Dir(mnt)
		for _, c := range []struct{ in, want string }{
			{root, mnt},
			{filepath.Join(root, filepath.Base(child)), child},
		} {
			if got, err := V2Dir(c.in); err != nil || got != c.want {
				t.Errorf("hybrid: V2Dir(%q) = %q, %v; want %q", c.in, got, err, c.want)
			}
		}
		if _, err := V2Dir(filepath.Join(root, "no-such-cgroup")); err == nil {
			t.Error("hybrid: V2Dir(a missing cgroup) succeeded")
		}
	}
}
