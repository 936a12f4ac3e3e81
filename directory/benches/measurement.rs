//! `cargo bench -p murmur-directory --bench measurement`: what testing one relay for one
//! round costs an authority's prober, in CPU and bytes. The relay's side (its half of the
//! handshake, and processing the packets it carries back) is set up outside the timing; an
//! authority's cost per epoch is this round × relays × rounds per epoch.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use murmur_directory::authority::ProbeTarget;
use murmur_directory::prober::ProberKeys;
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{
    DIALER_FINISH_LEN, DIALER_HELLO_LEN, Dialer, LISTENER_HELLO_LEN, LinkKind, LinkSecret,
    Listener, SEALED_FRAME_LEN, TAG_LEN,
};
use murmur_protocol::packet::{HopOutput, OpenedPacket};
use x25519_dalek::{PublicKey, StaticSecret};

const PACKETS: u32 = 16;

fn benches(c: &mut Criterion) {
    let mut rng = rand::rng();
    let prober = ProberKeys::generate();
    let relay_link = LinkSecret::generate(&mut rng);
    let relay_sphinx = StaticSecret::random_from_rng(&mut rng);
    let target = ProbeTarget {
        identity: IdentityKey([7; 32]),
        mix: "127.0.0.1:1".parse().unwrap(),
        link_key: relay_link.public(),
        key_epoch: 1,
        sphinx_key: PublicKey::from(&relay_sphinx).to_bytes(),
    };

    // One link, handshaken in memory, for the packets.
    let handshake = |rng: &mut rand::rngs::ThreadRng| {
        let (dialer, hello) = Dialer::start(
            LinkKind::Relay,
            prober.link_secret(),
            &relay_link.public(),
            rng,
        )
        .unwrap();
        let (listener, answer) =
            Listener::accept(LinkKind::Relay, &relay_link, &hello, rng).unwrap();
        let (dialer_side, last) = dialer.finish(&answer).unwrap();
        (dialer_side, listener.finish(&last).unwrap())
    };
    let (mut to_relay, mut at_relay) = handshake(&mut rng);

    // What the relay sends back: each test packet after the relay's hop, sealed on the
    // relay's link to the prober.
    let (sealed, _) = prober
        .test_packets(&target, PACKETS, &mut to_relay)
        .unwrap();
    let (mut relay_out, mut prober_in) = {
        let (d, hello) = Dialer::start(
            LinkKind::Relay,
            &relay_link,
            &prober.link_public(),
            &mut rng,
        )
        .unwrap();
        let (l, answer) =
            Listener::accept(LinkKind::Relay, prober.link_secret(), &hello, &mut rng).unwrap();
        let (ds, last) = d.finish(&answer).unwrap();
        (ds, l.finish(&last).unwrap())
    };
    let returned: Vec<Vec<u8>> = sealed
        .chunks(SEALED_FRAME_LEN)
        .map(|chunk| {
            let frame = at_relay.open_frame(chunk).unwrap();
            let Frame::Packet {
                key_epoch,
                packet,
                envelope,
            } = Frame::decode(&frame[..]).unwrap()
            else {
                panic!("a test packet is a packet frame")
            };
            let opened = OpenedPacket::open(packet.as_bytes(), &relay_sphinx).unwrap();
            let HopOutput::Forward { packet, .. } = opened.process(Duration::from_secs(1)).unwrap()
            else {
                panic!("the relay forwards a test packet")
            };
            let frame = Frame::Packet {
                key_epoch,
                packet,
                envelope,
            }
            .encode()
            .unwrap();
            relay_out.seal_frame(&frame).unwrap().to_vec()
        })
        .collect();
    let opened_returns: Vec<Vec<u8>> = returned
        .iter()
        .map(|s| prober_in.open_frame(s).unwrap().to_vec())
        .collect();

    let round_bytes = DIALER_HELLO_LEN
        + LISTENER_HELLO_LEN
        + DIALER_FINISH_LEN
        + 2 * PACKETS as usize * SEALED_FRAME_LEN;
    println!(
        "one round of {PACKETS} test packets: {round_bytes} bytes on the wire (handshake \
         {} + {PACKETS} × {SEALED_FRAME_LEN} out + {PACKETS} × {SEALED_FRAME_LEN} back; \
         {TAG_LEN}-byte tags included, TCP/IP headers not)",
        DIALER_HELLO_LEN + LISTENER_HELLO_LEN + DIALER_FINISH_LEN
    );

    c.bench_function("prober: handshake (dialer side)", |b| {
        b.iter(|| {
            let (dialer, hello) = Dialer::start(
                LinkKind::Relay,
                prober.link_secret(),
                &relay_link.public(),
                &mut rand::rng(),
            )
            .unwrap();
            (dialer, hello)
        })
    });
    c.bench_function("prober: build and seal 16 test packets", |b| {
        b.iter(|| {
            prober
                .test_packets(&target, PACKETS, &mut to_relay)
                .unwrap()
        })
    });
    c.bench_function("prober: open 16 returned test packets", |b| {
        b.iter(|| {
            for f in &opened_returns {
                assert!(prober.returned_id(f).is_some());
            }
        })
    });
    c.bench_function("link: seal and open 16 frames", |b| {
        // Sealed and opened in step, so the link's nonces stay in order.
        let (mut d, mut l) = handshake(&mut rand::rng());
        let frame = [0u8; murmur_protocol::frame::FRAME_LEN];
        b.iter(|| {
            for _ in 0..PACKETS {
                let sealed = d.seal_frame(&frame).unwrap();
                l.open_frame(&sealed[..]).unwrap();
            }
        })
    });
}

criterion_group! {
    name = measurement;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(measurement);
