//! Egress masquerade: pod traffic leaving the cluster and service networks leaves with the
//! node's address (OpenShift SDN's OPENSHIFT-MASQUERADE); pod-to-pod traffic across nodes keeps
//! its source. And pod traffic is forwarded even where the FORWARD policy is DROP. A producer
//! of the netfilter engine, active whether or not rsdn is the Service proxy.

use ipnet::Ipv4Net;

use crate::model::ClusterModel;
use crate::netfilter::jumps::{Jump, Position};
use crate::netfilter::producer::{Owner, Producer};
use crate::netfilter::ruleset::{Quoted, Ruleset, TableName};

pub const RSDN_MASQUERADE: &str = "RSDN-MASQUERADE";
pub const RSDN_FORWARD: &str = "RSDN-FORWARD";

pub struct Egress {
    pub cluster_network: Ipv4Net,
    pub service_network: Ipv4Net,
}

impl Egress {
    pub fn ruleset(&self) -> Ruleset {
        let (cn, sn) = (self.cluster_network, self.service_network);
        let mut r = Ruleset::default();
        let nat = &mut r.tables.nat;
        nat.add(RSDN_MASQUERADE, format_args!("! -s {cn} -j RETURN"));
        nat.add(
            RSDN_MASQUERADE,
            format_args!(
                "-d {cn} {} -j RETURN",
                Quoted("pod to pod keeps its address")
            ),
        );
        nat.add(RSDN_MASQUERADE, format_args!("-d {sn} -j RETURN"));
        nat.add(
            RSDN_MASQUERADE,
            format_args!(
                "{} -j MASQUERADE --random-fully",
                Quoted("pod traffic leaving the cluster network")
            ),
        );
        let filter = &mut r.tables.filter;
        filter.add(RSDN_FORWARD, format_args!("-s {cn} -j ACCEPT"));
        filter.add(RSDN_FORWARD, format_args!("-d {cn} -j ACCEPT"));
        r
    }
}

fn owns(_: TableName, chain: &str) -> bool {
    chain == RSDN_MASQUERADE || chain == RSDN_FORWARD
}

impl Producer for Egress {
    fn name(&self) -> &'static str {
        "egress"
    }

    fn render(&mut self, _model: &std::sync::Arc<ClusterModel>) -> Ruleset {
        self.ruleset()
    }

    /// Appended, after whatever else the built-in chains hold: the permissive forward rule
    /// must not pre-empt kube-proxy's (or anyone's) REJECT and DROP rules.
    fn jumps(&self) -> Vec<Jump> {
        vec![
            Jump::new(
                TableName::Nat,
                "POSTROUTING",
                "",
                "rsdn egress masquerade",
                RSDN_MASQUERADE,
                Position::Last,
            ),
            Jump::new(
                TableName::Filter,
                "FORWARD",
                "",
                "rsdn pod traffic",
                RSDN_FORWARD,
                Position::Last,
            ),
        ]
    }

    fn owner(&self) -> Owner {
        owns
    }
}
