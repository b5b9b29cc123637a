//! The Service proxy: kube-proxy-compatible iptables NAT, as a producer of the netfilter
//! engine. `names` computes kube-proxy's chain names, `render` the ruleset as data from the
//! model's Services, `conntrack` clears the UDP flows that do not go to a serving endpoint,
//! `addresses` reads the host's addresses, `healthcheck` serves the health check node ports of
//! Local load balancers.

pub mod addresses;
pub mod conntrack;
pub mod healthcheck;
pub mod metrics;
pub mod names;
pub mod render;

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::model::ClusterModel;
use crate::netfilter::engine::SyncReport;
use crate::netfilter::jumps::Jump;
use crate::netfilter::producer::{Owner, Producer};
use crate::netfilter::ruleset::Ruleset;
use addresses::{Interfaces, LocalAddresses};
use conntrack::Conntrack;
use metrics::ProxyMetrics;
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
    /// Whether the last render programmed the Services (the local node was in the model).
    rendered: bool,
    conntrack: Box<dyn Conntrack>,
    addresses: Box<dyn LocalAddresses>,
    metrics: ProxyMetrics,
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
            rendered: false,
            conntrack,
            addresses: Box::new(Interfaces),
            metrics,
        }
    }

    /// Reads the host's addresses from `addresses` instead of the kernel.
    pub fn with_addresses(mut self, addresses: Box<dyn LocalAddresses>) -> Proxy {
        self.addresses = addresses;
        self
    }
}

impl Producer for Proxy {
    fn name(&self) -> &'static str {
        render::PRODUCER
    }

    fn render(&mut self, model: &Arc<ClusterModel>) -> Ruleset {
        let Some(scope) = self.settings.scope(model) else {
            self.rendered = false;
            return Ruleset::default();
        };
        self.rendered = true;
        let (r, stats) = render::render_cached(&scope, &model.services, &mut self.cache);
        self.stats = stats;
        r
    }

    fn jumps(&self) -> Vec<Jump> {
        render::jumps()
    }

    fn owner(&self) -> Owner {
        render::owns
    }

    fn synced(&mut self, model: &Arc<ClusterModel>, _report: &SyncReport) {
        if self.rendered {
            let node_port_ips = self.addresses.ipv4().into_iter().collect();
            conntrack::reconcile(&*self.conntrack, &model.services, &node_port_ips);
        }
        self.metrics.synced(&self.stats);
    }
}
