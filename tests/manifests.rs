//! The manifests in `manifests/` agree with the code: every document parses as its Kubernetes
//! type, the RBAC rules grant exactly what the daemon watches and patches, the DaemonSet's
//! probes, ports, mounts and command lines match the daemon's defaults and flags, the ConfigMap
//! is a valid daemon configuration, and the cleanup DaemonSet docs/operations.md gives runs
//! `rsdn cleanup`. No cluster needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rsdn::config::{self, NodeConfig, NodeOptions};

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value, file: &Path) -> T {
    serde_json::from_value(v).unwrap_or_else(|e| {
        panic!(
            "{}: not a valid {}: {e}",
            file.display(),
            std::any::type_name::<T>()
        )
    })
}

fn load() -> Manifests {
    let mut m = Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in rsdn::source::dir::read_documents(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "Namespace" => m.namespaces.push(parse(doc, &f)),
                "ServiceAccount" => m.service_accounts.push(parse(doc, &f)),
                "ClusterRole" => m.cluster_roles.push(parse(doc, &f)),
                "ClusterRoleBinding" => m.bindings.push(parse(doc, &f)),
                "ConfigMap" => m.config_maps.push(parse(doc, &f)),
                "DaemonSet" => m.daemon_sets.push(parse(doc, &f)),
                other => panic!("{}: unexpected kind {other:?}", f.display()),
            }
        }
    }
    m
}

fn daemon_set(m: &Manifests) -> (&DaemonSet, &PodSpec) {
    assert_eq!(m.daemon_sets.len(), 1);
    let ds = &m.daemon_sets[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    (ds, pod)
}

fn container<'a>(pod: &'a PodSpec, name: &str, init: bool) -> &'a Container {
    let list = if init {
        pod.init_containers.as_deref().unwrap_or_default()
    } else {
        &pod.containers
    };
    list.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The host path a container sees at `mount_path`, if it is a hostPath mount.
fn host_path(pod: &PodSpec, c: &Container, mount_path: &str) -> Option<String> {
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.mount_path == mount_path)?;
    let volume = pod
        .volumes
        .as_deref()?
        .iter()
        .find(|v| v.name == mount.name)?;
    Some(volume.host_path.as_ref()?.path.clone())
}

/// The capabilities a container adds.
fn added_capabilities(c: &Container) -> BTreeSet<&str> {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref());
    let added = caps.and_then(|c| c.add.as_deref()).unwrap_or_default();
    added.iter().map(String::as_str).collect()
}

/// The value after `flag` in a command line.
fn flag<'a>(cmd: &'a [String], flag: &str) -> &'a str {
    let i = cmd
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {cmd:?}"));
    &cmd[i + 1]
}

fn config_text(m: &Manifests) -> &str {
    let cm = m
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("rsdn-config"))
        .expect("ConfigMap rsdn-config");
    cm.data.as_ref().unwrap()["config.yaml"].as_str()
}

#[test]
fn every_object_parses_and_lives_in_the_namespace() {
    let m = load();
    assert_eq!(m.namespaces.len(), 1);
    let ns = m.namespaces[0].metadata.name.clone().unwrap();
    let (ds, pod) = daemon_set(&m);
    let namespaced = m
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(m.config_maps.iter().map(|o| &o.metadata))
        .chain([&ds.metadata]);
    for meta in namespaced {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(ns.as_str()),
            "{:?}",
            meta.name
        );
    }
    // The DaemonSet runs as the ServiceAccount the binding names.
    let sa = pod.service_account_name.as_deref().unwrap();
    assert!(m
        .service_accounts
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some(sa)));
    let subject = &m.bindings[0].subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", sa)
    );
    assert_eq!(subject.namespace.as_deref(), Some(ns.as_str()));
}

