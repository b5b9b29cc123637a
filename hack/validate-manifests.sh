#!/usr/bin/env bash
# Validates manifests/ strictly (unknown fields are errors) against the Kubernetes OpenAPI
# schemas of every minor version rsdn supports (docs/operations.md states the range), with the
# pinned kubernetes-validate (hack/lib.sh; its schemas ship in the package: no network, no
# cluster). Validated: each resource file manifests/kustomization.yaml lists, and what the
# kustomization renders (ConfigMap generated from config.yaml, image tag, hashed name) where
# kubectl (kustomize built in) or kustomize is on PATH; without either, the raw files only,
# and tests/manifests.rs still checks the kustomization's consistency.
# usage: hack/validate-manifests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib.sh
KUBERNETES_VERSIONS=(1.33 1.34 1.35 1.36 1.37)

kv=$(ensure_kubernetes_validate)
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

# The kustomization's resources (the venv has PyYAML).
mapfile -t files < <("$(dirname "$kv")/python" -c '
import sys, yaml
k = yaml.safe_load(open("manifests/kustomization.yaml"))
for r in k["resources"]: print("manifests/" + r)')
[ ${#files[@]} -gt 0 ] || { echo "no resources in manifests/kustomization.yaml" >&2; exit 1; }

if command -v kubectl >/dev/null && kubectl kustomize manifests >"$T/rendered.yaml"; then
  files+=("$T/rendered.yaml")
elif command -v kustomize >/dev/null && kustomize build manifests >"$T/rendered.yaml"; then
  files+=("$T/rendered.yaml")
else
  echo "SKIP the kustomize output: neither kubectl nor kustomize on PATH (raw files only)"
fi

status=0
for v in "${KUBERNETES_VERSIONS[@]}"; do
  # A document whose schema is unknown is only a warning to kubernetes-validate: an error here.
  if ! "$kv" --strict --quiet -k "$v.0" "${files[@]}" >"$T/out" 2>&1 || grep -q . "$T/out"; then
    sed "s|$T/||" "$T/out"
    echo "manifests: FAILED against Kubernetes $v"
    status=1
  fi
done
[ "$status" -eq 0 ] &&
  echo "manifests: ${#files[@]} files valid (strict) against Kubernetes ${KUBERNETES_VERSIONS[0]} to ${KUBERNETES_VERSIONS[-1]}"
exit "$status"
