#!/usr/bin/env bash
# End-to-end tier for pods, namespaces and reachability in a running lab: the setup of the
# upstream Kubernetes NetworkPolicy tests (namespaces x, y, z with pods a, b, c each, spread over
# 3 nodes, each serving TCP and UDP on ports 80 and 81 as named container ports) built with
# `lab ns add` / `lab pod add --serve` on a `lab up --api` cluster. Checks the Pod and Namespace
# objects as the stand-in API server serves them (and a NetworkPolicy copied into the cluster
# directory), `lab status`, the 9 x 9 truth tables per port and protocol (all connected with no
# policies; only each pod to itself when every pod drops what comes from outside, still within
# seconds), probes naming who answered, relabelling, and deletion of a pod and of a namespace
# (servers, network namespace, address, objects gone).
# Usage: tests/e2e/workloads.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=$(mktemp -d /tmp/rsdn-workloads-e2e.XXXXXX)
source "$(dirname "$0")/lib.sh"
trap lab_cleanup EXIT
ms() { date +%s%3N; }
api() { inns ext curl -s "http://192.168.77.250:6443$1"; }   # api PATH: GET from the API server
PODS="x/a x/b x/c y/a y/b y/c z/a z/b z/c"
tables() { # tables all|self: the expected truth tables over $PODS, ports 80 and 81, TCP and UDP
  local t f to
  for t in 80/TCP 80/UDP 81/TCP 81/UDP; do
    echo "$t $PODS"
    for f in $PODS; do
      printf '%s' "$f"
      for to in $PODS; do
        if [ "$1" = all ] || [ "$f" = "$to" ]; then printf ' .'; else printf ' X'; fi
      done
      echo
    done
    echo
  done
}

lab down >/dev/null 2>&1
if ! lab up --api --nodes 3 --pods-per-node 0 >"$T/up.log" 2>&1; then
  cat "$T/up.log"; echo "workloads: 0 passed, 1 failed"; exit 1
fi
for ns in x y z; do lab ns add "$ns" --labels "ns=$ns" >>"$T/add.log" 2>&1; done
start=$(ms)
netpol_pods >>"$T/add.log" 2>&1
took=$(( $(ms) - start ))
cat "$T/add.log"
check "9 pods added and serving in ${took} ms" eval \
  "[ \$(lab status --json | jq '[.pods[] | select(.serving)] | length') = 9 ]"

lab status >"$T/status.txt"
cat "$T/status.txt"
status_ok() {
  lab status --json | jq -e --arg ns "${NSP}pod.y.b" '
    (.pods | map(select(.pod == "y/b"))[0]) as $p |
    $p.name == "b" and $p.podNamespace == "y" and $p.node == "node2" and $p.namespace == $ns and
    $p.labels == {"pod": "b"} and ([$p.ports[].name] == ["serve-80-tcp", "serve-80-udp", "serve-81-tcp", "serve-81-udp"]) and
    ([.namespaces[].name] == ["default", "x", "y", "z"]) and
    (.namespaces[] | select(.name == "y") | .labels == {"kubernetes.io/metadata.name": "y", "ns": "y"})' &&
  grep -Eq '^y/b +node2 +10\.128\.2\.[0-9]+ +'"${NSP}"'pod\.y\.b +80/TCP,80/UDP,81/TCP,81/UDP +pod=b$' "$T/status.txt"
}
check "lab status: pods with namespace, node, network namespace, labels, ports served; namespaces with labels" status_ok

