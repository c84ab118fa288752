// Package atomicfile writes files so that readers see either the old or the
// new content, never a partial one, even if the writer is killed.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write writes data to path through a temp file in the same
// directory, fsyncs it, renames it into place and fsyncs the directory, so
// the new content also survives a power loss.
func Write(path string, data []byte, perm os.FileMode) error {
	if err := Replace(path, data, perm); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Replace is Write without the directory fsync: still never partial (the
// file is fsynced before the rename), but after a power loss the previous
// content may be back. For state that tolerates that, it saves a disk flush.
func Replace(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
