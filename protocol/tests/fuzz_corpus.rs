//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`) on stable, so CI exercises
//! the parsers with the inputs the fuzzers found interesting, plus seeds built here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use murmur_protocol::control::Control;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
use murmur_protocol::directory::{
    Descriptor, DocumentKind, EpochKey, ExitPolicy, IdentityKey, NetworkParams, RelayAddresses,
    Roles, SignedConsensus, SignedDescriptor, encode, sign_document,
};
use murmur_protocol::envelope::{
    Envelope, EnvelopeKey, SlotTicket, build_envelope, encode_slot_content,
};
use murmur_protocol::fragment::split_message;
use murmur_protocol::frame::Frame;
use murmur_protocol::fuzz_entry::{self, TARGETS};
use murmur_protocol::packet::{Address, PublicKey, ReplayTag, RouteHop, build_packet};
use murmur_protocol::payload::Content;
use murmur_protocol::replay::ReplayFilter;
use murmur_protocol::surb::build_reply_block;
use murmur_protocol::ticket::{Ticket, TicketFields, commitment_of};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// Valid inputs for each target, so every replay starts past the first parse.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let hop = RouteHop {
        address: Address([3; 32]),
        sphinx_key: PublicKey::from(&fuzz_entry::packet_key()),
    };
    let route = vec![hop.clone(), hop];
    let (block, _) =
        build_reply_block(&mut rng, &route, &[Duration::ZERO; 2], Address([4; 32]), 5).unwrap();
    let packet = build_packet(
        &mut rng,
        &route,
        &[Duration::ZERO; 2],
        Address([4; 32]),
        [0; 16],
        b"seed",
    )
    .unwrap();
    match target {
        "frame" => vec![
            Frame::Control(b"hello".to_vec()).encode().unwrap().to_vec(),
            Frame::Packet {
                key_epoch: 3,
                packet: packet.clone(),
                envelope: Envelope::random(&mut rng),
            }
            .encode()
            .unwrap()
            .to_vec(),
        ],
        "packet" => vec![packet.as_bytes().to_vec()],
        "content" => {
            let fragment = split_message(9, b"seed message", 100).unwrap().remove(0);
            vec![
                Content::DataWithAck {
                    ack: block,
                    fragment: fragment.clone(),
                }
                .encode()
                .unwrap(),
                Content::Data { fragment }.encode().unwrap(),
            ]
        }
        "reply_block" => vec![block.to_bytes().to_vec()],
        "replay_filter" => vec![ReplayFilter::new(100, 0.01).unwrap().to_bytes()],
        "reassembly" => {
            let mut out = Vec::new();
            for f in split_message(1, &[7; 40], 10).unwrap() {
                let mut b = Vec::new();
                f.encode_into(&mut b);
                out.push(5);
                out.push(b.len() as u8);
                out.extend(b);
            }
            vec![out]
        }
        "consensus" => {
            let net = SyntheticNetwork {
                mixes_per_layer: 2,
                gateways: 1,
                exits: 1,
                params: NetworkParams::nym_like(),
                epoch: 0,
            };
            let (consensus, _) = generate(&mut rng, &net);
            let mut doc = SignedConsensus::unsigned(&consensus).unwrap();
            for key in fuzz_entry::authority_keys() {
                doc.add_signature(sign_document(DocumentKind::Consensus, &doc.body, &key));
            }
            vec![encode(&doc).unwrap()]
        }
        "descriptor" => {
            let key = &fuzz_entry::authority_keys()[0];
            let descriptor = Descriptor {
                schema: murmur_protocol::directory::DIRECTORY_SCHEMA,
                identity: IdentityKey::of(key),
                family: "seed".into(),
                family_members: Vec::new(),
                addresses: RelayAddresses {
                    mix: "127.0.0.1:1789".parse().unwrap(),
                    client: None,
                },
                roles: Roles {
                    mix: true,
                    ..Roles::default()
                },
                link_key: murmur_protocol::link::LinkPublic([4; 32]),
                sphinx_keys: vec![EpochKey {
                    epoch: 1,
                    key: [5; 32],
                    payment_commitment: commitment_of(&[6; 32]),
                }],
                exit_policy: ExitPolicy::reject_all(),
                price_per_packet: 1,
                bandwidth: 10,
                published: 0,
            };
            vec![encode(&SignedDescriptor::sign(&descriptor, key).unwrap()).unwrap()]
        }
        "exit_policy" => {
            vec![b"accept *:443, reject 10.0.0.0/8:*\naccept6 [2001:db8::]/32:80-81 # c".to_vec()]
        }
        "ticket" => vec![seed_ticket().encode().to_vec()],
        "envelope_peel" => {
            // A replay tag, then a built one-hop envelope the tag's key opens, or a slot's
            // content with and without a ticket.
            let tag = [8u8; 32];
            let key = EnvelopeKey::from_replay_tag(&ReplayTag(tag));
            let slot = SlotTicket::from_ticket(&seed_ticket()).unwrap();
            let envelope = build_envelope(&mut rng, &[key], &[Some(slot)]).unwrap();
            let with = |bytes: &[u8]| [&tag[..], bytes].concat();
            vec![
                with(envelope.as_bytes()),
                with(&encode_slot_content(Some(&slot))),
                with(&encode_slot_content(None)),
            ]
        }
        "control" => {
            vec![
                Control::Hello {
                    address: Address([8; 32]),
                }
                .encode(),
                Control::Welcome { queued: 3 }.encode(),
                Control::Payment {
                    ticket: seed_ticket(),
                }
                .encode(),
                Control::PaymentRefused { reason: 7 }.encode(),
                Control::Cutoff.encode(),
            ]
        }
        // No alteration; then the first message, the answer, a frame each way.
        "link" => [
            [1, 0, 0, 0, 0],
            [2, 0, 0, 7, 1],
            [3, 1, 0, 40, 0x80],
            [4, 3, 1, 0, 2],
            [5, 4, 0, 9, 4],
        ]
        .iter()
        .map(|h| h.to_vec())
        .collect(),
        other => panic!("no seeds for {other}"),
    }
}

fn seed_ticket() -> Ticket {
    let payer = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let fields = TicketFields {
        recipient: IdentityKey([6; 32]),
        face_value: 1_000,
        win_ratio: u64::MAX / 2,
        nonce: [7; 16],
        issued: 1_000,
        expiry: 2_000,
        commitment: commitment_of(&[0; 32]),
    };
    Ticket::sign(fields, &payer)
}

#[test]
fn every_target_replays_its_corpus_and_seeds() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for target in TARGETS {
        let mut inputs = seeds(target);
        if let Ok(dir) = std::fs::read_dir(root.join(target)) {
            for entry in dir {
                inputs.push(std::fs::read(entry.unwrap().path()).unwrap());
            }
        }
        for input in &inputs {
            fuzz_entry::run(target, input);
            // Truncations and single-bit flips of each input, too.
            fuzz_entry::run(target, &input[..input.len() / 2]);
            for at in [0, input.len() / 3, input.len().saturating_sub(1)] {
                let mut flipped = input.clone();
                if let Some(b) = flipped.get_mut(at) {
                    *b ^= 0x41;
                }
                fuzz_entry::run(target, &flipped);
            }
        }
    }
}
