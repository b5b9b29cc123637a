//! Configuration of `rsdn node`: a YAML file (the ConfigMap in a cluster) with command-line
//! overrides. Validation happens once, at start, and names the field at fault.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::proxy::iptables::Backend;

pub const DEFAULT_CLUSTER_NETWORK: &str = "10.128.0.0/14";
pub const DEFAULT_SERVICE_NETWORK: &str = "172.30.0.0/16";
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_CNI_CONF_FILE: &str = "10-rsdn.conflist";
/// kube-proxy's healthz port; /metrics is served there too.
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
pub const DEFAULT_RESYNC_SECONDS: u64 = 5;
/// kube-proxy's full-sync period: a full sync rewrites every chain, which takes seconds at scale.
pub const DEFAULT_PROXY_FULL_SYNC_SECONDS: u64 = 3600;
/// VXLAN over IPv4 costs 50 bytes: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The configuration as written in the file; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub node_name: Option<String>,
    pub node_ip: Option<Ipv4Addr>,
    pub cluster_network: Option<Ipv4Net>,
    pub service_network: Option<Ipv4Net>,
    pub vxlan_port: Option<u16>,
    pub vni: Option<u32>,
    pub mtu: Option<u32>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_conf_file: Option<String>,
    pub cni_data_dir: Option<PathBuf>,
    pub cluster_dir: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub resync_seconds: Option<u64>,
    pub proxy: Option<bool>,
    pub masquerade_bit: Option<u8>,
    pub iptables_backend: Option<String>,
    pub proxy_full_sync_seconds: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: "--config".into(),
            problem: format!("cannot read {}: {e}", path.display()),
        })?;
        serde_saphyr::from_str(&text).map_err(|e| ConfigError {
            field: path.display().to_string(),
            problem: e.to_string(),
        })
    }

    /// Fields set in `over` win.
    pub fn overlay(self, over: FileConfig) -> FileConfig {
        FileConfig {
            node_name: over.node_name.or(self.node_name),
            node_ip: over.node_ip.or(self.node_ip),
            cluster_network: over.cluster_network.or(self.cluster_network),
            service_network: over.service_network.or(self.service_network),
            vxlan_port: over.vxlan_port.or(self.vxlan_port),
            vni: over.vni.or(self.vni),
            mtu: over.mtu.or(self.mtu),
            cni_conf_dir: over.cni_conf_dir.or(self.cni_conf_dir),
            cni_conf_file: over.cni_conf_file.or(self.cni_conf_file),
            cni_data_dir: over.cni_data_dir.or(self.cni_data_dir),
            cluster_dir: over.cluster_dir.or(self.cluster_dir),
            kubeconfig: over.kubeconfig.or(self.kubeconfig),
            healthz_bind_address: over.healthz_bind_address.or(self.healthz_bind_address),
            resync_seconds: over.resync_seconds.or(self.resync_seconds),
            proxy: over.proxy.or(self.proxy),
            masquerade_bit: over.masquerade_bit.or(self.masquerade_bit),
            iptables_backend: over.iptables_backend.or(self.iptables_backend),
            proxy_full_sync_seconds: over
                .proxy_full_sync_seconds
                .or(self.proxy_full_sync_seconds),
        }
    }
}

/// A configuration error: exits the daemon at once with the field named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

fn bad(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Where the cluster model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of Kubernetes YAML objects (no API server).
    Dir(PathBuf),
    /// The API server: this kubeconfig, or (None) the in-cluster service account, then
    /// $KUBECONFIG and ~/.kube/config.
    Kube(Option<PathBuf>),
}

impl std::fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceConfig::Dir(d) => write!(f, "dir {}", d.display()),
            SourceConfig::Kube(Some(k)) => write!(f, "kube (kubeconfig {})", k.display()),
            SourceConfig::Kube(None) => write!(f, "kube (in-cluster or default kubeconfig)"),
        }
    }
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_name: String,
    /// None: the node's InternalIP from its Node object.
    pub node_ip: Option<Ipv4Addr>,
    pub cluster_network: Ipv4Net,
    pub service_network: Ipv4Net,
    pub vxlan_port: u16,
    pub vni: u32,
    /// None: the MTU of the interface carrying the node IP, minus 50.
    pub mtu: Option<u32>,
    pub cni_conf_dir: PathBuf,
    pub cni_conf_file: String,
    pub cni_data_dir: Option<PathBuf>,
    pub source: SourceConfig,
    /// None: no HTTP endpoint (tests); the default is 0.0.0.0:10256.
    pub healthz_bind_address: Option<SocketAddr>,
    pub resync_seconds: u64,
    /// false: no Service rules (kube-proxy runs); egress masquerade stays.
    pub proxy: bool,
    pub masquerade_bit: u8,
    /// None: detect, as kube-proxy's iptables wrapper does.
    pub iptables_backend: Option<Backend>,
    pub proxy_full_sync_seconds: u64,
}

