#!/usr/bin/env bash
# End-to-end tier for NetworkPolicy, the way the upstream Kubernetes suite
# (test/e2e/network/netpol) tests it: a 3-node lab, namespaces x, y, z with pods a, b, c each
# (a on node1, b on node2, c on node3: same-node and cross-node paths), every pod serving TCP
# and UDP on ports 80 and 81 as named container ports (serve-80-tcp, ...). Each case writes
# policies into the cluster directory and compares the whole 9 x 9 reachability matrix, per
# port and protocol (4 truth tables, 324 probes), with the tables a rule predicts: every case
# states its expectation as a predicate `allowed FROM TO PORT PROTO`, and `tables` turns it
# into truth tables (a pod always reaches itself: loopback never leaves the pod, the upstream
# suite's AllowLoopback). Policies take effect within a second; each comparison is retried for
# up to $BOUND seconds (eventually) before it fails, and then prints the expected and observed
# tables that differ. Between cases every policy is deleted and the matrix must be all open
# again, so no case can pass on the state the previous one left.
# Usage: tests/e2e/policy.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
# POLICY_E2E_DUMP=DIR keeps each node's iptables-save and ipset list of every failed case there.
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=$(mktemp -d /tmp/rsdn-policy-e2e.XXXXXX)
source "$(dirname "$0")/lib.sh"
trap lab_cleanup EXIT
exec 3>&1   # the tables of a failed case go here, whole (check shows only a log's tail)
BOUND=5     # seconds a policy change may take to show in the tables
CLUSTER_NET=10.128.0.0/14   # the lab's cluster network (every pod address is in it)
ms() { date +%s%3N; }
put() { cat >"$LAB/cluster/.$1.tmp" && mv "$LAB/cluster/.$1.tmp" "$LAB/cluster/$1.yaml"; }
policy() { # policy NAMESPACE NAME < SPEC: a NetworkPolicy (SPEC: the lines under spec:, indented 2)
  { printf 'apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: %s, namespace: %s}\nspec:\n' "$2" "$1"
    cat
  } | put "np-$1-$2"
}
deny() { # deny NS Ingress|Egress: isolate every pod of NS in that direction, allowing nothing
  printf '  podSelector: {}\n  policyTypes: [%s]\n' "$2" | policy "$1" "deny-${2,,}"
}
unpolicy() { rm -f "$LAB/cluster/np-$1-$2.yaml"; }
pods() { lab status --json | jq -r '[.pods[].pod] | sort | .[]' | tr '\n' ' '; }
in_ns() { [ "${2%/*}" = "$1" ]; }   # in_ns NS POD

