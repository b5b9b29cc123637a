//! The Service proxy: kube-proxy-compatible iptables NAT, as a producer of the netfilter
//! engine. `names` computes kube-proxy's chain names, `render` the ruleset as data from the
//! model's Services, `conntrack` clears the UDP flows of endpoints that went away,
//! `healthcheck` serves the health check node ports of Local load balancers.

pub mod conntrack;
pub mod healthcheck;
pub mod metrics;
pub mod names;
pub mod render;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::Ipv4Net;

use crate::model::ClusterModel;
use crate::netfilter::engine::SyncReport;
use crate::netfilter::jumps::Jump;
use crate::netfilter::metrics::RuleCount;
use crate::netfilter::producer::{Owner, Producer};
use crate::netfilter::ruleset::{Ruleset, TableName};
use conntrack::Conntrack;
use metrics::{Changes, ProxyMetrics};
use render::{ProxyScope, RenderCache, RenderStats};

/// What the proxy is configured with; the rest of its scope comes from the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub cluster_network: Ipv4Net,
    pub service_network: Ipv4Net,
    pub masquerade_bit: u8,
    pub node_name: String,
    /// None: the local node's InternalIP, from the model.
    pub node_ip: Option<Ipv4Addr>,
}

impl ProxySettings {
    /// The scope of a render: None while the local node is not in the model.
    pub fn scope(&self, model: &ClusterModel) -> Option<ProxyScope> {
        let node_ip = self
            .node_ip
            .or_else(|| model.nodes.get(&self.node_name).map(|n| n.ip))?;
        Some(ProxyScope {
            cluster_network: self.cluster_network,
            service_network: self.service_network,
            masquerade_bit: self.masquerade_bit,
            node_name: self.node_name.clone(),
            node_ip,
        })
    }
}

/// The proxy as the engine sees it.
pub struct Proxy {
    settings: ProxySettings,
    cache: RenderCache,
    stats: RenderStats,
    /// The model whose Services the kernel holds.
    synced: Option<Arc<ClusterModel>>,
    conntrack: Box<dyn Conntrack>,
    metrics: ProxyMetrics,
    /// What the last render carries that the kernel does not hold yet.
    pending: Changes,
    /// Changes triggered before are not this proxy's to measure.
    started: SystemTime,
    /// Where KUBE-FORWARD's DROP of conntrack-INVALID packets stands, as last rendered, and
    /// its packet counter.
    invalid_rule: Option<usize>,
    invalid_dropped: RuleCount,
}

impl Proxy {
    pub fn new(
        settings: ProxySettings,
        conntrack: Box<dyn Conntrack>,
        metrics: ProxyMetrics,
    ) -> Proxy {
        Proxy {
            settings,
            cache: RenderCache::default(),
            stats: RenderStats::default(),
            synced: None,
            conntrack,
            metrics,
            pending: Changes::default(),
            started: SystemTime::now(),
            invalid_rule: None,
            invalid_dropped: RuleCount::default(),
        }
    }
}

impl Producer for Proxy {
    fn name(&self) -> &'static str {
        render::PRODUCER
    }

    fn render(&mut self, model: &Arc<ClusterModel>) -> Ruleset {
        self.pending = Changes::between(self.synced.as_ref().map(|m| &m.services), &model.services);
        self.metrics.pending(self.pending);
        let Some(scope) = self.settings.scope(model) else {
            return Ruleset::default();
        };
        let (r, stats) = render::render_cached(&scope, &model.services, &mut self.cache);
        self.stats = stats;
        self.invalid_rule = r
            .tables
            .filter
            .lines(names::KUBE_FORWARD)
            .iter()
            .position(|l| l.contains(render::INVALID_DROP));
        r
    }

    fn jumps(&self) -> Vec<Jump> {
        render::jumps()
    }

    fn owner(&self) -> Owner {
        render::owns
    }

    fn synced(&mut self, model: &Arc<ClusterModel>, _report: &SyncReport) {
        if let Some(old) = &self.synced {
            conntrack::clear_stale_udp(&*self.conntrack, &old.services, &model.services);
        }
        self.metrics.synced(&self.stats, self.pending);
        self.pending = Changes::default();
        let old = self.synced.as_ref().map(|m| &m.services);
        let triggers = metrics::programmed(old, &model.services, self.started);
        self.metrics.programmed(&triggers, SystemTime::now());
        self.synced = Some(Arc::clone(model));
    }

    fn counters(&mut self, packets: &dyn Fn(TableName, &str) -> Option<Vec<u64>>) {
        let Some(i) = self.invalid_rule else { return };
        if let Some(&now) = packets(TableName::Filter, names::KUBE_FORWARD)
            .as_ref()
            .and_then(|c| c.get(i))
        {
            let grew = self.invalid_dropped.grew(now);
            self.metrics.invalid_dropped(grew);
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::model::testing;

    #[test]
    fn invalid_drops_are_read_from_kube_forwards_counter() {
        let mut reg = Registry::default();
        let settings = ProxySettings {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            service_network: "172.30.0.0/16".parse().unwrap(),
            masquerade_bit: 0,
            node_name: "a".into(),
            node_ip: None,
        };
        let mut p = Proxy::new(
            settings,
            Box::new(conntrack::Recorder::default()),
            ProxyMetrics::register(&mut reg),
        );
        let counters = |p: &mut Proxy, invalid: u64| {
            // KUBE-FORWARD's rules' packet counters, the DROP's where it was rendered.
            let forward = vec![invalid, 1000, 2000, 3000];
            p.counters(&|t, c| {
                (t == TableName::Filter && c == names::KUBE_FORWARD).then(|| forward.clone())
            });
        };
        // Before a render, the rule's place is unknown: nothing is read.
        counters(&mut p, 99);
        p.render(&Arc::new(testing::model(&testing::three())));
        counters(&mut p, 5);
        counters(&mut p, 8);
        // The chain was rewritten: its counter starts again.
        counters(&mut p, 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("kubeproxy_iptables_ct_state_invalid_dropped_packets_total 10\n"),
            "{text}"
        );
    }
}
