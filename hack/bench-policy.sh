#!/usr/bin/env bash
# NetworkPolicy benchmark, in throw-away network namespaces:
#  1. scale: 1000 policies over 5000 pods (100 on this node, the rest remote) and 50 namespaces:
#     the real `rsdn node` reads a cluster directory and does its first (full) sync; its log
#     splits the sync into computing and applying (ipset restore + iptables-restore). In the
#     same run, the identical sets and rules (`rsdn proxy render --ipset` / `rsdn proxy render`)
#     restored bare into a fresh namespace. Then one remote pod is relabelled (it leaves one
#     peer set and joins another), PARTIALS times back and forth: the median of the partial
#     syncs that follow, against the full one (target <= 5%). And the daemon's peak RSS
#     (VmHWM) with all of it watched.
#  2. packet path: a 2-node lab; a client pod on node1 opens and closes TCP connections for
#     SECONDS to a server pod on node2 selected by 0, 1 or 100 policies (the one allowing the
#     client last, so a new connection walks all of them), and, alternating with it, to an
#     unselected pod on the same node: connections per second and median latency, and the
#     selected/unselected ratio of the medians over ROUNDS.
# usage: [PARTIALS=9] hack/bench-policy.sh [ROUNDS] [SECONDS]   (root; about 3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root
ensure_packages

ROUNDS=${1:-5}
SECS=${2:-3}
PARTIALS=${PARTIALS:-9}
[ "$PARTIALS" -ge 1 ] 2>/dev/null || { echo "PARTIALS must be a number >= 1" >&2; exit 2; }
export LC_ALL=C # sort -g and printf read bc's decimal points
RSDN=$PWD/target/dist/rsdn
W=$(mktemp -d /tmp/rsdn-bench-policy.XXXXXX)
NS=rsdn-bpol
export RSDN_LAB=rsdn-bpol-lab
PID=
cleanup() {
  [ -z "$PID" ] || kill "$PID" 2>/dev/null || true
  # The lab first: it finds its processes by their namespaces, which the next line deletes
  # (its names share the prefix); the other way round, the pods' servers outlived the run.
  "$RSDN" lab down >/dev/null 2>&1 || true
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$NS-" || true); do ip netns del "$ns"; done
  rm -rf "$W"
}
trap cleanup EXIT
hack/build.sh --lab >/dev/null

# gen DIR: node n1, 50 namespaces, 5000 pods, 1000 policies (files of 100 objects).
gen() {
  mkdir -p "$1"
  printf 'kind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.128.0.0/23}\nstatus: {addresses: [{type: InternalIP, address: 100.64.0.1}]}\n' >"$1/node.yaml"
  awk -v dir="$1" 'BEGIN {
    for (n = 0; n < 50; n++)
      printf("---\nkind: Namespace\nmetadata: {name: ns%d, labels: {team: t%d}}\n", n, n % 10) > (dir "/namespaces.yaml")
    for (i = 0; i < 5000; i++) {
      f = sprintf("%s/pods-%02d.yaml", dir, int(i / 100))
      node = i % 50 + 1
      if (node == 1) ip = sprintf("10.128.%d.%d", int(i / 50 / 250), (i / 50) % 250 + 2)
      else ip = sprintf("10.%d.%d.%d", 129 + int(i / 62500), int(i / 250) % 250, i % 250 + 1)
      printf("---\nkind: Pod\nmetadata: {name: p%d, namespace: ns%d, labels: {app: a%d, role: r%d}}\nspec: {nodeName: n%d, containers: [{name: c, ports: [{name: serve-80-tcp, containerPort: 80}]}]}\nstatus: {phase: Running, podIP: %s}\n", i, i % 50, i % 100, i % 7, node, ip) > f
    }
    for (j = 0; j < 1000; j++) {
      f = sprintf("%s/policies-%02d.yaml", dir, int(j / 100))
      printf("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: pol%d, namespace: ns%d}\nspec:\n  podSelector: {matchLabels: {app: a%d}}\n", j, j % 50, j % 100) > f
      printf("  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: t%d}}, podSelector: {matchLabels: {role: r%d}}}]\n    ports: [{port: 80}]\n  - from: [{ipBlock: {cidr: 172.16.0.0/12, except: [172.16.%d.0/24]}}]\n", j % 10, j % 7, j % 256) > f
      if (j % 5 == 0)
        printf("  egress:\n  - to: [{podSelector: {matchLabels: {app: a%d}}}]\n    ports: [{port: serve-80-tcp}]\n", (j + 1) % 100) > f
    }
  }'
}
# synced LOG K: waits for the K-th "iptables synced" line; prints its key=value fields.
synced() {
  local deadline=$((SECONDS + 600))
  until [ "$(grep -c 'iptables synced' "$1")" -ge "$2" ]; do
    [ $SECONDS -ge $deadline ] && { echo "no sync #$2 in $1" >&2; tail "$1" >&2; return 1; }
    sleep 0.05
  done
  grep 'iptables synced' "$1" | sed -n "$2p" | grep -oE '(full|lines|compute_ms|restore_ms|checks_ms)=[a-z0-9.]+' | tr '\n' ' '
}
field() { grep -oE "$1=[0-9a-z.]+" <<<"$2" | cut -d= -f2; }
add_ms() { echo "$*" | tr ' ' '+' | bc -l; }
now_ms() { date +%s%3N; }

