#!/usr/bin/env bash
# End-to-end tier for `rsdn doctor`: a healthy 2-node lab passes, then every check is made to
# fail on node1 by what breaks it in a cluster, and passes again once that is undone (the
# node's daemon stopped with SIGSTOP where it would repair the damage first).
# Usage: tests/e2e/doctor.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=$(mktemp -d /tmp/rsdn-doctor-e2e.XXXXXX)
source "$(dirname "$0")/lib.sh"
STOPPED=()
HOLDER=
cleanup() {
  [ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null
  [ ${#STOPPED[@]} -gt 0 ] && kill -CONT "${STOPPED[@]}" 2>/dev/null
  lab_cleanup
}
trap cleanup EXIT

lab down >/dev/null 2>&1
start=$SECONDS
if ! lab up --nodes 2 --pods-per-node 1 >"$T/up.log" 2>&1; then
  cat "$T/up.log"; echo "doctor: 0 passed, 1 failed"; exit 1
fi
# doctor [ARGS...]: rsdn doctor on node1 as JSON into $T/doctor.json; its exit status.
doctor() {
  inns node1 "$RSDN" doctor --config "$LAB/node1/config.yaml" --cni-bin-dir "$LAB/node1/bin" \
    --timeout 0.5 -o json "$@" >"$T/doctor.json"
}
status_of() { jq -r --arg c "$1" '.findings[] | select(.check == $c) | .status' "$T/doctor.json"; }
# fails CHECK [ARGS...]: doctor exits 1 and CHECK failed, with a fix; passes CHECK: not failed.
fails() { local c=$1; shift; ! doctor "$@" && [ "$(status_of "$c")" = fail ] &&
  jq -e --arg c "$c" '.findings[] | select(.check == $c) | .fix | length > 0' "$T/doctor.json" >/dev/null; }
passes() { local c=$1; shift; doctor "$@"; local s; s=$(status_of "$c"); [ "$s" = ok ] || [ "$s" = warn ]; }
show() { jq -r --arg c "$1" '.findings[] | select(.check == $c) | "\(.status): \(.detail) / fix: \(.fix)"' "$T/doctor.json"; }

healthy() { doctor && [ "$(jq '[.findings[] | select(.status == "fail")] | length' "$T/doctor.json")" = 0 ]; }
check "a healthy node: exit 0, nothing fails" eventually 10 healthy
check "every check reported" test "$(jq '.findings | length' "$T/doctor.json")" -ge 12
inns node1 "$RSDN" doctor --config "$LAB/node1/config.yaml" --cni-bin-dir "$LAB/node1/bin" >"$T/doctor.txt"
check "the table names each check with ok/WARN/FAIL" grep -q '^ok    forwarding' "$T/doctor.txt"

P1=$(cat "$LAB/node1/rsdn.pid")
kill -STOP "$P1"; STOPPED=("$P1")

inns node1 sysctl -qw net.ipv4.ip_forward=0
check "forwarding: ip_forward=0 fails" fails forwarding
inns node1 sysctl -qw net.ipv4.ip_forward=1
check "forwarding: ip_forward=1 passes" passes forwarding

inns node1 sysctl -qw net.bridge.bridge-nf-call-iptables=0
check "bridge-netfilter: bridge-nf-call-iptables=0 fails" fails bridge-netfilter
inns node1 sysctl -qw net.bridge.bridge-nf-call-iptables=1
check "bridge-netfilter: =1 passes" passes bridge-netfilter

# Strict rp_filter and a route sending half of node2's pods out of eth0.
inns node1 sysctl -qw net.ipv4.conf.all.rp_filter=1
inns node1 ip route add 10.128.3.0/24 dev eth0
check "rp-filter: strict, with node2's pods half routed out of eth0, fails" fails rp-filter
show rp-filter
inns node1 ip route del 10.128.3.0/24 dev eth0
check "rp-filter: strict but symmetric passes" passes rp-filter
inns node1 sysctl -qw net.ipv4.conf.all.rp_filter=0

inns node1 ip link set vxlan0 mtu 1400
check "mtu: vxlan0 at 1400 while pods have 1450 fails" fails mtu
inns node1 ip link set vxlan0 mtu 1450
check "mtu: all 1450 passes" passes mtu

# UDP 4789 dropped on node2: its VTEP stops answering through the overlay.
inns node2 iptables -I INPUT -p udp --dport 4789 -j DROP
check "vxlan-peers: UDP 4789 blocked on node2 fails, naming node2" eval "fails vxlan-peers && status_of vxlan-peers >/dev/null && jq -e '.findings[] | select(.check == \"vxlan-peers\") | .detail | test(\"node2\")' '$T/doctor.json'"
inns node2 iptables -D INPUT -p udp --dport 4789 -j DROP
check "vxlan-peers: open again passes" passes vxlan-peers

# The 63-second delay: VXLAN packets masqueraded, tx checksum offload on, a kernel before 5.7.
inns node1 iptables -t nat -I POSTROUTING -p udp --dport 4789 -j MASQUERADE --random-fully
check "vxlan-checksum: masqueraded VXLAN, offload on, kernel 5.4 fails" fails vxlan-checksum --assume-kernel 5.4.0
show vxlan-checksum
inns node1 ethtool -K vxlan0 tx off >/dev/null
check "vxlan-checksum: the same with vxlan0's offload off passes (with a warning)" passes vxlan-checksum --assume-kernel 5.4.0
inns node1 ethtool -K vxlan0 tx on >/dev/null
inns node1 iptables -t nat -D POSTROUTING -p udp --dport 4789 -j MASQUERADE --random-fully
check "vxlan-checksum: nothing masquerades VXLAN on this kernel: ok" eval "passes vxlan-checksum && [ \"\$(status_of vxlan-checksum)\" = ok ]"

# The kubelet's hint chain in the legacy backend while rsdn's rules are in nft.
inns node1 iptables-legacy -t mangle -N KUBE-IPTABLES-HINT
check "iptables-backend: the kubelet's hint in legacy, rsdn in nft fails" fails iptables-backend
inns node1 iptables-legacy -t mangle -X KUBE-IPTABLES-HINT
inns node1 iptables-nft -t mangle -N KUBE-IPTABLES-HINT
check "iptables-backend: the hint in nft too passes" eval "passes iptables-backend && [ \"\$(status_of iptables-backend)\" = ok ]"
inns node1 iptables-nft -t mangle -X KUBE-IPTABLES-HINT

# The xtables lock held (a private lock file: iptables honours XTABLES_LOCKFILE too).
export XTABLES_LOCKFILE=$T/xtables.lock
touch "$XTABLES_LOCKFILE"
# One process that takes the lock and keeps it (its pid is $!: killing it frees the lock).
( exec 9>"$XTABLES_LOCKFILE"; flock 9; exec sleep 60 ) &
HOLDER=$!
sleep 0.2
check "xtables-lock: held fails, naming the holder" eval "fails xtables-lock && jq -e '.findings[] | select(.check == \"xtables-lock\") | .detail | test(\"by pid\")' '$T/doctor.json'"
kill "$HOLDER"; wait "$HOLDER" 2>/dev/null; HOLDER=
check "xtables-lock: free passes" passes xtables-lock
unset XTABLES_LOCKFILE

echo '{"cniVersion": "1.0.0", "name": "other", "plugins": [{"type": "bridge"}]}' >"$LAB/node1/net.d/05-other.conflist"
check "cni-conflist: another conflist sorting first fails" fails cni-conflist
rm "$LAB/node1/net.d/05-other.conflist"
check "cni-conflist: ours first passes" passes cni-conflist

inns node1 iptables -t mangle -N KUBE-PROXY-CANARY
check "kube-proxy: its canary chain while rsdn proxies fails" fails kube-proxy
inns node1 iptables -t mangle -X KUBE-PROXY-CANARY
check "kube-proxy: gone passes" passes kube-proxy

cp "$LAB/node1/net.d/10-rsdn.conflist" "$T/conflist"
jq '.plugins += [{"type": "portmap", "capabilities": {"portMappings": true}}]' "$T/conflist" >"$LAB/node1/net.d/10-rsdn.conflist"
check "cni-plugins: portmap chained but missing fails" fails cni-plugins
cp /usr/lib/cni/portmap "$LAB/node1/bin/portmap"
check "cni-plugins: portmap installed passes" passes cni-plugins
rm "$LAB/node1/bin/portmap"; cp "$T/conflist" "$LAB/node1/net.d/10-rsdn.conflist"

# Fill the conntrack table past 90% with UDP flows to the node's own addresses.
cat >"$T/fill.py" <<'EOF'
import socket, sys
want, dsts = int(sys.argv[1]), sys.argv[2:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent = 0
for d in dsts:
    for port in range(1, 65536):
        if sent >= want:
            break
        try:
            s.sendto(b"x", (d, port))
        except OSError:
            pass
        sent += 1
EOF
max=$(inns node1 cat /proc/sys/net/netfilter/nf_conntrack_max)
inns node1 python3 "$T/fill.py" $((max * 92 / 100)) 192.168.77.11 10.128.0.1 10.128.0.0 127.0.0.1
check "conntrack: a table 92% full fails" fails conntrack
show conntrack
inns node1 conntrack -F >/dev/null 2>&1
check "conntrack: flushed passes" passes conntrack

kill -CONT "$P1"; STOPPED=()
check "all of it undone: nothing fails" eventually 10 healthy
echo "($((SECONDS - start)) s)"
summary doctor
