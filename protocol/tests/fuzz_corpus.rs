//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`) on stable, so CI exercises
//! the parsers with the inputs the fuzzers found interesting, plus seeds built here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use murmur_protocol::control::Control;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
use murmur_protocol::directory::{
    Descriptor, DocumentKind, EpochKey, ExitPolicy, IdentityKey, NetworkParams, RelayAddresses,
    Roles, SignedConsensus, SignedDescriptor, SignedVote, Vote, encode, sign_document,
};
use murmur_protocol::envelope::{
    Envelope, EnvelopeKey, SlotTicket, build_envelope, encode_slot_content,
};
use murmur_protocol::fragment::{Fragment, split_message};
use murmur_protocol::frame::Frame;
use murmur_protocol::fuzz_entry::{self, TARGETS};
use murmur_protocol::packet::{Address, PublicKey, ReplayTag, RouteHop, build_packet};
use murmur_protocol::payload::Content;
use murmur_protocol::replay::ReplayFilter;
use murmur_protocol::stream::{ClientItem, ClientMessage, ExitItem, ExitMessage, Refusal, Target};
use murmur_protocol::surb::{ReplyBlock, build_reply_block};
use murmur_protocol::ticket::{CoSignature, Ticket, TicketFields, commitment_of};
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
        "descriptor" => vec![encode(&seed_descriptor()).unwrap()],
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
            let cosigned = SlotTicket::cosigned(&seed_ticket(), CoSignature([5; 64])).unwrap();
            let with = |bytes: &[u8]| [&tag[..], bytes].concat();
            vec![
                with(envelope.as_bytes()),
                with(&encode_slot_content(Some(&slot))),
                with(&encode_slot_content(Some(&cosigned))),
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
                Control::CosignedPayment {
                    ticket: seed_ticket(),
                    cosignature: CoSignature([6; 64]),
                }
                .encode(),
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
        "socks" => {
            let mut named = vec![3, 5, 2, 0, 2, 1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
            named.extend([5, 1, 0, 3, 11]);
            named.extend(b"example.com");
            named.extend(443u16.to_be_bytes());
            let mut v6 = vec![0, 5, 1, 0, 5, 1, 0, 4];
            v6.extend([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            v6.extend(80u16.to_be_bytes());
            let mut literal = vec![7, 5, 1, 0, 5, 1, 0, 3, 9];
            literal.extend(b"127.0.0.1");
            literal.extend(80u16.to_be_bytes());
            vec![
                named,
                v6,
                literal,
                vec![1, 5, 1, 0, 5, 1, 1, 1, 10, 0, 0, 1, 0, 80], // reserved byte set
                vec![2, 4, 1, 0, 80, 1, 2, 3, 4, 0],              // SOCKS4
                vec![9, 5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80],  // BIND
            ]
        }
        "http_connect" => [
            &b"\x03CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"[..],
            b"\x00CONNECT 127.0.0.1:8443 HTTP/1.1\r\nProxy-Authorization: Basic Ym9iOnB3\r\n\r\n\x16\x03\x01",
            b"\x10CONNECT [2001:db8::1]:443 HTTP/1.0\r\nUser-Agent: curl/8\r\n\r\n",
            b"\x05GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"\x01CONNECT example.com HTTP/1.1\r\n\r\n",
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect(),
        "stream" => {
            let client = ClientMessage {
                session: 0x0102_0304_0506_0708,
                items: vec![
                    ClientItem::Surbs(vec![ReplyBlock::from_bytes(&block.to_bytes()).unwrap()]),
                    ClientItem::Open {
                        stream: 1,
                        target: Target::Host("example.com".into(), 443),
                        window: 2 << 20,
                    },
                    ClientItem::Open {
                        stream: 2,
                        target: Target::Addr("[2001:db8::1]:80".parse().unwrap()),
                        window: 512 << 10,
                    },
                    ClientItem::Data {
                        stream: 1,
                        offset: 0,
                        bytes: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
                    },
                    ClientItem::Fin {
                        stream: 1,
                        offset: 18,
                    },
                    ClientItem::Ack {
                        stream: 1,
                        offset: 5,
                    },
                    ClientItem::Reset { stream: 2 },
                ],
            }
            .encode()
            .unwrap();
            let exit = ExitMessage {
                items: vec![
                    ExitItem::Opened {
                        stream: 1,
                        window: 2 << 20,
                    },
                    ExitItem::Refused {
                        stream: 2,
                        reason: Refusal::NotAllowed,
                    },
                    ExitItem::Data {
                        stream: 1,
                        offset: 0,
                        bytes: b"HTTP/1.0 200 OK".to_vec(),
                    },
                    ExitItem::Fin {
                        stream: 1,
                        offset: 15,
                    },
                    ExitItem::Ack {
                        stream: 1,
                        offset: 18,
                    },
                    ExitItem::Reset {
                        stream: 3,
                        reason: Refusal::TtlExpired,
                    },
                    ExitItem::SurbsHeld { have: 2 },
                ],
            }
            .encode()
            .unwrap();
            let one = |data: &[u8]| Fragment {
                message_id: 4,
                index: 0,
                count: 1,
                data: data.to_vec(),
            };
            vec![
                Content::DataWithAck {
                    ack: block,
                    fragment: one(&client),
                }
                .encode()
                .unwrap(),
                Content::Data {
                    fragment: one(&exit),
                }
                .encode()
                .unwrap(),
                client,
                exit,
            ]
        }
        "vote" => {
            let key = &fuzz_entry::authority_keys()[0];
            let vote = Vote::new(
                IdentityKey::of(key),
                1,
                0,
                NetworkParams::nym_like(),
                vec![(
                    seed_descriptor(),
                    murmur_protocol::directory::Measurement {
                        weight: 10,
                        performance: 1000,
                    },
                )],
            )
            .unwrap();
            vec![encode(&SignedVote::sign(&vote, key).unwrap()).unwrap()]
        }
        // Structure-aware: any bytes are steps; a few fixed streams of them.
        "session" => fuzz_entry::pseudo_random_inputs(6),
        other => panic!("no seeds for {other}"),
    }
}

/// A descriptor of a mix, signed by the first authority key.
fn seed_descriptor() -> SignedDescriptor {
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
        chain_address: None,
        published: 0,
    };
    SignedDescriptor::sign(&descriptor, key).unwrap()
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
    fuzz_entry::replay_targets("murmur_protocol", TARGETS, seeds, fuzz_entry::run);
}

/// Every fuzz target is built (a `[[bin]]` of `fuzz/Cargo.toml`) and calls a `fuzz_entry` of a
/// crate whose corpus replay test runs it.
#[test]
fn every_fuzz_target_is_built_and_replayed() {
    let manifest = std::fs::read_to_string(fuzz_entry::fuzz_dir().join("Cargo.toml")).unwrap();
    let crates = [
        "murmur_protocol",
        "murmur_directory",
        "murmur_ledger",
        "murmur_relay",
        "murmur_client",
    ];
    let mut all: Vec<String> = crates
        .iter()
        .flat_map(|c| fuzz_entry::targets_of(c))
        .collect();
    let files = std::fs::read_dir(fuzz_entry::fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .count();
    assert_eq!(all.len(), files, "a fuzz target calls none of {crates:?}");
    all.sort();
    for name in &all {
        assert!(
            manifest.contains(&format!(
                "name = \"{name}\"\npath = \"fuzz_targets/{name}.rs\""
            )),
            "fuzz target {name} is not a [[bin]] of fuzz/Cargo.toml"
        );
    }
}

/// The failing input of the 2026-12-01 campaign is in the replayed corpus, and passes.
#[test]
fn the_content_finding_is_replayed() {
    let finding = fuzz_entry::fuzz_dir().join("corpus/content/content-decoded-does-not-encode.bin");
    let bytes = std::fs::read(finding).unwrap();
    assert!(Content::decode(&bytes).is_err());
    fuzz_entry::content(&bytes);
}
