#!/usr/bin/env bash
# CNI ADD/DEL latency of sinabro against the reference ptp + host-local plugins,
# measured in the same run, interleaved round by round (timings on a shared VM
# drift; only the ratio of two interleaved series is worth reading).
#
# Everything happens in network namespaces this script creates: the plugins are
# executed (through libcni, by scripts/cni-plugins/benchcni) from inside a
# private "node" netns, and every ADD gets a fresh pod netns. The root netns is
# never touched. Needs root.
#
# usage: scripts/bench-cni.sh [--rounds N] [--warmup N] [--parallel N] [--compare BIN] [--baseline-only] [-- benchcni flags]
#   --rounds N       measured rounds, >= 30 (default 40; env SINABRO_BENCH_ROUNDS)
#   --warmup N       unmeasured rounds first (default 2; env SINABRO_BENCH_WARMUP)
#   --parallel N     pods per plugin per round, ADDed then DELed concurrently (default 1)
#   --compare BIN    also run BIN, another sinabro build (say, of the previous
#                    commit), as a third contestant "sinabro-b": a regression check
#   --baseline-only  ptp + host-local alone (no sinabro binary needed)
#   after --         passed to benchcni, e.g. -- -sinabro-cidr 10.244.1.0/28 -ptp-cidr 10.245.1.0/28
#                    (a small subnet turns the run into an IPAM leak check)
#   env SINABRO_BIN  the sinabro executable (default bin/sinabro; built if missing)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rounds=${SINABRO_BENCH_ROUNDS:-40}
warmup=${SINABRO_BENCH_WARMUP:-2}
parallel=1
plugins=sinabro,ptp
compare=
extra=()
sinabro=${SINABRO_BIN:-$root/bin/sinabro}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=${2:?--rounds needs a value}; shift 2 ;;
    --rounds=*) rounds=${1#*=}; shift ;;
    --warmup) warmup=${2:?--warmup needs a value}; shift 2 ;;
    --warmup=*) warmup=${1#*=}; shift ;;
    --parallel) parallel=${2:?--parallel needs a value}; shift 2 ;;
    --parallel=*) parallel=${1#*=}; shift ;;
    --compare) compare=${2:?--compare needs a sinabro executable}; shift 2 ;;
    --compare=*) compare=${1#*=}; shift ;;
    --baseline-only) plugins=ptp; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench-cni: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case $rounds in ''|*[!0-9]*) echo "bench-cni: --rounds must be a number" >&2; exit 2 ;; esac
if [ "$rounds" -lt 30 ]; then echo "bench-cni: warning: $rounds rounds; p99 needs >= 30 to mean anything" >&2; fi
[ "$(id -u)" = 0 ] || { echo "bench-cni: needs root (network namespaces)" >&2; exit 1; }
command -v ip >/dev/null || { echo "bench-cni: needs iproute2 (ip)" >&2; exit 1; }

plugin_dir=$("$here/build-cni-plugins.sh" | tail -n1)

answers_version() { CNI_COMMAND=VERSION "$1" </dev/null 2>/dev/null | grep -q cniVersion; }
if [ -n "$compare" ]; then
  [ "$plugins" != ptp ] || { echo "bench-cni: --compare and --baseline-only exclude each other" >&2; exit 2; }
  answers_version "$compare" || { echo "bench-cni: --compare $compare does not answer CNI VERSION" >&2; exit 1; }
  plugins=sinabro,sinabro-b,ptp
fi

if [ "$plugins" != ptp ]; then
  if [ ! -x "$sinabro" ]; then
    echo "bench-cni: building $sinabro" >&2
    (cd "$root" && CGO_ENABLED=0 go build -trimpath -o "$sinabro" .)
  fi
  if ! answers_version "$sinabro"; then
    echo "bench-cni: $sinabro does not answer CNI VERSION; is the CNI plugin built in? (--baseline-only runs ptp alone)" >&2
    exit 1
  fi
fi

node_ns=sbbench-node-$$
work=$(mktemp -d /tmp/sbbench.XXXXXX)
cleanup() {
  ip netns del "$node_ns" 2>/dev/null || true
  # Pod netns mounts live in the benchmark's private mount namespace and die
  # with it; whatever is left here is plain files.
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# CNI_PATH holds exactly the binaries under test, copied like /opt/cni/bin.
mkdir -p "$work/bin"
cp "$plugin_dir/ptp" "$plugin_dir/host-local" "$work/bin/"
if [ "$plugins" != ptp ]; then cp "$sinabro" "$work/bin/sinabro"; fi
if [ -n "$compare" ]; then
  # Same plugin type "sinabro", so a CNI_PATH of its own.
  mkdir -p "$work/bin-b"
  cp "$compare" "$work/bin-b/sinabro"
  extra=(-bin-dir-b "$work/bin-b" "${extra[@]}")
fi

ip netns add "$node_ns"
ip -n "$node_ns" link set lo up

sb_version=baseline-only
[ "$plugins" = ptp ] || sb_version=$("$sinabro" version 2>/dev/null || echo "$sinabro (version unknown)")
[ -z "$compare" ] || sb_version="$sb_version; sinabro-b: $("$compare" version 2>/dev/null || echo "$compare (version unknown)")"
echo "bench-cni: kernel $(uname -r), $(nproc) cpus; $sb_version; reference plugins $plugin_dir"
args=(-bin-dir "$work/bin" -work "$work" -rounds "$rounds" -warmup "$warmup" -parallel "$parallel" -plugins "$plugins" "${extra[@]}")
echo "command: ip netns exec $node_ns $plugin_dir/benchcni ${args[*]}"
ip netns exec "$node_ns" "$plugin_dir/benchcni" "${args[@]}"
