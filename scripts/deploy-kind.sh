#!/usr/bin/env bash
# Deploys sinabro on a kind cluster: creates the cluster with kind's default
# CNI (kindnet) disabled and pod subnet 10.244.0.0/16 (reused if it exists),
# builds the image from Containerfile with docker or podman, loads it into the
# nodes, applies manifests/ and waits for the DaemonSet rollout, the nodes and
# CoreDNS (which only gets a pod IP once the CNI works).
#
# usage: scripts/deploy-kind.sh [--name NAME] [--workers N] [--recreate] [--delete]
#   --name NAME   cluster name (default: $SINABRO_KIND_CLUSTER or "sinabro")
#   --workers N   worker nodes besides the control plane, on creation (default 1)
#   --recreate    delete the cluster first, then deploy
#   --delete      delete the cluster and exit
# env: SINABRO_IMAGE (image reference; default: the sinabro image named in
#      manifests/), SINABRO_CONTAINER_ENGINE (docker|podman; default: docker,
#      else podman), KIND_NODE_IMAGE (kindest/node image for new clusters),
#      SINABRO_ROLLOUT_TIMEOUT (default 300s).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
name=${SINABRO_KIND_CLUSTER:-sinabro}
workers=1
recreate=false
delete_only=false
timeout=${SINABRO_ROLLOUT_TIMEOUT:-300s}

die() { echo "deploy-kind: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --name=*) name=${1#*=}; shift ;;
    --workers) workers=${2:?--workers needs a value}; shift 2 ;;
    --workers=*) workers=${1#*=}; shift ;;
    --recreate) recreate=true; shift ;;
    --delete) delete_only=true; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $1" ;;
  esac
done
case $workers in ''|*[!0-9]*) die "--workers must be a number" ;; esac

