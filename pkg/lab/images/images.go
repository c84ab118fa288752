// Package images builds the container images a lab with real nodes (kubelet
// and containerd) runs, as docker-archive tars that `ctr images import`
// loads into each node's containerd: there is no registry to pull from.
//
// Build makes one archive per image (pause, sinabro, coredns, kube-proxy and
// agnhost) from local binaries; Import loads one into a containerd:
//
//	imgs, err := images.Build(ctx, images.Options{KubeBinDir: kubeBin, Sinabro: exe}, os.Stderr)
//	for _, img := range imgs {
//		err := images.Import(ctx, filepath.Join(kubeBin, "ctr"), "/abs/containerd.sock", img)
//	}
//
// Archives are cached under Options.CacheDir, named by a hash of their
// inputs (the binaries' sha256, the Debian package list, the image configs
// and a recipe version), so an unchanged image costs a hash of its
// binaries and a changed sinabro binary gives a new sinabro archive. Every
// file is written under a temporary name and renamed, so an interrupted
// build never leaves a half archive; builds sharing a cache dir take turns.
//
// kube-proxy and agnhost sit on one Debian bookworm layer made by
// debootstrap (the union of both package lists: one debootstrap, and
// containerd unpacks the shared layer once per node). The agnhost archive
// stands in for upstream's alpine-based image, and carries more tags,
// each with its own config over the same layers: busybox, jessie-dnsutils
// (both with a shell as command) and nginx and httpd (an HTTP server on
// port 80, agnhost's test-webserver; not nginx or httpd themselves).
//
// The archive format: manifest.json ([{Config, RepoTags, Layers}]), one
// config JSON per image named by its sha256 (amd64/linux, rootfs.diff_ids,
// config Entrypoint/Cmd/Env/WorkingDir/User) and the uncompressed layer
// tars named by their sha256, which is also their diff_id.
package images

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// DefaultCacheDir is where archives and the Debian base are kept.
const DefaultCacheDir = "/var/cache/sinabro/images"

// The image references the lab's manifests and containerd configs use.
const (
	// PauseRef is the sandbox image of the e2e suite; the pause archive
	// also carries :3.10 and :3.10.2 (containerd 2.4's default).
	PauseRef     = "registry.k8s.io/pause:3.10.1"
	SinabroRef   = "ghcr.io/sinabro-io/sinabro:dev"
	CoreDNSRef   = "registry.k8s.io/coredns/coredns:v1.15.0"
	KubeProxyRef = "registry.k8s.io/kube-proxy:v1.34.4"
	AgnhostRef   = "registry.k8s.io/e2e-test-images/agnhost:2.56"
)

// recipeVersion is part of every cache key: bump it when a recipe changes
// in a way its inputs do not show.
const recipeVersion = "1"

// Image is one built archive.
type Image struct {
	Name    string   // recipe name: pause, sinabro, coredns, kube-proxy, agnhost
	Refs    []string // every tag in the archive
	Archive string   // path of the docker-archive tar
	Size    int64    // bytes
	Cached  bool     // reused from the cache rather than built now
}

// Options says where the inputs are and which images to build.
type Options struct {
	// CacheDir keeps the archives and the Debian base (default
	// DefaultCacheDir).
	CacheDir string
	// KubeBinDir holds pause, coredns, agnhost and kube-proxy (the output
	// dir of scripts/build-kube.sh).
	KubeBinDir string
	// Sinabro is the static sinabro binary (default: this executable).
	Sinabro string
	// Names limits the build to these images (default: all).
	Names []string
}

// Names of the images Build knows, in build order.
func Names() []string { return []string{"pause", "sinabro", "coredns", "kube-proxy", "agnhost"} }

// basePackages are installed in the Debian base: kube-proxy's (iptables,
// nftables, conntrack, kmod, iproute2) and what the e2e specs run in
// agnhost (upstream: alpine with bind-tools curl netcat-openbsd iproute2
// iperf bash, plus busybox's wget, ping, ps, traceroute).
var basePackages = []string{
	"bash", "busybox", "ca-certificates", "conntrack", "curl", "dnsutils", "iperf", "iproute2",
	"iptables", "iputils-ping", "kmod", "netcat-openbsd", "nftables", "procps", "traceroute",
}

// recipe is how one archive is made.
type recipe struct {
	name   string
	base   bool        // on the Debian base layer
	files  []file      // the image's own layer
	images []imageSpec // configs; Layers are filled in at build time
}

func (r recipe) refs() []string {
	var out []string
	for _, s := range r.images {
		out = append(out, s.Refs...)
	}
	return out
}

