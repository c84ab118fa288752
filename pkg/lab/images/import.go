package images

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// Namespace is the containerd namespace the CRI (and so the kubelet) uses.
const Namespace = "k8s.io"

// Import loads an image archive into the containerd at socket, in the
// k8s.io namespace, with the ctr binary at ctr; the layers are unpacked
// into the default snapshotter, so the kubelet can start containers from it
// at once. A relative socket path is made absolute (containerd 2's ctr reads
// a relative -a as a URL).
func Import(ctx context.Context, ctr, socket string, img Image) error {
	sock, err := filepath.Abs(socket)
	if err != nil {
		return fmt.Errorf("import %s: %w", img.Name, err)
	}
	cmd := exec.CommandContext(ctx, ctr, "-a", sock, "-n", Namespace, "images", "import", img.Archive)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("import %s into %s: %w: %s", img.Archive, sock, err, strings.TrimSpace(string(out)))
	}
	return nil
}
