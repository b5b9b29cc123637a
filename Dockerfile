# The rsdn image: the node daemon (rsdn), the CNI plugin it installs on the host (rsdn-cni,
# static, so it runs whatever the host's libc), and the tools the daemon runs: iptables
# (both backends; the daemon detects which one the host uses, as kube-proxy does), ipset
# (NetworkPolicy's peer sets), conntrack (stale UDP entries), modprobe (br_netfilter, in the
# init step), the CA certificates kube-rs loads when a kubeconfig names no CA of its own, and
# iproute2 (`ip`, `bridge`) for operators inspecting a node from the daemon pod.
#   hack/build-image.sh               (tags rsdn:<crate version>, fills VERSION and REVISION)
#   docker build -t rsdn:dev .        (the same, with "unknown" in the version labels)
# The base images are arguments only so that a machine without a registry can substitute local
# ones (docs/operations.md says how this file was checked).
ARG RUST_IMAGE=docker.io/library/rust:1.89-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, in a layer of their own: the manifests, the lockfile and empty stand-ins
# for the crates' sources, built by the one build recipe (hack/build.sh: same profile, target
# and flags as below, so the real build finds every dependency compiled). A change to the
# sources alone starts from here; a change to a Cargo.toml, Cargo.lock or hack/build.sh
# rebuilds the dependencies. Every [[bench]] of Cargo.toml needs a stand-in too (cargo refuses
# a manifest naming a missing target).
COPY Cargo.toml Cargo.lock ./
COPY cni/Cargo.toml cni/
COPY lab/Cargo.toml lab/
COPY testkit/Cargo.toml testkit/
COPY hack/build.sh hack/
RUN for d in src cni/src lab/src; do \
      mkdir -p "$d" && echo 'fn main() {}' >"$d/main.rs" && : >"$d/lib.rs"; \
    done \
 && mkdir -p testkit/src benches && : >testkit/src/lib.rs \
 && sed -n '/^\[\[bench\]\]/,/^name/ s/^name = "\(.*\)"$/\1/p' Cargo.toml >/tmp/benches \
 && while read -r b; do echo 'fn main() {}' >"benches/$b.rs"; done </tmp/benches \
 && hack/build.sh \
 && rm -rf src cni/src lab/src testkit/src benches target/dist
COPY . .
# COPY keeps the files' own modification times, which may be older than the stand-ins' build:
# touch the sources so that cargo rebuilds the workspace's crates (and only those).
# Only what ships: rsdn and rsdn-cni (the development lab, rsdn-lab, needs `hack/build.sh --lab`).
RUN find src cni/src lab/src testkit/src -name '*.rs' -exec touch {} + \
 && hack/build.sh

FROM ${BASE_IMAGE}
# Unpinned on purpose (hadolint DL3008): a rebuild takes the distribution's security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      iptables ipset conntrack kmod iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/dist/rsdn /src/target/dist/rsdn-cni /usr/local/bin/
# Filled by whoever builds (hack/build-image.sh: the crate version and the git commit); last,
# so that a new commit does not invalidate the layers above. No public repository exists yet:
# SOURCE_URL is empty unless given.
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE_URL=
LABEL org.opencontainers.image.title="rsdn" \
      org.opencontainers.image.description="rsdn node daemon and CNI plugin: VXLAN overlay, iptables Service proxy, NetworkPolicy" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
CMD ["rsdn", "node"]
