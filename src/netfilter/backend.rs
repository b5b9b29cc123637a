//! Which iptables backend this node uses: the one the kubelet and the node's other users
//! already use, decided the way kube-proxy's iptables wrapper decides.

use std::process::Command;

/// The iptables backends: both are per network namespace, with their own tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// The backend's tool with a suffix: `iptables-nft`, `iptables-legacy-restore`, ...
    pub fn tool(self, suffix: &str) -> String {
        format!("iptables-{}{suffix}", self.name())
    }

    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "nft" | "nf_tables" => Some(Backend::Nft),
            "legacy" => Some(Backend::Legacy),
            _ => None,
        }
    }
}

/// Everything a backend's save shows (all tables), or None when the tool is missing. Legacy
/// tables the kernel has not instantiated in this namespace are not read: reading them would
/// create them, and iptables-nft would warn about "legacy tables present" from then on.
pub fn save_all(backend: Backend) -> Option<String> {
    if backend == Backend::Legacy
        && std::fs::read_to_string("/proc/net/ip_tables_names").is_ok_and(|t| t.trim().is_empty())
    {
        return Some(String::new());
    }
    let out = Command::new(backend.tool("-save")).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Which backend the node's other users (kubelet, the runtime, the distribution) already use,
/// the way kube-proxy's iptables-wrapper decides: the kubelet's hint chain, else the backend
/// holding more rules; nft when both are empty (today's distributions default to it).
pub fn detect() -> (Backend, String) {
    let saves = [Backend::Nft, Backend::Legacy].map(|b| (b, save_all(b)));
    decide(&saves)
}

fn decide(saves: &[(Backend, Option<String>); 2]) -> (Backend, String) {
    for (backend, save) in saves {
        let hint = save.as_deref().is_some_and(|s| {
            s.lines().any(|l| {
                l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY")
            })
        });
        if hint {
            return (
                *backend,
                "the kubelet's hint chain is in this backend".into(),
            );
        }
    }
    let rules = |i: usize| {
        saves[i]
            .1
            .as_deref()
            .map(|s| s.lines().filter(|l| l.starts_with("-A ")).count())
    };
    match (rules(0), rules(1)) {
        (None, None) => (Backend::Nft, "no iptables tools found; assuming nft".into()),
        (None, Some(_)) => (Backend::Legacy, "only the legacy tools work here".into()),
        (Some(nft), Some(legacy)) if legacy > nft => (
            Backend::Legacy,
            format!("legacy holds {legacy} rules, nft {nft}"),
        ),
        (Some(nft), legacy) => (
            Backend::Nft,
            format!("nft holds {nft} rules, legacy {}", legacy.unwrap_or(0)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_chain_wins_then_the_rule_count() {
        let hint = Some("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n".to_string());
        let many = Some("*filter\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\n".to_string());
        let one = Some("*filter\n-A INPUT -j ACCEPT\n".to_string());
        assert_eq!(
            decide(&[(Backend::Nft, many.clone()), (Backend::Legacy, hint)]).0,
            Backend::Legacy
        );
        assert_eq!(
            decide(&[(Backend::Nft, one.clone()), (Backend::Legacy, many)]).0,
            Backend::Legacy
        );
        assert_eq!(
            decide(&[(Backend::Nft, one), (Backend::Legacy, None)]).0,
            Backend::Nft
        );
        assert_eq!(
            decide(&[(Backend::Nft, None), (Backend::Legacy, None)]).0,
            Backend::Nft
        );
        assert_eq!(Backend::parse("nf_tables"), Some(Backend::Nft));
        assert_eq!(Backend::Legacy.tool("-restore"), "iptables-legacy-restore");
    }
}
