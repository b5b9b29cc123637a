//! Services and their endpoints as the proxy needs them, built from `Service` and
//! `discovery.k8s.io/v1` `EndpointSlice` objects with kube-proxy's reading of each field.
//! One `ServicePort` per port of a Service (kube-proxy's unit of proxying); endpoints of all the
//! slices of a Service merged per port name and protocol.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::SystemTime;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The annotation the EndpointSlice controller sets to the time of the change (a pod's, a
/// Service's) that made it write the slice: where kube-proxy's network programming latency
/// starts.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Services (and their EndpointSlices, which the controller gives the Service's labels) with
/// this label, whatever its value, belong to another proxy: kube-proxy does not watch them.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The EndpointSlice controller's mark on the slices of headless Services: kube-proxy does not
/// watch Services or slices that carry it.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Both, as the label selector kube-proxy watches Services and EndpointSlices with.
pub const PROXIED_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Whether kube-proxy leaves an object alone: it has either label, with any value.
fn left_to_others(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
}
/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Lower case, as iptables and kube-proxy's chain-name hash spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The API's spelling ("TCP"); absent means TCP.
    pub fn parse(s: Option<&str>) -> Result<Protocol, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
}

/// A Service port: `namespace/name:port` (no `:port` for an unnamed port) plus its protocol,
/// as kube-proxy keys everything.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// What the proxy programs for one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`, except those with `ipMode: Proxy`.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub load_balancer_source_ranges: Vec<Ipv4Net>,
    /// ClientIP affinity timeout, when `sessionAffinity: ClientIP`.
    pub affinity_seconds: Option<u32>,
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` on a Service reachable from outside.
    pub external_local: bool,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with `externalTrafficPolicy: Local`
    /// (the only ones that have one): where load balancers ask whether this node has endpoints.
    pub health_check_node_port: Option<u16>,
    /// `spec.trafficDistribution`, where it asks for close endpoints.
    pub traffic_distribution: Option<TrafficDistribution>,
}

/// `spec.trafficDistribution` values that prefer close endpoints. The EndpointSlice controller
/// turns them into hints on the endpoints; the proxy follows the hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficDistribution {
    /// `PreferClose` and its newer name `PreferSameZone`.
    PreferSameZone,
    PreferSameNode,
}

impl TrafficDistribution {
    /// None for an absent or unknown value (a newer API's: traffic goes cluster-wide).
    pub fn parse(s: Option<&str>) -> Option<TrafficDistribution> {
        match s? {
            "PreferClose" | "PreferSameZone" => Some(TrafficDistribution::PreferSameZone),
            "PreferSameNode" => Some(TrafficDistribution::PreferSameNode),
            _ => None,
        }
    }
}

impl ServicePort {
    /// A plain ClusterIP port: no NodePort, external address, affinity or policy.
    pub fn cluster_ip(cluster_ip: Ipv4Addr, port: u16) -> ServicePort {
        ServicePort {
            cluster_ip,
            port,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            affinity_seconds: None,
            internal_local: false,
            external_local: false,
            health_check_node_port: None,
            traffic_distribution: None,
        }
    }

    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Whether any traffic uses the cluster-wide endpoint set ("Cluster" policy). External
    /// traffic needs it even with a Local policy, for the short-circuit of in-cluster clients.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || self.externally_accessible()
    }

    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.external_local && self.externally_accessible())
    }
}

/// One endpoint of a Service port (first address of a slice endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The slice endpoint's `zone`.
    pub zone: Option<String>,
    /// `hints.forZones[].name` and `hints.forNodes[].name`: where the EndpointSlice controller
    /// wants this endpoint used (topology-aware routing, `trafficDistribution`).
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

fn ipv4(s: &str, what: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not an IPv4 address"))
}

/// A namespace, Service or port name as the API server admits them (DNS labels and
/// subdomains, IANA service names): lower-case letters, digits, '-' and '.'. They end up in rule
/// comments unquoted, so anything else (a space, a quote) would break the restore payload.
fn api_name(s: &str, what: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if s.len() <= 253 && s.chars().all(ok) {
        Ok(())
    } else {
        Err(format!("{what} {s:?} is not a valid Kubernetes name"))
    }
}

fn port_number(n: i32, what: &str) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {n} is out of range"))
}

/// The Service ports a Service yields, or why the whole Service is skipped. Headless Services
/// (`clusterIP: None`), ExternalName Services, Services of another IP family and Services
/// labelled for another proxy or as headless yield none: kube-proxy does not proxy them either.
pub fn service_ports(svc: &Service) -> Result<Vec<(ServicePortName, ServicePort)>, String> {
    if left_to_others(&svc.metadata) {
        return Ok(vec![]);
    }
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("no metadata.name")?;
    api_name(&namespace, "metadata.namespace")?;
    api_name(&name, "metadata.name")?;
    let Some(spec) = &svc.spec else {
        return Err("no spec".into());
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Ok(vec![]);
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => return Ok(vec![]),
        Some(ip) if ip.contains(':') => return Ok(vec![]),
        Some(ip) => ipv4(ip, "clusterIP")?,
    };
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .filter(|ip| !ip.contains(':'))
        .map(|ip| ipv4(ip, "externalIP"))
        .collect::<Result<Vec<_>, _>>()?;
    let load_balancer_ips = if kind == "LoadBalancer" {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref())
            .filter(|ip| !ip.contains(':'))
            .map(|ip| ipv4(ip, "loadBalancer ingress IP"))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![]
    };
    // An unparsable source range would open the firewall if it were dropped: refuse the Service.
    let load_balancer_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .map(|r| r.trim())
        .filter(|r| !r.contains(':'))
        .map(|r| {
            r.parse::<Ipv4Net>()
                .map(|n| n.trunc())
                .map_err(|_| format!("loadBalancerSourceRange {r:?} is not an IPv4 CIDR"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let affinity_seconds = match spec.session_affinity.as_deref() {
        Some("ClientIP") => Some(
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map(|t| u32::try_from(t).ok().filter(|t| (1..=86400).contains(t)))
                .unwrap_or(Some(DEFAULT_AFFINITY_SECONDS))
                .ok_or("sessionAffinityConfig.clientIP.timeoutSeconds must be 1..86400")?,
        ),
        None | Some("None") => None,
        Some(other) => return Err(format!("unknown sessionAffinity {other:?}")),
    };
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let reachable_from_outside =
        matches!(kind, "NodePort" | "LoadBalancer") || !external_ips.is_empty();
    let external_local =
        reachable_from_outside && spec.external_traffic_policy.as_deref() == Some("Local");
    // kube-proxy serves it only where the API server allocates it: LoadBalancer + Local.
    let health_check_node_port = match spec.health_check_node_port {
        Some(n) if kind == "LoadBalancer" && external_local => {
            Some(port_number(n, "healthCheckNodePort")?)
        }
        _ => None,
    };
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        api_name(p.name.as_deref().unwrap_or_default(), "port name")?;
        let spn = ServicePortName {
            namespace: namespace.clone(),
            name: name.clone(),
            port: p.name.clone().unwrap_or_default(),
            protocol: Protocol::parse(p.protocol.as_deref())?,
        };
        let node_port = match (kind, p.node_port) {
            ("NodePort" | "LoadBalancer", Some(n)) => Some(port_number(n, "nodePort")?),
            _ => None,
        };
        out.push((
            spn,
            ServicePort {
                cluster_ip,
                port: port_number(p.port, "port")?,
                node_port,
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                load_balancer_source_ranges: load_balancer_source_ranges.clone(),
                affinity_seconds,
                internal_local,
                external_local,
                health_check_node_port,
                traffic_distribution: TrafficDistribution::parse(
                    spec.traffic_distribution.as_deref(),
                ),
            },
        ));
    }
    Ok(out)
}

/// The Service a slice belongs to (namespace, name) and its endpoints per (port name,
/// protocol).
pub type SliceEndpoints = ((String, String), Vec<((String, Protocol), Endpoint)>);

/// A slice as the proxy takes it: the endpoints it yields, and what was dropped from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceRead {
    pub endpoints: SliceEndpoints,
    /// How many endpoints and ports were dropped as invalid, and why; `None` when none was.
    pub dropped: Option<String>,
    /// Its `LAST_CHANGE_TRIGGER_TIME`; None when absent or not a time (kube-proxy ignores
    /// those too).
    pub trigger: Option<SystemTime>,
}

/// A slice's `LAST_CHANGE_TRIGGER_TIME` (RFC 3339, as the controller writes it).
fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice
        .metadata
        .annotations
        .as_ref()?
        .get(LAST_CHANGE_TRIGGER_TIME)?;
    let t: k8s_openapi::jiff::Timestamp = text.trim().parse().ok()?;
    Some(t.into())
}

/// Reads a slice. Slices of another address type or labelled for another proxy or as headless
/// yield nothing; endpoints without an address
/// and ports without a number are left out silently (kube-proxy skips them too). An invalid
/// endpoint or port is dropped with a reason and the rest is kept: one bad address must not
/// take a Service's other endpoints away. Only a slice that names no Service fails whole.
pub fn slice_endpoints(slice: &EndpointSlice) -> Result<Option<SliceRead>, String> {
    if left_to_others(&slice.metadata) {
        return Ok(None);
    }
    let namespace = slice
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("no {SERVICE_NAME_LABEL} label"))?
        .clone();
    if slice.address_type != "IPv4" {
        return Ok(None);
    }
    let all_ports = slice.ports.as_deref().unwrap_or_default();
    let (mut ports, mut bad_ports) = (Vec::new(), Vec::new());
    for port in all_ports {
        let Some(number) = port.port else { continue };
        let name = port.name.clone().unwrap_or_default();
        let read = port_number(number, "port").and_then(|number| {
            let protocol = Protocol::parse(port.protocol.as_deref())
                .map_err(|e| format!("port {name:?}: {e}"))?;
            Ok(((name, protocol), number))
        });
        match read {
            Ok(p) => ports.push(p),
            Err(e) => bad_ports.push(e),
        }
    }
    let (mut addressed, mut bad_endpoints) = (Vec::new(), Vec::new());
    for ep in &slice.endpoints {
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        match addr.parse::<Ipv4Addr>() {
            Ok(ip) => addressed.push((ip, ep)),
            Err(_) => bad_endpoints.push(format!("address {addr:?} is not IPv4")),
        }
    }
    let mut out = Vec::new();
    for (key, number) in &ports {
        for (ip, ep) in &addressed {
            let c = ep.conditions.as_ref();
            let hints = ep.hints.as_ref();
            out.push((
                key.clone(),
                Endpoint {
                    ip: *ip,
                    port: *number,
                    node: ep.node_name.clone(),
                    ready: c.and_then(|c| c.ready).unwrap_or(true),
                    // The API says an absent serving condition means true (not "same as ready").
                    serving: c.and_then(|c| c.serving).unwrap_or(true),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    zone: ep.zone.clone().filter(|z| !z.is_empty()),
                    zone_hints: hints
                        .and_then(|h| h.for_zones.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    node_hints: hints
                        .and_then(|h| h.for_nodes.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                },
            ));
        }
    }
    let dropped = [
        dropped("endpoints", &bad_endpoints, slice.endpoints.len()),
        dropped("ports", &bad_ports, all_ports.len()),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    Ok(Some(SliceRead {
        endpoints: ((namespace, service), out),
        dropped: (!dropped.is_empty()).then(|| dropped.join("; ")),
        trigger: trigger_time(slice),
    }))
}

/// "2 of 3 endpoints dropped: why; why", naming the first few reasons only: a slice holds up to
/// 1000 endpoints, and the reason goes into a log line.
fn dropped(what: &str, reasons: &[String], of: usize) -> Option<String> {
    const NAMED: usize = 5;
    if reasons.is_empty() {
        return None;
    }
    let mut text = format!(
        "{} of {of} {what} dropped: {}",
        reasons.len(),
        reasons[..reasons.len().min(NAMED)].join("; ")
    );
    if reasons.len() > NAMED {
        text += &format!("; and {} more", reasons.len() - NAMED);
    }
    Some(text)
}

/// An EndpointSlice by namespace and name.
pub type SliceKey = (String, String);

/// When the change behind a slice's last write happened (`LAST_CHANGE_TRIGGER_TIME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeTrigger {
    /// The slice's Service, in the slice's namespace.
    pub service: String,
    pub at: SystemTime,
}

