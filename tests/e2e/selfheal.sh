#!/usr/bin/env bash
# End-to-end tier for self-healing: the damage a hostile operator (or a stray script) does to a
# node of a running 3-node `rsdn lab`, each repaired within a stated bound, with the repair
# showing in the daemon's metrics and /healthz JSON; and the inputs that used to take
# datapaths down (a Node claiming another's podCIDR, a partly bad EndpointSlice, a flood of
# idle connections, half-written files, a CNI_NETNS that is not a namespace).
# Usage: tests/e2e/selfheal.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=$(mktemp -d /tmp/rsdn-selfheal-e2e.XXXXXX)
source "$(dirname "$0")/lib.sh"
trap lab_cleanup EXIT

metrics() { inns "$1" curl -s "http://127.0.0.1:10256/metrics"; }
metric() { metrics "$1" | awk -v m="$2" '$1 == m {print $2; found=1} END {if (!found) print 0}'; }
healthz() { inns "$1" curl -s -o "$T/healthz-$1.json" -w '%{http_code}' "http://127.0.0.1:10256/healthz"; }
# detail NODE CHECK FIELD: a field of one check of NODE's /healthz JSON.
detail() { healthz "$1" >/dev/null; jq -r --arg c "$2" --arg f "$3" '.checks[] | select(.name == $c) | .[$f] // ""' "$T/healthz-$1.json"; }
put() { cat >"$LAB/cluster/.$1.tmp" && mv "$LAB/cluster/.$1.tmp" "$LAB/cluster/$1.yaml"; }
serve() { # serve POD: a TCP server on 8080 answering the pod's name
  ip netns exec "$NSP$1" socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:"echo $1" &
  SERVERS+=($!)
}
ask() { inns "$1" socat -T2 - "TCP:$2:$3,connect-timeout=2" </dev/null 2>/dev/null; }
answers() { for _ in $(seq "$4"); do ask "$1" "$2" "$3"; done | sort -u | tr '\n' ' '; }
filter_rules() { inns "$1" iptables-nft-save -t filter | grep -c '^-A'; }
nat_rules() { inns "$1" iptables-nft-save -t nat | grep -E '^(-A|:KUBE)' | sort; }
# timed NAME BOUND CMD...: CMD must become true within BOUND seconds; the check names the time.
timed() {
  local name=$1 bound=$2; shift 2
  local start; start=$(date +%s%N)
  if eventually "$bound" "$@"; then
    check "$name: within $(( ($(date +%s%N) - start) / 1000000 )) ms (bound ${bound} s)" true
  else
    check "$name (bound ${bound} s)" "$@"
  fi
}

lab down >/dev/null 2>&1
if ! lab up --nodes 3 --pods-per-node 2 >"$T/up.log" 2>&1; then
  cat "$T/up.log"; echo "selfheal: 0 passed, 1 failed"; exit 1
fi
for p in node1-pod1 node2-pod1 node3-pod1; do serve "$p"; done
printf 'apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: e2e}\nspec:\n  clusterIP: 172.30.0.10\n  ports: [{name: http, port: 80, targetPort: 8080}]\n' | put svc-web
printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: e2e, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [%s], nodeName: node1}\n- {addresses: [%s], nodeName: node2}\n' \
  "$(pod_ip node1-pod1)" "$(pod_ip node2-pod1)" | put eps-web
both() { [ "$(answers node3-pod2 172.30.0.10 80 20)" = "node1-pod1 node2-pod1 " ]; }
check "setup: the Service reaches both endpoints" eventually 10 both
all_healthy() { for n in 1 2 3; do [ "$(healthz "node$n")" = 200 ] || return 1; done; }
check "setup: every node healthy" all_healthy

