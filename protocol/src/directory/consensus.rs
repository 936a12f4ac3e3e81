//! The consensus computation: from the verified votes of one epoch to the one document every
//! honest authority signs. Deterministic and sans-IO: the same votes and previous consensus
//! give the same bytes on every authority, whatever order the votes arrived in.
//!
//! Rules:
//! - Votes from a strict majority of the *configured* authorities are needed
//!   ([`Error::NotEnoughVotes`] otherwise): two authorities of three can agree, one cannot.
//! - Only descriptors that carry a Sphinx key for the consensus epoch count (a relay without
//!   one could not be used in a path).
//! - A relay is in when a strict majority of the configured authorities' votes carry it.
//! - When votes carry different descriptors of one relay, the one in most votes wins, then
//!   the latest `published`, then the smallest body digest.
//! - A relay's weight is the low median of the weights the votes carrying it measured, and
//!   never more than its descriptor's claim; its performance is the low median of theirs.
//!   A relay's claim alone can never raise its weight, and one authority can only lower it.
//! - Families count only when both relays name each other.
//! - At most `relays_per_address` relays per IPv4 address or IPv6 /64, and at most
//!   [`MAX_RELAYS`] in all: the heaviest are kept, ties broken by identity. Never an error, so
//!   a flood of descriptors cannot stop the consensus.
//! - Parameters: each must be backed by a strict majority of the configured authorities on
//!   both sides. With the votes' values sorted, every value between the `t`-th smallest and
//!   the `t`-th largest (`t` the threshold) has `t` votes at or above it and `t` at or below
//!   it; the previous consensus's value is kept if it lies in that range, else moved to its
//!   nearer end. With no previous consensus the low median is taken. So with two votes of
//!   three, one bad authority cannot move a parameter away from what the honest one and the
//!   previous consensus agree on; and out-of-bounds values never get this far (a vote
//!   carrying one is refused).
//! - Mix layers are balanced by count (sizes differ by at most one) and stable: a relay
//!   keeps its layer from the previous consensus while that layer has room, ties broken by
//!   identity; new and displaced relays go to the layer with the most room, lowest first.
//! - Times: valid-after is the epoch's start, fresh-until the next epoch's start, and
//!   valid-until [`VALID_EPOCHS`] epochs after valid-after (Tor's shape: a client that cannot
//!   fetch a newer document may keep using this one for one more epoch).

use std::collections::BTreeMap;

use super::sign::{AuthoritySet, IdentityKey};
use super::vote::{Measurement, VerifiedVote};
use super::{
    Consensus, ConsensusRelay, DIRECTORY_SCHEMA, Descriptor, Epoch, LAYERS, Layer, MAX_RELAYS,
    NetworkParams, UnixTime, address_key,
};
use crate::{Error, Result};

/// How many epochs a consensus stays valid from its valid-after.
pub const VALID_EPOCHS: u64 = 2;

/// A consensus's validity window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidityTimes {
    pub valid_after: UnixTime,
    pub fresh_until: UnixTime,
    pub valid_until: UnixTime,
}

impl ValidityTimes {
    /// The window of the consensus for `epoch` with epochs of `epoch_length_s` seconds.
    pub fn for_epoch(epoch: Epoch, epoch_length_s: u64) -> Self {
        let start = u64::from(epoch).saturating_mul(epoch_length_s);
        ValidityTimes {
            valid_after: start,
            fresh_until: start.saturating_add(epoch_length_s),
            valid_until: start.saturating_add(epoch_length_s.saturating_mul(VALID_EPOCHS)),
        }
    }
}

