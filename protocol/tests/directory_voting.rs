//! Votes, the consensus computation and the client's consensus store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use murmur_protocol::Error;
use murmur_protocol::directory::consensus::{ValidityTimes, assign_layers, compute_consensus};
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate, signed_descriptors};
use murmur_protocol::directory::{
    AuthoritySet, Consensus, ConsensusStore, Descriptor, DocumentKind, IdentityKey, Measurement,
    NetworkParams, Offer, SignedConsensus, SignedDescriptor, SignedVote, VerifiedVote, Vote,
    decode, encode, sign_document,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const EPOCH: u32 = 50;

fn params() -> NetworkParams {
    NetworkParams {
        epoch_length_s: 10,
        ..NetworkParams::nym_like()
    }
}

/// `n` relays (a third each mixes, gateways, exits... as the generator makes them) signed by
/// their own keys, with Sphinx keys for `EPOCH` and the next.
fn relays(seed: u64, mixes_per_layer: usize) -> Vec<(SignedDescriptor, Descriptor)> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let net = SyntheticNetwork {
        mixes_per_layer,
        gateways: 1,
        exits: 1,
        params: params(),
        epoch: EPOCH,
    };
    let (consensus, keys) = generate(&mut rng, &net);
    signed_descriptors(&consensus, &keys, &[EPOCH, EPOCH + 1], 1000)
        .unwrap()
        .into_iter()
        .map(|s| {
            let d = s.verify().unwrap();
            (s, d)
        })
        .collect()
}

struct Authorities {
    keys: Vec<SigningKey>,
    set: AuthoritySet,
}

fn authorities(seed: u64, n: usize) -> Authorities {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let keys: Vec<SigningKey> = (0..n).map(|_| SigningKey::generate(&mut rng)).collect();
    let set = AuthoritySet::new(keys.iter().map(IdentityKey::of).collect()).unwrap();
    Authorities { keys, set }
}

/// Each descriptor with the measurement an authority that tested it would vote.
fn measured(descriptors: Vec<SignedDescriptor>) -> Vec<(SignedDescriptor, Measurement)> {
    descriptors
        .into_iter()
        .map(|d| {
            (
                d,
                Measurement {
                    weight: 500,
                    performance: 1000,
                },
            )
        })
        .collect()
}

fn vote(key: &SigningKey, epoch: u32, descriptors: Vec<SignedDescriptor>) -> SignedVote {
    let v = Vote::new(
        IdentityKey::of(key),
        epoch,
        900,
        params(),
        measured(descriptors),
    )
    .unwrap();
    SignedVote::sign(&v, key).unwrap()
}

fn verified(a: &Authorities, votes: &[SignedVote]) -> Vec<VerifiedVote> {
    votes
        .iter()
        .map(|v| v.verify(&a.set, Some(EPOCH)).unwrap())
        .collect()
}

#[test]
fn votes_verify_and_each_bad_vote_has_its_own_error() {
    let a = authorities(1, 3);
    let rs = relays(2, 2);
    let signed: Vec<SignedDescriptor> = rs.iter().map(|(s, _)| s.clone()).collect();
    let v = vote(&a.keys[0], EPOCH, signed.clone());
    let ok = v.verify(&a.set, Some(EPOCH)).unwrap();
    assert_eq!(ok.descriptors.len(), rs.len());
    assert_eq!(decode::<SignedVote>(&encode(&v).unwrap()).unwrap(), v);

    assert_eq!(
        v.verify(&a.set, Some(EPOCH + 1)).unwrap_err(),
        Error::WrongEpoch {
            expected: EPOCH + 1,
            got: EPOCH
        }
    );
    let stranger = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(9));
    let by_stranger = vote(&stranger, EPOCH, signed.clone());
    assert!(matches!(
        by_stranger.verify(&a.set, None),
        Err(Error::UnknownSigner { .. })
    ));
    let mut tampered = v.clone();
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    assert!(matches!(
        tampered.verify(&a.set, None),
        Err(Error::BodyTampered { .. })
    ));
    let mut forged = v.clone();
    forged.signature.signature[3] ^= 1;
    assert!(matches!(
        forged.verify(&a.set, None),
        Err(Error::ForgedSignature { .. })
    ));
    // A vote carrying a descriptor whose relay signature is bad is refused whole.
    let mut bad_descriptor = signed.clone();
    bad_descriptor[0].signature.signature[0] ^= 1;
    let bad = vote(&a.keys[1], EPOCH, bad_descriptor);
    assert!(matches!(
        bad.verify(&a.set, None),
        Err(Error::ForgedSignature { .. })
    ));
    // Two descriptors of one relay in one vote are refused when the vote is made.
    let mut twice = signed;
    twice.push(twice[0].clone());
    assert!(
        Vote::new(
            IdentityKey::of(&a.keys[0]),
            EPOCH,
            0,
            params(),
            measured(twice)
        )
        .is_err()
    );
}

