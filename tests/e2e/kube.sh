#!/usr/bin/env bash
# End-to-end tier for the `kube` cluster source: a 3-node `rsdn lab up --api`, whose daemons
# watch the lab's stand-in API server (real list/watch protocol over HTTP, on the outside host)
# instead of reading the cluster directory. Objects added, modified and deleted at the server
# must reach the nodes' kernels, also across a cut watch connection and a 410 Gone; /healthz,
# /livez and /readyz answer on port 10256 (from outside), /metrics on 127.0.0.1:10249 only.
# Usage: tests/e2e/kube.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=$(mktemp -d /tmp/rsdn-kube-e2e.XXXXXX)
source "$(dirname "$0")/lib.sh"
trap lab_cleanup EXIT
put() { cat >"$LAB/cluster/.$1.tmp" && mv "$LAB/cluster/.$1.tmp" "$LAB/cluster/$1.yaml"; }
http() { inns ext curl -s -o "$T/body" -w '%{http_code}' "http://$1:10256$2"; }
# metrics_of NODE: its /metrics, from the node itself (the default address is 127.0.0.1:10249).
metrics_of() { inns "$1" curl -s -o "$T/body" -w '%{http_code}' "http://127.0.0.1:10249/metrics"; }
route_to() { inns "$1" ip route show "$2" proto 212 | grep -q vxlan0; }
no_route_to() { ! route_to "$@"; }
api_pid() { cat "$LAB/apiserver.pid"; }
lists() { grep -c ' list ' "$LAB/apiserver.log"; }

lab down >/dev/null 2>&1
if ! lab up --api --nodes 3 --pods-per-node 1 >"$T/up.log" 2>&1; then
  cat "$T/up.log"; echo "kube: 0 passed, 1 failed"; exit 1
fi

check "lab up --api: every node's daemon reads the API server" \
  bash -c "for n in 1 2 3; do grep -q 'initial lists received from the API server' $LAB/node\$n/rsdn.log || exit 1; done"
check "pods reach each other across nodes (matrix)" lab matrix

status_is() { [ "$(http "$1" "$2")" = "$3" ]; }   # status_is ADDRESS PATH CODE
for n in 1 2 3; do
  check "node$n: /healthz and /readyz answer 200" \
    eval "status_is 192.168.77.1$n /healthz 200 && status_is 192.168.77.1$n /readyz 200"
done
check "node1: /livez answers 200; /metrics is not on the health port" \
  eval "status_is 192.168.77.11 /livez 200 && status_is 192.168.77.11 /metrics 404"
check "/metrics on 127.0.0.1:10249 has overlay and proxy metrics" eval "[ \$(metrics_of node1) = 200 ] &&
  grep -q '^rsdn_overlay_remote_nodes 2' $T/body &&
  grep -q '^kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}' $T/body &&
  grep -q '^rsdn_cluster_source_ready 1' $T/body &&
  grep -q '^rsdn_build_info{version=\"[0-9.]*\",revision=\"[0-9a-f]*\",build_date=\"' $T/body"
check "/metrics is not reachable from outside by default" \
  eval "! inns ext curl -s -m 2 -o /dev/null http://192.168.77.11:10249/metrics"
# Each daemon, once its node is programmed, sets its Node's NetworkUnavailable to False.
condition_set() {
  for n in 1 2 3; do
    grep 'patch of a Node.s status' "$LAB/apiserver.log" | grep "node=\"\?node$n\"\?" | grep -q 'status=200' || return 1
  done
}
check "every daemon cleared its Node's NetworkUnavailable (a status patch, answered 200)" \
  eventually 10 condition_set
check "the daemon's first log line names its build" \
  eval "head -1 $LAB/node1/rsdn.log | grep 'rsdn node starting' | grep -q 'revision='"

# A Service and its EndpointSlice, created at the server: DNAT on every node, reachable.
# (ip netns exec, not the inns function: $! must be socat itself, or it outlives the test)
ip netns exec ${NSP}node2-pod1 socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo node2-pod1' &
SERVERS+=($!)
pod2=$(pod_ip node2-pod1)
put svc-web <<EOF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: e2e}
spec:
  clusterIP: 172.30.9.9
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: e2e, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [$pod2], nodeName: node2}]
EOF
answer() { [ "$(inns node1-pod1 socat -T2 - TCP:172.30.9.9:80,connect-timeout=2 </dev/null 2>/dev/null)" = node2-pod1 ]; }
check "a Service created at the API server answers from node1's pod" eventually 5 answer