pods_served() {
  api /api/v1/pods >"$T/pods.json" || return 1
  jq -e --arg ip "$(pod_ip z/c)" '
    [.items[] | "\(.metadata.namespace)/\(.metadata.name)"] == ["x/a","x/b","x/c","y/a","y/b","y/c","z/a","z/b","z/c"] and
    (.items[] | select(.metadata.namespace == "z" and .metadata.name == "c") |
      .metadata.labels == {"pod": "c"} and (.metadata.uid | length) == 36 and .metadata.creationTimestamp != null and
      .spec.nodeName == "node3" and .spec.hostNetwork == false and
      ([.spec.containers[].ports[] | "\(.name):\(.containerPort)/\(.protocol)"] ==
        ["serve-80-tcp:80/TCP", "serve-80-udp:80/UDP", "serve-81-tcp:81/TCP", "serve-81-udp:81/UDP"]) and
      .status.phase == "Running" and .status.podIP == $ip and .status.podIPs == [{"ip": $ip}])' "$T/pods.json"
}
check "the API server serves the 9 Pods (/api/v1/pods): labels, uid, node, named ports, Running, podIP(s)" eventually 5 pods_served
namespaces_served() {
  api /api/v1/namespaces | jq -e '[.items[] | [.metadata.name, .metadata.labels["kubernetes.io/metadata.name"], .metadata.labels.ns]] ==
    [["default","default",null],["x","x","x"],["y","y","y"],["z","z","z"]]'
}
check "the API server serves the Namespaces (/api/v1/namespaces), each labelled kubernetes.io/metadata.name" namespaces_served
cat >"$LAB/cluster/.np.tmp" <<'EOF'
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
EOF
mv "$LAB/cluster/.np.tmp" "$LAB/cluster/np-deny-all.yaml"
policy_served() {
  api /apis/networking.k8s.io/v1/networkpolicies | jq -e '[.items[] | .metadata.namespace + "/" + .metadata.name] == ["x/deny-all"]'
}
check "a NetworkPolicy copied into the cluster directory is served (/apis/networking.k8s.io/v1/networkpolicies)" eventually 5 policy_served
rm "$LAB/cluster/np-deny-all.yaml"   # (enforcement is tests/e2e/policy.sh's)
check "lab up again checks the 9 pods: attached and reachable" lab up --api --nodes 3 --pods-per-node 0

tables all >"$T/all.txt"
start=$(ms)
lab reach -n x,y,z --ports 80,81 --expect "$T/all.txt" >"$T/reach-all.log" 2>&1
rc=$?
took=$(( $(ms) - start ))
cat "$T/reach-all.log"
check "9 x 9 pods x 2 ports x 2 protocols (324 probes): all connected, as expected, in ${took} ms (< 10 s)" \
  eval "[ $rc = 0 ] && [ $took -lt 10000 ]"
answer() { [ "$(lab probe x/a z/c --port 81 --protocol udp --json | jq -r .answer)" = "z/c $(pod_ip x/a)" ]; }
check "a UDP probe's answer names the server pod and the client's address" answer
check "a probe to a port nobody serves is refused: exit 1" eval '! lab probe x/a y/b --port 82 >"$T/p82" && grep -q "not connected (refused" "$T/p82"'

# Every pod drops whatever comes from outside its namespace: 288 of 324 probes time out, the
# tables show only each pod reaching itself, and the run still takes about one timeout.
for p in $PODS; do inns "$p" iptables -A INPUT ! -i lo -j DROP; done
tables self >"$T/self.txt"
start=$(ms)
lab reach -n x,y,z --ports 80,81 --timeout 1 --expect "$T/self.txt" >"$T/reach-self.log" 2>&1
rc=$?
took=$(( $(ms) - start ))
tail -3 "$T/reach-self.log"
check "324 probes, 288 of them dropped: tables as expected in ${took} ms (< 10 s)" eval "[ $rc = 0 ] && [ $took -lt 10000 ]"
tables all | head -10 >"$T/all-80-tcp.txt"
lab reach -n x,y,z --ports 80 --protocols tcp --expect "$T/all-80-tcp.txt" >"$T/mismatch.log" 2>&1
rc=$?
check "--expect names every differing cell (72 of 81) and fails" eval "[ $rc != 0 ] &&
  grep -q '^MISMATCH 80/TCP x/a -> x/b: expected connected, observed blocked' $T/mismatch.log &&
  [ \$(grep -c '^MISMATCH' $T/mismatch.log) = 72 ]"
