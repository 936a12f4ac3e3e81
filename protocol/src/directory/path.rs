//! Path selection: one mix per layer for every packet, a gateway per client, an exit per
//! stream.
//!
//! Rules (Tor's, applied across the whole route, gateway and exit included): no two relays of
//! one (mutually declared) family, no two in one IPv4 /16 or IPv6 /32 (unless the network
//! opts out, as a network on one loopback address must), never the same relay twice. Choices
//! are weighted by the weight the authorities measured (never a relay's own claim). Only
//! relays that published a Sphinx key for the consensus epoch are eligible, and the client's
//! preferences narrow the choice further: a price cap per packet per hop and a minimum
//! performance score. A client that asks for more than the consensus offers gets an error
//! that says which layer or role has nothing left and why, not a path that breaks its rules.
//!
//! Mixes are drawn layer by layer; if an early choice leaves a later layer without a
//! compatible relay the draw restarts, and after a few failed draws every valid path is
//! enumerated (in small directories, where that happens) so that an error means no valid
//! path exists, not bad luck.

use std::net::IpAddr;

use rand::{Rng, RngExt};

use super::{Consensus, ConsensusRelay, LAYERS};
use crate::{Error, Result};

/// Knobs of the path rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathRules {
    /// Refuse two relays in one IPv4 /16 or IPv6 /32 (Tor's EnforceDistinctSubnets).
    pub distinct_subnets: bool,
    /// Never use a relay whose price per packet is above this.
    pub max_price_per_hop: Option<u64>,
    /// Never use a relay whose consensus performance (per mille) is below this.
    pub min_performance: u16,
}

impl Default for PathRules {
    fn default() -> Self {
        PathRules {
            distinct_subnets: true,
            max_price_per_hop: None,
            min_performance: 0,
        }
    }
}

impl PathRules {
    /// Whether the client's preferences allow `r`.
    pub fn prefers(&self, r: &ConsensusRelay) -> bool {
        self.max_price_per_hop
            .is_none_or(|cap| r.price_per_packet <= cap)
            && r.performance >= self.min_performance
    }

    /// Why nothing of `what` is left, when the preferences removed `removed` of them.
    fn nothing_left(&self, what: &str, removed: usize) -> Error {
        if removed == 0 {
            return Error::Path(format!("the consensus lists no {what}"));
        }
        let cap = self
            .max_price_per_hop
            .map_or_else(|| "none".to_owned(), |c| c.to_string());
        Error::Path(format!(
            "no {what} meets the path preferences: {removed} are priced above the cap \
             ({cap} per packet) or score below the minimum performance ({}/1000)",
            self.min_performance
        ))
    }
}

/// Where a stream goes, as far as exit policies can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitTarget {
    /// An address the client already has.
    Ip(IpAddr, u16),
    /// A host name, resolved only by the exit: only the port is known.
    HostPort(u16),
}

const GREEDY_ATTEMPTS: usize = 8;
/// Enumerate every path only when there are at most this many layer combinations.
const MAX_ENUMERATION: usize = 250_000;

/// Picks paths from one consensus. Cheap to build; build one per consensus.
#[derive(Clone, Debug)]
pub struct PathSelector<'a> {
    consensus: &'a Consensus,
    rules: PathRules,
    layers: [Vec<&'a ConsensusRelay>; LAYERS],
    /// The layers' weights, which [`PathSelector::mix_path`] reads for every packet.
    index: LayerIndex,
    gateways: Vec<&'a ConsensusRelay>,
    exits: Vec<&'a ConsensusRelay>,
    /// How many relays the preferences removed: per layer, gateways, exits.
    removed: ([usize; LAYERS], usize, usize),
}

