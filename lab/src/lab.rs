//! Which lab this is. A lab is named (`--lab`, or `RSDN_LAB`, default `rsdn-lab`); it owns the
//! network namespaces `<name>-<role>` and the state directory `/run/<name>`, so several labs
//! run side by side and each one's `down` touches only its own.
//!
//! Ownership is decided by an exact grammar, never by a bare prefix: lab names may contain
//! `-`, so the namespaces of lab `a-b` (`a-b-node1`, ...) all start with `a-` too. The roles a
//! lab gives its namespaces are `underlay`, `ext`, `node<N>`, `node<N>-pod<M>` and
//! `pod.<namespace>.<name>` (a pod added with `lab pod add`); no `<word>-<role>` is itself a
//! role, and lab names cannot contain `.`, so a namespace belongs to one lab at most
//! (`owned_by_exactly_one_lab` checks it).

use std::path::{Path, PathBuf};

use crate::objects::{is_dns_label, PodRef};

pub const DEFAULT_NAME: &str = "rsdn-lab";
/// The environment variable naming the lab.
pub const ENV: &str = "RSDN_LAB";
/// A file in the state directory that says the directory is a lab's (and which): `down`
/// removes only a directory that has it, so a lab named like another tenant of /run
/// (`netns`, `lock`) can never delete that tenant's files.
const MARKER: &str = ".rsdn-lab";
const MAX_NAME: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lab {
    name: String,
}

impl Lab {
    /// `name`: lower-case letters, digits and `-`, starting and ending with a letter or digit,
    /// at most 32 characters.
    pub fn new(name: &str) -> Result<Lab, String> {
        if name.len() > MAX_NAME {
            return Err(format!(
                "lab name {name:?} is longer than {MAX_NAME} characters"
            ));
        }
        if !is_dns_label(name) {
            return Err(format!(
                "lab name {name:?} must be lower-case letters, digits and '-', starting and ending with a letter or digit"
            ));
        }
        Ok(Lab { name: name.into() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn netns(&self, role: &str) -> String {
        format!("{}-{role}", self.name)
    }
    pub fn underlay(&self) -> String {
        self.netns("underlay")
    }
    pub fn external(&self) -> String {
        self.netns("ext")
    }
    /// Node `i` (1-based).
    pub fn node(&self, i: u32) -> String {
        self.netns(&format!("node{i}"))
    }
    /// Pod `j` of node `i`, as `lab up` makes them.
    pub fn node_pod(&self, i: u32, j: u32) -> String {
        self.netns(&format!("node{i}-pod{j}"))
    }
    /// A pod added with `lab pod add`.
    pub fn pod(&self, pod: &PodRef) -> String {
        self.netns(&format!("pod.{}.{}", pod.namespace, pod.name))
    }

    /// Whether the network namespace `netns` is one this lab makes.
    pub fn owns(&self, netns: &str) -> bool {
        let Some(role) = netns
            .strip_prefix(self.name.as_str())
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        if matches!(role, "underlay" | "ext") || node_role(role) {
            return true;
        }
        if let Some((node, pod)) = role.split_once('-') {
            if node_role(node) && pod.strip_prefix("pod").is_some_and(number) {
                return true;
            }
        }
        role.strip_prefix("pod.")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(ns, name)| is_dns_label(ns) && is_dns_label(name))
    }

    pub fn state_dir(&self) -> PathBuf {
        Path::new("/run").join(&self.name)
    }
    /// The Kubernetes objects of the cluster: what the daemons (`dir` source) and the stand-in
    /// API server read.
    pub fn cluster_dir(&self) -> PathBuf {
        self.state_dir().join("cluster")
    }
    pub fn node_dir(&self, i: u32) -> PathBuf {
        self.state_dir().join(format!("node{i}"))
    }
    /// Pod records (`<namespace>.<name>.json`) and the pods' server pid files and logs.
    pub fn pods_dir(&self) -> PathBuf {
        self.state_dir().join("pods")
    }
    /// Namespace records (`<name>.json`).
    pub fn namespaces_dir(&self) -> PathBuf {
        self.state_dir().join("namespaces")
    }
    /// Present while the lab runs with an API server (`lab up --api`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.state_dir().join("kubeconfig")
    }

    /// Whether a process argument is a path inside this lab's state directory (exactly: the
    /// state of lab `a` is not that of lab `a-b`).
    pub fn is_state_path(&self, arg: &str) -> bool {
        Path::new(arg).starts_with(self.state_dir())
    }

    /// Creates the state directory, or checks that an existing one is this lab's.
    pub fn claim_state_dir(&self) -> anyhow::Result<()> {
        let dir = self.state_dir();
        if dir.exists() && !self.state_dir_is_ours() {
            anyhow::bail!(
                "{} exists and is not the state directory of lab {} (no {MARKER} in it): choose another lab name ({ENV})",
                dir.display(),
                self.name
            );
        }
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(MARKER), format!("{}\n", self.name))?;
        Ok(())
    }

