# Shared by the end-to-end scripts: a pass/fail counter and its closing line. Source it after
# setting T (a scratch directory).
passed=0
failed=0

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
