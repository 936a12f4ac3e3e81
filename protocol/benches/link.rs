//! `cargo bench -p murmur-protocol --bench link`: the Noise XK links — one whole handshake (both
//! sides, three messages) and sealing and opening one 3,076-byte frame.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use murmur_protocol::frame::FRAME_LEN;
use murmur_protocol::link::{LinkKind, LinkSecret, handshake_in_memory};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn benches(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (a, b) = (
        LinkSecret::generate(&mut rng),
        LinkSecret::generate(&mut rng),
    );
    let mut group = c.benchmark_group("link");
    group.bench_function("handshake", |bench| {
        bench.iter(|| handshake_in_memory(LinkKind::Relay, &a, &b, &mut rng).unwrap())
    });
    let frame = [7u8; FRAME_LEN];
    let (mut sealer, _) = handshake_in_memory(LinkKind::Relay, &a, &b, &mut rng).unwrap();
    group.bench_function("seal_frame", |bench| {
        bench.iter(|| sealer.seal_frame(black_box(&frame)).unwrap())
    });
    // A pair of its own: the listener opens in order what the dialer sealed.
    let (mut dialer, mut listener) =
        handshake_in_memory(LinkKind::Relay, &a, &b, &mut rng).unwrap();
    group.bench_function("seal_and_open_frame", |bench| {
        bench.iter(|| {
            let sealed = dialer.seal_frame(black_box(&frame)).unwrap();
            listener.open_frame(&sealed[..]).unwrap()
        })
    });
    group.finish();
}

criterion_group!(link, benches);
criterion_main!(link);
