//! Configuration of `rsdn node`: a YAML file (the ConfigMap in a cluster) with command-line
//! overrides. Validation happens once, at start, and names the field at fault.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub const DEFAULT_CLUSTER_NETWORK: &str = "10.128.0.0/14";
pub const DEFAULT_SERVICE_NETWORK: &str = "172.30.0.0/16";
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_CNI_CONF_FILE: &str = "10-rsdn.conflist";
/// Where the kubelet and the runtimes look for CNI plugins by default.
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
/// kube-proxy's healthz address: /healthz, /livez and /readyz, which load balancers' health
/// checks reach from outside.
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
/// kube-proxy's metrics address: /metrics, on the node only unless configured otherwise.
pub const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";
pub const DEFAULT_RESYNC_SECONDS: u64 = 5;
/// kube-proxy's full-sync period: a full sync rewrites every chain, which takes seconds at scale.
pub const DEFAULT_PROXY_FULL_SYNC_SECONDS: u64 = 3600;
/// The packet mark bit NetworkPolicy uses while it judges a packet (0x20000).
pub const POLICY_MARK_BIT: u8 = 17;
/// VXLAN over IPv4 costs 50 bytes: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Which iptables the Service proxy programs. The daemon maps it to the proxy's backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IptablesBackend {
    /// Detect, like kube-proxy's iptables wrapper.
    #[default]
    Auto,
    /// iptables-nft (nf_tables).
    #[serde(alias = "nf_tables")]
    #[value(alias = "nf_tables")]
    Nft,
    /// iptables-legacy.
    Legacy,
}

impl std::fmt::Display for IptablesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = clap::ValueEnum::to_possible_value(self).expect("no variant is skipped");
        f.write_str(v.get_name())
    }
}

impl std::str::FromStr for IptablesBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, false)
    }
}

/// Where NodePorts answer (kube-proxy's `--nodeport-addresses`): every local address (unset,
/// or a CIDR of 0.0.0.0/0), the node's primary address (`primary`: its InternalIP or
/// `nodeIp`), or the local addresses inside these CIDRs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub enum NodePortAddresses {
    All,
    Primary,
    Cidrs(Vec<Ipv4Net>),
}

impl NodePortAddresses {
    /// kube-proxy's value spelling: CIDRs, or `primary` alone.
    fn parse(items: &[String]) -> Result<NodePortAddresses, String> {
        let items: Vec<&str> = items
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        if items.contains(&"primary") {
            return match items.len() {
                1 => Ok(NodePortAddresses::Primary),
                _ => Err("\"primary\" cannot be combined with CIDRs".into()),
            };
        }
        let mut cidrs = Vec::new();
        for item in items {
            if item.contains(':') {
                return Err(format!("{item:?} is IPv6; rsdn proxies IPv4 only"));
            }
            let net: Ipv4Net = item
                .parse()
                .map_err(|_| format!("{item:?} is neither an IPv4 CIDR nor \"primary\""))?;
            // As kube-proxy: host bits are ignored, and the zero CIDR means every address.
            if net.prefix_len() == 0 {
                return Ok(NodePortAddresses::All);
            }
            cidrs.push(net.trunc());
        }
        Ok(if cidrs.is_empty() {
            NodePortAddresses::All
        } else {
            NodePortAddresses::Cidrs(cidrs)
        })
    }
}

impl TryFrom<Vec<String>> for NodePortAddresses {
    type Error = String;
    fn try_from(items: Vec<String>) -> Result<Self, String> {
        NodePortAddresses::parse(&items)
    }
}

impl From<NodePortAddresses> for Vec<String> {
    fn from(a: NodePortAddresses) -> Vec<String> {
        match a {
            NodePortAddresses::All => vec![],
            NodePortAddresses::Primary => vec!["primary".into()],
            NodePortAddresses::Cidrs(c) => c.iter().map(|n| n.to_string()).collect(),
        }
    }
}

/// The flag's spelling: comma-separated.
impl std::str::FromStr for NodePortAddresses {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let items: Vec<String> = s.split(',').map(String::from).collect();
        NodePortAddresses::parse(&items)
    }
}

impl std::fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&Vec::<String>::from(self.clone()).join(","))
    }
}