echo "== 1. 1000 policies over 5000 pods (nft backend)"
dir=$W/cluster
gen "$dir"
ns=$NS-scale
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add eth0 type veth peer name peer0
ip -n "$ns" addr add 100.64.0.1/10 dev eth0
ip -n "$ns" link set eth0 up
log=$W/rsdn.log
ip netns exec "$ns" "$RSDN" node --node-name n1 --cluster-network 10.128.0.0/14 --cluster-dir "$dir" \
  --cni-conf-dir "$W/net.d" --iptables-backend nft --resync-seconds 3600 >"$log" 2>&1 &
PID=$!
s=$(synced "$log" 1)
compute=$(field compute_ms "$s"); restore=$(field restore_ms "$s"); checks=$(field checks_ms "$s")
total=$(add_ms "$compute" "$restore" "$checks")
sets=$(ip netns exec "$ns" ipset list -n | grep -c '^RSDN-')
rules=$(ip netns exec "$ns" iptables-nft-save -t filter | grep -c '^-A RSDN')
rss=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
"$RSDN" proxy render --node-name n1 --cluster-network 10.128.0.0/14 --cluster-dir "$dir" >"$W/payload"
"$RSDN" proxy render --ipset --node-name n1 --cluster-network 10.128.0.0/14 --cluster-dir "$dir" >"$W/sets"
ip netns add "$NS-bare"
start=$(now_ms)
ip netns exec "$NS-bare" ipset restore <"$W/sets"
ip netns exec "$NS-bare" iptables-nft-restore --noflush --wait=5 <"$W/payload"
bare=$(( $(now_ms) - start ))
ip netns del "$NS-bare"
echo "  full sync: $s-> ${total} ms ($sets sets, $rules policy rules); the same sets and rules restored bare: ${bare} ms (restore/bare $(printf '%.2f' "$(echo "$restore / $bare" | bc -l)"))"
# p10 (ns10 of team t0, on node n11) becomes role r6 instead of r3: it leaves the peer sets of
# role r3 in team t0 namespaces and joins those of r6, which policies selecting pods of this
# node use (pol150 and pol300: the policies of ns0, where n1's pods are, admit team t0). A pod
# of another team would change no set of this node, and no sync would follow.
# PARTIALS relabels, back and forth (r3 -> r6 -> r3 ...), each waited for: the median partial.
f=$dir/pods-00.yaml
roles=(r3 r6)
parts=()
for k in $(seq 1 "$PARTIALS"); do
  from=${roles[$(( (k + 1) % 2 ))]}; to=${roles[$((k % 2))]}
  sed "s/name: p10, namespace: ns10, labels: {app: a10, role: $from}/name: p10, namespace: ns10, labels: {app: a10, role: $to}/" "$f" >"$dir/.tmp" && mv "$dir/.tmp" "$f"
  p=$(synced "$log" $((k + 1)))
  parts+=("$(add_ms "$(field compute_ms "$p")" "$(field restore_ms "$p")" "$(field checks_ms "$p")")")
  [ "$k" = 1 ] && echo "  first partial sync after one pod relabel: $p"
