#!/usr/bin/env bash
# End-to-end tier for Services: a 3-node `rsdn lab` whose daemons program kube-proxy-style
# iptables NAT from Service and EndpointSlice objects written into the cluster directory.
# Every pod runs a socat server that answers "<pod name> <client address>", so each check sees
# both who answered and which source address reached the endpoint.
# Usage: tests/e2e/services.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=$(mktemp -d /tmp/rsdn-svc-e2e.XXXXXX)
source "$(dirname "$0")/lib.sh"
trap lab_cleanup EXIT
# ask FROM DST PORT [udp]: one request; prints "<answering pod> <address it saw>".
ask() {
  if [ "${4:-}" = udp ]; then
    echo q | inns "$1" socat -T1 - "UDP:$2:$3,sourceport=40053,reuseaddr" 2>/dev/null
  else
    inns "$1" socat -T2 - "TCP:$2:$3,connect-timeout=2" </dev/null 2>/dev/null
  fi
}
answers() { # answers FROM DST PORT N: who answered N requests, one name per line, sorted
  for _ in $(seq "$4"); do ask "$1" "$2" "$3" | cut -d' ' -f1; done | sort
}
serve() { # serve NAMESPACE NAME: TCP 8080 and UDP 5353 servers answering "NAME PEER"
  ip netns exec "$NSP$1" socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:"echo $2 \$SOCAT_PEERADDR" &
  SERVERS+=($!)
  ip netns exec "$NSP$1" socat UDP-RECVFROM:5353,fork,reuseaddr SYSTEM:"echo $2 \$SOCAT_PEERADDR" &
  SERVERS+=($!)
}
put() { cat >"$LAB/cluster/.$1.tmp" && mv "$LAB/cluster/.$1.tmp" "$LAB/cluster/$1.yaml"; }
service() { # service NAME IP [extra spec lines...]: a Service with port 80 -> 8080 (TCP) and 53 -> 5353 (UDP)
  local name=$1 ip=$2; shift 2
  { printf 'apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: e2e}\nspec:\n  clusterIP: %s\n' "$name" "$ip"
    for l in "$@"; do printf '  %s\n' "$l"; done
    printf '  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: dns, port: 53, protocol: UDP}\n'
  } | put "svc-$name"
}
endpoints() { # endpoints SERVICE POD...: its EndpointSlice (ready endpoints on the pods' nodes)
  local name=$1 list="" p; shift
  for p in "$@"; do list+="- {addresses: [$(pod_ip "$p")], nodeName: ${p%%-*}}"$'\n'; done
  { printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: %s-1, namespace: e2e, labels: {kubernetes.io/service-name: %s}}\naddressType: IPv4\nports:\n- {name: http, port: 8080}\n- {name: dns, port: 5353, protocol: UDP}\n' "$name" "$name"
    if [ -n "$list" ]; then printf 'endpoints:\n%s' "$list"; else printf 'endpoints: []\n'; fi
  } | put "eps-$name"
}

lab down >/dev/null 2>&1
if ! lab up --nodes 3 --pods-per-node 2 >"$T/up.log" 2>&1; then
  cat "$T/up.log"; echo "services: 0 passed, 1 failed"; exit 1
fi
for n in 1 2 3; do for p in 1 2; do serve "node$n-pod$p" "node$n-pod$p"; done; done
ip netns exec ${NSP}ext socat TCP-LISTEN:9000,fork,reuseaddr SYSTEM:'echo ext $SOCAT_PEERADDR' &
SERVERS+=($!)
# An external IP is routed to node1 by the network, as an operator would arrange.
ip -n ${NSP}ext route add 192.168.77.200/32 via 192.168.77.11

service web 172.30.0.10 "type: NodePort" "externalIPs: [192.168.77.200]"
sed -i 's/port: 80, targetPort: http}/port: 80, targetPort: http, nodePort: 30080}/' "$LAB/cluster/svc-web.yaml"
endpoints web node1-pod1 node2-pod1
service empty 172.30.0.11
endpoints empty
service self 172.30.0.12
endpoints self node1-pod1
service sticky 172.30.0.13 "sessionAffinity: ClientIP"
endpoints sticky node1-pod2 node2-pod2 node3-pod2
service local 172.30.0.14 "type: NodePort" "externalTrafficPolicy: Local"
sed -i 's/port: 80, targetPort: http}/port: 80, targetPort: http, nodePort: 30081}/' "$LAB/cluster/svc-local.yaml"
endpoints local node2-pod2
service dns 172.30.0.53
endpoints dns node1-pod2
service lb 172.30.0.15 "type: LoadBalancer" "externalTrafficPolicy: Local" "healthCheckNodePort: 32100"
endpoints lb node2-pod2