for p in $PODS; do inns "$p" iptables -D INPUT ! -i lo -j DROP; done
json_ok() {
  lab reach --pods x/a --to y --ports 80 --protocols udp --json | jq -e --arg ip "$(pod_ip y/c)" '
    .connected == 3 and .blocked == 0 and (.probes | length) == 3 and
    (.probes[2] | .from == "x/a" and .to == "y/c" and .toIp == $ip and .port == 80 and .protocol == "UDP" and .connected)'
}
check "reach --json: every probe with from, to, address, port, protocol and outcome" json_ok

# Relabelling: the records, lab status and the served objects follow.
lab pod label x/a pod- app=web >/dev/null
lab ns label y ns- team=blue >/dev/null
relabelled() {
  api /api/v1/pods | jq -e '.items[] | select(.metadata.namespace == "x" and .metadata.name == "a") | .metadata.labels == {"app": "web"}' &&
  api /api/v1/namespaces | jq -e '.items[] | select(.metadata.name == "y") | .metadata.labels == {"kubernetes.io/metadata.name": "y", "team": "blue"}' &&
  lab status --json | jq -e '(.pods[] | select(.pod == "x/a") | .labels) == {"app": "web"}'
}
check "pod and namespace relabelled (kubectl style): objects and status follow" eventually 5 relabelled
check "the namespace's kubernetes.io/metadata.name cannot be changed" eval '! lab ns label y kubernetes.io/metadata.name=other 2>/dev/null'
uid_before=$(jq -r '.items[] | select(.metadata.name == "a" and .metadata.namespace == "x") | .metadata.uid' "$T/pods.json")
check "relabelling keeps the pod's uid" eval \
  '[ "$(api /api/v1/pods | jq -r ".items[] | select(.metadata.name == \"a\" and .metadata.namespace == \"x\") | .metadata.uid")" = "$uid_before" ]'
check "adding the same pod again changes nothing; with other labels it is refused" eval \
  'lab pod add x/b --node 2 --labels pod=b --port 80 --port 81 | grep -q unchanged && ! lab pod add x/b --node 2 --labels pod=other 2>/dev/null'

# Deleting a pod: its server, network namespace, address and objects go.
zc_ip=$(pod_ip z/c)
zc_server=$(cat "$LAB/pods/z.c.serve.pid")
lab pod del z/c >/dev/null
pod_gone() {
  [ ! -e "/run/netns/${NSP}pod.z.c" ] && [ ! -e "$LAB/cluster/pod.z.c.yaml" ] &&
  ! ls "$LAB"/node3/ipam/*/ | grep -qx "$zc_ip" && ! kill -0 "$zc_server" 2>/dev/null &&
  ! lab status --json | jq -e '.pods[] | select(.pod == "z/c")' >/dev/null &&
  ! api /api/v1/pods | jq -e '.items[] | select(.metadata.namespace == "z" and .metadata.name == "c")' >/dev/null
}
check "pod z/c deleted: server stopped, network namespace, address (CNI DEL), object and record gone" eventually 5 pod_gone
lab ns del y >/dev/null
ns_gone() {
  [ "$(lab status --json | jq -c '[.pods[].pod]')" = '["x/a","z/a","x/b","z/b","x/c"]' ] &&
  ! ls /run/netns | grep -q "^${NSP}pod\.y\." && [ ! -e "$LAB/cluster/namespace.y.yaml" ] &&
  api /api/v1/namespaces | jq -e '[.items[].metadata.name] == ["default", "x", "z"]' >/dev/null
}
check "namespace y deleted with its 3 pods" eventually 5 ns_gone
check "the 5 pods left still reach each other" lab matrix

lab down >"$T/down.log" 2>&1
check "lab down: no namespace, state, daemon or server left ($(cat "$T/down.log"))" eval \
  '! lab_namespaces && [ ! -d "$LAB" ] && ! pgrep -f "node --config $LAB/" >/dev/null'

summary workloads
