//! The model's paths against the kernel's: the same trace computed from the kernel's view of
//! the node it runs on. A hop of that node whose facts (rsdn's rules matched, the route, the
//! entries, the veth) are the same in both is checked; otherwise it is drift, with both
//! versions. Once the kernel's path takes another turn, the rest of it is shown at that hop.

use super::path::{Drift, Hop, Path, Status};

fn render(h: &Hop) -> Vec<String> {
    let mut out = vec![h.summary.clone()];
    out.extend(h.rules.iter().map(|r| r.rule.clone()));
    out.extend(h.lines.iter().cloned());
    out
}

fn mark(m: &mut Path, k: &Path, local: &str) {
    let mut diverged = false;
    // The first drift of a path shows both versions; later ones mostly follow from it.
    let mut drifted = false;
    for (i, hop) in m.hops.iter_mut().enumerate() {
        if hop.node.as_deref() != Some(local) {
            continue;
        }
        if diverged {
            hop.status = Status::Drift;
            continue;
        }
        match k.hops.get(i) {
            Some(kh) if kh.node == hop.node && kh.stage == hop.stage => {
                if kh.facts == hop.facts {
                    // They agree: the kernel's words say more (real device names, MTUs).
                    hop.status = Status::Checked;
                    hop.summary = kh.summary.clone();
                    hop.lines = kh.lines.clone();
                    hop.notes = kh.notes.clone();
                    for hit in &mut hop.rules {
                        hit.kernel = kh
                            .rules
                            .iter()
                            .find(|x| x.key == hit.key)
                            .map(|x| x.rule.clone());
                    }
                } else if drifted {
                    hop.status = Status::Drift;
                    hop.drift.push(Drift {
                        what: "differs too, after the drift above".into(),
                        model: vec![],
                        kernel: vec![kh.summary.clone()],
                    });
                } else {
                    drifted = true;
                    hop.status = Status::Drift;
                    hop.drift.push(Drift {
                        what: format!("{} differs from the model", hop.stage),
                        model: render(hop),
                        kernel: render(kh),
                    });
                }
            }
            _ => {
                diverged = true;
                hop.status = Status::Drift;
                let rest = k.hops.get(i..).unwrap_or_default();
                hop.drift.push(Drift {
                    what: "the kernel's path goes elsewhere from here".into(),
                    model: if drifted { vec![] } else { render(hop) },
                    kernel: rest
                        .iter()
                        .map(|h| {
                            format!(
                                "{} {}: {}",
                                h.node.as_deref().unwrap_or("-"),
                                h.stage,
                                h.summary
                            )
                        })
                        .collect(),
                });
            }
        }
    }
    if (m.verdict, &m.to, &m.seen_source) != (k.verdict, &k.to, &k.seen_source) {
        m.kernel = Some(k.outcome());
    }
}

/// Marks `model`'s hops on node `local` with what `kernel` (the same trace from the kernel's
/// view of that node) says; returns notes on the kernel's paths the model does not have.
pub fn compare(model: &mut [Path], kernel: &[Path], local: &str) -> Vec<String> {
    let mut pairs: Vec<Option<usize>> = model
        .iter()
        .map(|m| kernel.iter().position(|k| k.key == m.key))
        .collect();
    if model.len() == 1 && kernel.len() == 1 {
        pairs[0] = Some(0);
    }
    let mut used = vec![false; kernel.len()];
    for (m, pair) in model.iter_mut().zip(&pairs) {
        match pair {
            Some(k) => {
                used[*k] = true;
                mark(m, &kernel[*k], local);
            }
            None => {
                if let Some(hop) = m
                    .hops
                    .iter_mut()
                    .find(|h| h.node.as_deref() == Some(local) && h.stage.starts_with("nat"))
                {
                    hop.status = Status::Drift;
                    hop.drift.push(Drift {
                        what: "the kernel's rules never send the packet this way".into(),
                        model: render(hop),
                        kernel: vec![],
                    });
                }
                m.kernel = Some("never taken by the kernel".into());
            }
        }
    }
    kernel
        .iter()
        .zip(used)
        .filter(|(_, u)| !u)
        .map(|(k, _)| {
            format!(
                "drift: the kernel also sends this flow to {} ({:?}, probability {:.2}); the model has no such path",
                k.to, k.verdict, k.probability
            )
        })
        .collect()
}
