package images

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// The docker-archive format (what `docker save` writes and `ctr images
// import` reads): a tar holding manifest.json, one config JSON per image and
// the layers as uncompressed tars. Layers and configs are named by their
// sha256, so a layer shared by several images of one archive is stored once.

// layer is an uncompressed layer tar on disk; its diff_id is the sha256 of
// the file.
type layer struct {
	Path   string
	Digest string // hex sha256 of the file
	Size   int64
}

func (l layer) diffID() string { return "sha256:" + l.Digest }

// imageSpec is one image of an archive: its tags, layers (bottom first) and
// the runtime part of its config.
type imageSpec struct {
	Refs       []string
	Layers     []layer
	Entrypoint []string
	Cmd        []string
	Env        []string
	WorkingDir string
	User       string
}

// defaultPath is the PATH of every image (that of the upstream images).
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// manifestEntry is one element of manifest.json.
type manifestEntry struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// configFile is the image config (the subset of the OCI/docker config
// runtimes read).
type configFile struct {
	Architecture string        `json:"architecture"`
	OS           string        `json:"os"`
	Config       runtimeConfig `json:"config"`
	RootFS       rootFS        `json:"rootfs"`
}

type runtimeConfig struct {
	User       string   `json:"User,omitempty"`
	Env        []string `json:"Env,omitempty"`
	Entrypoint []string `json:"Entrypoint,omitempty"`
	Cmd        []string `json:"Cmd,omitempty"`
	WorkingDir string   `json:"WorkingDir,omitempty"`
}

type rootFS struct {
	Type    string   `json:"type"`
	DiffIDs []string `json:"diff_ids"`
}

// config returns the image's config JSON.
func (s imageSpec) config() ([]byte, error) {
	env := s.Env
	if len(env) == 0 {
		env = []string{defaultPath}
	}
	wd := s.WorkingDir
	if wd == "" {
		wd = "/"
	}
	c := configFile{
		Architecture: "amd64",
		OS:           "linux",
		Config:       runtimeConfig{User: s.User, Env: env, Entrypoint: s.Entrypoint, Cmd: s.Cmd, WorkingDir: wd},
		RootFS:       rootFS{Type: "layers", DiffIDs: []string{}},
	}
	for _, l := range s.Layers {
		c.RootFS.DiffIDs = append(c.RootFS.DiffIDs, l.diffID())
	}
	return json.Marshal(c)
}

// writeArchive writes the images as one docker archive at dst, through a
// temporary file renamed into place, so dst is either whole or absent.
func writeArchive(dst string, specs []imageSpec) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create archive %s: %w", dst, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	tw := tar.NewWriter(tmp)
	var manifest []manifestEntry
	written := map[string]bool{}
	for _, s := range specs {
		cfg, err := s.config()
		if err != nil {
			return fmt.Errorf("image config of %v: %w", s.Refs, err)
		}
		sum := sha256.Sum256(cfg)
		cfgName := hex.EncodeToString(sum[:]) + ".json"
		if !written[cfgName] {
			if err := addBytes(tw, cfgName, cfg); err != nil {
				return err
			}
			written[cfgName] = true
		}
		e := manifestEntry{Config: cfgName, RepoTags: s.Refs}
		for _, l := range s.Layers {
			name := l.Digest + ".tar"
			e.Layers = append(e.Layers, name)
			if written[name] {
				continue
			}
			if err := addFile(tw, name, l); err != nil {
				return err
			}
			written[name] = true
		}
		manifest = append(manifest, e)
	}
	m, err := json.Marshal(manifest)
	if err != nil {
		return err
	}
	if err := addBytes(tw, "manifest.json", m); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("write archive %s: %w", dst, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write archive %s: %w", dst, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("write archive %s: %w", dst, err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("write archive %s: %w", dst, err)
	}
	return nil
}

// epoch is the modification time of the archive's own entries and of the
// files put into layers, so equal inputs give equal layers.
var epoch = time.Unix(0, 0)

func addBytes(tw *tar.Writer, name string, data []byte) error {
	h := &tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: epoch, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
	if err := tw.WriteHeader(h); err != nil {
		return fmt.Errorf("archive entry %s: %w", name, err)
	}
	if _, err := tw.Write(data); err != nil {
		return fmt.Errorf("archive entry %s: %w", name, err)
	}
	return nil
}

func addFile(tw *tar.Writer, name string, l layer) error {
	f, err := os.Open(l.Path)
	if err != nil {
		return fmt.Errorf("open layer: %w", err)
	}
	defer f.Close()
	h := &tar.Header{Name: name, Mode: 0o644, Size: l.Size, ModTime: epoch, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
	if err := tw.WriteHeader(h); err != nil {
		return fmt.Errorf("archive entry %s: %w", name, err)
	}
	if n, err := io.Copy(tw, f); err != nil {
		return fmt.Errorf("copy layer %s: %w", l.Path, err)
	} else if n != l.Size {
		return fmt.Errorf("copy layer %s: %d bytes, want %d (changed while building?)", l.Path, n, l.Size)
	}
	return nil
}

// layerWriter writes a layer tar to a file while hashing it.
type layerWriter struct {
	f    *os.File
	h    hash.Hash
	n    int64
	Tar  *tar.Writer
	path string
}

func newLayerWriter(path string) (*layerWriter, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("create layer: %w", err)
	}
	lw := &layerWriter{f: f, h: sha256.New(), path: path}
	lw.Tar = tar.NewWriter(lw)
	return lw, nil
}