# tables ROWS COLS: the four truth tables (80/TCP 80/UDP 81/TCP 81/UDP) the current `allowed`
# predicts, clients ROWS, servers COLS, in the text `lab reach --expect` reads.
tables() {
  local t f to w=6 c   # w: the first column's width (titles and pod names); cells as wide as their column's name
  for f in $1; do [ ${#f} -gt $w ] && w=${#f}; done
  for t in 80/TCP 80/UDP 81/TCP 81/UDP; do
    printf '%-*s' $w "$t"; printf ' %s' $2; echo
    for f in $1; do
      printf '%-*s' $w "$f"
      for to in $2; do
        c=X; if [ "$f" = "$to" ] || allowed "$f" "$to" "${t%/*}" "${t#*/}"; then c=.; fi
        printf ' %-*s' ${#to} $c
      done
      echo
    done | sed 's/ *$//'
    echo
  done
}
# block FILE TITLE ROWS: one table (its title line and ROWS lines)
block() { awk -v t="$2" -v n="$3" '$1 == t {on = 1} on && c++ <= n' "$1"; }
# show_mismatch: the expected and observed tables that differ, side by side, and the cells.
show_mismatch() {
  local t rows
  rows=$(pods | wc -w)
  for t in $(grep -o '^MISMATCH [0-9]*/[A-Z]*' "$T/reach.out" | sort -u | cut -d' ' -f2); do
    printf '     %-44s %s\n' expected observed
    paste -d'\n' <(block "$T/expected.txt" "$t" "$rows") <(block "$T/reach.out" "$t" "$rows") |
      awk 'NR % 2 {e = $0; next} {printf "     %-44s %s\n", e, $0}'
  done
  grep '^MISMATCH' "$T/reach.out" | head -20 | sed 's/^/     /'
  dump
}
n_dump=0
dump() { # each node's filter table and sets, when POLICY_E2E_DUMP names a directory
  [ -n "${POLICY_E2E_DUMP:-}" ] || return 0
  n_dump=$((n_dump + 1)); mkdir -p "$POLICY_E2E_DUMP"
  for n in node1 node2 node3; do
    { inns "$n" iptables-save -t filter; inns "$n" ipset list; } >"$POLICY_E2E_DUMP/$n_dump-$n.txt" 2>&1
    cp "$LAB/$n/rsdn.log" "$POLICY_E2E_DUMP/$n_dump-$n.log"
  done
  ls "$LAB/cluster" >"$POLICY_E2E_DUMP/$n_dump-cluster.txt"; cat "$LAB"/cluster/np-*.yaml >>"$POLICY_E2E_DUMP/$n_dump-cluster.txt" 2>/dev/null
  echo "     (nodes' rules, sets and logs in $POLICY_E2E_DUMP/$n_dump-*)"
}
reach_once() { # reach_once [lab reach options]: one run against $T/expected.txt
  RUST_BACKTRACE=0 lab reach -n x,y,z --ports 80,81 --expect "$T/expected.txt" "$@" >"$T/reach.out" 2>&1
}
# expect NAME: the tables `allowed` predicts, eventually (bound $BOUND s); the check
# names how long they took to appear.
expect() {
  local name=$1 all start
  all=$(pods)
  tables "$all" "$all" >"$T/expected.txt"
  start=$(ms)
  until reach_once; do
    if [ $(( $(ms) - start )) -ge $((BOUND * 1000)) ]; then
      check "$name (bound $BOUND s)" false; show_mismatch >&3; return
    fi
    sleep 0.1
  done
  check "$name: as expected in $(( $(ms) - start )) ms (bound $BOUND s)" true
}
# reset: no policy left, and the matrix all open again (counted only when it is not).
reset() {
  rm -f "$LAB"/cluster/np-*.yaml
  allowed() { true; }
  tables "$(pods)" "$(pods)" >"$T/expected.txt"
  if ! eventually "$BOUND" reach_once; then check "every policy deleted: all open again" false; show_mismatch >&3; fi
}

lab down >/dev/null 2>&1
if ! lab up --nodes 3 --pods-per-node 0 >"$T/up.log" 2>&1; then
  cat "$T/up.log"; echo "policy: 0 passed, 1 failed"; exit 1
fi
for ns in x y z; do lab ns add "$ns" --labels "ns=$ns" >>"$T/add.log" 2>&1; done
netpol_pods >>"$T/add.log" 2>&1
setup_ok() {
  lab status --json | jq -e '([.pods[] | select(.serving) | "\(.pod) \(.node) \([.ports[].name] | join(","))"] | sort) ==
    (["x/a node1", "x/b node2", "x/c node3", "y/a node1", "y/b node2", "y/c node3", "z/a node1", "z/b node2", "z/c node3"]
    | map(. + " serve-80-tcp,serve-80-udp,serve-81-tcp,serve-81-udp"))' >/dev/null
}
if ! setup_ok; then cat "$T/add.log"; fi
check "setup: 9 pods (x, y, z / a, b, c on node1-3) serving 80 and 81, TCP and UDP, as named ports" setup_ok
reset
allowed() { true; }
expect "no policy: all 324 probes connected"

# 1. Ingress isolation of a whole namespace.
deny x Ingress
allowed() { ! in_ns x "$2"; }
expect "1 default deny ingress in x: nothing reaches x's pods, x's pods reach the rest"
reset

# 2. Egress isolation of a whole namespace.
deny x Egress
allowed() { ! in_ns x "$1"; }
expect "2 default deny egress in x: x's pods reach nothing, the rest reach them"
reset

# 3. A pod selector in the policy's own namespace, on top of deny-all.
deny x Ingress
policy x a-from-b <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
EOF
allowed() { ! in_ns x "$2" || { [ "$2" = x/a ] && [ "$1" = x/b ]; }; }
expect "3 deny-all ingress in x plus x/a from pod=b: only x/b reaches x/a (not y/b, z/b)"
reset

# 4. A namespaceSelector with matchExpressions.
policy x from-y-z <<'EOF'
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y, z]}]
EOF
allowed() { ! in_ns x "$2" || ! in_ns x "$1"; }
expect "4 namespaceSelector kubernetes.io/metadata.name In [y, z]: y and z reach x, x's pods not each other"
reset