/// Every proxied Service port and its endpoints: what the ruleset is computed from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Services {
    pub ports: BTreeMap<ServicePortName, ServicePort>,
    /// Endpoints per Service port, deduplicated by `ip:port` (a local copy wins) and sorted by
    /// their `ip:port` text, as kube-proxy orders them.
    pub endpoints: BTreeMap<ServicePortName, Vec<Endpoint>>,
    /// The trigger time of every slice that has one: a new one is a change the proxy
    /// measures from there to the kernel (`kubeproxy_network_programming_duration_seconds`).
    pub change_triggers: BTreeMap<SliceKey, ChangeTrigger>,
}

/// Collects slices (in any order) and merges them deterministically.
#[derive(Debug, Default, Clone)]
pub struct EndpointsBuilder {
    /// Each slice's endpoints and trigger time, by slice, so the merge does not depend on
    /// file order.
    slices: BTreeMap<SliceKey, (SliceEndpoints, Option<SystemTime>)>,
}

impl EndpointsBuilder {
    pub fn add(
        &mut self,
        slice_key: SliceKey,
        endpoints: SliceEndpoints,
        trigger: Option<SystemTime>,
    ) {
        self.slices.insert(slice_key, (endpoints, trigger));
    }

    pub fn absorb(&mut self, other: &EndpointsBuilder) {
        self.slices
            .extend(other.slices.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// The endpoints per Service port, and the slices' trigger times.
    pub fn finish(
        self,
        local_node: &str,
    ) -> (
        BTreeMap<ServicePortName, Vec<Endpoint>>,
        BTreeMap<SliceKey, ChangeTrigger>,
    ) {
        let mut merged: BTreeMap<ServicePortName, BTreeMap<String, Endpoint>> = BTreeMap::new();
        let mut triggers = BTreeMap::new();
        for (key, (((namespace, name), eps), trigger)) in self.slices {
            if let Some(at) = trigger {
                let service = name.clone();
                triggers.insert(key, ChangeTrigger { service, at });
            }
            for ((port, protocol), ep) in eps {
                let spn = ServicePortName {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port,
                    protocol,
                };
                let set = merged.entry(spn).or_default();
                let key = ep.to_string();
                let local = ep.node.as_deref() == Some(local_node);
                if !set.contains_key(&key) || local {
                    set.insert(key, ep);
                }
            }
        }
        let endpoints = merged
            .into_iter()
            .map(|(spn, set)| (spn, set.into_values().collect()))
            .collect();
        (endpoints, triggers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn port_names_print_like_kube_proxy() {
        let mut spn = ServicePortName {
            namespace: "ns1".into(),
            name: "svc1".into(),
            port: "p80".into(),
            protocol: Protocol::Tcp,
        };
        assert_eq!(spn.to_string(), "ns1/svc1:p80");
        spn.port.clear();
        assert_eq!(spn.to_string(), "ns1/svc1");
    }

    #[test]
    fn a_load_balancer_service_reads_every_field() {
        let s = svc(r#"
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.10
  externalIPs: [192.168.77.200, "2001:db8::1"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [" 203.0.113.0/25 "]
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: web, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
status:
  loadBalancer:
    ingress: [{ip: 192.168.77.201}, {ip: 192.168.77.202, ipMode: Proxy}, {hostname: lb.example}]
"#);
        let ports = service_ports(&s).unwrap();
        assert_eq!(ports.len(), 2);
        let (spn, p) = &ports[0];
        assert_eq!(spn.to_string(), "shop/web:http");
        assert_eq!(p.cluster_ip.to_string(), "172.30.0.10");
        assert_eq!((p.port, p.node_port), (80, Some(30080)));
        assert_eq!(
            p.external_ips,
            vec!["192.168.77.200".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            p.load_balancer_ips,
            vec!["192.168.77.201".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            p.load_balancer_source_ranges[0].to_string(),
            "203.0.113.0/25"
        );
        assert_eq!(p.affinity_seconds, Some(DEFAULT_AFFINITY_SECONDS));
        assert!(p.external_local && !p.internal_local);
        assert!(p.uses_cluster_endpoints() && p.uses_local_endpoints());
        assert_eq!(ports[1].0.protocol, Protocol::Udp);
        assert_eq!(p.health_check_node_port, Some(32000));
        assert_eq!(ports[1].1.health_check_node_port, Some(32000));
    }

    #[test]
    fn a_health_check_node_port_needs_a_local_load_balancer() {
        let with = |kind: &str, policy: &str| {
            let s = svc(&format!(
                "metadata: {{name: a}}\nspec:\n  type: {kind}\n  clusterIP: 172.30.0.1\n  externalTrafficPolicy: {policy}\n  healthCheckNodePort: 32000\n  ports: [{{port: 80, nodePort: 30080}}]\n"
            ));
            service_ports(&s).map(|p| p[0].1.health_check_node_port)
        };
        assert_eq!(with("LoadBalancer", "Local"), Ok(Some(32000)));
        assert_eq!(with("LoadBalancer", "Cluster"), Ok(None));
        assert_eq!(with("NodePort", "Local"), Ok(None));
        let bad = svc("metadata: {name: a}\nspec:\n  type: LoadBalancer\n  clusterIP: 172.30.0.1\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 70000\n  ports: [{port: 80}]\n");
        assert!(service_ports(&bad)
            .unwrap_err()
            .contains("healthCheckNodePort"));
    }

    #[test]
    fn headless_external_name_and_ipv6_services_are_not_proxied() {
        for spec in [
            "clusterIP: None\n  ports: [{port: 80}]",
            "type: ExternalName\n  externalName: example.com",
            "clusterIP: fd00::10\n  ports: [{port: 80}]",
            "ports: [{port: 80}]",
        ] {
            let s = svc(&format!("metadata: {{name: a}}\nspec:\n  {spec}\n"));
            assert_eq!(service_ports(&s).unwrap(), vec![], "{spec}");
        }
    }

    #[test]
    fn services_and_slices_of_another_proxy_or_headless_are_left_alone() {
        for label in [
            "service.kubernetes.io/service-proxy-name: other",
            "service.kubernetes.io/service-proxy-name: ''",
            "service.kubernetes.io/headless: ''",
        ] {
            // Even an invalid one: it is not ours to judge.
            let s = svc(&format!(
                "metadata: {{name: a, labels: {{{label}}}}}\nspec:\n  clusterIP: 172.30.0.1\n  ports: [{{port: 80}}, {{port: 0}}]\n"
            ));
            assert_eq!(service_ports(&s), Ok(vec![]), "{label}");
            let mut sl = slice("x", "- {addresses: [10.128.0.10]}\n");
            let (k, v) = label.split_once(": ").unwrap();
            sl.metadata
                .labels
                .get_or_insert_default()
                .insert(k.into(), v.trim_matches('\'').into());
            assert_eq!(slice_endpoints(&sl), Ok(None), "{label}");
        }
        // Other labels of that domain change nothing.
        let s = svc("metadata: {name: a, labels: {service.kubernetes.io/topology-mode: Auto}}\nspec:\n  clusterIP: 172.30.0.1\n  ports: [{port: 80}]\n");
        assert_eq!(service_ports(&s).unwrap().len(), 1);
        assert_eq!(
            PROXIED_SELECTOR,
            format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
        );
    }

    #[test]
    fn invalid_services_are_refused_with_a_reason() {
        for (spec, word) in [
            ("clusterIP: 172.30.0.300\n  ports: [{port: 80}]", "clusterIP"),
            ("clusterIP: 172.30.0.1\n  ports: [{port: 0}]", "port 0"),
            ("clusterIP: 172.30.0.1\n  ports: [{port: 80, protocol: ICMP}]", "protocol"),
            ("clusterIP: 172.30.0.1\n  externalIPs: [nope]\n  ports: [{port: 80}]", "externalIP"),
            (
                "clusterIP: 172.30.0.1\n  type: LoadBalancer\n  loadBalancerSourceRanges: [10.0.0.0/33]\n  ports: [{port: 80}]",
                "loadBalancerSourceRange",
            ),
            (
                "clusterIP: 172.30.0.1\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n  ports: [{port: 80}]",
                "timeoutSeconds",
            ),
        ] {
            let s = svc(&format!("metadata: {{name: a}}\nspec:\n  {spec}\n"));
            let e = service_ports(&s).unwrap_err();
            assert!(e.contains(word), "{e} should mention {word}");
        }
        // Names go into rule comments unquoted: only what the API server admits.
        for (meta, port, word) in [
            ("{name: \"a b\"}", "http", "metadata.name"),
            ("{name: a, namespace: 'x\"y'}", "http", "metadata.namespace"),
            ("{name: Web}", "http", "metadata.name"),
            ("{name: a}", "\"h p\"", "port name"),
        ] {
            let s = svc(&format!(
                "metadata: {meta}\nspec:\n  clusterIP: 172.30.0.1\n  ports: [{{name: {port}, port: 80}}]\n"
            ));
            let e = service_ports(&s).unwrap_err();
            assert!(e.contains(word), "{e} should mention {word}");
        }
        let ok = svc("metadata: {name: web-1.v2, namespace: kube-system}\nspec:\n  clusterIP: 172.30.0.1\n  ports: [{name: dns-tcp, port: 53}]\n");
        assert_eq!(service_ports(&ok).unwrap().len(), 1);
    }

    #[test]
    fn external_policy_local_needs_an_external_path() {
        let s = svc("metadata: {name: a}\nspec:\n  clusterIP: 172.30.0.1\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  ports: [{port: 80}]\n");
        let p = &service_ports(&s).unwrap()[0].1;
        assert!(!p.external_local && p.internal_local);
        assert!(!p.uses_cluster_endpoints() && p.uses_local_endpoints());
    }

    fn slice(name: &str, yaml_endpoints: &str) -> EndpointSlice {
        serde_saphyr::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: none}}]\nendpoints:\n{yaml_endpoints}"
        ))
        .unwrap()
    }

    #[test]
    fn slices_merge_dedupe_and_sort_with_conditions() {
        let a = slice(
            "web-a",
            "- {addresses: [10.128.0.10], nodeName: n1}\n- {addresses: [10.128.2.5], nodeName: n2, conditions: {ready: false, serving: true, terminating: true}}\n- {addresses: []}\n",
        );
        let b = slice(
            "web-b",
            "- {addresses: [10.128.0.9], nodeName: n1, conditions: {ready: false}}\n- {addresses: [10.128.0.10], nodeName: other}\n",
        );
        let mut builder = EndpointsBuilder::default();
        for s in [&b, &a] {
            let read = slice_endpoints(s).unwrap().unwrap();
            assert_eq!(read.dropped, None);
            builder.add(
                ("ns".into(), s.metadata.name.clone().unwrap()),
                read.endpoints,
                read.trigger,
            );
        }
        let (merged, triggers) = builder.finish("n1");
        assert!(triggers.is_empty(), "neither slice has a trigger time");
        assert_eq!(merged.len(), 1, "the port without a number is skipped");
        let (spn, eps) = merged.into_iter().next().unwrap();
        assert_eq!(spn.to_string(), "ns/web:http");
        let shown: Vec<String> = eps
            .iter()
            .map(|e| {
                format!(
                    "{e} {:?} {} {} {}",
                    e.node, e.ready, e.serving, e.terminating
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                // Text order, as kube-proxy sorts; the local copy of a duplicate wins.
                "10.128.0.10:8080 Some(\"n1\") true true false",
                "10.128.0.9:8080 Some(\"n1\") false true false",
                "10.128.2.5:8080 Some(\"n2\") false true true",
            ]
        );
    }

    #[test]
    fn trigger_times_are_read_per_slice() {
        let with = |name: &str, value: &str| {
            let mut s = slice(name, "- {addresses: [10.128.0.10]}\n");
            s.metadata.annotations = Some(
                [(LAST_CHANGE_TRIGGER_TIME.to_string(), value.to_string())]
                    .into_iter()
                    .collect(),
            );
            s
        };
        let at =
            |secs: u64, nanos: u32| SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        // RFC 3339 as the EndpointSlice controller writes it, with or without fractions.
        let a = with("web-a", "2025-01-01T00:00:00Z");
        let b = with("web-b", "2025-01-01T00:00:01.5Z");
        let bad = with("web-c", "yesterday");
        let mut builder = EndpointsBuilder::default();
        for s in [&a, &b, &bad] {
            let read = slice_endpoints(s).unwrap().unwrap();
            builder.add(
                ("ns".into(), s.metadata.name.clone().unwrap()),
                read.endpoints,
                read.trigger,
            );
        }
        let (_, triggers) = builder.finish("n1");
        let shown: Vec<(&str, &str, SystemTime)> = triggers
            .iter()
            .map(|((_, slice), t)| (slice.as_str(), t.service.as_str(), t.at))
            .collect();
        assert_eq!(
            shown,
            [
                ("web-a", "web", at(1735689600, 0)),
                ("web-b", "web", at(1735689601, 500_000_000)),
            ]
        );
    }

    #[test]
    fn zones_hints_and_traffic_distribution_are_read() {
        let read = slice_endpoints(&slice(
            "z",
            "- {addresses: [10.128.0.10], zone: zone-a, hints: {forZones: [{name: zone-a}, {name: zone-b}], forNodes: [{name: n1}]}}\n- {addresses: [10.128.0.11], zone: ''}\n",
        ))
        .unwrap()
        .unwrap();
        let eps: Vec<&Endpoint> = read.endpoints.1.iter().map(|(_, e)| e).collect();
        assert_eq!(eps[0].zone.as_deref(), Some("zone-a"));
        assert_eq!(eps[0].zone_hints, ["zone-a", "zone-b"]);
        assert_eq!(eps[0].node_hints, ["n1"]);
        assert_eq!((eps[1].zone.as_deref(), eps[1].zone_hints.len()), (None, 0));
        for (value, want) in [
            ("PreferClose", Some(TrafficDistribution::PreferSameZone)),
            ("PreferSameZone", Some(TrafficDistribution::PreferSameZone)),
            ("PreferSameNode", Some(TrafficDistribution::PreferSameNode)),
            ("Anywhere", None),
        ] {
            let s = svc(&format!("metadata: {{name: a}}\nspec:\n  clusterIP: 172.30.0.1\n  trafficDistribution: {value}\n  ports: [{{port: 80}}]\n"));
            assert_eq!(
                service_ports(&s).unwrap()[0].1.traffic_distribution,
                want,
                "{value}"
            );
        }
    }

    #[test]
    fn a_reason_names_the_first_five_bad_endpoints() {
        let eps: String = (0..8)
            .map(|i| format!("- {{addresses: [bad{i}]}}\n"))
            .collect();
        let read = slice_endpoints(&slice("z", &eps)).unwrap().unwrap();
        let reason = read.dropped.unwrap();
        assert!(reason.starts_with("8 of 8 endpoints dropped: "), "{reason}");
        assert!(
            reason.contains(r#""bad4""#) && !reason.contains(r#""bad5""#),
            "{reason}"
        );
        assert!(reason.ends_with("; and 3 more"), "{reason}");
    }

    #[test]
    fn slices_without_service_label_or_of_another_family() {
        let mut s = slice("x", "- {addresses: [10.128.0.10]}\n");
        s.address_type = "IPv6".into();
        assert_eq!(slice_endpoints(&s).unwrap(), None);
        s.metadata.labels = None;
        assert!(slice_endpoints(&s).unwrap_err().contains("service-name"));
        let bad = slice("y", "- {addresses: [not-an-ip]}\n");
        let read = slice_endpoints(&bad).unwrap().unwrap();
        assert_eq!(read.endpoints.1, vec![]);
        assert_eq!(
            read.dropped.as_deref(),
            Some(r#"1 of 1 endpoints dropped: address "not-an-ip" is not IPv4"#)
        );
    }
}
