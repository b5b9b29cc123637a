//! The CNI error object: every failure of the plugin ends up as one of these on stdout.
//!
//! Codes 1-99 are the spec's; 100 and up are ours and documented in docs/cni.md.

use serde::Serialize;

/// A CNI error code (spec 1.1.0, "Error" section) or one of our plugin-specific codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 1: the cniVersion in the config is not one we speak.
    IncompatibleVersion,
    /// 2: a field is present that this plugin cannot honour.
    UnsupportedField,
    /// 3: the container (its network namespace) does not exist.
    UnknownContainer,
    /// 4: a `CNI_*` environment variable is missing or malformed.
    InvalidEnv,
    /// 5: reading or writing the IPAM store or stdin failed.
    Io,
    /// 6: stdin is not JSON.
    Decode,
    /// 7: the JSON is not a valid network configuration.
    InvalidConfig,
    /// 11: a transient condition (the node network is not programmed yet).
    TryAgainLater,
    /// 50: STATUS: the plugin cannot service ADD requests.
    NotAvailable,
    /// 100: no free address left in the node subnet.
    AddressesExhausted,
    /// 101: CHECK found the container's network different from what ADD created.
    CheckFailed,
    /// 102: a netlink operation failed.
    Kernel,
}

impl Code {
    pub fn as_u32(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::UnsupportedField => 2,
            Code::UnknownContainer => 3,
            Code::InvalidEnv => 4,
            Code::Io => 5,
            Code::Decode => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::NotAvailable => 50,
            Code::AddressesExhausted => 100,
            Code::CheckFailed => 101,
            Code::Kernel => 102,
        }
    }
}

/// A failure, as the runtime will see it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl std::fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// The JSON object the spec asks for; `cni_version` is the version the runtime asked for
    /// when we know it, our newest otherwise.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code.as_u32(),
            msg: &self.msg,
            details: &self.details,
        })
        .expect("serializing plain strings cannot fail")
    }
}

pub type Result<T> = std::result::Result<T, CniError>;

/// Shorthand for the many "this step failed because of that I/O error" cases.
pub(crate) fn io_error(what: impl std::fmt::Display, err: std::io::Error) -> CniError {
    CniError::new(Code::Io, what.to_string()).with_details(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::new(Code::InvalidConfig, "bad mtu").with_details("mtu 10 < 68");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad mtu");
        assert_eq!(v["details"], "mtu 10 < 68");
    }

    #[test]
    fn empty_details_are_omitted() {
        let e = CniError::new(Code::TryAgainLater, "later");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(v["code"], 11);
        assert!(v.get("details").is_none());
        assert_eq!(e.to_string(), "later");
    }
}
