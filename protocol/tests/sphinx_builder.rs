//! Murmur's Sphinx builder (`protocol/src/sphinx_builder.rs`) against sphinx-packet's own:
//! for random routes, delays, destinations and payloads, built from the same secret, every
//! hop (processed by the pinned sphinx-packet, as relays do) gives the same next hop, delay,
//! replay tag and payload, the final hop the same delivery, and the packets agree byte for
//! byte wherever sphinx-packet's construction is deterministic (everything but the final
//! hop's random padding and the MACs over it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, PublicKey, RouteHop, StaticSecret, SurbId, build_packet,
    build_packet_with_tags,
};
use murmur_protocol::surb::build_reply_block_with_id;
use murmur_protocol::{HEADER_SIZE, MAX_ROUTE_LEN, PAYLOAD_SIZE, PLAINTEXT_SIZE};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sphinx_packet::SphinxPacketBuilder;
use sphinx_packet::constants::{FINAL_NODE_META_INFO_LENGTH, NODE_META_INFO_SIZE};
use sphinx_packet::header::delays::Delay;
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use sphinx_packet::surb::{SURB, SURBMaterial};
use sphinx_packet::version::SINGLE_SEED_SURB_VERSION;

/// One hop's meta information and MAC in the routing information.
const STEP: usize = NODE_META_INFO_SIZE + 16;
/// Where the routing information starts in a header (after α and the MAC).
const ROUTING_AT: usize = 32 + 16;

struct Route {
    secrets: Vec<StaticSecret>,
    hops: Vec<RouteHop>,
    delays: Vec<Duration>,
}

fn route(seed: u64, len: usize, delays_ms: &[u32]) -> Route {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let secrets: Vec<StaticSecret> = (0..len)
        .map(|_| StaticSecret::random_from_rng(&mut rng))
        .collect();
    let hops = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| RouteHop {
            address: Address([i as u8 + 1; 32]),
            sphinx_key: PublicKey::from(s),
        })
        .collect();
    let delays = delays_ms
        .iter()
        .take(len)
        .map(|ms| Duration::from_millis(u64::from(*ms)))
        .collect();
    Route {
        secrets,
        hops,
        delays,
    }
}

/// sphinx-packet's view of the route, with Murmur's envelope bit in the delays.
fn nodes_and_delays(route: &Route, envelope_bit: bool) -> (Vec<Node>, Vec<Delay>) {
    let nodes = route
        .hops
        .iter()
        .map(|h| Node::new(NodeAddressBytes::from_bytes(h.address.0), h.sphinx_key))
        .collect();
    let delays = route
        .delays
        .iter()
        .map(|d| {
            let nanos = d.as_nanos() as u64;
            Delay::new_from_nanos(if envelope_bit { nanos | 1 } else { nanos & !1 })
        })
        .collect();
    (nodes, delays)
}

/// What a packet shows at each hop, processed as a relay processes it.
#[derive(Debug, PartialEq)]
enum Seen {
    Forward {
        tag: [u8; 32],
        next_hop: Address,
        delay: Duration,
        envelope_authenticated: bool,
        payload: Vec<u8>,
    },
    Final {
        tag: [u8; 32],
        destination: Address,
        surb_id: SurbId,
        payload: Vec<u8>,
    },
}

fn walk(route: &Route, bytes: &[u8]) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut bytes = bytes.to_vec();
    for secret in &route.secrets {
        let opened = OpenedPacket::open(&bytes, secret).expect("every hop opens the packet");
        let tag = opened.replay_tag().0;
        match opened
            .process(Duration::MAX)
            .expect("every hop processes it")
        {
            HopOutput::Forward {
                next_hop,
                delay,
                envelope_authenticated,
                packet,
                ..
            } => {
                bytes = packet.as_bytes().to_vec();
                seen.push(Seen::Forward {
                    tag,
                    next_hop,
                    delay,
                    envelope_authenticated,
                    payload: bytes[HEADER_SIZE..].to_vec(),
                });
            }
            HopOutput::Final(d) => {
                seen.push(Seen::Final {
                    tag,
                    destination: d.destination,
                    surb_id: d.surb_id,
                    payload: d.payload.to_vec(),
                });
                return seen;
            }
        }
    }
    seen
}

