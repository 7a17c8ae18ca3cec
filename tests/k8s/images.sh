# OCI image archives from files on this machine, for clusters that cannot pull.
# shellcheck shell=bash
#
# An archive is a tar of an OCI image layout: oci-layout, index.json, and under
# blobs/sha256/ one uncompressed layer tar, the image config and the manifest.
# The index entry carries the full image name in `io.containerd.image.name`,
# which `ctr images import` tags the image with: the name the manifests use, so
# `imagePullPolicy: IfNotPresent` finds it and nothing is pulled.

# rootfs_add_bin ROOTFS DEST_DIR FILE...: copies each executable to DEST_DIR in
# ROOTFS with the shared libraries it loads (ldd), at their own paths.
rootfs_add_bin() {
  local root=$1 dest=$2 f lib
  shift 2
  mkdir -p "$root$dest"
  for f in "$@"; do
    [ -x "$f" ] || { echo "rootfs_add_bin: $f is not an executable" >&2; return 1; }
    cp -L "$f" "$root$dest/"
    for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' || true); do
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
}

# rootfs_base ROOTFS: the directories and /etc files every image here has.
rootfs_base() {
  local root=$1
  mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,run,var/tmp,root}
  chmod 1777 "$root/tmp" "$root/var/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nballast:x:65532:65532:ballast:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nballast:x:65532:\n' >"$root/etc/group"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
}

# rootfs_busybox ROOTFS: Debian's static busybox in /bin, one link per applet
# (a shell and the usual tools), without shadowing what is already in /usr.
rootfs_busybox() {
  local root=$1 applet
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ -e "$root/bin/$applet" ] || [ -e "$root/usr/bin/$applet" ] || [ -e "$root/usr/sbin/$applet" ] \
      || [ -e "$root/sbin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
}

# oci_archive NAME ROOTFS OUT ENTRYPOINT_JSON [USER [CMD_JSON]]
#   NAME: full image reference (registry.k8s.io/pause:3.10); ENTRYPOINT_JSON: ["/pause"] or null
oci_archive() {
  local name=$1 root=$2 out=$3 entrypoint=$4 user=${5:-} cmd=${6:-null} dir layer diff config cdig manifest mdig
  dir=$(mktemp -d)
  mkdir -p "$dir/blobs/sha256"
  layer="$dir/layer.tar"
  tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -C "$root" -cf "$layer" .
  diff=$(sha256sum "$layer" | cut -d' ' -f1)
  mv "$layer" "$dir/blobs/sha256/$diff"
  config=$(printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s,"Cmd":%s,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/","User":"%s"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"ballast tests/k8s/images.sh"}]}' \
    "$entrypoint" "$cmd" "$user" "$diff")
  printf '%s' "$config" >"$dir/config.json"
  cdig=$(sha256sum "$dir/config.json" | cut -d' ' -f1)
  mv "$dir/config.json" "$dir/blobs/sha256/$cdig"
  manifest=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' \
    "$cdig" "$(stat -c %s "$dir/blobs/sha256/$cdig")" "$diff" "$(stat -c %s "$dir/blobs/sha256/$diff")")
  printf '%s' "$manifest" >"$dir/manifest.json"
  mdig=$(sha256sum "$dir/manifest.json" | cut -d' ' -f1)
  mv "$dir/manifest.json" "$dir/blobs/sha256/$mdig"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$mdig" "$(stat -c %s "$dir/blobs/sha256/$mdig")" "$name" "${name##*:}" >"$dir/index.json"
  mkdir -p "$(dirname "$out")"
  tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -C "$dir" -cf "$out.tmp" oci-layout index.json blobs
  mv "$out.tmp" "$out"
  rm -rf "$dir"
}