# 5. Both selectors in one peer (AND) versus two peers (OR).
policy x and <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: c}}
EOF
allowed() { [ "$2" != x/a ] || [ "$1" = y/c ]; }
expect "5a one peer with namespaceSelector ns=y and podSelector pod=c: only y/c reaches x/a"
reset
policy x or <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: c}}
EOF
allowed() { [ "$2" != x/a ] || in_ns y "$1" || [ "$1" = x/c ]; }
expect "5b two peers, namespaceSelector ns=y or podSelector pod=c: y's pods and x/c reach x/a (not z/c)"
reset

# 6. ipBlock with except, from the pods' addresses.
yb=$(pod_ip y/b)
node2_net=$(lab status --json | jq -r '.nodes[] | select(.name == "node2") | .subnet')
policy x block-in <<EOF
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{ipBlock: {cidr: $CLUSTER_NET, except: [$yb/32]}}]
EOF
allowed() { [ "$2" != x/a ] || [ "$1" != y/b ]; }
expect "6a ingress ipBlock $CLUSTER_NET except $yb/32 (y/b): all but y/b reach x/a"
reset
policy x block-out <<EOF
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: $node2_net, except: [$yb/32]}}]
EOF
allowed() { ! in_ns x "$1" || { [ "${2#*/}" = b ] && [ "$2" != y/b ]; }; }
expect "6b egress ipBlock $node2_net (node2's pods) except $yb/32 (y/b): x's pods reach x/b and z/b only"
reset

# 7. A named port: resolved on the server pod for ingress, on the destination pods for egress.
policy x named-in <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: serve-81-tcp}]
EOF
allowed() { [ "$2" != x/a ] || [ "$3/$4" = 81/TCP ]; }
expect "7a ingress to x/a on port serve-81-tcp: 81/TCP open, 80 and UDP closed"
reset
policy x named-out <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: serve-81-tcp}]
  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]
    ports: [{port: serve-80-udp, protocol: UDP}]
EOF
allowed() { [ "$1" != x/a ] || { in_ns y "$2" && [ "$3/$4" = 81/TCP ]; } || { in_ns z "$2" && [ "$3/$4" = 80/UDP ]; }; }
expect "7b egress from x/a: to y's pods on serve-81-tcp, to z's on serve-80-udp: only those (81/TCP to y, 80/UDP to z)"
reset

# 8. Port ranges (endPort).
policy x range-a <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{protocol: TCP, port: 80, endPort: 81}]
EOF
policy x range-b <<'EOF'
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - ports: [{protocol: TCP, port: 81, endPort: 90}, {protocol: UDP, port: 70, endPort: 80}]
EOF
allowed() {
  case $2 in
    x/a) [ "$4" = TCP ] ;;
    x/b) [ "$3/$4" = 81/TCP ] || [ "$3/$4" = 80/UDP ] ;;
    *) true ;;
  esac
}
expect "8 endPort: x/a TCP 80-81 open, UDP closed; x/b TCP 81-90 and UDP 70-80: 81/TCP and 80/UDP only"
reset

# 9. Policies add up.
policy x from-yb <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]
EOF
policy x from-zc <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchLabels: {pod: c}}}]}]
EOF
allowed() { [ "$2" != x/a ] || [ "$1" = y/b ] || [ "$1" = z/c ]; }
expect "9 two policies on x/a, one allowing y/b, one z/c: both reach it, nobody else"
reset

# 10. The client's egress isolation wins over the server's ingress allow.
policy x from-yb-zb <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - {namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}
    - {namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchLabels: {pod: b}}}
EOF
deny y Egress
allowed() { ! in_ns y "$1" && { [ "$2" != x/a ] || [ "$1" = z/b ]; }; }
expect "10 x/a allows y/b and z/b, y denies egress: z/b reaches x/a, y/b does not"
reset

# 11. A policy updated (a rule added), then deleted.
policy x grow <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
EOF
allowed() { [ "$2" != x/a ] || [ "$1" = x/b ]; }
expect "11a policy created: only x/b reaches x/a"
policy x grow <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
  - from: [{namespaceSelector: {matchLabels: {ns: z}}}]
    ports: [{port: 80, protocol: UDP}]
EOF
allowed() { [ "$2" != x/a ] || [ "$1" = x/b ] || { in_ns z "$1" && [ "$3/$4" = 80/UDP ]; }; }
expect "11b rule added (z's pods on 80/UDP): takes effect"
unpolicy x grow
allowed() { true; }
expect "11c policy deleted: all open again"
reset