done
sorted=$(printf '%s\n' "${parts[@]}" | sort -g)
pmed=$(sed -n "$(( (PARTIALS + 1) / 2 ))p" <<<"$sorted")
echo "  partial sync after one pod relabel, median of $PARTIALS: ${pmed} ms (min $(head -1 <<<"$sorted"), max $(tail -1 <<<"$sorted")) vs full ${total} ms = $(printf '%.2f' "$(echo "100 * $pmed / $total" | bc -l)")% (target <= 5%)"
echo "  daemon peak RSS with 5000 pods and 1000 policies watched: $((rss / 1024)) MiB (VmHWM after the full sync)"
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
ip netns del "$ns"

echo "== 2. packet path: new TCP connections to a pod selected by N policies vs an unselected pod"
"$RSDN" lab up --nodes 2 --pods-per-node 0 >/dev/null
"$RSDN" lab ns add bench --labels team=bench >/dev/null
"$RSDN" lab pod add bench/client --node 1 --labels role=client >/dev/null
for p in selected unselected; do "$RSDN" lab pod add "bench/$p" --node 2 --labels "role=$p" --port 80/TCP --serve >/dev/null; done
ip_of() { "$RSDN" lab status --json | jq -r --arg p "bench/$1" '.pods[] | select(.pod == $p) | .ip'; }
sel=$(ip_of selected); unsel=$(ip_of unselected)
cluster=/run/$RSDN_LAB/cluster
cat >"$W/client.py" <<'EOF'
import socket, sys, time
ip, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lat = []
end = time.monotonic() + secs
while time.monotonic() < end:
    t = time.perf_counter()
    s = socket.create_connection((ip, port), timeout=2)
    s.close()
    lat.append(time.perf_counter() - t)
lat.sort()
print(f"{len(lat) / secs:.0f} {lat[len(lat) // 2] * 1e6:.0f}")
EOF
policies() { # policies N: N policies select bench/selected; the last one allows the client
  rm -f "$cluster"/bench-np-*.yaml
  local k
  for k in $(seq 1 "$1"); do
    local from="role: nobody$k"
    [ "$k" = "$1" ] && from="role: client"
    printf 'apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np%03d, namespace: bench}\nspec:\n  podSelector: {matchLabels: {role: selected}}\n  ingress: [{from: [{podSelector: {matchLabels: {%s}}}]}]\n' "$k" "$from" \
      >"$cluster/.bench-np-$k.tmp"
    mv "$cluster/.bench-np-$k.tmp" "$cluster/bench-np-$k.yaml"
  done
  sleep 2
}
measure() { ip netns exec "$RSDN_LAB-pod.bench.client" python3 "$W/client.py" "$1" 80 "$SECS"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '  %-10s %14s %14s %16s %16s %8s\n' policies "sel conn/s" "unsel conn/s" "sel p50 us" "unsel p50 us" "ratio"
for n in 0 1 100; do
  policies "$n"
  : >"$W/sel"; : >"$W/unsel"
  for _ in $(seq "$ROUNDS"); do
    measure "$sel" >>"$W/sel"
    measure "$unsel" >>"$W/unsel"
  done
  sr=$(cut -d' ' -f1 "$W/sel" | median); ur=$(cut -d' ' -f1 "$W/unsel" | median)
  sl=$(cut -d' ' -f2 "$W/sel" | median); ul=$(cut -d' ' -f2 "$W/unsel" | median)
  printf '  %-10s %14s %14s %16s %16s %8.3f\n' "$n" "$sr" "$ur" "$sl" "$ul" "$(echo "$sr / $ur" | bc -l)"
done
