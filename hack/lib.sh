# Shared helpers for hack/ scripts. Source it; do not run it.

# Packages every tier and the demo need (see ../shared/testing.md in the project notes and
# docs/testing.md): kernel tools, iptables, a real container runtime, reference CNI plugins.
RSDN_PACKAGES=(iproute2 iptables conntrack iputils-ping iperf3 netcat-openbsd podman runc
  containernetworking-plugins busybox-static jq hyperfine bc socat curl python3 ipset ethtool)

# Installs whatever of RSDN_PACKAGES is missing (Debian/Ubuntu, as root).
ensure_packages() {
  local missing=()
  for p in "${RSDN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]} (run as root to install them)" >&2
    return 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

require_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0 needs root: it creates network namespaces (never touching the root namespace)" >&2
    exit 1
  fi
}
