#!/usr/bin/env bash
# Overlay benchmarks, everything inside throw-away network namespaces:
#  1. Throughput: iperf3 pod -> pod across two nodes through the lab (rsdn node + rsdn-cni), in
#     the same run as the same topology built by hand with ip commands and as node -> node on
#     the underlay. Rounds alternate between the three; medians and ratios are printed.
#     Target: lab >= 0.95 x hand-built.
#  2. Convergence: time from writing N Node objects (default 1000 and 5000) into the cluster
#     directory of a running `rsdn node` until all 3N entries are in its kernel, against
#     `ip -batch` + `bridge -batch` adding the same entries. Target: within 2x of ip -batch.
# usage: hack/bench-overlay.sh [ROUNDS] [SECONDS-PER-IPERF]
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root
ensure_packages

ROUNDS=${1:-5}
SECS=${2:-4}
RSDN=$PWD/target/dist/rsdn
W=$(mktemp -d /tmp/rsdn-bench-overlay.XXXXXX)
HB=rsdn-hb   # prefix of the hand-built topology's namespaces
CV=rsdn-cv   # prefix of the convergence namespaces

cleanup() {
  "$RSDN" lab down >/dev/null 2>&1 || true
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^($HB|$CV)-" || true); do ip netns del "$ns"; done
  [ -f "$W/cv.pid" ] && kill "$(cat "$W/cv.pid")" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

hack/build.sh
"$RSDN" lab down >/dev/null 2>&1 || true
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# ---------------------------------------------------------------- 1. throughput
echo "== throughput: $ROUNDS rounds of ${SECS}s iperf3 (TCP, 1 stream) each"
"$RSDN" lab up --nodes 2 --pods-per-node 1 >/dev/null
lab_server=$("$RSDN" lab status --json | jq -r '.pods[] | select(.node == "node2") | .ip')

# The same topology by hand: underlay bridge, two nodes with tun0 + vxlan0 + static entries,
# one pod each, with the settings rsdn uses (VNI 1, port 4789, nolearning, MTU 1450, MACs).
ip netns add $HB-underlay
ip -n $HB-underlay link add br0 type bridge
ip -n $HB-underlay link set br0 up
for i in 1 2; do
  n=$HB-node$i p=$HB-pod$i
  ip netns add $n; ip netns add $p
  ip -n $n link set lo up; ip -n $p link set lo up
  ip -n $HB-underlay link add n$i type veth peer name eth0 netns $n
  ip -n $HB-underlay link set n$i master br0 up
  ip -n $n addr add 192.168.88.1$i/24 dev eth0
  ip -n $n link set eth0 up
  ip netns exec $n sysctl -qw net.ipv4.ip_forward=1
  sub=$(( (i - 1) * 2 ))
  ip -n $n link add tun0 address 0a:58:0a:80:0$sub:01 mtu 1450 type bridge
  ip -n $n addr add 10.128.$sub.1/23 dev tun0
  ip -n $n link set tun0 up
  ip -n $n link add vxlan0 address 0a:58:c0:a8:58:1$i mtu 1450 type vxlan id 1 dstport 4789 local 192.168.88.1$i nolearning
  ip -n $n link set vxlan0 up
  ip -n $n link add veth$i mtu 1450 master tun0 type veth peer name eth0 netns $p
  ip -n $n link set veth$i up
  ip -n $p link set eth0 address 0a:58:0a:80:0$sub:02 mtu 1450 up
  ip -n $p addr add 10.128.$sub.2/23 dev eth0
  ip -n $p route add default via 10.128.$sub.1
done
ip -n $HB-node1 route add 10.128.2.0/23 via 10.128.2.0 dev vxlan0 onlink src 10.128.0.1
ip -n $HB-node1 neigh add 10.128.2.0 lladdr 0a:58:c0:a8:58:12 dev vxlan0 nud permanent
bridge -n $HB-node1 fdb append 0a:58:c0:a8:58:12 dev vxlan0 dst 192.168.88.12 self permanent
ip -n $HB-node2 route add 10.128.0.0/23 via 10.128.0.0 dev vxlan0 onlink src 10.128.2.1
ip -n $HB-node2 neigh add 10.128.0.0 lladdr 0a:58:c0:a8:58:11 dev vxlan0 nud permanent
bridge -n $HB-node2 fdb append 0a:58:c0:a8:58:11 dev vxlan0 dst 192.168.88.11 self permanent

# iperf3 servers: lab pod on node2, hand-built pod2, lab node2 on the underlay.
ip netns exec rsdn-lab-node2-pod1 iperf3 -s -D -1 >/dev/null 2>&1 || true
run_iperf() { # run_iperf CLIENT-NS SERVER-NS SERVER-IP -> Gbit/s
  ip netns exec "$2" iperf3 -s -D --one-off >/dev/null
  sleep 0.2
  ip netns exec "$1" iperf3 -c "$3" -t "$SECS" -J | jq '.end.sum_received.bits_per_second / 1e9'
}
: >"$W/lab"; : >"$W/hand"; : >"$W/underlay"
for r in $(seq 1 "$ROUNDS"); do
  run_iperf rsdn-lab-node1-pod1 rsdn-lab-node2-pod1 "$lab_server" >>"$W/lab"
  run_iperf $HB-pod1 $HB-pod2 10.128.2.2 >>"$W/hand"
  run_iperf rsdn-lab-node1 rsdn-lab-node2 192.168.77.12 >>"$W/underlay"
  printf '  round %d: lab %.2f, hand-built %.2f, underlay %.2f Gbit/s\n' "$r" \
    "$(tail -1 "$W/lab")" "$(tail -1 "$W/hand")" "$(tail -1 "$W/underlay")"
done
lab=$(median <"$W/lab"); hand=$(median <"$W/hand"); under=$(median <"$W/underlay")
printf 'median Gbit/s: rsdn lab %.2f | hand-built overlay %.2f | underlay node-to-node %.2f\n' "$lab" "$hand" "$under"
printf 'ratio lab / hand-built: %.3f (target >= 0.95); lab / underlay: %.3f\n' \
  "$(echo "$lab / $hand" | bc -l)" "$(echo "$lab / $under" | bc -l)"
"$RSDN" lab down >/dev/null

# ---------------------------------------------------------------- 2. convergence
# One node with an underlay interface; N remote nodes in 10.0.0.0/8 (/24 each, so 5000 fit),
# underlay addresses in 100.64.0.0/10 (no traffic is ever sent to them).
node_yaml() { # node_yaml I -> a Node object
  printf -- '---\napiVersion: v1\nkind: Node\nmetadata:\n  name: n%d\nspec:\n  podCIDR: 10.%d.%d.0/24\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 100.64.%d.%d\n' \
    "$1" $(($1 / 256)) $(($1 % 256)) $(($1 / 256)) $(($1 % 256))
}
mac_of() { printf '0a:58:64:40:%02x:%02x' $(($1 / 256)) $(($1 % 256)); }
count_entries() { # count_entries NS -> routes+neigh+fdb of the remote nodes
  local r n f
  r=$(ip -n "$1" route show proto 212 | wc -l)
  n=$(ip -n "$1" neigh show dev vxlan0 nud permanent | wc -l)
  f=$(bridge -n "$1" fdb show dev vxlan0 | grep -c ' dst ' || true)
  echo $((r + n + f))
}
now_ms() { date +%s%3N; }

for N in 1000 5000; do
  echo
  echo "== convergence: $N remote nodes"
  mkdir -p "$W/cluster-$N"
  node_yaml 1 >"$W/cluster-$N/n1.yaml"
  for i in $(seq 2 $((N + 1))); do node_yaml "$i"; done >"$W/remote-$N.yaml"

  # rsdn node with only itself in the directory, then all N at once.
  ns=$CV-rsdn-$N
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add eth0 type veth peer name peer0
  ip -n "$ns" addr add 100.64.0.1/10 dev eth0
  ip -n "$ns" link set eth0 up; ip -n "$ns" link set peer0 up
  ip netns exec "$ns" "$RSDN" node --node-name n1 --cluster-network 10.0.0.0/8 --service-network 172.30.0.0/16 \
    --cluster-dir "$W/cluster-$N" --cni-conf-dir "$W/net.d-$N" --resync-seconds 60 >"$W/rsdn-$N.log" 2>&1 &
  echo $! >"$W/cv.pid"
  until [ -f "$W/net.d-$N/10-rsdn.conflist" ]; do sleep 0.05; done
  cp "$W/remote-$N.yaml" "$W/cluster-$N/.remote.tmp"
  start=$(now_ms)
  mv "$W/cluster-$N/.remote.tmp" "$W/cluster-$N/remote.yaml"
  until [ "$(count_entries "$ns")" -ge $((3 * N)) ]; do sleep 0.01; done
  rsdn_ms=$(( $(now_ms) - start ))
  kill "$(cat "$W/cv.pid")"; wait "$(cat "$W/cv.pid")" 2>/dev/null || true; rm -f "$W/cv.pid"
  grep -o 'took_ms=[0-9]*' "$W/rsdn-$N.log" | tail -1 | sed 's/^/  daemon pass (observe+diff+apply): /'

  # ip -batch / bridge -batch of the same entries into the same kind of namespace.
  ns=$CV-ip-$N
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add eth0 type veth peer name peer0
  ip -n "$ns" addr add 100.64.0.1/10 dev eth0
  ip -n "$ns" link set eth0 up; ip -n "$ns" link set peer0 up
  ip -n "$ns" link add vxlan0 address 0a:58:64:40:00:01 mtu 1450 type vxlan id 1 dstport 4789 local 100.64.0.1 nolearning
  ip -n "$ns" link set vxlan0 up
  : >"$W/ip-$N.batch"; : >"$W/bridge-$N.batch"
  for i in $(seq 2 $((N + 1))); do
    a=$((i / 256)) b=$((i % 256)) mac=$(mac_of "$i")
    echo "neigh replace 10.$a.$b.0 lladdr $mac dev vxlan0 nud permanent" >>"$W/ip-$N.batch"
    echo "route replace 10.$a.$b.0/24 via 10.$a.$b.0 dev vxlan0 onlink proto 212" >>"$W/ip-$N.batch"
    echo "fdb replace $mac dev vxlan0 dst 100.64.$a.$b self permanent" >>"$W/bridge-$N.batch"
  done
  start=$(now_ms)
  ip -n "$ns" -batch "$W/ip-$N.batch"
  bridge -n "$ns" -batch "$W/bridge-$N.batch"
  ipb_ms=$(( $(now_ms) - start ))
  [ "$(count_entries "$ns")" -ge $((3 * N)) ] || echo "  (ip -batch did not add everything?)"
  printf '%d nodes: rsdn node %d ms (write -> all %d entries in the kernel) | ip -batch + bridge -batch %d ms | ratio %.2f (target <= 2)\n' \
    "$N" "$rsdn_ms" $((3 * N)) "$ipb_ms" "$(echo "$rsdn_ms / $ipb_ms" | bc -l)"
done
