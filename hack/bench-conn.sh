#!/usr/bin/env bash
# Per-connection cost of the iptables datapath with many Services, for each backend, in
# throw-away network namespaces: a node namespace where the real `rsdn node` programs N Services
# (one endpoint each, all the same server in a pod-like namespace behind a veth), then is
# stopped (the rules stay). From the node, a connect/close loop (RST, no TIME_WAIT) to
#  - the server directly (no Service: the floor),
#  - the first Service in KUBE-SERVICES and the last one (every new connection walks the
#    chain's rules in order until its own: the cost grows with N for the last one),
# interleaved in rounds so that each is measured under the same conditions. Printed: the new
# connection rate and the median / p99 time of connect() (the first packet's round trip,
# through DNAT on the way out and its reversal on the way back).
# This is the number a future nftables mode (verdict maps, one lookup whatever N) is judged by.
# usage: [BACKENDS="nft legacy"] [CONNS=3000] [ROUNDS=5] hack/bench-conn.sh [N...]   (root; ~5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root
ensure_packages

SIZES=("$@")
[ ${#SIZES[@]} -eq 0 ] && SIZES=(10 1000 10000)
CONNS=${CONNS:-3000}
ROUNDS=${ROUNDS:-5}
RSDN=$PWD/target/dist/rsdn
W=$(mktemp -d /tmp/rsdn-bench-conn.XXXXXX)
NS=rsdn-bc
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$NS-" || true); do ip netns del "$ns"; done
  rm -rf "$W"
}
trap cleanup EXIT
hack/build.sh >/dev/null

SERVER=192.168.50.10
# gen DIR N: node n1, and N Services (port 80) whose one endpoint is the server's port 8080.
gen() {
  mkdir -p "$1"
  printf 'kind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.128.0.0/23}\nstatus: {addresses: [{type: InternalIP, address: 100.64.0.1}]}\n' >"$1/node.yaml"
  awk -v n="$2" -v dir="$1" -v ep="$SERVER" 'BEGIN {
    for (i = 0; i < n; i++) {
      f = sprintf("%s/svc-%04d.yaml", dir, int(i / 100))
      printf("---\nkind: Service\nmetadata: {name: s%d, namespace: bench}\nspec:\n  clusterIP: 172.30.%d.%d\n  ports: [{name: http, port: 80}]\n", i, int(i / 250), i % 250 + 1) > f
      printf("---\nkind: EndpointSlice\nmetadata: {name: s%d-1, namespace: bench, labels: {kubernetes.io/service-name: s%d}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [%s], nodeName: n1}\n", i, i, ep) > f
    }
  }'
}

# The server accepts and closes; the client times connect() and closes with a RST.
cat >"$W/server.py" <<'EOF'
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(4096)
while True:
    c, _ = s.accept()
    c.close()
EOF
cat >"$W/client.py" <<'EOF'
import socket, struct, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
linger = struct.pack("ii", 1, 0)
lat = []
start = time.perf_counter()
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    t0 = time.perf_counter_ns()
    s.connect((host, port))
    lat.append(time.perf_counter_ns() - t0)
    s.close()
elapsed = time.perf_counter() - start
lat.sort()
print(f"{n / elapsed:.0f} {lat[len(lat) // 2] / 1000:.1f} {lat[len(lat) * 99 // 100] / 1000:.1f}")
EOF

# median VALUES...: the median of the numbers given.
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

