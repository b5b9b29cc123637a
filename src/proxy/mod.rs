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
use std::time::SystemTime;

use ipnet::Ipv4Net;
use tracing::{info, warn};

use crate::config::NodePortAddresses;
use crate::model::ClusterModel;
use crate::netfilter::engine::SyncReport;
use crate::netfilter::jumps::Jump;
use crate::netfilter::metrics::RuleCount;
use crate::netfilter::producer::{Owner, Producer};
use crate::netfilter::ruleset::{Ruleset, TableName};
use addresses::{Interfaces, LocalAddresses};
use conntrack::Conntrack;
use metrics::{Changes, ProxyMetrics};
use render::{NodePorts, ProxyScope, RenderCache, RenderStats};

/// What the proxy is configured with; the rest of its scope comes from the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub cluster_network: Ipv4Net,
    pub service_network: Ipv4Net,
    pub masquerade_bit: u8,
    pub node_name: String,
    /// None: the local node's InternalIP, from the model.
    pub node_ip: Option<Ipv4Addr>,
    pub node_port_addresses: NodePortAddresses,
}

impl ProxySettings {
    /// The scope of a render: None while the local node is not in the model. The host's
    /// addresses are read only where NodePorts answer on some of them.
    pub fn scope(&self, model: &ClusterModel, host: &dyn LocalAddresses) -> Option<ProxyScope> {
        let node_ip = self
            .node_ip
            .or_else(|| model.nodes.get(&self.node_name).map(|n| n.ip))?;
        Some(ProxyScope {
            cluster_network: self.cluster_network,
            service_network: self.service_network,
            masquerade_bit: self.masquerade_bit,
            node_name: self.node_name.clone(),
            node_ip,
            node_ports: self.node_ports(node_ip, host).0,
            zone: model
                .nodes
                .get(&self.node_name)
                .and_then(|n| n.zone.clone()),
        })
    }

    /// Where NodePorts answer, and the loopback addresses left out.
    fn node_ports(
        &self,
        node_ip: Ipv4Addr,
        host: &dyn LocalAddresses,
    ) -> (NodePorts, Vec<Ipv4Addr>) {
        match self.node_port_addresses {
            NodePortAddresses::All => (NodePorts::Local, vec![]),
            _ => addresses::node_ports(&self.node_port_addresses, node_ip, &host.ipv4()),
        }
    }
}

/// The proxy as the engine sees it.
pub struct Proxy {
    settings: ProxySettings,
    cache: RenderCache,
    stats: RenderStats,
    /// The scope of the last render; None when it programmed no Service (the local node was
    /// not in the model).
    scope: Option<ProxyScope>,
    /// The model whose Services the kernel holds.
    synced: Option<Arc<ClusterModel>>,
    conntrack: Box<dyn Conntrack>,
    reconciler: conntrack::Reconciler,
    addresses: Box<dyn LocalAddresses>,
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
    /// Runs the conntrack reconciler (`always`: even when nothing it judges by changed).
    fn clear_stale_flows(&mut self, model: &ClusterModel, always: bool) {
        if let Some(scope) = &self.scope {
            let node_port_ips = match &scope.node_ports {
                NodePorts::Local => self.addresses.ipv4().into_iter().collect(),
                NodePorts::Addresses(ips) => ips.iter().copied().collect(),
            };
            self.reconciler
                .after_sync(&*self.conntrack, &model.services, node_port_ips, always);
        }
    }

    pub fn new(
        settings: ProxySettings,
        conntrack: Box<dyn Conntrack>,
        metrics: ProxyMetrics,
    ) -> Proxy {
        Proxy {
            settings,
            cache: RenderCache::default(),
            stats: RenderStats::default(),
            scope: None,
            synced: None,
            conntrack,
            reconciler: conntrack::Reconciler::default(),
            addresses: Box::new(Interfaces),
            metrics,
            pending: Changes::default(),
            started: SystemTime::now(),
            invalid_rule: None,
            invalid_dropped: RuleCount::default(),
        }
    }

