package images

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The Debian base: one debootstrap'ed bookworm rootfs, tarred as one layer
// and cached by a hash of the recipe (suite, mirror, package list, edits).

const (
	debianSuite  = "bookworm"
	debianMirror = "http://deb.debian.org/debian"
)

// baseLayer returns the cached base layer of key, building it first if it
// is missing. The build happens in dir base-KEY.tmp, renamed to base-KEY
// once complete, so a crash never leaves a half cache behind.
func baseLayer(ctx context.Context, cacheDir, key string, packages []string, log io.Writer) (layer, bool, error) {
	dir := filepath.Join(cacheDir, "base-"+key)
	if l, err := readBase(dir); err == nil {
		return l, true, nil
	}
	tmp := dir + ".tmp"
	if err := removeTree(tmp); err != nil {
		return layer{}, false, err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return layer{}, false, fmt.Errorf("create %s: %w", tmp, err)
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return layer{}, false, errors.New("debootstrap not found: apt-get install -y debootstrap")
	}
	root := filepath.Join(tmp, "rootfs")
	logPath := filepath.Join(tmp, "debootstrap.log")
	fmt.Fprintf(log, "debootstrap %s (%s) into %s, log %s: a few minutes\n", debianSuite, strings.Join(packages, ","), root, logPath)
	start := time.Now()
	if err := debootstrap(ctx, root, packages, logPath); err != nil {
		removeTree(root)
		return layer{}, false, err
	}
	fmt.Fprintf(log, "debootstrap done in %s\n", time.Since(start).Round(time.Second))
	if err := unmountUnder(root); err != nil {
		return layer{}, false, err
	}
	if err := trimRootfs(root); err != nil {
		return layer{}, false, err
	}
	if err := addE2EUser(root); err != nil {
		return layer{}, false, err
	}
	l, err := tarTree(filepath.Join(tmp, "layer.tar"), root)
	if err != nil {
		return layer{}, false, err
	}
	if err := removeTree(root); err != nil {
		return layer{}, false, err
	}
	if err := os.WriteFile(filepath.Join(tmp, "layer.sha256"), []byte(l.Digest+"\n"), 0o644); err != nil {
		return layer{}, false, fmt.Errorf("write base digest: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return layer{}, false, fmt.Errorf("finish base %s: %w", dir, err)
	}
	l.Path = filepath.Join(dir, "layer.tar")
	// Bases of older recipes are no longer used by any archive built from
	// now on.
	old, _ := filepath.Glob(filepath.Join(cacheDir, "base-*"))
	for _, p := range old {
		if p != dir && !strings.HasSuffix(p, ".tmp") {
			removeTree(p)
		}
	}
	return l, false, nil
}

// readBase returns the layer of a finished base dir.
func readBase(dir string) (layer, error) {
	sum, err := os.ReadFile(filepath.Join(dir, "layer.sha256"))
	if err != nil {
		return layer{}, err
	}
	p := filepath.Join(dir, "layer.tar")
	st, err := os.Stat(p)
	if err != nil {
		return layer{}, err
	}
	return layer{Path: p, Digest: strings.TrimSpace(string(sum)), Size: st.Size()}, nil
}

// debootstrap runs debootstrap into root, its output into logPath. On
// cancellation its whole process group is killed.
func debootstrap(ctx context.Context, root string, packages []string, logPath string) error {
	out, err := os.Create(logPath)
	if err != nil {
		return fmt.Errorf("create debootstrap log: %w", err)
	}
	defer out.Close()
	cmd := exec.CommandContext(ctx, "debootstrap", "--variant=minbase", "--include="+strings.Join(packages, ","),
		debianSuite, root, debianMirror)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("debootstrap %s into %s: %w (last lines of %s:\n%s)", debianSuite, root, err, logPath, tail(logPath, 15))
	}
	return nil
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	data, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// trimRootfs removes what an image does not need: documentation, locales,
// apt's package lists and caches, logs, and the host's identity that
// debootstrap copied.
func trimRootfs(root string) error {
	for _, glob := range []string{
		"usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
		"usr/share/lintian/*", "var/lib/apt/lists/*", "var/cache/apt/*", "var/cache/debconf/*-old",
		"var/log/*", "var/lib/dpkg/*-old",
	} {
		matches, err := filepath.Glob(filepath.Join(root, glob))
		if err != nil {
			return err
		}
		for _, m := range matches {
			if err := os.RemoveAll(m); err != nil {
				return fmt.Errorf("trim rootfs: %w", err)
			}
		}
	}
	// The runtime bind-mounts these; the image's copies must not carry the
	// build host's.
	for _, f := range []string{"etc/hostname", "etc/resolv.conf", "etc/hosts"} {
		p := filepath.Join(root, f)
		os.Remove(p)
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			return fmt.Errorf("trim rootfs: %w", err)
		}
	}
	return nil
}