func (lw *layerWriter) Write(p []byte) (int, error) {
	n, err := lw.f.Write(p)
	lw.h.Write(p[:n])
	lw.n += int64(n)
	return n, err
}

// Close finishes the tar and returns the layer; on error the file is removed.
func (lw *layerWriter) Close() (layer, error) {
	err := lw.Tar.Close()
	if cerr := lw.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(lw.path)
		return layer{}, fmt.Errorf("write layer %s: %w", lw.path, err)
	}
	return layer{Path: lw.path, Digest: hex.EncodeToString(lw.h.Sum(nil)), Size: lw.n}, nil
}

// abort drops a half-written layer.
func (lw *layerWriter) abort() {
	lw.f.Close()
	os.Remove(lw.path)
}

// file is one entry of a layer built from a list (rather than a tree).
type file struct {
	Name string // path in the image, absolute
	Mode os.FileMode
	Src  string // host file to copy, or
	Data []byte // the contents, or
	Link string // a symlink target, or neither: a directory
	UID  int
	GID  int
}

// usrMerged reports whether a top-level name is a symlink into /usr in
// Debian since bookworm: a layer with a directory entry there replaces the
// symlink (and breaks /bin/sh in every container).
func usrMerged(top string) bool {
	switch top {
	case "bin", "sbin", "lib", "lib32", "lib64", "libx32":
		return true
	}
	return false
}

// checkName rejects paths that are not absolute and clean, and paths under
// the usr-merged symlinks of the Debian base.
func checkName(name string) error {
	if !path.IsAbs(name) || path.Clean(name) != name || name == "/" {
		return fmt.Errorf("layer path %q: not absolute and clean", name)
	}
	top, _, _ := strings.Cut(name[1:], "/")
	if usrMerged(top) {
		return fmt.Errorf("layer path %q: /%s is a symlink into /usr in the Debian base; use /usr/%s", name, top, name[1:])
	}
	return nil
}

// writeFilesLayer writes the files, and their missing parent directories
// (root, 0755), as a layer at dst.
func writeFilesLayer(dst string, files []file) (layer, error) {
	for _, f := range files {
		if err := checkName(f.Name); err != nil {
			return layer{}, err
		}
	}
	lw, err := newLayerWriter(dst)
	if err != nil {
		return layer{}, err
	}
	dirs := map[string]bool{}
	for _, f := range files {
		if f.Src == "" && f.Data == nil && f.Link == "" {
			dirs[f.Name] = true
		}
	}
	seen := map[string]bool{}
	for _, f := range files {
		for _, d := range parents(f.Name) {
			if seen[d] || dirs[d] {
				continue
			}
			seen[d] = true
			h := &tar.Header{Name: d[1:] + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}
			if err := lw.Tar.WriteHeader(h); err != nil {
				lw.abort()
				return layer{}, fmt.Errorf("layer entry %s: %w", d, err)
			}
		}
		if err := writeFile(lw.Tar, f); err != nil {
			lw.abort()
			return layer{}, err
		}
		seen[f.Name] = true
	}
	return lw.Close()
}

// parents returns the ancestors of an absolute path, outermost first,
// without "/".
func parents(name string) []string {
	var out []string
	for d := path.Dir(name); d != "/"; d = path.Dir(d) {
		out = append([]string{d}, out...)
	}
	return out
}

func writeFile(tw *tar.Writer, f file) error {
	h := &tar.Header{Name: f.Name[1:], Mode: tarMode(f.Mode), Uid: f.UID, Gid: f.GID, ModTime: epoch, Format: tar.FormatPAX}
	switch {
	case f.Link != "":
		h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, f.Link, 0o777
		return writeHeader(tw, h, f.Name)
	case f.Data != nil:
		h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Data))
		if err := writeHeader(tw, h, f.Name); err != nil {
			return err
		}
		_, err := io.Copy(tw, bytes.NewReader(f.Data))
		return err
	case f.Src != "":
		src, err := os.Open(f.Src)
		if err != nil {
			return fmt.Errorf("layer file %s: %w", f.Name, err)
		}
		defer src.Close()
		st, err := src.Stat()
		if err != nil {
			return fmt.Errorf("layer file %s: %w", f.Name, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("layer file %s: %s is not a regular file", f.Name, f.Src)
		}
		h.Typeflag, h.Size = tar.TypeReg, st.Size()
		if err := writeHeader(tw, h, f.Name); err != nil {
			return err
		}
		if n, err := io.Copy(tw, src); err != nil {
			return fmt.Errorf("layer file %s from %s: %w", f.Name, f.Src, err)
		} else if n != st.Size() {
			return fmt.Errorf("layer file %s from %s: changed while copying", f.Name, f.Src)
		}
		return nil
	default:
		h.Typeflag, h.Name = tar.TypeDir, f.Name[1:]+"/"
		return writeHeader(tw, h, f.Name)
	}
}

// tarMode converts permission and set-id bits to the tar header's mode.
func tarMode(m os.FileMode) int64 {
	mode := int64(m.Perm())
	if m&os.ModeSetuid != 0 {
		mode |= 0o4000
	}
	if m&os.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if m&os.ModeSticky != 0 {
		mode |= 0o1000
	}
	return mode
}

func writeHeader(tw *tar.Writer, h *tar.Header, name string) error {
	if err := tw.WriteHeader(h); err != nil {
		return fmt.Errorf("layer entry %s: %w", name, err)
	}
	return nil
}
