#!/usr/bin/env bash
# End-to-end tier for `rsdn trace`: on a 3-node lab, for each kind of flow (pod to pod on one
# node and across nodes, pod to a ClusterIP, an outside host to a NodePort with either traffic
# policy, a pod to the outside host, a flow a NetworkPolicy denies, a hairpin), the trace's
# prediction against what the kernel does. The oracle is the kernel's own tracing: a raw-table
# TRACE rule for TCP SYNs and `xtables-monitor --trace` on every node the flow crosses. Checked:
# the rules the trace names on a node (run there, reading its kernel) are the rules the SYN
# hit there, in order; the endpoint that answered is among the trace's; the verdict and the
# source address the server saw are the predicted ones. Then drift: a route, an FDB entry and
# a KUBE-SEP rule deleted by hand (the node's daemon stopped with SIGSTOP) are each flagged,
# and nothing is once the daemon runs again.
# Usage: tests/e2e/trace.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
# KEEP=DIR keeps the lab up afterwards and the traces, monitor logs and comparisons in DIR.
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=${KEEP:-$(mktemp -d /tmp/rsdn-trace-e2e.XXXXXX)}
source "$(dirname "$0")/lib.sh"
MONITORS=()
STOPPED=()
cleanup() {
  [ ${#MONITORS[@]} -gt 0 ] && kill "${MONITORS[@]}" 2>/dev/null
  [ ${#STOPPED[@]} -gt 0 ] && kill -CONT "${STOPPED[@]}" 2>/dev/null
  [ -n "${KEEP:-}" ] || lab_cleanup
}
trap cleanup EXIT
put() { cat >"$LAB/cluster/.$1.tmp" && mv "$LAB/cluster/.$1.tmp" "$LAB/cluster/$1.yaml"; }
# trace NODE SRC DST: rsdn trace on NODE (reading its kernel), as JSON.
trace() { local n=$1; shift; inns "$n" "$RSDN" trace --config "$LAB/$n/config.yaml" -o json "$@"; }

lab down >/dev/null 2>&1
start=$SECONDS
if ! lab up --nodes 3 --pods-per-node 0 >"$T/up.log" 2>&1; then
  cat "$T/up.log"; echo "trace: 0 passed, 1 failed"; exit 1
fi
lab ns add x >/dev/null && lab ns add locked >/dev/null
lab pod add x/a --node 1 --labels pod=a --port 8080/tcp --serve >/dev/null
lab pod add x/a2 --node 1 --labels pod=a2 --port 8080/tcp --serve >/dev/null
lab pod add x/b --node 2 --labels pod=b --port 8080/tcp --serve >/dev/null
lab pod add x/c --node 3 --labels pod=c --port 8080/tcp --serve >/dev/null
lab pod add locked/d --node 2 --labels pod=d --port 80/tcp --serve >/dev/null
A=$(pod_ip x/a); A2=$(pod_ip x/a2); B=$(pod_ip x/b); C=$(pod_ip x/c); D=$(pod_ip locked/d)
put policy <<'EOF'
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-c, namespace: locked}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}]
    ports: [{port: 80}]
EOF
service() { # service NAME IP NODEPORT|- "extra spec" ENDPOINT-POD...
  local name=$1 ip=$2 np=$3 extra=$4 list="" p; shift 4
  for p in "$@"; do list+="- {addresses: [$(pod_ip "$p")], nodeName: $(lab status --json | jq -r --arg p "$p" '.pods[] | select(.pod == $p) | .node')}"$'\n'; done
  { printf 'apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: x}\nspec:\n  clusterIP: %s\n%s' "$name" "$ip" "$extra"
    if [ "$np" = - ]; then printf '  ports: [{name: http, port: 80, targetPort: 8080}]\n'
    else printf '  type: NodePort\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: %s}]\n' "$np"; fi
    printf -- '---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: %s-1, namespace: x, labels: {kubernetes.io/service-name: %s}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n%s' "$name" "$name" "$list"
  } | put "svc-$name"
}
service web 172.30.0.10 30080 "" x/a2 x/b
service local 172.30.0.11 30081 "  externalTrafficPolicy: Local"$'\n' x/b
service self 172.30.0.12 - "  sessionAffinity: ClientIP"$'\n' x/a
ip netns exec "${NSP}ext" socat TCP-LISTEN:9000,fork,reuseaddr SYSTEM:'echo ext $SOCAT_PEERADDR' &
SERVERS+=($!)
programmed() { lab probe x/c 172.30.0.10 --port 80 >/dev/null && ! lab probe x/a "$D" --port 80 --timeout 0.3 >/dev/null; }
check "Services and the policy programmed" eventually 10 programmed

# oracle NODE...: every node's xtables-monitor --trace, with a raw TRACE rule for TCP SYNs.
oracle_start() {
  local n
  MONITORS=()
  for n in "$@"; do
    inns "$n" iptables -t raw -I PREROUTING -p tcp --syn -j TRACE
    # Not through inns (a function: $! would be a subshell's, not the monitor's).
    ip netns exec "$(netns_of "$n")" xtables-monitor --trace >"$T/xt-$n" 2>&1 &
    MONITORS+=($!)
  done
  sleep 0.4
}
oracle_stop() {
  local n
  sleep 0.3
  kill "${MONITORS[@]}" 2>/dev/null; wait "${MONITORS[@]}" 2>/dev/null; MONITORS=()
  for n in "$@"; do inns "$n" iptables -t raw -D PREROUTING -p tcp --syn -j TRACE; done
}
# hit FILE: the nat and filter rules the first SYN hit, "TABLE|-A CHAIN ...", in order. A packet
# is known by its IP ID and source port (the trace id changes on some hooks; a retransmitted SYN
# has another IP ID).
hit() {
  awk '/^PACKET:/ { k = ""; if ($0 ~ / SYN / && $0 !~ / ACK /) { match($0, / ID=[0-9]+ /); k = substr($0, RSTART, RLENGTH)
                      match($0, / SPORT=[0-9]+ /); k = k substr($0, RSTART, RLENGTH) }
                    if (k != "" && first == "") first = k; mine = (k != "" && k == first); next }
       /^ TRACE:/ && mine && / -A / {
         t = $0; sub(/.* -4 -t /, "", t); table = t; sub(/ .*/, "", table); sub(/^[a-z]+ /, "", t)
         if (table == "nat" || table == "filter") print table "|" t }' "$1"
}
# named FILE NODE [ENDPOINT]: the rules the trace in FILE names on NODE (the path to ENDPOINT).
named() {
  jq -r --arg n "$2" --arg ep "${3:-}" '.paths[] | select($ep == "" or .endpoint == $ep) | .hops[]
    | select(.node == $n) | .rules[]? | "\(.table)|\(.kernel // ("(not checked) " + .rule))"' "$1"
}

