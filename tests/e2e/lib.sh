# Shared by the end-to-end scripts: a pass/fail counter and its closing line, and the lab
# helpers. Source it after setting T (a scratch directory) and, for lab suites, RSDN.
passed=0
failed=0
LAB=/run/rsdn-lab

lab() { "$RSDN" lab "$@"; }
eventually() { # eventually SECONDS CMD...: polls CMD every 50 ms
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -ge $deadline ] && return 1; sleep 0.05; done
}
inns() { local n=$1; shift; ip netns exec "rsdn-lab-$n" "$@"; }   # inns NODE-or-POD CMD...
pod_ip() { lab status --json | jq -r --arg p "$1" '.pods[] | select(.name == $p) | .ip'; }

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
