//! What the image ships, `rsdn` and `rsdn-cni`, carries none of the lab: not the `rsdn-lab`
//! crate, not the stand-in API server's certificate generation (rcgen), and no TLS server of
//! our own (tokio-rustls or rustls as our dependency; kube-rs's HTTPS client still brings them
//! in for talking to the API server).
//!
//! Read from Cargo.lock, which cargo brings up to date before it builds this test. A package's
//! entry there lists its normal, build and dev dependencies for every platform, so the closure
//! computed here is wider than what the binaries link: nothing absent from it can be in them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Package name -> the names of its dependencies (the versions of a name merged).
fn lock() -> BTreeMap<String, BTreeSet<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut packages: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut name, mut in_deps) = (String::new(), false);
    for line in text.lines().map(str::trim) {
        if line == "[[package]]" {
            in_deps = false;
        } else if let Some(n) = line.strip_prefix("name = ") {
            name = n.trim_matches('"').to_string();
            packages.entry(name.clone()).or_default();
        } else if line == "dependencies = [" {
            in_deps = true;
        } else if in_deps && line == "]" {
            in_deps = false;
        } else if in_deps {
            // ` "name",` or ` "name version",` (when several versions are locked).
            let dep = line.trim_end_matches(',').trim_matches('"');
            let dep = dep.split_whitespace().next().unwrap_or_default();
            packages.entry(name.clone()).or_default().insert(dep.into());
        }
    }
    packages
}

/// `roots` and everything they depend on, transitively.
fn closure(lock: &BTreeMap<String, BTreeSet<String>>, roots: &[&str]) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
    while let Some(p) = todo.pop() {
        if seen.insert(p.clone()) {
            let deps = lock
                .get(&p)
                .unwrap_or_else(|| panic!("{p} is not in Cargo.lock"));
            todo.extend(deps.iter().cloned());
        }
    }
    seen
}

#[test]
fn the_shipped_binaries_depend_on_nothing_of_the_lab() {
    let lock = lock();
    let shipped = closure(&lock, &["rsdn", "rsdn-cni"]);
    // The parse found the graph: what the daemon does need is in it.
    for needed in ["rsdn-cni", "kube", "k8s-openapi", "tokio", "hyper"] {
        assert!(
            shipped.contains(needed),
            "{needed} missing: Cargo.lock misread?"
        );
    }
    for lab in ["rsdn-lab", "rcgen"] {
        assert!(!shipped.contains(lab), "rsdn or rsdn-cni depends on {lab}");
    }
    // The lab still holds what it needs (the check above is not vacuous).
    assert!(closure(&lock, &["rsdn-lab"]).contains("rcgen"));
}

#[test]
fn no_tls_server_of_our_own_in_the_shipped_crates() {
    let lock = lock();
    for package in ["rsdn", "rsdn-cni"] {
        for tls in ["tokio-rustls", "rustls", "rcgen"] {
            assert!(
                !lock[package].contains(tls),
                "{package} depends on {tls} itself; the stand-in API server's TLS belongs to rsdn-lab"
            );
        }
    }
    assert!(lock["rsdn-lab"].contains("tokio-rustls"));
}
