package images

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// containerdBins finds ctr and containerd in $SINABRO_KUBE_BIN_DIR or in a
// scripts/build-kube.sh cache dir.
func containerdBins() (ctr, containerd string, ok bool) {
	dirs := []string{os.Getenv("SINABRO_KUBE_BIN_DIR")}
	found, _ := filepath.Glob("/var/cache/sinabro/kube/*")
	dirs = append(dirs, found...)
	for _, d := range dirs {
		if d == "" {
			continue
		}
		c, d2 := filepath.Join(d, "ctr"), filepath.Join(d, "containerd")
		if isExec(c) && isExec(d2) {
			return c, d2, true
		}
	}
	return "", "", false
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// startContainerd runs a throwaway containerd with all its state under dir
// and returns its socket; it is stopped, and its mounts removed, at cleanup.
func startContainerd(t *testing.T, containerd, dir string) string {
	t.Helper()
	sock := filepath.Join(dir, "containerd.sock")
	cfg := filepath.Join(dir, "config.toml")
	// CRI is left out: importing needs only the content store, the image
	// store and the snapshotter.
	conf := fmt.Sprintf(`version = 3
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images"]
[grpc]
  address = %q
[ttrpc]
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc")
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(containerd, "--config", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start containerd: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if err := unmountUnder(dir); err != nil {
			t.Errorf("unmount containerd state: %v", err)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("containerd did not listen on %s: %s", sock, log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestImport imports built archives into a real containerd and checks that
// every ref is there, unpacked.
func TestImport(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (containerd)")
	}
	ctr, containerd, ok := containerdBins()
	if !ok {
		t.Skip("no ctr and containerd in $SINABRO_KUBE_BIN_DIR or /var/cache/sinabro/kube/*/ (scripts/build-kube.sh builds them)")
	}
	// Short paths: the socket path must fit in sun_path.
	dir, err := os.MkdirTemp("", "sbimg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := startContainerd(t, containerd, dir)

	bins := t.TempDir()
	fakeBins(t, bins)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	imgs, err := Build(ctx, Options{CacheDir: t.TempDir(), KubeBinDir: bins, Sinabro: filepath.Join(bins, "sinabro"), Names: []string{"pause", "sinabro", "coredns"}}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	// Archives built elsewhere, e.g. the Debian-based agnhost and
	// kube-proxy ones (which share their base layer):
	// SINABRO_IMAGE_ARCHIVES=/path/agnhost-KEY.tar:/path/kube-proxy-KEY.tar.
	for _, p := range filepath.SplitList(os.Getenv("SINABRO_IMAGE_ARCHIVES")) {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		refs := slices.Sorted(maps.Keys(checkArchive(t, p)))
		// A real archive replaces the stand-in built above with the same
		// refs (both would tag one name).
		imgs = slices.DeleteFunc(imgs, func(img Image) bool {
			return slices.ContainsFunc(img.Refs, func(r string) bool { return slices.Contains(refs, r) })
		})
		imgs = append(imgs, Image{Name: filepath.Base(p), Refs: refs, Archive: p, Size: st.Size()})
	}
	// Concurrently, as the lab imports into a node.
	var wg sync.WaitGroup
	for _, img := range imgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			if err := Import(ctx, ctr, sock, img); err != nil {
				t.Error(err)
				return
			}
			t.Logf("imported %s (%d MB) in %s", img.Name, img.Size>>20, time.Since(start).Round(10*time.Millisecond))
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	out, err := exec.CommandContext(ctx, ctr, "-a", sock, "-n", Namespace, "images", "ls").CombinedOutput()
	if err != nil {
		t.Fatalf("ctr images ls: %v: %s", err, out)
	}
	listed := string(out)
	for _, img := range imgs {
		for _, r := range img.Refs {
			if !strings.Contains(listed, r+" ") {
				t.Errorf("ref %s not listed after import:\n%s", r, listed)
			}
		}
	}
	// Unpacked: one committed snapshot per distinct layer chain.
	snaps, err := exec.CommandContext(ctx, ctr, "-a", sock, "-n", Namespace, "snapshots", "ls").CombinedOutput()
	if err != nil {
		t.Fatalf("ctr snapshots ls: %v: %s", err, snaps)
	}
	if n := strings.Count(string(snaps), "Committed"); n < len(imgs) {
		t.Errorf("%d committed snapshots after importing %d images, want at least one each:\n%s", n, len(imgs), snaps)
	}
}