# flow NAME FROM TO-FOR-PROBE PORT TRACE-SRC TRACE-DST EXPECT NODES...: the trace on each node,
# then one connection under the oracle, compared. EXPECT: a REGEX of the answer, or "blocked".
flow() {
  local name=$1 from=$2 to=$3 port=$4 src=$5 dst=$6 expect=$7; shift 7
  local nodes=("$@") n answer ep="" seen
  # The prediction comes first: the connection changes state (affinity's recent lists).
  for n in "${nodes[@]}"; do trace "$n" "$src" "$dst" >"$T/trace-$n.json"; done
  oracle_start "${nodes[@]}"
  answer=$(lab probe "$from" "$to" --port "$port" --json --timeout 1 | jq -r '.answer // ""')
  oracle_stop "${nodes[@]}"
  local first=$T/trace-${nodes[0]}.json
  if [ "$expect" = blocked ]; then
    check "$name: no answer (blocked)" test -z "$answer"
  else
    check "$name: answered as expected ($answer)" grep -Eq "$expect" <<<"$answer"
    # The endpoint that answered is one the trace lists.
    local pod_ip_port
    pod_ip_port="$(pod_ip "${answer%% *}"):$( [ "$port" = 9000 ] && echo 9000 || echo 8080)"
    if [ "$(jq '.paths | length' "$first")" -gt 1 ]; then
      ep=$pod_ip_port
      check "$name: the endpoint that answered ($ep) is among the trace's" \
        jq -e --arg ep "$ep" '[.paths[].endpoint] | index($ep) != null' "$first"
    fi
  fi
  for n in "${nodes[@]}"; do
    hit "$T/xt-$n" >"$T/hit-$n"
    named "$T/trace-$n.json" "$n" "$ep" >"$T/named-$n"
    check "$name: the rules the trace names on $n are the rules the packet hit ($(wc -l <"$T/hit-$n") rules)" \
      diff "$T/named-$n" "$T/hit-$n"
  done
  local verdict
  verdict=$(jq -r --arg ep "$ep" '[.paths[] | select($ep == "" or .endpoint == $ep)][0].verdict' "$first")
  if [ "$expect" = blocked ]; then
    check "$name: the trace predicts it is dropped" test "$verdict" = dropped
  else
    seen=$(jq -r --arg ep "$ep" '[.paths[] | select($ep == "" or .endpoint == $ep)][0].seen_source' "$first")
    check "$name: delivered, and the server saw the predicted source (${seen%%:*})" \
      eval "[ '$verdict' = delivered ] && [ '${answer#* }' = '${seen%%:*}' ]"
  fi
  check "$name: no drift on any node" eval "! grep -l '\"drift\": true' $T/trace-*.json"
  rm -f "$T"/trace-*.json
}