#[test]
fn a_relay_needs_a_majority_of_configured_authorities() {
    let a = authorities(3, 3);
    let rs = relays(4, 2);
    let all: Vec<SignedDescriptor> = rs.iter().map(|(s, _)| s.clone()).collect();
    // Relay 0 is in one vote only, relay 1 in two, the rest in all three.
    let v0 = vote(&a.keys[0], EPOCH, all.clone());
    let v1 = vote(&a.keys[1], EPOCH, all[1..].to_vec());
    let v2 = vote(&a.keys[2], EPOCH, all[2..].to_vec());
    let votes = verified(&a, &[v0.clone(), v1.clone(), v2]);
    let c = compute_consensus(&a.set, EPOCH, &votes, None).unwrap();
    assert!(c.relay(&rs[0].1.identity).is_none());
    assert!(c.relay(&rs[1].1.identity).is_some());
    assert_eq!(c.relays.len(), rs.len() - 1);
    let t = ValidityTimes::for_epoch(EPOCH, 10);
    assert_eq!(
        (c.valid_after, c.fresh_until, c.valid_until),
        (t.valid_after, t.fresh_until, t.valid_until)
    );
    assert_eq!(
        (t.valid_after, t.fresh_until, t.valid_until),
        (500, 510, 520)
    );

    // Two of three authorities voting is enough; relay 1 is then in both votes.
    let two = verified(&a, &[v0.clone(), v1]);
    let c2 = compute_consensus(&a.set, EPOCH, &two, None).unwrap();
    assert!(c2.relay(&rs[1].1.identity).is_some());
    // One vote is not.
    assert_eq!(
        compute_consensus(&a.set, EPOCH, &verified(&a, &[v0]), None).unwrap_err(),
        Error::NotEnoughVotes {
            votes: 1,
            needed: 2
        }
    );
}

#[test]
fn conflicting_descriptors_resolve_deterministically() {
    let a = authorities(5, 3);
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let key = SigningKey::generate(&mut rng);
    let (_, base) = relays(7, 1).remove(0);
    let d = |published: u64, bandwidth: u32| {
        let mut d = base.clone();
        d.identity = IdentityKey::of(&key);
        d.published = published;
        d.bandwidth = bandwidth;
        SignedDescriptor::sign(&d, &key).unwrap()
    };
    // Most votes wins over later publication.
    let old = d(100, 1);
    let new = d(200, 2);
    let votes = verified(
        &a,
        &[
            vote(&a.keys[0], EPOCH, vec![old.clone()]),
            vote(&a.keys[1], EPOCH, vec![old.clone()]),
            vote(&a.keys[2], EPOCH, vec![new.clone()]),
        ],
    );
    let c = compute_consensus(&a.set, EPOCH, &votes, None).unwrap();
    assert_eq!(c.relays[0].bandwidth, 1);
    // With a tie in votes, the later publication wins, whatever the order.
    let votes = verified(
        &a,
        &[
            vote(&a.keys[0], EPOCH, vec![new.clone()]),
            vote(&a.keys[1], EPOCH, vec![old.clone()]),
        ],
    );
    let c = compute_consensus(&a.set, EPOCH, &votes, None).unwrap();
    assert_eq!(c.relays[0].bandwidth, 2);
    let mut reversed = votes.clone();
    reversed.reverse();
    assert_eq!(
        encode(&compute_consensus(&a.set, EPOCH, &reversed, None).unwrap()).unwrap(),
        encode(&c).unwrap()
    );
    // Same votes and publication time: the smaller digest wins, in either order.
    let x = d(300, 3);
    let y = d(300, 4);
    let pick = |votes: &[SignedVote]| {
        compute_consensus(&a.set, EPOCH, &verified(&a, votes), None)
            .unwrap()
            .relays[0]
            .bandwidth
    };
    let expected = if x.signature.digest < y.signature.digest {
        3
    } else {
        4
    };
    let vx = vote(&a.keys[0], EPOCH, vec![x]);
    let vy = vote(&a.keys[1], EPOCH, vec![y]);
    assert_eq!(pick(&[vx.clone(), vy.clone()]), expected);
    assert_eq!(pick(&[vy, vx]), expected);
}

