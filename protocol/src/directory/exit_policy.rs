//! Exit policies in Tor's syntax: `accept *:443, reject 10.0.0.0/8:*`, first match wins,
//! and anything no rule matches is refused.
//!
//! Address patterns: `*` (any), `*4`, `*6`, `private` (every address that is not globally
//! reachable: see [`special_purpose`], which lists the IANA special-purpose blocks with their
//! RFCs, and the IPv4-mapped, NAT64 and 6to4 forms of such IPv4 addresses), an address, or a
//! prefix (`10.0.0.0/8`, `[2001:db8::]/32`). Ports: `*`, `N` or `N-M`. Rules are separated by
//! commas or newlines; `#` starts a comment.
//!
//! [`ExitPolicy::parse`] puts `reject private:*` first unless the operator opts in to private
//! destinations (the local test network does), so the policy in a descriptor says everything
//! a client needs to know; [`ExitPolicy::reject_first`] puts the exit's own addresses before
//! that.

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

    /// Puts `reject ADDRESS:*` first for each of `addresses`: an exit refuses its own
    /// addresses (Tor's `ExitPolicyRejectMyAddresses`), so a client cannot reach services on
    /// the relay's host through it, and the descriptor says so.
    pub fn reject_first(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Result<Self> {
        let mut own: Vec<ExitRule> = Vec::new();
        for ip in addresses {
            let net = match canonical_ip(ip) {
                IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
                IpAddr::V6(v6) => IpNet::V6(Ipv6Net::from(v6)),
            };
            let rule = ExitRule {
                action: Action::Reject,
                addr: AddrPattern::Net(net),
                ports: PortRange::ALL,
            };
            if !own.contains(&rule) {
                own.push(rule);
            }
        }
        own.append(&mut self.rules);
        if own.len() > MAX_RULES {
            return Err(Error::ExitPolicy(format!(
                "{} rules with the relay's own addresses; at most {MAX_RULES}",
                own.len()
            )));
        }
        self.rules = own;
        Ok(self)
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

/// Whether `ip` is not globally reachable, or is a form (IPv4-mapped, NAT64, 6to4) of an
/// IPv4 address that is not: see [`special_purpose`].
pub fn is_private(ip: IpAddr) -> bool {
    special_purpose(ip).is_some()
}

/// A special-purpose block an address falls in, as the IANA registries name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialPurpose {
    pub name: &'static str,
    pub rfc: &'static str,
}

/// The block that makes `ip` not globally reachable, if any: every block the IANA IPv4 and
/// IPv6 Special-Purpose Address Registries mark "Globally Reachable: False" (or N/A, for
/// deprecated blocks), multicast, and IPv6 outside global unicast 2000::/3. An IPv6 address
/// that carries an IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4 2002::/16) is judged
/// by that address: through a translator it reaches the IPv4 host. The tables below are the
/// reference; each entry names its RFC.
pub fn special_purpose(ip: IpAddr) -> Option<SpecialPurpose> {
    match ip {
        IpAddr::V4(v4) => ipv4_not_global(v4),
        IpAddr::V6(v6) => ipv6_not_global(v6),
    }
}

/// One special-purpose block: its first address, its prefix length, its name and RFC.
struct Block<T> {
    base: T,
    len: u8,
    name: &'static str,
    rfc: &'static str,
}

impl<T> Block<T> {
    fn purpose(&self) -> SpecialPurpose {
        SpecialPurpose {
            name: self.name,
            rfc: self.rfc,
        }
    }
}

impl Block<u32> {
    fn contains(&self, a: u32) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        a & mask == self.base & mask
    }
}

impl Block<u128> {
    fn contains(&self, a: u128) -> bool {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0);
        a & mask == self.base & mask
    }
}

const fn v4(
    a: u8,
    b: u8,
    c: u8,
    d: u8,
    len: u8,
    name: &'static str,
    rfc: &'static str,
) -> Block<u32> {
    Block {
        base: u32::from_be_bytes([a, b, c, d]),
        len,
        name,
        rfc,
    }
}

const fn v6(segments: [u16; 8], len: u8, name: &'static str, rfc: &'static str) -> Block<u128> {
    let mut base = 0u128;
    let mut i = 0;
    while i < 8 {
        base = (base << 16) | segments[i] as u128;
        i += 1;
    }
    Block {
        base,
        len,
        name,
        rfc,
    }
}

