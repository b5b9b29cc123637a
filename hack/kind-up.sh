#!/usr/bin/env bash
# A kind cluster (1 control plane, 2 workers) running rsdn instead of kindnet and kube-proxy:
# creates the cluster, builds the image, loads it into the nodes, applies manifests/ and waits
# for every node to be Ready. Needs docker, kind and kubectl. Then: hack/kind-e2e.sh.
#   CLUSTER=rsdn (kind cluster name)   hack/kind-up.sh [down]
# Written for kind v0.20+; not run on the development VM (no container engine): docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-rsdn}
source hack/lib.sh
IMAGE=rsdn:$(crate_version)   # the image manifests/kustomization.yaml names

if [ "${1:-}" = down ]; then exec kind delete cluster --name "$CLUSTER"; fi
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-up: $tool is needed" >&2; exit 1; }
done

kind get clusters | grep -qx "$CLUSTER" ||
  kind create cluster --name "$CLUSTER" --config hack/kind/config.yaml
kubectl config use-context "kind-$CLUSTER" >/dev/null
ENGINE=docker IMAGE=$IMAGE hack/build-image.sh
kind load docker-image "$IMAGE" --name "$CLUSTER"

# Without kube-proxy the "kubernetes" Service's ClusterIP answers only once rsdn runs, so rsdn
# is given the API server's real address: the endpoint behind that Service.
kubectl apply -f manifests/00-namespace.yaml
api() { kubectl get endpointslice -n default -l kubernetes.io/service-name=kubernetes -o "jsonpath={.items[0].$1}"; }
kubectl -n rsdn create configmap kubernetes-services-endpoint \
  --from-literal=KUBERNETES_SERVICE_HOST="$(api 'endpoints[0].addresses[0]')" \
  --from-literal=KUBERNETES_SERVICE_PORT="$(api 'ports[0].port')" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -k manifests/
# A new image under the same tag: restart the pods so they run it.
kubectl -n rsdn rollout restart daemonset/rsdn
kubectl -n rsdn rollout status daemonset/rsdn --timeout=300s
kubectl wait --for=condition=Ready node --all --timeout=300s
kubectl get nodes -o wide
