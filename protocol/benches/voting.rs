//! `cargo bench -p murmur-protocol --bench voting`: what an authority spends per round on a
//! network of 1,000 relays and 3 authorities: verifying one peer's vote (1,000 descriptor
//! signatures) and computing the consensus from three votes (medians of the measurements,
//! mutual families, the per-address limit); and the Sybil flood: three votes of 10,000
//! descriptors over three disjoint sets of 5,000, so 15,000 relays qualify and the consensus
//! keeps the heaviest 10,000.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use murmur_protocol::directory::consensus::compute_consensus;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate, signed_descriptors};
use murmur_protocol::directory::{
    AuthoritySet, IdentityKey, MAX_RELAYS, Measurement, NetworkParams, SignedDescriptor,
    SignedVote, VerifiedVote, Vote, encode,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn benches(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let epoch = 1_500_000;
    let net = SyntheticNetwork {
        mixes_per_layer: 320,
        gateways: 20,
        exits: 20,
        params: NetworkParams::nym_like(),
        epoch,
    };
    let (consensus, keys) = generate(&mut rng, &net);
    let descriptors = signed_descriptors(&consensus, &keys, &[epoch, epoch + 1], 1).unwrap();
    let authorities: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut rng)).collect();
    let set = AuthoritySet::new(authorities.iter().map(IdentityKey::of).collect()).unwrap();
    // Each authority measured each relay a little differently.
    let measured =
        |descriptors: &[SignedDescriptor], a: usize| -> Vec<(SignedDescriptor, Measurement)> {
            descriptors
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let weight = 100 + ((i * 7 + a * 13) % 900) as u32;
                    (
                        d.clone(),
                        Measurement {
                            weight,
                            performance: 1000 - (a as u16) * 10,
                        },
                    )
                })
                .collect()
        };
    let votes: Vec<SignedVote> = authorities
        .iter()
        .enumerate()
        .map(|(a, k)| {
            let v = Vote::new(
                IdentityKey::of(k),
                epoch,
                0,
                net.params,
                measured(&descriptors, a),
            );
            SignedVote::sign(&v.unwrap(), k).unwrap()
        })
        .collect();
    println!(
        "vote of 1,000 descriptors: {} bytes",
        encode(&votes[0]).unwrap().len()
    );
    c.bench_function("verify a vote (1,000 descriptors)", |b| {
        b.iter(|| votes[0].verify(&set, Some(epoch)).unwrap())
    });
    let verified: Vec<VerifiedVote> = votes
        .iter()
        .map(|v| v.verify(&set, Some(epoch)).unwrap())
        .collect();
    c.bench_function("compute consensus (3 votes, 1,000 relays)", |b| {
        b.iter(|| compute_consensus(&set, epoch, &verified, Some(&consensus)).unwrap())
    });

    // The flood: 15,000 relays, each in two of the three votes.
    let flood = SyntheticNetwork {
        mixes_per_layer: 5_000,
        gateways: 0,
        exits: 0,
        params: NetworkParams::nym_like(),
        epoch,
    };
    let (big, big_keys) = generate(&mut rng, &flood);
    let all = signed_descriptors(&big, &big_keys, &[epoch], 1).unwrap();
    let third = all.len() / 3;
    let sets = [&all[..third], &all[third..2 * third], &all[2 * third..]];
    let flood_votes: Vec<VerifiedVote> = authorities
        .iter()
        .enumerate()
        .map(|(a, k)| {
            let mine: Vec<SignedDescriptor> = [sets[a], sets[(a + 1) % 3]].concat();
            let v = Vote::new(IdentityKey::of(k), epoch, 0, net.params, measured(&mine, a));
            SignedVote::sign(&v.unwrap(), k)
                .unwrap()
                .verify(&set, Some(epoch))
                .unwrap()
        })
        .collect();
    let flooded = compute_consensus(&set, epoch, &flood_votes, None).unwrap();
    assert_eq!(flooded.relays.len(), MAX_RELAYS);
    c.bench_function(
        "compute consensus (3 votes of 10,000; 15,000 qualify)",
        |b| b.iter(|| compute_consensus(&set, epoch, &flood_votes, None).unwrap()),
    );
}

criterion_group! {
    name = voting;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(voting);
