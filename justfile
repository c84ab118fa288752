# Sinabro developer recipes. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

bin := "bin/sinabro"
version := `git describe --tags --always --dirty 2>/dev/null || echo dev`

# Build the static sinabro executable into bin/.
build:
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/sinabro-io/sinabro/pkg/version.Version={{version}}" -o {{bin}} .

# Build the pinned etcd, kube-apiserver/-controller-manager/-scheduler/-proxy, kubelet, kubectl, agnhost, containerd (+shim, ctr), coredns, pause (cached; --with-e2e adds e2e.test).
kube-bins:
    scripts/build-kube.sh

# Run the whole test suite (unit, netns, eBPF and lab end-to-end; needs root).
test: build kube-bins
    scripts/test.sh

# Kubernetes' sig-network conformance specs against labs of real nodes (kubelet + containerd, the sinabro DaemonSet, CoreDNS): with Sinabro serving Services, then next to kube-proxy nftables.
conformance: build
    SINABRO_KUBE_BIN_DIR="$(scripts/build-kube.sh --with-e2e | tail -n1)" go test -count=1 -v -run 'TestConformance' -timeout 90m ./test/e2e/ | grep -vE '^(=== |PASS$|ok )'

# Bring up the lab (2 nodes x 2 pods), run its connectivity check.
lab: build kube-bins
    {{bin}} lab up --kube-bin-dir "$(scripts/build-kube.sh | tail -n1)"
    {{bin}} lab check

# The lab on real nodes (kubelet + containerd, the sinabro DaemonSet, CoreDNS), and its connectivity check.
lab-real: build kube-bins
    {{bin}} lab up --runtime containerd --kube-bin-dir "$(scripts/build-kube.sh | tail -n1)"
    {{bin}} lab check

# Tear the lab down (idempotent; also cleans up after a crashed lab).
lab-down: build
    {{bin}} lab down

# CNI ADD+DEL latency: sinabro vs the reference ptp + host-local plugins.
bench-cni: build
    scripts/bench-cni.sh

# go vet and gofmt.
lint:
    go vet ./...
    test -z "$(gofmt -l $(git ls-files '*.go'))" || { gofmt -l $(git ls-files '*.go'); exit 1; }

# Regenerate the eBPF objects with bpf2go (needs clang).
generate:
    go generate ./...

# A kind cluster with its default CNI disabled, the image built and loaded, the manifests applied.
deploy-kind:
    scripts/deploy-kind.sh

# In the lab: pod->pod across nodes (VXLAN) vs node->node, and agent memory.
bench-overlay: build kube-bins
    SINABRO_BENCH=1 SINABRO_KUBE_BIN_DIR="$(scripts/build-kube.sh | tail -n1)" go test -count=1 -v -run 'TestBenchOverlay|TestBenchAgentMemory' -timeout 20m ./test/e2e/ | grep -vE '^(=== |--- |PASS|ok )'

# Services: Sinabro's socket load balancer vs the real kube-proxy (nftables, iptables) at 1, 1,000 and 10,000 Services, A/B in each round.
bench-services: build kube-bins
    SINABRO_BENCH=1 SINABRO_KUBE_BIN_DIR="$(scripts/build-kube.sh | tail -n1)" go test -count=1 -v -run 'TestBenchServices' -timeout 60m ./test/e2e/ | grep -vE '^(=== |--- |PASS|ok )'

# Same-node TCP acceleration on vs off: wrk (50 and 500 connections), iperf3, a download.
# Arguments go to scripts/bench-sockmap.sh, e.g. `just bench-sockmap --server nginx`.
bench-sockmap *ARGS: build
    scripts/bench-sockmap.sh {{ARGS}}

# eBPF datapath: host routing on/off, masquerade connection rate eBPF vs nftables, kernel conntrack check (kube-proxy coexistence) on/off.
bench-datapath:
    SINABRO_BENCH=1 go test -count=1 -v -run 'HostRoutingBenchmark|ConnRateBenchmark|KernelCTBenchmark|KernelCTCost' -timeout 20m ./pkg/datapath/ | grep -vE '^(=== |--- |PASS|ok )'

# NetworkPolicy: 0 policies vs 10,000 rules selecting the pods under test (same node, across nodes), A/B in each round; rule update to enforced; agent memory.
bench-policy: build kube-bins
    SINABRO_BENCH=1 SINABRO_KUBE_BIN_DIR="$(scripts/build-kube.sh | tail -n1)" go test -count=1 -v -run 'TestBenchPolicy' -timeout 30m ./test/e2e/ | grep -vE '^(=== |--- |PASS|ok )'

# Flow telemetry off vs on (same node, across nodes), A/B in each round.
bench-flows: build kube-bins
    SINABRO_BENCH=1 SINABRO_KUBE_BIN_DIR="$(scripts/build-kube.sh | tail -n1)" go test -count=1 -v -run 'TestBenchFlows' -timeout 30m ./test/e2e/ | grep -vE '^(=== |--- |PASS|ok )'