impl<'a> PathSelector<'a> {
    pub fn new(consensus: &'a Consensus, rules: PathRules) -> Self {
        let epoch = consensus.epoch;
        let keyed = |r: &&ConsensusRelay| r.sphinx_key(epoch).is_some();
        let mut layers: [Vec<&ConsensusRelay>; LAYERS] = Default::default();
        let mut removed = ([0; LAYERS], 0, 0);
        for r in consensus.relays.iter().filter(keyed) {
            let Some(index) = r
                .layer
                .filter(|_| r.roles.mix)
                .map(|layer| usize::from(layer).wrapping_sub(1))
                .filter(|&i| i < LAYERS)
            else {
                continue;
            };
            if rules.prefers(r) {
                layers[index].push(r);
            } else {
                removed.0[index] += 1;
            }
        }
        let pick = |candidates: Vec<&'a ConsensusRelay>, count: &mut usize| {
            let total = candidates.len();
            let kept: Vec<_> = candidates
                .into_iter()
                .filter(|r| rules.prefers(r))
                .collect();
            *count = total - kept.len();
            kept
        };
        let gateways = pick(
            consensus
                .relays
                .iter()
                .filter(|r| r.roles.gateway && r.addresses.client.is_some())
                .collect(),
            &mut removed.1,
        );
        let exits = pick(
            consensus
                .relays
                .iter()
                .filter(keyed)
                .filter(|r| r.roles.exit)
                .collect(),
            &mut removed.2,
        );
        PathSelector {
            consensus,
            rules,
            index: LayerIndex::new(&layers),
            layers,
            gateways,
            exits,
            removed,
        }
    }

    /// The same selector without the relays in `exclude` (say, ones that recently lost
    /// packets); a layer that would be left empty keeps all its relays.
    pub fn excluding(mut self, exclude: &[super::IdentityKey]) -> Self {
        if exclude.is_empty() {
            return self;
        }
        for layer in &mut self.layers {
            let kept: Vec<_> = layer
                .iter()
                .copied()
                .filter(|r| !exclude.contains(&r.identity))
                .collect();
            if !kept.is_empty() {
                *layer = kept;
            }
        }
        self.index = LayerIndex::new(&self.layers);
        self
    }

    /// The same selector without the gateways in `exclude` (ones that failed); unlike
    /// [`Self::excluding`], none may be left.
    pub fn without_gateways(mut self, exclude: &[super::IdentityKey]) -> Self {
        self.gateways.retain(|g| !exclude.contains(&g.identity));
        self
    }

    /// The consensus paths come from.
    pub fn consensus(&self) -> &'a Consensus {
        self.consensus
    }

    /// The mixes of layer `layer` (1–3).
    pub fn layer(&self, layer: usize) -> &[&'a ConsensusRelay] {
        self.layers
            .get(layer.wrapping_sub(1))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether two relays may not share a route.
    pub fn conflict(&self, a: &ConsensusRelay, b: &ConsensusRelay) -> bool {
        relays_conflict(a, b, self.rules)
    }

    /// [`PathSelector::conflict`] of relay `a.1` of layer `a.0` and relay `b.1` of layer
    /// `b.0`, with their subnets from the index.
    fn hops_conflict(&self, a: (usize, usize), b: (usize, usize)) -> bool {
        same_or_family(self.layers[a.0][a.1], self.layers[b.0][b.1])
            || (self.rules.distinct_subnets
                && self.index.subnets[a.0][a.1] == self.index.subnets[b.0][b.1])
    }

    fn compatible(&self, r: &ConsensusRelay, chosen: &[&ConsensusRelay]) -> bool {
        chosen.iter().all(|c| !self.conflict(r, c))
    }

    /// A gateway for a client (its entry, kept like a Tor guard).
    pub fn choose_gateway<R: Rng + ?Sized>(&self, rng: &mut R) -> Result<&'a ConsensusRelay> {
        weighted_choice(rng, &self.gateways)
            .ok_or_else(|| self.rules.nothing_left("gateway", self.removed.1))
    }

    /// The gateway with this identity, if the consensus lists it as one and the preferences
    /// allow it.
    pub fn gateway(&self, identity: &super::IdentityKey) -> Option<&'a ConsensusRelay> {
        self.gateways
            .iter()
            .copied()
            .find(|g| g.identity == *identity)
    }

    /// Whether any exit is left after the preferences (an error that says why if not).
    pub fn any_exit(&self) -> Result<()> {
        if self.exits.is_empty() {
            return Err(self.rules.nothing_left("exit", self.removed.2));
        }
        Ok(())
    }

    /// An exit whose policy allows `target`, compatible with the relays in `avoid`.
    pub fn choose_exit<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        target: ExitTarget,
        avoid: &[&ConsensusRelay],
    ) -> Result<&'a ConsensusRelay> {
        let allowed: Vec<_> = self
            .exits
            .iter()
            .copied()
            .filter(|r| match target {
                ExitTarget::Ip(ip, port) => r.exit_policy.allows(ip, port),
                ExitTarget::HostPort(port) => r.exit_policy.may_allow_port(port),
            })
            .collect();
        if allowed.is_empty() {
            return Err(if self.removed.2 > 0 {
                self.rules.nothing_left("exit", self.removed.2)
            } else {
                Error::NoExit
            });
        }
        let usable: Vec<_> = allowed
            .into_iter()
            .filter(|r| self.compatible(r, avoid))
            .collect();
        weighted_choice(rng, &usable).ok_or_else(|| {
            Error::Path("every exit that allows the destination conflicts with the gateway".into())
        })
    }

    /// `[L1, L2, L3]` for one packet, compatible with each other and with `avoid`
    /// (the client's gateway and the stream's exit).
    pub fn mix_path<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        avoid: &[&ConsensusRelay],
    ) -> Result<[&'a ConsensusRelay; LAYERS]> {
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.is_empty() {
                let what = format!("mix in layer {}", i + 1);
                return Err(self.rules.nothing_left(&what, self.removed.0[i]));
            }
        }
        'attempt: for _ in 0..GREEDY_ATTEMPTS {
            let mut picked = [0usize; LAYERS];
            for hop in 0..LAYERS {
                let layer = &self.layers[hop];
                let weights = &self.index.weights[hop];
                // Compatible with the relays to avoid and with the hops already chosen.
                let fits = |at: usize| {
                    self.compatible(layer[at], avoid)
                        && (0..hop).all(|h| !self.hops_conflict((h, picked[h]), (hop, at)))
                };
                // Fast path: a weighted draw that usually fits; filter only when it does not.
                let weighted = |at: usize| (at, weights[at]);
                let mut pick = weighted_draw(
                    rng,
                    (0..weights.len()).map(weighted),
                    self.index.totals[hop],
                )
                .filter(|&at| fits(at));
                if pick.is_none() {
                    let fitting: Vec<usize> = (0..layer.len()).filter(|&at| fits(at)).collect();
                    let total = fitting.iter().map(|&at| weights[at]).sum();
                    pick = weighted_draw(rng, fitting.into_iter().map(weighted), total);
                }
                let Some(at) = pick else {
                    continue 'attempt;
                };
                picked[hop] = at;
            }
            let mut path = [self.layers[0][0]; LAYERS];
            for ((relay, layer), at) in path.iter_mut().zip(&self.layers).zip(picked) {
                *relay = layer[at];
            }
            return Ok(path);
        }
        self.enumerate_paths(rng, avoid)
    }

    /// Every valid path, drawn with probability proportional to its weight product.
    fn enumerate_paths<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        avoid: &[&ConsensusRelay],
    ) -> Result<[&'a ConsensusRelay; LAYERS]> {
        let combos = self.layers.iter().map(Vec::len).product::<usize>();
        if combos > MAX_ENUMERATION {
            return Err(Error::Path(
                "no compatible path found (too many relays conflict with the gateway and exit)"
                    .into(),
            ));
        }
        let mut valid: Vec<([&ConsensusRelay; LAYERS], u128)> = Vec::new();
        for &a in self.layers[0].iter().filter(|r| self.compatible(r, avoid)) {
            for &b in self.layers[1]
                .iter()
                .filter(|r| self.compatible(r, avoid) && !self.conflict(r, a))
            {
                for &c in self.layers[2].iter().filter(|r| {
                    self.compatible(r, avoid) && !self.conflict(r, a) && !self.conflict(r, b)
                }) {
                    let w = [a, b, c].iter().map(|r| weight(r) as u128).product();
                    valid.push(([a, b, c], w));
                }
            }
        }
        let total: u128 = valid.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err(Error::Path(
                "no path satisfies the rules: every choice of one mix per layer shares a \
                 family or subnet, or conflicts with the gateway or exit"
                    .into(),
            ));
        }
        let mut x = rng.random_range(0..total);
        for (path, w) in &valid {
            if x < *w {
                return Ok(*path);
            }
            x -= w;
        }
        Err(Error::Path("internal: weighted draw overran".into()))
    }
}

