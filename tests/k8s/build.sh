# Builds what the local cluster runs, cached under $BALLAST_CACHE.
# shellcheck shell=bash
# shellcheck source=tests/k8s/images.sh
. "$K8S/images.sh"

GO_TOOLS=(
  k8s.io/kubernetes/cmd/kube-apiserver
  k8s.io/kubernetes/cmd/kube-controller-manager
  k8s.io/kubernetes/cmd/kube-scheduler
  k8s.io/kubernetes/cmd/kubelet
  k8s.io/kubernetes/cmd/kube-proxy
  k8s.io/kubernetes/cmd/kubectl
  github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
  github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher
  github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer
  github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter
  github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller
  go.etcd.io/etcd/server/v3
  ./coredns
)
WORKLOAD_IMAGE=ballast.local/e2e/workload:1
PAUSE_IMAGE=registry.k8s.io/pause:3.10

# Packages from Debian the cluster needs (installed when missing).
need_debian_packages() {
  local need="" pair cmd pkg
  for pair in containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
              iptables:iptables conntrack:conntrack /bin/busybox:busybox-static openssl:openssl \
              gcc:gcc strip:binutils nsenter:util-linux mkfs.xfs:xfsprogs mkfs.ext4:e2fsprogs fusermount3:fuse3 \
              modprobe:kmod curl:curl jq:jq; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    if [ "${cmd#/}" != "$cmd" ]; then [ -e "$cmd" ] && continue; else command -v "$cmd" >/dev/null 2>&1 && continue; fi
    need="$need $pkg"
  done
  if [ -n "$need" ]; then
    log "installing Debian packages:$need"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  fi
}

# The Go binaries, rebuilt when the module, CoreDNS's main or the Go version change.
build_go() {
  local key t0
  key=$( (cat "$K8S/build/go.mod" "$K8S/build/go.sum" "$K8S/build/coredns/main.go"; go version; echo "$K8S_VERSION") | sha256sum | cut -c1-16)
  if [ -f "$BIN/.key" ] && [ "$(cat "$BIN/.key")" = "$key" ]; then
    log "Kubernetes $K8S_VERSION, sidecars, etcd, CoreDNS: cached in $BIN"
    return
  fi
  t0=$(date +%s)
  log "building Kubernetes $K8S_VERSION, the CSI sidecars, etcd and CoreDNS from the Go module proxy (first time: long)"
  mkdir -p "$BIN" "$GOMODCACHE" "$GOCACHE"
  local v=k8s.io/component-base/version minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  (cd "$K8S/build" && go build -tags providerless -trimpath \
      -ldflags "-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean" \
      -o "$BIN/" "${GO_TOOLS[@]}")
  mv "$BIN/server" "$BIN/etcd"
  echo "$key" >"$BIN/.key"
  log "Go binaries built in $(($(date +%s) - t0)) s"
}

build_rust() {
  # The same build as ./scripts/test's `cargo test --release --workspace` (same
  # feature set, so after the cargo tests this compiles nothing): the cluster runs the
  # very binaries the other suites tested. `cargo build --release --bins` would
  # resolve features without the dev-dependencies and recompile tokio and everything
  # above it.
  log "building Ballast (cargo test --release --workspace --no-run)"
  (cd "$ROOT" && cargo test --release --workspace --no-run -q)
}

# The image tag a manifest in csi/ names for an image repository.
manifest_image() {
  grep -ho "image: $1:[^ ]*" "$ROOT"/csi/*.yaml "$ROOT"/csi/snapshots/*.yaml | head -1 | sed 's/.*://'
}

# Sidecar image tags must be the versions built (go.mod), or a pod would run
# something else than what its manifest says.
check_sidecar_versions() {
  local pair repo mod built named
  for pair in csi-provisioner:external-provisioner/v6 csi-attacher:external-attacher/v4 csi-resizer:external-resizer/v2 \
              csi-snapshotter:external-snapshotter/v8 snapshot-controller:external-snapshotter/v8; do
    repo=${pair%%:*}; mod=${pair#*:}
    built=$(awk -v m="github.com/kubernetes-csi/$mod" '$1 == m {print $2}' "$K8S/build/go.mod")
    named=$(manifest_image "registry.k8s.io/sig-storage/$repo")
    [ "$built" = "$named" ] || die "csi/ names $repo:$named but tests/k8s/build/go.mod builds $built"
  done
}

build_images() {
  local t0 work name out
  t0=$(date +%s)
  mkdir -p "$IMAGES"
  check_sidecar_versions
  work=$(mktemp -d)
  # pause: the sandbox image containerd runs in every pod.
  if [ ! -f "$IMAGES/pause.tar" ] || [ "$K8S/images/pause.c" -nt "$IMAGES/pause.tar" ]; then
    mkdir -p "$work/pause"
    gcc -static -O2 -o "$work/pause/pause" "$K8S/images/pause.c"
    oci_archive "$PAUSE_IMAGE" "$work/pause" "$IMAGES/pause.tar" '["/pause"]'
  fi
  # The sidecars: their static binary alone, as upstream's distroless images.
  for name in csi-provisioner csi-attacher csi-resizer csi-snapshotter snapshot-controller; do
    out="$IMAGES/$name.tar"
    [ -f "$out" ] && [ "$out" -nt "$BIN/$name" ] && continue
    mkdir -p "$work/$name"
    rootfs_base "$work/$name"
    cp "$BIN/$name" "$work/$name/$name"
    oci_archive "registry.k8s.io/sig-storage/$name:$(manifest_image "registry.k8s.io/sig-storage/$name")" \
      "$work/$name" "$out" "[\"/$name\"]" 65532
  done
  # Ballast: the release binaries and the tools `ballast node` runs on the
  # host's devices (what the Dockerfile installs), with their libraries.
  local r="$work/ballast" tool tools=()
  rootfs_base "$r"
  for tool in mkfs.ext4 resize2fs e2fsck mkfs.xfs xfs_growfs losetup blkid findmnt mount umount fusermount3 modprobe; do
    tools+=("$(command -v "$tool")")
  done
  local bin="${CARGO_TARGET_DIR:-$ROOT/target}/release"
  rootfs_add_bin "$r" /usr/local/bin "$bin/ballast" "$bin/ballastctl"
  # The image carries no debug info (a third of its size: slower imports on every node).
  strip --strip-debug "$r/usr/local/bin/ballast" "$r/usr/local/bin/ballastctl"
  rootfs_add_bin "$r" /usr/bin "${tools[@]}"
  cp /etc/mke2fs.conf "$r/etc/"
  rootfs_busybox "$r"
  oci_archive "ghcr.io/ballast-io/ballast:$(manifest_image ghcr.io/ballast-io/ballast)" "$r" "$IMAGES/ballast.tar" '["ballast"]' 65532
  # The workload: a shell and coreutils-like tools (busybox).
  if [ ! -f "$IMAGES/workload.tar" ] || [ "$K8S/images.sh" -nt "$IMAGES/workload.tar" ]; then
    rootfs_base "$work/workload"
    rootfs_busybox "$work/workload"
    oci_archive "$WORKLOAD_IMAGE" "$work/workload" "$IMAGES/workload.tar" null "" '["/bin/sh"]'
  fi
  rm -rf "$work"
  log "images in $IMAGES ($(($(date +%s) - t0)) s)"
}

build_all() {
  need_debian_packages
  build_go
  build_rust
  build_images
}
