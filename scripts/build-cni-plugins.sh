#!/usr/bin/env bash
# Builds the reference CNI plugins (ptp, host-local, bridge, portmap, loopback),
# cnitool and the benchcni driver from the Go module proxy, using the helper
# module in scripts/cni-plugins (containernetworking/plugins and cni pinned in
# its go.mod). The binaries are cached in a directory keyed by the helper
# module's content and rebuilt only when it changes. Prints the directory
# holding the binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mod="$here/cni-plugins"
cache_root=${SINABRO_CNI_PLUGINS_CACHE:-/var/cache/sinabro/cni-plugins}
key=$( (cd "$mod" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) | LC_ALL=C sort | xargs cat; cat "$here/build-cni-plugins.sh") | sha256sum | cut -c1-16)
out="$cache_root/$key"
# binary name -> package
declare -A pkgs=(
  [ptp]=github.com/containernetworking/plugins/plugins/main/ptp
  [bridge]=github.com/containernetworking/plugins/plugins/main/bridge
  [loopback]=github.com/containernetworking/plugins/plugins/main/loopback
  [host-local]=github.com/containernetworking/plugins/plugins/ipam/host-local
  [portmap]=github.com/containernetworking/plugins/plugins/meta/portmap
  [cnitool]=github.com/containernetworking/cni/cnitool
  [benchcni]=./benchcni
)

have_all() { for b in "${!pkgs[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

mkdir -p "$out"
export CGO_ENABLED=0 GOFLAGS=-mod=mod
plugins_version=$(cd "$mod" && go list -m -f '{{.Version}}' github.com/containernetworking/plugins)
echo "building CNI plugins $plugins_version, cnitool and benchcni (cache: $out)" >&2
for b in "${!pkgs[@]}"; do
  (cd "$mod" && go build -trimpath -ldflags "-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$plugins_version" \
    -o "$out/$b.tmp" "${pkgs[$b]}" && mv "$out/$b.tmp" "$out/$b")
done
echo "$out"
