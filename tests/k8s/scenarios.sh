# The end-to-end scenarios: Ballast as a user deploys and uses it.
# shellcheck shell=bash
#
# Each scenario asserts (die) and adds a row to the table printed at the end:
# what ran, what was checked, how long it took, and the result. A failed
# scenario does not stop the ones after it; the run fails if any failed.

W="$K8S/workloads"
RESULTS=()
NS=e2e

row() { RESULTS+=("$(printf '%-2s | %-24s | %-78s | %6s | %s' "$@")"); }

# ballastctl as the csi/README.md shows it: from a meta pod, through the client Service.
ballastctl() {
  local pod
  pod=$(kc -n ballast-system get pods -l app.kubernetes.io/name=ballast-meta \
    --field-selector=status.phase=Running -o jsonpath='{range .items[?(@.status.containerStatuses[0].ready==true)]}{.metadata.name}{"\n"}{end}' | head -1)
  [ -n "$pod" ] || die "no ready meta pod for ballastctl"
  kc -n ballast-system exec "$pod" -c meta -- ballastctl --meta ballast-meta-client:7400 --insecure "$@"
}

# Every replica exists, is ready and runs the current revision (rollout status
# may answer before the controller has seen a new StatefulSet at all).
sts_ready() {
  local i
  for i in $(seq 0 $(($2 - 1))); do pod_ready "$1-$i" || return 1; done
}
pod_node() { kc -n "$NS" get pod "$1" -o jsonpath='{.spec.nodeName}'; }
node_zone() { kc get node "$1" -o jsonpath='{.metadata.labels.topology\.kubernetes\.io/zone}{"\n"}'; }
pvc_volume() { kc -n "$NS" get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
in_pod() { local p=$1; shift; kc -n "$NS" exec "$p" -- sh -c "$*"; }

# Files with checksums, fsynced (the data a database would have acknowledged).
write_files() { # write_files POD DIR COUNT
  in_pod "$1" "mkdir -p $2 && cd $2 && i=0 && while [ \$i -lt $3 ]; do i=\$((i+1)); dd if=/dev/urandom of=f\$i bs=256k count=8 conv=fsync 2>/dev/null || exit 1; done && sha256sum f* > SUMS && sync SUMS ."
}
verify_files() { in_pod "$1" "cd $2 && sha256sum -c -s SUMS"; }

# --- 1. deploy ---------------------------------------------------------------------
deploy_ballast() {
  local t0=$(date +%s) n drivers
  kc apply -k "$ROOT/csi" >/dev/null
  kc -n ballast-system rollout status statefulset/ballast-meta --timeout=300s >/dev/null \
    || die "meta StatefulSet not ready"
  # (OnDelete: no rollout status for it.)
  wait_for 300 "node DaemonSet ready" daemonset_ready
  kc -n ballast-system rollout status deployment/ballast-csi-controller --timeout=300s >/dev/null \
    || die "controller Deployment not ready"
  # kubelet registered the driver on every node (the plugin registration socket).
  for n in "${NODES[@]}"; do
    wait_for 60 "csi.ballast.io registered on $n" csinode_has_driver "$n"
  done
  wait_for 60 "3 storage nodes in meta" storage_nodes_up 3
  # Snapshots, as csi/README.md says: the CRDs (external-snapshotter's, from
  # the module the sidecars are built from), then csi/snapshots/.
  kc apply -k "$(snapshot_crds)" >/dev/null
  wait_for 60 "snapshot CRDs established" crds_established
  kc apply -k "$ROOT/csi/snapshots" >/dev/null
  kc -n ballast-system rollout status deployment/ballast-snapshot-controller --timeout=300s >/dev/null \
    || die "snapshot-controller Deployment not ready"
  row 1 "deploy (kubectl apply -k)" "meta 3/3, node DaemonSet 3/3, controller 2/2, snapshot-controller 2/2 Ready; driver on 3 CSINodes; 3 storage nodes" "$(($(date +%s) - t0))s" PASS
}
# The snapshot CRDs of the external-snapshotter client module go.mod resolves.
snapshot_crds() {
  local v
  v=$(awk '$1 == "github.com/kubernetes-csi/external-snapshotter/client/v8" {print $2}' "$K8S/build/go.mod")
  echo "$GOMODCACHE/github.com/kubernetes-csi/external-snapshotter/client/v8@$v/config/crd"
}
crds_established() {
  local c
  for c in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
    [ "$(kc get crd "$c.snapshot.storage.k8s.io" -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null)" = True ] || return 1
  done
}
daemonset_ready() {
  local s
  s=$(kc -n ballast-system get daemonset ballast-node -o jsonpath='{.status.desiredNumberScheduled} {.status.numberReady}')
  [ "${s% *}" -gt 0 ] && [ "${s% *}" = "${s#* }" ]
}
csinode_has_driver() { kc get csinode "$1" -o jsonpath='{.spec.drivers[*].name}' | grep -qw csi.ballast.io; }
storage_nodes_up() { [ "$(ballastctl --output json node list | jq '[.nodes[] | select(.state == "up")] | length')" -ge "$1" ]; }

# --- 2. StatefulSet with volumeClaimTemplates ----------------------------------------
scenario_statefulset() {
  local t0=$(date +%s) i zones
  kc apply -f "$W/namespace.yaml" -f "$W/statefulset.yaml" >/dev/null
  wait_for 300 "StatefulSet web ready" sts_ready web 3
  zones=$(for i in 0 1 2; do node_zone "$(pod_node web-$i)"; done | sort -u | wc -l)
  [ "$zones" = 3 ] || die "web pods in $zones zones, want 3"
  for i in 0 1 2; do
    # fsGroup: the volume's root belongs to the pod's group, the files to its user.
    [ "$(in_pod web-$i 'stat -c %g /data')" = 2000 ] || die "web-$i: /data not group 2000 (fsGroup)"
    write_files web-$i /data/files 8
  done
  kc -n "$NS" delete pod web-0 web-1 web-2 --wait=true >/dev/null
  wait_for 300 "StatefulSet web ready after the delete" sts_ready web 3
  for i in 0 1 2; do verify_files web-$i /data/files || die "web-$i: files do not verify"; done
  for i in 0 1 2; do
    [ "$(ballastctl --output json volume inspect "$(pvc_volume data-web-$i)" | jq '[.zones[] | select(.in_sync > 0)] | length')" -ge 3 ] \
      || die "data-web-$i: replicas not in 3 zones"
  done
  row 2 "StatefulSet, 3 pods" "pods in 3 zones; fsGroup; 8 files/pod fsynced, pods deleted + back, sha256 ok; replicas in 3 zones" "$(($(date +%s) - t0))s" PASS
}

# --- 2c. a VolumeSnapshot of a StatefulSet claim, and a claim restored from it --------
scenario_snapshot() {
  local t0=$(date +%s) t1 content snap took restore
  # web-0's files (scenario 2) are in the snapshot; the ones written after are not.
  kc apply -f "$W/snapshot.yaml" >/dev/null
  wait_for 120 "VolumeSnapshot web-0-snap ready" snapshot_ready web-0-snap
  took=$(($(date +%s) - t0))
  content=$(kc -n "$NS" get volumesnapshot web-0-snap -o jsonpath='{.status.boundVolumeSnapshotContentName}')
  snap=$(kc get volumesnapshotcontent "$content" -o jsonpath='{.status.snapshotHandle}')
  ballastctl --output json snapshot list | jq -e --arg s "$snap" --arg v "$(pvc_volume data-web-0)" \
    'any(.snapshots[]; .name == $s and .volume_name == $v and .ready)' >/dev/null || die "snapshot $snap of $(pvc_volume data-web-0) not in meta"
  write_files web-0 /data/after 2
  t1=$(date +%s)
  kc apply -f "$W/restore.yaml" >/dev/null
  wait_for 300 "pod restored ready" pod_ready restored
  restore=$(($(date +%s) - t1))
  verify_files restored /data/files || die "restored: the snapshot's files do not verify"
  ! in_pod restored "test -e /data/after" || die "restored: holds files written after the snapshot"
  verify_files web-0 /data/after || die "web-0: its own files after the snapshot do not verify"
  # The restored volume is independent of the snapshot once copied: then the
  # snapshot goes (Delete policy: its content and Ballast's snapshot too), and
  # the restored claim still verifies.
  wait_for 120 "restored volume independent" volume_independent "$(pvc_volume restored)"
  kc -n "$NS" delete volumesnapshot web-0-snap --wait=true >/dev/null
  wait_for 120 "snapshot $snap gone from meta" ballast_snapshot_gone "$snap"
  verify_files restored /data/files || die "restored: files do not verify after the snapshot was deleted"
  kc -n "$NS" delete pod restored --wait=true >/dev/null
  kc -n "$NS" delete pvc restored --wait=true >/dev/null
  row 2c "snapshot + restore" "VolumeSnapshot of data-web-0 ready in ${took}s; restored PVC's pod ready in ${restore}s, files sha256 ok, later files absent; snapshot deleted, restore still ok" "$(($(date +%s) - t0))s" PASS
}

# --- 2d. a PVC cloned from a PVC in use ----------------------------------------------
scenario_clone() {
  local t0=$(date +%s) node took left
  # data-web-0 holds /data/files (scenario 2) and /data/after (2c); the clone
  # gets both, and nothing web-0 writes after it. On web-0's own node.
  node=$(kc -n "$NS" get pod web-0 -o jsonpath='{.spec.nodeName}')
  sed -e "s/NODE/$node/" "$W/clone.yaml" | kc apply -f - >/dev/null
  wait_for 300 "pod cloned ready" pod_ready cloned
  took=$(($(date +%s) - t0))
  write_files web-0 /data/later 1
  verify_files cloned /data/files || die "cloned: web-0's files do not verify"
  verify_files cloned /data/after || die "cloned: web-0's later files do not verify"
  ! in_pod cloned "test -e /data/later" || die "cloned: holds files web-0 wrote after the clone"
  write_files cloned /data/own 1
  verify_files web-0 /data/later || die "web-0: its files after the clone do not verify"
  ! in_pod web-0 "test -e /data/own" || die "web-0: holds the clone's files"
  # Independent once copied: the snapshot meta made of data-web-0 is gone.
  wait_for 120 "cloned volume independent" volume_independent "$(pvc_volume cloned)"
  left=$(ballastctl --output json snapshot list | jq '[.snapshots[] | select(.for_clone != 0)] | length')
  [ "$left" = 0 ] || die "$left snapshot(s) made for clones left in meta"
  verify_files cloned /data/own || die "cloned: its own files do not verify"
  kc -n "$NS" delete pod cloned --wait=true >/dev/null
  kc -n "$NS" delete pvc cloned --wait=true >/dev/null
  row 2d "PVC clone" "PVC cloned from data-web-0 in use, pod on web-0's node ready in ${took}s; files sha256 ok, later files absent both ways; independent, no snapshot left" "$(($(date +%s) - t0))s" PASS
}
snapshot_ready() { [ "$(kc -n "$NS" get volumesnapshot "$1" -o jsonpath='{.status.readyToUse}' 2>/dev/null)" = true ]; }
volume_independent() { [ "$(ballastctl --output json volume inspect "$1" | jq '.volume.unfilled_chunks')" = 0 ]; }
ballast_snapshot_gone() { ballastctl --output json snapshot list | jq -e --arg s "$1" 'all(.snapshots[]; .name != $s)' >/dev/null; }

# --- 2b. the same with external-provisioner --strict-topology ---------------------
# With strict topology the provisioner sends only the selected node's zone as
# the requisite: Ballast must still spread replicas over three zones, and the PV
# must still be usable from every zone.
scenario_strict_topology() {
  local t0=$(date +%s) idx zones i
  idx=$(kc -n ballast-system get deployment ballast-csi-controller -o jsonpath='{range .spec.template.spec.containers[*]}{.name}{"\n"}{end}' | grep -n '^csi-provisioner$' | cut -d: -f1)
  [ -n "$idx" ] || die "no csi-provisioner container in the controller"
  kc apply -f "$W/namespace.yaml" >/dev/null
  kc -n ballast-system patch deployment ballast-csi-controller --type=json \
    -p "[{\"op\": \"add\", \"path\": \"/spec/template/spec/containers/$((idx - 1))/args/-\", \"value\": \"--strict-topology\"}]" >/dev/null
  kc -n ballast-system rollout status deployment/ballast-csi-controller --timeout=300s >/dev/null || die "controller not ready with --strict-topology"
  sed -e 's/\bweb\b/strict/g' "$W/statefulset.yaml" | kc apply -f - >/dev/null
  wait_for 300 "StatefulSet strict ready" sts_ready strict 3
  for i in 0 1 2; do
    write_files strict-$i /data/files 2
    verify_files strict-$i /data/files || die "strict-$i: files do not verify"
    zones=$(kc get pv "$(pvc_volume data-strict-$i)" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[*].matchExpressions[*].values[*]}' | wc -w)
    [ "$zones" = 3 ] || die "data-strict-$i: PV usable from $zones zones, want 3"
    [ "$(ballastctl --output json volume inspect "$(pvc_volume data-strict-$i)" | jq '[.zones[] | select(.in_sync > 0)] | length')" -ge 3 ] \
      || die "data-strict-$i: replicas not in 3 zones"
  done
  kc -n "$NS" delete statefulset/strict service/strict --wait=true >/dev/null
  kc -n "$NS" delete pvc data-strict-0 data-strict-1 data-strict-2 --wait=true >/dev/null
  # Back to the controller as deployed.
  kc apply -k "$ROOT/csi" >/dev/null
  kc -n ballast-system rollout status deployment/ballast-csi-controller --timeout=300s >/dev/null || die "controller not ready as deployed"
  row 2b "--strict-topology" "provisioner with strict topology (requisite = one zone): 3 pods provisioned, replicas in 3 zones, PVs usable from 3 zones" "$(($(date +%s) - t0))s" PASS
}

# --- 3. node loss ----------------------------------------------------------------------
scenario_node_loss() {
  local t0 node new zone_old zone_new t_run vol epoch0 epoch1
  node=$(pod_node web-0)
  zone_old=$(node_zone "$node")
  log "node loss: killing $node ($zone_old): kubelet, containerd, kube-proxy and every pod, SIGKILL"
  vol=$(pvc_volume data-web-0)
  epoch0=$(ballastctl --output json volume inspect "$vol" | jq .volume.epoch)
  t0=$(date +%s)
  kill_node "$node"
  # What an operator does for a node that is gone: force-delete its pods and
  # mark it out of service (non-graceful node shutdown), so its volumes detach.
  kc -n "$NS" delete pod web-0 --force --grace-period=0 >/dev/null 2>&1 || true
  kc taint node "$node" node.kubernetes.io/out-of-service=nodeshutdown:NoExecute --overwrite >/dev/null
  wait_for 300 "web-0 Running again" pod_running web-0
  t_run=$(($(date +%s) - t0))
  new=$(pod_node web-0)
  zone_new=$(node_zone "$new")
  [ "$new" != "$node" ] || die "web-0 came back on the dead node"
  [ "$zone_new" != "$zone_old" ] || die "web-0 stayed in $zone_old"
  wait_for 120 "web-0 ready" pod_ready web-0
  verify_files web-0 /data/files || die "web-0: files do not verify after the move"
  # The new attachment fenced the old one: the volume's epoch moved on.
  epoch1=$(ballastctl --output json volume inspect "$vol" | jq .volume.epoch)
  [ "$epoch1" -gt "$epoch0" ] || die "epoch of $vol did not move on ($epoch0 -> $epoch1): old attachment not fenced"
  # The node comes back (power restored): its kubelet and containerd start
  # again, the operator lifts the taint, its Ballast pod rejoins meta.
  local t1=$(date +%s)
  start_node "$node"
  wait_for 180 "node $node Ready again" node_ready "$node"
  kc taint node "$node" node.kubernetes.io/out-of-service- >/dev/null
  wait_for 300 "ballast-node ready on every node" daemonset_ready
  wait_for 120 "3 storage nodes up in meta" storage_nodes_up 3
  # Its Ballast pod found web-0's old stage record: it must not take the
  # volume back (that fenced the pod's new front end: EIO, found here).
  in_pod web-0 'dd if=/dev/urandom of=/data/after-return bs=64k count=16 conv=fsync 2>/dev/null' \
    || die "web-0 cannot write after $node came back"
  verify_files web-0 /data/files || die "web-0: files do not verify after $node came back"
  row 3 "node loss ($node)" "SIGKILL node, force-delete pod + out-of-service taint; web-0 on $new ($zone_new); epoch $epoch0->$epoch1; files ok; node back, rejoined in $(($(date +%s) - t1))s" "${t_run}s" \
    "PASS (kill -> Running ${t_run}s)"
  LOST_NODE=$node
}
pod_running() { [ "$(kc -n "$NS" get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null)" = Running ]; }
pod_ready() { [ "$(kc -n "$NS" get pod "$1" -o jsonpath='{.status.containerStatuses[0].ready}' 2>/dev/null)" = true ]; }

# --- 4. online expansion ------------------------------------------------------------------
scenario_expand() {
  local t0=$(date +%s) before after
  kc apply -f "$W/expand.yaml" >/dev/null
  wait_for 240 "pod grow ready" pod_ready grow
  before=$(in_pod grow "df -k /data | awk 'NR==2 {print \$2}'")
  kc -n "$NS" patch pvc grow -p '{"spec":{"resources":{"requests":{"storage":"1Gi"}}}}' >/dev/null
  wait_for 240 "filesystem in pod grow to grow" fs_grew grow "$before"
  after=$(in_pod grow "df -k /data | awk 'NR==2 {print \$2}'")
  # More than the old size fits now.
  in_pod grow "dd if=/dev/zero of=/data/big bs=1M count=$((before / 1024 + 200)) conv=fsync 2>/dev/null" \
    || die "could not write more than the old size after growing"
  row 4 "online expansion" "xfs PVC 512Mi -> 1Gi while mounted: df ${before}K -> ${after}K; wrote $((before / 1024 + 200)) MiB" "$(($(date +%s) - t0))s" PASS
}
fs_grew() { [ "$(in_pod "$1" "df -k /data | awk 'NR==2 {print \$2}'")" -gt $(($2 * 3 / 2)) ]; }

# --- 5. raw block -----------------------------------------------------------------------
scenario_block() {
  local t0=$(date +%s)
  kc apply -f "$W/block.yaml" >/dev/null
  wait_for 240 "pod raw ready" pod_ready raw
  in_pod raw 'dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null &&
    dd if=/tmp/pattern of=/dev/xvda bs=1M oflag=direct conv=fsync 2>/dev/null &&
    dd if=/dev/xvda of=/tmp/back bs=1M count=16 iflag=direct 2>/dev/null &&
    [ "$(sha256sum < /tmp/pattern)" = "$(sha256sum < /tmp/back)" ]' || die "raw block read back differs"
  row 5 "raw block (volumeMode Block)" "16 MiB written with O_DIRECT to /dev/xvda, read back with O_DIRECT, sha256 equal" "$(($(date +%s) - t0))s" PASS
}

# --- 6. delete --------------------------------------------------------------------------
scenario_delete() {
  local t0=$(date +%s) pv id stem
  pv=$(pvc_volume raw)
  id=$(ballastctl --output json volume inspect "$pv" | jq -r .volume.id)
  [ -n "$id" ] && [ "$id" != null ] || die "no Ballast volume for $pv"
  wait_for 60 "chunk files of $pv on the nodes" chunk_files_present "$id"
  kc -n "$NS" delete pod raw --wait=true >/dev/null
  kc -n "$NS" delete pvc raw --wait=true >/dev/null
  wait_for 120 "PV $pv gone" pv_gone "$pv"
  ballastctl --output json volume list | jq -e --arg n "$pv" 'all(.volumes[]; .name != $n)' >/dev/null \
    || die "Ballast volume $pv still listed"
  wait_for 180 "chunk files of volume $id reclaimed" chunk_files_gone "$id"
  row 6 "delete" "PVC deleted: PV gone, volume gone from meta, its chunk files gone from every node" "$(($(date +%s) - t0))s" PASS
}
pv_gone() { ! kc get pv "$1" >/dev/null 2>&1; }
chunk_stem() { printf 'v%016x-c' "$1"; }
chunk_file_count() {
  local n c=0
  for n in "${NODES[@]}"; do
    c=$((c + $(find "$STATE/$n/ballast/data" -name "$(chunk_stem "$1")*" 2>/dev/null | wc -l)))
  done
  echo $c
}
chunk_files_present() { [ "$(chunk_file_count "$1")" -gt 0 ]; }
chunk_files_gone() { [ "$(chunk_file_count "$1")" = 0 ]; }

# --- 7. restart of the Ballast node pod under a mounted volume -------------------------------
scenario_node_pod_restart() {
  local t0=$(date +%s) node pod errors stall
  kc apply -f "$W/writer.yaml" >/dev/null
  wait_for 240 "pod writer ready" pod_ready writer
  sleep 5
  node=$(pod_node writer)
  pod=$(kc -n ballast-system get pods -l app.kubernetes.io/name=ballast-node --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
  log "restarting $pod on $node under the writer pod"
  kc -n ballast-system delete pod "$pod" --wait=true >/dev/null
  wait_for 300 "ballast-node back on $node" daemonset_ready
  sleep 15
  # The writer logs one line per write: "ok SEQ MILLIS" or "err SEQ MILLIS".
  kc -n "$NS" logs writer >"$STATE/writer.log" || true
  errors=$(grep -c '^err' "$STATE/writer.log" || true)
  # What the application saw: failed writes, and how long until writes
  # succeeded again (or that they did not within what was observed).
  stall=$(awk '
    $1 == "ok" { if (last) { gap = $3 - last; if (gap > max) max = gap }
                 if (!ferr) lastok = $3; else if (!back) back = $3; last = $3 }
    $1 == "err" { if (!ferr) ferr = $3; n++ }
    { end = $3 }
    END {
      if (!n) printf "longest gap between writes %.1fs", max / 1000
      else if (back) printf "writes back after %.1fs", (back - lastok) / 1000
      else printf "writes still failing %.0fs after the first failure (the pod must be restarted)", (end - ferr) / 1000
    }' "$STATE/writer.log")
  row 7 "ballast-node pod restart" "writer fsyncing every 100 ms while its node's ballast-node pod restarts (SIGTERM): what the pod sees" "$(($(date +%s) - t0))s" \
    "MEASURED: $errors failed writes; $stall"
  kc -n "$NS" delete pod writer --grace-period=0 --force >/dev/null 2>&1 || true
}

# --- 8. bad input ---------------------------------------------------------------------------
scenario_bad_input() {
  local t0=$(date +%s) before after
  before=$(ballastctl --output json volume list | jq '.volumes | length')
  kc apply -f "$W/bad-input.yaml" >/dev/null
  wait_for 120 "ProvisioningFailed naming the parameter (bad-replicas)" event_says bad-replicas 'replicas'
  wait_for 120 "ProvisioningFailed naming the parameter (bad-unknown)" event_says bad-unknown 'colour'
  wait_for 120 "ProvisioningFailed for a PVC larger than the cluster" event_says too-large 'capacity\|space\|exhausted\|RESOURCE_EXHAUSTED'
  for p in bad-replicas bad-unknown too-large; do
    [ "$(kc -n "$NS" get pvc "$p" -o jsonpath='{.status.phase}')" = Pending ] || die "PVC $p not Pending"
  done
  after=$(ballastctl --output json volume list | jq '.volumes | length')
  [ "$before" = "$after" ] || die "meta has $after volumes, had $before: something was half-created"
  row 8 "bad input" "invalid/unknown StorageClass parameter and a 100Ti PVC: Pending, ProvisioningFailed names it; meta unchanged" "$(($(date +%s) - t0))s" PASS
}
event_says() {
  kc -n "$NS" get events --field-selector "involvedObject.name=$1,reason=ProvisioningFailed" -o jsonpath='{.items[*].message}' | grep -qi "$2"
}

run_scenarios() {
  local s failed=0 only=${1:-}
  LOST_NODE=""
  for s in scenario_statefulset scenario_snapshot scenario_clone scenario_strict_topology scenario_expand scenario_block scenario_delete scenario_node_pod_restart \
           scenario_node_loss scenario_bad_input; do
    [ -z "$only" ] || [ "$s" = "scenario_$only" ] || continue
    local t0=$(date +%s)
    log "--- $s"
    # Not in an `if`: there bash would ignore set -e inside the subshell too.
    set +e
    ( set -e; "$s"; declare -p RESULTS >"$STATE/results.$s" )
    local rc=$?
    set -e
    if [ $rc -ne 0 ]; then
      failed=$((failed + 1))
      row "!" "${s#scenario_}" "see the log above" "$(($(date +%s) - t0))s" FAIL
    else
      # shellcheck disable=SC1090
      . "$STATE/results.$s"
    fi
  done
  printf '\n%s\n' "Ballast on Kubernetes $K8S_VERSION: end-to-end scenarios"
  printf '%-2s | %-24s | %-78s | %6s | %s\n' "#" scenario checked time result
  printf '%s\n' "${RESULTS[@]}"
  [ "$failed" = 0 ] || die "$failed scenario(s) failed"
}
