//! The directory against Sybils and one bad authority: measured weights, mutual families, the
//! per-address limit, truncation instead of failure, and parameters a single authority cannot
//! move.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use murmur_protocol::directory::consensus::compute_consensus;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate, signed_descriptors};
use murmur_protocol::directory::{
    AuthoritySet, Consensus, Descriptor, IdentityKey, MAX_RELAYS, Measurement, NetworkParams,
    SignedDescriptor, SignedVote, VerifiedVote, Vote, decode, encode,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const EPOCH: u32 = 70;

fn params() -> NetworkParams {
    NetworkParams {
        epoch_length_s: 10,
        ..NetworkParams::nym_like()
    }
}

fn keys(seed: u64, n: usize) -> (Vec<SigningKey>, AuthoritySet) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let keys: Vec<SigningKey> = (0..n).map(|_| SigningKey::generate(&mut rng)).collect();
    let set = AuthoritySet::new(keys.iter().map(IdentityKey::of).collect()).unwrap();
    (keys, set)
}

fn descriptors(seed: u64, mixes_per_layer: usize) -> Vec<SignedDescriptor> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let net = SyntheticNetwork {
        mixes_per_layer,
        gateways: 1,
        exits: 1,
        params: params(),
        epoch: EPOCH,
    };
    let (c, k) = generate(&mut rng, &net);
    signed_descriptors(&c, &k, &[EPOCH], 1).unwrap()
}

/// A verified vote by `key` with `params`, measuring each descriptor by `measure`.
fn vote(
    key: &SigningKey,
    set: &AuthoritySet,
    params: NetworkParams,
    descriptors: &[SignedDescriptor],
    measure: impl Fn(usize, &SignedDescriptor) -> Measurement,
) -> VerifiedVote {
    let relays = descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| (d.clone(), measure(i, d)))
        .collect();
    let v = Vote::new(IdentityKey::of(key), EPOCH, 0, params, relays).unwrap();
    SignedVote::sign(&v, key)
        .unwrap()
        .verify(set, Some(EPOCH))
        .unwrap()
}

fn m(weight: u32) -> Measurement {
    Measurement {
        weight,
        performance: 1000,
    }
}

/// Re-signs `d` with its fields changed by `change`.
fn resign(
    d: &SignedDescriptor,
    key: &SigningKey,
    change: impl Fn(&mut Descriptor),
) -> SignedDescriptor {
    let mut body: Descriptor = decode(&d.body).unwrap();
    change(&mut body);
    SignedDescriptor::sign(&body, key).unwrap()
}

#[test]
fn a_claim_never_lifts_a_relay_above_what_a_majority_measured() {
    let (ks, set) = keys(1, 3);
    let ds = descriptors(2, 2);
    // The authorities measured 100, 300 and 900 of every relay; one of them (the bad one)
    // reports u32::MAX for relay 0.
    let votes: Vec<VerifiedVote> = [100u32, 300, 900]
        .iter()
        .zip(&ks)
        .enumerate()
        .map(|(a, (&w, k))| {
            vote(k, &set, params(), &ds, |i, _| {
                m(if a == 2 && i == 0 { u32::MAX } else { w })
            })
        })
        .collect();
    let c = compute_consensus(&set, EPOCH, &votes, None).unwrap();
    // The low median of three, capped by the claim (1,000 for generated relays).
    assert!(
        c.relays.iter().all(|r| r.weight == 300),
        "{:?}",
        c.relays.iter().map(|r| r.weight).collect::<Vec<_>>()
    );
    // With only two votes the lower one is taken: one authority can lower a weight, never
    // raise it.
    let c = compute_consensus(&set, EPOCH, &votes[1..], None).unwrap();
    assert!(c.relays.iter().all(|r| r.weight == 300));
}

#[test]
fn families_count_only_when_both_relays_name_each_other() {
    let (ks, set) = keys(3, 3);
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let net = SyntheticNetwork {
        mixes_per_layer: 2,
        gateways: 1,
        exits: 1,
        params: params(),
        epoch: EPOCH,
    };
    let (c, k) = generate(&mut rng, &net);
    let mut ds = signed_descriptors(&c, &k, &[EPOCH], 1).unwrap();
    let id = |i: usize| c.relays[i].identity;
    // 0 and 1 name each other; 2 names 3, which does not name it back (a Sybil trying to
    // split 3 from honest paths, or to claim it).
    ds[0] = resign(&ds[0], &k[0].identity, |d| d.family_members = vec![id(1)]);
    ds[1] = resign(&ds[1], &k[1].identity, |d| d.family_members = vec![id(0)]);
    ds[2] = resign(&ds[2], &k[2].identity, |d| d.family_members = vec![id(3)]);
    let votes: Vec<VerifiedVote> = ks
        .iter()
        .map(|key| vote(key, &set, params(), &ds, |_, _| m(500)))
        .collect();
    let c2 = compute_consensus(&set, EPOCH, &votes, None).unwrap();
    let members = |i: usize| c2.relay(&id(i)).unwrap().family_members.clone();
    assert_eq!(members(0), vec![id(1)]);
    assert_eq!(members(1), vec![id(0)]);
    assert!(members(2).is_empty(), "a one-sided claim is dropped");
    assert!(members(3).is_empty());
}

