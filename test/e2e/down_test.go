//go:build linux

package e2e

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

// TestLabDownShadowedNamespaces re-mounts /run/netns over itself after the
// lab started (what `ip netns add` does when it is not a mount point yet,
// or another tool's bind mount), which hides the lab's namespace mounts
// from the path `lab down` removes them by. `lab down` must then say so
// and exit non-zero instead of reporting a clean box; once the covering
// mount is gone, it removes the rest.
func TestLabDownShadowedNamespaces(t *testing.T) {
	l, _ := newLab(t, 1, 1)
	// In a mount namespace of its own, so the shadow hides nothing from
	// other labs or tests on the machine.
	script := fmt.Sprintf("mount --bind /run/netns /run/netns && exec %s lab --dir %s down --name %s", binary, l.dir, l.name)
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script).CombinedOutput()
	if err == nil {
		t.Errorf("lab down exited 0 with its namespace mounts hidden under a later mount:\n%s", out)
	} else if !strings.Contains(string(out), "left behind") {
		t.Errorf("lab down failed without naming what it left (%v):\n%s", err, out)
	}
	// The cleanup registered by newLab runs `lab down` again, where the
	// mounts are reachable, and asserts a clean box.
}
