//! One Service port: what it contributes, decided once (which endpoints serve which traffic,
//! which chains are used) and then written stage by stage.

use std::sync::Arc;

use super::select::{categorize, Categorized, Place};
use super::{split, Dst, PortRules, ProxyScope};
use crate::model::service::{Endpoint, ServicePort, ServicePortName};
use crate::netfilter::ruleset::{Table, Tables};
use crate::proxy::names::ServiceChains;

/// A Service port being rendered: its inputs, the decisions taken from them, and the rules
/// written so far (shared and own chains together; split at the end).
pub(super) struct Port<'a> {
    pub scope: &'a ProxyScope,
    pub svc: &'a ServicePort,
    pub eps: &'a [Endpoint],
    /// `namespace/name:port`, as comments and hashes spell it.
    pub name: String,
    pub proto: &'static str,
    pub chains: ServiceChains,
    pub c: Categorized,
    /// Internal traffic (to the cluster IP) has somewhere to go, and which chain takes it.
    pub has_internal: bool,
    pub internal_chain: String,
    /// External traffic has somewhere to go under its policy, and which chain takes it.
    pub has_external: bool,
    pub external_policy_chain: String,
    pub uses_external_chain: bool,
    pub uses_fw_chain: bool,
    pub out: Tables,
}

impl<'a> Port<'a> {
    fn new(
        scope: &'a ProxyScope,
        spn: &'a ServicePortName,
        svc: &'a ServicePort,
        eps: &'a [Endpoint],
    ) -> Port<'a> {
        let chains = ServiceChains::of(spn);
        let here = Place {
            node: &scope.node_name,
            zone: scope.zone.as_deref(),
        };
        let c = categorize(eps, svc, &here);
        let (internal_chain, has_internal) = if svc.internal_local {
            (chains.local.clone(), c.any && !c.local.is_empty())
        } else {
            (chains.cluster.clone(), c.any)
        };
        let (external_policy_chain, has_external) = if svc.external_local {
            (chains.local.clone(), c.any && !c.local.is_empty())
        } else {
            (chains.cluster.clone(), c.any)
        };
        let uses_external_chain = c.any && svc.externally_accessible();
        let uses_fw_chain = c.any
            && !svc.load_balancer_ips.is_empty()
            && !svc.load_balancer_source_ranges.is_empty();
        Port {
            scope,
            svc,
            eps,
            name: spn.to_string(),
            proto: spn.protocol.as_str(),
            chains,
            c,
            has_internal,
            internal_chain,
            has_external,
            external_policy_chain,
            uses_external_chain,
            uses_fw_chain,
            out: Tables::default(),
        }
    }

    /// `-m <proto> -p <proto> -d <ip> --dport <the Service port>`.
    pub fn dst(&self, ip: std::net::Ipv4Addr) -> Dst<'static> {
        Dst {
            proto: self.proto,
            ip,
            port: self.svc.port,
        }
    }

    /// Where a Service has no usable endpoint here the filter table answers for it: the
    /// target, and why (for the comment).
    pub fn filtered(&self) -> (&'static str, &'static str) {
        if !self.c.any {
            ("REJECT", "has no endpoints")
        } else {
            ("DROP", "has no local endpoints")
        }
    }
}

/// Renders one Service port.
pub(super) fn render(
    scope: &ProxyScope,
    spn: &ServicePortName,
    svc: &ServicePort,
    eps: &[Endpoint],
) -> PortRules {
    let mut p = Port::new(scope, spn, svc, eps);
    p.capture();
    p.external();
    p.firewall();
    p.endpoints();
    let no_local_internal = p.c.any && !p.has_internal;
    let no_local_external = p.c.any && !p.has_external;
    let (shared, own) = split(p.out.nat);
    PortRules {
        shared: Tables {
            nat: Table { chains: shared },
            filter: p.out.filter,
        },
        own: Arc::new(Tables {
            nat: Table { chains: own },
            filter: Table::default(),
        }),
        no_local_internal,
        no_local_external,
    }
}
