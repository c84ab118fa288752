#!/usr/bin/env bash
# Installs what building, testing and the lab need on a fresh Debian 12
# machine (run as root): Debian packages and the `just` command runner.
# Fast when everything is already there.
set -euo pipefail

# runc: the OCI runtime under the lab's real nodes (containerd is built by
# scripts/build-kube.sh; runc needs cgo, so Debian's is used). debootstrap:
# Debian root filesystems for the e2e test images (agnhost, kube-proxy).
# util-linux (nsenter, unshare) is essential in Debian and always there.
# containerd: Debian's 1.x, for lab nodes of `lab up --containerd v1|mixed`
# (the conformance run's second node); nothing starts it by itself here.
packages=(clang llvm libbpf-dev bpftool iproute2 iperf3 wrk iputils-ping nftables iptables file kmod
  runc debootstrap containerd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v just >/dev/null 2>&1; then
  echo "setup: installing just (npm rust-just@1.57.0)" >&2
  command -v npm >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  npm install -g --silent rust-just@1.57.0 >/dev/null
fi

command -v go >/dev/null 2>&1 || { echo "setup: Go 1.26 is required and not on PATH" >&2; exit 1; }
echo "setup: ok ($(go version | cut -d' ' -f3), just $(just --version | cut -d' ' -f2), $(clang --version | head -1))" >&2
