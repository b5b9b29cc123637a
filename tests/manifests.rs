//! The manifests in `manifests/` agree with the code: every document parses as its Kubernetes
//! type, the RBAC rules grant exactly what the daemon watches and patches, the DaemonSet's
//! probes, ports, mounts and command lines match the daemon's defaults and flags, the ConfigMap
//! is a valid daemon configuration, and the cleanup DaemonSet docs/operations.md gives runs
//! `rsdn cleanup`. The kustomization (`manifests/kustomization.yaml`) lists every file, tags the
//! image with the crate version and generates the ConfigMap with a hash suffix; where kubectl
//! or kustomize is installed, its output is rendered and a configuration change shown to roll
//! the DaemonSet. No cluster needed.

use std::collections::{BTreeMap, BTreeSet};
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

/// What `manifests/kustomization.yaml` says, as far as the tests need it.
struct Kustomization {
    resources: Vec<String>,
    /// (name, namespace, files) of each configMapGenerator entry.
    generators: Vec<(String, String, Vec<String>)>,
    /// (name, newName, newTag) of each image.
    images: Vec<(String, Option<String>, Option<String>)>,
    raw: serde_json::Value,
}

fn kustomization() -> Kustomization {
    let f = dir().join("kustomization.yaml");
    let text = std::fs::read_to_string(&f).unwrap();
    let mut docs = rsdn::source::dir::read_documents(&text).unwrap();
    assert_eq!(docs.len(), 1);
    let raw = docs.remove(0);
    assert_eq!(raw["kind"], "Kustomization");
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let opt = |v: &serde_json::Value| v.as_str().map(str::to_string);
    Kustomization {
        resources: strings(&raw["resources"]),
        generators: raw["configMapGenerator"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .map(|g| {
                let name = g["name"].as_str().unwrap().to_string();
                let ns = g["namespace"].as_str().unwrap_or_default().to_string();
                (name, ns, strings(&g["files"]))
            })
            .collect(),
        images: raw["images"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .map(|i| {
                let name = i["name"].as_str().unwrap().to_string();
                (name, opt(&i["newName"]), opt(&i["newTag"]))
            })
            .collect(),
        raw,
    }
}

/// The objects `kubectl apply -k manifests/` creates, before kustomize's renaming: the listed
/// resources and the generated ConfigMaps (under their generator names).
fn load() -> Manifests {
    let mut m = Manifests::default();
    let k = kustomization();
    assert!(!k.resources.is_empty());
    for (name, namespace, files) in &k.generators {
        let data: BTreeMap<String, String> = files
            .iter()
            .map(|f| {
                assert!(!f.contains('='), "{f}: keys are the file names");
                let text = std::fs::read_to_string(dir().join(f)).unwrap();
                (f.clone(), text)
            })
            .collect();
        m.config_maps.push(parse(
            serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace},
                "data": data,
            }),
            &dir().join("kustomization.yaml"),
        ));
    }
    for f in k.resources.iter().map(|r| dir().join(r)) {
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
    // The installed ConfigMap's name carries kustomize's hash: a DaemonSet applied on its own
    // cannot name it, so cleanup runs on its defaults and flags.
    assert!(
        pod.volumes.iter().flatten().all(|v| v.config_map.is_none()),
        "the cleanup DaemonSet mounts no ConfigMap"
    );
    for path in [config::DEFAULT_CNI_CONF_DIR, "/run/xtables.lock"] {
        assert_eq!(host_path(pod, c, path).as_deref(), Some(path), "{path}");
    }

    rsdn_testkit::need_root!();
    let ns = rsdn_testkit::Netns::new("cleanupds");
    let tmp = tempfile::tempdir().unwrap();
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
        let args: Vec<String> = cmd[2..].to_vec();
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

#[test]
fn the_kustomization_lists_every_file_and_generates_the_config_map_with_a_hash() {
    let k = kustomization();
    let mut listed: BTreeSet<String> = k.resources.iter().cloned().collect();
    listed.insert("kustomization.yaml".into());
    for (_, _, files) in &k.generators {
        listed.extend(files.iter().cloned());
    }
    let present: BTreeSet<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        present, listed,
        "manifests/ vs what kustomization.yaml uses"
    );

    // The hash suffix is what rolls the DaemonSet when the configuration changes.
    assert!(
        k.raw["generatorOptions"]["disableNameSuffixHash"].is_null(),
        "generatorOptions must keep the hash suffix"
    );
    assert_eq!(k.generators.len(), 1);
    let (name, namespace, files) = &k.generators[0];
    assert_eq!(name, "rsdn-config");
    assert_eq!(files, &["config.yaml"]);
    let generator = &k.raw["configMapGenerator"][0];
    assert!(generator["options"]["disableNameSuffixHash"].is_null());
    assert!(generator["behavior"].is_null());

    let m = load();
    assert_eq!(Some(namespace), m.namespaces[0].metadata.name.as_ref());
    let (_, pod) = daemon_set(&m);
    let referenced: Vec<&str> = pod
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| Some(v.config_map.as_ref()?.name.as_str()))
        .collect();
    assert_eq!(referenced, [name.as_str()]);
}