printf '%-7s %6s | %-28s | %-28s | %-28s\n' "" "" "direct (no Service)" "first Service" "last Service"
printf '%-7s %6s | %9s %8s %9s | %9s %8s %9s | %9s %8s %9s\n' backend N conn/s med_us p99_us conn/s med_us p99_us conn/s med_us p99_us
for backend in ${BACKENDS:-nft legacy}; do
  for N in "${SIZES[@]}"; do
    dir=$W/cluster-$N
    [ -d "$dir" ] || gen "$dir" "$N"
    node=$NS-node pod=$NS-pod
    ip netns add "$node"
    ip netns add "$pod"
    ip -n "$node" link set lo up
    ip -n "$pod" link set lo up
    ip -n "$node" link add eth0 type veth peer name peer0 # the node's address lives here
    ip -n "$node" addr add 100.64.0.1/10 dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set peer0 up
    # A default route as any node has: a ClusterIP is routed before it is translated.
    ip -n "$node" route add default via 100.64.0.2 dev eth0
    ip -n "$node" link add srv0 type veth peer name eth0 netns "$pod"
    ip -n "$node" addr add 192.168.50.1/24 dev srv0
    ip -n "$node" link set srv0 up
    ip -n "$pod" addr add "$SERVER/24" dev eth0
    ip -n "$pod" link set eth0 up
    ip -n "$pod" route add default via 192.168.50.1
    log=$W/rsdn-$backend-$N.log
    ip netns exec "$node" "$RSDN" node --node-name n1 --cluster-network 10.128.0.0/14 --cluster-dir "$dir" \
      --cni-conf-dir "$W/net.d" --iptables-backend "$backend" --resync-seconds 3600 >"$log" 2>&1 &
    daemon=$!
    PIDS+=("$daemon")
    deadline=$((SECONDS + 900))
    until grep -q 'iptables synced' "$log"; do
      if [ $SECONDS -ge $deadline ] || ! kill -0 "$daemon" 2>/dev/null || grep -q 'iptables sync failed' "$log"; then
        echo "$backend N=$N: no sync in $log" >&2; tail "$log" >&2; exit 1
      fi
      sleep 0.2
    done
    kill "$daemon"
    wait "$daemon" 2>/dev/null || true
    # The first and the last ClusterIP rule of KUBE-SERVICES, as the kernel holds them.
    rules=$(ip netns exec "$node" "iptables-$backend-save" -t nat | grep -- '-A KUBE-SERVICES -d ' || true)
    [ "$(wc -l <<<"$rules")" -eq "$N" ] || { echo "$backend N=$N: $(wc -l <<<"$rules") Service rules, not $N" >&2; exit 1; }
    first=$(head -1 <<<"$rules" | grep -oE -- '-d [0-9.]+' | cut -d' ' -f2)
    last=$(tail -1 <<<"$rules" | grep -oE -- '-d [0-9.]+' | cut -d' ' -f2)
    ip netns exec "$pod" python3 "$W/server.py" &
    PIDS+=("$!")
    deadline=$((SECONDS + 10))
    until ip netns exec "$node" python3 "$W/client.py" "$SERVER" 8080 1 >/dev/null 2>&1; do
      [ $SECONDS -lt $deadline ] || { echo "the server in $pod does not answer" >&2; exit 1; }
      sleep 0.1
    done
    declare -A rate=() med=() p99=()
    for target in direct first last; do rate[$target]=""; med[$target]=""; p99[$target]=""; done
    for _ in $(seq "$ROUNDS"); do
      for target in direct first last; do
        case $target in
          direct) addr=$SERVER port=8080 ;;
          first) addr=$first port=80 ;;
          last) addr=$last port=80 ;;
        esac
        read -r r m p < <(ip netns exec "$node" python3 "$W/client.py" "$addr" "$port" "$CONNS")
        rate[$target]+=" $r"; med[$target]+=" $m"; p99[$target]+=" $p"
        ip netns exec "$node" conntrack -F >/dev/null 2>&1 || true
      done
    done
    printf '%-7s %6d' "$backend" "$N"
    for target in direct first last; do
      # shellcheck disable=SC2086 # the lists are words on purpose
      printf ' | %9s %8s %9s' "$(median ${rate[$target]})" "$(median ${med[$target]})" "$(median ${p99[$target]})"
    done
    echo
    kill "${PIDS[-1]}" 2>/dev/null || true
    wait "${PIDS[-1]}" 2>/dev/null || true
    PIDS=()
    ip netns del "$node"
    ip netns del "$pod"
  done
done
echo "(median of $ROUNDS rounds of $CONNS connections each; interleaved direct, first, last)"
