#!/usr/bin/env bash
# rsdn on three kubeadm VMs (Vagrantfile): brings them up, builds the image (docker or podman),
# imports it into every VM's containerd, applies manifests/ and runs hack/kind-e2e.sh.
#   hack/vagrant/up.sh [down]
# Not run on the development VM (no VMs there): docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = down ]; then exec vagrant destroy -f; fi
vagrant up
engine=$(command -v docker || command -v podman)
version=$(cd ../.. && source hack/lib.sh && crate_version)
ENGINE=$engine IMAGE=rsdn:$version ../build-image.sh
"$engine" save "rsdn:$version" -o rsdn.tar
for vm in cp worker1 worker2; do
  vagrant upload rsdn.tar /tmp/rsdn.tar "$vm"
  # docker save names it docker.io/library/rsdn:<version>, podman save localhost/rsdn:<version>: tag both
  # ways so the manifests' "rsdn:<version>" resolves.
  vagrant ssh "$vm" -c "sudo ctr -n k8s.io images import /tmp/rsdn.tar &&
    for n in \$(sudo ctr -n k8s.io images ls -q | grep '/rsdn:$version\$'); do
      sudo ctr -n k8s.io images tag --force \$n docker.io/library/rsdn:$version; done"
done
export KUBECONFIG=$PWD/admin.conf
kubectl apply -f ../../manifests/00-namespace.yaml
kubectl -n rsdn create configmap kubernetes-services-endpoint \
  --from-literal=KUBERNETES_SERVICE_HOST=192.168.56.10 --from-literal=KUBERNETES_SERVICE_PORT=6443 \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -k ../../manifests/
kubectl -n rsdn rollout status daemonset/rsdn --timeout=300s
kubectl wait --for=condition=Ready node --all --timeout=300s
../kind-e2e.sh