    fn node_ports_changed(&self, scope: &ProxyScope) {
        let NodePorts::Addresses(ips) = &scope.node_ports else {
            return;
        };
        let (_, loopback) = self.settings.node_ports(scope.node_ip, &*self.addresses);
        if !loopback.is_empty() {
            warn!(addresses = ?loopback, "nodePortAddresses holds loopback addresses; NodePorts do not answer on localhost");
        }
        if ips.is_empty() {
            warn!(node_port_addresses = %self.settings.node_port_addresses, "no address of this host is in nodePortAddresses; NodePorts answer nowhere");
        } else {
            info!(addresses = ?ips, "NodePorts answer on these addresses");
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
        self.pending = Changes::between(self.synced.as_ref().map(|m| &m.services), &model.services);
        self.metrics.pending(self.pending);
        let Some(scope) = self.settings.scope(model, &*self.addresses) else {
            self.scope = None;
            return Ruleset::default();
        };
        if self.scope.as_ref().map(|s| &s.node_ports) != Some(&scope.node_ports) {
            self.node_ports_changed(&scope);
        }
        let (r, stats) = render::render_cached(&scope, &model.services, &mut self.cache);
        self.stats = stats;
        self.invalid_rule = r
            .tables
            .filter
            .lines(names::KUBE_FORWARD)
            .iter()
            .position(|l| l.contains(render::INVALID_DROP));
        self.scope = Some(scope);
        r
    }

    /// Where NodePorts answer depends on the host's addresses, which change without the model:
    /// read them again.
    fn stale(&mut self) -> bool {
        match &self.scope {
            Some(s) if self.settings.node_port_addresses != NodePortAddresses::All => {
                self.settings.node_ports(s.node_ip, &*self.addresses).0 != s.node_ports
            }
            _ => false,
        }
    }

    fn jumps(&self) -> Vec<Jump> {
        render::jumps()
    }

    fn owner(&self) -> Owner {
        render::owns
    }

    fn synced(&mut self, model: &Arc<ClusterModel>, report: &SyncReport) {
        self.clear_stale_flows(model, report.full);
        self.metrics.synced(&self.stats, self.pending);
        self.pending = Changes::default();
        let old = self.synced.as_ref().map(|m| &m.services);
        let triggers = metrics::programmed(old, &model.services, self.started);
        self.metrics.programmed(&triggers, SystemTime::now());
        self.synced = Some(Arc::clone(model));
    }

    /// While the rules were missing, UDP flows to Service addresses were not DNATed: stale,
    /// though nothing the reconciler judges by changed.
    fn repaired(&mut self, model: &Arc<ClusterModel>) {
        self.clear_stale_flows(model, true);
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
    use std::sync::Mutex;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::model::{testing, ModelBuilder, ModelScope};

    /// node n1 (192.168.77.11) and a UDP NodePort Service without endpoints.
    fn model() -> Arc<ClusterModel> {
        let mut b = ModelBuilder::default();
        crate::source::dir::add_documents(
            &mut b,
            "t.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.128.0.0/23}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.11}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: ns}\nspec:\n  type: NodePort\n  clusterIP: 172.30.0.10\n  ports: [{port: 53, protocol: UDP, nodePort: 30053}]\n",
        );
        Arc::new(b.finish(&ModelScope {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            local_node: "n1".into(),
            programmed: Default::default(),
        }))
    }

    fn nodeport_jumps(r: &Ruleset) -> Vec<String> {
        r.chain(TableName::Nat, names::KUBE_SERVICES)
            .map(|c| c.lines().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.ends_with("-j KUBE-NODEPORTS"))
            .map(|l| l.split(" -d ").nth(1).unwrap_or("LOCAL").to_string())
            .collect()
    }

    #[test]
    fn node_ports_follow_the_hosts_addresses_and_bound_the_conntrack_reconciler() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let host = Arc::new(Mutex::new(vec![ip("127.0.0.1"), ip("192.168.77.11")]));
        let ct = conntrack::Fake::default();
        let settings = ProxySettings {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            service_network: "172.30.0.0/16".parse().unwrap(),
            masquerade_bit: 0,
            node_name: "n1".into(),
            node_ip: None,
            node_port_addresses: NodePortAddresses::Cidrs(vec!["192.168.77.0/24".parse().unwrap()]),
        };
        let mut p = Proxy::new(settings, Box::new(ct.clone()), ProxyMetrics::unregistered())
            .with_addresses(Box::new(host.clone()));
        let m = model();
        assert_eq!(
            nodeport_jumps(&p.render(&m)),
            ["192.168.77.11 -j KUBE-NODEPORTS"]
        );
        assert!(!p.stale());
        host.lock().unwrap().push(ip("192.168.77.111"));
        assert!(p.stale(), "a new address in the CIDR needs a render");
        assert_eq!(
            nodeport_jumps(&p.render(&m)),
            [
                "192.168.77.11 -j KUBE-NODEPORTS",
                "192.168.77.111 -j KUBE-NODEPORTS"
            ]
        );
        assert!(!p.stale());
        // The reconciler clears NodePort flows to those addresses only (the Service has no
        // endpoints: every flow to it is stale).
        let flow = |dst: &str| conntrack::Flow {
            orig: conntrack::Tuple4 {
                src: ip("192.168.77.250"),
                dst: ip(dst),
                sport: 40000,
                dport: 30053,
            },
            reply: conntrack::Tuple4 {
                src: ip(dst),
                dst: ip("192.168.77.250"),
                sport: 30053,
                dport: 40000,
            },
            zone: 0,
        };
        ct.flows
            .lock()
            .unwrap()
            .extend([flow("192.168.77.111"), flow("127.0.0.1")]);
        p.synced(&m, &SyncReport::default());
        assert_eq!(*ct.deleted.lock().unwrap(), [flow("192.168.77.111")]);
        // Another sync that changed no UDP Service lists nothing; rules put back after they
        // went missing (a flush) list again: flows in the gap were not DNATed.
        p.synced(&m, &SyncReport::default());
        assert_eq!(*ct.lists.lock().unwrap(), 1);
        p.repaired(&m);
        assert_eq!(*ct.lists.lock().unwrap(), 2);
    }

    #[test]
    fn invalid_drops_are_read_from_kube_forwards_counter() {
        let mut reg = Registry::default();
        let settings = ProxySettings {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            service_network: "172.30.0.0/16".parse().unwrap(),
            masquerade_bit: 0,
            node_name: "a".into(),
            node_ip: None,
            node_port_addresses: NodePortAddresses::All,
        };
        let mut p = Proxy::new(
            settings,
            Box::new(conntrack::Fake::default()),
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