#[test]
fn relays_without_a_key_for_the_epoch_are_left_out_and_params_are_medians() {
    let a = authorities(8, 3);
    let rs = relays(9, 1);
    let all: Vec<SignedDescriptor> = rs.iter().map(|(s, _)| s.clone()).collect();
    let mk = |k: &SigningKey, lambda_p: f64, epoch_length_s: u64| {
        let p = NetworkParams {
            lambda_p,
            epoch_length_s,
            ..params()
        };
        let v = Vote::new(IdentityKey::of(k), EPOCH + 1, 0, p, measured(all.clone())).unwrap();
        SignedVote::sign(&v, k).unwrap()
    };
    let votes: Vec<VerifiedVote> = [
        mk(&a.keys[0], 1.0, 10),
        mk(&a.keys[1], 100.0, 10),
        mk(&a.keys[2], 3.0, 11),
    ]
    .iter()
    .map(|v| v.verify(&a.set, None).unwrap())
    .collect();
    let c = compute_consensus(&a.set, EPOCH + 1, &votes, None).unwrap();
    assert_eq!(c.params.lambda_p, 3.0);
    assert_eq!(c.params.epoch_length_s, 10);
    assert_eq!(
        c.relays.len(),
        rs.len(),
        "every relay has a key for EPOCH + 1"
    );
    let c = compute_consensus(&a.set, EPOCH + 2, &[], None);
    assert!(matches!(c, Err(Error::NotEnoughVotes { .. })));
    let votes2: Vec<VerifiedVote> = votes
        .into_iter()
        .map(|mut v| {
            v.vote.epoch = EPOCH + 2;
            v
        })
        .collect();
    let c = compute_consensus(&a.set, EPOCH + 2, &votes2, None).unwrap();
    assert!(c.relays.is_empty(), "no relay has a key for EPOCH + 2");
}

fn ids(n: usize, salt: u8) -> Vec<IdentityKey> {
    let mut v: Vec<IdentityKey> = (0..n)
        .map(|i| {
            let mut k = [salt; 32];
            k[0] = (i >> 8) as u8;
            k[1] = i as u8;
            IdentityKey(k)
        })
        .collect();
    v.sort();
    v
}

fn as_consensus(layers: &BTreeMap<IdentityKey, u8>) -> Consensus {
    let (mut c, _) = generate(
        &mut ChaCha20Rng::seed_from_u64(0),
        &SyntheticNetwork {
            mixes_per_layer: 0,
            gateways: 0,
            exits: 0,
            params: params(),
            epoch: EPOCH,
        },
    );
    let (template, _) = relays(10, 1).remove(0);
    let d: Descriptor = decode(&template.body).unwrap();
    c.relays = layers
        .iter()
        .map(|(id, l)| murmur_protocol::directory::ConsensusRelay {
            identity: *id,
            family: d.family.clone(),
            addresses: d.addresses,
            roles: d.roles,
            layer: Some(*l),
            link_key: d.link_key,
            sphinx_keys: d.sphinx_keys.clone(),
            exit_policy: d.exit_policy.clone(),
            price_per_packet: 1,
            bandwidth: 1,
            family_members: Vec::new(),
            chain_address: None,
            weight: 1,
            performance: 1000,
        })
        .collect();
    c
}

fn layer_sizes(layers: &BTreeMap<IdentityKey, u8>) -> [usize; 3] {
    let mut s = [0; 3];
    for l in layers.values() {
        s[usize::from(*l) - 1] += 1;
    }
    s
}

fn signed_consensus(a: &Authorities, c: &Consensus, signers: usize) -> SignedConsensus {
    let mut doc = SignedConsensus::unsigned(c).unwrap();
    for k in &a.keys[..signers] {
        doc.add_signature(sign_document(DocumentKind::Consensus, &doc.body, k));
    }
    doc
}

