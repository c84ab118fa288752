// Package netns creates, enters and removes Linux network namespaces without
// shelling out to ip(8). Named namespaces live under /run/netns like those
// made by `ip netns add`, so operators can inspect them with iproute2.
package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// RunDir is where named namespaces are bind-mounted, as iproute2 does.
const RunDir = "/run/netns"

// Path returns the bind-mount path of the named namespace.
func Path(name string) string { return filepath.Join(RunDir, name) }

// Create makes a new named network namespace and returns its path. It fails
// with an error wrapping os.ErrExist when the name is taken.
func Create(name string) (string, error) {
	if err := ensureRunDir(); err != nil {
		return "", err
	}
	path := Path(name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return "", fmt.Errorf("create netns file %s: %w", path, err)
	}
	f.Close()

	// A fresh thread unshares, bind-mounts its new namespace onto the file and
	// then dies with the goroutine (not unlocked), so no thread in the Go
	// runtime is left in the new namespace.
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind-mount netns to %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return "", err
	}
	return path, nil
}

// ensureRunDir makes RunDir a shared mount point of its own, as `ip netns
// add` does before its first namespace. Were it left a plain directory, the
// next `ip netns add` (any tool's) would turn it into a bind mount of itself
// then, and namespaces mounted here before would no longer be reachable by
// their path (entering fails with EINVAL, removing with EBUSY).
func ensureRunDir() error {
	if err := os.MkdirAll(RunDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", RunDir, err)
	}
	err := unix.Mount("", RunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) { // not a mount point yet
		if err = unix.Mount(RunDir, RunDir, "none", unix.MS_BIND|unix.MS_REC, ""); err == nil {
			err = unix.Mount("", RunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		}
	}
	if err != nil {
		return fmt.Errorf("make %s a shared mount point: %w", RunDir, err)
	}
	return nil
}

// Delete unmounts and removes the named namespace. A missing one is not an error.
func Delete(name string) error { return Remove(Path(name)) }

// Remove unmounts and removes a namespace bind-mounted at path. Processes
// still inside keep the namespace alive until they exit.
func Remove(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// Do runs fn on an OS thread that has entered the namespace at path. Child
// processes started by fn (os/exec) inherit that namespace. The thread is
// returned to the runtime only if it could be moved back to its original
// namespace; otherwise it dies with the goroutine. A panic in fn is
// returned as an error: it happens on Do's own goroutine, where no caller
// could recover it (the CNI plugin must answer with error JSON, not crash).
func Do(path string, fn func() error) error {
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()

	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		orig, err := os.Open(self)
		if err != nil {
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		ferr := call(fn)
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// call runs fn, turning a panic into an error.
func call(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v", r)
		}
	}()
	return fn()
}