    /// The state directory exists and carries this lab's marker (or, made by a version before
    /// the marker, the default lab's layout).
    pub fn state_dir_is_ours(&self) -> bool {
        let dir = self.state_dir();
        match std::fs::read_to_string(dir.join(MARKER)) {
            Ok(text) => text.trim() == self.name,
            Err(_) => self.name == DEFAULT_NAME && dir.join("cluster").is_dir(),
        }
    }
}

/// `node<N>`, N a number without leading zeros.
fn node_role(s: &str) -> bool {
    s.strip_prefix("node").is_some_and(number)
}

fn number(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(n: &str) -> Lab {
        Lab::new(n).unwrap()
    }

    /// Every namespace a lab of this shape would make.
    fn namespaces_of(l: &Lab) -> Vec<String> {
        let mut v = vec![l.underlay(), l.external()];
        for i in [1, 2, 10] {
            v.push(l.node(i));
            for j in [1, 3] {
                v.push(l.node_pod(i, j));
            }
        }
        for (ns, name) in [("x", "a"), ("default", "node1-pod1"), ("my-ns", "b-c")] {
            v.push(l.pod(&PodRef::new(ns, name).unwrap()));
        }
        v
    }

    #[test]
    fn default_names_are_the_historic_ones() {
        let l = lab(DEFAULT_NAME);
        assert_eq!(l.node(1), "rsdn-lab-node1");
        assert_eq!(l.node_pod(2, 1), "rsdn-lab-node2-pod1");
        assert_eq!(l.underlay(), "rsdn-lab-underlay");
        assert_eq!(l.external(), "rsdn-lab-ext");
        assert_eq!(l.state_dir(), Path::new("/run/rsdn-lab"));
        assert_eq!(
            l.cluster_dir(),
            Path::new("/run/rsdn-lab/cluster"),
            "the daemons' dir source"
        );
        assert_eq!(l.pod(&PodRef::new("x", "a").unwrap()), "rsdn-lab-pod.x.a");
    }

    #[test]
    fn a_lab_owns_all_its_namespaces() {
        for name in ["rsdn-lab", "h", "a-b", "lab2"] {
            let l = lab(name);
            for ns in namespaces_of(&l) {
                assert!(l.owns(&ns), "{name} should own {ns}");
            }
        }
    }

    #[test]
    fn owned_by_exactly_one_lab() {
        // Names that extend one another at a '-' are the dangerous ones: every namespace of
        // `rsdn-lab-x` starts with `rsdn-lab-`.
        let names = [
            "rsdn-lab",
            "rsdn-lab-x",
            "rsdn-lab2",
            "rsdn-lab-node1",
            "rsdn-lab-node1-pod1",
            "rsdn-lab-pod",
            "rsdn-lab-ext",
            "rsdn-lab-underlay",
            "rsdn",
        ];
        for a in names {
            for b in names {
                if a == b {
                    continue;
                }
                for ns in namespaces_of(&lab(b)) {
                    assert!(!lab(a).owns(&ns), "lab {a} must not own {ns} of lab {b}");
                }
            }
        }
    }

    #[test]
    fn foreign_namespaces_are_not_owned() {
        let l = lab("rsdn-lab");
        for ns in [
            "rsdn-lab",
            "rsdn-lab-",
            "rsdn-lab-node",
            "rsdn-lab-node0",
            "rsdn-lab-node01",
            "rsdn-lab-node1-pod",
            "rsdn-lab-node1-pod0",
            "rsdn-lab-node1-x",
            "rsdn-lab-pod.x",
            "rsdn-lab-pod.x.",
            "rsdn-lab-pod.X.a",
            "rsdn-lab-pod.x.a.b",
            "rsdn-lab-x-node1",
            "rsdn-labnode1",
            "rsdn-lab2-node1",
            "rsdn-pm-node-1",
            "rt123-1-node",
        ] {
            assert!(!l.owns(ns), "{ns}");
        }
    }

    #[test]
    fn lab_names_are_checked() {
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a/b",
            "a_b",
            "a b",
            "abcdefghijabcdefghijabcdefghijabc",
        ] {
            assert!(Lab::new(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "rsdn-lab", "hlab", "ci-1234", "0lab"] {
            assert!(Lab::new(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn state_paths_are_exact() {
        let l = lab("a");
        assert!(l.is_state_path("/run/a/node1/config.yaml"));
        assert!(l.is_state_path("/run/a/cluster"));
        assert!(!l.is_state_path("/run/a-b/node1/config.yaml"));
        assert!(!l.is_state_path("/run/ab/cluster"));
        assert!(!l.is_state_path("node1/config.yaml"));
    }
}
