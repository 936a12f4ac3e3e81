//! Exit policies in Tor's syntax: `accept *:443, reject 10.0.0.0/8:*`, first match wins,
//! and anything no rule matches is refused.
//!
//! Address patterns: `*` (any), `*4`, `*6`, `private` (loopback, RFC 1918, link-local,
//! CGNAT, multicast, unspecified, ULA and their IPv6 counterparts), an address, or a prefix
//! (`10.0.0.0/8`, `[2001:db8::]/32`). Ports: `*`, `N` or `N-M`. Rules are separated by commas
//! or newlines; `#` starts a comment.
//!
//! [`ExitPolicy::parse`] puts `reject private:*` first unless the operator opts in to private
//! destinations (the local test network does), so the policy in a descriptor says everything
//! a client needs to know.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{Error, Result};

/// Accept or reject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Reject,
}

/// Which addresses a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrPattern {
    Any,
    AnyV4,
    AnyV6,
    Private,
    Net(IpNet),
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange {
        low: 1,
        high: 65535,
    };

    fn contains(&self, port: u16) -> bool {
        self.low <= port && port <= self.high
    }
}

/// One rule of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitRule {
    pub action: Action,
    pub addr: AddrPattern,
    pub ports: PortRange,
}

/// An exit policy: ordered rules, first match wins, no match means reject.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ExitPolicy {
    rules: Vec<ExitRule>,
}

/// The most rules a policy may have (descriptors are bounded).
pub const MAX_RULES: usize = 256;

const PRIVATE_RULE: ExitRule = ExitRule {
    action: Action::Reject,
    addr: AddrPattern::Private,
    ports: PortRange::ALL,
};

impl ExitPolicy {
    /// A policy that refuses everything (for relays that are not exits).
    pub fn reject_all() -> Self {
        ExitPolicy { rules: Vec::new() }
    }

    /// Parses an operator's policy; unless `allow_private`, `reject private:*` goes first.
    pub fn parse(text: &str, allow_private: bool) -> Result<Self> {
        let mut policy: ExitPolicy = text.parse()?;
        if !allow_private && policy.rules.first() != Some(&PRIVATE_RULE) {
            policy.rules.insert(0, PRIVATE_RULE);
        }
        if policy.rules.len() > MAX_RULES {
            return Err(Error::ExitPolicy(format!(
                "{} rules; at most {MAX_RULES}",
                policy.rules.len()
            )));
        }
        Ok(policy)
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[ExitRule] {
        &self.rules
    }

    /// Whether a connection to `ip:port` is allowed.
    pub fn allows(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical_ip(ip);
        self.rules
            .iter()
            .find(|r| r.ports.contains(port) && addr_matches(&r.addr, ip))
            .is_some_and(|r| r.action == Action::Accept)
    }

    /// Whether some address on `port` may be allowed: used to pick an exit for a host name,
    /// which only the exit resolves (Tor's policy summaries make the same approximation).
    pub fn may_allow_port(&self, port: u16) -> bool {
        for rule in self.rules.iter().filter(|r| r.ports.contains(port)) {
            match (rule.action, rule.addr) {
                (action, AddrPattern::Any) => return action == Action::Accept,
                (Action::Accept, _) => return true,
                (Action::Reject, _) => continue,
            }
        }
        false
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn addr_matches(pattern: &AddrPattern, ip: IpAddr) -> bool {
    match pattern {
        AddrPattern::Any => true,
        AddrPattern::AnyV4 => ip.is_ipv4(),
        AddrPattern::AnyV6 => ip.is_ipv6(),
        AddrPattern::Private => is_private(ip),
        AddrPattern::Net(net) => net.contains(&ip),
    }
}

/// Loopback, private, link-local, CGNAT, multicast, broadcast, unspecified, reserved, ULA.
pub fn is_private(ip: IpAddr) -> bool {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (first & 0xffc0) == 0xfe80 // fe80::/10 link local
        }
    }
}

impl FromStr for ExitPolicy {
    type Err = Error;

    /// Parses rules as written, adding nothing.
    fn from_str(text: &str) -> Result<Self> {
        let mut rules = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            for item in line.split(',') {
                let item = item.trim();
                if item.is_empty() {
                    continue;
                }
                rules.push(parse_rule(item)?);
                if rules.len() > MAX_RULES {
                    return Err(Error::ExitPolicy(format!("more than {MAX_RULES} rules")));
                }
            }
        }
        Ok(ExitPolicy { rules })
    }
}

fn parse_rule(item: &str) -> Result<ExitRule> {
    let bad = |why: &str| Error::ExitPolicy(format!("`{item}`: {why}"));
    let (word, target) = item
        .split_once(char::is_whitespace)
        .ok_or_else(|| bad("expected `accept|reject ADDRESS:PORTS`"))?;
    let action = match word {
        "accept" | "accept6" => Action::Accept,
        "reject" | "reject6" => Action::Reject,
        _ => return Err(bad("a rule starts with accept or reject")),
    };
    let target = target.trim();
    let (addr, ports) = target
        .rsplit_once(':')
        .ok_or_else(|| bad("missing `:PORTS`"))?;
    let ports =
        parse_ports(ports).ok_or_else(|| bad("ports must be *, N or N-M within 1-65535"))?;
    let addr = parse_addr(addr).ok_or_else(|| bad("unrecognised address pattern"))?;
    let addr = match (word, addr) {
        // Tor's accept6/reject6 restrict `*` to IPv6.
        ("accept6" | "reject6", AddrPattern::Any) => AddrPattern::AnyV6,
        (_, a) => a,
    };
    Ok(ExitRule {
        action,
        addr,
        ports,
    })
}