/// IPv4 blocks that are not globally reachable (IANA IPv4 Special-Purpose Address Registry,
/// plus multicast from the IPv4 Multicast Address Space Registry: a TCP exit never connects
/// to a group).
#[rustfmt::skip]
const IPV4_NOT_GLOBAL: &[Block<u32>] = &[
    v4(0, 0, 0, 0, 8, "\"this network\"", "RFC 791 §3.2"),
    v4(10, 0, 0, 0, 8, "private-use", "RFC 1918"),
    v4(100, 64, 0, 0, 10, "shared address space (CGNAT)", "RFC 6598"),
    v4(127, 0, 0, 0, 8, "loopback", "RFC 1122 §3.2.1.3"),
    v4(169, 254, 0, 0, 16, "link local", "RFC 3927"),
    v4(172, 16, 0, 0, 12, "private-use", "RFC 1918"),
    v4(192, 0, 0, 0, 24, "IETF protocol assignments", "RFC 6890 §2.1"),
    v4(192, 0, 0, 0, 29, "IPv4 service continuity prefix", "RFC 7335"),
    v4(192, 0, 0, 8, 32, "IPv4 dummy address", "RFC 7600"),
    v4(192, 0, 0, 170, 32, "NAT64/DNS64 discovery", "RFC 8880, RFC 7050 §2.2"),
    v4(192, 0, 0, 171, 32, "NAT64/DNS64 discovery", "RFC 8880, RFC 7050 §2.2"),
    v4(192, 0, 2, 0, 24, "documentation (TEST-NET-1)", "RFC 5737"),
    v4(192, 88, 99, 0, 24, "6to4 relay anycast (deprecated)", "RFC 7526"),
    v4(192, 168, 0, 0, 16, "private-use", "RFC 1918"),
    v4(198, 18, 0, 0, 15, "benchmarking", "RFC 2544"),
    v4(198, 51, 100, 0, 24, "documentation (TEST-NET-2)", "RFC 5737"),
    v4(203, 0, 113, 0, 24, "documentation (TEST-NET-3)", "RFC 5737"),
    v4(224, 0, 0, 0, 4, "multicast", "RFC 5771"),
    v4(240, 0, 0, 0, 4, "reserved", "RFC 1112 §4"),
    v4(255, 255, 255, 255, 32, "limited broadcast", "RFC 8190, RFC 919 §7"),
];

/// Globally reachable assignments inside the blocks above.
#[rustfmt::skip]
const IPV4_GLOBAL_EXCEPTIONS: &[Block<u32>] = &[
    v4(192, 0, 0, 9, 32, "Port Control Protocol anycast", "RFC 7723"),
    v4(192, 0, 0, 10, 32, "Traversal Using Relays around NAT anycast", "RFC 8155"),
];

/// IPv6 blocks that are not globally reachable (IANA IPv6 Special-Purpose Address Registry,
/// plus deprecated and non-unicast space from the IPv6 Address Space Registry). The blocks
/// that carry an IPv4 address (::ffff:0:0/96, 64:ff9b::/96, 2002::/16) are judged by that
/// address in [`embedded_ipv4`] instead.
#[rustfmt::skip]
const IPV6_NOT_GLOBAL: &[Block<u128>] = &[
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified", "RFC 4291"),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback", "RFC 4291"),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 96, "IPv4-compatible (deprecated)", "RFC 4291 §2.5.5.1"),
    v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use IPv4/IPv6 translation", "RFC 8215"),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only", "RFC 6666"),
    v6([0x100, 0, 0, 1, 0, 0, 0, 0], 64, "dummy IPv6 prefix", "RFC 9780"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, "IETF protocol assignments", "RFC 2928"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo", "RFC 4380, RFC 8190"),
    v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48, "benchmarking", "RFC 5180, RFC Errata 1752"),
    v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28, "ORCHID (deprecated)", "RFC 4843"),
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation", "RFC 3849"),
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation", "RFC 9637"),
    v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, "segment routing (SRv6) SIDs", "RFC 9602"),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique-local", "RFC 4193, RFC 8190"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local unicast", "RFC 4291"),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (deprecated)", "RFC 3879"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast", "RFC 4291 §2.7"),
];

/// Globally reachable assignments inside the blocks above.
#[rustfmt::skip]
const IPV6_GLOBAL_EXCEPTIONS: &[Block<u128>] = &[
    v6([0x2001, 1, 0, 0, 0, 0, 0, 1], 128, "Port Control Protocol anycast", "RFC 7723"),
    v6([0x2001, 1, 0, 0, 0, 0, 0, 2], 128, "TURN anycast", "RFC 8155"),
    v6([0x2001, 1, 0, 0, 0, 0, 0, 3], 128, "DNS-SD SRP anycast", "RFC 9665"),
    v6([0x2001, 3, 0, 0, 0, 0, 0, 0], 32, "AMT", "RFC 7450"),
    v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48, "AS112-v6", "RFC 7535"),
    v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, "ORCHIDv2", "RFC 7343"),
    v6([0x2001, 0x30, 0, 0, 0, 0, 0, 0], 28, "drone remote ID entity tags", "RFC 9374"),
];

