#!/usr/bin/env bash
# The whole test suite: lint, generated-code drift, then every Go test
# (unit, network-namespace, eBPF and lab end-to-end). Needs root; `just test`
# runs it after building the binary and the pinned Kubernetes binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== lint"
go vet ./...
unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then echo "gofmt needed:"; echo "$unformatted"; exit 1; fi

echo "== go.mod and go.sum tidy"
if ! go mod tidy -diff; then echo "go.mod/go.sum are not tidy: run 'go mod tidy' and commit"; exit 1; fi

echo "== static binary without vishvananda"
CGO_ENABLED=0 go build -o bin/sinabro .
file bin/sinabro | grep -q 'statically linked' || { echo "bin/sinabro is not statically linked"; exit 1; }
if go version -m bin/sinabro | grep -q vishvananda; then echo "vishvananda is linked into bin/sinabro"; exit 1; fi

if [ -n "$(git ls-files 'bpf/*.c')" ]; then
  echo "== eBPF objects match their sources (regenerated with $(clang --version | head -1))"
  go generate ./...
  if ! git diff --quiet -- pkg bpf; then
    git diff --stat -- pkg bpf
    echo "generated eBPF code differs from the committed one: run 'just generate' and commit"; exit 1
  fi
fi

echo "== fuzz CNI config parsing (20s)"
go test -run '^$' -fuzz FuzzParseConf -fuzztime 20s ./pkg/cni/

echo "== go test"
# --with-e2e: Kubernetes' own e2e.test too, for TestConformance.
export SINABRO_KUBE_BIN_DIR=${SINABRO_KUBE_BIN_DIR:-$(scripts/build-kube.sh --with-e2e | tail -n1)}
# go test -json, printed as plain go test would (failures and the closing
# ok/FAIL lines) by scripts/testreport, which also fails on any skipped test
# that scripts/skip-allowlist.txt does not allow: CI has root and every tool,
# so such a test did not run. The raw events stay in /tmp/sinabro-go-test.json.
# SINABRO_TEST_PACKAGES narrows the run (default ./...).
go build -o bin/testreport ./scripts/testreport
set +e +o pipefail
go test -json -count=1 -p 1 -timeout 60m ${SINABRO_TEST_PACKAGES:-./...} 2>&1 | tee /tmp/sinabro-go-test.json |
  bin/testreport -allow scripts/skip-allowlist.txt | tee /tmp/sinabro-go-test.log
status=("${PIPESTATUS[@]}")
set -e -o pipefail
if [ "${status[0]}" -ne 0 ]; then exit "${status[0]}"; fi
exit "${status[2]}"
