//! The network configuration on stdin and the `CNI_*` environment: parsing and validation.
//!
//! The node daemon writes this config (see `NetConf::for_node`), but a hand-written one works
//! the same way; every field but `subnet` has a default.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{CniError, Code, Result};
use crate::version::Version;

pub const DEFAULT_BRIDGE: &str = "tun0";
pub const DEFAULT_MTU: u32 = 1450;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
/// The `type` our conflists use; the binary name.
pub const PLUGIN_TYPE: &str = "rsdn-cni";

/// One network configuration as the runtime hands it to us.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The node bridge that pod veths join; the daemon owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The node's pod subnet (its `spec.podCIDR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Net>,
    /// The bridge's address inside `subnet`; default: the first host address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// host-local's `dataDir`: allocations live in `<dataDir>/<name>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hairpin_mode: Option<bool>,
    /// Append log lines here; without it the plugin logs to stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// error, warn, info, debug or trace; default warn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still wants.
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Fields we do not interpret (runtimeConfig, args, capabilities, ...) are kept, not refused.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A (container, interface) pair the runtime still uses; GC keeps exactly these.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// What ADD and CHECK need to know about the node network, defaults applied and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub hairpin: bool,
}

impl NetConf {
    /// Decodes stdin: not JSON at all is error 6, JSON of the wrong shape is error 7.
    pub fn parse(stdin: &[u8]) -> Result<NetConf> {
        let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                "the network configuration on stdin is not JSON",
            )
            .with_details(e)
        })?;
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(Code::InvalidConfig, "invalid network configuration").with_details(e)
        })?;
        conf.validate_common()?;
        Ok(conf)
    }

    /// The config the node daemon writes for a node.
    pub fn for_node(
        name: &str,
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        mtu: u32,
        bridge: &str,
    ) -> NetConf {
        NetConf {
            cni_version: crate::version::CURRENT.to_string(),
            name: name.to_string(),
            plugin_type: PLUGIN_TYPE.to_string(),
            bridge: Some(bridge.to_string()),
            subnet: Some(subnet),
            gateway: Some(gateway),
            mtu: Some(mtu),
            ..NetConf::default()
        }
    }

    pub fn version(&self) -> Result<Version> {
        Version::parse(&self.cni_version)
    }

    fn validate_common(&self) -> Result<()> {
        let invalid = |msg: String| Err(CniError::new(Code::InvalidConfig, msg));
        if self.name.is_empty() {
            return invalid("the network \"name\" is empty".into());
        }
        // The name becomes a directory under dataDir: it must stay one path component.
        if self.name.contains('/') || self.name == "." || self.name == ".." {
            return invalid(format!(
                "network name {:?} cannot be used as a directory name",
                self.name
            ));
        }
        if let Some(b) = &self.bridge {
            check_ifname(b).map_err(|why| {
                CniError::new(
                    Code::InvalidConfig,
                    format!("invalid bridge name {b:?}: {why}"),
                )
            })?;
        }
        if let Some(level) = &self.log_level {
            if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
                return invalid(format!(
                    "logLevel {level:?} is not one of error, warn, info, debug, trace"
                ));
            }
        }
        Ok(())
    }

    pub fn bridge_name(&self) -> &str {
        self.bridge.as_deref().unwrap_or(DEFAULT_BRIDGE)
    }

    /// The IPAM store directory, `<dataDir>/<name>` as host-local lays it out.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
            .join(&self.name)
    }

    /// Validates what ADD and CHECK need: a subnet, a gateway inside it, a sane MTU.
    pub fn pod_network(&self) -> Result<PodNetwork> {
        let invalid = |msg: String| CniError::new(Code::InvalidConfig, msg);
        let subnet = self
            .subnet
            .ok_or_else(|| invalid("\"subnet\" (the node's pod CIDR) is required".into()))?;
        if subnet != subnet.trunc() {
            return Err(invalid(format!(
                "subnet {subnet} has host bits set; did you mean {}?",
                subnet.trunc()
            )));
        }
        if subnet.prefix_len() > 30 {
            return Err(invalid(format!(
                "subnet {subnet} is too small: it needs room for a gateway and pods (/30 or larger)"
            )));
        }
        let gateway = match self.gateway {
            Some(g) => g,
            None => first_host(subnet),
        };
        if !subnet.contains(&gateway)
            || gateway == subnet.network()
            || gateway == subnet.broadcast()
        {
            return Err(invalid(format!(
                "gateway {gateway} must be a host address inside subnet {subnet}"
            )));
        }
        let mtu = self.mtu.unwrap_or(DEFAULT_MTU);
        if !(68..=65535).contains(&mtu) {
            return Err(invalid(format!("mtu {mtu} is outside 68..=65535")));
        }
        Ok(PodNetwork {
            bridge: self.bridge_name().to_string(),
            subnet,
            gateway,
            mtu,
            hairpin: self.hairpin_mode.unwrap_or(true),
        })
    }
}

