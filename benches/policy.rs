//! NetworkPolicy's compute step alone (no kernel): render for node n1 of a model with 1000
//! policies over 5000 pods (100 of them on n1) in 50 namespaces, shaped like
//! `hack/bench-policy.sh`'s cluster; then again after one remote pod that is a member of a peer
//! set is relabelled (what a partial sync computes): with what one render keeps for the next
//! (set members, pods' and policies' chains), as the daemon does, and for comparison in the
//! same run with nothing kept (every render as costly as the first).
//!   cargo bench --bench policy
use std::time::Instant;

use rsdn::model::{ClusterModel, ModelBuilder, ModelScope};
use rsdn::netfilter::payload::{payload, Context, Scope};
use std::sync::Arc;

use rsdn::policy::render::render_cached;
use rsdn::policy::render::Cache;

fn cluster(relabelled: bool) -> String {
    let mut y = String::new();
    for n in 0..50 {
        y += &format!(
            "---\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: t{}}}}}\n",
            n % 10
        );
    }
    for i in 0..5000 {
        let node = i % 50 + 1;
        let ip = if node == 1 {
            format!("10.128.{}.{}", i / 50 / 250, (i / 50) % 250 + 2)
        } else {
            format!("10.{}.{}.{}", 129 + i / 62500, (i / 250) % 250, i % 250 + 1)
        };
        // p10 (ns10, team t0, role r3) is in the peer sets of this node's policies (team t0).
        let role = if relabelled && i == 10 { 4 } else { i % 7 };
        y += &format!("---\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns{}, labels: {{app: a{}, role: r{role}}}}}\nspec: {{nodeName: n{node}, containers: [{{name: c, ports: [{{name: serve-80-tcp, containerPort: 80}}]}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n", i % 50, i % 100);
    }
    for j in 0..1000 {
        y += &format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: pol{j}, namespace: ns{}}}\nspec:\n  podSelector: {{matchLabels: {{app: a{}}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchLabels: {{role: r{}}}}}}}]\n    ports: [{{port: 80}}]\n  - from: [{{ipBlock: {{cidr: 172.16.0.0/12, except: [172.16.{}.0/24]}}}}]\n", j % 50, j % 100, j % 10, j % 7, j % 256);
        if j % 5 == 0 {
            y += &format!("  egress:\n  - to: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}]\n    ports: [{{port: serve-80-tcp}}]\n", (j + 1) % 100);
        }
    }
    y
}

fn model(yaml: &str) -> ClusterModel {
    let mut b = ModelBuilder::default();
    rsdn::source::dir::add_documents(&mut b, "bench.yaml", yaml);
    b.finish(&ModelScope {
        cluster_network: "10.0.0.0/8".parse().unwrap(),
        local_node: "n1".into(),
        programmed: Default::default(),
    })
}

fn main() {
    // The sources share what did not change between two models (same `Arc`s): `after` is
    // `before` with p10 replaced.
    let before = Arc::new(model(&cluster(false)));
    let mut after = (*before).clone();
    let p10 = ("ns10".to_string(), "p10".to_string());
    after
        .pods
        .insert(p10.clone(), model(&cluster(true)).pods[&p10].clone());
    let after = Arc::new(after);
    assert_eq!((before.pods.len(), before.policies.len()), (5000, 1000));
    for (what, keep) in [("kept", true), ("nothing kept", false)] {
        let mut cache = Cache::default();
        let mut last = None;
        let mut times = Vec::new();
        for (i, m) in [&before, &after, &before, &after, &before, &after]
            .into_iter()
            .enumerate()
        {
            if !keep {
                cache = Cache::default();
            }
            let t = Instant::now();
            let (r, stats) = render_cached(m, "n1", &mut cache);
            let text = payload(last.as_ref(), &r, Scope::Partial, Context::default());
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if i == 0 {
                println!(
                    "{what}: first render + diff {ms:.1} ms ({} sets, {} pods isolated for ingress, {} lines)",
                    stats.sets,
                    stats.isolated_ingress,
                    text.lines()
                );
            } else {
                times.push((ms, text.lines()));
            }
            last = Some(r);
        }
        let mut sorted: Vec<f64> = times.iter().map(|t| t.0).collect();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{what}: one pod relabelled, render + diff, median of {}: {:.2} ms ({} lines changed)",
            sorted.len(),
            sorted[sorted.len() / 2],
            times[0].1
        );
    }
}