# --- tools -------------------------------------------------------------------
engine=${SINABRO_CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null 2>&1; then engine=podman
  fi
fi
if [ "$engine" = podman ]; then
  # kind drives podman only through its (still experimental) podman provider.
  export KIND_EXPERIMENTAL_PROVIDER=${KIND_EXPERIMENTAL_PROVIDER:-podman}
fi
missing=()
command -v kind >/dev/null 2>&1 || missing+=("kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)")
if ! $delete_only; then
  if [ -z "$engine" ] || ! command -v "$engine" >/dev/null 2>&1; then
    missing+=("${engine:-docker or podman} (container engine; SINABRO_CONTAINER_ENGINE picks one)")
  fi
  command -v kubectl >/dev/null 2>&1 || missing+=("kubectl (https://kubernetes.io/docs/tasks/tools/)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  printf 'deploy-kind: missing: %s\n' "${missing[@]}" >&2
  exit 1
fi

ctx="kind-$name"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
kc() { kubectl --context "$ctx" "$@"; }
cluster_exists() { kind get clusters 2>/dev/null | grep -qx -- "$name"; }

if $delete_only || $recreate; then
  if cluster_exists; then
    echo "deploy-kind: deleting cluster $name" >&2
    kind delete cluster --name "$name"
  fi
  $delete_only && exit 0
fi
"$engine" info >/dev/null 2>&1 || die "$engine is installed but not usable (daemon not running, or no permission?)"

# --- image -------------------------------------------------------------------
[ -f "$root/Containerfile" ] || die "no Containerfile in $root"
compgen -G "$root/manifests/*.y*ml" >/dev/null || die "no manifests in $root/manifests"
# Tag the build with exactly the reference the manifests use, so they apply as
# they are. An image with no tag or :latest gets imagePullPolicy Always by
# default, which cannot work with a loaded image: say so. (With podman, give
# the manifests a fully qualified reference: podman names "sinabro:dev" as
# localhost/sinabro:dev, which the kubelet would not match.)
image=${SINABRO_IMAGE:-$(grep -rhoE "image:[[:space:]]*[\"']?[^\"'[:space:]]*sinabro[^\"'[:space:]]*" "$root/manifests" \
  | head -n1 | sed -E "s/^image:[[:space:]]*[\"']?//")}
[ -n "$image" ] || die "no sinabro image found in manifests/ (set SINABRO_IMAGE)"
ref=${image##*/} # name[:tag][@digest]
if [[ $ref != *@* ]]; then
  if [[ $ref != *:* ]]; then
    echo "deploy-kind: warning: $image has no tag; the manifests need imagePullPolicy: IfNotPresent or the kubelet will try to pull it" >&2
  elif [[ ${ref##*:} == latest ]]; then
    echo "deploy-kind: warning: $image is :latest; the manifests need imagePullPolicy: IfNotPresent or the kubelet will try to pull it" >&2
  fi
fi
version=$(cd "$root" && git describe --tags --always --dirty 2>/dev/null || echo dev)
echo "deploy-kind: building $image ($version) with $engine" >&2
"$engine" build -f "$root/Containerfile" --build-arg VERSION="$version" -t "$image" "$root"

# --- cluster -----------------------------------------------------------------
if cluster_exists; then
  echo "deploy-kind: reusing cluster $name (--recreate for a fresh one)" >&2
else
  cfg=$tmp/kind.yaml
  {
    echo "kind: Cluster"
    echo "apiVersion: kind.x-k8s.io/v1alpha4"
    echo "networking:"
    echo "  disableDefaultCNI: true"
    echo "  podSubnet: 10.244.0.0/16"
    echo "  serviceSubnet: 10.96.0.0/12"
    echo "nodes:"
    echo "- role: control-plane"
    for _ in $(seq 1 "$workers"); do echo "- role: worker"; done
  } >"$cfg"
  args=(create cluster --name "$name" --config "$cfg")
  [ -z "${KIND_NODE_IMAGE:-}" ] || args+=(--image "$KIND_NODE_IMAGE")
  echo "deploy-kind: creating cluster $name (1 control plane + $workers workers, no default CNI)" >&2
  kind "${args[@]}"
fi

echo "deploy-kind: loading $image into the nodes" >&2
if [ "$engine" = docker ]; then
  kind load docker-image "$image" --name "$name"
else
  archive=$tmp/image.tar
  "$engine" save -o "$archive" "$image"
  kind load image-archive "$archive" --name "$name"
fi

# --- manifests -----------------------------------------------------------------
# DaemonSets among objects kubectl prints, as namespace/name lines (a single
# object is printed bare, several as a List).
ds_tmpl='{{define "ds"}}{{if eq .kind "DaemonSet"}}{{.metadata.namespace}}/{{.metadata.name}}{{"\n"}}{{end}}{{end}}{{if .items}}{{range .items}}{{template "ds" .}}{{end}}{{else}}{{template "ds" .}}{{end}}'
existing=$(kc get -f "$root/manifests/" --ignore-not-found -o go-template="$ds_tmpl" 2>/dev/null || true)
echo "deploy-kind: applying manifests/" >&2
dss=$(kc apply -f "$root/manifests/" -o go-template="$ds_tmpl")
[ -n "$dss" ] || die "manifests/ define no DaemonSet to wait for"

failed=false
for ds in $dss; do
  ns=${ds%%/*} n=${ds#*/}
  ns=${ns:-default}
  # Same image reference, new content: the pod template did not change, so
  # restart explicitly to pick up the freshly loaded image.
  if grep -qx -- "$ds" <<<"$existing"; then
    kc -n "$ns" rollout restart "daemonset/$n"
  fi
  echo "deploy-kind: waiting for daemonset $ns/$n (timeout $timeout)" >&2
  if ! kc -n "$ns" rollout status "daemonset/$n" --timeout="$timeout"; then
    failed=true
    kc -n "$ns" get pods -o wide || true
    kc -n "$ns" describe "daemonset/$n" | tail -n 30 || true
    # shellcheck disable=SC2016 # a go-template, not shell
    sel=$(kc -n "$ns" get "daemonset/$n" -o go-template='{{range $k, $v := .spec.selector.matchLabels}}{{$k}}={{$v}},{{end}}' 2>/dev/null | sed 's/,$//')
    [ -z "$sel" ] || kc -n "$ns" logs -l "$sel" --all-containers --prefix --tail=40 || true
  fi
done
$failed && die "DaemonSet rollout did not complete"

echo "deploy-kind: waiting for nodes Ready and CoreDNS (needs working pod networking)" >&2
kc wait --for=condition=Ready nodes --all --timeout="$timeout"
kc -n kube-system rollout status deployment/coredns --timeout="$timeout"
kc get nodes -o wide
kc get pods -A -o wide
echo "deploy-kind: done; kubectl --context $ctx ..." >&2