# 12. Relabelling: the selected pod, then a peer, into and out of the selectors.
policy x locked <<'EOF'
  podSelector: {matchLabels: {role: locked}}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: friend}}}]
EOF
lab pod label x/b role=locked >/dev/null
allowed() { [ "$2" != x/b ]; }
expect "12a x/b relabelled role=locked (selected): isolated, nobody reaches it"
lab pod label z/c role=friend >/dev/null
allowed() { [ "$2" != x/b ] || [ "$1" = z/c ]; }
expect "12b z/c relabelled role=friend (a peer): z/c reaches x/b"
lab pod label z/c role- >/dev/null
allowed() { [ "$2" != x/b ]; }
expect "12c z/c's role removed (out of the peer): z/c no longer reaches x/b"
lab pod label x/b role- >/dev/null
allowed() { true; }
expect "12d x/b's role removed (no longer selected): all open"
reset

# 13. A pod created after the policy that selects it; a namespace relabelled into a
# namespaceSelector. "At once": the very first probes after `lab pod add --serve` returns (the
# pod Running and serving), no retry. The Pod object is written after CNI ADD, so the address
# works some tens of ms before the node has the pod in its isolated set (measured: ~60 ms after
# `lab pod add` without --serve), a window the API allows ("that pod may be started
# unprotected"); the servers' start-up covers it here.
policy x new-pod <<'EOF'
  podSelector: {matchLabels: {pod: d}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
EOF
sleep 1   # the policy (selecting no pod yet) reaches every node first
lab pod add x/d --node 2 --labels pod=d --port 80 --port 81 --serve >>"$T/add.log" 2>&1
allowed() { [ "$2" != x/d ]; }
tables "$(pods)" x/d >"$T/expected.txt"
if reach_once --to x/d; then
  check "13a x/d added (node2) after a policy selecting pod=d: isolated from its first probes" true
else
  check "13a x/d added (node2) after a policy selecting pod=d: isolated from its first probes" false; show_mismatch >&3
fi
lab ns label z team=blue >/dev/null
allowed() { [ "$2" != x/d ] || in_ns z "$1"; }
expect "13b namespace z relabelled team=blue: z's pods reach x/d (10 x 10 pods)"
lab ns label z team- >/dev/null
lab pod del x/d >/dev/null
reset

# 14. Through a Service: the policies of both ends judge the client and the endpoint after
# DNAT. x/a (the endpoint) admits y's and z's pods; y may send nothing; z may send only to x/a
# (a pod peer: it matches only if egress is judged on the endpoint, not the ClusterIP).
printf 'apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec:\n  clusterIP: 172.30.0.80\n  ports: [{name: http, port: 80, targetPort: 80}]\n' | put svc-web
printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 80}]\nendpoints:\n- {addresses: [%s], nodeName: node1}\n' \
  "$(pod_ip x/a)" | put eps-web
policy x a-from-y-z <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}, {namespaceSelector: {matchLabels: {ns: z}}}]
EOF
deny y Egress
policy z to-xa <<'EOF'
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]
EOF
allowed() {
  { [ "$2" != x/a ] || in_ns y "$1" || in_ns z "$1"; } && ! in_ns y "$1" && { ! in_ns z "$1" || [ "$2" = x/a ]; }
}
expect "14a x/a admits y and z, y denies egress, z sends only to x/a: the matrix"
# via_service: every other pod probes the ClusterIP; connected exactly when `allowed` to x/a.
via_service() {
  local c bad=0
  for c in $(pods); do
    [ "$c" = x/a ] && continue
    lab probe "$c" 172.30.0.80 --port 80 >"$T/svc.$(tr / . <<<"$c")" 2>&1 &
  done
  wait
  for c in $(pods); do
    [ "$c" = x/a ] && continue
    if allowed "$c" x/a 80 TCP; then
      grep -q ': connected' "$T/svc.$(tr / . <<<"$c")" || { echo "$c -> 172.30.0.80 (x/a): expected connected"; bad=1; }
    else
      grep -q 'not connected' "$T/svc.$(tr / . <<<"$c")" || { echo "$c -> 172.30.0.80 (x/a): expected blocked"; bad=1; }
    fi
    cat "$T/svc.$(tr / . <<<"$c")"
  done
  return $bad
}
check "14b ClusterIP 172.30.0.80 -> x/a: z's pods (x/a admits z, z may send to x/a) connect; x's (not admitted) and y's (egress denied) do not" \
  eventually "$BOUND" via_service
rm -f "$LAB/cluster/svc-web.yaml" "$LAB/cluster/eps-web.yaml"
reset

