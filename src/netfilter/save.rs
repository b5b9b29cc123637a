//! Reading what the kernel holds: `iptables-save -t TABLE` and `iptables -S CHAIN` output as
//! chains and their rules (as the tools print them, which is not always how they were written:
//! `-d 10.0.0.1` comes back as `-d 10.0.0.1/32`, matches move, marks are spelled out).

use std::collections::HashMap;

/// One table's chains in the kernel, borrowed from the tool's output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Saved<'a> {
    /// Chain -> its rules (`-A CHAIN ...` lines, in order). Built-in chains included.
    pub chains: HashMap<&'a str, Vec<&'a str>>,
}

impl<'a> Saved<'a> {
    /// Parses one table of `iptables-save` (`:CHAIN POLICY [n:m]` declarations and `-A` lines)
    /// or an `iptables -S` listing (`-P CHAIN POLICY`, `-N CHAIN`, `-A`).
    pub fn parse(text: &'a str) -> Saved<'a> {
        let mut chains: HashMap<&str, Vec<&str>> = HashMap::new();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    chains.entry(name).or_default();
                }
            } else if let Some(rest) = line
                .strip_prefix("-N ")
                .or_else(|| line.strip_prefix("-P "))
            {
                if let Some(name) = rest.split_whitespace().next() {
                    chains.entry(name).or_default();
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                if let Some(name) = rest.split_whitespace().next() {
                    chains.entry(name).or_default().push(line);
                }
            }
        }
        Saved { chains }
    }

    pub fn rules(&self, chain: &str) -> Option<&[&'a str]> {
        self.chains.get(chain).map(Vec::as_slice)
    }
}

/// The line number iptables-restore names in its error ("Error occurred at line: 7", or
/// "line 7 failed" from older versions).
pub fn failed_line(stderr: &str) -> Option<usize> {
    stderr.match_indices("line").find_map(|(at, _)| {
        let rest = stderr[at + 4..].trim_start_matches([':', ' ']);
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_errors_name_their_line() {
        assert_eq!(failed_line("iptables-restore: line 7 failed"), Some(7));
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): Couldn't load match `nope'\n\nError occurred at line: 12\nTry `iptables-restore -h'"),
            Some(12)
        );
        assert_eq!(failed_line("a multiline message\nno number"), None);
    }

    #[test]
    fn saves_and_listings_parse_alike() {
        let save = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-X - [0:0]\n-A PREROUTING -j KUBE-SVC-X\n-A KUBE-SVC-X -j RETURN\nCOMMIT\n";
        let s = Saved::parse(save);
        assert_eq!(
            s.rules("PREROUTING").unwrap(),
            ["-A PREROUTING -j KUBE-SVC-X"]
        );
        assert_eq!(s.rules("KUBE-SVC-X").unwrap().len(), 1);
        assert!(s.rules("KUBE-SEP-Y").is_none());
        let listing = "-P FORWARD ACCEPT\n-N EMPTY\n-A FORWARD -j RSDN-FORWARD\n";
        let l = Saved::parse(listing);
        assert_eq!(l.rules("FORWARD").unwrap(), ["-A FORWARD -j RSDN-FORWARD"]);
        assert_eq!(l.rules("EMPTY").unwrap().len(), 0);
    }
}
