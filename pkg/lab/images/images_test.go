package images

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// readArchive returns the entries of a docker archive by name.
func readArchive(t *testing.T, path string) map[string][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("read %s: %v", path, err)
		}
		if _, dup := out[h.Name]; dup {
			t.Errorf("archive entry %s stored twice", h.Name)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = data
	}
}

// checkArchive verifies manifest, configs and layers agree, and returns the
// config of every ref.
func checkArchive(t *testing.T, path string) map[string]configFile {
	t.Helper()
	entries := readArchive(t, path)
	var manifest []manifestEntry
	if err := json.Unmarshal(entries["manifest.json"], &manifest); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	byRef := map[string]configFile{}
	for _, m := range manifest {
		raw, ok := entries[m.Config]
		if !ok {
			t.Fatalf("config %s missing from the archive", m.Config)
		}
		if sum := sha256.Sum256(raw); hex.EncodeToString(sum[:])+".json" != m.Config {
			t.Errorf("config %s: sha256 %x does not match its name", m.Config, sum)
		}
		var c configFile
		if err := json.Unmarshal(raw, &c); err != nil {
			t.Fatalf("config %s: %v", m.Config, err)
		}
		if c.Architecture != "amd64" || c.OS != "linux" || c.RootFS.Type != "layers" {
			t.Errorf("config %s: arch %q os %q rootfs %q, want amd64 linux layers", m.Config, c.Architecture, c.OS, c.RootFS.Type)
		}
		if !slices.Contains(c.Config.Env, defaultPath) {
			t.Errorf("config %s: env %v lacks %s", m.Config, c.Config.Env, defaultPath)
		}
		if len(c.RootFS.DiffIDs) != len(m.Layers) {
			t.Fatalf("config %s: %d diff_ids for %d layers", m.Config, len(c.RootFS.DiffIDs), len(m.Layers))
		}
		for i, name := range m.Layers {
			data, ok := entries[name]
			if !ok {
				t.Fatalf("layer %s missing from the archive", name)
			}
			sum := sha256.Sum256(data)
			if got, want := "sha256:"+hex.EncodeToString(sum[:]), c.RootFS.DiffIDs[i]; got != want {
				t.Errorf("layer %s: sha256 %s, diff_id %s", name, got, want)
			}
			if _, err := tar.NewReader(bytes.NewReader(data)).Next(); err != nil {
				t.Errorf("layer %s is not a tar: %v", name, err)
			}
		}
		for _, r := range m.RepoTags {
			byRef[r] = c
		}
	}
	return byRef
}

// layerNames lists a layer tar's entries with their types.
func layerNames(t *testing.T, path string) map[string]*tar.Header {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]*tar.Header{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = h
	}
}

func TestWriteArchive(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "bin")
	if err := os.WriteFile(src, []byte("#!/bin/sh\necho hi\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	base, err := writeFilesLayer(filepath.Join(dir, "base.tar"), []file{
		{Name: "/etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0::/root:/bin/sh\n")},
	})
	if err != nil {
		t.Fatal(err)
	}
	own, err := writeFilesLayer(filepath.Join(dir, "own.tar"), []file{
		{Name: "/usr/local/bin/tool", Mode: 0o755, Src: src},
		{Name: "/uploads", Mode: 0o755},
		{Name: "/tool-2", Link: "usr/local/bin/tool"},
		{Name: "/home/u/x", Mode: 0o600, Data: []byte{}, UID: 1000, GID: 50000},
	})
	if err != nil {
		t.Fatal(err)
	}
	names := layerNames(t, own.Path)
	for name, typ := range map[string]byte{
		"usr/": tar.TypeDir, "usr/local/": tar.TypeDir, "usr/local/bin/": tar.TypeDir, "usr/local/bin/tool": tar.TypeReg,
		"uploads/": tar.TypeDir, "tool-2": tar.TypeSymlink, "home/u/x": tar.TypeReg,
	} {
		if h, ok := names[name]; !ok || h.Typeflag != typ {
			t.Errorf("layer entry %s: %v, want type %c", name, h, typ)
		}
	}
	if h := names["home/u/x"]; h != nil && (h.Uid != 1000 || h.Gid != 50000 || h.Mode != 0o600) {
		t.Errorf("home/u/x: uid %d gid %d mode %o, want 1000 50000 600", h.Uid, h.Gid, h.Mode)
	}

	archive := filepath.Join(dir, "img.tar")
	specs := []imageSpec{
		{Refs: []string{"example.com/a:1", "example.com/a:2"}, Layers: []layer{base, own}, Entrypoint: []string{"/tool-2"}, Cmd: []string{"pause"}},
		{Refs: []string{"example.com/b:1"}, Layers: []layer{base, own}, Cmd: []string{"sh"}},
	}
	if err := writeArchive(archive, specs); err != nil {
		t.Fatal(err)
	}
	byRef := checkArchive(t, archive)
	for _, r := range []string{"example.com/a:1", "example.com/a:2", "example.com/b:1"} {
		if _, ok := byRef[r]; !ok {
			t.Errorf("ref %s missing from manifest.json", r)
		}
	}
	if c := byRef["example.com/a:1"].Config; !slices.Equal(c.Entrypoint, []string{"/tool-2"}) || !slices.Equal(c.Cmd, []string{"pause"}) || c.WorkingDir != "/" {
		t.Errorf("a:1 config %+v, want entrypoint [/tool-2] cmd [pause] workdir /", c)
	}
	if c := byRef["example.com/b:1"].Config; c.Entrypoint != nil || !slices.Equal(c.Cmd, []string{"sh"}) {
		t.Errorf("b:1 config %+v, want no entrypoint, cmd [sh]", c)
	}
	if got := len(readArchive(t, archive)); got != 5 { // manifest, 2 configs, 2 layers
		t.Errorf("archive has %d entries, want 5 (shared layers stored once)", got)
	}
}

