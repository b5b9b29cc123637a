//! The ADD result, written in the shape of the version the runtime asked for, and read back
//! from `prevResult` for CHECK.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{CniError, Code, Result};
use crate::version::Version;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in results before 1.0.0, where it is always "4" for us.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Always empty for us, but present: some runtimes expect the key.
    #[serde(default)]
    pub dns: serde_json::Map<String, serde_json::Value>,
}

impl CniResult {
    /// Reshapes the result for `version` (IP `version` fields before 1.0.0, interface MTU from 1.1.0).
    pub fn for_version(mut self, version: Version) -> CniResult {
        self.cni_version = version.to_string();
        for ip in &mut self.ips {
            ip.version = version.ip_entries_carry_version().then(|| "4".to_string());
        }
        if !version.interfaces_carry_mtu() {
            for i in &mut self.interfaces {
                i.mtu = None;
            }
        }
        self
    }

    /// Reads a `prevResult`, whatever version it was written in.
    pub fn from_prev(value: &serde_json::Value) -> Result<CniResult> {
        serde_json::from_value(value.clone()).map_err(|e| {
            CniError::new(
                Code::InvalidConfig,
                "prevResult is not a CNI result this plugin understands",
            )
            .with_details(e)
        })
    }

    /// The first IP entry that belongs to the sandbox interface `ifname`.
    pub fn ip_of(&self, ifname: &str) -> Option<&IpConfig> {
        self.ips.iter().find(|ip| {
            ip.interface
                .and_then(|i| self.interfaces.get(i))
                .is_some_and(|i| i.name == ifname && i.sandbox.is_some())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            cni_version: String::new(),
            interfaces: vec![
                Interface {
                    name: "rsdn1234".into(),
                    mac: Some("aa:bb:cc:dd:ee:ff".into()),
                    mtu: Some(1450),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:58:0a:80:00:05".into()),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                version: None,
                address: "10.128.0.5/23".parse().unwrap(),
                gateway: Some("10.128.0.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.128.0.1".parse().unwrap()),
            }],
            dns: Default::default(),
        }
    }

    #[test]
    fn old_versions_carry_ip_version_and_no_mtu() {
        let v =
            serde_json::to_value(sample().for_version(Version::parse("0.3.1").unwrap())).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][0]["address"], "10.128.0.5/23");
        assert!(v["interfaces"][1].get("mtu").is_none());
        assert_eq!(v["interfaces"][1]["sandbox"], "/run/netns/p");
    }

    #[test]
    fn v1_drops_ip_version_and_v110_has_mtu() {
        let v = serde_json::to_value(sample().for_version(Version::V1_0_0)).unwrap();
        assert!(v["ips"][0].get("version").is_none());
        assert!(v["interfaces"][1].get("mtu").is_none());
        let v = serde_json::to_value(sample().for_version(Version::V1_1_0)).unwrap();
        assert_eq!(v["interfaces"][1]["mtu"], 1450);
        assert_eq!(v["routes"][0]["dst"], "0.0.0.0/0");
    }

    #[test]
    fn prev_result_of_any_version_reads_back() {
        for ver in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let wire =
                serde_json::to_value(sample().for_version(Version::parse(ver).unwrap())).unwrap();
            let back = CniResult::from_prev(&wire).unwrap();
            assert_eq!(
                back.ip_of("eth0").unwrap().address.to_string(),
                "10.128.0.5/23"
            );
            assert!(back.ip_of("rsdn1234").is_none());
        }
        assert_eq!(
            CniResult::from_prev(&serde_json::json!({"ips": 3}))
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
    }
}
