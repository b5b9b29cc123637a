//! Build facts for `rsdn --version`, the daemon's first log line and the `rsdn_build_info`
//! metric (`src/build_info.rs`): the git commit and the build time. Where git or the checkout
//! is absent (a source tarball, an image build: `.dockerignore` leaves `.git` out) they are
//! "unknown", unless given: `RSDN_REVISION` names the commit, `SOURCE_DATE_EPOCH` (the
//! reproducible-builds convention) the build time.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

const UNKNOWN: &str = "unknown";

/// A git command's trimmed output, None when git is missing, fails or prints nothing.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn given(var: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={var}");
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// Re-runs this script when HEAD moves (a commit, a checkout), and only then: every path
/// named must exist, or cargo would re-run it (and rebuild rsdn) on every build.
fn rerun_when_head_moves() {
    let mut paths = vec!["HEAD".to_string(), "packed-refs".to_string()];
    paths.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for p in paths {
        if let Some(path) = git(&["rev-parse", "--git-path", &p]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of seconds since the epoch (the proleptic Gregorian calendar, as
/// `date -u` prints it; Howard Hinnant's days-to-civil).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn main() {
    let revision = given("RSDN_REVISION").or_else(|| {
        rerun_when_head_moves();
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    let date = match given("SOURCE_DATE_EPOCH") {
        Some(epoch) => epoch.trim().parse().ok().map(utc),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| utc(d.as_secs())),
    };
    println!(
        "cargo:rustc-env=RSDN_REVISION={}",
        revision.as_deref().unwrap_or(UNKNOWN)
    );
    println!(
        "cargo:rustc-env=RSDN_BUILD_DATE={}",
        date.as_deref().unwrap_or(UNKNOWN)
    );
}
