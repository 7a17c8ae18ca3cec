#!/usr/bin/env bash
# One node of the local cluster: runs inside the node's network namespace, in a
# mount namespace of its own (a slave of the host's: the host's mounts appear
# here, the node's mounts stay here). Started by tests/k8s/cluster.sh.
#   node-boot.sh NODE STATE BIN IMAGES
set -euo pipefail
n=$1 STATE=$2 BIN=$3 IMAGES=$4
d="$STATE/$n"
ip=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
zone=$(cat "$d/zone")

# This node's /var/lib/kubelet and /var/lib/ballast. The kubelet directory is a
# shared mount: the node plugin mounts staging and publish targets below it
# (Bidirectional propagation) and the pods' containers must see them.
mount --bind "$d/kubelet" /var/lib/kubelet
mount --make-rshared /var/lib/kubelet
mount --bind "$d/ballast" /var/lib/ballast

containerd --config "$d/containerd.toml" >>"$STATE/logs/containerd-$n.log" 2>&1 &
sock="$d/run/containerd.sock"
for _ in $(seq 1 100); do
  ctr --address "$sock" version >/dev/null 2>&1 && break
  sleep 0.2
done
for img in "$IMAGES"/*.tar; do
  ctr --address "$sock" -n k8s.io images import "$img" >/dev/null
done

"$BIN/kubelet" --config "$d/kubelet.yaml" --kubeconfig "$STATE/pki/kubelet-$n.kubeconfig" \
  --hostname-override "$n" --node-ip "$ip" --node-labels "topology.kubernetes.io/zone=$zone" \
  >>"$STATE/logs/kubelet-$n.log" 2>&1 &
"$BIN/kube-proxy" --config "$d/kube-proxy.yaml" >>"$STATE/logs/kube-proxy-$n.log" 2>&1 &
wait