/// Whether two relays may not share a path: the same relay, one family, or (under `rules`)
/// one subnet.
pub(crate) fn relays_conflict(a: &ConsensusRelay, b: &ConsensusRelay, rules: PathRules) -> bool {
    same_or_family(a, b)
        || (rules.distinct_subnets && subnet(a.addresses.mix.ip()) == subnet(b.addresses.mix.ip()))
}

/// The same relay, or two of one (mutually declared) family.
fn same_or_family(a: &ConsensusRelay, b: &ConsensusRelay) -> bool {
    a.identity == b.identity
        || a.family_members.contains(&b.identity)
        || b.family_members.contains(&a.identity)
}

/// A relay's measured weight (at least 1, so that every listed relay can be drawn).
fn weight(r: &ConsensusRelay) -> u64 {
    u64::from(r.weight.max(1))
}

/// A weighted draw (by measured weight); `None` if `candidates` is empty.
fn weighted_choice<'a, R: Rng + ?Sized>(
    rng: &mut R,
    candidates: &[&'a ConsensusRelay],
) -> Option<&'a ConsensusRelay> {
    let total = candidates.iter().map(|r| weight(r)).sum();
    weighted_draw(rng, candidates.iter().map(|&r| (r, weight(r))), total)
}

/// One of `candidates`, each given with its weight, drawn with probability weight / `total`
/// (the weights' sum); `None` if `total` is zero.
fn weighted_draw<T, R: Rng + ?Sized>(
    rng: &mut R,
    candidates: impl Iterator<Item = (T, u64)>,
    total: u64,
) -> Option<T> {
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    for (candidate, w) in candidates {
        if x < w {
            return Some(candidate);
        }
        x -= w;
    }
    None
}

