package bpffs

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestEnsureMountsUnderLockFile mounts bpffs in a private mount namespace
// (a child process, so the machine's mounts are untouched) while the test
// holds LockFile: the child must wait for the lock before mounting.
func TestEnsureMountsUnderLockFile(t *testing.T) {
	if os.Getenv("SINABRO_BPFFS_CHILD") == "1" {
		ensureChild(t)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount bpffs")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatalf("needs unshare (util-linux): %v", err)
	}
	if err := os.MkdirAll("/var/lib/sinabro", 0o700); err != nil {
		t.Fatal(err)
	}
	lock, err := os.OpenFile(LockFile, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(unshare, "--mount", "--propagation", "private", os.Args[0], "-test.run=^TestEnsureMountsUnderLockFile$", "-test.v")
	cmd.Env = append(os.Environ(), "SINABRO_BPFFS_CHILD=1")
	done := make(chan error, 1)
	var out []byte
	go func() {
		var err error
		out, err = cmd.CombinedOutput()
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("Ensure did not wait for %s: %v\n%s", LockFile, err, out)
	case <-time.After(time.Second):
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("child: %v\n%s", err, out)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Ensure still waiting after the lock was released")
	}
}

// ensureChild runs in its own mount namespace: it unmounts every bpffs
// stacked on /sys/fs/bpf, then lets Ensure mount one.
func ensureChild(t *testing.T) {
	for On("/sys/fs/bpf") {
		if err := unix.Unmount("/sys/fs/bpf", unix.MNT_DETACH); err != nil {
			t.Fatalf("unmount bpffs in the private namespace: %v", err)
		}
	}
	root := "/sys/fs/bpf/sinabro-lock-test"
	if err := Ensure(root); err != nil {
		t.Fatal(err)
	}
	if !On(root) {
		t.Fatalf("%s not on a bpffs after Ensure", root)
	}
}
