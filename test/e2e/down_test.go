//go:build linux

package e2e

import (
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestLabDownShadowedNamespaces re-mounts /run/netns over itself after the
// lab started (what `ip netns add` does when it is not a mount point yet,
// or another tool's bind mount), which hides the lab's namespace mounts
// from the path `lab down` removes them by. `lab down` must then say so
// and exit non-zero instead of reporting a clean box; once the covering
// mount is gone, it removes the rest.
func TestLabDownShadowedNamespaces(t *testing.T) {
	l, _ := newLab(t, 1, 1)
	if out, err := exec.Command("mount", "--bind", "/run/netns", "/run/netns").CombinedOutput(); err != nil {
		t.Fatalf("bind-mount /run/netns over itself: %v: %s", err, out)
	}
	covered := true
	defer func() {
		if covered {
			unix.Unmount("/run/netns", unix.MNT_DETACH)
		}
	}()
	out, err := l.sinabro("down")
	if err == nil {
		t.Errorf("lab down exited 0 with its namespace mounts hidden under a later mount:\n%s", out)
	} else if !strings.Contains(out, "left behind") {
		t.Errorf("lab down failed without naming what it left:\n%s", out)
	}
	if err := unix.Unmount("/run/netns", unix.MNT_DETACH); err != nil {
		t.Fatalf("unmount the covering /run/netns: %v", err)
	}
	covered = false
	// The cleanup registered by newLab runs `lab down` again and asserts a
	// clean box.
}