# The cluster autoscaler taints node2 for deletion: its /healthz answers 503 so that load
# balancers drain it (kube-proxy's KEP-3836), its /livez stays 200 (no restart), and the taint
# going away makes it healthy again.
sed -i 's/^spec:$/spec:\n  taints: [{key: ToBeDeletedByClusterAutoscaler, value: "1700000000", effect: NoSchedule}]/' \
  "$LAB/cluster/node2.yaml"
check "node2 tainted ToBeDeletedByClusterAutoscaler: /healthz 503, /livez 200" eventually 5 \
  eval "status_is 192.168.77.12 /healthz 503 && grep -q ToBeDeletedByClusterAutoscaler $T/body &&
    status_is 192.168.77.12 /livez 200 && status_is 192.168.77.11 /healthz 200"
sed -i '/ToBeDeletedByClusterAutoscaler/d' "$LAB/cluster/node2.yaml"
check "the taint removed: node2's /healthz is 200 again" eventually 5 \
  status_is 192.168.77.12 /healthz 200

# Delete and re-add a Node at the server: the other nodes' kernels follow.
rm "$LAB/cluster/node3.yaml"
check "Node deleted at the API server: node1's route to node3 goes" eventually 5 no_route_to node1 10.128.4.0/23
"$RSDN" lab up --api --nodes 3 --pods-per-node 1 >/dev/null 2>&1   # rewrites node3's object
check "Node re-created: the route comes back" eventually 5 route_to node1 10.128.4.0/23

# A cut watch connection: the daemons resume watching (no relist) and miss nothing.
before=$(lists)
kill -USR1 "$(api_pid)"
sleep 0.5
rm "$LAB/cluster/node3.yaml"
check "after a cut watch, a deletion still reaches node1's kernel" eventually 10 no_route_to node1 10.128.4.0/23
# (the server logs every list it answers; 18 lists = 6 kinds x 3 daemons at least so far)
check "the cut watches resumed without a relist" test "$before" -ge 18 -a "$(lists)" -eq "$before"

# 410 Gone: the daemons relist and converge on what changed.
kill -USR2 "$(api_pid)"
sleep 0.3
"$RSDN" lab up --api --nodes 3 --pods-per-node 1 >/dev/null 2>&1
check "after a 410 Gone, node3 is back in node1's kernel" eventually 10 route_to node1 10.128.4.0/23
check "every daemon relisted after the 410" eventually 10 bash -c "
  [ \$(grep -c ' list ' $LAB/apiserver.log) -ge \$(( $before + 18 )) ] &&
  for n in 1 2 3; do grep -q 'watch re-established.*relisted=true' $LAB/node\$n/rsdn.log || exit 1; done"

# A node whose Node object loses its podCIDR: the daemon says why it waits.
sed -i '/podCIDR/d' "$LAB/cluster/node3.yaml"
check "node3 without a podCIDR: its daemon says why" eventually 5 \
  grep -q 'Node/node3 is not usable yet: .*podCIDR' "$LAB/node3/rsdn.log"
# Still 200: waiting for the cluster is not a fault a liveness restart would cure.
check "node3's /healthz says it waits" eventually 5 \
  eval "status_is 192.168.77.13 /healthz 200 && grep -q '"notes"' $T/body && grep -q 'podCIDR' $T/body"

# SIGTERM: the daemon stops watching and exits 0 (run in the foreground here to see its status).
kill -TERM "$(cat $LAB/node3/rsdn.pid)"
sleep 0.5
ip netns exec ${NSP}node3 "$RSDN" node --config "$LAB/node3/config.yaml" >"$T/fg.log" 2>&1 &   # (ip execs rsdn: $! is its pid)
fg=$!
sleep 1.5
kill -TERM $fg
wait $fg
status=$?
check "SIGTERM with the API source: exit status 0 (got $status), datapath left in place" eval \
  "[ $status = 0 ] && grep -q 'datapath stays in place' $T/fg.log && inns node3 ip link show vxlan0"

summary kube