# 1. tun0 deleted: the bridge comes back and so do the pods on it.
repairs_before=$(metric node1 rsdn_pod_port_repairs_total)
ip -n ${NSP}node1 link del tun0
ports_back() { [ "$(ip -n ${NSP}node1 -o link show master tun0 2>/dev/null | grep -c '^[0-9]*: rsdn')" = 2 ]; }
timed "tun0 deleted on node1: both pod veths back on tun0" 5 ports_back
reaches_others() {
  inns node1-pod1 ping -c1 -W1 "$(pod_ip node2-pod1)" >/dev/null &&
    inns node1-pod1 ping -c1 -W1 "$(pod_ip node3-pod1)" >/dev/null
}
check "tun0 deleted: node1-pod1 reaches node2-pod1 and node3-pod1 again" eventually 5 reaches_others
ports_counted() {
  [ $(( $(metric node1 rsdn_pod_port_repairs_total) - repairs_before )) = 2 ] &&
    detail node1 pods repaired | grep -q 'put back on tun0'
}
check "tun0 deleted: rsdn_pod_port_repairs_total grew by 2 and /healthz shows the repair" ports_counted

# 2. The filter table flushed: every rule of ours is back, promptly.
filter_before=$(inns node1 iptables-nft-save -t filter | grep '^-A' | sort)
jumps_before=$(metric node1 rsdn_iptables_jump_repairs_total)
inns node1 iptables-nft -t filter -F
filter_back() { [ "$(inns node1 iptables-nft-save -t filter | grep '^-A' | sort)" = "$filter_before" ]; }
timed "filter table flushed on node1: all $(wc -l <<<"$filter_before") rules back" 15 filter_back
flush_counted() {
  [ "$(metric node1 rsdn_iptables_jump_repairs_total)" -gt "$jumps_before" ] &&
    detail node1 iptables repaired | grep -q 'jumps put back'
}
check "filter flushed: counted (rsdn_iptables_jump_repairs_total) and shown in /healthz" flush_counted

# 3. An endpoint chain and its jump deleted by hand on node3: the Service would silently send
# everything to the other endpoint.
nat_before=$(nat_rules node3)
svc=$(inns node3 iptables-nft-save -t nat | grep -- '-A KUBE-SERVICES .*172.30.0.10/32' | grep -o 'KUBE-SVC-[A-Z0-9]*')
jump=$(inns node3 iptables-nft-save -t nat | grep -- "-A $svc .*-j KUBE-SEP" | tail -1)
sep=${jump##*-j }
drift_before=$(metric node3 'rsdn_iptables_drift_chains_total{table="nat"}')
eval "inns node3 iptables-nft -t nat -D ${jump#-A }"
inns node3 iptables-nft -t nat -F "$sep"
inns node3 iptables-nft -t nat -X "$sep"
nat_back() { [ "$(nat_rules node3)" = "$nat_before" ]; }
timed "$sep and its jump deleted on node3: rewritten" 25 nat_back
drift_counted() {
  [ "$(metric node3 'rsdn_iptables_drift_chains_total{table="nat"}')" -ge $((drift_before + 2)) ] && both
}
check "chain deleted: counted (rsdn_iptables_drift_chains_total) and both endpoints answer again" drift_counted

# 4. Newcomers claiming subnets already in use: node2's exact podCIDR (with a creation time),
# a /22 covering node3's /23, and node10 without a timestamp (which sorts before node2).
node() { # node NAME CIDR IP [TIMESTAMP]
  printf 'apiVersion: v1\nkind: Node\nmetadata: {name: %s%s}\nspec: {podCIDR: %s}\nstatus: {addresses: [{type: InternalIP, address: %s}]}\n' \
    "$1" "${4:+, creationTimestamp: \"$4\"}" "$2" "$3" | put "$1"
}
node zzz-new 10.128.2.0/23 192.168.77.91 2020-01-01T00:00:00Z
node big 10.128.4.0/22 192.168.77.92
node node10 10.128.2.0/23 192.168.77.93
conflicts() { [ "$(metric node1 rsdn_node_subnet_conflicts)" = 3 ]; }
check "three newcomers claiming subnets in use: counted as conflicts on node1" eventually 5 conflicts
vtep() { lab exec node1 -- "$RSDN" tunnel list -o json | jq -r --arg s "$1" '.[] | select(.podSubnet == $s) | .nodeIp'; }
same_tunnels() { [ "$(vtep 10.128.2.0/23) $(vtep 10.128.4.0/23)" = "192.168.77.12 192.168.77.13" ]; }
check "conflicts: node1's tunnels still lead to node2 and node3" same_tunnels
check "conflicts: node1-pod1 still reaches node2-pod1 and node3-pod1" reaches_others
named() {
  [ "$(healthz node1)" = 200 ] && detail node1 nodes detail | grep -q 'zzz-new' &&
    detail node1 nodes detail | grep -q 'node10'
}
check "conflicts: /healthz stays 200 and names them" named
# A change elsewhere rebuilds the model: the conflicts are not logged again.
logged() { grep -c "skipping invalid object.*$1" "$LAB/node1/rsdn.log"; }
n_before=$(logged zzz-new)
printf 'apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: e2e}\nspec:\n  clusterIP: 172.30.0.11\n  ports: [{port: 80}]\n' | put svc-other
sleep 2
once() { [ "$n_before" = 1 ] && [ "$(logged zzz-new)" = 1 ]; }
check "a conflict is logged once, not on every rebuild ($n_before line(s) before)" once
rm -f "$LAB/cluster/zzz-new.yaml" "$LAB/cluster/big.yaml" "$LAB/cluster/node10.yaml"

# 5. A slice with two bad addresses and a good one: the good one is proxied.
printf 'apiVersion: v1\nkind: Service\nmetadata: {name: mixed, namespace: e2e}\nspec:\n  clusterIP: 172.30.0.12\n  ports: [{name: http, port: 80, targetPort: 8080}]\n' | put svc-mixed
printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: mixed-1, namespace: e2e, labels: {kubernetes.io/service-name: mixed}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: ["fd00::1"]}\n- {addresses: [999.1.1.1]}\n- {addresses: [%s], nodeName: node3}\n' "$(pod_ip node3-pod1)" | put eps-mixed
mixed() { [ "$(ask node1-pod2 172.30.0.12 80)" = node3-pod1 ]; }
check "a slice with fd00::1, 999.1.1.1 and a good address: the good endpoint answers" eventually 5 mixed