fn parse_ports(s: &str) -> Option<PortRange> {
    if s == "*" {
        return Some(PortRange::ALL);
    }
    let (low, high) = match s.split_once('-') {
        Some((l, h)) => (l.parse().ok()?, h.parse().ok()?),
        None => {
            let p = s.parse().ok()?;
            (p, p)
        }
    };
    (low >= 1 && low <= high).then_some(PortRange { low, high })
}

fn parse_addr(s: &str) -> Option<AddrPattern> {
    match s {
        "*" => return Some(AddrPattern::Any),
        "*4" => return Some(AddrPattern::AnyV4),
        "*6" => return Some(AddrPattern::AnyV6),
        "private" => return Some(AddrPattern::Private),
        _ => {}
    }
    let (host, prefix) = match s.split_once('/') {
        Some((h, p)) => (h, Some(p.parse::<u8>().ok()?)),
        None => (s, None),
    };
    let ip: IpAddr = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse::<Ipv6Addr>().ok()?),
        None => IpAddr::V4(host.parse::<Ipv4Addr>().ok()?),
    };
    let net = match ip {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::new(v4, prefix.unwrap_or(32)).ok()?.trunc()),
        IpAddr::V6(v6) => IpNet::V6(Ipv6Net::new(v6, prefix.unwrap_or(128)).ok()?.trunc()),
    };
    Some(AddrPattern::Net(net))
}

impl fmt::Display for ExitRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Accept => "accept",
            Action::Reject => "reject",
        };
        write!(f, "{action} ")?;
        match self.addr {
            AddrPattern::Any => write!(f, "*")?,
            AddrPattern::AnyV4 => write!(f, "*4")?,
            AddrPattern::AnyV6 => write!(f, "*6")?,
            AddrPattern::Private => write!(f, "private")?,
            AddrPattern::Net(IpNet::V4(n)) => write!(f, "{}/{}", n.addr(), n.prefix_len())?,
            AddrPattern::Net(IpNet::V6(n)) => write!(f, "[{}]/{}", n.addr(), n.prefix_len())?,
        }
        if self.ports == PortRange::ALL {
            write!(f, ":*")
        } else if self.ports.low == self.ports.high {
            write!(f, ":{}", self.ports.low)
        } else {
            write!(f, ":{}-{}", self.ports.low, self.ports.high)
        }
    }
}

impl fmt::Display for ExitPolicy {
    /// The canonical form: rules joined by `, `; it parses back to the same policy.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rule) in self.rules.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{rule}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for ExitPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for ExitPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_match_wins_and_default_rejects() {
        let p =
            ExitPolicy::parse("reject 10.0.0.0/8:*, accept *:443, accept *:80-81", false).unwrap();
        assert!(p.allows(ip("93.184.216.34"), 443));
        assert!(p.allows(ip("93.184.216.34"), 81));
        assert!(!p.allows(ip("93.184.216.34"), 22));
        assert!(!p.allows(ip("10.1.2.3"), 443));
        assert!(
            !p.allows(ip("127.0.0.1"), 443),
            "private rejected by default"
        );
        assert!(
            !p.allows(ip("::ffff:127.0.0.1"), 443),
            "mapped loopback too"
        );
        assert!(p.may_allow_port(443));
        assert!(!p.may_allow_port(22));
        assert_eq!(
            p.to_string(),
            "reject private:*, reject 10.0.0.0/8:*, accept *:443, accept *:80-81"
        );
    }

    #[test]
    fn private_opt_in_and_ipv6() {
        let p = ExitPolicy::parse("accept *:*", true).unwrap();
        assert!(p.allows(ip("127.0.0.1"), 8080));
        let p = ExitPolicy::parse("reject [2001:db8::]/32:*\naccept6 *:443 # web", false).unwrap();
        assert!(!p.allows(ip("2001:db8::1"), 443));
        assert!(p.allows(ip("2001:4860::8888"), 443));
        assert!(!p.allows(ip("8.8.8.8"), 443), "accept6 * is IPv6 only");
        assert!(!p.allows(ip("fe80::1"), 443));
    }

    #[test]
    fn errors_are_clear() {
        for bad in [
            "allow *:80",
            "accept *",
            "accept *:0",
            "accept *:90-80",
            "accept 10.0.0.0/33:*",
            "accept [::1:*",
            "accept host.example:80",
        ] {
            let err = ExitPolicy::parse(bad, false).unwrap_err();
            assert!(matches!(err, Error::ExitPolicy(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn private_ranges() {
        for p in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.0.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(is_private(ip(p)), "{p}");
        }
        for p in ["93.184.216.34", "2001:4860::8888", "100.128.0.1"] {
            assert!(!is_private(ip(p)), "{p}");
        }
    }
}
