# Shared by the end-to-end scripts: a pass/fail counter and its closing line, and the lab
# helpers. Source it after setting T (a scratch directory) and, for lab suites, RSDN.
# The lab is the one named by RSDN_LAB (default rsdn-lab): set it to run a suite beside other
# labs (RSDN_LAB=mine bash tests/e2e/lab.sh).
passed=0
failed=0
export RSDN_LAB=${RSDN_LAB:-rsdn-lab}
LAB=/run/$RSDN_LAB   # the lab's state directory
NSP=$RSDN_LAB-       # the prefix of its network namespaces

lab() { "$RSDN" lab "$@"; }
eventually() { # eventually SECONDS CMD...: polls CMD every 50 ms
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -ge $deadline ] && return 1; sleep 0.05; done
}
netns_of() { # netns_of NODE-or-POD: node1, node1-pod1, ext, or NS/POD (a pod of `lab pod add`)
  case $1 in */*) echo "${NSP}pod.${1%%/*}.${1#*/}" ;; *) echo "$NSP$1" ;; esac
}
inns() { local n; n=$(netns_of "$1"); shift; ip netns exec "$n" "$@"; }   # inns NODE-or-POD CMD...
pod_ip() { lab status --json | jq -r --arg p "$1" '.pods[] | select(.name == $p or .pod == $p) | .ip'; }
# lab_namespaces [LAB]: the network namespaces of the lab (exactly its names, not another lab's).
lab_namespaces() {
  ip netns list | awk '{print $1}' |
    grep -E "^${1:-$RSDN_LAB}-(underlay|ext|node[1-9][0-9]*(-pod[1-9][0-9]*)?|pod\.[a-z0-9-]+\.[a-z0-9-]+)\$"
}

# netpol_pods: the pods of the upstream NetworkPolicy tests, in namespaces x, y, z (lab ns add):
# a, b, c in each, on node1, node2, node3, labelled pod=NAME, serving TCP and UDP on 80 and 81
# (container ports serve-80-tcp, serve-80-udp, serve-81-tcp, serve-81-udp).
netpol_pods() {
  local ns p n
  for ns in x y z; do
    n=1
    for p in a b c; do
      lab pod add "$ns/$p" --node $n --labels "pod=$p" --port 80 --port 81 --serve
      n=$((n + 1))
    done
  done
}

check() { # check NAME CMD... : runs CMD, counts, shows its output's tail on failure
  local name=$1; shift
  if "$@" >"$T/last.log" 2>&1; then
    passed=$((passed + 1)); echo "ok   $name"
  else
    failed=$((failed + 1)); echo "FAIL $name"; sed 's/^/     /' "$T/last.log" | tail -25
  fi
}

summary() { # summary SUITE : the closing line hack/test.sh sums, and the exit status
  echo "$1: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

# Lab suites: `trap lab_cleanup EXIT` kills the servers they started in pods (their pids in
# SERVERS), tears the lab down and removes the scratch directory.
SERVERS=()
lab_cleanup() {
  [ ${#SERVERS[@]} -gt 0 ] && kill "${SERVERS[@]}" 2>/dev/null
  "$RSDN" lab down >/dev/null 2>&1; rm -rf "$T"
}