ready() { ask node3-pod1 172.30.0.10 80 | grep -q pod1; }
check "rules programmed within 5 s of writing the objects" eventually 5 ready

both_endpoints() {
  answers node3-pod1 172.30.0.10 80 30 | uniq -c | tee /dev/stderr | awk '{print $2}' | tr '\n' ' ' | grep -qx 'node1-pod1 node2-pod1 '
}
check "ClusterIP from a pod on node3: both endpoints (node1, node2) get traffic" both_endpoints
from_pod_keeps_source() { ask node3-pod1 172.30.0.10 80 | grep -Eq "^node[12]-pod1 $(pod_ip node3-pod1)$"; }
check "ClusterIP: the endpoint sees the client pod's own address" from_pod_keeps_source
nodeport() { ask ext 192.168.77.13 30080 | grep -Eq '^node[12]-pod1 '; }
check "NodePort reached from the outside host through node3 (no local endpoint)" nodeport
external_ip() { ask ext 192.168.77.200 80 | grep -Eq '^node[12]-pod1 '; }
check "externalIP reached from the outside host" external_ip
hairpin() { ask node1-pod1 172.30.0.12 80 | tee /dev/stderr | grep -q '^node1-pod1 10.128.0.1$'; }
check "hairpin: a pod reaches itself through its Service (masqueraded to the gateway)" hairpin
refused() {
  local start=$SECONDS out
  out=$(inns node3-pod1 socat -T2 - TCP:172.30.0.11:80,connect-timeout=3 </dev/null 2>&1)
  echo "$out"; [[ $out == *"Connection refused"* ]] && [ $((SECONDS - start)) -le 1 ]
}
check "a Service without endpoints refuses at once" refused
sticky() { [ "$(answers node3-pod1 172.30.0.13 80 20 | uniq | wc -l)" -eq 1 ]; }
check "ClientIP affinity: 20 requests, one endpoint" sticky
local_keeps_client() { ask ext 192.168.77.12 30081 | tee /dev/stderr | grep -qx 'node2-pod2 192.168.77.250'; }
check "externalTrafficPolicy Local: the endpoint sees the outside client's address" local_keeps_client
local_no_endpoint() { ! ask ext 192.168.77.13 30081 | grep -q .; }
check "externalTrafficPolicy Local: a node without a local endpoint does not answer" local_no_endpoint
# health NODE-IP: the health check node port's status code and localEndpoints, from outside.
health() {
  local code
  code=$(inns ext curl -s -o "$T/hc" -w '%{http_code}' "http://$1:32100/") || return 1
  echo "$code $(jq -c '[.service.namespace, .service.name, .localEndpoints]' "$T/hc")"
}
hc_is() { [ "$(health "$1")" = "$2" ]; }   # hc_is NODE-IP "CODE [ns,name,count]"
check "health check node port: 200 with localEndpoints 1 on the node with the endpoint" \
  eventually 5 hc_is 192.168.77.12 '200 ["e2e","lb",1]'
check "health check node port: 503 with localEndpoints 0 on a node without one" \
  hc_is 192.168.77.13 '503 ["e2e","lb",0]'
endpoints lb node3-pod1 node3-pod2
check "health check node port follows the endpoints (node3: 2, node2: 503)" eventually 5 \
  eval "hc_is 192.168.77.13 '200 [\"e2e\",\"lb\",2]' && hc_is 192.168.77.12 '503 [\"e2e\",\"lb\",0]'"
rm "$LAB/cluster/svc-lb.yaml"
hc_closed() { ! inns ext curl -s -o /dev/null "http://192.168.77.13:32100/"; }
check "health check node port closes with its Service" eventually 5 hc_closed
egress() { inns node2-pod1 socat -T2 - TCP:192.168.77.250:9000 </dev/null | tee /dev/stderr | grep -qx 'ext 192.168.77.12'; }
check "a pod reaching the outside host is seen with its node's address" egress
pod_to_pod() { inns node3-pod1 socat -T2 - "TCP:$(pod_ip node1-pod2):8080" </dev/null | grep -qx "node1-pod2 $(pod_ip node3-pod1)"; }
check "pod to pod across nodes keeps the source address" pod_to_pod

