//! `cargo bench -p murmur-protocol`: the cost of Murmur's packet operations, and of
//! sphinx-packet alone for the same hop so the two can be compared in one run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use murmur_protocol::frame::Frame;
use murmur_protocol::hop::{self, Action, HopKey};
use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, PublicKey, ReplayTag, RouteHop, StaticSecret, build_packet,
    build_packet_with_envelope,
};
use murmur_protocol::replay::ReplayFilter;
use murmur_protocol::surb::build_reply_block;
use murmur_protocol::{PAYLOAD_SIZE, PLAINTEXT_SIZE};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sphinx_packet::SphinxPacketBuilder;
use sphinx_packet::header::delays::Delay;
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use sphinx_packet::surb::{SURB, SURBMaterial};
use sphinx_packet::version::SINGLE_SEED_SURB_VERSION;

fn route(rng: &mut ChaCha20Rng) -> (Vec<RouteHop>, Vec<StaticSecret>) {
    let secrets: Vec<StaticSecret> = (0..4)
        .map(|_| StaticSecret::random_from_rng(&mut *rng))
        .collect();
    let hops = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| RouteHop {
            address: Address([i as u8 + 1; 32]),
            sphinx_key: PublicKey::from(s),
        })
        .collect();
    (hops, secrets)
}

fn benches(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let (hops, secrets) = route(&mut rng);
    let delays = [Duration::from_millis(15); 4];
    let plaintext = vec![0x5a; PLAINTEXT_SIZE];
    let dest = Address([9; 32]);

    c.bench_function("build forward packet (4 hops, 2 KB)", |b| {
        b.iter(|| {
            build_packet(
                &mut rng,
                &hops,
                &delays,
                dest,
                [0; 16],
                black_box(&plaintext),
            )
            .unwrap()
        })
    });

    let (packet, envelope) = build_packet_with_envelope(
        &mut rng, &hops, &delays, dest, [0; 16], &plaintext, &[None; 4],
    )
    .unwrap();
    let frame = Frame::Packet {
        key_epoch: 1,
        packet: packet.clone(),
        envelope,
    }
    .encode()
    .unwrap();
    let filter = ReplayFilter::new(10_000_000, 1e-6).unwrap();
    c.bench_function(
        "process one hop (frame decode, open, replay check, process, peel envelope, encode)",
        |b| {
            b.iter_batched(
                || frame.clone(),
                |frame| {
                    let Frame::Packet {
                        key_epoch,
                        packet,
                        envelope,
                    } = Frame::decode(&frame[..]).unwrap()
                    else {
                        unreachable!()
                    };
                    // Fresh tags each time would need fresh packets; the filter lookup is what
                    // costs, so look the tag up and call it new.
                    let mut lookup_only = |tag: &ReplayTag| {
                        black_box(filter.contains(tag));
                        false
                    };
                    let key = HopKey {
                        sphinx: &secrets[0],
                        max_delay: Duration::MAX,
                    };
                    let processed = hop::process(key, &packet, envelope, &mut lookup_only).unwrap();
                    let Action::Forward {
                        packet, envelope, ..
                    } = processed.action
                    else {
                        unreachable!()
                    };
                    Frame::Packet {
                        key_epoch,
                        packet,
                        envelope,
                    }
                    .encode()
                    .unwrap()
                },
                BatchSize::SmallInput,
            )
        },
    );

    let bytes = packet.as_bytes().to_vec();
    c.bench_function(
        "sphinx-packet alone: process one hop (parse, process, serialise)",
        |b| {
            b.iter(|| {
                let p = sphinx_packet::SphinxPacket::from_bytes(black_box(&bytes)).unwrap();
                match p.process(&secrets[0]).unwrap().data {
                    sphinx_packet::ProcessedPacketData::ForwardHop {
                        next_hop_packet, ..
                    } => next_hop_packet.to_bytes(),
                    _ => unreachable!(),
                }
            })
        },
    );

    // Walk the packet to its last hop once, then time the final hop.
    let mut at_exit = packet.clone();
    for s in &secrets[..3] {
        match OpenedPacket::open(at_exit.as_bytes(), s)
            .unwrap()
            .process(Duration::MAX)
            .unwrap()
        {
            HopOutput::Forward { packet, .. } => at_exit = packet,
            HopOutput::Final(_) => unreachable!(),
        }
    }
    c.bench_function("final hop (open, process, recover plaintext)", |b| {
        b.iter(|| {
            let opened = OpenedPacket::open(black_box(at_exit.as_bytes()), &secrets[3]).unwrap();
            match opened.process(Duration::MAX).unwrap() {
                HopOutput::Final(d) => {
                    murmur_protocol::packet::recover_plaintext(&d.payload[..PAYLOAD_SIZE]).unwrap()
                }
                HopOutput::Forward { .. } => unreachable!(),
            }
        })
    });

    let mut filter = ReplayFilter::new(10_000_000, 1e-6).unwrap();
    let mut tag = [0u8; 32];
    c.bench_function(
        "replay filter check-and-insert (sized 10M tags at 1e-6)",
        |b| {
            b.iter(|| {
                rand::Rng::fill_bytes(&mut rng, &mut tag);
                filter.check_and_insert(&ReplayTag(tag))
            })
        },
    );

    c.bench_function("frame decode + encode", |b| {
        b.iter(|| {
            Frame::decode(black_box(&frame[..]))
                .unwrap()
                .encode()
                .unwrap()
        })
    });

    c.bench_function("build one SURB (4 hops)", |b| {
        b.iter(|| build_reply_block(&mut rng, &hops, &delays, dest, 1).unwrap())
    });

    // sphinx-packet's own builder for the same route, in the same run: Murmur's builder
    // (`protocol/src/sphinx_builder.rs`) derives each hop's secret with one multiplication.
    let nodes: Vec<Node> = hops
        .iter()
        .map(|h| Node::new(NodeAddressBytes::from_bytes(h.address.0), h.sphinx_key))
        .collect();
    let sphinx_delays: Vec<Delay> = delays
        .iter()
        .map(|d| Delay::new_from_nanos(d.as_nanos() as u64))
        .collect();
    let destination = Destination::new(DestinationAddressBytes::from_bytes(dest.0), [1; 16]);
    c.bench_function(
        "sphinx-packet alone: build forward packet (4 hops, 2 KB)",
        |b| {
            b.iter(|| {
                let secret = StaticSecret::random_from_rng(&mut rng);
                SphinxPacketBuilder::new()
                    .with_payload_size(PAYLOAD_SIZE)
                    .with_initial_secret(&secret)
                    .build_packet(black_box(&plaintext), &nodes, &destination, &sphinx_delays)
                    .unwrap()
            })
        },
    );
    c.bench_function("sphinx-packet alone: build one SURB (4 hops)", |b| {
        b.iter(|| {
            let material = SURBMaterial::new(
                nodes.clone(),
                sphinx_delays.clone(),
                destination.clone(),
                SINGLE_SEED_SURB_VERSION,
            );
            SURB::new_recoverable(StaticSecret::random_from_rng(&mut rng), material).unwrap()
        })
    });
}

criterion_group! {
    name = packet;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(packet);
