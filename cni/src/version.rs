//! CNI spec versions we speak, and what each one allows.

use crate::error::{CniError, Code, Result};

/// Every version we accept, oldest first. The last one is what VERSION advertises as current.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version we speak.
pub const CURRENT: &str = "1.1.0";

/// A spec version we speak, parsed from a config's `cniVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    major: u8,
    minor: u8,
    patch: u8,
}

impl Version {
    pub const V0_4_0: Version = Version::new(0, 4, 0);
    pub const V1_0_0: Version = Version::new(1, 0, 0);
    pub const V1_1_0: Version = Version::new(1, 1, 0);

    const fn new(major: u8, minor: u8, patch: u8) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }

    /// Accepts only the versions in [`SUPPORTED`]; anything else is the spec's error 1.
    pub fn parse(s: &str) -> Result<Version> {
        if !SUPPORTED.contains(&s) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("incompatible CNI version {s:?}"),
            )
            .with_details(format!("this plugin supports {}", SUPPORTED.join(", "))));
        }
        let mut parts = s
            .split('.')
            .map(|p| p.parse::<u8>().expect("listed versions parse"));
        Ok(Version::new(
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        ))
    }

    /// Results before 1.0.0 carry `"version": "4"` in each IP entry.
    pub fn ip_entries_carry_version(self) -> bool {
        self < Version::V1_0_0
    }

    /// `mtu` on result interfaces arrived with 1.1.0.
    pub fn interfaces_carry_mtu(self) -> bool {
        self >= Version::V1_1_0
    }

    /// Fails with error 1 when `command` did not exist yet in this version of the spec.
    pub fn require(self, command: &str, since: Version) -> Result<()> {
        if self < since {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("{command} needs cniVersion {since} or newer, the config says {self}"),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The answer to VERSION.
pub fn version_info() -> String {
    serde_json::json!({ "cniVersion": CURRENT, "supportedVersions": SUPPORTED }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_parses_and_round_trips() {
        for s in SUPPORTED {
            assert_eq!(Version::parse(s).unwrap().to_string(), *s);
        }
    }

    #[test]
    fn unknown_versions_are_error_1() {
        for s in ["0.2.0", "2.0.0", "1.0", "", "latest", "1.1.0 "] {
            let e = Version::parse(s).unwrap_err();
            assert_eq!(e.code.as_u32(), 1, "{s:?}");
        }
    }

    #[test]
    fn ordering_and_feature_gates() {
        let v031 = Version::parse("0.3.1").unwrap();
        let v040 = Version::parse("0.4.0").unwrap();
        let v100 = Version::parse("1.0.0").unwrap();
        let v110 = Version::parse("1.1.0").unwrap();
        assert!(v031 < v040 && v040 < v100 && v100 < v110);
        assert!(v031.ip_entries_carry_version() && v040.ip_entries_carry_version());
        assert!(!v100.ip_entries_carry_version());
        assert!(v110.interfaces_carry_mtu() && !v100.interfaces_carry_mtu());
        assert!(v031.require("CHECK", Version::V0_4_0).is_err());
        assert!(v040.require("CHECK", Version::V0_4_0).is_ok());
        assert_eq!(
            v100.require("GC", Version::V1_1_0)
                .unwrap_err()
                .code
                .as_u32(),
            1
        );
    }

    #[test]
    fn version_info_lists_all() {
        let v: serde_json::Value = serde_json::from_str(&version_info()).unwrap();
        assert_eq!(v["cniVersion"], CURRENT);
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED.len()
        );
    }
}
