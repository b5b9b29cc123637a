//! The plugin's contract at the process boundary, for inputs that fail before any kernel work:
//! each must print exactly one CNI error object on stdout and exit non-zero. No root needed.

use std::process::{Command, Stdio};

use rsdn_testkit::*;
use serde_json::json;

fn run(env: &[(&str, &str)], stdin: &str) -> Invocation {
    let mut cmd = Command::new(plugin());
    cmd.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_stdin(cmd, stdin.as_bytes())
}

const ADD_ENV: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "abc"),
    ("CNI_NETNS", "/run/netns/none"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/opt/cni/bin"),
];

fn good_conf() -> serde_json::Value {
    json!({"cniVersion": "1.0.0", "name": "rsdn", "type": "rsdn-cni", "subnet": "10.128.0.0/23"})
}

#[test]
fn garbage_on_stdin_is_code_6() {
    let r = run(ADD_ENV, "\x00\x01 this is not json");
    let e = r.err(6);
    assert_eq!(e["cniVersion"], "1.1.0");
    assert_eq!(r.stdout.lines().count(), 1, "exactly one object on stdout");
}

#[test]
fn empty_stdin_is_code_6() {
    run(ADD_ENV, "").err(6);
}

#[test]
fn missing_env_vars_are_code_4_and_named() {
    for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let env: Vec<_> = ADD_ENV
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let e = run(&env, &good_conf().to_string()).err(4);
        assert!(e["msg"].as_str().unwrap().contains(missing), "{e}");
    }
}

#[test]
fn unknown_command_is_code_4() {
    let mut env = ADD_ENV.to_vec();
    env[0].1 = "RESTART";
    run(&env, &good_conf().to_string()).err(4);
}

#[test]
fn unknown_cni_version_is_code_1() {
    let mut conf = good_conf();
    conf["cniVersion"] = json!("9.9.9");
    let e = run(ADD_ENV, &conf.to_string()).err(1);
    assert!(e["details"].as_str().unwrap().contains("1.1.0"), "{e}");
}

#[test]
fn invalid_config_is_code_7_and_errors_answer_in_the_callers_version() {
    let mut conf = good_conf();
    conf["mtu"] = json!(10);
    let e = run(ADD_ENV, &conf.to_string()).err(7);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert!(e["msg"].as_str().unwrap().contains("mtu"), "{e}");
}

#[test]
fn version_answers_whatever_the_caller_speaks() {
    for stdin in [
        r#"{"cniVersion":"0.3.1"}"#,
        r#"{"cniVersion":"42.0.0"}"#,
        "",
    ] {
        let r = run(&[("CNI_COMMAND", "VERSION")], stdin);
        let v = r.ok().json();
        assert_eq!(v["cniVersion"], "1.1.0");
        let supported: Vec<&str> = v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for want in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            assert!(supported.contains(&want), "{v}");
        }
    }
}

#[test]
fn gc_and_status_need_1_1_0() {
    let mut conf = good_conf();
    conf["cni.dev/valid-attachments"] = json!([]);
    run(&[("CNI_COMMAND", "GC")], &conf.to_string()).err(1);
    run(&[("CNI_COMMAND", "STATUS")], &conf.to_string()).err(1);
}

/// Runs ADD with CNI_NETNS set to `netns`; nothing of the node is needed since the path is
/// refused before the bridge is looked up.
fn add_in(netns: &std::path::Path) -> serde_json::Value {
    let mut env = ADD_ENV.to_vec();
    let netns = netns.to_str().unwrap();
    env[2].1 = netns;
    let dir = tempfile::tempdir().unwrap();
    let mut conf = good_conf();
    conf["dataDir"] = json!(dir.path());
    let e = run(&env, &conf.to_string()).err(4);
    assert!(
        !dir.path().join("rsdn").exists(),
        "IPAM store touched for {netns}"
    );
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.contains("CNI_NETNS") && msg.contains(netns), "{e}");
    e
}

#[test]
fn a_netns_that_is_not_a_network_namespace_is_code_4_and_says_what_it_is() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let e = add_in(file.path());
    assert_eq!(e["details"], "a regular file, not a network namespace");
    let dir = tempfile::tempdir().unwrap();
    let e = add_in(dir.path());
    assert_eq!(e["details"], "a directory, not a network namespace");
    // A namespace file, but of another kind.
    let e = add_in(std::path::Path::new("/proc/self/ns/uts"));
    assert_eq!(e["details"], "a uts namespace, not a network namespace");
}

#[test]
fn a_fifo_as_netns_is_refused_without_opening_it() {
    // Opening a FIFO for reading blocks until a writer comes: the check must not open it.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let e = add_in(&fifo);
    assert_eq!(e["details"], "a FIFO, not a network namespace");
}