pub fn first_host(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Linux interface name rules (dev_valid_name): 1-15 bytes, no '/', ':' or whitespace, not "." or "..".
pub fn check_ifname(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 15 {
        return Err("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("it is . or ..");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err("it contains '/', ':' or whitespace");
    }
    Ok(())
}

/// The CNI command, from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The `CNI_*` environment, validated for the command at hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

impl Env {
    /// Reads the environment through `get` (so tests need not touch the process environment).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Env> {
        let invalid = |msg: String| CniError::new(Code::InvalidEnv, msg);
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some(other) => return Err(invalid(format!("unknown CNI_COMMAND {other:?}"))),
            None => return Err(invalid("CNI_COMMAND is not set".into())),
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: nonempty("CNI_NETNS").map(PathBuf::from),
            ifname: String::new(),
        };
        if !per_container {
            return Ok(env);
        }
        env.container_id = nonempty("CNI_CONTAINERID")
            .ok_or_else(|| invalid("CNI_CONTAINERID is not set".into()))?;
        // The spec's rule: alphanumerics plus '_', '.', '-', starting with an alphanumeric.
        let id_ok = env
            .container_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && env
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !id_ok {
            return Err(invalid(format!(
                "CNI_CONTAINERID {:?} has invalid characters",
                env.container_id
            )));
        }
        env.ifname =
            nonempty("CNI_IFNAME").ok_or_else(|| invalid("CNI_IFNAME is not set".into()))?;
        check_ifname(&env.ifname).map_err(|why| {
            invalid(format!(
                "CNI_IFNAME {:?} is not a valid interface name: {why}",
                env.ifname
            ))
        })?;
        if matches!(command, Command::Add | Command::Check) && env.netns.is_none() {
            return Err(invalid("CNI_NETNS is not set".into()));
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> Result<NetConf> {
        NetConf::parse(json.as_bytes())
    }

    const GOOD: &str =
        r#"{"cniVersion":"1.0.0","name":"rsdn","type":"rsdn-cni","subnet":"10.128.0.0/23"}"#;

    #[test]
    fn defaults_apply() {
        let c = conf(GOOD).unwrap();
        let n = c.pod_network().unwrap();
        assert_eq!(n.bridge, "tun0");
        assert_eq!(n.gateway, "10.128.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(n.mtu, 1450);
        assert!(n.hairpin);
        assert_eq!(c.store_dir(), PathBuf::from("/var/lib/cni/networks/rsdn"));
    }

    #[test]
    fn explicit_fields_win() {
        let c = conf(r#"{"cniVersion":"0.4.0","name":"n","type":"rsdn-cni","subnet":"10.1.0.0/24",
            "gateway":"10.1.0.254","mtu":9000,"bridge":"br-x","dataDir":"/tmp/d","hairpinMode":false}"#)
        .unwrap();
        let n = c.pod_network().unwrap();
        assert_eq!((n.bridge.as_str(), n.mtu, n.hairpin), ("br-x", 9000, false));
        assert_eq!(n.gateway.to_string(), "10.1.0.254");
        assert_eq!(c.store_dir(), PathBuf::from("/tmp/d/n"));
    }

    #[test]
    fn garbage_is_decode_error_and_wrong_shape_is_config_error() {
        assert_eq!(conf("not json").unwrap_err().code, Code::Decode);
        assert_eq!(conf("").unwrap_err().code, Code::Decode);
        assert_eq!(
            conf(r#"{"name":"x"}"#).unwrap_err().code,
            Code::InvalidConfig
        );
        assert_eq!(
            conf(r#"{"cniVersion":"1.0.0","name":"x","mtu":"big"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            conf(r#"{"cniVersion":"1.0.0","name":"x","subnet":"10.0.0.0/33"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
    }

    #[test]
    fn unknown_fields_are_kept_not_refused() {
        let c = conf(
            r#"{"cniVersion":"1.0.0","name":"x","runtimeConfig":{"portMappings":[]},"foo":1}"#,
        )
        .unwrap();
        assert!(c.other.contains_key("runtimeConfig") && c.other.contains_key("foo"));
    }

    #[test]
    fn invalid_networks_are_refused_with_the_field_named() {
        let cases = [
            (r#""subnet":"10.128.0.5/23""#, "host bits"),
            (r#""subnet":"10.128.0.0/31""#, "too small"),
            (
                r#""subnet":"10.128.0.0/23","gateway":"10.129.0.1""#,
                "gateway",
            ),
            (
                r#""subnet":"10.128.0.0/23","gateway":"10.128.0.0""#,
                "gateway",
            ),
            (
                r#""subnet":"10.128.0.0/23","gateway":"10.128.1.255""#,
                "gateway",
            ),
            (r#""subnet":"10.128.0.0/23","mtu":10"#, "mtu"),
            (r#""gateway":"10.128.0.1""#, "subnet"),
        ];
        for (fields, word) in cases {
            let json = format!(r#"{{"cniVersion":"1.0.0","name":"x",{fields}}}"#);
            let e = conf(&json).unwrap().pod_network().unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig, "{json}");
            assert!(e.msg.contains(word), "{json}: {}", e.msg);
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for fields in [
            r#""name":"""#,
            r#""name":"a/b""#,
            r#""name":"..""#,
            r#""name":"n","bridge":"a very long bridge name""#,
            r#""name":"n","logLevel":"loud""#,
        ] {
            let json = format!(r#"{{"cniVersion":"1.0.0",{fields}}}"#);
            assert_eq!(conf(&json).unwrap_err().code, Code::InvalidConfig, "{json}");
        }
    }

    #[test]
    fn valid_attachments_parse() {
        let c = conf(r#"{"cniVersion":"1.1.0","name":"x","cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}"#).unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn config_for_node_round_trips() {
        let c = NetConf::for_node(
            "rsdn",
            "10.128.2.0/23".parse().unwrap(),
            "10.128.2.1".parse().unwrap(),
            1450,
            "tun0",
        );
        let back = conf(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            back.pod_network().unwrap().subnet.to_string(),
            "10.128.2.0/23"
        );
    }

    fn env(pairs: &[(&str, &str)]) -> Result<Env> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn env_validation() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1.2_3"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let e = env(&full).unwrap();
        assert_eq!((e.command, e.ifname.as_str()), (Command::Add, "eth0"));

        assert_eq!(env(&[]).unwrap_err().code, Code::InvalidEnv);
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code,
            Code::InvalidEnv
        );
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let partial: Vec<_> = full
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = env(&partial).unwrap_err();
            assert_eq!(err.code, Code::InvalidEnv);
            assert!(err.msg.contains(missing), "{}", err.msg);
        }
        let mut bad = full;
        bad[1].1 = "-leading-dash";
        assert_eq!(env(&bad).unwrap_err().code, Code::InvalidEnv);
        bad = full;
        bad[3].1 = "eth0/../x";
        assert_eq!(env(&bad).unwrap_err().code, Code::InvalidEnv);
    }

    #[test]
    fn del_needs_no_netns_and_version_needs_nothing() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(e.netns, None);
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
        assert_eq!(env(&[("CNI_COMMAND", "GC")]).unwrap().command, Command::Gc);
    }
}
