#!/usr/bin/env bash
# Real-runtime tier: podman (CNI backend, runc) runs containers inside a simulated node
# namespace on the conflist `rsdn node` wrote there: rsdn-cni chained with the reference
# portmap plugin, the daemon's default. The daemon programs the node (tun0, forwarding) from a
# one-Node cluster directory, as the DaemonSet would from the API server.
# Checks: the daemon's conflist chains portmap and the daemon finds it in cniBinDir;
# containers get addresses and reach each other and the gateway; a published port (what a
# pod's hostPort is) is reachable from a host outside the node; removing the containers frees
# their addresses.
# Usage: tests/e2e/podman.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -euo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
T=$(mktemp -d /tmp/rsdn-podman.XXXXXX)
NODE=rsdn-pm-node-$$
CLIENT=rsdn-pm-client-$$
SUBNET=10.128.4.0/23
GATEWAY=10.128.4.1
source "$(dirname "$0")/lib.sh"
IMAGE=localhost/rsdn-busybox:e2e-$RSDN_LAB   # one per lab name: runs side by side never share it
DAEMON=

pm() { CONTAINERS_CONF=$T/containers.conf nsenter --net="/run/netns/$NODE" podman --runtime runc --cgroup-manager cgroupfs "$@"; }

cleanup() {
  pm rm -f -t 0 rsdn-e2e-a rsdn-e2e-b >/dev/null 2>&1 || true
  if [ -n "$DAEMON" ]; then kill "$DAEMON" 2>/dev/null || true; wait "$DAEMON" 2>/dev/null || true; fi
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true   # re-imported each run; no dangling copies
  ip netns del "$NODE" 2>/dev/null || true
  ip netns del "$CLIENT" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT

for tool in podman runc nsenter jq curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (hack/test.sh installs it)"; exit 1; }
done
[ -x /usr/lib/cni/portmap ] || { echo "missing /usr/lib/cni/portmap (containernetworking-plugins)"; exit 1; }

# An image from a busybox rootfs: no registry needed.
mkdir -p "$T/rootfs/bin" "$T/bin" "$T/net.d" "$T/cluster"
cp "$(command -v busybox)" "$T/rootfs/bin/busybox"
for c in sh ip ping nc sleep cat httpd printf; do ln -sf busybox "$T/rootfs/bin/$c"; done
echo hello-from-rsdn > "$T/rootfs/index.html"
tar -C "$T/rootfs" -cf "$T/rootfs.tar" .
podman import -q "$T/rootfs.tar" "$IMAGE" >/dev/null

# The node's CNI plugin directory (cniBinDir): portmap as a distribution's CNI plugins package
# puts it there, rsdn-cni as the DaemonSet's init step does. podman looks nowhere else.
cp /usr/lib/cni/portmap "$T/bin/"
cat >"$T/containers.conf" <<EOF
[network]
network_backend = "cni"
cni_plugin_dirs = ["$T/bin"]
network_config_dir = "$T/net.d"
[containers]
default_ulimits = []
EOF

# The node: an underlay link to a client host; the daemon makes tun0 and turns forwarding on.
ip netns add "$NODE"
ip netns add "$CLIENT"
ip -n "$NODE" link set lo up
ip -n "$NODE" link add eth0 type veth peer name eth0 netns "$CLIENT"
ip -n "$NODE" addr add 192.168.77.1/24 dev eth0
ip -n "$NODE" link set eth0 up
ip -n "$CLIENT" addr add 192.168.77.2/24 dev eth0
ip -n "$CLIENT" link set eth0 up
ip -n "$CLIENT" link set lo up
ip netns exec "$NODE" "$BIN_DIR/rsdn" install-cni --source "$BIN_DIR/rsdn-cni" --bin-dir "$T/bin" \
  --prepare-host >/dev/null

# The daemon, with the defaults a DaemonSet has (portmap on), fed by a cluster directory.
cat >"$T/cluster/node.yaml" <<EOF
apiVersion: v1
kind: Node
metadata: {name: pm-node}
spec: {podCIDR: $SUBNET, podCIDRs: [$SUBNET]}
status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}
EOF
cat >"$T/config.yaml" <<EOF
nodeName: pm-node
clusterDir: $T/cluster
cniConfDir: $T/net.d
cniDataDir: $T/ipam
cniBinDir: $T/bin
healthzBindAddress: 127.0.0.1:10256
EOF
ip netns exec "$NODE" "$BIN_DIR/rsdn" node --config "$T/config.yaml" >"$T/rsdn.log" 2>&1 &
DAEMON=$!
CONFLIST=$T/net.d/10-rsdn.conflist
conflist_written() { [ -s "$CONFLIST" ]; }
if ! eventually 30 conflist_written; then
  tail -20 "$T/rsdn.log"; echo "podman: 0 passed, 1 failed"; exit 1
