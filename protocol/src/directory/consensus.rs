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
//! - Parameters are the per-field low median of the votes' parameters, so no single
//!   authority moves them.
//! - Mix layers are balanced by count (sizes differ by at most one) and stable: a relay
//!   keeps its layer from the previous consensus while that layer has room, ties broken by
//!   identity; new and displaced relays go to the layer with the most room, lowest first.
//! - Times: valid-after is the epoch's start, fresh-until the next epoch's start, and
//!   valid-until [`VALID_EPOCHS`] epochs after valid-after (Tor's shape: a client that cannot
//!   fetch a newer document may keep using this one for one more epoch).

use std::collections::BTreeMap;

use super::sign::{AuthoritySet, IdentityKey};
use super::vote::VerifiedVote;
use super::{
    Consensus, ConsensusRelay, DIRECTORY_SCHEMA, Descriptor, Epoch, LAYERS, Layer, MAX_RELAYS,
    NetworkParams, UnixTime,
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

    let params = median_params(votes);

    // For each relay: each distinct descriptor (by digest) and the votes carrying it.
    let mut candidates: BTreeMap<IdentityKey, BTreeMap<[u8; 32], (usize, &Descriptor)>> =
        BTreeMap::new();
    for v in votes {
        for (d, digest) in v.descriptors.iter().zip(&v.descriptor_digests) {
            if !d.sphinx_keys.iter().any(|k| k.epoch == epoch) {
                continue;
            }
            let entry = candidates
                .entry(d.identity)
                .or_default()
                .entry(*digest)
                .or_insert((0, d));
            entry.0 += 1;
        }
    }
    let mut chosen: Vec<&Descriptor> = Vec::new();
    for versions in candidates.values() {
        let carried: usize = versions.values().map(|(n, _)| n).sum();
        if carried < needed {
            continue;
        }
        // Most votes, then latest published, then smallest digest (compared reversed, so
        // the smallest is the greatest).
        let best = versions
            .iter()
            .max_by(|(da, (na, a)), (db, (nb, b))| {
                na.cmp(nb)
                    .then(a.published.cmp(&b.published))
                    .then(db.cmp(da))
            })
            .map(|(_, (_, d))| *d);
        if let Some(d) = best {
            chosen.push(d);
        }
    }
    if chosen.len() > MAX_RELAYS {
        return Err(Error::Document(format!(
            "{} relays qualify; a consensus lists at most {MAX_RELAYS}",
            chosen.len()
        )));
    }

    let mixes: Vec<IdentityKey> = chosen
        .iter()
        .filter(|d| d.roles.mix)
        .map(|d| d.identity)
        .collect();
    let layers = assign_layers(&mixes, previous);
    let relays = chosen
        .into_iter()
        .map(|d| ConsensusRelay {
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

/// The low median of each parameter over the votes (`votes` is not empty).
fn median_params(votes: &[VerifiedVote]) -> NetworkParams {
    let f = |get: fn(&NetworkParams) -> f64| {
        let mut xs: Vec<f64> = votes.iter().map(|v| get(&v.vote.params)).collect();
        xs.sort_by(f64::total_cmp);
        xs.get((xs.len().saturating_sub(1)) / 2)
            .copied()
            .unwrap_or(0.0)
    };
    let u = |get: fn(&NetworkParams) -> u64| {
        let mut xs: Vec<u64> = votes.iter().map(|v| get(&v.vote.params)).collect();
        xs.sort_unstable();
        xs.get((xs.len().saturating_sub(1)) / 2)
            .copied()
            .unwrap_or(0)
    };
    NetworkParams {
        lambda_p: f(|p| p.lambda_p),
        lambda_l: f(|p| p.lambda_l),
        lambda_d: f(|p| p.lambda_d),
        lambda_m: f(|p| p.lambda_m),
        mu: f(|p| p.mu),
        max_hop_delay_ms: u(|p| p.max_hop_delay_ms),
        epoch_length_s: u(|p| p.epoch_length_s),
    }
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
