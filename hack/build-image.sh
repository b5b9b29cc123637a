#!/usr/bin/env bash
# Builds the container image as rsdn:<crate version> (the tag manifests/kustomization.yaml
# names), with the OCI labels filled: org.opencontainers.image.version (the crate version) and
# .revision (the git commit, "-dirty" with uncommitted changes). The compiling is hack/build.sh's,
# run inside the Dockerfile.
# usage: hack/build-image.sh [BUILD ARGS...]   e.g. --build-arg SOURCE_URL=https://...
#   IMAGE=name:tag (default rsdn:<version>)   ENGINE=docker|podman (default: docker if its
#   engine answers, else podman)
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
version=$(crate_version)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && ! git diff --quiet HEAD 2>/dev/null; then revision+=-dirty; fi
engine=${ENGINE:-}
if [ -z "$engine" ]; then
  if docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
fi
image=${IMAGE:-rsdn:$version}
# --label as well as the build args: podman 4.3 (buildah) reuses a cached LABEL layer when only
# a build arg changed, and the image would keep the previous build's revision.
"$engine" build -t "$image" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.revision="$revision" "$@" .
echo "built $image (version $version, revision $revision)"