// recipes returns the recipes of the selected images, or an error naming
// every missing input binary.
func recipes(o Options, names []string) ([]recipe, error) {
	bin := func(name string) string { return filepath.Join(o.KubeBinDir, name) }
	all := map[string]func() (recipe, error){
		"pause": func() (recipe, error) {
			return recipe{name: "pause",
				files: []file{{Name: "/pause", Mode: 0o755, Src: bin("pause")}},
				images: []imageSpec{{
					Refs:       []string{"registry.k8s.io/pause:3.10", PauseRef, "registry.k8s.io/pause:3.10.2"},
					Entrypoint: []string{"/pause"}, User: "65535:65535",
				}},
			}, nil
		},
		"sinabro": func() (recipe, error) {
			return recipe{name: "sinabro",
				files: []file{
					{Name: "/usr/local/bin/sinabro", Mode: 0o755, Src: o.Sinabro},
					{Name: "/tmp", Mode: 0o777 | os.ModeSticky},
				},
				images: []imageSpec{{Refs: []string{SinabroRef}, Entrypoint: []string{"/usr/local/bin/sinabro"}, Cmd: []string{"agent"}}},
			}, nil
		},
		"coredns": func() (recipe, error) {
			return recipe{name: "coredns",
				files:  []file{{Name: "/coredns", Mode: 0o755, Src: bin("coredns")}},
				images: []imageSpec{{Refs: []string{CoreDNSRef}, Entrypoint: []string{"/coredns"}}},
			}, nil
		},
		"kube-proxy": func() (recipe, error) {
			// As upstream (build/server-image/Dockerfile): the binary in
			// /usr/local/bin, no entrypoint; pods name the command.
			return recipe{name: "kube-proxy", base: true,
				files:  []file{{Name: "/usr/local/bin/kube-proxy", Mode: 0o755, Src: bin("kube-proxy")}},
				images: []imageSpec{{Refs: []string{KubeProxyRef}}},
			}, nil
		},
		"agnhost": func() (recipe, error) {
			crt, key, err := localhostCert()
			if err != nil {
				return recipe{}, err
			}
			web := []string{"/agnhost", "test-webserver", "--port=80"}
			return recipe{name: "agnhost", base: true,
				files: []file{
					{Name: "/agnhost", Mode: 0o755, Src: bin("agnhost")},
					{Name: "/agnhost-2", Link: "agnhost"},
					{Name: "/coredns", Mode: 0o755, Src: bin("coredns")},
					{Name: "/localhost.crt", Mode: 0o644, Data: crt},
					{Name: "/localhost.key", Mode: 0o644, Data: key},
					{Name: "/uploads", Mode: 0o755},
					{Name: "/usr/local/bin/iperf", Link: "/usr/bin/iperf"},
					{Name: "/usr/bin/wget", Mode: 0o755, Data: []byte(wgetScript)},
				},
				images: []imageSpec{
					{Refs: []string{AgnhostRef}, Entrypoint: []string{"/agnhost"}, Cmd: []string{"pause"}},
					{Refs: []string{"registry.k8s.io/e2e-test-images/busybox:1.37.0-1"}, Cmd: []string{"sh"}},
					{Refs: []string{"registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7"}, Cmd: []string{"bash"}},
					{Refs: []string{"registry.k8s.io/e2e-test-images/nginx:1.14-4"}, Cmd: web},
					{Refs: []string{"registry.k8s.io/e2e-test-images/httpd:2.4.38-4"}, Cmd: web},
				},
			}, nil
		},
	}
	var out []recipe
	var missing []string
	for _, n := range names {
		mk, ok := all[n]
		if !ok {
			return nil, fmt.Errorf("unknown image %q (known: %s)", n, strings.Join(Names(), ", "))
		}
		r, err := mk()
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", n, err)
		}
		for _, f := range r.files {
			if f.Src == "" {
				continue
			}
			if st, err := os.Stat(f.Src); err != nil || !st.Mode().IsRegular() {
				missing = append(missing, f.Src+" (image "+n+")")
			}
		}
		out = append(out, r)
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("missing image inputs: %s (build them with scripts/build-kube.sh)", strings.Join(missing, ", "))
	}
	return out, nil
}

// wgetScript is /usr/bin/wget: busybox wget as on alpine, but Debian's
// busybox 1.35 crashes on -T, so the timeout is enforced by timeout(1).
const wgetScript = `#!/bin/sh
# busybox wget; -T SECONDS (which crashes Debian's busybox 1.35) is run as timeout(1).
t=
n=$#
while [ "$n" -gt 0 ]; do
	a=$1; shift; n=$((n-1))
	case $a in
	-T) t=$1; shift; n=$((n-1)) ;;
	-T*) t=${a#-T} ;;
	--timeout=*) t=${a#--timeout=} ;;
	*) set -- "$@" "$a" ;;
	esac
done
if [ -n "$t" ]; then
	exec timeout "$t" busybox wget "$@"
fi
exec busybox wget "$@"
`

