#!/usr/bin/env bash
# Overlay benchmarks, everything inside throw-away network namespaces:
#  1. Throughput: iperf3 pod -> pod across two nodes through the lab (rsdn node + rsdn-cni), in
#     the same run as the same topology built by hand with ip commands (four copies, from no
#     netfilter at all to the rules of a flannel + kube-proxy node: the decomposition of the
#     cost) and as node -> node on the underlay. Rounds alternate between all of them; medians
#     and ratios are printed. Target: lab >= 0.95 x hand-built, or, where the rest is the price
#     of conntrack and iptables that every iptables-based plugin pays, >= 0.95 x the hand-built
#     overlay carrying a flannel + kube-proxy node's rules.
#  2. Convergence: time from writing N Node objects (default 1000 and 5000) into the cluster
#     directory of a running `rsdn node` until all 3N entries are in its kernel, against
#     `ip -batch` + `bridge -batch` adding the same entries. Target: within 2x of ip -batch.
#     Runs alternate between the two; medians are compared.
# usage: hack/bench-overlay.sh [ROUNDS] [SECONDS-PER-IPERF] [CONVERGENCE-RUNS]
#        (ROUNDS=0 skips the throughput part)
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root
ensure_packages

ROUNDS=${1:-5}
SECS=${2:-4}
CONVERGE=${3:-5}
RSDN=$PWD/target/dist/rsdn
W=$(mktemp -d /tmp/rsdn-bench-overlay.XXXXXX)
HB=rsdn-hb   # prefix of the hand-built topology's namespaces
CV=rsdn-cv   # prefix of the convergence namespaces
NSP=${RSDN_LAB:-rsdn-lab}-   # the lab's namespaces (RSDN_LAB names the lab)

cleanup() {
  "$RSDN" lab down >/dev/null 2>&1 || true
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^($HB|$CV)-" || true); do ip netns del "$ns"; done
  [ -f "$W/cv.pid" ] && kill "$(cat "$W/cv.pid")" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

hack/build.sh --lab
"$RSDN" lab down >/dev/null 2>&1 || true
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# ---------------------------------------------------------------- 1. throughput
throughput() {
echo "== throughput: $ROUNDS rounds of ${SECS}s iperf3 (TCP, 1 stream) each"
"$RSDN" lab up --nodes 2 --pods-per-node 1 >/dev/null
lab_server=$("$RSDN" lab status --json | jq -r '.pods[] | select(.node == "node2") | .ip')

# The same topology by hand: underlay bridge, two nodes with tun0 + vxlan0 + static entries,
# one pod each, with the settings rsdn uses (VNI 1, port 4789, nolearning, MTU 1450, MACs), in
# four copies that differ only in the netfilter load of their nodes (the decomposition):
#   none       no netfilter at all;
#   conntrack  one filter rule that needs conntrack (kube-proxy's INVALID drop);
#   brnf       that, and net.bridge.bridge-nf-call-iptables=1 (pod traffic through tun0 crosses
#              iptables, as on an rsdn node);
#   fkp        brnf, and the rules of a flannel + kube-proxy node
#              (hack/testdata/flannel-kube-proxy.rules): what every iptables-based plugin pays.
hand_built() { # hand_built PREFIX LOAD
  local P=$1 load=$2 i n p sub
  ip netns add "$P-underlay"
  ip -n "$P-underlay" link add br0 type bridge
  ip -n "$P-underlay" link set br0 up
  for i in 1 2; do
    n=$P-node$i p=$P-pod$i
    ip netns add "$n"; ip netns add "$p"
    ip -n "$n" link set lo up; ip -n "$p" link set lo up
    ip -n "$P-underlay" link add "n$i" type veth peer name eth0 netns "$n"
    ip -n "$P-underlay" link set "n$i" master br0 up
    ip -n "$n" addr add "192.168.88.1$i/24" dev eth0
    ip -n "$n" link set eth0 up
    ip netns exec "$n" sysctl -qw net.ipv4.ip_forward=1
    sub=$(( (i - 1) * 2 ))
    ip -n "$n" link add tun0 address "0a:58:0a:80:0$sub:01" mtu 1450 type bridge
    ip -n "$n" addr add "10.128.$sub.1/23" dev tun0
    ip -n "$n" link set tun0 up
    ip -n "$n" link add vxlan0 address "0a:58:c0:a8:58:1$i" mtu 1450 type vxlan id 1 dstport 4789 local "192.168.88.1$i" nolearning
    ip -n "$n" link set vxlan0 up
    ip -n "$n" link add "veth$i" mtu 1450 master tun0 type veth peer name eth0 netns "$p"
    ip -n "$n" link set "veth$i" up
    ip -n "$p" link set eth0 address "0a:58:0a:80:0$sub:02" mtu 1450 up
    ip -n "$p" addr add "10.128.$sub.2/23" dev eth0
    ip -n "$p" route add default via "10.128.$sub.1"
    # br_netfilter's setting is per namespace; a new one starts from the module's default (1).
    ip netns exec "$n" sysctl -qw net.bridge.bridge-nf-call-iptables=0
    case $load in
      none) ;;
      conntrack) ip netns exec "$n" iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP ;;
      brnf | fkp)
        ip netns exec "$n" sysctl -qw net.bridge.bridge-nf-call-iptables=1
        if [ "$load" = brnf ]; then
          ip netns exec "$n" iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP
        else
          ip netns exec "$n" iptables-restore <hack/testdata/flannel-kube-proxy.rules
        fi ;;
    esac
  done
  ip -n "$P-node1" route add 10.128.2.0/23 via 10.128.2.0 dev vxlan0 onlink src 10.128.0.1
  ip -n "$P-node1" neigh add 10.128.2.0 lladdr 0a:58:c0:a8:58:12 dev vxlan0 nud permanent
  bridge -n "$P-node1" fdb append 0a:58:c0:a8:58:12 dev vxlan0 dst 192.168.88.12 self permanent
  ip -n "$P-node2" route add 10.128.0.0/23 via 10.128.0.0 dev vxlan0 onlink src 10.128.2.1
  ip -n "$P-node2" neigh add 10.128.0.0 lladdr 0a:58:c0:a8:58:11 dev vxlan0 nud permanent
  bridge -n "$P-node2" fdb append 0a:58:c0:a8:58:11 dev vxlan0 dst 192.168.88.11 self permanent
}
LOADS=(none conntrack brnf fkp)
for load in "${LOADS[@]}"; do hand_built "$HB-$load" "$load"; done

