//! `cargo bench -p murmur-protocol --bench envelope`: tickets and the per-hop payment envelope.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::envelope::{EnvelopeKey, SlotTicket, build_envelope, peel_in_place};
use murmur_protocol::packet::{
    Address, PublicKey, ReplayTag, RouteHop, StaticSecret, build_packet, build_packet_with_envelope,
};
use murmur_protocol::ticket::{Ticket, TicketFields, commitment_of};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn fields() -> TicketFields {
    TicketFields {
        recipient: IdentityKey([2; 32]),
        face_value: 1_000_000,
        win_ratio: u64::MAX / 1000,
        nonce: [3; 16],
        issued: 1_700_000_000,
        expiry: 1_700_086_400,
        commitment: commitment_of(&[4; 32]),
    }
}

fn benches(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let payer = SigningKey::from_bytes(&[1; 32]);
    let ticket = Ticket::sign(fields(), &payer);

    let mut group = c.benchmark_group("ticket");
    group.bench_function("sign", |b| {
        b.iter(|| Ticket::sign(black_box(fields()), &payer))
    });
    group.bench_function("verify", |b| {
        b.iter(|| black_box(&ticket).verify_signature().unwrap())
    });
    group.finish();

    let keys: Vec<EnvelopeKey> = (0..4)
        .map(|_| {
            let mut tag = [0u8; 32];
            rng.fill_bytes(&mut tag);
            EnvelopeKey::from_replay_tag(&ReplayTag(tag))
        })
        .collect();
    let slot = SlotTicket::from_ticket(&ticket).unwrap();
    let slots = [Some(slot); 4];
    let envelope = build_envelope(&mut rng, &keys, &slots).unwrap();

    let mut group = c.benchmark_group("envelope");
    group.bench_function("derive_key", |b| {
        b.iter(|| EnvelopeKey::from_replay_tag(black_box(&ReplayTag([5; 32]))))
    });
    group.bench_function("build_4_tickets", |b| {
        b.iter(|| build_envelope(&mut rng, &keys, black_box(&slots)).unwrap())
    });
    group.bench_function("peel", |b| {
        b.iter(|| black_box(&envelope).peel(&keys[0], true).unwrap())
    });
    group.bench_function("peel_in_place", |b| {
        b.iter_batched_ref(
            || *envelope.as_bytes(),
            |bytes| peel_in_place(bytes, &keys[0], true).unwrap(),
            BatchSize::SmallInput,
        )
    });

    // What the sender pays: the packet alone, then with every hop's tag and the envelope.
    let secrets: Vec<StaticSecret> = (0..4)
        .map(|_| StaticSecret::random_from_rng(&mut rng))
        .collect();
    let route: Vec<RouteHop> = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| RouteHop {
            address: Address([i as u8 + 1; 32]),
            sphinx_key: PublicKey::from(s),
        })
        .collect();
    let delays = [Duration::from_millis(15); 4];
    let plaintext = [0x5a; 1000];
    group.bench_function("build_packet_without_envelope_4_hops", |b| {
        b.iter(|| {
            build_packet(
                &mut rng,
                &route,
                &delays,
                Address([9; 32]),
                [0; 16],
                black_box(&plaintext),
            )
            .unwrap()
        })
    });
    group.bench_function("build_packet_with_envelope_4_hops", |b| {
        b.iter(|| {
            build_packet_with_envelope(
                &mut rng,
                &route,
                &delays,
                Address([9; 32]),
                [0; 16],
                black_box(&plaintext),
                &slots,
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(envelope, benches);
criterion_main!(envelope);