#[test]
fn the_image_tag_is_the_crate_version() {
    let version = env!("CARGO_PKG_VERSION");
    // One version for the workspace: every package inherits it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for member in [".", "cni", "lab", "testkit"] {
        let text = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        assert!(
            text.contains("\nversion.workspace = true\n"),
            "{member}/Cargo.toml must inherit the workspace version"
        );
    }

    let k = kustomization();
    assert_eq!(k.images.len(), 1, "{:?}", k.images);
    let (name, _, tag) = &k.images[0];
    assert_eq!(
        tag.as_deref(),
        Some(version),
        "manifests/kustomization.yaml images[0].newTag vs the workspace version in Cargo.toml"
    );
    // The DaemonSet names the image without a tag: the kustomization is the one place for it.
    let m = load();
    let (_, pod) = daemon_set(&m);
    let containers = pod.init_containers.iter().flatten().chain(&pod.containers);
    for c in containers {
        assert_eq!(c.image.as_ref(), Some(name), "container {}", c.name);
    }
}

#[test]
fn the_daemon_set_runs_on_linux_nodes_under_the_runtime_default_seccomp_profile() {
    let m = load();
    let (_, pod) = daemon_set(&m);
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["kubernetes.io/os"],
        "linux"
    );
    let profile = pod
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .expect("a pod seccompProfile");
    assert_eq!(profile.type_, "RuntimeDefault");
    // No container opts out of it (the privileged init container is unconfined anyway).
    for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
        let own = c
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref());
        assert!(own.is_none(), "container {} sets its own seccomp", c.name);
    }
}

/// `kubectl kustomize DIR` (or `kustomize build DIR`), parsed; None when neither is installed.
fn render(dir: &Path) -> Option<Vec<serde_json::Value>> {
    let tries: [(&str, &[&str]); 2] = [("kubectl", &["kustomize"]), ("kustomize", &["build"])];
    for (tool, args) in tries {
        let out = match Command::new(tool).args(args).arg(dir).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{tool}: {e}"),
        };
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        return Some(rsdn::source::dir::read_documents(&text).unwrap());
    }
    None
}

/// The rendered ConfigMap's name, the name the DaemonSet's config volume references, the
/// DaemonSet's pod template and its containers' images.
fn rendered_parts(docs: &[serde_json::Value]) -> (String, String, serde_json::Value, Vec<String>) {
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let template = ds["spec"]["template"].clone();
    let spec = &template["spec"];
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    let images = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[k].as_array().unwrap().iter())
        .map(|c| c["image"].as_str().unwrap().to_string())
        .collect();
    (
        cm["metadata"]["name"].as_str().unwrap().to_string(),
        volume["configMap"]["name"].as_str().unwrap().to_string(),
        template,
        images,
    )
}

#[test]
fn the_rendered_kustomization_rolls_the_daemon_set_on_a_config_change() {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let Some(before) = render(tmp.path()) else {
        eprintln!("SKIP rendering the kustomization: neither kubectl nor kustomize is installed");
        return;
    };
    let (cm, referenced, template, images) = rendered_parts(&before);
    let hash = cm.strip_prefix("rsdn-config-").expect("rsdn-config-<hash>");
    assert!(!hash.is_empty() && hash.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(
        referenced, cm,
        "the DaemonSet mounts the generated ConfigMap"
    );
    let image = format!("rsdn:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(images, [image.clone(), image]);
    let config = std::fs::read_to_string(dir().join("config.yaml")).unwrap();
    let cm_doc = before.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert_eq!(cm_doc["data"]["config.yaml"], config.as_str());

    // A configuration change: a new ConfigMap name, so a new pod template, so a rollout.
    let changed = config.replace("\nvni: 1\n", "\nvni: 2\n");
    assert_ne!(changed, config);
    std::fs::write(tmp.path().join("config.yaml"), changed).unwrap();
    let (cm2, referenced2, template2, _) = rendered_parts(&render(tmp.path()).unwrap());
    assert_ne!(cm2, cm);
    assert_eq!(referenced2, cm2);
    assert_ne!(template2, template);
}