/// Three disjoint sets of 5,000 descriptors, each uploaded to a different pair of
/// authorities: every one of the 15,000 relays is in two votes of three. Before, the
/// consensus failed ("more than 10,000 relays qualify") and the network stopped; now the
/// heaviest 10,000 are kept, the same on every authority, and honest relays measured heavier
/// than the flood are all among them.
#[test]
fn fifteen_thousand_qualifying_relays_make_a_consensus_of_the_heaviest() {
    let (ks, set) = keys(5, 3);
    let honest = descriptors(6, 3); // 11 relays
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let flood = SyntheticNetwork {
        mixes_per_layer: 5_000,
        gateways: 0,
        exits: 0,
        params: params(),
        epoch: EPOCH,
    };
    let (fc, fk) = generate(&mut rng, &flood);
    let sybils = signed_descriptors(&fc, &fk, &[EPOCH], 1).unwrap();
    let honest_ids: Vec<IdentityKey> = honest.iter().map(|d| d.signature.signer).collect();
    let third = sybils.len() / 3;
    let sets = [
        &sybils[..third],
        &sybils[third..2 * third],
        &sybils[2 * third..],
    ];
    let votes: Vec<VerifiedVote> = ks
        .iter()
        .enumerate()
        .map(|(a, key)| {
            // Each vote: two of the three Sybil sets (4,000 of 10,000 slots go to honest
            // relays and the flood's remainder), plus every honest relay.
            let mut mine: Vec<SignedDescriptor> = [sets[a], sets[(a + 1) % 3]].concat();
            mine.truncate(MAX_RELAYS - honest.len());
            mine.extend(honest.iter().cloned());
            vote(key, &set, params(), &mine, |_, d| {
                m(if honest_ids.contains(&d.signature.signer) {
                    900
                } else {
                    50
                })
            })
        })
        .collect();
    let c = compute_consensus(&set, EPOCH, &votes, None).unwrap();
    assert!(c.relays.len() <= MAX_RELAYS);
    for id in &honest_ids {
        assert!(c.relay(id).is_some(), "an honest relay was pushed out");
    }
    // The same bytes whatever order the votes come in.
    let mut reversed = votes.clone();
    reversed.reverse();
    let again = compute_consensus(&set, EPOCH, &reversed, None).unwrap();
    assert_eq!(encode(&c).unwrap(), encode(&again).unwrap());
}

#[test]
fn one_authority_cannot_turn_cover_off_or_hold_packets_for_an_hour() {
    let (ks, set) = keys(8, 3);
    let ds = descriptors(9, 1);
    let honest = params();
    // A vote with λ_P = 0 or a one-hour delay cap is refused when it is verified, so it never
    // reaches the computation.
    for bad in [
        NetworkParams {
            lambda_p: 0.0,
            ..honest
        },
        NetworkParams {
            max_hop_delay_ms: 3_600_000,
            ..honest
        },
        NetworkParams {
            lambda_l: 0.0,
            ..honest
        },
    ] {
        let relays = ds.iter().map(|d| (d.clone(), m(10))).collect();
        assert!(Vote::new(IdentityKey::of(&ks[2]), EPOCH, 0, bad, relays).is_err());
        // Signed by hand (a modified authority would), it does not verify either.
        let mut v = Vote::new(
            IdentityKey::of(&ks[2]),
            EPOCH,
            0,
            honest,
            ds.iter().map(|d| (d.clone(), m(10))).collect(),
        )
        .unwrap();
        v.params = bad;
        let body = encode(&v).unwrap();
        let forged = SignedVote {
            signature: murmur_protocol::directory::sign_document(
                murmur_protocol::directory::DocumentKind::Vote,
                &body,
                &ks[2],
            ),
            body,
        };
        assert!(forged.verify(&set, Some(EPOCH)).is_err());
        // Nor does a consensus carrying such parameters, at a client.
        let mut c: Consensus = compute_consensus(
            &set,
            EPOCH,
            &[
                vote(&ks[0], &set, honest, &ds, |_, _| m(10)),
                vote(&ks[1], &set, honest, &ds, |_, _| m(10)),
            ],
            None,
        )
        .unwrap();
        assert_eq!(c.params, honest);
        c.params = bad;
        assert!(c.validate().is_err());
    }
}

#[test]
fn with_one_honest_authority_down_the_bad_one_cannot_move_any_parameter() {
    let (ks, set) = keys(10, 3);
    let ds = descriptors(11, 1);
    let honest = params();
    let previous = compute_consensus(
        &set,
        EPOCH,
        &[
            vote(&ks[0], &set, honest, &ds, |_, _| m(10)),
            vote(&ks[1], &set, honest, &ds, |_, _| m(10)),
            vote(&ks[2], &set, honest, &ds, |_, _| m(10)),
        ],
        None,
    )
    .unwrap();
    // Authority 1 is down; authority 2 votes the least cover and the longest delays the
    // bounds allow. Before, the "low median" of two votes was the minimum: its values won.
    let bad = NetworkParams {
        lambda_p: 0.01,
        lambda_l: 0.001,
        lambda_d: 0.001,
        lambda_m: 0.0,
        mu: 0.1,
        max_hop_delay_ms: 60_000,
        epoch_length_s: honest.epoch_length_s,
        relays_per_address: 16,
    };
    let votes = [
        vote(&ks[0], &set, honest, &ds, |_, _| m(10)),
        vote(&ks[2], &set, bad, &ds, |_, _| m(10)),
    ];
    let c = compute_consensus(&set, EPOCH, &votes, Some(&previous)).unwrap();
    assert_eq!(c.params, honest);
    // When a majority moves a parameter, it moves.
    let raised = NetworkParams {
        lambda_p: 80.0,
        ..honest
    };
    let votes = [
        vote(&ks[0], &set, raised, &ds, |_, _| m(10)),
        vote(&ks[1], &set, raised, &ds, |_, _| m(10)),
        vote(&ks[2], &set, bad, &ds, |_, _| m(10)),
    ];
    let c = compute_consensus(&set, EPOCH, &votes, Some(&previous)).unwrap();
    assert_eq!(c.params.lambda_p, 80.0);
    assert_eq!(c.params.mu, honest.mu);
}