/// Computes the consensus for `epoch` from `votes` (one per authority, all for `epoch`,
/// already verified) and the previous consensus, if any, for layer stability.
pub fn compute_consensus(
    authorities: &AuthoritySet,
    epoch: Epoch,
    votes: &[VerifiedVote],
    previous: Option<&Consensus>,
) -> Result<Consensus> {
    let mut voters: Vec<IdentityKey> = Vec::with_capacity(votes.len());
    for v in votes {
        if !authorities.contains(&v.vote.authority) {
            return Err(Error::UnknownSigner {
                signer: v.vote.authority.to_hex(),
            });
        }
        if v.vote.epoch != epoch {
            return Err(Error::WrongEpoch {
                expected: epoch,
                got: v.vote.epoch,
            });
        }
        if voters.contains(&v.vote.authority) {
            return Err(Error::Document(format!(
                "two votes by authority {}",
                v.vote.authority.to_hex()
            )));
        }
        voters.push(v.vote.authority);
    }
    let needed = authorities.threshold();
    if votes.len() < needed {
        return Err(Error::NotEnoughVotes {
            votes: votes.len(),
            needed,
        });
    }

    let params = majority_params(votes, needed, previous.map(|p| &p.params));

    // For each relay: each distinct descriptor (by digest) and the votes carrying it, and
    // every vote's measurement of the relay.
    #[derive(Default)]
    struct Candidate<'v> {
        versions: BTreeMap<[u8; 32], (usize, &'v Descriptor)>,
        measured: Vec<Measurement>,
    }
    let mut candidates: BTreeMap<IdentityKey, Candidate> = BTreeMap::new();
    for v in votes {
        for ((d, digest), m) in v
            .descriptors
            .iter()
            .zip(&v.descriptor_digests)
            .zip(&v.vote.measurements)
        {
            if !d.sphinx_keys.iter().any(|k| k.epoch == epoch) {
                continue;
            }
            let c = candidates.entry(d.identity).or_default();
            c.versions.entry(*digest).or_insert((0, d)).0 += 1;
            c.measured.push(*m);
        }
    }
    let mut chosen: Vec<(&Descriptor, Measurement)> = Vec::new();
    for c in candidates.values() {
        if c.measured.len() < needed {
            continue;
        }
        // Most votes, then latest published, then smallest digest (compared reversed, so
        // the smallest is the greatest).
        let best = c
            .versions
            .iter()
            .max_by(|(da, (na, a)), (db, (nb, b))| {
                na.cmp(nb)
                    .then(a.published.cmp(&b.published))
                    .then(db.cmp(da))
            })
            .map(|(_, (_, d))| *d);
        if let Some(d) = best {
            let weight = low_median(c.measured.iter().map(|m| m.weight)).min(d.bandwidth);
            let performance = low_median(c.measured.iter().map(|m| m.performance));
            chosen.push((
                d,
                Measurement {
                    weight,
                    performance,
                },
            ));
        }
    }
    let chosen = keep_heaviest(chosen, params.relays_per_address, MAX_RELAYS);

    let mixes: Vec<IdentityKey> = chosen
        .iter()
        .filter(|(d, _)| d.roles.mix)
        .map(|(d, _)| d.identity)
        .collect();
    let layers = assign_layers(&mixes, previous);
    let listed: BTreeMap<IdentityKey, &Descriptor> =
        chosen.iter().map(|(d, _)| (d.identity, *d)).collect();
    let relays = chosen
        .iter()
        .map(|(d, m)| ConsensusRelay {
            identity: d.identity,
            family: d.family.clone(),
            addresses: d.addresses,
            roles: d.roles,
            layer: layers.get(&d.identity).copied(),
            link_key: d.link_key,
            sphinx_keys: d.sphinx_keys.clone(),
            exit_policy: d.exit_policy.clone(),
            price_per_packet: d.price_per_packet,
            bandwidth: d.bandwidth,
            family_members: d
                .family_members
                .iter()
                .filter(|other| {
                    listed
                        .get(other)
                        .is_some_and(|o| o.family_members.contains(&d.identity))
                })
                .copied()
                .collect(),
            chain_address: d.chain_address,
            weight: m.weight,
            performance: m.performance,
        })
        .collect();
    let times = ValidityTimes::for_epoch(epoch, params.epoch_length_s);
    let consensus = Consensus {
        schema: DIRECTORY_SCHEMA,
        epoch,
        valid_after: times.valid_after,
        fresh_until: times.fresh_until,
        valid_until: times.valid_until,
        params,
        relays,
    };
    consensus.validate()?;
    Ok(consensus)
}