only_node2() { [ "$(answers node3-pod1 172.30.0.10 80 4 | uniq)" = node2-pod1 ]; }
start=$(date +%s%3N)
endpoints web node2-pod1
if eventually 5 only_node2; then
  took=$(( $(date +%s%3N) - start ))
  check "endpoint change takes effect (web -> node2-pod1 only) within a second: ${took} ms" [ "$took" -lt 1000 ]
else
  check "endpoint change takes effect (web -> node2-pod1 only)" false
fi

udp_first() { ask node3-pod1 172.30.0.53 53 udp | grep -q '^node1-pod2 '; }
check "UDP Service answers from its endpoint (node1-pod2)" eventually 5 udp_first
# Replace the endpoint while the client keeps its source port (one conntrack flow) and the old
# server keeps running: only clearing the flow sends the client to the new endpoint.
endpoints dns node2-pod2
udp_moved() { ask node3-pod1 172.30.0.53 53 udp | grep -q '^node2-pod2 '; }
check "UDP Service keeps working after its endpoint is replaced (stale flow cleared)" eventually 5 udp_moved

# The conntrack reconciler works from the kernel's table, not from remembered changes: an
# endpoint replaced while node3's daemon is down (the old server still answers, node3's rules
# still DNAT to it) is cleared by the first sync after the restart.
udp_on() { ask node3-pod1 "$1" 53 udp | grep -q "^$2 "; }   # udp_on SERVICE-IP POD
dpid=$(cat "$LAB/node3/rsdn.pid")
kill -TERM "$dpid"
eventually 10 eval '! kill -0 '"$dpid"' 2>/dev/null'
endpoints dns node1-pod2
check "daemon down: the client's UDP flow stays where node3 sent it (node2-pod2)" udp_on 172.30.0.53 node2-pod2
lab up --nodes 3 --pods-per-node 2 >"$T/restart.log" 2>&1 || cat "$T/restart.log"
check "daemon restarted: the flow to the replaced endpoint is cleared (node1-pod2 answers)" \
  eventually 10 udp_on 172.30.0.53 node1-pod2
# A client that sent before its Service had endpoints has an un-NATed flow (its packets go out
# by the default route): the first endpoint must take it over at once, not when the client
# pauses for 30 s. (Once a Service exists without endpoints its packets are refused before
# conntrack confirms a flow, so the flow must predate the Service.)
ask node3-pod1 172.30.0.60 53 udp >/dev/null 2>&1
unnated() { inns node3 conntrack -L -p udp --orig-dst 172.30.0.60 2>/dev/null | grep -q 'src=172.30.0.60 '; }
check "a UDP client of a Service not there yet has an un-NATed flow on node3" unnated
endpoints zero node2-pod1
start=$(date +%s%3N)
service zero 172.30.0.60
if eventually 10 udp_on 172.30.0.60 node2-pod1; then
  took=$(( $(date +%s%3N) - start ))
  check "0 -> 1 endpoint: the client's UDP flow moves to it within 5 s (not after a 30 s pause): ${took} ms" [ "$took" -lt 5000 ]
else
  check "0 -> 1 endpoint: the client's UDP flow moves to it" false
fi
# Rules put back after a flush: a UDP client that sends while node3's nat table is empty gets
# an un-NATed flow (its packets leave by the default route); when the probe has put the rules
# back, the flow is cleared though no Service changed, and the client reaches the endpoint
# again (not after it pauses for 30 s, nor at the hourly full sync). A fresh flow each try (the
# old one deleted); tried again if the repair came before the request.
gap_flow() {
  inns node3 conntrack -D -p udp --orig-dst 172.30.0.60 >/dev/null 2>&1
  inns node3 iptables-nft -t nat -F
  ask node3-pod1 172.30.0.60 53 udp >/dev/null 2>&1
  unnated
}
check "nat flushed on node3: a UDP client in the gap has an un-NATed flow" eventually 5 gap_flow
start=$(date +%s%3N)
if eventually 20 udp_on 172.30.0.60 node2-pod1; then
  took=$(( $(date +%s%3N) - start ))
  check "nat flushed: once the rules are back the flow is cleared and node2-pod1 answers again: ${took} ms" [ "$took" -lt 15000 ]
