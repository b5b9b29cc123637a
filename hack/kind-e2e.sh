#!/usr/bin/env bash
# Checks a cluster running rsdn (the current kubectl context; hack/kind-up.sh or
# hack/vagrant/up.sh make one): pod-to-pod across nodes, a ClusterIP Service, and DNS through
# CoreDNS (itself reached through a Service). Prints "kind-e2e: N passed, N failed".
# Needs two schedulable worker nodes. Not run on the development VM: docs/operations.md.
set -uo pipefail
NS=rsdn-e2e
IMG=registry.k8s.io/e2e-test-images/agnhost:2.53
passed=0 failed=0
check() { # check NAME CMD...
  local name=$1; shift
  if out=$("$@" 2>&1); then passed=$((passed + 1)); echo "ok   $name"
  else failed=$((failed + 1)); echo "FAIL $name"; sed 's/^/     /' <<<"$out" | tail -10; fi
}
trap 'kubectl delete namespace $NS --wait=false >/dev/null 2>&1' EXIT

mapfile -t nodes < <(kubectl get nodes -o name --selector '!node-role.kubernetes.io/control-plane' | cut -d/ -f2)
[ ${#nodes[@]} -ge 2 ] || { echo "kind-e2e: needs 2 worker nodes, found ${#nodes[@]}"; exit 1; }
kubectl create namespace $NS >/dev/null
# agnhost (which has curl and nslookup) netexec answers /hostname and /clientip on 8080;
# one pod per worker.
for i in 0 1; do
  kubectl -n $NS run "pod$i" --image=$IMG --labels=app=web \
    --overrides="{\"spec\":{\"nodeName\":\"${nodes[$i]}\"}}" -- netexec --http-port=8080 >/dev/null
done
kubectl -n $NS expose pod pod0 --name=web --port=80 --target-port=8080 >/dev/null
kubectl -n $NS wait --for=condition=Ready pod --all --timeout=120s >/dev/null

ip0=$(kubectl -n $NS get pod pod0 -o jsonpath='{.status.podIP}')
ip1=$(kubectl -n $NS get pod pod1 -o jsonpath='{.status.podIP}')
check "pod-to-pod across nodes (${nodes[1]} -> ${nodes[0]}), source address kept" \
  bash -c "[ \"\$(kubectl -n $NS exec pod1 -- curl -sf --max-time 5 http://$ip0:8080/clientip | cut -d: -f1)\" = $ip1 ]"
svc=$(kubectl -n $NS get service web -o jsonpath='{.spec.clusterIP}')
check "ClusterIP Service $svc:80 answers from the other node" \
  bash -c "[ \"\$(kubectl -n $NS exec pod1 -- curl -sf --max-time 5 http://$svc/hostname)\" = pod0 ]"
check "DNS through CoreDNS: web.$NS.svc resolves to the ClusterIP" \
  bash -c "kubectl -n $NS exec pod1 -- nslookup web.$NS.svc.cluster.local | grep -q $svc"
check "Service by name (DNS, then the Service)" \
  bash -c "[ \"\$(kubectl -n $NS exec pod1 -- curl -sf --max-time 5 http://web.$NS.svc.cluster.local/hostname)\" = pod0 ]"
check "rsdn ready and live on every node (/readyz and /livez through the DaemonSet's probes)" \
  kubectl -n rsdn rollout status daemonset/rsdn --timeout=10s
echo "kind-e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
