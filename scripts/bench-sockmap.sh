#!/usr/bin/env bash
# Same-node TCP acceleration (pkg/sockmap) on vs off, interleaved round by
# round (timings on a shared VM drift; read the ratios):
#   - wrk against a small Go HTTP server in a same-node pod, 50 connections
#     for 10 s and 500 connections for 30 s: req/s, mean and p99 latency;
#     each round runs "on" and "off" back to back, alternating which goes
#     first;
#   - bulk, in on/off pairs run back to back (--pairs per round; this VM's
#     throughput jumps between two levels every few tens of seconds, so
#     the median of the pair ratios is the figure to read): iperf3
#     single-stream throughput pod to pod, and a download (a small
#     redirected request, then 100 MiB one way past the flow window, ten
#     times per sample).
#
# Everything happens in network namespaces and a cgroup the benchmark
# creates (a node netns, two pod netns wired like the CNI does, a cgroup v2
# child of /sys/fs/cgroup/unified for the pod processes, a bpffs root under
# /sys/fs/bpf); the root netns is never touched. Needs root, wrk and iperf3
# (apt-get install wrk iperf3).
#
# usage: scripts/bench-sockmap.sh [--rounds N] [--wrk CONNS:SECS,...] [--iperf SECS] [--pairs N] [--iperf-len SIZE] [--quick]
#   --rounds N      rounds, each running on and off (default 3)
#   --wrk LIST      wrk runs per round (default 50:10,500:30)
#   --iperf SECS    iperf3 duration per sample, 0 to skip (default 5)
#   --pairs N       bulk on/off pairs per round (default 3)
#   --iperf-len L   iperf3 write size (-l), e.g. 4K (default iperf3's 128K)
#   --download MB   download size, 0 to skip (default 100)
#   --window BYTES  Config.Window (default 4 MiB)
#   --server S      wrk's HTTP server: go (net/http, default) or nginx
#   --quick         --rounds 2 --wrk 50:3,500:3 --iperf 3 --pairs 1
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rounds=3 wrk=50:10,500:30 iperf=5 pairs=3 iperflen= window= download=100 server=go
while [ $# -gt 0 ]; do
	case $1 in
	--rounds) rounds=$2; shift 2 ;;
	--wrk) wrk=$2; shift 2 ;;
	--iperf) iperf=$2; shift 2 ;;
	--pairs) pairs=$2; shift 2 ;;
	--iperf-len) iperflen=$2; shift 2 ;;
	--window) window=$2; shift 2 ;;
	--download) download=$2; shift 2 ;;
	--server) server=$2; shift 2 ;;
	--quick) rounds=2 wrk=50:3,500:3 iperf=3 pairs=1; shift ;;
	-h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "unknown argument $1" >&2; exit 2 ;;
	esac
done
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for bin in wrk iperf3 ip; do
	command -v $bin >/dev/null || { echo "needs $bin (apt-get install wrk iperf3 iproute2)" >&2; exit 1; }
done
if ! grep -qs " /sys/fs/bpf bpf " /proc/mounts; then
	mount -t bpf bpf /sys/fs/bpf
fi
test_bin=$(mktemp /tmp/sockmap-bench.XXXXXX)
trap 'rm -f "$test_bin"' EXIT
(cd "$root" && go test -c -o "$test_bin" ./pkg/sockmap)

# Budget: per round 2 × (sum of wrk seconds + pairs × (iperf seconds + downloads) + setup).
total=0
IFS=, read -ra runs <<<"$wrk"
for r in "${runs[@]}"; do total=$((total + ${r#*:} + 5)); done
total=$(( (total + pairs * (iperf + 3) + 5) * 2 * rounds + 120 ))
echo "sockmap bench: $rounds rounds, wrk $wrk against $server, iperf3 ${iperf}s${iperflen:+ -l $iperflen}, about ${total}s"
cd "$root/pkg/sockmap"
SOCKMAP_BENCH=1 SOCKMAP_BENCH_ROUNDS=$rounds SOCKMAP_BENCH_WRK=$wrk SOCKMAP_BENCH_IPERF=$iperf SOCKMAP_BENCH_PAIRS=$pairs \
SOCKMAP_BENCH_IPERF_LEN=$iperflen SOCKMAP_WINDOW=$window SOCKMAP_BENCH_DOWNLOAD_MB=$download SOCKMAP_BENCH_SERVER=$server \
	"$test_bin" -test.run '^TestBenchSockmap$' -test.v -test.timeout "$((total * 2))s"
