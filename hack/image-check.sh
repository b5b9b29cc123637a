#!/usr/bin/env bash
# Checks the container image the way the DaemonSet runs it, on the lab instead of a cluster:
# a 2-node `rsdn lab up --api` (the stand-in API server plays the cluster), then node2's daemon
# is stopped, its vxlan0, conflist and NAT rules removed, and the image takes over node2 with
# the DaemonSet's two containers, run by podman inside node2's namespace with --network=host
# (hostNetwork): the init step privileged (`install-cni --prepare-host`), the daemon with only
# NET_ADMIN and NET_RAW added, the ConfigMap's config.yaml, and the in-cluster configuration a
# pod gets: KUBERNETES_SERVICE_HOST/PORT and a service-account directory (CA certificate, token)
# for a second stand-in API server that serves the same objects over HTTPS and refuses requests
# without the token.
# The image must rebuild node2's datapath, answer /healthz, follow a new Service, and exit 0 on
# SIGTERM leaving the datapath in place.
# Usage: hack/image-check.sh [IMAGE]   (root; default localhost/rsdn:<crate version>; prints
# "N passed, N failed"). Build the image first: `ENGINE=podman hack/build-image.sh`
# (docs/operations.md says how it was built on a machine without a registry).
set -uo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root
IMAGE=${1:-localhost/rsdn:$(crate_version)}
if ! podman image exists "$IMAGE"; then
  echo "no image $IMAGE: build it first (ENGINE=podman IMAGE=$IMAGE hack/build-image.sh)" >&2
  exit 1
fi
hack/build.sh --lab >/dev/null || exit 1   # the lab (rsdn-lab) plays the cluster
RSDN=$PWD/target/dist/rsdn
T=$(mktemp -d /tmp/rsdn-image-check.XXXXXX)
source tests/e2e/lib.sh
NS=/run/netns/${NSP}node2
NAME=rsdn-image-check
# runc with cgroupfs and no default ulimits: what works inside a namespace here (docs/testing.md)
printf '[containers]\ndefault_ulimits = []\n' >"$T/containers.conf"
pm() {
  CONTAINERS_CONF=$T/containers.conf nsenter --net="$NS" \
    podman --runtime runc --cgroup-manager cgroupfs "$@"
}
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1; lab_cleanup; }
trap cleanup EXIT

lab down >/dev/null 2>&1
lab up --api --nodes 2 --pods-per-node 1 >"$T/up.log" 2>&1 || { cat "$T/up.log"; exit 1; }

# node2 loses its daemon and what it programmed (pods keep their veths on tun0).
kill "$(cat "$LAB/node2/rsdn.pid")"
eventually 10 bash -c "! kill -0 $(cat "$LAB/node2/rsdn.pid") 2>/dev/null"
inns node2 ip link del vxlan0
inns node2 iptables -t nat -F KUBE-SERVICES
rm -f "$LAB"/node2/net.d/*.conflist
check "node2 without its daemon: pods cannot reach node1" bash -c "! $RSDN lab matrix"

# The init container.
mkdir -p "$T/opt-cni-bin"
modules=(); [ -d /lib/modules ] && modules=(-v /lib/modules:/lib/modules:ro)
check "init container: install-cni --prepare-host copies the plugin" eval "
  pm run --rm --network=host --privileged -v $T/opt-cni-bin:/host/opt/cni/bin \
    ${modules[*]} $IMAGE \
    rsdn install-cni --bin-dir /host/opt/cni/bin --prepare-host &&
  [ -x $T/opt-cni-bin/rsdn-cni ] && CNI_COMMAND=VERSION $T/opt-cni-bin/rsdn-cni"

# The API server as a pod sees it: HTTPS on the outside host, its CA and a token mounted.
ip netns exec ${NSP}ext "$RSDN" lab apiserver --listen 192.168.77.250:6444 --dir "$LAB/cluster" \
  --bookmark-seconds 1 --service-account-dir "$T/sa" >"$T/apiserver-tls.log" 2>&1 &
SERVERS+=($!)
eventually 10 test -s "$T/sa/token" || { cat "$T/apiserver-tls.log"; exit 1; }

# The daemon container, configured by the ConfigMap's config.yaml.
mkdir -p "$T/etc-rsdn"
cp manifests/config.yaml "$T/etc-rsdn/config.yaml"
touch /run/xtables.lock
pm run -d --name "$NAME" --network=host --cap-add NET_ADMIN,NET_RAW \
  -v "$T/etc-rsdn:/etc/rsdn:ro" -v "$LAB/node2/net.d:/etc/cni/net.d" \
  -v "$T/sa:/var/run/secrets/kubernetes.io/serviceaccount:ro" \
  -e KUBERNETES_SERVICE_HOST=192.168.77.250 -e KUBERNETES_SERVICE_PORT=6444 \
  -v /run/xtables.lock:/run/xtables.lock \
  "$IMAGE" rsdn node --config /etc/rsdn/config.yaml --node-name node2 >/dev/null
conflist() { [ -s "$LAB/node2/net.d/10-rsdn.conflist" ]; }
check "image daemon: writes the conflist once node2 is programmed" eventually 30 conflist
check "image daemon: vxlan0 and node1's FDB entry are back" eval \
  "inns node2 bridge fdb show dev vxlan0 | grep -q 'dst 192.168.77.11'"
check "image daemon: pods reach each other across nodes again (matrix)" eventually 10 lab matrix
check "image daemon: /healthz answers 200 from outside" eventually 10 \
  bash -c "[ \"\$(ip netns exec ${NSP}ext curl -s -o /dev/null -w '%{http_code}' http://192.168.77.12:10256/healthz)\" = 200 ]"

cat >"$LAB/cluster/.svc.tmp" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: web, namespace: image}
spec:
  clusterIP: 172.30.8.8
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: image, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 80}]
endpoints: [{addresses: [10.128.0.2], nodeName: node1}]
EOF
mv "$LAB/cluster/.svc.tmp" "$LAB/cluster/svc-web.yaml"
check "image daemon: a new Service reaches node2's nat table" eventually 10 \
  bash -c "ip netns exec ${NSP}node2 iptables-save -t nat | grep -q 'image/web:http cluster IP'"

state() { podman inspect -f '{{.State.Status}}' "$NAME"; }
check "image daemon: SIGTERM exits 0" eval "[ \"\$(state)\" = running ] &&
  podman stop -t 20 $NAME >/dev/null && [ \"\$(podman inspect -f '{{.State.ExitCode}}' $NAME)\" = 0 ]"
check "image daemon: the datapath stays after it stops" lab matrix
podman logs "$NAME" >"$T/daemon.log" 2>&1
check "image daemon: in-cluster config, HTTPS with the token, nothing refused" eval \
  "grep -q 'initial lists received from the API server' $T/daemon.log &&
   grep -q ' list ' $T/apiserver-tls.log && ! grep -q refused $T/apiserver-tls.log"
check "image daemon: logged its iptables backend and a clean stop" eval \
  "grep -q 'iptables backend' $T/daemon.log && grep -q 'datapath stays in place' $T/daemon.log"
[ "$failed" -gt 0 ] && sed 's/^/  daemon: /' "$T/daemon.log" | tail -30
summary image-check
