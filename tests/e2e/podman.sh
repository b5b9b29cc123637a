#!/usr/bin/env bash
# Real-runtime tier: podman (CNI backend, runc) runs containers inside a simulated node namespace
# on a network whose conflist is rsdn-cni chained with the reference portmap plugin.
# Checks: containers get addresses and reach each other and the gateway, a published port is
# reachable from a host outside the node, and removing the containers frees their addresses.
# Usage: tests/e2e/podman.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -euo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
T=$(mktemp -d /tmp/rsdn-podman.XXXXXX)
NODE=rsdn-pm-node-$$
CLIENT=rsdn-pm-client-$$
IMAGE=localhost/rsdn-busybox:e2e
SUBNET=10.128.4.0/23
GATEWAY=10.128.4.1
source "$(dirname "$0")/lib.sh"

pm() { CONTAINERS_CONF=$T/containers.conf nsenter --net="/run/netns/$NODE" podman --runtime runc --cgroup-manager cgroupfs "$@"; }

cleanup() {
  pm rm -f -t 0 rsdn-e2e-a rsdn-e2e-b >/dev/null 2>&1 || true
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true   # re-imported each run; no dangling copies
  ip netns del "$NODE" 2>/dev/null || true
  ip netns del "$CLIENT" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT

for tool in podman runc nsenter jq; do
  command -v "$tool" >/dev/null || { echo "missing $tool (hack/test.sh installs it)"; exit 1; }
done
[ -x /usr/lib/cni/portmap ] || { echo "missing /usr/lib/cni/portmap (containernetworking-plugins)"; exit 1; }

# An image from a busybox rootfs: no registry needed.
mkdir -p "$T/rootfs/bin" "$T/bin" "$T/net.d"
cp "$(command -v busybox)" "$T/rootfs/bin/busybox"
for c in sh ip ping nc sleep cat httpd printf; do ln -sf busybox "$T/rootfs/bin/$c"; done
echo hello-from-rsdn > "$T/rootfs/index.html"
tar -C "$T/rootfs" -cf "$T/rootfs.tar" .
podman import -q "$T/rootfs.tar" "$IMAGE" >/dev/null

cp "$BIN_DIR/rsdn-cni" "$T/bin/"
cat >"$T/containers.conf" <<EOF
[network]
network_backend = "cni"
cni_plugin_dirs = ["$T/bin", "/usr/lib/cni"]
network_config_dir = "$T/net.d"
[containers]
default_ulimits = []
EOF
"$BIN_DIR/rsdn" cni-config --subnet "$SUBNET" --portmap |
  jq --arg d "$T/ipam" '.plugins[0].dataDir = $d' >"$T/net.d/rsdn.conflist"

# The node: the bridge the daemon would own, forwarding on; a client host on a separate link.
ip netns add "$NODE"
ip netns add "$CLIENT"
ip -n "$NODE" link set lo up
ip -n "$NODE" link add tun0 type bridge
ip -n "$NODE" addr add "$GATEWAY/23" dev tun0
ip -n "$NODE" link set tun0 up
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
ip -n "$NODE" link add eth0 type veth peer name eth0 netns "$CLIENT"
ip -n "$NODE" addr add 192.168.77.1/24 dev eth0
ip -n "$NODE" link set eth0 up
ip -n "$CLIENT" addr add 192.168.77.2/24 dev eth0
ip -n "$CLIENT" link set eth0 up
ip -n "$CLIENT" link set lo up

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
check "published port 8080 (portmap chained after rsdn-cni) reachable from outside the node" fetch_published

pm rm -f -t 0 rsdn-e2e-a rsdn-e2e-b >/dev/null
check "removing the containers released their addresses" store_empty
check "removing the containers removed their bridge ports" no_pod_ports

summary podman
