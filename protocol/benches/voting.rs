//! `cargo bench -p murmur-protocol --bench voting`: what an authority spends per round on a
//! network of 1,000 relays and 3 authorities: verifying one peer's vote (1,000 descriptor
//! signatures) and computing the consensus from three votes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use murmur_protocol::directory::consensus::compute_consensus;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate, signed_descriptors};
use murmur_protocol::directory::{
    AuthoritySet, IdentityKey, NetworkParams, SignedVote, VerifiedVote, Vote, encode,
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
    let votes: Vec<SignedVote> = authorities
        .iter()
        .map(|k| {
            let v = Vote::new(
                IdentityKey::of(k),
                epoch,
                0,
                net.params,
                descriptors.clone(),
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
}

criterion_group! {
    name = voting;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(voting);