/// The header bytes sphinx-packet fixes given the secret: α, and each layer's meta
/// information (flag, version, next hop, delay; the final hop's destination and identifier).
fn deterministic_parts(header: &[u8], hops: usize) -> Vec<u8> {
    let mut out = header[..32].to_vec();
    for j in 0..hops - 1 {
        let at = ROUTING_AT + j * STEP;
        out.extend_from_slice(&header[at..at + NODE_META_INFO_SIZE]);
    }
    let at = ROUTING_AT + (hops - 1) * STEP;
    out.extend_from_slice(&header[at..at + FINAL_NODE_META_INFO_LENGTH]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn forward_packets_match_sphinx_packets_own_at_every_hop(
        seed in any::<u64>(),
        hops in 1..=MAX_ROUTE_LEN,
        delays_ms in proptest::collection::vec(0u32..100_000, MAX_ROUTE_LEN),
        destination in any::<[u8; 32]>(),
        surb_id in any::<[u8; 16]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..=PLAINTEXT_SIZE),
    ) {
        let route = route(seed, hops, &delays_ms);
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x5eed);
        // The builder's first draw is the packet's secret: take the same one for theirs.
        let initial = StaticSecret::random_from_rng(&mut rng.clone());
        let ours = build_packet_with_tags(
            &mut rng, &route.hops, &route.delays, Address(destination), surb_id, &plaintext,
        ).unwrap();
        let (nodes, delays) = nodes_and_delays(&route, true);
        let theirs = SphinxPacketBuilder::new()
            .with_payload_size(PAYLOAD_SIZE)
            .with_initial_secret(&initial)
            .build_packet(
                &plaintext,
                &nodes,
                &Destination::new(DestinationAddressBytes::from_bytes(destination), surb_id),
                &delays,
            )
            .unwrap()
            .to_bytes();
        let ours_bytes = ours.packet.as_bytes();
        prop_assert_eq!(
            deterministic_parts(&ours_bytes[..HEADER_SIZE], hops),
            deterministic_parts(&theirs[..HEADER_SIZE], hops)
        );
        prop_assert_eq!(&ours_bytes[HEADER_SIZE..], &theirs[HEADER_SIZE..]);
        let seen = walk(&route, ours_bytes);
        prop_assert_eq!(seen.len(), hops);
        prop_assert_eq!(&seen, &walk(&route, &theirs));
        // The tags handed to the envelope are the ones each hop derives.
        let tags: Vec<[u8; 32]> = seen
            .iter()
            .map(|s| match s { Seen::Forward { tag, .. } | Seen::Final { tag, .. } => *tag })
            .collect();
        let ours_tags: Vec<[u8; 32]> = ours.hop_tags.iter().map(|t| t.0).collect();
        prop_assert_eq!(tags, ours_tags);
    }

    #[test]
    fn reply_blocks_match_sphinx_packets_own_at_every_hop(
        seed in any::<u64>(),
        hops in 1..=MAX_ROUTE_LEN,
        delays_ms in proptest::collection::vec(0u32..100_000, MAX_ROUTE_LEN),
        client in any::<[u8; 32]>(),
        surb_id in any::<[u8; 16]>().prop_filter("non-zero", |id| *id != [0; 16]),
        plaintext in proptest::collection::vec(any::<u8>(), 0..=PLAINTEXT_SIZE),
    ) {
        let route = route(seed, hops, &delays_ms);
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x5eb);
        let initial = StaticSecret::random_from_rng(&mut rng.clone());
        let (block, key) = build_reply_block_with_id(
            &mut rng, &route.hops, &route.delays, Address(client), 1, surb_id,
        ).unwrap();
        let (nodes, delays) = nodes_and_delays(&route, false);
        let material = SURBMaterial::new(
            nodes,
            delays,
            Destination::new(DestinationAddressBytes::from_bytes(client), surb_id),
            SINGLE_SEED_SURB_VERSION,
        );
        let (theirs, _) = SURB::new_recoverable(initial, material).unwrap();
        let ours_block = block.to_bytes();
        let theirs_block = theirs.to_bytes();
        // A block: the key epoch (4 bytes), the header, the first hop, the last hop's seed.
        prop_assert_eq!(
            deterministic_parts(&ours_block[4..4 + HEADER_SIZE], hops),
            deterministic_parts(&theirs_block[..HEADER_SIZE], hops)
        );
        prop_assert_eq!(&ours_block[4 + HEADER_SIZE..], &theirs_block[HEADER_SIZE..]);

        let ours_reply = block.use_block(&plaintext).unwrap();
        let (theirs_reply, first_hop) = theirs.use_surb(&plaintext, PAYLOAD_SIZE).unwrap();
        prop_assert_eq!(ours_reply.first_hop, Address(first_hop.to_bytes()));
        let theirs_bytes = theirs_reply.to_bytes();
        let ours_bytes = ours_reply.packet.as_bytes();
        prop_assert_eq!(&ours_bytes[HEADER_SIZE..], &theirs_bytes[HEADER_SIZE..]);
        let seen = walk(&route, ours_bytes);
        prop_assert_eq!(&seen, &walk(&route, &theirs_bytes));
        // And the reply opens for the block's maker.
        let Some(Seen::Final { payload, surb_id: at_gateway, .. }) = seen.last() else {
            panic!("the reply never reached its last hop: {seen:?}");
        };
        prop_assert_eq!(*at_gateway, surb_id);
        prop_assert_eq!(key.open(payload).unwrap(), plaintext);
    }
}

#[test]
fn build_packet_and_build_packet_with_tags_give_the_same_packet() {
    // build_packet (no tags) takes the same path: same secret, same hops, same output.
    let route = route(3, 3, &[5, 10, 15]);
    let mut a = ChaCha20Rng::seed_from_u64(4);
    let mut b = a.clone();
    let plain = build_packet(
        &mut a,
        &route.hops,
        &route.delays,
        Address([9; 32]),
        [1; 16],
        b"x",
    )
    .unwrap();
    let tagged = build_packet_with_tags(
        &mut b,
        &route.hops,
        &route.delays,
        Address([9; 32]),
        [1; 16],
        b"x",
    )
    .unwrap();
    assert_eq!(plain.as_bytes(), tagged.packet.as_bytes());
}