run_iperf() { # run_iperf CLIENT-NS SERVER-NS SERVER-IP -> Gbit/s
  ip netns exec "$2" iperf3 -s -D --one-off >/dev/null
  sleep 0.2
  ip netns exec "$1" iperf3 -c "$3" -t "$SECS" -J | jq '.end.sum_received.bits_per_second / 1e9'
}
: >"$W/lab"; : >"$W/underlay"
for load in "${LOADS[@]}"; do : >"$W/hand-$load"; done
for r in $(seq 1 "$ROUNDS"); do
  run_iperf ${NSP}node1-pod1 ${NSP}node2-pod1 "$lab_server" >>"$W/lab"
  line=$(printf 'lab %.2f' "$(tail -1 "$W/lab")")
  for load in "${LOADS[@]}"; do
    run_iperf "$HB-$load-pod1" "$HB-$load-pod2" 10.128.2.2 >>"$W/hand-$load"
    line+=$(printf ', hand-built %s %.2f' "$load" "$(tail -1 "$W/hand-$load")")
  done
  run_iperf ${NSP}node1 ${NSP}node2 192.168.77.12 >>"$W/underlay"
  printf '  round %d: %s, underlay %.2f Gbit/s\n' "$r" "$line" "$(tail -1 "$W/underlay")"
done
lab=$(median <"$W/lab"); under=$(median <"$W/underlay")
hand=$(median <"$W/hand-none"); fkp=$(median <"$W/hand-fkp")
echo "median Gbit/s, and each path against the hand-built overlay without netfilter:"
printf '  %-46s %6.2f  %.3f\n' "rsdn lab (rsdn node, rsdn-cni)" "$lab" "$(echo "$lab / $hand" | bc -l)"
for load in "${LOADS[@]}"; do
  m=$(median <"$W/hand-$load")
  printf '  %-46s %6.2f  %.3f\n' "hand-built overlay, netfilter load: $load" "$m" "$(echo "$m / $hand" | bc -l)"
done
printf '  %-46s %6.2f  %.3f\n' "underlay, node to node" "$under" "$(echo "$under / $hand" | bc -l)"
printf 'ratio lab / hand-built: %.3f (target >= 0.95, or:) lab / hand-built with a flannel + kube-proxy load: %.3f (target >= 0.95); lab / underlay: %.3f\n' \
  "$(echo "$lab / $hand" | bc -l)" "$(echo "$lab / $fkp" | bc -l)" "$(echo "$lab / $under" | bc -l)"
"$RSDN" lab down >/dev/null
}
if [ "$ROUNDS" -gt 0 ]; then throughput; else echo "== throughput: skipped (ROUNDS=0)"; fi

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

underlay_ns() { # underlay_ns NS: a namespace with an underlay interface holding 100.64.0.1
  ip netns add "$1"
  ip -n "$1" link set lo up
  ip -n "$1" link add eth0 type veth peer name peer0
  ip -n "$1" addr add 100.64.0.1/10 dev eth0
  ip -n "$1" link set eth0 up; ip -n "$1" link set peer0 up
}

