//! Stage 1 of a Service port: capturing its addresses in the shared chains (cluster IP,
//! external IPs, load-balancer IPs, NodePorts), or answering for it in the filter table where
//! it has no usable endpoint, and letting its health check node port in.

use super::port::Port;
use crate::netfilter::ruleset::{Plain, Quoted};
use crate::proxy::names::*;

impl Port<'_> {
    pub(super) fn capture(&mut self) {
        let (name, proto) = (self.name.as_str(), self.proto);
        let (filter_target, filter_reason) = self.filtered();
        let filtered = Quoted(format_args!("{name} {filter_reason}"));
        let (svc_port, cluster_ip) = (self.svc.port, self.dst(self.svc.cluster_ip));
        let dst = move |ip| super::Dst {
            proto,
            ip,
            port: svc_port,
        };
        let lb_chain = if self.uses_fw_chain {
            &self.chains.firewall
        } else {
            &self.chains.external
        };
        let (nat, filter) = (&mut self.out.nat, &mut self.out.filter);

        if self.has_internal {
            nat.add(
                KUBE_SERVICES,
                format_args!(
                    "{} {cluster_ip} -j {}",
                    Quoted(format_args!("{name} cluster IP")),
                    self.internal_chain
                ),
            );
        } else {
            filter.add(
                KUBE_SERVICES,
                format_args!("{filtered} {cluster_ip} -j {filter_target}"),
            );
        }
        for ip in &self.svc.external_ips {
            let dst = dst(*ip);
            if self.c.any {
                nat.add(
                    KUBE_SERVICES,
                    format_args!(
                        "{} {dst} -j {}",
                        Quoted(format_args!("{name} external IP")),
                        self.chains.external
                    ),
                );
            }
            if !self.has_external {
                filter.add(
                    KUBE_EXTERNAL_SERVICES,
                    format_args!("{filtered} {dst} -j {filter_target}"),
                );
            }
        }
        for ip in &self.svc.load_balancer_ips {
            let dst = dst(*ip);
            if self.c.any {
                nat.add(
                    KUBE_SERVICES,
                    format_args!(
                        "{} {dst} -j {lb_chain}",
                        Quoted(format_args!("{name} loadbalancer IP"))
                    ),
                );
            }
            if self.uses_fw_chain {
                filter.add(
                    KUBE_PROXY_FIREWALL,
                    format_args!(
                        "{} {dst} -j DROP",
                        Quoted(format_args!(
                            "{name} traffic not accepted by {}",
                            self.chains.firewall
                        ))
                    ),
                );
            }
        }
        if !self.has_external {
            for ip in &self.svc.load_balancer_ips {
                filter.add(
                    KUBE_EXTERNAL_SERVICES,
                    format_args!("{filtered} {} -j {filter_target}", dst(*ip)),
                );
            }
        }
        if let Some(np) = self.svc.node_port {
            if self.c.any {
                nat.add(
                    KUBE_NODEPORTS,
                    format_args!(
                        "{} -m {proto} -p {proto} --dport {np} -j {}",
                        Plain(name),
                        self.chains.external
                    ),
                );
            }
            if !self.has_external {
                filter.add(
                    KUBE_EXTERNAL_SERVICES,
                    format_args!(
                        "{filtered} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {filter_target}"
                    ),
                );
            }
        }
        // The health check node port is let in whether or not there are local endpoints: the
        // answer (503) is what tells a load balancer to skip this node.
        if let Some(hc) = self.svc.health_check_node_port {
            filter.add(
                KUBE_NODEPORTS,
                format_args!(
                    "{} -m tcp -p tcp --dport {hc} -j ACCEPT",
                    Quoted(format_args!("{name} health check node port"))
                ),
            );
        }
    }
}
