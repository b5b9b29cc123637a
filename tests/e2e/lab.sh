#!/usr/bin/env bash
# End-to-end tier for the overlay: the real `rsdn node` daemons and `rsdn-cni` in a simulated
# cluster of network namespaces (`rsdn lab`). Checks the all-pairs matrix across 3 nodes, node
# removal and addition through the cluster directory, daemon restarts (SIGKILL and SIGTERM)
# under a running ping with no loss, healing of hand-deleted state, and lab teardown.
# Usage: tests/e2e/lab.sh [dir-with-rsdn-and-rsdn-cni]   (root; prints "N passed, N failed")
set -uo pipefail

BIN_DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug}
RSDN=$BIN_DIR/rsdn
T=$(mktemp -d /tmp/rsdn-lab-e2e.XXXXXX)
source "$(dirname "$0")/lib.sh"
trap lab_cleanup EXIT

# complete NODE: how many complete tunnels NODE has.
complete() { lab exec "$1" -- "$RSDN" tunnel list -o json 2>/dev/null | jq '[.[] | select(.fdb and .neigh and .route)] | length'; }
# total NODE: how many tunnel rows, complete or not.
total() { lab exec "$1" -- "$RSDN" tunnel list -o json | jq 'length'; }
pod_ping() { lab exec "$1" -- ping -c1 -W2 "$(pod_ip "$2")"; }
daemon_pid() { cat "$LAB/$1/rsdn.pid"; }
# running PID: exists and is not a zombie (kill -0 succeeds on zombies).
running() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }

lab down >/dev/null 2>&1
if ! lab up --nodes 3 --pods-per-node 2 >"$T/up.log" 2>&1; then
  cat "$T/up.log"; echo "lab: 0 passed, 1 failed"; exit 1
fi
cat "$T/up.log"

check "all-pairs matrix across 3 nodes (ping, TCP and UDP)" lab matrix
# The DaemonSet's init step, as the lab runs it in each node's namespace: a fresh namespace has
# forwarding off, so install-cni (not the daemon) turned it on, and pods were attached with the
# copy it installed.
check "install-cni put rsdn-cni into node1's CNI binary directory and prepared the node" bash -c "
  cmp -s $BIN_DIR/rsdn-cni $LAB/node1/bin/rsdn-cni && test -x $LAB/node1/bin/rsdn-cni &&
  grep -q 'installed $LAB/node1/bin/rsdn-cni' $LAB/node1/install-cni.log &&
  grep -q 'set /proc/sys/net/ipv4/ip_forward to 1' $LAB/node1/install-cni.log &&
  ! grep -q 'sysctl=/proc/sys/net/ipv4/ip_forward' $LAB/node1/rsdn.log"

# A node that leaves the cluster directory loses its entries on every peer.
mv "$LAB/cluster/node3.yaml" "$T/node3.yaml"
gone() { [ "$(total node1)" = 1 ] && [ "$(total node2)" = 1 ] && ! ip -n ${NSP}node1 route | grep -q 10.128.4.0/23; }
check "node3 removed from the directory: its route, neighbour and FDB entry leave node1 and node2" eventually 10 gone
mv "$T/node3.yaml" "$LAB/cluster/node3.yaml"
back() { [ "$(complete node1)" = 2 ] && [ "$(complete node2)" = 2 ]; }
check "node3 back: complete tunnels again" eventually 10 back
check "node3 reachable again from node1" pod_ping node1-pod1 node3-pod1

# A node added later is reachable from the others and reaches them.
lab up --nodes 4 --pods-per-node 1 >"$T/up4.log" 2>&1 || cat "$T/up4.log"
check "node4 added later: node1-pod1 reaches node4-pod1" pod_ping node1-pod1 node4-pod1
check "node4 added later: node4-pod1 reaches node3-pod2" pod_ping node4-pod1 node3-pod2
check "4-node matrix" lab matrix

# Restarts lose no packet: SIGKILL node1's and node2's daemons, restart them, then SIGTERM node2's.
target=$(pod_ip node2-pod1)
idx_before=$(ip -n ${NSP}node1 -o link show vxlan0 | cut -d: -f1)
lab exec node1-pod1 -- ping -i 0.02 -c 300 -W 1 "$target" >"$T/ping.log" 2>&1 &
ping_pid=$!
sleep 1
old_pids="$(daemon_pid node1) $(daemon_pid node2)"
kill -9 $old_pids
sleep 0.5
lab up --nodes 4 --pods-per-node 1 >/dev/null 2>&1
killed_pids="$(daemon_pid node1) $(daemon_pid node2)"
sleep 1
kill -TERM "$(daemon_pid node2)"
sleep 0.5
lab up --nodes 4 --pods-per-node 1 >/dev/null 2>&1
wait "$ping_pid"
restarted() {
  local n1 n2_after_kill n2_now
  read -r n1 n2_after_kill <<<"$killed_pids"
  n2_now=$(daemon_pid node2)
  echo "before: $old_pids; after SIGKILL: $killed_pids; node2 after SIGTERM: $n2_now"
  running "$n1" && running "$n2_now" && ! running "$n2_after_kill" || return 1
  for p in $old_pids; do case " $killed_pids $n2_now " in *" $p "*) return 1 ;; esac; done
  [ "$(grep -c 'rsdn node starting' "$LAB/node2/rsdn.log")" -eq 3 ]
}
check "daemons really restarted (new pids; node2 started 3 times)" restarted
check "install-cni on restart: the same plugin is left alone" \
  grep -q "rsdn-cni is already this version; left alone" "$LAB/node2/install-cni.log"