converge_rsdn() { # converge_rsdn N RUN -> ms from the rename to the N-th route of ours
  local N=$1 ns=$CV-rsdn-$1-$2 dir=$W/cluster-$1-$2 seen=0 start line
  underlay_ns "$ns"
  mkdir -p "$dir"
  node_yaml 1 >"$dir/n1.yaml"
  ip netns exec "$ns" "$RSDN" node --node-name n1 --cluster-network 10.0.0.0/8 --service-network 172.30.0.0/16 \
    --cluster-dir "$dir" --cni-conf-dir "$W/net.d-$N-$2" --resync-seconds 60 >"$W/rsdn-$N-$2.log" 2>&1 &
  echo $! >"$W/cv.pid"
  until [ -f "$W/net.d-$N-$2/10-rsdn.conflist" ]; do sleep 0.05; done
  cp "$W/remote-$N.yaml" "$dir/.remote.tmp"
  # The clock stops at the N-th route of ours the kernel announces (routes are applied last,
  # after every FDB entry and neighbour). Listening costs the node nothing, unlike polling
  # with dumps of thousands of entries.
  coproc MON { exec ip -n "$ns" monitor route; }
  sleep 0.2
  start=$(now_ms)
  mv "$dir/.remote.tmp" "$dir/remote.yaml"
  while read -r line <&"${MON[0]}"; do
    case $line in *"proto 212"*) seen=$((seen + 1)); [ "$seen" -ge "$N" ] && break ;; esac
  done
  echo $(( $(now_ms) - start ))
  kill "$MON_PID" 2>/dev/null; wait "$MON_PID" 2>/dev/null || true
  [ "$(count_entries "$ns")" -ge $((3 * N)) ] || echo "  (routes complete before the other entries?)" >&2
  kill "$(cat "$W/cv.pid")"; wait "$(cat "$W/cv.pid")" 2>/dev/null || true; rm -f "$W/cv.pid"
  ip netns del "$ns"
}

converge_ip() { # converge_ip N RUN -> ms for ip -batch + bridge -batch of the same entries
  local N=$1 ns=$CV-ip-$1-$2 start ms
  underlay_ns "$ns"
  ip -n "$ns" link add vxlan0 address 0a:58:64:40:00:01 mtu 1450 type vxlan id 1 dstport 4789 local 100.64.0.1 nolearning
  ip -n "$ns" link set vxlan0 up
  start=$(now_ms)
  ip -n "$ns" -batch "$W/ip-$N.batch"
  bridge -n "$ns" -batch "$W/bridge-$N.batch"
  ms=$(( $(now_ms) - start ))
  [ "$(count_entries "$ns")" -ge $((3 * N)) ] || echo "  (ip -batch did not add everything?)" >&2
  ip netns del "$ns"
  echo "$ms"
}

for N in 1000 5000; do
  echo
  echo "== convergence: $N remote nodes, $CONVERGE runs alternating rsdn node / ip -batch"
  for i in $(seq 2 $((N + 1))); do node_yaml "$i"; done >"$W/remote-$N.yaml"
  : >"$W/ip-$N.batch"; : >"$W/bridge-$N.batch"
  for i in $(seq 2 $((N + 1))); do
    a=$((i / 256)) b=$((i % 256)) mac=$(mac_of "$i")
    echo "neigh replace 10.$a.$b.0 lladdr $mac dev vxlan0 nud permanent" >>"$W/ip-$N.batch"
    echo "route replace 10.$a.$b.0/24 via 10.$a.$b.0 dev vxlan0 onlink proto 212" >>"$W/ip-$N.batch"
    echo "fdb replace $mac dev vxlan0 dst 100.64.$a.$b self permanent" >>"$W/bridge-$N.batch"
  done
  : >"$W/rsdn-ms-$N"; : >"$W/ip-ms-$N"
  for r in $(seq 1 "$CONVERGE"); do
    converge_rsdn "$N" "$r" >>"$W/rsdn-ms-$N"
    converge_ip "$N" "$r" >>"$W/ip-ms-$N"
    pass=$(grep -o 'took_ms=[0-9]*' "$W/rsdn-$N-$r.log" | tail -1)
    printf '  run %d: rsdn node %d ms (daemon pass %s), ip -batch %d ms\n' "$r" \
      "$(tail -1 "$W/rsdn-ms-$N")" "${pass#took_ms=} ms" "$(tail -1 "$W/ip-ms-$N")"
  done
  rsdn_ms=$(median <"$W/rsdn-ms-$N"); ipb_ms=$(median <"$W/ip-ms-$N")
  printf '%d nodes, medians: rsdn node %s ms (write -> all %d entries in the kernel) | ip -batch + bridge -batch %s ms | ratio %.2f (target <= 2)\n' \
    "$N" "$rsdn_ms" $((3 * N)) "$ipb_ms" "$(echo "$rsdn_ms / $ipb_ms" | bc -l)"
done