/// Declares the options of `rsdn node` once: each becomes a `--kebab-case` flag (its doc
/// comment is the help) and a camelCase file key, both optional. `= DEFAULT` states the default
/// both `--help` shows and [`NodeConfig::resolve`] applies; options without one say in their
/// doc what happens when they are unset. Emits the struct, the merge and the defaults.
macro_rules! node_options {
    ($(
        $(#[doc = $doc:literal])+
        $(#[arg($($arg:tt)*)])?
        $field:ident: $ty:ty $(= $default:expr)?,
    )+) => {
        /// The options of `rsdn node` (and `rsdn proxy render`), as given in the `--config` file
        /// or on the command line; every one optional.
        #[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct NodeOptions {
            $(
                $(#[doc = $doc])+
                #[arg(
                    long,
                    help = help_text(&[$($doc),+], None $(.or(Some(($default).to_string())))?)
                    $(, $($arg)*)?
                )]
                pub $field: Option<$ty>,
            )+
        }

        impl NodeOptions {
            /// Fields set in `over` win.
            pub fn overlay(self, over: NodeOptions) -> NodeOptions {
                NodeOptions {
                    $($field: over.$field.or(self.$field),)+
                }
            }

            /// The options that have a default, set to it.
            pub fn defaults() -> NodeOptions {
                NodeOptions {
                    $($field: None $(.or(Some(default_value(stringify!($field), $default))))?,)+
                }
            }
        }
    };
}

node_options! {
    /// This node's name, as in its Node object [default: the hostname].
    node_name: String,
    /// Underlay address VXLAN packets leave from [default: the node's InternalIP].
    node_ip: Ipv4Addr,
    /// The pod network of the whole cluster; node subnets outside it are refused.
    cluster_network: Ipv4Net = DEFAULT_CLUSTER_NETWORK,
    /// The Service ClusterIP range; must not overlap the cluster network.
    service_network: Ipv4Net = DEFAULT_SERVICE_NETWORK,
    /// UDP port of VXLAN: 4789 is IANA's, 8472 is flannel's and Cilium's.
    vxlan_port: u16 = DEFAULT_VXLAN_PORT,
    /// VXLAN network identifier, 0-16777215, the same on every node.
    vni: u32 = DEFAULT_VNI,
    /// Pod and tunnel MTU [default: MTU of the interface carrying the node IP, minus 50].
    mtu: u32,
    /// Where the CNI conflist is written once the node network is ready.
    cni_conf_dir: PathBuf = DEFAULT_CNI_CONF_DIR,
    /// File name of the conflist.
    cni_conf_file: String = DEFAULT_CNI_CONF_FILE,
    /// IPAM data directory written into the conflist [default: the plugin's, /var/lib/cni/networks].
    cni_data_dir: PathBuf,
    /// Chain the portmap plugin after rsdn-cni in the conflist, for pods' hostPorts (as
    /// flannel's and Calico's conflists do); its binary must be in cniBinDir.
    #[arg(action = clap::ArgAction::Set)]
    portmap: bool = true,
    /// The CNI plugin directory of the node's runtime, where the chained plugins (portmap) must be.
    cni_bin_dir: PathBuf = DEFAULT_CNI_BIN_DIR,
    /// Cluster source without an API server: a directory of Kubernetes YAML objects (Node,
    /// Service, EndpointSlice), re-read on change. Without it the API server is the source.
    cluster_dir: PathBuf,
    /// Kubeconfig for the API server [default: the in-cluster service account, then
    /// $KUBECONFIG, then ~/.kube/config].
    kubeconfig: PathBuf,
    /// Address of the HTTP server for /healthz, /livez and /readyz (kube-proxy's healthz port).
    healthz_bind_address: SocketAddr = DEFAULT_HEALTHZ_BIND_ADDRESS,
    /// Address of the HTTP server for /metrics (kube-proxy's metrics address); 0.0.0.0:10249
    /// lets a Prometheus on another host scrape it.
    metrics_bind_address: SocketAddr = DEFAULT_METRICS_BIND_ADDRESS,
    /// Seconds between full resyncs with the kernel.
    resync_seconds: u64 = DEFAULT_RESYNC_SECONDS,
    /// Program Services (kube-proxy's iptables NAT); --proxy=false for clusters that keep
    /// kube-proxy. Egress masquerade works either way.
    #[arg(action = clap::ArgAction::Set)]
    proxy: bool = true,
    /// Bit of the packet mark KUBE-MARK-MASQ sets, 0-31; 0 is OpenShift SDN's, kube-proxy's is 14.
    masquerade_bit: u8 = 0,
    /// Which iptables the Service proxy programs.
    iptables_backend: IptablesBackend = IptablesBackend::Auto,
    /// Seconds between full proxy syncs, which rewrite every chain.
    proxy_full_sync_seconds: u64 = DEFAULT_PROXY_FULL_SYNC_SECONDS,
    /// Where NodePorts answer, as kube-proxy's --nodeport-addresses: IPv4 CIDRs (the node's
    /// addresses inside them) or `primary` (the node IP) [default: every local address].
    #[arg(alias = "nodeport-addresses")]
    node_port_addresses: NodePortAddresses,
}

