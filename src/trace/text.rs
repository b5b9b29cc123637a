//! The trace as an operator reads it: numbered hops, the rules each matched, the fork into a
//! Service's endpoints once, drift with both versions.

use std::fmt::Write as _;

use super::path::{Hop, Path, Status};
use super::Trace;

const INDENT: &str = "                          ";

fn hop(out: &mut String, n: usize, h: &Hop) {
    let node = h.node.as_deref().unwrap_or("-");
    let mark = match h.status {
        Status::Drift => "DRIFT ",
        _ => "",
    };
    let _ = writeln!(out, "{n:>3} {node:<8} {:<16} {mark}{}", h.stage, h.summary);
    for r in &h.rules {
        let note = r
            .note
            .as_ref()
            .map(|n| format!("    [{n}]"))
            .unwrap_or_default();
        let _ = writeln!(out, "{INDENT}{}{note}", r.rule);
    }
    for l in &h.lines {
        let _ = writeln!(out, "{INDENT}{l}");
    }
    for d in &h.drift {
        let _ = writeln!(out, "{INDENT}drift: {}", d.what);
        for l in &d.model {
            let _ = writeln!(out, "{INDENT}  model:  {l}");
        }
        if d.kernel.is_empty() && !d.model.is_empty() {
            let _ = writeln!(out, "{INDENT}  kernel: (nothing)");
        }
        for l in &d.kernel {
            let _ = writeln!(out, "{INDENT}  kernel: {l}");
        }
    }
    for note in &h.notes {
        let _ = writeln!(out, "{INDENT}note: {note}");
    }
}

fn verdict(out: &mut String, p: &Path) {
    let _ = writeln!(out, "    => {}", p.outcome());
    if let Some(k) = &p.kernel {
        let _ = writeln!(out, "    => DRIFT: the kernel: {k}");
    }
}

/// The hops all paths share from the start.
fn shared(paths: &[Path]) -> usize {
    let Some(first) = paths.first() else {
        return 0;
    };
    if paths.len() == 1 {
        return first.hops.len();
    }
    (0..first.hops.len())
        .take_while(|&i| paths.iter().all(|p| p.hops.get(i) == Some(&first.hops[i])))
        .count()
}

pub fn render(t: &Trace) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "trace {} -> {}", t.from, t.to);
    let p = &t.packet;
    let _ = if p.proto == "icmp" {
        writeln!(out, "      icmp echo {} -> {}", p.src, p.dst)
    } else {
        writeln!(
            out,
            "      {} {}:{} -> {}:{}",
            p.proto, p.src, p.sport, p.dst, p.dport
        )
    };
    let _ = match &t.checked_on {
        Some(n) => writeln!(
            out,
            "      {n}'s kernel read and compared with the model; other nodes' hops are predicted"
        ),
        None => writeln!(out, "      predicted from the model (no kernel read)"),
    };
    for n in &t.notes {
        let _ = writeln!(out, "      {n}");
    }
    out.push('\n');
    let common = shared(&t.paths);
    if let Some(first) = t.paths.first() {
        for (i, h) in first.hops[..common].iter().enumerate() {
            hop(&mut out, i + 1, h);
        }
    }
    if t.paths.len() == 1 {
        verdict(&mut out, &t.paths[0]);
        return out;
    }
    for (k, p) in t.paths.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n  {}) {}, probability {:.2}",
            (b'a' + (k % 26) as u8) as char,
            p.endpoint.as_deref().unwrap_or("no endpoint"),
            p.probability
        );
        for (i, h) in p.hops.iter().enumerate().skip(common) {
            hop(&mut out, i + 1, h);
        }
        verdict(&mut out, p);
    }
    out
}