impl NodeConfig {
    /// `hostname` is the fallback node name (the kubelet's default is the hostname too).
    pub fn resolve(f: FileConfig, hostname: Option<String>) -> Result<NodeConfig, ConfigError> {
        let node_name = f
            .node_name
            .or(hostname)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("nodeName", "not set and the hostname is unknown"))?;
        let cluster_network = f
            .cluster_network
            .unwrap_or_else(|| DEFAULT_CLUSTER_NETWORK.parse().expect("default parses"));
        let service_network = f
            .service_network
            .unwrap_or_else(|| DEFAULT_SERVICE_NETWORK.parse().expect("default parses"));
        for (field, net) in [
            ("clusterNetwork", cluster_network),
            ("serviceNetwork", service_network),
        ] {
            if net != net.trunc() {
                return Err(bad(
                    field,
                    format!("{net} has host bits set; did you mean {}?", net.trunc()),
                ));
            }
        }
        if cluster_network.contains(&service_network.network())
            || service_network.contains(&cluster_network.network())
        {
            return Err(bad(
                "serviceNetwork",
                format!("{service_network} overlaps clusterNetwork {cluster_network}"),
            ));
        }
        let vxlan_port = f.vxlan_port.unwrap_or(DEFAULT_VXLAN_PORT);
        if vxlan_port == 0 {
            return Err(bad("vxlanPort", "0 is not a port"));
        }
        let vni = f.vni.unwrap_or(DEFAULT_VNI);
        if vni > 0xff_ffff {
            return Err(bad(
                "vni",
                format!("{vni} does not fit in 24 bits (max 16777215)"),
            ));
        }
        if let Some(mtu) = f.mtu {
            if !(68..=65535 - VXLAN_OVERHEAD).contains(&mtu) {
                return Err(bad(
                    "mtu",
                    format!("{mtu} is outside 68..={}", 65535 - VXLAN_OVERHEAD),
                ));
            }
        }
        let cni_conf_file = f
            .cni_conf_file
            .unwrap_or_else(|| DEFAULT_CNI_CONF_FILE.into());
        if !cni_conf_file.ends_with(".conflist") || cni_conf_file.contains('/') {
            return Err(bad(
                "cniConfFile",
                format!("{cni_conf_file:?} must be a file name ending in .conflist"),
            ));
        }
        let source = match (f.cluster_dir, f.kubeconfig) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "clusterDir",
                    "set either clusterDir (no API server) or kubeconfig, not both",
                ))
            }
            (Some(dir), None) => SourceConfig::Dir(dir),
            (None, k) => SourceConfig::Kube(k),
        };
        let resync_seconds = f.resync_seconds.unwrap_or(DEFAULT_RESYNC_SECONDS);
        if resync_seconds == 0 {
            return Err(bad("resyncSeconds", "must be at least 1"));
        }
        let masquerade_bit = f.masquerade_bit.unwrap_or(0);
        if masquerade_bit > 31 {
            return Err(bad(
                "masqueradeBit",
                format!("{masquerade_bit} is not a bit of a 32-bit mark (0-31)"),
            ));
        }
        let iptables_backend = match f.iptables_backend.as_deref() {
            None | Some("auto") => None,
            Some(b) => Some(Backend::parse(b).ok_or_else(|| {
                bad(
                    "iptablesBackend",
                    format!("{b:?} is not one of auto, nft, legacy"),
                )
            })?),
        };
        let proxy_full_sync_seconds = f
            .proxy_full_sync_seconds
            .unwrap_or(DEFAULT_PROXY_FULL_SYNC_SECONDS);
        if proxy_full_sync_seconds == 0 {
            return Err(bad("proxyFullSyncSeconds", "must be at least 1"));
        }
        Ok(NodeConfig {
            node_name,
            node_ip: f.node_ip,
            cluster_network,
            service_network,
            vxlan_port,
            vni,
            mtu: f.mtu,
            cni_conf_dir: f
                .cni_conf_dir
                .unwrap_or_else(|| DEFAULT_CNI_CONF_DIR.into()),
            cni_conf_file,
            cni_data_dir: f.cni_data_dir,
            source,
            healthz_bind_address: Some(f.healthz_bind_address.unwrap_or_else(|| {
                DEFAULT_HEALTHZ_BIND_ADDRESS
                    .parse()
                    .expect("default parses")
            })),
            resync_seconds,
            proxy: f.proxy.unwrap_or(true),
            masquerade_bit,
            iptables_backend,
            proxy_full_sync_seconds,
        })
    }

    pub fn cni_conf_path(&self) -> PathBuf {
        self.cni_conf_dir.join(&self.cni_conf_file)
    }

    /// The plugin's IPAM store of our network: one record per pod attachment on this node.
    pub fn ipam_dir(&self) -> PathBuf {
        self.cni_data_dir
            .clone()
            .unwrap_or_else(|| rsdn_cni::config::DEFAULT_DATA_DIR.into())
            .join(crate::cniconf::NETWORK_NAME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(yaml: &str) -> Result<NodeConfig, ConfigError> {
        let f: FileConfig = serde_saphyr::from_str(yaml).map_err(|e| bad("yaml", e.to_string()))?;
        NodeConfig::resolve(f, Some("host1".into()))
    }

    #[test]
    fn defaults() {
        let c = resolve("clusterDir: /tmp/c\n").unwrap();
        assert_eq!(c.node_name, "host1");
        assert_eq!(c.cluster_network.to_string(), "10.128.0.0/14");
        assert_eq!(c.service_network.to_string(), "172.30.0.0/16");
        assert_eq!((c.vxlan_port, c.vni, c.mtu), (4789, 1, None));
        assert!(c.proxy && c.masquerade_bit == 0 && c.iptables_backend.is_none());
        assert_eq!(c.proxy_full_sync_seconds, 3600);
        assert_eq!(c.source, SourceConfig::Dir("/tmp/c".into()));
        assert_eq!(
            c.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        let c = resolve("kubeconfig: /k\nhealthzBindAddress: 127.0.0.1:9\n").unwrap();
        assert_eq!(c.source, SourceConfig::Kube(Some("/k".into())));
        assert_eq!(c.healthz_bind_address, Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(resolve("{}").unwrap().source, SourceConfig::Kube(None));
        let c =
            resolve("clusterDir: /c\nproxy: false\niptablesBackend: legacy\nmasqueradeBit: 14\n")
                .unwrap();
        assert!(!c.proxy && c.masquerade_bit == 14 && c.iptables_backend == Some(Backend::Legacy));
        assert_eq!(
            c.cni_conf_path(),
            PathBuf::from("/etc/cni/net.d/10-rsdn.conflist")
        );
    }

    #[test]
    fn file_then_overrides() {
        let f: FileConfig =
            serde_saphyr::from_str("nodeName: n1\nvxlanPort: 8472\nmtu: 1400\nclusterDir: /c\n")
                .unwrap();
        let over = FileConfig {
            mtu: Some(8950),
            ..Default::default()
        };
        let c = NodeConfig::resolve(f.overlay(over), None).unwrap();
        assert_eq!(
            (c.node_name.as_str(), c.vxlan_port, c.mtu),
            ("n1", 8472, Some(8950))
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("clusterDir: /c\nvni: 16777216\n", "vni"),
            ("clusterDir: /c\nvxlanPort: 0\n", "vxlanPort"),
            ("clusterDir: /c\nmtu: 20\n", "mtu"),
            (
                "clusterDir: /c\nclusterNetwork: 10.128.0.1/14\n",
                "clusterNetwork",
            ),
            (
                "clusterDir: /c\nserviceNetwork: 10.130.0.0/16\n",
                "serviceNetwork",
            ),
            ("clusterDir: /c\ncniConfFile: rsdn.conf\n", "cniConfFile"),
            ("clusterDir: /c\nresyncSeconds: 0\n", "resyncSeconds"),
            ("clusterDir: /c\nmasqueradeBit: 32\n", "masqueradeBit"),
            (
                "clusterDir: /c\niptablesBackend: ebtables\n",
                "iptablesBackend",
            ),
            (
                "clusterDir: /c\nproxyFullSyncSeconds: 0\n",
                "proxyFullSyncSeconds",
            ),
            ("clusterDir: /c\nkubeconfig: /k\n", "clusterDir"),
        ];
        for (yaml, field) in cases {
            let e = resolve(yaml).unwrap_err();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
    }

    #[test]
    fn unknown_and_mistyped_fields_are_refused() {
        assert!(serde_saphyr::from_str::<FileConfig>("clusterDir: /c\nvxlanPrt: 1\n").is_err());
        assert!(
            serde_saphyr::from_str::<FileConfig>("clusterDir: /c\nclusterNetwork: banana\n")
                .is_err()
        );
    }
}
