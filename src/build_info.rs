//! What this binary is: the crate version, the git commit and the build time (`build.rs`
//! finds the last two; "unknown" where it could not). `rsdn --version`, the daemon's first log
//! line and the `rsdn_build_info` metric all say the same.

use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit, abbreviated to 12 hex digits.
pub const REVISION: &str = env!("RSDN_REVISION");
/// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
pub const BUILD_DATE: &str = env!("RSDN_BUILD_DATE");

/// What `rsdn --version` prints after the program's name.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("RSDN_REVISION"),
    ", built ",
    env!("RSDN_BUILD_DATE"),
    ")"
);

/// `rsdn_build_info{version, revision, build_date} 1` (an OpenMetrics info metric, like
/// kube-proxy's `kubernetes_build_info`).
pub fn register(registry: &mut Registry) {
    registry.register(
        "rsdn_build",
        "The version, git commit and build time of this rsdn",
        Info::new(vec![
            ("version", VERSION),
            ("revision", REVISION),
            ("build_date", BUILD_DATE),
        ]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metric_names_the_build() {
        let mut r = Registry::default();
        register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let want = format!(
            "rsdn_build_info{{version=\"{VERSION}\",revision=\"{REVISION}\",build_date=\"{BUILD_DATE}\"}} 1\n"
        );
        assert!(text.contains(&want), "{text}");
        assert_eq!(
            LONG,
            format!("{VERSION} (revision {REVISION}, built {BUILD_DATE})")
        );
    }

    /// Built from this checkout: the commit is HEAD's (or a descendant's, after a commit that
    /// did not rebuild), and the time a UTC time `date` reads, not in the future.
    #[test]
    fn the_facts_are_found_in_a_checkout() {
        let run = |args: &[&str]| {
            std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        if std::env::var_os("RSDN_REVISION").is_none() {
            if let Some(head) = run(&["git", "rev-parse", "HEAD"]) {
                assert_eq!(REVISION.len(), 12, "{REVISION}");
                let known = run(&["git", "cat-file", "-t", REVISION]);
                assert_eq!(
                    known.as_deref(),
                    Some("commit"),
                    "{REVISION} vs HEAD {head}"
                );
            }
        }
        let b = BUILD_DATE.as_bytes();
        assert!(
            b.len() == 20 && b[4] == b'-' && b[10] == b'T' && b[19] == b'Z',
            "{BUILD_DATE}"
        );
        let built: u64 = run(&["date", "-u", "-d", BUILD_DATE, "+%s"])
            .expect("date reads it")
            .parse()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(built <= now && built > 1_700_000_000, "{BUILD_DATE}");
    }
}