#[test]
fn the_store_keeps_its_last_good_document_until_it_expires() {
    let a = authorities(11, 3);
    let rs = relays(12, 1);
    let all: Vec<SignedDescriptor> = rs.iter().map(|(s, _)| s.clone()).collect();
    let votes: Vec<SignedVote> = a.keys.iter().map(|k| vote(k, EPOCH, all.clone())).collect();
    let c = compute_consensus(&a.set, EPOCH, &verified(&a, &votes), None).unwrap();
    let mut store = ConsensusStore::new(a.set.clone(), 2);
    assert_eq!(store.current(500).unwrap_err(), Error::NoConsensus);
    assert!(store.needs_refresh(500));

    // Under-signed: refused, nothing held.
    assert!(matches!(
        store.offer(signed_consensus(&a, &c, 1), 501),
        Err(Error::NotEnoughSignatures { .. })
    ));
    assert_eq!(
        store.offer(signed_consensus(&a, &c, 2), 501).unwrap(),
        Offer::Installed { epoch: EPOCH }
    );
    // The same document with more signatures replaces it; the same again does not.
    assert_eq!(
        store.offer(signed_consensus(&a, &c, 3), 502).unwrap(),
        Offer::Installed { epoch: EPOCH }
    );
    assert_eq!(store.held().unwrap().signers.len(), 3);
    assert_eq!(
        store.offer(signed_consensus(&a, &c, 2), 502).unwrap(),
        Offer::NotNewer {
            held: EPOCH,
            offered: EPOCH
        }
    );
    assert!(!store.needs_refresh(509));
    assert!(store.needs_refresh(510));

    // A tampered newer document is refused and the held one stays.
    let mut next = c.clone();
    next.epoch += 1;
    let t = ValidityTimes::for_epoch(next.epoch, 10);
    (next.valid_after, next.fresh_until, next.valid_until) =
        (t.valid_after, t.fresh_until, t.valid_until);
    let mut tampered = signed_consensus(&a, &next, 3);
    tampered.body = encode(&c).unwrap();
    assert!(store.offer(tampered, 511).is_err());
    assert_eq!(store.current(511).unwrap().consensus.epoch, EPOCH);

    // Valid until 520, plus 2 s of skew.
    assert!(store.current(522).is_ok());
    assert_eq!(
        store.current(523).unwrap_err(),
        Error::Expired {
            valid_until: 520,
            now: 523
        }
    );
    // A newer good document replaces it; an older one is not newer.
    assert_eq!(
        store.offer(signed_consensus(&a, &next, 2), 512).unwrap(),
        Offer::Installed { epoch: EPOCH + 1 }
    );
    assert_eq!(
        store.offer(signed_consensus(&a, &c, 3), 512).unwrap(),
        Offer::NotNewer {
            held: EPOCH + 1,
            offered: EPOCH
        }
    );
    assert_eq!(store.held_signed().unwrap().signatures.len(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn votes_round_trip(seed in any::<u64>(), n in 0usize..4, epoch in any::<u32>(), published in any::<u64>()) {
        let a = authorities(seed, 1);
        let all: Vec<SignedDescriptor> = relays(seed, n).into_iter().map(|(s, _)| s).collect();
        let v = Vote::new(IdentityKey::of(&a.keys[0]), epoch, published, params(), measured(all)).unwrap();
        prop_assert_eq!(decode::<Vote>(&encode(&v).unwrap()).unwrap(), v.clone());
        let signed = SignedVote::sign(&v, &a.keys[0]).unwrap();
        prop_assert_eq!(decode::<SignedVote>(&encode(&signed).unwrap()).unwrap(), signed.clone());
        prop_assert_eq!(signed.verify(&a.set, Some(epoch)).unwrap().vote, v);
    }

    /// Which votes carry which relay is random; the result does not depend on vote order,
    /// holds exactly the relays a majority carries, and its layers are balanced.
    #[test]
    fn consensus_is_deterministic_majority_and_balanced(
        seed in any::<u64>(),
        carried in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 3), 5..14),
        voters in 2usize..=3,
    ) {
        let a = authorities(seed, 3);
        let rs = relays(seed ^ 1, 3); // 11 relays
        let mut votes = Vec::new();
        for (i, k) in a.keys.iter().enumerate().take(voters) {
            let ds: Vec<SignedDescriptor> = rs.iter().zip(&carried)
                .filter(|(_, c)| c[i]).map(|((s, _), _)| s.clone()).collect();
            votes.push(vote(k, EPOCH, ds));
        }
        let vv = verified(&a, &votes);
        let c = compute_consensus(&a.set, EPOCH, &vv, None).unwrap();
        let mut rev = vv.clone();
        rev.reverse();
        let c2 = compute_consensus(&a.set, EPOCH, &rev, None).unwrap();
        prop_assert_eq!(encode(&c).unwrap(), encode(&c2).unwrap());
        for ((_, d), cv) in rs.iter().zip(&carried) {
            let n = cv.iter().take(voters).filter(|x| **x).count();
            prop_assert_eq!(c.relay(&d.identity).is_some(), n >= 2);
        }
        let mut sizes = [0usize; 3];
        for r in &c.relays {
            prop_assert_eq!(r.layer.is_some(), r.roles.mix);
            if let Some(l) = r.layer { sizes[usize::from(l) - 1] += 1; }
        }
        prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{:?}", sizes);
    }

    /// Layers stay balanced whatever the previous assignment, and when the previous consensus
    /// was balanced and none of its mixes left, every one of them keeps its layer.
    #[test]
    fn layers_are_balanced_and_stable(
        before in 0usize..40, added in 0usize..40, removed in 0usize..40, seed in any::<u64>(),
    ) {
        let old = ids(before, 1);
        let prev = as_consensus(&assign_layers(&old, None));
        // Grow: all old mixes stay.
        let mut grown = old.clone();
        grown.extend(ids(added, 2));
        grown.sort();
        let layers = assign_layers(&grown, Some(&prev));
        let s = layer_sizes(&layers);
        prop_assert!(s.iter().max().unwrap() - s.iter().min().unwrap() <= 1, "{:?}", s);
        for r in &prev.relays {
            prop_assert_eq!(layers.get(&r.identity).copied(), r.layer);
        }
        // Shrink by a seed-chosen subset: still balanced, every mix has a layer.
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut shrunk = grown.clone();
        for _ in 0..removed.min(shrunk.len()) {
            let i = rand::RngExt::random_range(&mut rng, 0..shrunk.len());
            shrunk.remove(i);
        }
        let layers2 = assign_layers(&shrunk, Some(&as_consensus(&layers)));
        let s2 = layer_sizes(&layers2);
        prop_assert_eq!(layers2.len(), shrunk.len());
        prop_assert!(s2.iter().max().unwrap() - s2.iter().min().unwrap() <= 1, "{:?}", s2);
        // Recomputing from its own output changes nothing.
        prop_assert_eq!(assign_layers(&shrunk, Some(&as_consensus(&layers2))), layers2);
    }

    /// Whatever sequence of documents is offered, the held epoch never goes back, and what
    /// is held always verified.
    #[test]
    fn the_store_never_goes_back(offers in proptest::collection::vec((0u32..5, 0usize..=3, 0u64..60), 1..20)) {
        let a = authorities(13, 3);
        let mut store = ConsensusStore::new(a.set.clone(), 1);
        let base = {
            let rs = relays(14, 1);
            let all: Vec<SignedDescriptor> = rs.into_iter().map(|(s, _)| s).collect();
            let votes: Vec<SignedVote> = a.keys.iter().map(|k| vote(k, EPOCH, all.clone())).collect();
            compute_consensus(&a.set, EPOCH, &verified(&a, &votes), None).unwrap()
        };
        let mut held: Option<u32> = None;
        for (de, signers, dt) in offers {
            let mut c = base.clone();
            c.epoch = EPOCH + de;
            let t = ValidityTimes::for_epoch(c.epoch, 10);
            (c.valid_after, c.fresh_until, c.valid_until) = (t.valid_after, t.fresh_until, t.valid_until);
            let now = 500 + dt;
            let res = store.offer(signed_consensus(&a, &c, signers), now);
            let fits = signers >= 2 && now + 1 >= t.valid_after && now <= t.valid_until + 1;
            prop_assert_eq!(res.is_ok(), fits, "{:?}", res);
            if let Ok(Offer::Installed { epoch }) = res {
                prop_assert!(held.is_none_or(|h| epoch >= h));
                held = Some(epoch);
            }
            prop_assert_eq!(store.held().map(|v| v.consensus.epoch), held);
        }
    }
}