fi
chains_portmap() {
  jq -e '.name == "rsdn" and .plugins[0].type == "rsdn-cni" and .plugins[1].type == "portmap"
    and .plugins[1].capabilities.portMappings == true' "$CONFLIST"
}
portmap_found() {
  ip netns exec "$NODE" curl -s http://127.0.0.1:10256/healthz >"$T/healthz" &&
    jq -e '.ok and ((.notes // []) | all(test("portmap") | not))' "$T/healthz" &&
    ! grep portmap "$T/rsdn.log"
}
check "the daemon's conflist chains portmap after rsdn-cni" chains_portmap
check "the daemon finds portmap in cniBinDir (/healthz and log say nothing missing)" portmap_found

pm run -d --name rsdn-e2e-a --network rsdn -p 8080:80 "$IMAGE" httpd -f -p 80 -h / >/dev/null
pm run -d --name rsdn-e2e-b --network rsdn "$IMAGE" sleep 600 >/dev/null
ip_a=$(pm inspect -f '{{.NetworkSettings.Networks.rsdn.IPAddress}}' rsdn-e2e-a)
ip_b=$(pm inspect -f '{{.NetworkSettings.Networks.rsdn.IPAddress}}' rsdn-e2e-b)
echo "container a: $ip_a, container b: $ip_b"

in_subnet() { case $1 in 10.128.4.* | 10.128.5.*) [ "$1" != "$GATEWAY" ] ;; *) false ;; esac; }
distinct_in_subnet() { [ "$ip_a" != "$ip_b" ] && in_subnet "$ip_a" && in_subnet "$ip_b"; }
# busybox's static wget crashes in its resolver; a raw HTTP request through nc avoids it.
fetch_from_b() { pm exec rsdn-e2e-b sh -c "printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 3 $ip_a 80" | grep -q hello-from-rsdn; }
fetch_published() { ip netns exec "$CLIENT" wget -qO- -T 3 http://192.168.77.1:8080/index.html | grep -q hello-from-rsdn; }
allocations() { find "$T/ipam/rsdn" -maxdepth 1 -name '10.*' -printf '%f\n' 2>/dev/null | sort; }
store_holds_both() { [ "$(allocations | tr '\n' ' ')" = "$(printf '%s\n' "$ip_a" "$ip_b" | sort | tr '\n' ' ')" ]; }
store_empty() { [ -z "$(allocations)" ]; }
no_pod_ports() { [ -z "$(ip -n "$NODE" link show master tun0)" ]; }

check "containers got distinct addresses in $SUBNET" distinct_in_subnet
check "the IPAM store holds exactly their two addresses" store_holds_both
check "a reaches b" pm exec rsdn-e2e-a ping -c1 -W2 "$ip_b"
check "b reaches a" pm exec rsdn-e2e-b ping -c1 -W2 "$ip_a"
check "b reaches the gateway" pm exec rsdn-e2e-b ping -c1 -W2 "$GATEWAY"
check "b fetches a page from a over TCP" fetch_from_b
check "published port 8080 (the portmap of the daemon's conflist) reachable from outside the node" fetch_published

pm rm -f -t 0 rsdn-e2e-a rsdn-e2e-b >/dev/null
check "removing the containers released their addresses" store_empty
check "removing the containers removed their bridge ports" no_pod_ports

summary podman