# 6. A file being replaced through a hidden temporary is not read half-way.
cp "$LAB/cluster/svc-web.yaml" "$LAB/cluster/.tmp-bad-ep.yaml"
sleep 2
not_read() { ! grep -q 'duplicate Service port' "$LAB/node1/rsdn.log"; }
check "a hidden temporary file is not read (no duplicate Service port logged)" not_read
rm -f "$LAB/cluster/.tmp-bad-ep.yaml"

# 7. 3000 idle connections from the outside host to :10256 hold a bounded number of the
# daemon's descriptors, and the probe is still answered meanwhile.
pid1=$(cat "$LAB/node1/rsdn.pid")
inns ext python3 -c '
import socket, time
s = []
for _ in range(3000):
    c = socket.socket(); c.settimeout(2)
    try: c.connect(("192.168.77.11", 10256)); s.append(c)
    except OSError: pass
time.sleep(8)' &
flood=$!
sleep 4
fds=$(ls "/proc/$pid1/fd" | wc -l)
code=$(healthz node1)
bounded() { [ "$fds" -lt 400 ] && [ "$code" = 200 ]; }
check "3000 idle connections: node1's daemon holds $fds descriptors (bound 400) and /healthz answers $code" bounded
wait "$flood" 2>/dev/null

# 8. CNI_NETNS naming a regular file: the spec's code 4, nothing allocated.
: >"$T/not-a-netns"
allocated() { ls "$LAB/node1/ipam/rsdn" | grep -c '^10\.'; }
before=$(allocated)
out=$(jq -c '.plugins[0] + {name: .name, cniVersion: .cniVersion}' "$LAB/node1/net.d/10-rsdn.conflist" |
  ip netns exec ${NSP}node1 env -i CNI_COMMAND=ADD CNI_CONTAINERID=bogus CNI_NETNS="$T/not-a-netns" CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni "$LAB/node1/bin/rsdn-cni")
code4() { [ "$(jq .code <<<"$out")" = 4 ] && [ "$(allocated)" = "$before" ]; }
check "CNI_NETNS a regular file: error code 4, no address taken ($out)" code4

check "after all of it: the 3-node matrix" lab matrix
check "after all of it: every node healthy" all_healthy

summary selfheal
