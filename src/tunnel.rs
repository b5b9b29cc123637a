//! `rsdn tunnel list`: the overlay as the kernel of this node holds it, one row per remote node,
//! joined from the three entry kinds (route -> VTEP IP -> neighbour MAC -> FDB destination), with
//! whether each is present. Entries missing their partners show up as incomplete rows.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::overlay::{Entries, VtepMac};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelRow {
    pub pod_subnet: Option<Ipv4Net>,
    pub vtep_ip: Option<Ipv4Addr>,
    pub node_ip: Option<Ipv4Addr>,
    pub vtep_mac: Option<String>,
    pub fdb: bool,
    pub neigh: bool,
    pub route: bool,
}

impl TunnelRow {
    pub fn complete(&self) -> bool {
        self.fdb && self.neigh && self.route
    }
}

/// Joins the entries into rows.
pub fn rows(e: &Entries) -> Vec<TunnelRow> {
    let mut rows = Vec::new();
    let (mut used_neigh, mut used_fdb) = (BTreeSet::new(), BTreeSet::new());
    let fdb_of = |mac: &VtepMac| e.fdb.iter().find(|(m, _)| m == mac).copied();
    for (subnet, target) in &e.routes {
        let mac = e.neigh.get(&target.via).copied();
        let fdb = mac.and_then(|m| fdb_of(&m));
        if mac.is_some() {
            used_neigh.insert(target.via);
        }
        if let Some(f) = fdb {
            used_fdb.insert(f);
        }
        rows.push(TunnelRow {
            pod_subnet: Some(*subnet),
            vtep_ip: Some(target.via),
            node_ip: fdb.map(|(_, ip)| ip),
            vtep_mac: mac.map(|m| m.to_string()),
            fdb: fdb.is_some(),
            neigh: mac.is_some(),
            route: true,
        });
    }
    for (ip, mac) in e.neigh.iter().filter(|(ip, _)| !used_neigh.contains(*ip)) {
        let fdb = fdb_of(mac);
        if let Some(f) = fdb {
            used_fdb.insert(f);
        }
        rows.push(TunnelRow {
            pod_subnet: None,
            vtep_ip: Some(*ip),
            node_ip: fdb.map(|(_, ip)| ip),
            vtep_mac: Some(mac.to_string()),
            fdb: fdb.is_some(),
            neigh: true,
            route: false,
        });
    }
    for (mac, ip) in e.fdb.iter().filter(|f| !used_fdb.contains(*f)) {
        rows.push(TunnelRow {
            pod_subnet: None,
            vtep_ip: None,
            node_ip: Some(*ip),
            vtep_mac: Some(mac.to_string()),
            fdb: true,
            neigh: false,
            route: false,
        });
    }
    rows
}

/// The plain table.
pub fn render_table(rows: &[TunnelRow]) -> String {
    let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let yes = |b: bool| if b { "yes" } else { "MISSING" };
    let mut out = format!(
        "{:<18} {:<16} {:<18} {:<7} {:<7} {:<7}\n",
        "POD SUBNET", "NODE IP", "VTEP MAC", "FDB", "NEIGH", "ROUTE"
    );
    for r in rows {
        out += &format!(
            "{:<18} {:<16} {:<18} {:<7} {:<7} {:<7}\n",
            dash(r.pod_subnet.map(|s| s.to_string())),
            dash(r.node_ip.map(|s| s.to_string())),
            dash(r.vtep_mac.clone()),
            yes(r.fdb),
            yes(r.neigh),
            yes(r.route)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::node;
    use crate::overlay::desired;

    #[test]
    fn complete_and_partial_rows() {
        let nodes = [
            node("a", "192.168.1.11", "10.128.0.0/23"),
            node("b", "192.168.1.12", "10.128.2.0/23"),
            node("c", "192.168.1.13", "10.128.4.0/23"),
        ];
        let mut e = desired(&nodes[0], &nodes);
        let r = rows(&e);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(TunnelRow::complete));
        assert_eq!(r[0].node_ip.unwrap().to_string(), "192.168.1.12");
        assert_eq!(r[0].vtep_mac.as_deref(), Some("0a:58:c0:a8:01:0c"));

        // c loses its route; b loses its FDB entry.
        e.routes.remove(&"10.128.4.0/23".parse().unwrap());
        let mac_b = VtepMac::of("192.168.1.12".parse().unwrap());
        e.fdb.remove(&(mac_b, "192.168.1.12".parse().unwrap()));
        let r = rows(&e);
        assert_eq!(r.len(), 2);
        assert!(r[0].route && r[0].neigh && !r[0].fdb && r[0].node_ip.is_none());
        assert!(!r[1].route && r[1].neigh && r[1].fdb && r[1].pod_subnet.is_none());
        let table = render_table(&r);
        assert!(
            table.contains("MISSING") && table.contains("10.128.2.0/23"),
            "{table}"
        );
    }
}