#[test]
fn rbac_grants_exactly_what_the_daemon_watches_and_patches() {
    let m = load();
    assert_eq!(m.bindings.len(), 1);
    let role_name = &m.bindings[0].role_ref.name;
    let role = m
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_ref() == Some(role_name))
        .expect("the bound ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for g in rule.api_groups.as_deref().unwrap_or_default() {
            for r in rule.resources.as_deref().unwrap_or_default() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = rsdn::source::kube::WATCHED
        .iter()
        .chain(rsdn::node_status::PATCHED)
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(|v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(
        granted, used,
        "ClusterRole {role_name} vs WATCHED (src/source/kube.rs) and PATCHED (src/node_status.rs)"
    );
}

#[test]
fn the_config_map_is_a_valid_daemon_configuration_with_the_defaults() {
    let m = load();
    let file: NodeOptions = serde_saphyr::from_str(config_text(&m)).expect("parses as NodeOptions");
    let c = NodeConfig::resolve(file, Some("node1".into())).expect("resolves");
    assert_eq!(
        c.cluster_network.to_string(),
        config::DEFAULT_CLUSTER_NETWORK
    );
    assert_eq!(
        c.service_network.to_string(),
        config::DEFAULT_SERVICE_NETWORK
    );
    assert_eq!(c.vxlan_port, config::DEFAULT_VXLAN_PORT);
    assert_eq!(c.vni, config::DEFAULT_VNI);
    assert_eq!(
        c.cni_conf_path(),
        Path::new(config::DEFAULT_CNI_CONF_DIR).join(config::DEFAULT_CNI_CONF_FILE)
    );
    assert_eq!(
        c.healthz_bind_address.map(|a| a.to_string()).as_deref(),
        Some(config::DEFAULT_HEALTHZ_BIND_ADDRESS)
    );
    assert_eq!(
        c.metrics_bind_address.map(|a| a.to_string()).as_deref(),
        Some(config::DEFAULT_METRICS_BIND_ADDRESS)
    );
    // No cluster directory: the daemon reads the API server, in-cluster.
    assert!(
        matches!(c.source, config::SourceConfig::Kube(None)),
        "{:?}",
        c.source
    );
}

#[test]
fn the_daemon_set_agrees_with_the_code() {
    let m = load();
    let (_, pod) = daemon_set(&m);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| {
                t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
            }),
        "must tolerate every taint"
    );

    let daemon = container(pod, "rsdn", false);
    let cmd = daemon.command.clone().unwrap();
    assert_eq!(&cmd[..2], ["rsdn", "node"]);

    // Probes on the daemon's default health port, at the paths it serves.
    let port: u16 = config::DEFAULT_HEALTHZ_BIND_ADDRESS
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for (probe, path) in [
        // Liveness is /livez: /healthz fails while the node drains (kube-proxy's KEP-3836) and
        // while a repair keeps failing, neither of which a restart cures.
        (daemon.liveness_probe.as_ref(), "/livez"),
        (daemon.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(port.into()));
    }

    // --config names the ConfigMap's key where the ConfigMap is mounted.
    let config_path = Path::new(flag(&cmd, "--config"));
    let mount = daemon
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| Path::new(&v.mount_path) == config_path.parent().unwrap())
        .expect("the config file's directory is mounted");
    let volume = pod
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(volume.config_map.as_ref().unwrap().name, "rsdn-config");
    assert_eq!(config_path.file_name().unwrap(), "config.yaml");

    // The node name comes from the downward API.
    assert_eq!(flag(&cmd, "--node-name"), "$(NODE_NAME)");
    let env = daemon
        .env
        .as_deref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .unwrap();
    let field = env.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    // The host paths the daemon touches, seen at the same paths inside the container.
    let file: NodeOptions = serde_saphyr::from_str(config_text(&m)).unwrap();
    let c = NodeConfig::resolve(file, Some("node1".into())).unwrap();
    let conf_dir = c
        .cni_conf_path()
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let bin_dir = c.cni_bin_dir.to_str().unwrap();
    for path in [
        conf_dir.as_str(),
        bin_dir,
        "/run/xtables.lock",
        "/var/lib/cni",
    ] {
        assert_eq!(
            host_path(pod, daemon, path).as_deref(),
            Some(path),
            "{path} mounted from the host"
        );
    }

    // Capabilities, not privileges, for the long-running container.
    assert_ne!(
        daemon.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    assert_eq!(added_capabilities(daemon), ["NET_ADMIN", "NET_RAW"].into());

    // The init container installs the plugin into the host's /opt/cni/bin.
    let init = container(pod, "install-cni", true);
    let icmd = init.command.clone().unwrap();
    assert_eq!(&icmd[..2], ["rsdn", "install-cni"]);
    let bin_dir = flag(&icmd, "--bin-dir");
    assert_eq!(
        host_path(pod, init, bin_dir).as_deref(),
        Some("/opt/cni/bin")
    );
}