// baseKey is the cache key of the Debian base layer.
func baseKey() string {
	h := sha256.New()
	fmt.Fprintf(h, "base %s\n%s %s minbase\n", recipeVersion, debianSuite, debianMirror)
	pkgs := slices.Clone(basePackages)
	slices.Sort(pkgs)
	fmt.Fprintf(h, "%s\nuser %s group %s\n", strings.Join(pkgs, ","), e2eUser, e2eGroup)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// key is the cache key of a recipe's archive: the recipe version, the
// configs, the base's key and every file's name, mode and content hash.
// Generated content (the TLS pair) is named but not hashed.
func (r recipe) key(base string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "image %s %s\n", recipeVersion, r.name)
	if r.base {
		fmt.Fprintf(h, "base %s\n", base)
	}
	cfg, err := json.Marshal(r.images)
	if err != nil {
		return "", err
	}
	h.Write(cfg)
	for _, f := range r.files {
		fmt.Fprintf(h, "\n%s %o %d:%d link=%q ", f.Name, f.Mode, f.UID, f.GID, f.Link)
		switch {
		case f.Src != "":
			sum, err := fileSHA256(f.Src)
			if err != nil {
				return "", err
			}
			h.Write([]byte(sum))
		case f.Data != nil && !strings.HasPrefix(f.Name, "/localhost."):
			h.Write(f.Data)
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Build builds the selected images, or reuses their cached archives, and
// returns them in the order of Names. It needs root (debootstrap, file
// owners in the Debian base) and network access to deb.debian.org the
// first time the base is built (about 2-3 minutes).
func Build(ctx context.Context, o Options, log io.Writer) ([]Image, error) {
	if o.CacheDir == "" {
		o.CacheDir = DefaultCacheDir
	}
	if log == nil {
		log = io.Discard
	}
	if o.Sinabro == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("find the sinabro binary: %w", err)
		}
		o.Sinabro = exe
	}
	names := o.Names
	if len(names) == 0 {
		names = Names()
	}
	rs, err := recipes(o, names)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("create image cache: %w", err)
	}
	unlock, err := lockCache(ctx, o.CacheDir, log)
	if err != nil {
		return nil, err
	}
	defer unlock()
	log = &syncWriter{w: log}
	removeLeftovers(o.CacheDir)

	bk := baseKey()
	out := make([]Image, len(rs))
	var todo, todoBase []int
	for i, r := range rs {
		k, err := r.key(bk)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", r.name, err)
		}
		out[i] = Image{Name: r.name, Refs: r.refs(), Archive: filepath.Join(o.CacheDir, r.name+"-"+k+".tar")}
		if st, err := os.Stat(out[i].Archive); err == nil {
			out[i].Size, out[i].Cached = st.Size(), true
			continue
		}
		if r.base {
			todoBase = append(todoBase, i)
		} else {
			todo = append(todo, i)
		}
	}

	// debootstrap (network, minutes) runs while the others are built.
	var base layer
	g, gctx := errgroup.WithContext(ctx)
	if len(todoBase) > 0 {
		g.Go(func() error {
			var err error
			start := time.Now()
			var cached bool
			base, cached, err = baseLayer(gctx, o.CacheDir, bk, basePackages, log)
			if err == nil && !cached {
				fmt.Fprintf(log, "debian base %s: %d MB in %s\n", bk, base.Size>>20, time.Since(start).Round(time.Second))
			}
			return err
		})
	}
	g.Go(func() error {
		for _, i := range todo {
			if err := build(gctx, o.CacheDir, rs[i], layer{}, &out[i], log); err != nil {
				return err
			}
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	for _, i := range todoBase {
		if err := build(ctx, o.CacheDir, rs[i], base, &out[i], log); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// build writes a recipe's archive at img.Archive, then removes the older
// archives of the same image.
func build(ctx context.Context, cacheDir string, r recipe, base layer, img *Image, log io.Writer) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	start := time.Now()
	tmp, err := os.MkdirTemp(cacheDir, ".build-"+r.name+"-")
	if err != nil {
		return fmt.Errorf("image %s: %w", r.name, err)
	}
	defer os.RemoveAll(tmp)
	own, err := writeFilesLayer(filepath.Join(tmp, "layer.tar"), r.files)
	if err != nil {
		return fmt.Errorf("image %s: %w", r.name, err)
	}
	layers := []layer{own}
	if r.base {
		layers = []layer{base, own}
	}
	specs := slices.Clone(r.images)
	for i := range specs {
		specs[i].Layers = layers
	}
	if err := writeArchive(img.Archive, specs); err != nil {
		return fmt.Errorf("image %s: %w", r.name, err)
	}
	st, err := os.Stat(img.Archive)
	if err != nil {
		return fmt.Errorf("image %s: %w", r.name, err)
	}
	img.Size = st.Size()
	fmt.Fprintf(log, "image %s: %d MB in %s\n", r.name, img.Size>>20, time.Since(start).Round(100*time.Millisecond))
	old, _ := filepath.Glob(filepath.Join(cacheDir, r.name+"-*.tar"))
	for _, p := range old {
		if p != img.Archive && len(filepath.Base(p)) == len(filepath.Base(img.Archive)) {
			os.Remove(p)
		}
	}
	return nil
}

// removeLeftovers removes what interrupted builds left (called under the
// cache lock): build dirs, temporary archives and unfinished bases.
func removeLeftovers(cacheDir string) {
	for _, glob := range []string{".build-*", ".*.tar.tmp-*", "base-*.tmp"} {
		m, _ := filepath.Glob(filepath.Join(cacheDir, glob))
		for _, p := range m {
			removeTree(p)
		}
	}
}

// syncWriter serializes the progress lines of concurrent builds.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