# 15. Nodes reaching isolated pods (kubelet's probes). Policies are enforced in FORWARD: a
# node's own traffic to the pods on it leaves through OUTPUT onto tun0 and is never judged
# (as Kubernetes requires: traffic between a node and its pods is always allowed), while a
# remote node's traffic reaches the pod over the overlay, is forwarded by the pod's node and is
# judged like any other source (its source address, the remote node's tun0 address, is no pod
# any peer selects: blocked under deny-all).
deny x Ingress
node_probes() {
  ! lab probe node2 x/a --port 80 && ! lab probe node1 x/b --port 80 &&
    lab probe node1 x/a --port 80 && lab probe node1 x/a --port 81 --protocol udp &&
    lab probe node2 x/b --port 80 && lab probe node2 x/b --port 81 --protocol udp
}
check "15 deny-all ingress in x: node1 reaches x/a and node2 x/b (their own pods), node2 -> x/a and node1 -> x/b blocked" \
  eventually "$BOUND" node_probes
reset

# 16. A policy with an invalid rule fails closed: the broken rule (first) opens nothing, the
# valid one (second) still allows, x/a stays isolated; the daemons say why, once.
cat >"$T/half-broken" <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{ipBlock: {cidr: 10.128.0.0/33}}]
  - from: [{podSelector: {matchLabels: {pod: b}}}]
EOF
policy x half-broken <"$T/half-broken"
allowed() { [ "$2" != x/a ] || [ "$1" = x/b ]; }
expect "16a ingress rule 0's ipBlock cidr does not parse: rule 1 (pod=b) allows x/b, nobody else reaches x/a"
said() { grep 'skipping invalid object' "$LAB/$1/rsdn.log" | grep 'NetworkPolicy/x/half-broken' | grep -c 'ingress rule 0 peer 0 left out: ipBlock cidr'; }
lab pod label z/c touched=yes >/dev/null   # a rebuild of the model must not log it again
sleep 2
said_once() { for n in node1 node2 node3; do [ "$(said $n)" = 1 ] || { echo "$n: $(said $n) lines"; return 1; }; done; }
check "16b every daemon logs once why rule 0 was left out (cidr 10.128.0.0/33), also after a rebuild" said_once
lab pod label z/c touched- >/dev/null

reset

# 17. One policy isolating both directions (upstream: Ingress, Egress specified together).
policy x both <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
  egress: [{to: [{namespaceSelector: {matchLabels: {ns: z}}}]}]
EOF
allowed() { { [ "$2" != x/a ] || in_ns y "$1"; } && { [ "$1" != x/a ] || in_ns z "$2"; }; }
expect "17 x/a isolated both ways by one policy: only y's pods reach it, it reaches only z's pods"
reset

# 18. A protocol without a port, and a protocol nobody serves (upstream: a policy allowing only
# SCTP must not open TCP).
policy x udp-only <<'EOF'
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{protocol: UDP}]}]
EOF
policy x sctp-only <<'EOF'
  podSelector: {matchLabels: {pod: b}}
  ingress: [{ports: [{protocol: SCTP, port: 80}]}]
EOF
allowed() { case $2 in x/a) [ "$4" = UDP ] ;; x/b) false ;; *) true ;; esac; }
expect "18 x/a allows UDP (any port): 80/UDP and 81/UDP only; x/b allows SCTP 80 only: no TCP or UDP"
reset

# 19. An address in one peer's except and in another peer's cidr is allowed (upstream: an IP
# overlapping both IPBlock.CIDR and IPBlock.Except).
policy x overlap <<EOF
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - ipBlock: {cidr: $node2_net, except: [$yb/32]}
    - ipBlock: {cidr: $yb/32}
EOF
allowed() { [ "$2" != x/a ] || [ "${1#*/}" = b ]; }
expect "19 ipBlock $node2_net except y/b, and ipBlock y/b: node2's pods (y/b included) reach x/a"
reset

