#!/usr/bin/env bash
# provision.sh NAME IP CONTROL_PLANE_IP: containerd + kubeadm; the control plane runs
# `kubeadm init` without kube-proxy and with rsdn's networks, the workers join it.
set -euo pipefail
name=$1 ip=$2 cp_ip=$3
export DEBIAN_FRONTEND=noninteractive
swapoff -a; sed -i '/ swap /d' /etc/fstab
apt-get update -q
apt-get install -yq containerd curl gpg apt-transport-https
mkdir -p /etc/containerd /etc/apt/keyrings
containerd config default | sed 's/SystemdCgroup = false/SystemdCgroup = true/' >/etc/containerd/config.toml
systemctl restart containerd
curl -fsSL https://pkgs.k8s.io/core:/stable:/v1.33/deb/Release.key | gpg --dearmor -o /etc/apt/keyrings/k8s.gpg
echo 'deb [signed-by=/etc/apt/keyrings/k8s.gpg] https://pkgs.k8s.io/core:/stable:/v1.33/deb/ /' >/etc/apt/sources.list.d/k8s.list
apt-get update -q && apt-get install -yq kubelet kubeadm kubectl
# The private network, not Vagrant's NAT interface (10.0.2.15 on every VM), is the node IP:
# it is the InternalIP rsdn sends VXLAN to.
echo "KUBELET_EXTRA_ARGS=--node-ip=$ip" >/etc/default/kubelet
systemctl restart kubelet

if [ "$name" = cp ]; then
  kubeadm init --apiserver-advertise-address="$cp_ip" --pod-network-cidr=10.128.0.0/14 \
    --service-cidr=172.30.0.0/16 --skip-phases=addon/kube-proxy
  kubeadm token create --print-join-command >/vagrant/join.sh
  cp /etc/kubernetes/admin.conf /vagrant/admin.conf
else
  bash /vagrant/join.sh
fi
