use super::*;
use crate::egress::{Egress, RSDN_FORWARD, RSDN_MASQUERADE};
use crate::model::{ModelBuilder, ModelScope};
use crate::netfilter::payload::{chain_set, payload, Context, Scope};

fn scope() -> ProxyScope {
    ProxyScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        service_network: "172.30.0.0/16".parse().unwrap(),
        masquerade_bit: 0,
        node_name: "n1".into(),
        node_ip: "192.168.77.11".parse().unwrap(),
        node_ports: NodePorts::Local,
        zone: Some("zone-a".into()),
    }
}

fn services(yaml: &str) -> Services {
    let mut b = ModelBuilder::default();
    crate::source::dir::add_documents(&mut b, "test.yaml", yaml);
    let m = b.finish(&ModelScope {
        cluster_network: "10.128.0.0/14".parse().unwrap(),
        local_node: "n1".into(),
        programmed: Default::default(),
    });
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    m.services
}

const CLUSTER: &str = include_str!("../testdata/cluster.yaml");

/// What the engine writes for a node: the proxy's chains and egress masquerade's.
fn render(scope: &ProxyScope, services: &Services) -> (Ruleset, RenderStats) {
    let (mut r, stats) = super::render(scope, services);
    let egress = Egress {
        cluster_network: scope.cluster_network,
        service_network: scope.service_network,
    };
    r.absorb(egress.ruleset()).unwrap();
    (r, stats)
}

fn full(r: &Ruleset) -> String {
    payload(None, r, Scope::Full, Context::default()).text
}

fn partial(before: &Ruleset, after: &Ruleset) -> String {
    payload(Some(before), after, Scope::Partial, Context::default()).text
}

