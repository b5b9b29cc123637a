#!/usr/bin/env bash
# The rsdn demo, on one machine, in network namespaces only (the root namespace is never
# touched). It builds rsdn, creates a node namespace holding the tun0 bridge that `rsdn node`
# owns, wires two pods into it with the real rsdn-cni (called exactly as a runtime calls it),
# and shows them talking.
#   hack/demo.sh        set up and show
#   hack/demo.sh down   remove everything the demo created
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root

NODE=rsdn-demo-node
PODS=(rsdn-demo-pod1 rsdn-demo-pod2)
STATE=/tmp/rsdn-demo
SUBNET=10.128.0.0/23
GATEWAY=10.128.0.1

down() {
  if [ -d "$STATE" ]; then
    for i in "${!PODS[@]}"; do
      cni DEL "demo-$i" "${PODS[$i]}" >/dev/null 2>&1 || true
    done
  fi
  for ns in "${PODS[@]}" "$NODE"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$STATE"
}

# cni COMMAND CONTAINER-ID POD-NETNS: one plugin call, as a container runtime makes it.
cni() {
  CNI_COMMAND=$1 CNI_CONTAINERID=$2 CNI_NETNS=/run/netns/$3 CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni \
    ip netns exec "$NODE" target/dist/rsdn-cni <"$STATE/net.conf"
}

if [ "${1:-}" = down ]; then
  down
  echo "demo removed"
  exit 0
fi

ensure_packages
echo "== building"
hack/build.sh
down

echo "== a node namespace with the bridge rsdn node owns (tun0, gateway $GATEWAY)"
mkdir -p "$STATE"
ip netns add "$NODE"
ip -n "$NODE" link set lo up
ip -n "$NODE" link add tun0 type bridge
ip -n "$NODE" addr add "$GATEWAY/23" dev tun0
ip -n "$NODE" link set tun0 up

# The plugin entry of the conflist rsdn writes, plus the name a runtime injects.
target/dist/rsdn cni-config --subnet "$SUBNET" |
  jq --arg d "$STATE/ipam" '.plugins[0] + {name: .name, cniVersion: .cniVersion, dataDir: $d}' \
    >"$STATE/net.conf"
echo "network config:"
sed 's/^/  /' "$STATE/net.conf"

ips=()
for i in "${!PODS[@]}"; do
  ip netns add "${PODS[$i]}"
  result=$(cni ADD "demo-$i" "${PODS[$i]}")
  ips+=("$(echo "$result" | jq -r '.ips[0].address | split("/")[0]')")
  echo "== ADD ${PODS[$i]}: $(echo "$result" | jq -c '{ips: [.ips[].address], mac: .interfaces[2].mac, veth: .interfaces[1].name}')"
done

echo "== pod1 eth0 and routes"
ip -n "${PODS[0]}" -br addr show eth0
ip -n "${PODS[0]}" route
echo "== bridge ports (hairpin on)"
ip -n "$NODE" -d link show master tun0 | grep -Eo '^[0-9]+: [^:]+|hairpin (on|off)' | paste - -

echo "== connectivity"
ip netns exec "${PODS[0]}" ping -c2 -W2 "${ips[1]}" | tail -2
ip netns exec "${PODS[1]}" ping -c1 -W2 "$GATEWAY" | tail -1
ip netns exec "${PODS[1]}" nc -l -p 8080 -q 1 >"$STATE/received" &
sleep 0.3
echo "hello over TCP from pod1" | ip netns exec "${PODS[0]}" nc -q 1 "${ips[1]}" 8080
wait
echo "pod2 received: $(cat "$STATE/received")"

echo "== the IPAM store (host-local format: one file per address)"
for f in "$STATE/ipam/rsdn"/10.*; do printf '  %s -> %s\n' "$(basename "$f")" "$(tr '\r\n' ' ' <"$f")"; done

cat <<EOF

Explore:
  ip netns exec ${PODS[0]} ip addr          # a pod's view
  ip -n $NODE -d link show master tun0      # the bridge and its pod ports
  ip netns exec ${PODS[0]} ping ${ips[1]}
Tear down:
  hack/demo.sh down
EOF