# The kernel state and the metrics, with x/half-broken (case 16) and y isolated for egress.
policy x half-broken <"$T/half-broken"
deny y Egress
allowed() { ! in_ns y "$1" && { [ "$2" != x/a ] || [ "$1" = x/b ]; }; }
expect "x/half-broken (case 16) and y denying egress together: the matrix"
xa=$(pod_ip x/a)
readable() {
  inns node1 iptables-save -t filter >"$T/save" || return 1
  local want
  for want in \
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "rsdn network policy" -j RSDN-POLICY' \
    '-A RSDN-POLICY -m comment --comment "pods isolated for ingress" -m set --match-set RSDN-ISOLATED-INGRESS dst -j RSDN-INGRESS' \
    '-A RSDN-POLICY -m comment --comment "pods isolated for egress" -m set --match-set RSDN-ISOLATED-EGRESS src -j RSDN-EGRESS' \
    "-A RSDN-INGRESS -d $xa/32 -m comment --comment \"x/a\" -j RSDN-PI-" \
    '-m comment --comment "x/half-broken" -j RSDN-NI-' \
    '-m comment --comment "x/a: no NetworkPolicy allows this ingress" -j RSDN-DENY-INGRESS' \
    '-m comment --comment "y/a: no NetworkPolicy allows this egress" -j RSDN-DENY-EGRESS' \
    '-A RSDN-DENY-INGRESS -m comment --comment "no NetworkPolicy allows this ingress" -j DROP'; do
    grep -qF -- "$want" "$T/save" || { echo "missing: $want"; grep RSDN "$T/save"; return 1; }
  done
  grep -E '^-A RSDN-NI-[A-Z0-9]+ -m comment --comment "x/half-broken ingress rule [0-9]+: pods pod=b in x, every port" -m set --match-set RSDN-P-[A-Z0-9]+ src -j MARK --set-xmark 0x20000/0x20000$' "$T/save" ||
    { echo "no readable rule for x/half-broken's pod=b rule"; grep RSDN "$T/save"; return 1; }
}
check "iptables-save on node1: RSDN-POLICY, RSDN-INGRESS/EGRESS, RSDN-PI-*/RSDN-NI-* with readable comments" readable
# The log names the invalid rule by its place in the policy as written ("ingress rule 0 ... left
# out"); the chain's comment for the valid rule must not call it rule 0 as well.
numbered() {
  grep -F 'x/half-broken ingress rule' "$T/save"
  grep -qF 'x/half-broken ingress rule 1: pods pod=b in x, every port' "$T/save"
}
check "the rule's comment numbers it as written (rule 1; rule 0 was left out as invalid)" numbered
sets() {
  local names; names=$(inns node1 ipset list -n) || return 1
  echo "$names"
  grep -qx RSDN-ISOLATED-INGRESS <<<"$names" && grep -qx RSDN-ISOLATED-EGRESS <<<"$names" &&
    grep -Eq '^RSDN-P-[A-Z0-9]+$' <<<"$names" &&
    [ "$(inns node1 ipset list RSDN-ISOLATED-INGRESS | sed -n '/^Members:/,$p' | tail -n +2)" = "$xa" ]
}
check "ipset list on node1: RSDN-ISOLATED-INGRESS (holding x/a only), RSDN-ISOLATED-EGRESS, RSDN-P-*" sets
metrics() { inns node1 curl -s "http://127.0.0.1:10249/metrics"; }
metric() { metrics | awk -v m="$1" '$1 == m {print $2; found = 1} END {if (!found) print 0}'; }
isolated() {
  [ "$(metric 'rsdn_network_policy_isolated_pods{direction="ingress"}')" = 1 ] &&
    [ "$(metric 'rsdn_network_policy_isolated_pods{direction="egress"}')" = 1 ]
}
check "rsdn_network_policy_isolated_pods on node1: ingress 1 (x/a), egress 1 (y/a)" eventually "$BOUND" isolated
# The daemon reads its DROP rules' counters every 5 s: first let it take in the matrix's denials
# (no change over one period), then 4 probes denied on node1 by x/a's ingress (1 SYN each
# within 0.3 s) must add at least 4.
DENIED='rsdn_network_policy_denied_packets_total{direction="ingress"}'
settled() { local m; m=$(metric "$DENIED"); sleep 5.5; [ "$(metric "$DENIED")" = "$m" ]; }
eventually 20 settled
denied_before=$(metric "$DENIED")
for c in x/c z/a z/b z/c; do lab probe "$c" x/a --port 80 --timeout 0.3 >/dev/null; done
grew() { [ "$(metric "$DENIED")" -ge $((denied_before + 4)) ]; }
check "$DENIED on node1 grew by 4 or more after 4 denied probes, from $denied_before (bound 12 s)" eventually 12 grew
reset

lab down >"$T/down.log" 2>&1
check "lab down: no namespace, state, daemon or server left" eval \
  '! lab_namespaces && [ ! -d "$LAB" ] && ! pgrep -f "node --config $LAB/" >/dev/null'

summary policy