/// RFC 4648 base32, written here independently of the crate the code uses.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u64, 0);
    for b in bytes {
        acc = (acc << 8) | u64::from(*b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// kube-proxy's recipe, spelled out: sha256 of the concatenated strings, base32, 16 chars.
fn kube_hash(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    base32(&Sha256::digest(parts.concat().as_bytes()))[..16].to_string()
}

/// The golden file names chains by what they are ("KUBE-SEP-{ns1/svc1:p80 tcp 10.128.0.5:8080}");
/// the names are computed here from those strings.
fn expand(golden: &str) -> String {
    let mut out = String::new();
    let mut rest = golden;
    while let Some(start) = rest.find('{') {
        let end = start + rest[start..].find('}').unwrap();
        out.push_str(&rest[..start]);
        let parts: Vec<&str> = rest[start + 1..end].split(' ').collect();
        out.push_str(&kube_hash(&parts));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn chain_names_match_kube_proxys_own_test_vectors() {
    use crate::model::service::{Endpoint, Protocol, ServicePortName};
    let spn = |ns: &str, name: &str| ServicePortName {
        namespace: ns.into(),
        name: name.into(),
        port: "p80".into(),
        protocol: Protocol::Tcp,
    };
    let ep = |ip: &str| Endpoint {
        ip: ip.parse().unwrap(),
        port: 80,
        node: None,
        ready: true,
        serving: true,
        terminating: false,
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
    };
    // Names that appear in kube-proxy's proxier_test.go for these services and endpoints.
    let vectors = [
        (
            ServiceChains::of(&spn("ns1", "svc1")).cluster,
            "KUBE-SVC-XPGD46QRK7WJZT7O",
        ),
        (
            ServiceChains::of(&spn("ns2", "svc2")).external,
            "KUBE-EXT-GNZBNJ2PO5MGZ6GT",
        ),
        (
            ServiceChains::of(&spn("ns3", "svc3")).cluster,
            "KUBE-SVC-X27LE4BHSL4DOUIK",
        ),
        (
            ServiceChains::of(&spn("ns5", "svc5")).firewall,
            "KUBE-FW-NUKIZ6OKUXPJNT4C",
        ),
        (
            endpoint_chain(&spn("ns1", "svc1"), &ep("10.180.0.1")),
            "KUBE-SEP-SXIVWICOYRO3J4NJ",
        ),
        (
            endpoint_chain(&spn("ns2", "svc2"), &ep("10.180.0.2")),
            "KUBE-SEP-RS4RBKLTHTF2IUXJ",
        ),
        (
            endpoint_chain(&spn("ns4", "svc4"), &ep("10.180.0.5")),
            "KUBE-SEP-C6EBXVWJJZMIWKLZ",
        ),
    ];
    for (got, want) in vectors {
        assert_eq!(got, want);
    }
    // And the independent recipe agrees with them.
    assert_eq!(kube_hash(&["ns1/svc1:p80", "tcp"]), "XPGD46QRK7WJZT7O");
    assert_eq!(
        kube_hash(&["ns5/svc5:p80", "tcp", "10.180.0.3:80"]),
        "I77PXRDZVX7PMWMN"
    );
}

/// Eight Service shapes (ClusterIP with a named target port; NodePort; no endpoints with
/// NodePort and external IP over UDP; LoadBalancer with source ranges and
/// externalTrafficPolicy Local; SCTP with ClientIP affinity and an external IP;
/// internalTrafficPolicy Local without a local endpoint; only terminating endpoints; zone
/// hints, n1 being in zone-a: only the endpoint hinted for zone-a). Every line of the golden
/// file was checked by hand against kube-proxy's proxier.
#[test]
fn full_payload_matches_the_golden_file() {
    let (r, stats) = render(&scope(), &services(CLUSTER));
    let want = expand(include_str!("../testdata/cluster.golden"));
    let got = full(&r);
    if got != want {
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            assert_eq!(g, w, "line {}", i + 1);
        }
        assert_eq!(got.lines().count(), want.lines().count());
    }
    assert_eq!(stats.no_local_endpoints_internal, 1, "svc6");
    assert_eq!(stats.no_local_endpoints_external, 0);
}

/// nodePortAddresses: the golden payload with KUBE-SERVICES's last rule, the jump to
/// KUBE-NODEPORTS for local destinations, replaced by one rule per address (kube-proxy's
/// proxier.go writes `-d <ip>` per node IP when nodePortAddresses is not "match all").
#[test]
fn node_port_addresses_replace_the_local_destination_match_with_an_address_each() {
    let mut s = scope();
    s.node_ports = NodePorts::Addresses(vec![
        "192.168.77.11".parse().unwrap(),
        "192.168.77.111".parse().unwrap(),
    ]);
    let (r, _) = render(&s, &services(CLUSTER));
    let comment = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    let want = expand(include_str!("../testdata/cluster.golden")).replace(
        &format!("{comment} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS\n"),
        &format!(
            "{comment} -d 192.168.77.11 -j KUBE-NODEPORTS\n{comment} -d 192.168.77.111 -j KUBE-NODEPORTS\n"
        ),
    );
    assert_eq!(full(&r), want);
    // No address of the host in nodePortAddresses: NodePorts answer nowhere, and the NodePort
    // rules stay (kube-proxy writes them too).
    s.node_ports = NodePorts::Addresses(vec![]);
    let (r, _) = render(&s, &services(CLUSTER));
    let services_chain = r.tables.nat.lines(KUBE_SERVICES);
    assert!(
        services_chain.iter().all(|l| !l.contains("KUBE-NODEPORTS")),
        "{services_chain:?}"
    );
    assert_eq!(r.tables.nat.lines(KUBE_NODEPORTS).len(), 2);
}

#[test]
fn rerendering_an_unchanged_cluster_gives_an_empty_partial_sync() {
    let (a, _) = render(&scope(), &services(CLUSTER));
    let (b, _) = render(&scope(), &services(CLUSTER));
    assert_eq!(partial(&a, &b), "");
}

#[test]
fn an_endpoint_change_rewrites_only_that_services_chains() {
    let (before, _) = render(&scope(), &services(CLUSTER));
    let changed = CLUSTER.replace(
        "- {addresses: [10.128.2.5], nodeName: n2}",
        "- {addresses: [10.128.2.99], nodeName: n2}",
    );
    let (after, _) = render(&scope(), &services(&changed));
    let p = partial(&before, &after);
    let svc1 = kube_hash(&["ns1/svc1:p80", "tcp"]);
    let old_sep = kube_hash(&["ns1/svc1:p80", "tcp", "10.128.2.5:8080"]);
    let new_sep = kube_hash(&["ns1/svc1:p80", "tcp", "10.128.2.99:8080"]);
    let declared: Vec<&str> = p.lines().filter(|l| l.starts_with(':')).collect();
    assert_eq!(
        declared,
        [
            format!(":KUBE-SEP-{new_sep} - [0:0]"),
            format!(":KUBE-SVC-{svc1} - [0:0]"),
            format!(":KUBE-SEP-{old_sep} - [0:0]"),
        ],
        "{p}"
    );
    assert!(!p.contains("*filter"), "filter unchanged: {p}");
    assert!(
        p.ends_with(&format!("-X KUBE-SEP-{old_sep}\nCOMMIT\n")),
        "{p}"
    );
    assert!(p.contains("-j DNAT --to-destination 10.128.2.99:8080"));
}

#[test]
fn a_service_losing_its_endpoints_moves_to_the_filter_table() {
    let (before, _) = render(&scope(), &services(CLUSTER));
    let gone = CLUSTER.replace("- {addresses: [10.128.4.2], nodeName: n3}\n", "");
    let (after, _) = render(&scope(), &services(&gone));
    let p = partial(&before, &after);
    let svc2 = kube_hash(&["ns2/svc2:p80", "tcp"]);
    let sep = kube_hash(&["ns2/svc2:p80", "tcp", "10.128.4.2:80"]);
    for line in [
        "-A KUBE-SERVICES -m comment --comment \"ns2/svc2:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j REJECT".to_string(),
        "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns2/svc2:p80 has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j REJECT".into(),
        format!("-X KUBE-SVC-{svc2}"),
        format!("-X KUBE-EXT-{svc2}"),
        format!("-X KUBE-SEP-{sep}"),
    ] {
        assert!(p.lines().any(|l| l == line), "missing {line} in\n{p}");
    }
    assert!(!p.contains("172.30.0.42 --dport 80 -j KUBE-SVC"), "{p}");
}

#[test]
fn full_sync_deletes_stale_service_chains_found_in_the_kernel_only() {
    let (r, _) = render(&scope(), &services(CLUSTER));
    let ours = format!("KUBE-SVC-{}", kube_hash(&["ns1/svc1:p80", "tcp"]));
    let existing = chain_set([
        (TableName::Nat, "KUBE-SVC-AAAAAAAAAAAAAAAA"),
        (TableName::Nat, "KUBE-SEP-BBBBBBBBBBBBBBBB"),
        (TableName::Nat, "DOCKER"),
        (TableName::Nat, ours.as_str()),
    ]);
    let cx = Context {
        kernel: Some(&existing),
        owned: Some(&owns),
        ..Default::default()
    };
    let p = payload(None, &r, Scope::Full, cx).text;
    let deleted: Vec<&str> = p.lines().filter(|l| l.starts_with("-X")).collect();
    assert_eq!(
        deleted,
        [
            "-X KUBE-SEP-BBBBBBBBBBBBBBBB",
            "-X KUBE-SVC-AAAAAAAAAAAAAAAA"
        ]
    );
}

#[test]
fn probabilities_follow_kube_proxy() {
    let three = CLUSTER.replace(
        "- {addresses: [10.128.0.5], nodeName: n1}\n",
        "- {addresses: [10.128.0.5], nodeName: n1}\n- {addresses: [10.128.0.6], nodeName: n1}\n",
    );
    let (r, _) = render(&scope(), &services(&three));
    let chain = format!("KUBE-SVC-{}", kube_hash(&["ns1/svc1:p80", "tcp"]));
    let probs: Vec<&str> = r
        .chain(TableName::Nat, &chain)
        .unwrap()
        .lines()
        .map(|l| l.split("--probability ").nth(1).map_or("-", |p| &p[..12]))
        .collect();
    assert_eq!(probs, ["-", "0.3333333333", "0.5000000000", "-"]);
}

#[test]
fn the_mark_bit_is_configuration() {
    let mut s = scope();
    s.masquerade_bit = 14;
    let (r, _) = render(&s, &services(CLUSTER));
    assert_eq!(
        r.tables.nat.lines(KUBE_MARK_MASQ),
        ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    );
    assert!(r.tables.nat.lines(KUBE_POSTROUTING)[0].contains("! --mark 0x4000/0x4000"));
}

#[test]
fn egress_alone_and_the_order_of_the_jumps() {
    let egress = Egress {
        cluster_network: scope().cluster_network,
        service_network: scope().service_network,
    };
    let r = egress.ruleset();
    assert_eq!(
        r.tables.nat.chains.keys().collect::<Vec<_>>(),
        [RSDN_MASQUERADE]
    );
    assert_eq!(
        r.tables.filter.chains.keys().collect::<Vec<_>>(),
        [RSDN_FORWARD]
    );
    use crate::netfilter::producer::Producer;
    let j = egress.jumps();
    assert_eq!(j.len(), 2);
    assert!(j
        .iter()
        .all(|j| j.position == Position::Last && j.rule.contains("-j RSDN-")));
    let all = jumps();
    assert_eq!(all.len(), 12);
    assert!(all.iter().all(|j| j.position == Position::First));
    // kube-proxy's order at the top of FORWARD.
    let forward: Vec<&str> = all
        .iter()
        .filter(|j| j.chain == "FORWARD")
        .map(|j| j.rule.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(
        forward,
        [
            KUBE_PROXY_FIREWALL,
            KUBE_FORWARD,
            KUBE_SERVICES,
            KUBE_EXTERNAL_SERVICES
        ]
    );
}

#[test]
fn the_render_cache_reuses_unchanged_ports_and_renders_the_same() {
    let mut cache = RenderCache::default();
    let s = services(CLUSTER);
    let (first, _) = render_cached(&scope(), &s, &mut cache);
    let uncached_full = |r: &Ruleset| {
        let mut r = r.clone();
        r.absorb(
            Egress {
                cluster_network: scope().cluster_network,
                service_network: scope().service_network,
            }
            .ruleset(),
        )
        .unwrap();
        full(&r)
    };
    let changed =
        services(&CLUSTER.replace("10.128.4.2], nodeName: n3", "10.128.4.3], nodeName: n3"));
    let (second, stats) = render_cached(&scope(), &changed, &mut cache);
    let (uncached, uncached_stats) = render(&scope(), &changed);
    assert_eq!(uncached_full(&second), full(&uncached));
    assert_eq!(stats, uncached_stats);
    let reused: Vec<String> = second
        .groups
        .iter()
        .filter(|(key, p)| Arc::ptr_eq(p, &first.groups[*key]))
        .map(|(key, _)| key.1.clone())
        .collect();
    assert_eq!(
        reused.len(),
        first.groups.len() - 1,
        "only ns2/svc2 re-rendered: {reused:?}"
    );
    assert!(!reused.contains(&"ns2/svc2:p80".to_string()));
    // A different scope invalidates everything.
    let mut other = scope();
    other.masquerade_bit = 3;
    let (third, _) = render_cached(&other, &changed, &mut cache);
    assert!(third
        .groups
        .iter()
        .all(|(key, p)| !Arc::ptr_eq(p, &second.groups[key])));
}