// e2eUser is the user (and group) that upstream's agnhost image defines
// for the SupplementalGroups specs.
const (
	e2eUser  = "user-defined-in-image"
	e2eGroup = "group-defined-in-image"
)

// addE2EUser adds uid 1000 user-defined-in-image (own group 1000, member of
// gid 50000 group-defined-in-image) as alpine's adduser/addgroup do in
// upstream's agnhost Dockerfile.
func addE2EUser(root string) error {
	add := func(name, line string) error {
		p := filepath.Join(root, "etc", name)
		data, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("add e2e user: %w", err)
		}
		if bytes.Contains(data, []byte("\n"+strings.SplitN(line, ":", 2)[0]+":")) {
			return nil
		}
		if len(data) > 0 && data[len(data)-1] != '\n' {
			data = append(data, '\n')
		}
		return os.WriteFile(p, append(data, line...), 0o644)
	}
	for _, e := range []struct{ file, line string }{
		{"passwd", e2eUser + ":x:1000:1000::/home/" + e2eUser + ":/bin/sh\n"},
		{"group", e2eUser + ":x:1000:\n" + e2eGroup + ":x:50000:" + e2eUser + "\n"},
	} {
		if err := add(e.file, e.line); err != nil {
			return err
		}
	}
	home := filepath.Join(root, "home", e2eUser)
	if err := os.MkdirAll(home, 0o755); err != nil {
		return fmt.Errorf("add e2e user: %w", err)
	}
	return os.Chown(home, 1000, 1000)
}

// tarTree writes the tree at root as a layer at dst: owners, modes,
// set-id bits, symlinks, hard links and file capabilities kept; the
// contents of dev, proc and sys left out (the runtime mounts them).
func tarTree(dst, root string) (layer, error) {
	lw, err := newLayerWriter(dst)
	if err != nil {
		return layer{}, err
	}
	type inode struct{ dev, ino uint64 }
	links := map[inode]string{}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		if dir := filepath.Dir(rel); dir == "dev" || dir == "proc" || dir == "sys" {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if fi.Mode()&(fs.ModeSocket|fs.ModeNamedPipe) != 0 {
			return nil
		}
		target := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, target)
		if err != nil {
			return fmt.Errorf("layer entry %s: %w", rel, err)
		}
		h.Name, h.Uname, h.Gname, h.Format = rel, "", "", tar.FormatPAX
		h.AccessTime, h.ChangeTime = time.Time{}, time.Time{}
		if fi.IsDir() {
			h.Name += "/"
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			h.Uid, h.Gid = int(st.Uid), int(st.Gid)
			if fi.Mode().IsRegular() && st.Nlink > 1 {
				k := inode{uint64(st.Dev), st.Ino}
				if first, ok := links[k]; ok {
					h.Typeflag, h.Linkname, h.Size = tar.TypeLink, first, 0
				} else {
					links[k] = rel
				}
			}
		}
		if fi.Mode().IsRegular() {
			buf := make([]byte, 256)
			if n, err := unix.Lgetxattr(p, "security.capability", buf); err == nil && n > 0 {
				h.PAXRecords = map[string]string{"SCHILY.xattr.security.capability": string(buf[:n])}
			}
		}
		if err := lw.Tar.WriteHeader(h); err != nil {
			return fmt.Errorf("layer entry %s: %w", rel, err)
		}
		if h.Typeflag != tar.TypeReg {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		if n, err := io.Copy(lw.Tar, f); err != nil {
			return fmt.Errorf("layer entry %s: %w", rel, err)
		} else if n != h.Size {
			return fmt.Errorf("layer entry %s: changed while copying", rel)
		}
		return nil
	})
	if err != nil {
		lw.abort()
		return layer{}, fmt.Errorf("tar %s: %w", root, err)
	}
	return lw.Close()
}

// removeTree removes dir after unmounting whatever an interrupted
// debootstrap left mounted under it (its /proc and /sys).
func removeTree(dir string) error {
	if err := unmountUnder(dir); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// unmountUnder lazily unmounts every mount point at or below dir, deepest
// first.
func unmountUnder(dir string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			points = append(points, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read mounts: %w", err)
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	for _, mp := range points {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("unmount %s: %w", mp, err)
		}
	}
	return nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// lockCache takes an exclusive lock on the cache dir, waiting for another
// Build to finish; unlock releases it.
func lockCache(ctx context.Context, cacheDir string, log io.Writer) (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(cacheDir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock image cache: %w", err)
	}
	said := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock image cache: %w", err)
		}
		if !said {
			fmt.Fprintf(log, "waiting for another image build (lock %s)\n", f.Name())
			said = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}
