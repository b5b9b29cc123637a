//! The CNI network configuration list (conflist) for a node: what `rsdn node` writes into the
//! CNI config directory once the node network is programmed, and what `rsdn cni-config` prints.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use rsdn_cni::config::NetConf;
use serde_json::{json, Value};

/// The network name our conflist uses.
pub const NETWORK_NAME: &str = "rsdn";

/// Options for a conflist beyond our own plugin entry.
#[derive(Debug, Clone, Default)]
pub struct ConflistOptions {
    /// Chain Debian/upstream `portmap` after rsdn-cni (hostPort support).
    pub portmap: bool,
    /// CNI spec version of the list; 1.0.0 keeps older runtimes and chained plugins happy.
    pub cni_version: Option<String>,
}

/// The conflist for a node whose pod subnet is `subnet`, gateway `gateway` on `bridge`.
pub fn conflist(
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    mtu: u32,
    bridge: &str,
    opts: &ConflistOptions,
) -> Value {
    let version = opts
        .cni_version
        .clone()
        .unwrap_or_else(|| "1.0.0".to_string());
    let mut ours = NetConf::for_node(NETWORK_NAME, subnet, gateway, mtu, bridge);
    ours.cni_version = version.clone();
    let mut ours = serde_json::to_value(&ours).expect("NetConf serializes");
    // In a list, name and version belong to the list, not to each plugin.
    if let Some(m) = ours.as_object_mut() {
        m.remove("name");
        m.remove("cniVersion");
    }
    let mut plugins = vec![ours];
    if opts.portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    json!({ "cniVersion": version, "name": NETWORK_NAME, "plugins": plugins })
}

/// The binaries of the plugins chained after ours (portmap) that `bin_dir` lacks, or holds
/// without execute permission: while one is missing, a runtime fails every pod's ADD with
/// "failed to find plugin". (Ours is `rsdn install-cni`'s to put there.)
pub fn missing_plugins(list: &Value, bin_dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let chained = list["plugins"].as_array().into_iter().flatten().skip(1);
    chained
        .filter_map(|p| p["type"].as_str())
        .map(|t| bin_dir.join(t))
        .filter(|path| {
            !std::fs::metadata(path)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect()
}

/// The temporary file `write_atomically` fills before renaming it to `path`: in the same
/// directory, its name starting with a dot, which readers of such directories skip.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("rsdn");
    path.parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.tmp"))
}

/// Writes `text` to `path` unless the file already holds exactly that (a restarted daemon finds
/// its own file and leaves it be); says whether it wrote.
pub fn write_if_changed(path: &Path, text: &str) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    write_atomically(path, text)?;
    Ok(true)
}

/// Temp file in the same directory, then rename: a reader sees the old file or the new one.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = temporary_path(path);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_entry_parses_as_our_plugin_config() {
        let list = conflist(
            "10.128.2.0/23".parse().unwrap(),
            "10.128.2.1".parse().unwrap(),
            1450,
            "tun0",
            &ConflistOptions {
                portmap: true,
                cni_version: None,
            },
        );
        assert_eq!(list["name"], "rsdn");
        assert_eq!(list["plugins"][1]["type"], "portmap");
        // A runtime injects name and cniVersion into each plugin's config; do the same.
        let mut entry = list["plugins"][0].clone();
        entry["name"] = list["name"].clone();
        entry["cniVersion"] = list["cniVersion"].clone();
        let conf = NetConf::parse(entry.to_string().as_bytes()).unwrap();
        let net = conf.pod_network().unwrap();
        assert_eq!(
            (
                net.subnet.to_string().as_str(),
                net.gateway.to_string().as_str(),
                net.mtu
            ),
            ("10.128.2.0/23", "10.128.2.1", 1450)
        );
        assert_eq!(conf.plugin_type, "rsdn-cni");
    }

    #[test]
    fn a_chained_plugin_missing_from_the_binary_directory_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let list = |portmap| {
            conflist(
                "10.128.2.0/23".parse().unwrap(),
                "10.128.2.1".parse().unwrap(),
                1450,
                "tun0",
                &ConflistOptions {
                    portmap,
                    cni_version: None,
                },
            )
        };
        let bin = tempfile::tempdir().unwrap();
        let portmap = bin.path().join("portmap");
        let missing = |portmap| missing_plugins(&list(portmap), bin.path());
        assert_eq!(missing(true), vec![portmap.clone()]);
        assert!(missing(false).is_empty());
        std::fs::write(&portmap, "#!/bin/sh\n").unwrap();
        assert_eq!(missing(true), vec![portmap.clone()], "not executable");
        std::fs::set_permissions(&portmap, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(missing(true).is_empty());
        // Our own plugin is not looked for: install-cni puts it there.
        assert!(!bin.path().join("rsdn-cni").exists());
    }
}