flow "pod to pod, one node" x/a "$A2" 8080 x/a "$A2:8080" "^x/a2 $A\$" node1
flow "pod to pod, across nodes" x/a "$B" 8080 x/a "$B:8080" "^x/b $A\$" node1 node2
flow "pod to ClusterIP" x/c 172.30.0.10 80 x/c x/web:http "^x/(a2|b) $C\$" node3 node1 node2
flow "outside host to NodePort (Cluster policy)" ext 192.168.77.13 30080 192.168.77.250 node:node3:30080 \
  '^x/(a2|b) 10\.128\.4\.0$' node3 node1 node2
flow "outside host to NodePort (Local policy, local endpoint)" ext 192.168.77.12 30081 192.168.77.250 \
  node:node2:30081 '^x/b 192\.168\.77\.250$' node2
flow "outside host to NodePort (Local policy, no local endpoint)" ext 192.168.77.13 30081 192.168.77.250 \
  node:node3:30081 blocked node3
flow "pod to the outside host" x/b 192.168.77.250 9000 x/b 192.168.77.250:9000 '^ext 192\.168\.77\.12$' node2
flow "a flow the NetworkPolicy denies" x/a "$D" 80 x/a "$D:80" blocked node1 node2
flow "hairpin through a Service (ClientIP affinity)" x/a 172.30.0.12 80 x/a x/self:http '^x/a 10\.128\.0\.1$' node1
# The denied flow names the policy that isolates the pod.
trace node2 x/a "$D:80" >"$T/deny.json"
check "the denied flow names the isolating policy and the DROP" \
  jq -e '[.paths[0].hops[].lines[]?] | any(test("locked/d is isolated for ingress by locked/only-c; nothing allows this"))' "$T/deny.json"

# Drift, with node1's daemon stopped (it repairs drift within seconds).
P1=$(cat "$LAB/node1/rsdn.pid")
kill -STOP "$P1"; STOPPED=("$P1")
drift_at() { # drift_at STAGE SRC DST: the trace on node1 exits 1 and flags a hop of STAGE
  local rc=0
  trace node1 "$2" "$3" >"$T/drift.json" || rc=$?
  [ "$rc" -eq 1 ] && jq -e --arg s "$1" '[.paths[].hops[] | select(.node == "node1" and .status == "drift" and .stage == $s)] | length > 0' "$T/drift.json" >/dev/null
}
inns node1 ip route del 10.128.2.0/23
check "a deleted route: the route hop is flagged, model and kernel shown" drift_at route x/a "$B:8080"
check "the route drift shows the model's route and the kernel's" \
  jq -e '[.paths[0].hops[].drift[]?] | any((.model | any(test("10.128.2.0/23 via 10.128.2.0 dev vxlan0 onlink"))) and (.kernel | length > 0))' "$T/drift.json"
inns node1 ip route replace 10.128.2.0/23 via 10.128.2.0 dev vxlan0 onlink src 10.128.0.1 proto 212
inns node1 bridge fdb del 0a:58:c0:a8:4d:0c dev vxlan0 dst 192.168.77.12
check "a deleted FDB entry: the vxlan0 hop is flagged" drift_at vxlan0 x/a "$B:8080"
check "the kernel's outcome is named: lost for want of the FDB entry" \
  jq -e '.paths[0].kernel | test("no FDB entry for 0a:58:c0:a8:4d:0c")' "$T/drift.json"
inns node1 bridge fdb append 0a:58:c0:a8:4d:0c dev vxlan0 dst 192.168.77.12 self permanent
sep=$(inns node1 iptables -t nat -S | grep -F 'x/web:http" -m tcp -j DNAT --to-destination '"$B:8080")
eval inns node1 iptables -t nat -D "${sep#-A }"
check "a deleted KUBE-SEP rule: the nat hop of that endpoint's path is flagged" drift_at "nat PREROUTING" x/a x/web:http
check "only the path of the endpoint whose DNAT is gone drifts" \
  jq -e --arg ep "$B:8080" '[.paths[] | select(any(.hops[]; .status == "drift")) | .endpoint] == [$ep]' "$T/drift.json"
kill -CONT "$P1"; STOPPED=()
clean() { trace node1 x/a x/web:http >/dev/null && trace node1 x/a "$B:8080" >/dev/null; }
check "the daemon repairs it all and the trace flags nothing" eventually 40 clean

# Offline: the same prediction without a kernel.
check "offline prediction from the cluster directory alone" \
  eval "'$RSDN' trace --cluster-dir '$LAB/cluster' --node-name node1 x/a x/web:http --offline | grep -q 'predicted from the model'"
echo "($((SECONDS - start)) s)"
summary trace
