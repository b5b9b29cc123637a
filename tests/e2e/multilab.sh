#!/usr/bin/env bash
# End-to-end tier for the lab itself: two labs side by side, named $RSDN_LAB and $RSDN_LAB-b (a
# name that extends the first at a '-', the dangerous case for teardown by prefix), brought up
# at once and torn down independently in both orders; `lab up` failing on a pod detached from
# tun0, a pod without its address and a pod that cannot reach its gateway, naming each; `lab
# matrix` with a node cut off finishing within its bound and naming every broken pair; the
# reachability truth tables of 4 pods on 2 nodes all connected (no policies), within seconds.
# Usage: tests/e2e/multilab.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=$(mktemp -d /tmp/rsdn-multilab-e2e.XXXXXX)
source "$(dirname "$0")/lib.sh"
A=$RSDN_LAB
B=$RSDN_LAB-b
labA() { RSDN_LAB=$A "$RSDN" lab "$@"; }
labB() { RSDN_LAB=$B "$RSDN" lab "$@"; }
cleanup() { labB down >/dev/null 2>&1; lab_cleanup; }
trap cleanup EXIT
ms() { date +%s%3N; }
count() { lab_namespaces "$1" | wc -l; }
daemons_of() { pgrep -f "node --config /run/$1/" | wc -l; }

labA down >/dev/null 2>&1
labB down >/dev/null 2>&1
labA up --nodes 2 --pods-per-node 2 >"$T/upA.log" 2>&1 &
upA=$!
labB up --nodes 2 --pods-per-node 1 >"$T/upB.log" 2>&1 &
upB=$!
if ! wait $upA || ! wait $upB; then
  cat "$T/upA.log" "$T/upB.log"; echo "multilab: 0 passed, 1 failed"; exit 1
fi

check "two labs up at once: $A has 8 namespaces and 2 daemons, $B 6 and 2" eval \
  '[ "$(count "$A")" = 8 ] && [ "$(count "$B")" = 6 ] && [ "$(daemons_of "$A")" = 2 ] && [ "$(daemons_of "$B")" = 2 ]'
own_status() { # own_status LAB: its status names its own namespaces and state directory
  RSDN_LAB=$1 "$RSDN" lab status --json | tee /dev/stderr | jq -e --arg l "$1" \
    '.lab == $l and .stateDir == "/run/\($l)" and .nodes[0].namespace == "\($l)-node1" and
     (.pods | all(.namespace | startswith("\($l)-node"))) and
     ([.pods[].name] | index("node1-pod1") != null)'
}
check "each lab's status is its own" eval 'own_status "$A" && own_status "$B"'
check "matrix in $A" labA matrix
check "matrix in $B" labB matrix

# 4 pods on 2 nodes, every one serving ports 80 and 81 (TCP and UDP): with no policies, the
# truth tables are all connected.
labA ns add x --labels ns=x >/dev/null
labA ns add y --labels ns=y >/dev/null
add() { labA pod add "$1" --node "$2" --labels "pod=${1#*/}" --port 80 --port 81 --serve >>"$T/pods.log" 2>&1; }
add x/a 1 && add x/b 2 && add y/a 1 && add y/b 2 || cat "$T/pods.log"
PODS="x/a x/b y/a y/b"
for t in 80/TCP 80/UDP 81/TCP 81/UDP; do
  echo "$t $PODS"
  for f in $PODS; do echo "$f . . . ."; done
  echo
done >"$T/all.txt"
start=$(ms)
labA reach -n x,y --ports 80,81 --expect "$T/all.txt" >"$T/reach.log" 2>&1
rc=$?
took=$(( $(ms) - start ))
cat "$T/reach.log"
check "reach: 4 x 4 pods x 2 ports x 2 protocols all connected (no policies), in ${took} ms (< 5 s)" \
  eval "[ $rc = 0 ] && [ $took -lt 5000 ]"

# A node cut off from the underlay: the matrix ends within its bound (--timeout 1 s + 4 s)
# and names every broken pair and what failed.
ip -n "$B-node2" link set eth0 down
start=$(ms)
labB matrix >"$T/cut.log" 2>&1
rc=$?
took=$(( $(ms) - start ))
cat "$T/cut.log"
check "$B with node2 cut off: the matrix fails in ${took} ms (bound 5000)" eval "[ $rc != 0 ] && [ $took -lt 5000 ]"
names_pairs() {
  [ "$(grep -c '^BROKEN' "$T/cut.log")" = 2 ] &&
  grep -q "^BROKEN node1-pod1 -> node2-pod1 (.*): ping (no reply), TCP (timeout), UDP (no answer)" "$T/cut.log" &&
  grep -q "^BROKEN node2-pod1 -> node1-pod1 (.*): ping (no reply), TCP (timeout), UDP (no answer)" "$T/cut.log"
}
check "the matrix names both broken pairs and ping, TCP and UDP for each" names_pairs
check "$A is unaffected by $B's broken node" labA matrix
ip -n "$B-node2" link set eth0 up
ip -n "$B-node2" route add default via 192.168.77.250
check "$B whole again: matrix" eventually 5 labB matrix