no_loss() { grep -q " 0% packet loss" "$T/ping.log" && grep -q "300 packets transmitted" "$T/ping.log"; }
check "daemons killed and restarted while pinging: $(grep -o '[0-9]* received' "$T/ping.log"), 0% loss" no_loss
same_vxlan() { [ "$(ip -n ${NSP}node1 -o link show vxlan0 | cut -d: -f1)" = "$idx_before" ]; }
check "restart kept vxlan0 (same ifindex, not recreated)" same_vxlan
sigterm_clean() { grep -q "datapath stays in place" "$LAB/node2/rsdn.log"; }
check "SIGTERM: clean shutdown logged" sigterm_clean

# Healing: state deleted by hand comes back within seconds (netlink events + resync).
healed() { [ "$(complete node1)" = 3 ] && pod_ping node1-pod1 node2-pod1 >/dev/null; }
heal() { # heal NAME CMD...: break with CMD, expect healed within 5 s, report the time
  local name=$1; shift
  local start=$(date +%s%N)
  "$@"
  if eventually 5 healed; then
    echo "healed in $(( ($(date +%s%N) - start) / 1000000 )) ms" >"$T/heal.log"
    check "$name healed in $(cat "$T/heal.log" | grep -o '[0-9]* ms')" true
  else
    check "$name healed" false
  fi
}
mac2=$(lab exec node1 -- "$RSDN" tunnel list -o json | jq -r '.[] | select(.podSubnet == "10.128.2.0/23") | .vtepMac')
heal "route deleted by hand" ip -n ${NSP}node1 route del 10.128.2.0/23
heal "neighbour deleted by hand" ip -n ${NSP}node1 neigh del 10.128.2.0 dev vxlan0
heal "FDB entry deleted by hand" bridge -n ${NSP}node1 fdb del "$mac2" dev vxlan0 dst 192.168.77.12 self
heal "vxlan0 deleted by hand" ip -n ${NSP}node1 link del vxlan0
check "after healing: 4-node matrix" lab matrix

# rsdn cleanup on node4, its daemon stopped (as after deleting the DaemonSet): everything of
# rsdn's goes, the pod's veth stays; a second run finds nothing; a new daemon rebuilds the node.
pid4=$(daemon_pid node4)
kill -TERM "$pid4"
eventually 5 bash -c "! [ -d /proc/$pid4 ] || grep -q '^State:.*Z' /proc/$pid4/status"
inns node4 "$RSDN" cleanup --config "$LAB/node4/config.yaml" >"$T/cleanup1.log" 2>&1
inns node4 "$RSDN" cleanup --config "$LAB/node4/config.yaml" >"$T/cleanup2.log" 2>&1
nothing_of_rsdn_left() {
  cat "$T/cleanup1.log"
  ! ip -n ${NSP}node4 link show vxlan0 2>/dev/null && ! ip -n ${NSP}node4 link show tun0 2>/dev/null &&
    [ -z "$(ip -n ${NSP}node4 route show proto 212)" ] &&
    ! ip netns exec ${NSP}node4 iptables-save | grep -E 'KUBE|RSDN' &&
    [ -z "$(ip netns exec ${NSP}node4 ipset list -n | grep '^RSDN-')" ] &&
    [ ! -e "$LAB/node4/net.d/10-rsdn.conflist" ] &&
    [ -n "$(ip -n ${NSP}node4 -o link show type veth | grep -v eth0)" ] &&   # the pod's veth
    grep -q 'removed: link tun0 (1 port' "$T/cleanup1.log"
}
check "rsdn cleanup on node4: nothing of rsdn's left, the pod's veth kept" nothing_of_rsdn_left
check "rsdn cleanup again: nothing to remove, exit 0" \
  grep -q "nothing of rsdn's to remove on this node" "$T/cleanup2.log"
lab up --nodes 4 --pods-per-node 1 >/dev/null 2>&1
check "a new daemon on node4 rebuilds it (conflist back)" \
  eventually 10 test -s "$LAB/node4/net.d/10-rsdn.conflist"

# Teardown, also after a crash half-way (daemons SIGKILLed, pid files gone).
kill -9 "$(daemon_pid node3)" "$(daemon_pid node4)"
rm -f "$LAB/node1/rsdn.pid" "$LAB/node2/rsdn.pid"
lab down >"$T/down.log" 2>&1
all_gone() {
  ! lab_namespaces && [ ! -d "$LAB" ] && ! pgrep -f "node --config $LAB/" >/dev/null
}
check "lab down after a crash: no namespaces, state or daemons left ($(cat "$T/down.log"))" all_gone

summary lab
