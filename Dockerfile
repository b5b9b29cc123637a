# The rsdn image: the node daemon (rsdn), the CNI plugin it installs on the host (rsdn-cni,
# static, so it runs whatever the host's libc), and the tools the daemon runs: iptables
# (both backends; the daemon detects which one the host uses, as kube-proxy does), ipset
# (NetworkPolicy's peer sets), conntrack (stale UDP entries), modprobe (br_netfilter, in the init step) and the CA certificates kube-rs
# loads when a kubeconfig names no CA of its own.
#   docker build -t rsdn:dev .        (hack/kind-up.sh does this and loads it into kind)
# The base images are arguments only so that a machine without a registry can substitute local
# ones (docs/operations.md says how this file was checked).
ARG RUST_IMAGE=docker.io/library/rust:1.89-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# Only what ships: rsdn and rsdn-cni (the development lab, rsdn-lab, needs `hack/build.sh --lab`).
RUN hack/build.sh

FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset conntrack kmod ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/dist/rsdn /src/target/dist/rsdn-cni /usr/local/bin/
CMD ["rsdn", "node"]
