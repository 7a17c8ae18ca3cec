# Shared settings of the local Kubernetes e2e cluster (sourced by scripts/k8s-e2e).
# shellcheck shell=bash

K8S_VERSION=v1.36.3
BALLAST_CACHE="${BALLAST_CACHE:-/var/cache/ballast}"
STATE="${BALLAST_K8S_STATE:-/var/tmp/ballast-k8s}"
BIN="$BALLAST_CACHE/k8s/bin"
IMAGES="$BALLAST_CACHE/k8s/images"

# Go: one module and build cache for everything, outside the checkout. (The
# machines have Go 1.26 in /usr/local/go.)
case ":$PATH:" in *:/usr/local/go/bin:*) ;; *) PATH="$PATH:/usr/local/go/bin" ;; esac
command -v go >/dev/null || { echo "k8s-e2e: needs Go 1.26 (go on PATH or in /usr/local/go)" >&2; exit 1; }
export GOMODCACHE="$BALLAST_CACHE/go/mod" GOCACHE="$BALLAST_CACHE/go/build"
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local CGO_ENABLED=0

# The network: a hub namespace with a bridge (the control plane lives there),
# and one namespace per node with a veth to the bridge. Pod networks are routed
# through the hub. None of these addresses exist outside the namespaces.
HUB_NS=bk8s-hub
HUB_IP=10.89.0.1
NODES=(n1 n2 n3)
ZONES=(zone-a zone-b zone-c)
node_ip() { echo "10.89.0.1${1#n}"; }
pod_cidr() { echo "10.90.${1#n}.0/24"; }
SERVICE_CIDR=10.96.0.0/16
CLUSTER_CIDR=10.90.0.0/16
APISERVER="https://$HUB_IP:6443"

# Host sysctls kubelet changes at start (kernel.panic, ...): saved by `up`,
# restored by `down`.
HOST_SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
              kernel.keys.root_maxkeys kernel.keys.root_maxbytes fs.inotify.max_user_instances)

log() { printf '%s k8s-e2e: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# kubectl as the cluster admin, from the hub (where the API server listens).
kc() { ip netns exec "$HUB_NS" "$BIN/kubectl" --kubeconfig "$STATE/pki/admin.kubeconfig" "$@"; }
