# The local cluster: namespaces, certificates, control plane, nodes; and `down`.
# shellcheck shell=bash

# --- processes -----------------------------------------------------------------
# Every long-running process is started by `spawn NAME NETNS CMD...`: its pid goes
# to $STATE/pids/NAME, its output to $STATE/logs/NAME.log. (nsenter, not `ip
# netns exec`: that remounts /sys, which hides the cgroup mounts from kubelet.)
spawn() {
  local name=$1 ns=$2
  shift 2
  mkdir -p "$STATE/pids" "$STATE/logs"
  nsenter --net="/run/netns/$ns" "$@" >>"$STATE/logs/$name.log" 2>&1 &
  echo $! >"$STATE/pids/$name"
  # Killed by `down` or a scenario: no job report from bash.
  disown $!
}

wait_for() { # wait_for SECONDS WHAT CMD...
  local deadline=$(($(date +%s) + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $what"
    sleep 0.5
  done
}

# --- certificates ----------------------------------------------------------------
pki_cert() { # pki_cert NAME CN O [SANS]
  local d="$STATE/pki" name=$1 cn=$2 o=$3 sans=${4:-} subj
  subj="/CN=$cn"
  [ -n "$o" ] && subj="/O=$o$subj"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$d/$name.key" -subj "$subj" -out "$d/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } >"$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
    -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
  chmod 600 "$d/$name.key"
}

kubeconfig() { # kubeconfig NAME: a kubeconfig for the certificate NAME
  cat >"$STATE/pki/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {certificate-authority: $STATE/pki/ca.crt, server: "$APISERVER"}
users:
- name: $1
  user: {client-certificate: $STATE/pki/$1.crt, client-key: $STATE/pki/$1.key}
contexts:
- name: local
  context: {cluster: local, user: $1}
current-context: local
EOF
}

make_pki() {
  local d="$STATE/pki" n
  mkdir -p "$d"
  openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$d/ca.key" -subj "/CN=ballast-e2e-ca" -days 2 \
    -out "$d/ca.crt" 2>/dev/null
  pki_cert apiserver kube-apiserver "" \
    "IP:$HUB_IP,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
  pki_cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  pki_cert admin admin system:masters
  pki_cert controller-manager system:kube-controller-manager ""
  pki_cert scheduler system:kube-scheduler ""
  pki_cert kube-proxy system:kube-proxy ""
  pki_cert coredns system:coredns ""
  for n in "${NODES[@]}"; do
    pki_cert "kubelet-$n" "system:node:$n" system:nodes "IP:$(node_ip "$n"),DNS:$n"
    kubeconfig "kubelet-$n"
  done
  for n in admin controller-manager scheduler kube-proxy coredns; do kubeconfig "$n"; done
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

# --- network ---------------------------------------------------------------------
make_network() {
  local n ip i=0
  ip netns add "$HUB_NS"
  ip -n "$HUB_NS" link set lo up
  ip -n "$HUB_NS" link add br0 type bridge
  ip -n "$HUB_NS" addr add "$HUB_IP/24" dev br0
  ip -n "$HUB_NS" link set br0 up
  ip netns exec "$HUB_NS" sysctl -qw net.ipv4.ip_forward=1
  for n in "${NODES[@]}"; do
    ip=$(node_ip "$n")
    ip netns add "bk8s-$n"
    ip -n "bk8s-$n" link set lo up
    ip link add "bk8s-$n" type veth peer name eth0 netns "bk8s-$n"
    ip link set "bk8s-$n" netns "$HUB_NS"
    ip -n "$HUB_NS" link set "bk8s-$n" master br0 up
    ip -n "bk8s-$n" addr add "$ip/24" dev eth0
    ip -n "bk8s-$n" link set eth0 up
    ip -n "bk8s-$n" route add default via "$HUB_IP"
    ip netns exec "bk8s-$n" sysctl -qw net.ipv4.ip_forward=1
    # Pods of node n live in 10.90.n.0/24 behind its cni0 bridge.
    ip -n "$HUB_NS" route add "$(pod_cidr "$n")" via "$ip"
    i=$((i + 1))
  done
}

# --- host state ----------------------------------------------------------------------
save_sysctls() {
  local saved="$BALLAST_CACHE/k8s/host-sysctls.saved" k
  mkdir -p "$(dirname "$saved")"
  # A run killed before `down` left the originals here: keep them.
  [ -f "$saved" ] && return
  for k in "${HOST_SYSCTLS[@]}"; do echo "$k=$(sysctl -n "$k")"; done >"$saved.tmp"
  mv "$saved.tmp" "$saved"
}

restore_sysctls() {
  local saved="$BALLAST_CACHE/k8s/host-sysctls.saved" kv
  [ -f "$saved" ] || return 0
  while read -r kv; do sysctl -qw "$kv" || log "could not restore $kv"; done <"$saved"
  rm -f "$saved"
}

# Directories a node needs on the host: the mount points of the node mount
# namespaces, and /lib/modules (the node plugin mounts it; this kernel has no
# modules, so the directory may be missing). `up` creates the missing ones and
# `down` removes those again.
HOST_DIRS=(/var/lib/kubelet /var/lib/ballast /lib/modules)
make_host_dirs() {
  local d
  for d in "${HOST_DIRS[@]}"; do
    [ -d "$d" ] && continue
    mkdir -p "$d"
    echo "$d" >>"$STATE/host-dirs-created"
  done
}
remove_host_dirs() {
  local d
  [ -f "$STATE/host-dirs-created" ] || return 0
  while read -r d; do rmdir "$d" 2>/dev/null || log "could not remove $d"; done <"$STATE/host-dirs-created"
}

cgroup_dirs() { # every cgroup directory of node N, deepest first
  local c
  for c in /sys/fs/cgroup/*/; do
    [ -d "$c/bk8s-$1" ] && find "$c/bk8s-$1" -depth -type d
  done
}

make_cgroups() {
  local n c
  for n in "${NODES[@]}"; do
    for c in /sys/fs/cgroup/*/; do
      grep -q " ${c%/} cgroup" /proc/mounts || continue
      mkdir -p "$c/bk8s-$n"
      if [ -f "$c/cpuset.cpus" ]; then
        cat "$c/cpuset.cpus" >"$c/bk8s-$n/cpuset.cpus"
        cat "$c/cpuset.mems" >"$c/bk8s-$n/cpuset.mems"
      fi
    done
  done
}

# --- control plane -------------------------------------------------------------------
start_control_plane() {
  local p="$STATE/pki"
  spawn etcd "$HUB_NS" "$BIN/etcd" --name e2e --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e2e=http://127.0.0.1:2380 --log-level warn
  spawn kube-apiserver "$HUB_NS" "$BIN/kube-apiserver" \
    --advertise-address "$HUB_IP" --bind-address "$HUB_IP" --secure-port 6443 \
    --etcd-servers http://127.0.0.1:2379 \
    --client-ca-file "$p/ca.crt" --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
    --kubelet-client-certificate "$p/apiserver-kubelet-client.crt" --kubelet-client-key "$p/apiserver-kubelet-client.key" \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --kubelet-preferred-address-types InternalIP \
    --allow-privileged=true --profiling=false --cert-dir "$STATE/apiserver-certs"
  wait_for 120 "kube-apiserver" kc get --raw /readyz
  spawn kube-controller-manager "$HUB_NS" "$BIN/kube-controller-manager" \
    --kubeconfig "$p/controller-manager.kubeconfig" --bind-address 127.0.0.1 \
    --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false \
    --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
    --node-monitor-grace-period 20s --profiling=false
  spawn kube-scheduler "$HUB_NS" "$BIN/kube-scheduler" \
    --kubeconfig "$p/scheduler.kubeconfig" --bind-address 127.0.0.1 --leader-elect=false --profiling=false
  # Cluster DNS for the pods and for hostNetwork pods (ClusterFirstWithHostNet):
  # CoreDNS in the hub, on the address every node routes to.
  kc apply -f - >/dev/null <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
  - {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
  - {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}]
EOF
  cat >"$STATE/Corefile" <<EOF
.:53 {
    errors
    health 127.0.0.1:8091
    ready 127.0.0.1:8092
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $p/coredns.kubeconfig local
        pods insecure
        ttl 5
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
    loadbalance
}
EOF
  spawn coredns "$HUB_NS" "$BIN/coredns" -conf "$STATE/Corefile"
  wait_for 60 "CoreDNS" ip netns exec "$HUB_NS" curl -sf http://127.0.0.1:8092/ready
}

# --- nodes ---------------------------------------------------------------------------
node_configs() { # node_configs N ZONE: containerd, CNI, kubelet and kube-proxy files of node N
  local n=$1 zone=$2 d="$STATE/$1" ip
  ip=$(node_ip "$n")
  mkdir -p "$d"/{containerd,run,cni,cni-ipam,pod-logs,kubelet,ballast,meta-pv}
  cat >"$d/containerd.toml" <<EOF
version = 2
root = "$d/containerd"
state = "$d/run/containerd"
[grpc]
  address = "$d/run/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Without it every sandbox fails here (the root user may not lower oom_score_adj).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni"
EOF
  cat >"$d/cni/10-bk8s.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "bk8s", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$d/cni-ipam", "ranges": [[{"subnet": "$(pod_cidr "$n")"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
  : >"$d/resolv.conf"
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 (hybrid) on these machines; each kubelet has its own cgroup root.
cgroupDriver: cgroupfs
cgroupRoot: /bk8s-$n
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
address: $ip
healthzBindAddress: 127.0.0.1
clusterDNS: [$HUB_IP]
clusterDomain: cluster.local
resolvConf: $d/resolv.conf
containerRuntimeEndpoint: unix://$d/run/containerd.sock
podLogsDir: $d/pod-logs
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $STATE/pki/kubelet-$n.crt
tlsPrivateKeyFile: $STATE/pki/kubelet-$n.key
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%}
EOF
  cat >"$d/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $STATE/pki/kube-proxy.kubeconfig}
hostnameOverride: $n
clusterCIDR: $CLUSTER_CIDR
bindAddress: $ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the host's global conntrack sysctls alone.
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  echo "$zone" >"$d/zone"
}

start_node() { # start_node N: the node's containerd, kubelet and kube-proxy (tests/k8s/node-boot.sh)
  local n=$1
  spawn "node-$n" "bk8s-$n" unshare --mount --propagation slave -- \
    bash "$K8S/node-boot.sh" "$n" "$STATE" "$BIN" "$IMAGES"
}

# --- up / down -----------------------------------------------------------------------
cluster_up() {
  local t0 i n
  t0=$(date +%s)
  cluster_down quiet
  mkdir -p "$STATE"
  save_sysctls
  # Three kubelets and containerds use more inotify instances than the default 128.
  [ "$(sysctl -n fs.inotify.max_user_instances)" -ge 1024 ] || sysctl -qw fs.inotify.max_user_instances=1024
  ls /run/netns 2>/dev/null | grep '^cni-' >"$STATE/netns-before" || true
  make_pki
  make_network
  make_cgroups
  make_host_dirs
  start_control_plane
  for i in "${!NODES[@]}"; do
    n=${NODES[$i]}
    node_configs "$n" "${ZONES[$i]}"
    start_node "$n"
  done
  for n in "${NODES[@]}"; do
    wait_for 180 "node $n Ready" node_ready "$n"
  done
  local_storage
  log "cluster up: ${#NODES[@]} nodes in ${#ZONES[@]} zones, Kubernetes $K8S_VERSION ($(($(date +%s) - t0)) s)"
}

node_ready() {
  [ "$(kc get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

# The cluster's default StorageClass: local PersistentVolumes, one per node, for
# meta's Raft log (which must not live on Ballast itself, see csi/README.md).
local_storage() {
  local n
  {
    cat <<'EOF'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local-e2e
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
EOF
    for n in "${NODES[@]}"; do
      cat <<EOF
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: meta-$n}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: local-e2e
  persistentVolumeReclaimPolicy: Retain
  local: {path: $STATE/$n/meta-pv}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$n]}]
EOF
    done
  } | kc apply -f - >/dev/null
}

# Every process of node N: in its network namespace, or in its cgroups (pods
# have network namespaces of their own).
node_pids() {
  local n=$1 c
  ip netns pids "bk8s-$n" 2>/dev/null || true
  for c in $(cgroup_dirs "$n"); do cat "$c/cgroup.procs" 2>/dev/null || true; done
}

kill_node() { # kill_node N: SIGKILL every process of the node, as a power cut would
  local n=$1 tries=0 pids conns
  conns=$(node_fuse_connections "$n")
  while pids=$(node_pids "$n" | sort -u) && [ -n "$pids" ]; do
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    tries=$((tries + 1))
    # A power cut also ends the node's kernel state, which here is the host's:
    # its FUSE connections. A killed FUSE server with a thread waiting on I/O
    # through its own mount (a loop device over its file) cannot exit until
    # the connection is aborted, and such a connection left behind blocks
    # every sync(2) on the machine. Abort them once the easy kills are done.
    [ $tries = 10 ] && abort_fuse_connections $conns
    [ $tries -lt 100 ] || { log "node $n: processes left: $pids"; return 1; }
    sleep 0.1
  done
  abort_fuse_connections $conns
}

# The FUSE connections (device minors) of the mounts node N's processes see.
node_fuse_connections() {
  local p
  for p in $(node_pids "$1" | sort -u); do
    grep -h ' - fuse' "/proc/$p/mountinfo" 2>/dev/null | awk '{split($3, d, ":"); print d[2]}' || true
  done | sort -u
}

abort_fuse_connections() {
  local c mounted=""
  [ $# -gt 0 ] || return 0
  if ! grep -q ' /sys/fs/fuse/connections ' /proc/mounts; then
    mount -t fusectl none /sys/fs/fuse/connections && mounted=1
  fi
  for c in "$@"; do
    [ -e "/sys/fs/fuse/connections/$c/abort" ] && echo 1 >"/sys/fs/fuse/connections/$c/abort" 2>/dev/null || true
  done
  [ -z "$mounted" ] || umount /sys/fs/fuse/connections
}

cluster_down() {
  local quiet=${1:-} n f pid l ns
  [ -d "$STATE" ] || [ -e "/run/netns/$HUB_NS" ] || { restore_sysctls; return 0; }
  [ -n "$quiet" ] || log "tearing down"
  for n in "${NODES[@]}"; do kill_node "$n" || true; done
  if [ -d "$STATE/pids" ]; then
    for f in "$STATE"/pids/*; do
      pid=$(cat "$f" 2>/dev/null) || continue
      kill -9 "$pid" 2>/dev/null || true
    done
  fi
  for pid in $(ip netns pids "$HUB_NS" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  sleep 0.5
  # Loop devices over Ballast volumes' FUSE files (the node namespaces are gone).
  for l in $(losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk '$2 ~ "^(/var/lib/ballast|/var/lib/kubelet|'"$STATE"')" {print $1}'); do
    losetup -d "$l" 2>/dev/null || log "could not detach $l"
  done
  # Mounts on the host below our directories (none are expected: the node mounts
  # live in the node mount namespaces).
  awk '{print $2}' /proc/mounts | grep -E "^($STATE|/var/lib/kubelet|/var/lib/ballast)(/|$)" | sort -r \
    | while read -r f; do umount -l "$f" 2>/dev/null || true; done || true
  # Pod network namespaces containerd made and did not remove.
  if [ -f "$STATE/netns-before" ]; then
    for ns in $(ls /run/netns 2>/dev/null | grep '^cni-' || true); do
      grep -qx "$ns" "$STATE/netns-before" || ip netns delete "$ns" 2>/dev/null || true
    done
  fi
  for n in "${NODES[@]}"; do ip netns delete "bk8s-$n" 2>/dev/null || true; done
  ip netns delete "$HUB_NS" 2>/dev/null || true
  # A cgroup goes once its last task has exited (a killed process may take a
  # moment): retry for a few seconds.
  local tries
  for tries in $(seq 1 20); do
    for n in "${NODES[@]}"; do
      cgroup_dirs "$n" | while read -r f; do rmdir "$f" 2>/dev/null || true; done
    done
    ls -d /sys/fs/cgroup/*/bk8s-* >/dev/null 2>&1 || break
    sleep 0.5
  done
  restore_sysctls
  remove_host_dirs
  rm -rf "$STATE" 2>/dev/null || { sleep 1; rm -rf "$STATE" || log "could not remove $STATE"; }
  [ -n "$quiet" ] || check_clean
}

# After `down`: nothing of ours is left (the issue's rule: no process, mount,
# loop device, namespace, cgroup or changed sysctl).
check_clean() {
  local left=""
  ip netns list 2>/dev/null | grep -q '^bk8s-' && left="$left namespaces"
  awk '{print $2}' /proc/mounts | grep -qE "^($STATE|/var/lib/kubelet|/var/lib/ballast)(/|$)" && left="$left mounts"
  losetup -l -n -O BACK-FILE 2>/dev/null | grep -qE "^(/var/lib/ballast|/var/lib/kubelet|$STATE)" && left="$left loop-devices"
  ls -d /sys/fs/cgroup/*/bk8s-* >/dev/null 2>&1 && left="$left cgroups"
  pgrep -f "$BIN/" >/dev/null && left="$left processes"
  [ -f "$BALLAST_CACHE/k8s/host-sysctls.saved" ] && left="$left sysctls"
  if [ -n "$left" ]; then log "down left:$left"; return 1; fi
  log "down: nothing left behind"
}

collect_logs_on_failure() {
  [ "$1" -ne 0 ] || return 0
  [ -d "$STATE" ] || return 0
  local out="$ROOT/target/k8s-e2e-logs"
  rm -rf "$out"; mkdir -p "$out"
  cp -r "$STATE/logs" "$out/" 2>/dev/null || true
  for n in "${NODES[@]}"; do cp -r "$STATE/$n/pod-logs" "$out/pods-$n" 2>/dev/null || true; done
  kc get all,pvc,pv,volumeattachments,events -A -o wide >"$out/objects.txt" 2>&1 || true
  log "logs of the failed run in $out"
}
