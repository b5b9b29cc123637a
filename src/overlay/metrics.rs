//! Overlay metrics (rsdn's own names; kube-proxy has no overlay).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Handles to the overlay's and the cluster source's metrics; clones share the values.
#[derive(Clone)]
pub struct OverlayMetrics {
    remote_nodes: Gauge,
    reconcile: Histogram,
    changes: Counter,
    drift_repairs: Counter,
    kernel_errors: Counter,
    skipped: Family<Labels, Gauge>,
    subnet_conflicts: Gauge,
    source_ready: Gauge,
    pod_ports: Gauge,
    port_repairs: Counter,
}

/// What one reconcile pass did, as far as the metrics go.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassFigures {
    pub seconds: f64,
    pub remote_nodes: usize,
    /// Kernel changes made (entries and device settings).
    pub changes: usize,
    /// Of those, made while the cluster model was the one already programmed: the kernel had
    /// drifted (someone deleted a route, a device was recreated, ...).
    pub drift: bool,
    pub kernel_errors: usize,
    /// Pod attachments the plugin's records list on this node.
    pub pod_ports: usize,
    /// Pod veths re-attached to tun0 (or whose hairpin mode or MTU was put right).
    pub port_repairs: usize,
}

impl OverlayMetrics {
    pub fn register(registry: &mut Registry) -> OverlayMetrics {
        let m = OverlayMetrics {
            remote_nodes: Gauge::default(),
            // 100 us to ~3 s.
            reconcile: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            changes: Counter::default(),
            drift_repairs: Counter::default(),
            kernel_errors: Counter::default(),
            skipped: Family::default(),
            subnet_conflicts: Gauge::default(),
            source_ready: Gauge::default(),
            pod_ports: Gauge::default(),
            port_repairs: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("rsdn");
        r.register(
            "overlay_remote_nodes",
            "Remote nodes with FDB, neighbour and route entries programmed",
            m.remote_nodes.clone(),
        );
        r.register(
            "overlay_reconcile_duration_seconds",
            "Duration of overlay reconcile passes (observe, diff, apply)",
            m.reconcile.clone(),
        );
        r.register(
            "overlay_kernel_changes",
            "Overlay entries and device settings written to the kernel",
            m.changes.clone(),
        );
        r.register(
            "overlay_drift_repairs",
            "Kernel changes made while the cluster was unchanged: repairs of drift",
            m.drift_repairs.clone(),
        );
        r.register(
            "overlay_kernel_errors",
            "Netlink requests the kernel refused, and failed passes",
            m.kernel_errors.clone(),
        );
        r.register(
            "cluster_objects_skipped",
            "Objects of the cluster source left out of the model as invalid",
            m.skipped.clone(),
        );
        r.register(
            "pod_ports",
            "Pod attachments on this node, as the CNI plugin's IPAM records list them",
            m.pod_ports.clone(),
        );
        r.register(
            "pod_port_repairs",
            "Pod veths put back on tun0, or whose hairpin mode or MTU was put right",
            m.port_repairs.clone(),
        );
        r.register(
            "node_subnet_conflicts",
            "Nodes left out of the model because their podCIDR overlaps another node's",
            m.subnet_conflicts.clone(),
        );
        r.register(
            "cluster_source_ready",
            "1 once the cluster source's initial state (the API server's lists) is in",
            m.source_ready.clone(),
        );
        m
    }

    pub fn unregistered() -> OverlayMetrics {
        OverlayMetrics::register(&mut Registry::default())
    }

    pub fn passed(&self, p: PassFigures) {
        self.reconcile.observe(p.seconds);
        self.remote_nodes.set(p.remote_nodes as i64);
        self.changes.inc_by(p.changes as u64);
        if p.drift {
            self.drift_repairs.inc_by(p.changes as u64);
        }
        self.kernel_errors.inc_by(p.kernel_errors as u64);
        self.pod_ports.set(p.pod_ports as i64);
        self.port_repairs.inc_by(p.port_repairs as u64);
    }

    pub fn pass_failed(&self) {
        self.kernel_errors.inc();
    }

    /// The model of the cluster was (re)built: counts of skipped objects by kind, and of
    /// subnet conflicts.
    pub fn model(&self, model: &crate::model::ClusterModel) {
        self.source_ready.set(1);
        self.subnet_conflicts.set(model.conflicts().count() as i64);
        let kinds = ["Node", "Service", "EndpointSlice"];
        let mut counts = [0i64; 4];
        for s in &model.skipped {
            let kind = s.object.split('/').next().unwrap_or("");
            counts[kinds.iter().position(|k| *k == kind).unwrap_or(3)] += 1;
        }
        for (kind, n) in kinds.iter().chain(&["other"]).zip(counts) {
            self.skipped.get_or_create(&vec![("kind", *kind)]).set(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_objects_by_kind_and_subnet_conflicts() {
        use crate::model::{ModelBuilder, ModelScope};
        let mut reg = Registry::default();
        let m = OverlayMetrics::register(&mut reg);
        let mut b = ModelBuilder::default();
        crate::source::dir::add_documents(
            &mut b,
            "x.yaml",
            "kind: Node\nmetadata: {name: a}\nspec: {podCIDR: 10.128.0.0/23}\nstatus: {addresses: [{type: InternalIP, address: 192.168.1.1}]}\n---\n\
             kind: Node\nmetadata: {name: b}\nspec: {podCIDR: 10.128.0.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.1.2}]}\n---\n\
             kind: Node\nmetadata: {name: c}\n",
        );
        m.model(&b.finish(&ModelScope {
            cluster_network: "10.128.0.0/14".parse().unwrap(),
            local_node: "a".into(),
            programmed: Default::default(),
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for want in [
            "rsdn_node_subnet_conflicts 1",
            "rsdn_cluster_objects_skipped{kind=\"Node\"} 2",
            "rsdn_cluster_source_ready 1",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }

    #[test]
    fn drift_is_counted_apart_from_changes() {
        let mut reg = Registry::default();
        let m = OverlayMetrics::register(&mut reg);
        m.passed(PassFigures {
            seconds: 0.002,
            remote_nodes: 3,
            changes: 9,
            drift: false,
            kernel_errors: 0,
            pod_ports: 4,
            port_repairs: 0,
        });
        m.passed(PassFigures {
            seconds: 0.001,
            remote_nodes: 3,
            changes: 1,
            drift: true,
            kernel_errors: 1,
            pod_ports: 4,
            port_repairs: 4,
        });
        m.pass_failed();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for want in [
            "rsdn_overlay_remote_nodes 3",
            "rsdn_overlay_reconcile_duration_seconds_count 2",
            "rsdn_overlay_kernel_changes_total 10",
            "rsdn_overlay_drift_repairs_total 1",
            "rsdn_overlay_kernel_errors_total 2",
            "rsdn_pod_ports 4",
            "rsdn_pod_port_repairs_total 4",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