/// The `--help` line of an option: its doc comment as clap shows it (lines joined, no final
/// period), then the default it is declared with.
fn help_text(doc: &[&str], default: Option<String>) -> String {
    let text = doc.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
    let text = text.strip_suffix('.').unwrap_or(&text);
    match default {
        Some(d) => format!("{text} [default: {d}]"),
        None => text.to_string(),
    }
}

/// A declared default as the option's type: the same text `--help` shows, parsed as the command
/// line would be.
fn default_value<T: std::str::FromStr>(field: &str, default: impl std::fmt::Display) -> T
where
    T::Err: std::fmt::Debug,
{
    let text = default.to_string();
    text.parse()
        .unwrap_or_else(|e| panic!("the default of {field}, {text:?}, does not parse: {e:?}"))
}

impl NodeOptions {
    pub fn load(path: &Path) -> Result<NodeOptions, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: "--config".into(),
            problem: format!("cannot read {}: {e}", path.display()),
        })?;
        serde_saphyr::from_str(&text).map_err(|e| ConfigError {
            field: path.display().to_string(),
            problem: e.to_string(),
        })
    }

    /// Every file key, as the file spells it (camelCase), sorted.
    pub fn keys() -> Vec<String> {
        // All fields are None, and None serialises as null: every key is there.
        let v = serde_json::to_value(NodeOptions::default()).expect("serialises");
        let serde_json::Value::Object(map) = v else {
            unreachable!("a struct serialises as a map")
        };
        map.keys().cloned().collect()
    }
}

/// A configuration error: exits the daemon at once with the field named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

/// An option [`NodeOptions::defaults`] sets.
fn defaulted<T>(option: Option<T>) -> T {
    option.expect("NodeOptions::defaults sets every option with a default")
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
    /// Chain portmap after rsdn-cni.
    pub portmap: bool,
    pub cni_bin_dir: PathBuf,
    pub source: SourceConfig,
    /// None: no health endpoint (tests); the default is 0.0.0.0:10256.
    pub healthz_bind_address: Option<SocketAddr>,
    /// None: no metrics endpoint (tests); the default is 127.0.0.1:10249.
    pub metrics_bind_address: Option<SocketAddr>,
    pub resync_seconds: u64,
    /// false: no Service rules (kube-proxy runs); egress masquerade stays.
    pub proxy: bool,
    pub masquerade_bit: u8,
    pub iptables_backend: IptablesBackend,
    pub proxy_full_sync_seconds: u64,
    pub node_port_addresses: NodePortAddresses,
}