# `lab up` checks every pod. A pod detached from tun0 while its daemon is stopped (a running
# daemon puts it back at once):
veth=$(labA status --json | jq -r '.pods[] | select(.name == "node2-pod1") | .hostVeth')
dpid=$(cat "$LAB/node2/rsdn.pid")
kill -STOP "$dpid"
ip -n "${NSP}node2" link set "$veth" nomaster
labA up --nodes 2 --pods-per-node 2 >"$T/up-detached.log" 2>&1
rc=$?
kill -CONT "$dpid"
cat "$T/up-detached.log"
check "lab up fails on a detached pod, naming it and why" eval "[ $rc != 0 ] &&
  grep -q 'pod default/node2-pod1 (network namespace ${NSP}node2-pod1, node2): host veth $veth is not a port of tun0' $T/up-detached.log &&
  [ \$(grep -c '^  pod ' $T/up-detached.log) = 1 ]"
check "the daemon, running again, re-attaches it: lab up passes" eventually 10 labA up --nodes 2 --pods-per-node 2

# A pod whose address was removed:
xb=$(pod_ip x/b)
inns x/b ip addr flush dev eth0
labA up --nodes 2 --pods-per-node 2 >"$T/up-noaddr.log" 2>&1
rc=$?
cat "$T/up-noaddr.log"
check "lab up fails on a pod without its address, naming it" eval "[ $rc != 0 ] &&
  grep -q 'pod x/b (network namespace ${NSP}pod.x.b, node2): its eth0 does not have its address $xb (it has: none)' $T/up-noaddr.log"
inns x/b ip addr add "$xb/23" dev eth0
inns x/b ip route add default via 10.128.2.1

# A pod that cannot reach its gateway (everything it sends dropped in its own namespace):
inns node1-pod2 iptables -A OUTPUT -j DROP
labA up --nodes 2 --pods-per-node 2 >"$T/up-unreach.log" 2>&1
rc=$?
inns node1-pod2 iptables -D OUTPUT -j DROP
cat "$T/up-unreach.log"
check "lab up fails on a pod that cannot ping its gateway, naming it" eval "[ $rc != 0 ] &&
  grep -q 'pod default/node1-pod2 (.*): cannot ping its gateway 10.128.0.1' $T/up-unreach.log"
check "repaired: lab up passes" labA up --nodes 2 --pods-per-node 2

# Teardown, each lab on its own: $B first (nothing of $A goes), then $B again and $A (whose name
# is a prefix of $B's: nothing of $B goes).
labB down >"$T/downB.log" 2>&1
check "$B down: none of its namespaces, state or daemons left ($(cat "$T/downB.log"))" eval \
  '[ "$(count "$B")" = 0 ] && [ ! -d "/run/$B" ] && [ "$(daemons_of "$B")" = 0 ]'
a_whole() {
  [ "$(count "$A")" = 12 ] && [ -d "$LAB/cluster" ] && [ "$(daemons_of "$A")" = 2 ] &&
    [ "$(labA status --json | jq '[.pods[] | select(.serving)] | length')" = 4 ] && labA matrix >/dev/null
}
check "$B down left $A whole (namespaces, daemons, pod servers, matrix)" a_whole
labB up --nodes 1 --pods-per-node 1 >"$T/upB2.log" 2>&1 || cat "$T/upB2.log"
servers=$(cat "$LAB"/pods/*.serve.pid)
labA down >"$T/downA.log" 2>&1
# running PID: exists and is not a zombie
running() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }
none_running() { for p in "$@"; do running "$p" && return 1; done; return 0; }
check "$A down: none of its namespaces, state, daemons or pod servers left ($(cat "$T/downA.log"))" eval \
  '[ "$(count "$A")" = 0 ] && [ ! -d "$LAB" ] && [ "$(daemons_of "$A")" = 0 ] && none_running $servers'
check "$A down left $B whole (4 namespaces, its daemon, its status)" eval \
  '[ "$(count "$B")" = 4 ] && [ "$(daemons_of "$B")" = 1 ] && labB status >/dev/null'
labB down >/dev/null 2>&1

summary multilab