/// The command lines in the DaemonSet, run through the real binary: every flag exists and the
/// ConfigMap is accepted. `rsdn proxy render` takes the same flags as `rsdn node` and touches
/// no kernel; `install-cni` runs against scratch directories.
#[test]
fn the_daemon_set_command_lines_are_accepted_by_rsdn() {
    let m = load();
    let (_, pod) = daemon_set(&m);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.yaml");
    std::fs::write(&config, config_text(&m)).unwrap();
    let cluster = tmp.path().join("cluster");
    std::fs::create_dir(&cluster).unwrap();

    let cmd = container(pod, "rsdn", false).command.clone().unwrap();
    let args: Vec<String> = cmd[2..]
        .iter()
        .map(|a| match a.as_str() {
            "/etc/rsdn/config.yaml" => config.to_str().unwrap().to_string(),
            "$(NODE_NAME)" => "node1".to_string(),
            _ => a.clone(),
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_rsdn"))
        .args(["proxy", "render"])
        .args(&args)
        .args([
            "--cluster-dir",
            cluster.to_str().unwrap(),
            "--node-ip",
            "192.0.2.10",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(":KUBE-SERVICES"), "{stdout}");

    let icmd = container(pod, "install-cni", true).command.clone().unwrap();
    let plugin = tmp.path().join("plugin");
    std::fs::write(&plugin, b"plugin").unwrap();
    let bin = tmp.path().join("bin");
    let iargs: Vec<String> = icmd[2..]
        .iter()
        .filter(|a| *a != "--prepare-host") // needs the host's sysctls; tested by the lab
        .map(|a| {
            if a == "/host/opt/cni/bin" {
                bin.to_str().unwrap().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_rsdn"))
        .arg("install-cni")
        .args(&iargs)
        .args(["--source", plugin.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(bin.join("rsdn-cni")).unwrap(), b"plugin");
    assert!(icmd.iter().any(|a| a == "--prepare-host"));
}

/// The cleanup DaemonSet docs/operations.md gives: it parses, runs `rsdn cleanup` with the
/// ConfigMap on the host's network with the daemon's capabilities and the host paths cleanup
/// touches, and its command line is accepted by the real binary. It runs in a fresh network
/// namespace (never this host's), with the conflist directory moved to a scratch one: the
/// conflist rsdn wrote there goes, and a second run finds nothing.
#[test]
fn the_cleanup_daemon_set_of_the_docs_runs_rsdn_cleanup() {
    let docs = include_str!("../docs/operations.md");
    let start = docs
        .find("```yaml\n# rsdn-cleanup.yaml")
        .expect("the cleanup DaemonSet in docs/operations.md")
        + "```yaml\n".len();
    let yaml = &docs[start..start + docs[start..].find("```").unwrap()];
    let doc = rsdn::source::dir::read_documents(yaml).unwrap().remove(0);
    let ds: DaemonSet = parse(doc, Path::new("docs/operations.md"));
    let m = load();
    assert_eq!(ds.metadata.namespace, m.namespaces[0].metadata.name);
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    let c = container(pod, "cleanup", true);
    let cmd = c.command.clone().unwrap();
    assert_eq!(&cmd[..2], ["rsdn", "cleanup"]);
    assert_eq!(added_capabilities(c), ["NET_ADMIN", "NET_RAW"].into());
    let config_dir = Path::new(flag(&cmd, "--config")).parent().unwrap();
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| Path::new(&v.mount_path) == config_dir);
    let volume = pod
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.unwrap().name);
    assert_eq!(
        volume.unwrap().config_map.as_ref().unwrap().name,
        "rsdn-config"
    );
    for path in [config::DEFAULT_CNI_CONF_DIR, "/run/xtables.lock"] {
        assert_eq!(host_path(pod, c, path).as_deref(), Some(path), "{path}");
    }

    rsdn_testkit::need_root!();
    let ns = rsdn_testkit::Netns::new("cleanupds");
    let tmp = tempfile::tempdir().unwrap();
    let config_file = tmp.path().join("config.yaml");
    std::fs::write(&config_file, config_text(&m)).unwrap();
    let net_d = tmp.path().join("net.d");
    let conflist = net_d.join(config::DEFAULT_CNI_CONF_FILE);
    std::fs::create_dir(&net_d).unwrap();
    let list = rsdn::cniconf::conflist(
        "10.128.0.0/23".parse().unwrap(),
        "10.128.0.1".parse().unwrap(),
        1450,
        "tun0",
        &Default::default(),
    );
    std::fs::write(&conflist, list.to_string()).unwrap();
    let run = || {
        let args: Vec<String> = cmd[2..]
            .iter()
            .map(|a| match a.as_str() {
                "/etc/rsdn/config.yaml" => config_file.to_str().unwrap().to_string(),
                _ => a.clone(),
            })
            .collect();
        let mut c = Command::new(env!("CARGO_BIN_EXE_rsdn"));
        c.arg("cleanup")
            .args(&args)
            .args(["--cni-conf-dir", net_d.to_str().unwrap()]);
        // Kept open until the child runs: it enters the namespace by this descriptor.
        let netns = std::fs::File::open(ns.path()).unwrap();
        rsdn_testkit::in_netns(&mut c, &netns);
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        text
    };
    let first = run();
    assert!(
        first.contains(&format!("removed: file {}", conflist.display())),
        "{first}"
    );
    assert!(!conflist.exists());
    let second = run();
    assert!(
        second.contains("nothing of rsdn's to remove on this node"),
        "{second}"
    );
}
