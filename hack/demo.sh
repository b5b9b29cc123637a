#!/usr/bin/env bash
# The rsdn demo: a 3-node cluster with 2 pods per node on this machine, built only from network
# namespaces (the root namespace is never touched). Every node runs the real `rsdn node`, which
# programs tun0, vxlan0 and one FDB/neighbour/route entry per remote node; pods are wired by the
# real `rsdn-cni`. Then: the all-pairs connectivity matrix (ping and TCP) and the tunnels as
# node1's kernel holds them.
#   hack/demo.sh        bring it up and show it
#   hack/demo.sh down   remove everything it created
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root

RSDN=target/dist/rsdn   # `rsdn lab` runs target/dist/rsdn-lab, built by --lab
LAB_NAME=${RSDN_LAB:-rsdn-lab}   # the lab's name (RSDN_LAB); several labs can run side by side
if [ "${1:-}" = down ]; then
  [ -x "$RSDN" ] && [ -x target/dist/rsdn-lab ] || hack/build.sh --lab
  exec "$RSDN" lab down
fi

ensure_packages
echo "== building"
hack/build.sh --lab
"$RSDN" lab down >/dev/null 2>&1 || true

echo
echo "== rsdn lab up --nodes 3 --pods-per-node 2"
"$RSDN" lab up --nodes 3 --pods-per-node 2

echo
echo "== all-pairs connectivity (ping and TCP) across the VXLAN overlay"
"$RSDN" lab matrix

echo
echo "== rsdn tunnel list, in node1"
"$RSDN" lab exec node1 -- "$PWD/$RSDN" tunnel list

cat <<EOF

Explore:
  $RSDN lab status                                  nodes, pods, daemon health, log files
  $RSDN lab exec node1 -- ip -d link show vxlan0    the VXLAN device rsdn node programmed
  $RSDN lab exec node1 -- bridge fdb show dev vxlan0
  $RSDN lab exec node1 -- ip route show proto 212   routes owned by rsdn
  $RSDN lab exec node1 -- iptables-save -t nat      Service (KUBE-*) and egress (RSDN-*) NAT chains
  $RSDN lab exec node1-pod1 -- ping 10.128.4.2      a pod on node1 to a pod on node3
  $RSDN lab exec node1 -- $PWD/$RSDN tunnel list -o json
  tail -f /run/$LAB_NAME/node1/rsdn.log              one line per change the daemon applies
  ls /run/$LAB_NAME/cluster                          the objects the daemons read (Node, Service,
                                                    EndpointSlice, Pod, Namespace); add or edit them (docs/proxy.md)
Tear down:
  hack/demo.sh down
EOF
