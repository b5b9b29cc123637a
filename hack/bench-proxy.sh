#!/usr/bin/env bash
# Proxy benchmark, inside throw-away network namespaces, for each iptables backend:
#  - for N Services with 10 endpoints each (default 1000 5000 10000): the real `rsdn node`
#    reads a cluster directory and does its first (full) sync; its log splits the sync into
#    computing (render + payload) and iptables-restore. In the same run, a bare
#    `iptables-restore --noflush` of the identical payload (`rsdn proxy render`) into a fresh
#    namespace. Target: computing <= 10% of the restore. And the same payload restored
#    without --noflush (the table flushed first: what kube-proxy cannot do, foreign rules would
#    go), the floor of writing this many rules: the whole first sync (compute, restore, checks)
#    against it is the last column. Target: <= 2 on nf_tables, where the daemon stages the
#    sync (src/netfilter/payload.rs says why); never worse on legacy.
#  - at the largest N: one endpoint of one Service changes; the partial sync that follows, against
#    the full one. Target: partial <= 5% of full. And the daemon's peak RSS (VmHWM).
# usage: [BACKENDS="nft legacy"] hack/bench-proxy.sh [N...]   (root; 10-15 minutes, most of it the bare --noflush restores on nft)
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root
ensure_packages

export LC_ALL=C # printf reads bc's decimal points
SIZES=("$@")
[ ${#SIZES[@]} -eq 0 ] && SIZES=(1000 5000 10000)
RSDN=$PWD/target/dist/rsdn
W=$(mktemp -d /tmp/rsdn-bench-proxy.XXXXXX)
NS=rsdn-bp
PID=
cleanup() {
  [ -z "$PID" ] || kill "$PID" 2>/dev/null || true
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$NS-" || true); do ip netns del "$ns"; done
  rm -rf "$W"
}
trap cleanup EXIT
hack/build.sh >/dev/null

# gen DIR N: a Node (n1), and N Services with one EndpointSlice of 10 endpoints each (on n2),
# in files of 100 Services so that one change re-reads one small file.
gen() {
  mkdir -p "$1"
  printf 'kind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.128.0.0/23}\nstatus: {addresses: [{type: InternalIP, address: 100.64.0.1}]}\n' >"$1/node.yaml"
  awk -v n="$2" -v dir="$1" 'BEGIN {
    for (i = 0; i < n; i++) {
      f = sprintf("%s/svc-%04d.yaml", dir, int(i / 100))
      printf("---\nkind: Service\nmetadata: {name: s%d, namespace: bench}\nspec:\n  clusterIP: 172.30.%d.%d\n  ports: [{name: http, port: 80}]\n", i, int(i / 250), i % 250 + 1) > f
      printf("---\nkind: EndpointSlice\nmetadata: {name: s%d-1, namespace: bench, labels: {kubernetes.io/service-name: s%d}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n", i, i) > f
      for (e = 0; e < 10; e++)
        printf("- {addresses: [10.%d.%d.%d], nodeName: n2}\n", 129 + e, int(i / 250), i % 250 + 1) > f
    }
  }'
}
fresh_ns() { # fresh_ns NAME: a namespace with an interface holding the node IP
  ip netns add "$1"
  ip -n "$1" link set lo up
  ip -n "$1" link add eth0 type veth peer name peer0
  ip -n "$1" addr add 100.64.0.1/10 dev eth0
  ip -n "$1" link set eth0 up
}
# synced LOG K: waits for the K-th "iptables synced" line; prints its key=value fields.
synced() {
  local deadline=$((SECONDS + 900))
  until [ "$(grep -c 'iptables synced' "$1")" -ge "$2" ]; do
    [ $SECONDS -ge $deadline ] && { echo "no sync #$2 in $1" >&2; tail "$1" >&2; return 1; }
    grep -q 'iptables sync failed' "$1" && { grep 'iptables sync failed' "$1" >&2; return 1; }
    sleep 0.1
  done
  grep 'iptables synced' "$1" | sed -n "$2p" | grep -oE '(full|lines|transactions|compute_ms|restore_ms|checks_ms)=[a-z0-9.]+' | tr '\n' ' '
}
field() { grep -oE "$1=[0-9a-z.]+" <<<"$2" | cut -d= -f2; }
add_ms() { echo "$*" | tr ' ' '+' | bc -l; }
now_ms() { date +%s%3N; }

printf '%-7s %6s %8s %5s | %10s %10s %9s %9s | %10s %8s | %9s %10s\n' backend N lines txs compute_ms restore_ms checks_ms compute% bare_ms rest/bare flush_ms sync/flush
for backend in ${BACKENDS:-nft legacy}; do
  for N in "${SIZES[@]}"; do
    dir=$W/cluster-$N
    [ -d "$dir" ] || gen "$dir" "$N"
    ns=$NS-$backend-$N
    fresh_ns "$ns"
    log=$W/rsdn-$backend-$N.log
    ip netns exec "$ns" "$RSDN" node --node-name n1 --cluster-network 10.128.0.0/14 --cluster-dir "$dir" \
      --cni-conf-dir "$W/net.d-$backend-$N" --iptables-backend "$backend" --resync-seconds 3600 >"$log" 2>&1 &
    PID=$!
    s=$(synced "$log" 1)
    compute=$(field compute_ms "$s"); restore=$(field restore_ms "$s"); lines=$(field lines "$s")
    checks=$(field checks_ms "$s"); total=$(add_ms "$compute" "$restore" "$checks")
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")

    # The identical payload, restored bare into a fresh namespace.
    "$RSDN" proxy render --node-name n1 --cluster-network 10.128.0.0/14 --cluster-dir "$dir" >"$W/payload"
    bare_ns=$NS-bare-$backend-$N
    ip netns add "$bare_ns"
    start=$(now_ms)
    ip netns exec "$bare_ns" "iptables-$backend-restore" --noflush --wait=5 <"$W/payload"
    bare=$(( $(now_ms) - start ))
    ip netns del "$bare_ns"
    ip netns add "$bare_ns"
    start=$(now_ms)
    ip netns exec "$bare_ns" "iptables-$backend-restore" --wait=5 <"$W/payload"
    flush=$(( $(now_ms) - start ))
    ip netns del "$bare_ns"
    printf '%-7s %6d %8d %5d | %10.1f %10.1f %9.1f %8.1f%% | %10d %8.2f | %9d %10.2f\n' "$backend" "$N" "$lines" "$(field transactions "$s")" "$compute" \
      "$restore" "$checks" "$(echo "100 * $compute / $restore" | bc -l)" "$bare" "$(echo "$restore / $bare" | bc -l)" \
      "$flush" "$(echo "$total / $flush" | bc -l)"

    if [ "$N" = "${SIZES[-1]}" ]; then
      # One endpoint of one Service changes: the partial sync that follows.
      f=$dir/svc-0000.yaml
      sed 's/- {addresses: \[10.129.0.1\]/- {addresses: [10.199.0.1]/' "$f" >"$dir/.tmp" && mv "$dir/.tmp" "$f"
      p=$(synced "$log" 2)
      pfull=$(add_ms "$(field compute_ms "$p")" "$(field restore_ms "$p")" "$(field checks_ms "$p")")
      echo "  $backend partial sync after one endpoint change at N=$N: $p-> ${pfull} ms vs full ${total} ms = $(printf '%.2f' "$(echo "100 * $pfull / $total" | bc -l)")% (target <= 5%)"
      echo "  $backend daemon peak RSS at N=$N: $((rss / 1024)) MiB (VmHWM after the full sync)"
      # Reading back for drift: the cost of one read of each table (iptables-save and the
      # comparison), and the period it implies (10 s at the least, else 100 times the cost: at
      # most 1% of one CPU).
      deadline=$((SECONDS + 300)); m=
      until grep -q 'rsdn_iptables_verify_duration_seconds_count{table="nat"} [1-9]' <<<"$m"; do
        [ $SECONDS -ge $deadline ] && break
        sleep 1
        m=$(ip netns exec "$ns" curl -sf http://127.0.0.1:10249/metrics || true)
      done
      for t in nat filter; do
        sum=$(awk -v k="rsdn_iptables_verify_duration_seconds_sum{table=\"$t\"}" '$1 == k {print $2}' <<<"$m")
        cnt=$(awk -v k="rsdn_iptables_verify_duration_seconds_count{table=\"$t\"}" '$1 == k {print $2}' <<<"$m")
        [ -n "$cnt" ] && [ "$cnt" != 0 ] && echo "  $backend read back of $t at N=$N: $(printf '%.0f' "$(echo "1000 * $sum / $cnt" | bc -l)") ms per read ($cnt reads); period $(printf '%.0f' "$(echo "s = 100 * $sum / $cnt; if (s < 10) s = 10; s" | bc -l)") s"
      done
      sed -i 's/- {addresses: \[10.199.0.1\]/- {addresses: [10.129.0.1]/' "$f"
      # The floor of any change to this table: a bare restore adding one chain of one rule.
      kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
      start=$(now_ms)
      printf '*nat\n:RSDN-BENCH-PROBE - [0:0]\n-A RSDN-BENCH-PROBE -j RETURN\nCOMMIT\n' |
        ip netns exec "$ns" "iptables-$backend-restore" --noflush --wait=5
      floor=$(( $(now_ms) - start ))
      echo "  $backend bare one-rule restore on the same table (the floor of any change): ${floor} ms"
    fi
    [ -n "$PID" ] && { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }
    ip netns del "$ns"
  done
done