impl NodeConfig {
    /// `hostname` is the fallback node name (the kubelet's default is the hostname too).
    pub fn resolve(
        options: NodeOptions,
        hostname: Option<String>,
    ) -> Result<NodeConfig, ConfigError> {
        let f = NodeOptions::defaults().overlay(options);
        let node_name = f
            .node_name
            .or(hostname)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("nodeName", "not set and the hostname is unknown"))?;
        let cluster_network = defaulted(f.cluster_network);
        let service_network = defaulted(f.service_network);
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
        let vxlan_port = defaulted(f.vxlan_port);
        if vxlan_port == 0 {
            return Err(bad("vxlanPort", "0 is not a port"));
        }
        let vni = defaulted(f.vni);
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
        let cni_conf_file = defaulted(f.cni_conf_file);
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
        let resync_seconds = defaulted(f.resync_seconds);
        if resync_seconds == 0 {
            return Err(bad("resyncSeconds", "must be at least 1"));
        }
        let masquerade_bit = defaulted(f.masquerade_bit);
        if masquerade_bit > 31 {
            return Err(bad(
                "masqueradeBit",
                format!("{masquerade_bit} is not a bit of a 32-bit mark (0-31)"),
            ));
        }
        if masquerade_bit == POLICY_MARK_BIT {
            return Err(bad(
                "masqueradeBit",
                format!("bit {POLICY_MARK_BIT} is NetworkPolicy's (its allow mark)"),
            ));
        }
        if let (Some(h), Some(m)) = (f.healthz_bind_address, f.metrics_bind_address) {
            // Two listeners on one port clash unless their addresses are distinct and specific.
            let overlap = |a: SocketAddr, b: SocketAddr| {
                a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
            };
            if overlap(h, m) {
                return Err(bad(
                    "metricsBindAddress",
                    format!("{m} takes the port of healthzBindAddress {h}"),
                ));
            }
        }
        let proxy_full_sync_seconds = defaulted(f.proxy_full_sync_seconds);
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
            cni_conf_dir: defaulted(f.cni_conf_dir),
            cni_conf_file,
            cni_data_dir: f.cni_data_dir,
            portmap: defaulted(f.portmap),
            cni_bin_dir: defaulted(f.cni_bin_dir),
            source,
            healthz_bind_address: f.healthz_bind_address,
            metrics_bind_address: f.metrics_bind_address,
            resync_seconds,
            proxy: defaulted(f.proxy),
            masquerade_bit,
            iptables_backend: defaulted(f.iptables_backend),
            proxy_full_sync_seconds,
            node_port_addresses: f.node_port_addresses.unwrap_or(NodePortAddresses::All),
        })
    }

    /// The defaults for node `name` with no HTTP endpoint, for tests: change fields by
    /// assignment.
    pub fn for_test(name: &str) -> NodeConfig {
        let mut c = NodeConfig::resolve(NodeOptions::default(), Some(name.into()))
            .expect("the defaults are valid");
        c.healthz_bind_address = None;
        c.metrics_bind_address = None;
        c
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
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn resolve(yaml: &str) -> Result<NodeConfig, ConfigError> {
        let f: NodeOptions =
            serde_saphyr::from_str(yaml).map_err(|e| bad("yaml", e.to_string()))?;
        NodeConfig::resolve(f, Some("host1".into()))
    }

    #[test]
    fn defaults() {
        let c = resolve("clusterDir: /tmp/c\n").unwrap();
        assert_eq!(c.node_name, "host1");
        assert_eq!(c.cluster_network.to_string(), "10.128.0.0/14");
        assert_eq!(c.service_network.to_string(), "172.30.0.0/16");
        assert_eq!((c.vxlan_port, c.vni, c.mtu), (4789, 1, None));
        assert!(c.proxy && c.masquerade_bit == 0);
        assert!(c.portmap && c.cni_bin_dir == Path::new("/opt/cni/bin"));
        assert_eq!(c.iptables_backend, IptablesBackend::Auto);
        assert_eq!(c.proxy_full_sync_seconds, 3600);
        assert_eq!(c.source, SourceConfig::Dir("/tmp/c".into()));
        assert_eq!(
            c.healthz_bind_address,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            c.metrics_bind_address,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        let c = resolve("kubeconfig: /k\nhealthzBindAddress: 127.0.0.1:9\n").unwrap();
        assert_eq!(c.source, SourceConfig::Kube(Some("/k".into())));
        assert_eq!(c.healthz_bind_address, Some("127.0.0.1:9".parse().unwrap()));
        // The same port on distinct specific addresses is fine.
        let c = resolve("healthzBindAddress: 192.168.1.5:10249\n").unwrap();
        assert_eq!(c.metrics_bind_address.unwrap().port(), 10249);
        assert_eq!(resolve("{}").unwrap().source, SourceConfig::Kube(None));
        let c =
            resolve("clusterDir: /c\nproxy: false\niptablesBackend: legacy\nmasqueradeBit: 14\n")
                .unwrap();
        assert!(!c.proxy && c.masquerade_bit == 14);
        assert_eq!(c.iptables_backend, IptablesBackend::Legacy);
        assert_eq!(
            c.cni_conf_path(),
            PathBuf::from("/etc/cni/net.d/10-rsdn.conflist")
        );
        let c = resolve("portmap: false\ncniBinDir: /usr/lib/cni\n").unwrap();
        assert!(!c.portmap && c.cni_bin_dir == Path::new("/usr/lib/cni"));
    }

    #[test]
    fn file_then_overrides() {
        let f: NodeOptions =
            serde_saphyr::from_str("nodeName: n1\nvxlanPort: 8472\nmtu: 1400\nclusterDir: /c\n")
                .unwrap();
        let over = NodeOptions {
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
            ("clusterDir: /c\nmasqueradeBit: 17\n", "masqueradeBit"),
            (
                "clusterDir: /c\nproxyFullSyncSeconds: 0\n",
                "proxyFullSyncSeconds",
            ),
            ("clusterDir: /c\nkubeconfig: /k\n", "clusterDir"),
            (
                "clusterDir: /c\nmetricsBindAddress: 127.0.0.1:10256\n",
                "metricsBindAddress",
            ),
            (
                "clusterDir: /c\nhealthzBindAddress: 127.0.0.1:10249\n",
                "metricsBindAddress",
            ),
        ];
        for (yaml, field) in cases {
            let e = resolve(yaml).unwrap_err();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
    }

    #[test]
    fn unknown_and_mistyped_fields_are_refused() {
        assert!(serde_saphyr::from_str::<NodeOptions>("clusterDir: /c\nvxlanPrt: 1\n").is_err());
        assert!(
            serde_saphyr::from_str::<NodeOptions>("clusterDir: /c\nclusterNetwork: banana\n")
                .is_err()
        );
    }

    #[test]
    fn node_port_addresses_read_as_kube_proxy_reads_them() {
        let read = |yaml: &str| resolve(yaml).map(|c| c.node_port_addresses);
        assert_eq!(read("{}"), Ok(NodePortAddresses::All));
        assert_eq!(read("nodePortAddresses: []\n"), Ok(NodePortAddresses::All));
        assert_eq!(
            read("nodePortAddresses: [primary]\n"),
            Ok(NodePortAddresses::Primary)
        );
        assert_eq!(
            read("nodePortAddresses: [192.168.77.0/24, 10.0.0.1/8]\n"),
            Ok(NodePortAddresses::Cidrs(vec![
                "192.168.77.0/24".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]))
        );
        assert_eq!(
            read("nodePortAddresses: [10.0.0.0/8, 0.0.0.0/0]\n"),
            Ok(NodePortAddresses::All)
        );
        for (bad, word) in [
            ("[primary, 10.0.0.0/8]", "combined"),
            ("[\"fd00::/64\"]", "IPv6"),
            ("[banana]", "neither"),
        ] {
            let e = read(&format!("nodePortAddresses: {bad}\n")).unwrap_err();
            assert!(e.problem.contains(word), "{bad}: {e}");
        }
        // The flag: comma-separated, also under kube-proxy's name.
        for flag in ["--node-port-addresses", "--nodeport-addresses"] {
            let m = options_command()
                .try_get_matches_from(["node", flag, "192.168.77.0/24,10.1.0.0/16"])
                .unwrap();
            let v: &NodePortAddresses = m.get_one("node_port_addresses").unwrap();
            assert_eq!(v.to_string(), "192.168.77.0/24,10.1.0.0/16");
        }
    }

    #[test]
    fn iptables_backend_accepts_what_it_always_did() {
        for (text, backend) in [
            ("auto", IptablesBackend::Auto),
            ("nft", IptablesBackend::Nft),
            ("nf_tables", IptablesBackend::Nft),
            ("legacy", IptablesBackend::Legacy),
        ] {
            let c = resolve(&format!("iptablesBackend: {text}\n")).unwrap();
            assert_eq!(c.iptables_backend, backend, "{text}");
            assert_eq!(text.parse::<IptablesBackend>(), Ok(backend));
        }
        // Refused while reading the file, with the accepted values named.
        let e = resolve("iptablesBackend: ebtables\n").unwrap_err();
        assert!(
            e.problem.contains("ebtables") && e.problem.contains("legacy"),
            "{e}"
        );
    }

    /// The value of every option with a declared default, as a file would spell it.
    fn declared_defaults() -> BTreeMap<String, String> {
        let serde_json::Value::Object(map) = serde_json::to_value(NodeOptions::defaults()).unwrap()
        else {
            unreachable!()
        };
        map.into_iter()
            .filter_map(|(key, v)| match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some((key, s)),
                v => Some((key, v.to_string())),
            })
            .collect()
    }

    fn options_command() -> clap::Command {
        <NodeOptions as clap::Args>::augment_args(clap::Command::new("node"))
    }

    fn kebab(key: &str) -> String {
        key.chars()
            .flat_map(|c| match c.is_ascii_uppercase() {
                true => vec!['-', c.to_ascii_lowercase()],
                false => vec![c],
            })
            .collect()
    }

    #[test]
    fn the_defaults_resolve_and_the_test_config_has_no_http_endpoint() {
        let c = NodeConfig::for_test("a");
        assert_eq!(c.node_name, "a");
        assert_eq!(
            (c.healthz_bind_address, c.metrics_bind_address),
            (None, None)
        );
        assert_eq!(
            NodeConfig {
                healthz_bind_address: Some(DEFAULT_HEALTHZ_BIND_ADDRESS.parse().unwrap()),
                metrics_bind_address: Some(DEFAULT_METRICS_BIND_ADDRESS.parse().unwrap()),
                ..c
            },
            NodeConfig::resolve(NodeOptions::defaults(), Some("a".into())).unwrap()
        );
        // 15 of the 22 options have a value default; unset, the others are derived or off.
        assert_eq!(declared_defaults().len(), 15, "{:?}", declared_defaults());
    }

    #[test]
    fn every_option_is_a_kebab_case_flag_of_its_file_key() {
        let cmd = options_command();
        let flags: BTreeSet<String> = cmd
            .get_arguments()
            .map(|a| {
                a.get_long()
                    .expect("every option is a long flag")
                    .to_string()
            })
            .collect();
        let keys: BTreeSet<String> = NodeOptions::keys().iter().map(|k| kebab(k)).collect();
        assert_eq!(flags, keys);
        assert!(keys.contains("node-ip") && keys.contains("healthz-bind-address"));
        assert!(keys.contains("metrics-bind-address"));
    }

    #[test]
    fn help_states_each_default_once_as_resolve_applies_it() {
        let defaults = declared_defaults();
        let cmd = options_command();
        for arg in cmd.get_arguments() {
            let help = arg.get_help().expect("every option has help").to_string();
            let key = NodeOptions::keys()
                .into_iter()
                .find(|k| kebab(k) == arg.get_long().unwrap())
                .unwrap();
            assert!(help.matches("[default: ").count() <= 1, "{key}: {help}");
            if let Some(d) = defaults.get(&key) {
                assert!(help.ends_with(&format!(" [default: {d}]")), "{key}: {help}");
                // Stating the default in the file changes nothing.
                assert_eq!(
                    resolve(&format!("{key}: {d}\n")),
                    resolve("{}"),
                    "{key}: {d}"
                );
            }
        }
    }

    /// docs/config.md's option table: (key, default cell), in order.
    fn documented_options() -> Vec<(String, String)> {
        include_str!("../docs/config.md")
            .lines()
            .skip_while(|l| !l.starts_with("| field | default | meaning |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells[1].trim_matches('`').to_string(), cells[2].to_string())
            })
            .collect()
    }

    #[test]
    fn docs_config_md_documents_exactly_the_options_with_their_defaults() {
        let documented = documented_options();
        let doc_keys: BTreeSet<String> = documented.iter().map(|(k, _)| k.clone()).collect();
        let keys: BTreeSet<String> = NodeOptions::keys().into_iter().collect();
        assert_eq!(doc_keys.len(), documented.len(), "a key documented twice");
        assert_eq!(
            doc_keys.difference(&keys).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "documented in docs/config.md but not a file key"
        );
        assert_eq!(
            keys.difference(&doc_keys).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "a file key missing from docs/config.md"
        );
        let defaults = declared_defaults();
        for (key, cell) in documented {
            match defaults.get(&key) {
                Some(d) => assert_eq!(cell, format!("`{d}`"), "{key}"),
                None => assert!(
                    !(cell.starts_with('`') && cell.ends_with('`')),
                    "{key}: documented default {cell} but none declared"
                ),
            }
        }
    }
}
