//! Stages 2 and 3 of a Service port: traffic to its external addresses (NodePorts, external
//! IPs, load-balancer IPs) through KUBE-EXT-, and the load-balancer source ranges in KUBE-FW-.

use super::port::Port;
use crate::netfilter::ruleset::Quoted;
use crate::proxy::names::*;

impl Port<'_> {
    pub(super) fn external(&mut self) {
        if !self.uses_external_chain {
            return;
        }
        let name = self.name.as_str();
        let nat = &mut self.out.nat;
        let ext = &self.chains.external;
        nat.chain(ext);
        if !self.svc.external_local {
            nat.add(
                ext,
                format_args!(
                    "{} -j {KUBE_MARK_MASQ}",
                    Quoted(format_args!(
                        "masquerade traffic for {name} external destinations"
                    ))
                ),
            );
        } else {
            // Pods and the node itself reach an external address of a Local Service as if
            // from outside and back in: Cluster policy, masqueraded for the node.
            nat.add(
                ext,
                format_args!(
                    "{} -s {} -j {}",
                    Quoted(format_args!("pod traffic for {name} external destinations")),
                    self.scope.cluster_network,
                    self.chains.cluster
                ),
            );
            nat.add(
                ext,
                format_args!(
                    "{} -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}",
                    Quoted(format_args!(
                        "masquerade LOCAL traffic for {name} external destinations"
                    ))
                ),
            );
            nat.add(
                ext,
                format_args!(
                    "{} -m addrtype --src-type LOCAL -j {}",
                    Quoted(format_args!(
                        "route LOCAL traffic for {name} external destinations"
                    )),
                    self.chains.cluster
                ),
            );
        }
        if self.has_external {
            nat.add(ext, format_args!("-j {}", self.external_policy_chain));
        }
    }

    pub(super) fn firewall(&mut self) {
        if !self.uses_fw_chain {
            return;
        }
        let name = self.name.as_str();
        let (nat, fw, ext) = (
            &mut self.out.nat,
            &self.chains.firewall,
            &self.chains.external,
        );
        nat.chain(fw);
        let lb = Quoted(format_args!("{name} loadbalancer IP"));
        let mut from_node = false;
        for range in &self.svc.load_balancer_source_ranges {
            nat.add(fw, format_args!("{lb} -s {range} -j {ext}"));
            from_node |= range.contains(&self.scope.node_ip);
        }
        // A VIP often sits on the node itself; the node's own requests then come from it.
        if from_node {
            for ip in &self.svc.load_balancer_ips {
                nat.add(fw, format_args!("{lb} -s {ip} -j {ext}"));
            }
        }
        nat.add(
            fw,
            format_args!(
                "{}",
                Quoted(format_args!(
                    "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
                ))
            ),
        );
    }
}