func TestCheckName(t *testing.T) {
	for _, tt := range []struct {
		name string
		ok   bool
	}{
		{"/usr/bin/wget", true},
		{"/agnhost", true},
		{"/usr/local/bin/kube-proxy", true},
		{"/bin/wget", false}, // would replace Debian's /bin -> usr/bin
		{"/lib/x", false},
		{"/sbin/x", false},
		{"/binaries/x", true},
		{"usr/bin/x", false},
		{"/usr/../bin/x", false},
		{"/", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := checkName(tt.name); (err == nil) != tt.ok {
				t.Errorf("checkName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
			}
		})
	}
}

// fakeBins writes stand-in binaries for the images without the Debian base.
func fakeBins(t *testing.T, dir string) {
	t.Helper()
	for _, b := range []string{"pause", "coredns", "sinabro"} {
		if err := os.WriteFile(filepath.Join(dir, b), []byte("#!/bin/sh\n# "+b+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func TestBuildCache(t *testing.T) {
	bins, cache := t.TempDir(), t.TempDir()
	fakeBins(t, bins)
	o := Options{CacheDir: cache, KubeBinDir: bins, Sinabro: filepath.Join(bins, "sinabro"), Names: []string{"pause", "sinabro", "coredns"}}
	ctx := context.Background()
	first, err := Build(ctx, o, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range first {
		if img.Cached {
			t.Errorf("%s: cached on an empty cache", img.Name)
		}
		byRef := checkArchive(t, img.Archive)
		for _, r := range img.Refs {
			if _, ok := byRef[r]; !ok {
				t.Errorf("%s: ref %s not in the archive", img.Name, r)
			}
		}
	}
	if c := checkArchive(t, first[1].Archive)[SinabroRef].Config; !slices.Equal(c.Entrypoint, []string{"/usr/local/bin/sinabro"}) || !slices.Equal(c.Cmd, []string{"agent"}) {
		t.Errorf("sinabro config %+v, want entrypoint [/usr/local/bin/sinabro] cmd [agent]", c)
	}

	again, err := Build(ctx, o, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for i, img := range again {
		if !img.Cached || img.Archive != first[i].Archive {
			t.Errorf("%s: second build cached=%v archive %s, want cached %s", img.Name, img.Cached, img.Archive, first[i].Archive)
		}
	}

	// A new sinabro binary makes a new sinabro archive and drops the old.
	if err := os.WriteFile(o.Sinabro, []byte("#!/bin/sh\n# sinabro v2\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	third, err := Build(ctx, o, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if third[1].Cached || third[1].Archive == first[1].Archive {
		t.Errorf("sinabro after a binary change: cached=%v archive %s, want a new build", third[1].Cached, third[1].Archive)
	}
	if _, err := os.Stat(first[1].Archive); !os.IsNotExist(err) {
		t.Errorf("old sinabro archive %s still there (err %v)", first[1].Archive, err)
	}
	if !third[0].Cached || !third[2].Cached {
		t.Errorf("pause/coredns rebuilt after only sinabro changed")
	}
	left, _ := filepath.Glob(filepath.Join(cache, ".*tmp*"))
	if len(left) > 0 {
		t.Errorf("temporary files left in the cache: %v", left)
	}
}

func TestBuildMissingInput(t *testing.T) {
	_, err := Build(context.Background(), Options{CacheDir: t.TempDir(), KubeBinDir: t.TempDir(), Sinabro: "/nonexistent", Names: []string{"pause", "sinabro"}}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "pause") || !strings.Contains(err.Error(), "/nonexistent") {
		t.Errorf("Build without inputs = %v, want an error naming pause and the sinabro binary", err)
	}
}

// TestWgetScript runs the wget wrapper with stand-ins for busybox and
// timeout that print their arguments.
func TestWgetScript(t *testing.T) {
	dir := t.TempDir()
	for _, b := range []string{"busybox", "timeout"} {
		if err := os.WriteFile(filepath.Join(dir, b), []byte("#!/bin/sh\necho "+b+" \"$@\"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	wget := filepath.Join(dir, "wget")
	if err := os.WriteFile(wget, []byte(wgetScript), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"-T", "5", "-qO-", "http://a b/"}, "timeout 5 busybox wget -qO- http://a b/"},
		{[]string{"-T2", "-q", "http://x/"}, "timeout 2 busybox wget -q http://x/"},
		{[]string{"--timeout=3", "http://x/"}, "timeout 3 busybox wget http://x/"},
		{[]string{"-q", "-O", "-", "http://x/"}, "busybox wget -q -O - http://x/"},
	} {
		cmd := exec.Command("sh", append([]string{wget}, tt.args...)...)
		cmd.Env = []string{"PATH=" + dir + ":/usr/bin:/bin"}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("wget %q: %v: %s", tt.args, err, out)
		}
		if got := strings.TrimSpace(string(out)); got != tt.want {
			t.Errorf("wget %q ran %q, want %q", tt.args, got, tt.want)
		}
	}
}
