#!/usr/bin/env bash
# Times N (default 200) pod ADDs then DELs, sequentially and 8 at a time, for rsdn-cni and, in
# the same run and on the same kind of namespaces, for the reference bridge + host-local plugins
# with an equivalent configuration (same bridge, subnet, gateway, MTU, hairpin, default route).
# Everything runs inside throw-away network namespaces.
# usage: hack/bench-cni.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
require_root
ensure_packages

N=${1:-200}
PAR=8
NODE=rsdn-bench-node
PREFIX=rsdn-bench-pod
WORK=$(mktemp -d /tmp/rsdn-bench.XXXXXX)

cleanup() {
  for i in $(seq 0 "$N"); do ip netns del "$PREFIX$i" 2>/dev/null || true; done
  ip netns del "$NODE" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

hack/build.sh
cargo build --release --quiet -p rsdn-cni --example bench_driver
DRIVER=target/release/examples/bench_driver

ip netns add "$NODE"
ip -n "$NODE" link set lo up
ip -n "$NODE" link add tun0 type bridge
ip -n "$NODE" addr add 10.128.0.1/23 dev tun0
ip -n "$NODE" link set tun0 up
for i in $(seq 0 "$N"); do ip netns add "$PREFIX$i"; done

cat >"$WORK/rsdn.json" <<JSON
{"cniVersion":"1.0.0","name":"bench","type":"rsdn-cni","bridge":"tun0","subnet":"10.128.0.0/23",
 "gateway":"10.128.0.1","mtu":1450,"hairpinMode":true,"dataDir":"$WORK/ipam-rsdn"}
JSON
cat >"$WORK/ref.json" <<JSON
{"cniVersion":"1.0.0","name":"bench","type":"bridge","bridge":"tun0","mtu":1450,"hairpinMode":true,
 "isGateway":false,"ipMasq":false,
 "ipam":{"type":"host-local","subnet":"10.128.0.0/23","gateway":"10.128.0.1",
         "routes":[{"dst":"0.0.0.0/0"}],"dataDir":"$WORK/ipam-ref"}}
JSON

echo "rsdn-cni $(git describe --always --dirty 2>/dev/null || echo unknown) vs $(dpkg-query -W -f='containernetworking-plugins ${Version}' containernetworking-plugins)"
echo "kernel $(uname -r), $(nproc) cores"

# Start-up: the cost every invocation pays before any work (VERSION does no kernel work).
echo
echo "start-up (CNI_COMMAND=VERSION), static-pie release build vs dynamic build vs reference plugins:"
cargo build --release --quiet -p rsdn-cni --bin rsdn-cni
CNI_COMMAND=VERSION hyperfine -N --warmup 20 -r 300 --style basic \
  -n "rsdn-cni (static-pie)" target/dist/rsdn-cni \
  -n "rsdn-cni (dynamic)" target/release/rsdn-cni \
  -n bridge /usr/lib/cni/bridge \
  -n host-local /usr/lib/cni/host-local 2>&1 | grep -E "^Benchmark|Time \(mean"
for par in 1 "$PAR"; do
  echo
  "$DRIVER" "/run/netns/$NODE" "$PREFIX" "$N" "$par" \
    "rsdn-cni=target/dist/rsdn-cni:$WORK/rsdn.json:/usr/lib/cni" \
    "bridge+host-local=/usr/lib/cni/bridge:$WORK/ref.json:/usr/lib/cni"
done