/// The blocks whose addresses carry an IPv4 address, and where it sits (the bit offset of
/// its first bit from the top).
#[rustfmt::skip]
const IPV6_EMBEDDING_IPV4: &[(Block<u128>, u32)] = &[
    (v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "IPv4-mapped", "RFC 4291 §2.5.5.2"), 96),
    (v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, "NAT64 well-known prefix", "RFC 6052 §2.1"), 96),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4", "RFC 3056 §2"), 16),
];

fn ipv4_not_global(ip: Ipv4Addr) -> Option<SpecialPurpose> {
    let a = u32::from(ip);
    if IPV4_GLOBAL_EXCEPTIONS.iter().any(|b| b.contains(a)) {
        return None;
    }
    // The most specific listed block names the address best.
    IPV4_NOT_GLOBAL
        .iter()
        .filter(|b| b.contains(a))
        .max_by_key(|b| b.len)
        .map(Block::purpose)
}

/// The IPv4 address an IPv6 address stands for (mapped, NAT64 or 6to4), if it is one.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let a = u128::from(ip);
    IPV6_EMBEDDING_IPV4
        .iter()
        .find(|(block, _)| block.contains(a))
        .and_then(|(_, at)| u32::try_from((a >> (96 - at)) & u128::from(u32::MAX)).ok())
        .map(Ipv4Addr::from)
}

/// Everything outside 2000::/3 that no table lists: IANA's IPv6 Address Space Registry
/// allocates only 2000::/3 for global unicast and reserves the rest.
const IPV6_RESERVED: Block<u128> = v6([0; 8], 0, "reserved by the IETF", "RFC 4291 §2.4");