else
  check "nat flushed: once the rules are back the flow is cleared and node2-pod1 answers again" false
fi

# nodePortAddresses: node1 answers NodePorts only on its addresses inside 192.168.77.96/27
# (a second address on eth0), not on its node IP; an address added later answers too.
ip -n "${NSP}node1" addr add 192.168.77.111/24 dev eth0
np_answers() { ask ext "$1" 30080 | grep -Eq '^node2-pod1 '; }
check "NodePort answers on every local address by default (192.168.77.111)" eventually 5 np_answers 192.168.77.111
echo 'nodePortAddresses: [192.168.77.96/27]' >"$LAB/node1/config.extra.yaml"
dpid=$(cat "$LAB/node1/rsdn.pid")
kill -TERM "$dpid"
eventually 10 eval '! kill -0 '"$dpid"' 2>/dev/null'
lab up --nodes 3 --pods-per-node 2 >"$T/restart.log" 2>&1 || cat "$T/restart.log"
np_only_inside() { np_answers 192.168.77.111 && ! np_answers 192.168.77.11; }
check "nodePortAddresses 192.168.77.96/27: NodePort answers on 192.168.77.111, not on the node IP" \
  eventually 10 np_only_inside
np_rule() {
  inns node1 iptables-save -t nat | grep -- '-j KUBE-NODEPORTS' | tee /dev/stderr |
    grep -q -- '^-A KUBE-SERVICES -d 192.168.77.111/32 -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -j KUBE-NODEPORTS$'
}
check "nodePortAddresses: KUBE-SERVICES jumps to KUBE-NODEPORTS per address (-d)" eventually 3 np_rule
ip -n "${NSP}node1" addr add 192.168.77.112/24 dev eth0
check "nodePortAddresses: an address added inside the CIDR answers within the resync period" \
  eventually 8 np_answers 192.168.77.112

# Topology: node1 and node2 in zone-a, node3 in zone-b (their Node objects' labels; `lab up`
# writes them without, so this comes after the restarts above). A PreferClose Service keeps
# each client in its zone; a zone without endpoints falls back to all of them.
for n in 1 2 3; do
  zone=zone-a; [ $n = 3 ] && zone=zone-b
  sed -i "s|^  name: node$n\$|  name: node$n\n  labels: {topology.kubernetes.io/zone: $zone}|" "$LAB/cluster/node$n.yaml"
done
zoned() { # zoned SERVICE POD:ZONE...: its EndpointSlice, each endpoint with its zone
  local name=$1 list="" p; shift
  for p in "$@"; do list+="- {addresses: [$(pod_ip "${p%%:*}")], nodeName: ${p%%-*}, zone: ${p#*:}}"$'\n'; done
  printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: %s-1, namespace: e2e, labels: {kubernetes.io/service-name: %s}}\naddressType: IPv4\nports:\n- {name: http, port: 8080}\n- {name: dns, port: 5353, protocol: UDP}\nendpoints:\n%s' "$name" "$name" "$list" | put "eps-$name"
}
zoned close node1-pod1:zone-a node3-pod1:zone-b
service close 172.30.0.70 "trafficDistribution: PreferClose"
only() { [ "$(answers "$1" 172.30.0.70 80 "$3" | uniq | tr '\n' ' ')" = "$2 " ]; }   # only CLIENT POD N
check "PreferClose: a client in zone-a (node2) reaches only the zone-a endpoint (20 requests)" \
  eventually 10 only node2-pod2 node1-pod1 20
check "PreferClose: a client in zone-b (node3) reaches only the zone-b endpoint (20 requests)" \
  only node3-pod2 node3-pod1 20
zoned close node1-pod1:zone-a node2-pod1:zone-a
spread() { [ "$(answers node3-pod2 172.30.0.70 80 20 | uniq | tr '\n' ' ')" = "node1-pod1 node2-pod1 " ]; }
check "PreferClose: no endpoint in zone-b, so node3's client reaches every endpoint" eventually 10 spread

rules_read_well() {
  local save
  save=$(inns node1 iptables-save -t nat) || return 1
  [[ $save != *Warning* ]] && grep -q -- '-A KUBE-SERVICES -d 172.30.0.10/32 -p tcp -m comment --comment "e2e/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-' <<<"$save"
}
check "iptables-save shows kube-proxy's rules and comments, and no backend warning" rules_read_well

summary services
