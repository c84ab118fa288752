#!/usr/bin/env bash
# Builds the pinned binaries for `sinabro lab` from the Go module proxy, using
# the helper modules next to this script:
#   scripts/etcd        etcd
#   scripts/kube        kube-apiserver, kube-controller-manager, kube-scheduler,
#                       kube-proxy, kubelet, kubectl, agnhost (k8s.io/kubernetes)
#                       and, with --with-e2e, the upstream e2e suite (e2e.test)
#   scripts/containerd  containerd, containerd-shim-runc-v2, ctr
#   scripts/coredns     coredns
#   scripts/pause       pause (the pod sandbox process, standard library only)
#   scripts/cni-plugins portmap and loopback (the real nodes' /opt/cni/bin has
#                       them, as on kubeadm nodes; containerd 1.x needs loopback;
#                       scripts/build-cni-plugins.sh builds the rest)
# runc is not built (it needs cgo): scripts/setup.sh installs Debian's.
# The binaries are cached in a directory keyed by the helper modules' content
# and this script, and rebuilt only when the pins change; each binary is built
# only if missing (to a temporary name, then renamed). e2e.test takes a few
# minutes even on a warm Go cache, so it is built only with --with-e2e.
# Prints the directory holding the binaries on its last line.
#
# Usage: scripts/build-kube.sh [--with-e2e]
set -euo pipefail
with_e2e=0
for a in "$@"; do
  case "$a" in
    --with-e2e) with_e2e=1 ;;
    *) echo "usage: $0 [--with-e2e]" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mods=(etcd kube containerd coredns pause)
cache_root=${SINABRO_KUBE_CACHE:-/var/cache/sinabro/kube}
# Only the pins of scripts/cni-plugins: its benchcni sources do not matter here.
key=$( (cd "$here" && find "${mods[@]}" -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) | LC_ALL=C sort | xargs cat
  cat "$here/cni-plugins/go.mod" "$here/cni-plugins/go.sum" "$here/build-kube.sh") | sha256sum | cut -c1-16)
out="$cache_root/$key"

# binary name -> "helper module|package"
declare -A src=(
  [etcd]="etcd|."
  [kube-apiserver]="kube|k8s.io/kubernetes/cmd/kube-apiserver"
  [kube-controller-manager]="kube|k8s.io/kubernetes/cmd/kube-controller-manager"
  [kube-scheduler]="kube|k8s.io/kubernetes/cmd/kube-scheduler"
  [kube-proxy]="kube|k8s.io/kubernetes/cmd/kube-proxy"
  [kubelet]="kube|k8s.io/kubernetes/cmd/kubelet"
  [kubectl]="kube|k8s.io/kubernetes/cmd/kubectl"
  [agnhost]="kube|k8s.io/kubernetes/test/images/agnhost"
  [pause]="pause|."
  [containerd]="containerd|github.com/containerd/containerd/v2/cmd/containerd"
  [containerd-shim-runc-v2]="containerd|github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
  [ctr]="containerd|github.com/containerd/containerd/v2/cmd/ctr"
  [coredns]="coredns|github.com/coredns/coredns"
  [portmap]="cni-plugins|github.com/containernetworking/plugins/plugins/meta/portmap"
  [loopback]="cni-plugins|github.com/containernetworking/plugins/plugins/main/loopback"
)
# Build order: quick ones first.
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl kubelet agnhost pause
  containerd containerd-shim-runc-v2 ctr coredns portmap loopback)
want=("${bins[@]}")
[ "$with_e2e" = 1 ] && want+=(e2e.test)

have_all() { for b in "${want[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

mkdir -p "$out"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
modver() { (cd "$here/$1" && go list -m -f '{{.Version}}' "$2"); }
kube_version=$(modver kube k8s.io/kubernetes)            # v1.34.4
kube_minor=${kube_version#v*.}; kube_minor=${kube_minor%%.*}
kube_major=${kube_version#v}; kube_major=${kube_major%%.*}
containerd_version=$(modver containerd github.com/containerd/containerd/v2)
plugins_version=$(modver cni-plugins github.com/containernetworking/plugins)
# Without the -X flags the binaries (and the nodes) report v0.0.0.
kube_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$kube_version -X k8s.io/component-base/version.gitMajor=$kube_major -X k8s.io/component-base/version.gitMinor=$kube_minor"
echo "building into $out" >&2

# build NAME: go build one binary unless it is already there.
build() {
  local b=$1 mod=${src[$1]%%|*} pkg=${src[$1]#*|} flags=(-trimpath) ldflags="-s -w" t0=$SECONDS
  [ -x "$out/$b" ] && return 0
  case "$mod" in
    kube) ldflags=$kube_ldflags ;;
    containerd) flags+=(-tags no_btrfs); ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$containerd_version" ;;
    cni-plugins) ldflags="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$plugins_version" ;;
  esac
  echo "building $b ($mod: $pkg)" >&2
  (cd "$here/$mod" && go build "${flags[@]}" -ldflags "$ldflags" -o "$out/$b.tmp.$$" "$pkg" && mv "$out/$b.tmp.$$" "$out/$b")
  echo "built $b in $((SECONDS - t0)) s" >&2
}
for b in "${bins[@]}"; do build "$b"; done

if [ "$with_e2e" = 1 ] && ! [ -x "$out/e2e.test" ]; then
  echo "building e2e.test $kube_version (a few minutes even on a warm cache)" >&2
  t0=$SECONDS
  (cd "$here/kube" && go test -c -trimpath -ldflags "$kube_ldflags" -o "$out/e2e.test.tmp.$$" k8s.io/kubernetes/test/e2e && mv "$out/e2e.test.tmp.$$" "$out/e2e.test")
  echo "built e2e.test in $((SECONDS - t0)) s" >&2
fi
echo "$out"