fn ipv6_not_global(ip: Ipv6Addr) -> Option<SpecialPurpose> {
    if let Some(v4) = embedded_ipv4(ip) {
        return ipv4_not_global(v4);
    }
    let a = u128::from(ip);
    if IPV6_GLOBAL_EXCEPTIONS.iter().any(|b| b.contains(a)) {
        return None;
    }
    let listed = IPV6_NOT_GLOBAL
        .iter()
        .filter(|b| b.contains(a))
        .max_by_key(|b| b.len);
    let global_unicast = a >> 125 == 1;
    match listed {
        Some(b) => Some(b.purpose()),
        None if !global_unicast => Some(IPV6_RESERVED.purpose()),
        None => None,
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

    /// Known blocks, written out independently of the tables in the code: (block, whether an
    /// exit may connect into it). Globally reachable exceptions inside refused blocks come
    /// after the block; a random address of a block must be judged as the table says.
    const KNOWN: &[(&str, bool)] = &[
        ("0.0.0.0/8", false),
        ("10.0.0.0/8", false),
        ("100.64.0.0/10", false),
        ("127.0.0.0/8", false),
        ("169.254.0.0/16", false),
        ("172.16.0.0/12", false),
        ("192.0.0.0/29", false),
        ("192.0.0.8/32", false),
        ("192.0.0.9/32", true),
        ("192.0.0.10/32", true),
        ("192.0.0.170/31", false),
        ("192.0.0.128/25", false),
        ("192.0.2.0/24", false),
        ("192.88.99.0/24", false),
        ("192.168.0.0/16", false),
        ("198.18.0.0/15", false),
        ("198.51.100.0/24", false),
        ("203.0.113.0/24", false),
        ("224.0.0.0/4", false),
        ("240.0.0.0/4", false),
        ("255.255.255.255/32", false),
        ("1.0.0.0/8", true),
        ("8.8.8.0/24", true),
        ("93.184.216.0/24", true),
        ("100.128.0.0/9", true),
        ("172.32.0.0/11", true),
        ("192.0.1.0/24", true),
        ("192.31.196.0/24", true),
        ("198.20.0.0/14", true),
        ("223.0.0.0/8", true),
        ("::/128", false),
        ("::1/128", false),
        ("::/96", false),
        ("64:ff9b:1::/48", false),
        ("100::/64", false),
        ("2001::/23", false),
        ("2001::/32", false),
        ("2001:2::/48", false),
        ("2001:10::/28", false),
        ("2001:1::1/128", true),
        ("2001:1::2/128", true),
        ("2001:3::/32", true),
        ("2001:4:112::/48", true),
        ("2001:20::/28", true),
        ("2001:30::/28", true),
        ("2001:db8::/32", false),
        ("3fff::/20", false),
        ("5f00::/16", false),
        ("fc00::/7", false),
        ("fe80::/10", false),
        ("fec0::/10", false),
        ("ff00::/8", false),
        ("4000::/3", false),
        ("2001:4860::/32", true),
        ("2600::/12", true),
        ("2a00::/12", true),
        ("3ffe::/16", true),
    ];

    fn random_in(net: IpNet, bits: u128) -> IpAddr {
        match net {
            IpNet::V4(n) => {
                let host = (bits as u32) & !u32::from(n.netmask());
                IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
            }
            IpNet::V6(n) => {
                let host = bits & !u128::from(n.netmask());
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
            }
        }
    }

    fn nat64(v4: Ipv4Addr) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(
            (0x64_ff9b_u128 << 96) | u128::from(u32::from(v4)),
        ))
    }

    fn six_to_four(v4: Ipv4Addr, rest: u128) -> IpAddr {
        let low80 = rest & ((1u128 << 80) - 1);
        IpAddr::V6(Ipv6Addr::from(
            (0x2002_u128 << 112) | (u128::from(u32::from(v4)) << 80) | low80,
        ))
    }

    proptest::proptest! {
        #[test]
        fn known_blocks_are_judged_as_the_table_says(i in 0..KNOWN.len(), bits: u128) {
            let (block, reachable) = KNOWN[i];
            let net: IpNet = block.parse().unwrap();
            let addr = random_in(net, bits);
            // Exceptions listed later inside this block take precedence.
            let inner = KNOWN.iter().skip(i + 1).find(|(b, _)| {
                let b: IpNet = b.parse().unwrap();
                b.prefix_len() > net.prefix_len() && b.contains(&addr)
            });
            let expected = inner.map_or(reachable, |(_, r)| *r);
            proptest::prop_assert_eq!(
                !is_private(addr), expected, "{} in {}: {:?}", addr, block, special_purpose(addr)
            );
        }

        #[test]
        fn ipv4_forms_are_judged_as_the_ipv4_address(a: u32, rest: u128) {
            let v4 = Ipv4Addr::from(a);
            let want = is_private(IpAddr::V4(v4));
            proptest::prop_assert_eq!(is_private(IpAddr::V6(v4.to_ipv6_mapped())), want);
            proptest::prop_assert_eq!(is_private(nat64(v4)), want);
            proptest::prop_assert_eq!(is_private(six_to_four(v4, rest)), want);
        }
    }

    #[test]
    fn special_purpose_ranges() {
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
            "198.18.0.1",
            "198.19.255.254",
            "192.0.0.8",
            "192.0.2.1",
            "::1",
            "::",
            "::10.0.0.1",
            "::8.8.8.8",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b:1::8.8.8.8",
            "2002:0a00:0001::1",
            "2002:7f00:0001::1",
            "2001::1",
            "2001:db8::1",
            "::ffff:192.168.0.1",
        ] {
            assert!(is_private(ip(p)), "{p}");
            let block = special_purpose(ip(p)).unwrap();
            assert!(block.rfc.starts_with("RFC "), "{p}: {block:?}");
        }
        for p in [
            "93.184.216.34",
            "2001:4860::8888",
            "100.128.0.1",
            "192.0.0.9",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_private(ip(p)), "{p}");
        }
        assert_eq!(
            special_purpose(ip("198.18.0.1")).map(|b| b.rfc),
            Some("RFC 2544")
        );
        assert_eq!(
            special_purpose(ip("64:ff9b::192.168.1.1")).map(|b| b.rfc),
            Some("RFC 1918")
        );
    }

    #[test]
    fn own_addresses_are_refused_first() {
        let p = ExitPolicy::parse("accept *:*", false)
            .unwrap()
            .reject_first([ip("93.184.216.34"), ip("2001:4860::1"), ip("93.184.216.34")])
            .unwrap();
        assert!(!p.allows(ip("93.184.216.34"), 443));
        assert!(!p.allows(ip("::ffff:93.184.216.34"), 443));
        assert!(!p.allows(ip("2001:4860::1"), 22));
        assert!(p.allows(ip("93.184.216.35"), 443));
        assert_eq!(
            p.to_string(),
            "reject 93.184.216.34/32:*, reject [2001:4860::1]/128:*, reject private:*, accept *:*"
        );
        let again: ExitPolicy = p.to_string().parse().unwrap();
        assert_eq!(again, p);
        // With private destinations allowed (the local network) the own address still is not.
        let p = ExitPolicy::parse("accept *:*", true)
            .unwrap()
            .reject_first([ip("127.0.0.1")])
            .unwrap();
        assert!(!p.allows(ip("127.0.0.1"), 80));
        assert!(p.allows(ip("127.0.0.2"), 80));
    }
}
