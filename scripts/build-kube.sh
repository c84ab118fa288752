#!/usr/bin/env bash
# Builds the pinned control-plane binaries for `sinabro lab` (etcd,
# kube-apiserver, kube-controller-manager, kube-proxy) from the Go module proxy, using the
# helper modules in scripts/kube and scripts/etcd. The binaries are cached in
# a directory keyed by the helper modules' content and rebuilt only when the
# pins change. Prints the directory holding the binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${SINABRO_KUBE_CACHE:-/var/cache/sinabro/kube}
key=$(cat "$here"/kube/go.mod "$here"/kube/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum "$0" | sha256sum | cut -c1-16)
out="$cache_root/$key"
bins=(etcd kube-apiserver kube-controller-manager kube-proxy)

have_all() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

mkdir -p "$out"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v1.34.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
echo "building etcd v3.6.6 (cache: $out)" >&2
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" . && mv "$out/etcd.tmp" "$out/etcd")
for b in kube-apiserver kube-controller-manager kube-proxy; do
  echo "building $b v1.34.4 (a few minutes on a cold cache)" >&2
  (cd "$here/kube" && go build -trimpath -ldflags "$ldflags" -o "$out/$b.tmp" "k8s.io/kubernetes/cmd/$b" && mv "$out/$b.tmp" "$out/$b")
done
echo "$out"
