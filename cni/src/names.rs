//! Names and addresses derived from identities, so they are stable and need no state.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

/// Prefix of every host-side veth the plugin creates; GC and operators recognise ours by it.
pub const VETH_PREFIX: &str = "rsdn";

/// The host end of a pod's veth: `rsdn` + 11 hex digits of sha256(container id, ifname).
/// 15 bytes, the kernel's limit; the same attachment always gets the same name.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::new()
        .chain_update(container_id.as_bytes())
        .chain_update([0u8])
        .chain_update(ifname.as_bytes())
        .finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{VETH_PREFIX}{}", &hex[..11])
}

/// `0a:58:` + the IPv4 address: the OpenShift convention for pod and VTEP MACs. Locally
/// administered, unicast, and a reused IP always brings back the same MAC (no stale ARP).
pub fn mac_from_ipv4(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_distinct_and_short() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
        // The separator keeps ("ab", "ceth0") and ("abc", "eth0") apart.
        assert_ne!(host_veth_name("ab", "ceth0"), host_veth_name("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("rsdn"));
    }

    #[test]
    fn mac_from_ip() {
        let mac = mac_from_ipv4("10.128.0.5".parse().unwrap());
        assert_eq!(format_mac(&mac), "0a:58:0a:80:00:05");
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }
}