/// Each layer's weights and their total, and each relay's subnet, computed with the
/// selector. Linear in the relays, as building the selector is: a session builds one for
/// every route (its suspects change), so nothing quadratic, such as a table of which relays
/// conflict, may go here.
#[derive(Clone, Debug, Default)]
struct LayerIndex {
    weights: [Vec<u64>; LAYERS],
    totals: [u64; LAYERS],
    subnets: [Vec<(u8, u32)>; LAYERS],
}

impl LayerIndex {
    fn new(layers: &[Vec<&ConsensusRelay>; LAYERS]) -> LayerIndex {
        let mut index = LayerIndex::default();
        for (l, layer) in layers.iter().enumerate() {
            index.weights[l] = layer.iter().map(|r| weight(r)).collect();
            index.totals[l] = index.weights[l].iter().sum();
            index.subnets[l] = layer.iter().map(|r| subnet(r.addresses.mix.ip())).collect();
        }
        index
    }
}

/// The IPv4 /16 or IPv6 /32 an address lies in.
pub fn subnet(ip: IpAddr) -> (u8, u32) {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (4, u32::from(v4) >> 16),
            None => {
                let s = v6.segments();
                (6, (u32::from(s[0]) << 16) | u32::from(s[1]))
            }
        },
        IpAddr::V4(v4) => (4, u32::from(v4) >> 16),
    }
}