/// The lower of the two middle values (the middle one of an odd count); 0 when empty.
fn low_median<T: Ord + Copy + Default>(values: impl Iterator<Item = T>) -> T {
    let mut xs: Vec<T> = values.collect();
    xs.sort_unstable();
    xs.get(xs.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// One parameter from the votes' values (see the module notes): the previous value clamped
/// into the range a strict majority backs on both sides, or the low median.
fn majority_value<T: Copy + PartialOrd>(
    mut xs: Vec<T>,
    needed: usize,
    previous: Option<T>,
    cmp: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Option<T> {
    xs.sort_by(&cmp);
    let k = xs.len();
    let median = *xs.get(k.saturating_sub(1) / 2)?;
    let (Some(&lo), Some(&hi)) = (
        xs.get(k.saturating_sub(needed)),
        xs.get(needed.saturating_sub(1).min(k.saturating_sub(1))),
    ) else {
        return Some(median);
    };
    // With at most as many votes as authorities, lo ≤ hi; keep the median if not.
    if cmp(&lo, &hi) == std::cmp::Ordering::Greater {
        return Some(median);
    }
    Some(match previous {
        Some(p) if cmp(&p, &lo) == std::cmp::Ordering::Less => lo,
        Some(p) if cmp(&p, &hi) == std::cmp::Ordering::Greater => hi,
        Some(p) => p,
        None => median,
    })
}

/// Each parameter by [`majority_value`] (`votes` is not empty).
fn majority_params(
    votes: &[VerifiedVote],
    needed: usize,
    previous: Option<&NetworkParams>,
) -> NetworkParams {
    let f = |get: fn(&NetworkParams) -> f64| {
        let xs = votes.iter().map(|v| get(&v.vote.params)).collect();
        majority_value(xs, needed, previous.map(get), f64::total_cmp).unwrap_or(0.0)
    };
    let u = |get: fn(&NetworkParams) -> u64| {
        let xs = votes.iter().map(|v| get(&v.vote.params)).collect();
        majority_value(xs, needed, previous.map(get), u64::cmp).unwrap_or(0)
    };
    NetworkParams {
        lambda_p: f(|p| p.lambda_p),
        lambda_l: f(|p| p.lambda_l),
        lambda_d: f(|p| p.lambda_d),
        lambda_m: f(|p| p.lambda_m),
        mu: f(|p| p.mu),
        max_hop_delay_ms: u(|p| p.max_hop_delay_ms),
        epoch_length_s: u(|p| p.epoch_length_s),
        relays_per_address: u32::try_from(u(|p| u64::from(p.relays_per_address))).unwrap_or(1),
    }
}

/// Keeps at most `per_address` relays per address and `total` in all, the heaviest first
/// (ties: smallest identity); returns them sorted by identity. Used by authorities when they
/// vote and by the consensus, so both apply the same rule.
pub fn keep_heaviest(
    mut relays: Vec<(&Descriptor, Measurement)>,
    per_address: u32,
    total: usize,
) -> Vec<(&Descriptor, Measurement)> {
    relays.sort_by(|(a, ma), (b, mb)| {
        mb.weight
            .cmp(&ma.weight)
            .then_with(|| a.identity.cmp(&b.identity))
    });
    let mut at_address: BTreeMap<(u8, u128), u32> = BTreeMap::new();
    let mut kept = Vec::with_capacity(relays.len().min(total));
    for (d, m) in relays {
        if kept.len() >= total {
            break;
        }
        let n = at_address
            .entry(address_key(d.addresses.mix.ip()))
            .or_default();
        if *n >= per_address {
            continue;
        }
        *n += 1;
        kept.push((d, m));
    }
    kept.sort_by_key(|(d, _)| d.identity);
    kept
}

/// Assigns each mix (sorted by identity) a layer: balanced by count, keeping previous layers
/// where the balance allows.
pub fn assign_layers(
    mixes: &[IdentityKey],
    previous: Option<&Consensus>,
) -> BTreeMap<IdentityKey, Layer> {
    let before = |id: &IdentityKey| -> Option<usize> {
        previous
            .and_then(|p| p.relay(id))
            .and_then(|r| r.layer)
            .map(usize::from)
            .filter(|l| (1..=LAYERS).contains(l))
            .map(|l| l - 1)
    };
    // Sizes: q each, and the r = n mod 3 extra places go to the layers the most previous
    // members want to stay in (lowest layer first among equals).
    let n = mixes.len();
    let mut wanting = [0usize; LAYERS];
    for id in mixes {
        if let Some(l) = before(id) {
            wanting[l] += 1;
        }
    }
    let mut order: Vec<usize> = (0..LAYERS).collect();
    order.sort_by(|&a, &b| wanting[b].cmp(&wanting[a]).then(a.cmp(&b)));
    let mut target = [n / LAYERS; LAYERS];
    for &l in order.iter().take(n % LAYERS) {
        target[l] += 1;
    }

    let mut count = [0usize; LAYERS];
    let mut out = BTreeMap::new();
    let mut displaced = Vec::new();
    for id in mixes {
        match before(id) {
            Some(l) if count[l] < target[l] => {
                count[l] += 1;
                out.insert(*id, layer_number(l));
            }
            _ => displaced.push(*id),
        }
    }
    for id in displaced {
        // The layer with the most room; `max_by_key` keeps the last maximum, so iterate
        // from the top layer down to prefer the lowest among equals.
        let l = (0..LAYERS)
            .rev()
            .max_by_key(|&l| target[l].saturating_sub(count[l]))
            .unwrap_or(0);
        count[l] += 1;
        out.insert(id, layer_number(l));
    }
    out
}

fn layer_number(index: usize) -> Layer {
    Layer::try_from(index + 1).unwrap_or(1)
}
