//! `cargo bench -p murmur-protocol --bench directory`: verifying a signed consensus and
//! choosing paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use murmur_protocol::directory::path::{PathRules, PathSelector};
use murmur_protocol::directory::sign::Freshness;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
use murmur_protocol::directory::{
    AuthoritySet, DocumentKind, IdentityKey, NetworkParams, SignedConsensus, sign_document,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn benches(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    // 1,000 relays: 3 layers of 320 mixes, 20 gateways, 20 exits.
    let net = SyntheticNetwork {
        mixes_per_layer: 320,
        gateways: 20,
        exits: 20,
        params: NetworkParams::nym_like(),
        epoch: 1_500_000,
    };
    let (consensus, _) = generate(&mut rng, &net);
    assert_eq!(consensus.relays.len(), 1000);
    let authorities: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut rng)).collect();
    let set = AuthoritySet::new(authorities.iter().map(IdentityKey::of).collect()).unwrap();
    let mut signed = SignedConsensus::unsigned(&consensus).unwrap();
    for a in &authorities {
        signed.add_signature(sign_document(DocumentKind::Consensus, &signed.body, a));
    }
    let at = Freshness {
        now: consensus.valid_after + 1,
        expected_epoch: Some(consensus.epoch),
        clock_skew_s: 60,
    };
    println!("consensus of 1,000 relays: {} bytes", signed.body.len());
    c.bench_function("verify consensus (1,000 relays, 3 signatures)", |b| {
        b.iter(|| signed.verify(&set, black_box(at)).unwrap())
    });

    let selector = PathSelector::new(&consensus, PathRules::default());
    let gateway = selector.choose_gateway(&mut rng).unwrap();
    c.bench_function("choose a 3-mix path (1,000 relays)", |b| {
        b.iter(|| selector.mix_path(&mut rng, &[gateway]).unwrap())
    });
}

criterion_group! {
    name = directory;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(directory);
