//! The authority state machine without I/O: three authorities exchange votes, compute and
//! exchange signatures in every order; they always agree byte for byte and count every
//! signature exactly once, whether it arrived before or after they computed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use murmur_directory::SignatureUpload;
use murmur_directory::authority::{Accepted, Authority, AuthorityPolicy};
use murmur_directory::probes::{ProbeRound, ProbeRules};
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate, signed_descriptors};
use murmur_protocol::directory::{
    AuthoritySet, DIRECTORY_SCHEMA, Descriptor, DocumentSignature, EpochKey, ExitPolicy,
    IdentityKey, Measurement, NetworkParams, RelayAddresses, Roles, SignedDescriptor, Vote, decode,
    encode,
};
use murmur_protocol::link::LinkPublic;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const EPOCH: u32 = 1000;
const LEN: u64 = 10;
/// 80% into the epoch before `EPOCH`.
const NOW: u64 = (EPOCH as u64 - 1) * LEN + 8;

/// A round in which the relay proved its key and carried every test packet.
const PASSED: ProbeRound = ProbeRound {
    handshake: true,
    sent: 8,
    returned: 8,
    rate: Some(300),
};

/// What the daemon's defaults give, with short descriptor lifetimes.
fn policy() -> AuthorityPolicy {
    AuthorityPolicy {
        max_price_per_packet: 100,
        descriptor_lifetime_s: 3600,
        allow_private_addresses: true,
        clock_skew_s: 1,
        max_descriptors: 20_000,
        probing: true,
        probe_rules: ProbeRules {
            history: 8,
            min_performance: 500,
            unmeasured_weight: 20,
        },
        probe_packets: 8,
    }
}

fn authorities(seed: u64, holds: &[[bool; 3]]) -> Vec<Authority> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let keys: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut rng)).collect();
    let set = AuthoritySet::new(keys.iter().map(IdentityKey::of).collect()).unwrap();
    let params = NetworkParams {
        epoch_length_s: LEN,
        ..NetworkParams::nym_like()
    };
    let net = SyntheticNetwork {
        mixes_per_layer: 2,
        gateways: 1,
        exits: 1,
        params,
        epoch: EPOCH,
    };
    let (c, k) = generate(&mut rng, &net);
    let descriptors = signed_descriptors(&c, &k, &[EPOCH, EPOCH + 1], NOW - 1).unwrap();
    let policy = AuthorityPolicy {
        max_price_per_packet: 100,
        descriptor_lifetime_s: 3600,
        allow_private_addresses: false,
        clock_skew_s: 1,
        ..policy()
    };
    keys.into_iter()
        .enumerate()
        .map(|(i, key)| {
            let mut a = Authority::new(key, set.clone(), params, policy.clone()).unwrap();
            for (d, h) in descriptors.iter().zip(holds) {
                if h[i] {
                    assert_eq!(
                        a.accept_descriptor(d.clone(), NOW).unwrap(),
                        Accepted::Stored
                    );
                    a.record_probe(&d.signature.signer, PASSED);
                }
            }
            a
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Compute(usize),
    Deliver { from: usize, to: usize },
}

fn events() -> Vec<Event> {
    let mut v: Vec<Event> = (0..3).map(Event::Compute).collect();
    for from in 0..3 {
        for to in 0..3 {
            if from != to {
                v.push(Event::Deliver { from, to });
                v.push(Event::Deliver { from, to }); // and a retry
            }
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn authorities_agree_and_count_each_signature_once(
        seed in any::<u64>(),
        holds in proptest::collection::vec(any::<[bool; 3]>(), 8),
        order in Just(events()).prop_shuffle(),
    ) {
        let mut auths = authorities(seed, &holds);
        // Votes: everyone gets everyone's.
        let votes: Vec<_> = auths.iter_mut().map(|a| a.make_vote(EPOCH, NOW).unwrap()).collect();
        let set = auths[0].authorities().clone();
        for a in auths.iter_mut() {
            for v in &votes {
                let verified = v.verify(&set, Some(EPOCH)).unwrap();
                let r = a.accept_vote(v.clone(), verified, NOW).unwrap();
                prop_assert!(matches!(r, Accepted::Stored | Accepted::Duplicate));
            }
        }
        let mut sigs: Vec<Option<DocumentSignature>> = vec![None; 3];
        let mut queue: std::collections::VecDeque<Event> = order.into();
        let mut steps = 0;
        while let Some(e) = queue.pop_front() {
            steps += 1;
            prop_assert!(steps < 1000);
            match e {
                Event::Compute(i) => sigs[i] = Some(auths[i].compute(EPOCH).unwrap()),
                Event::Deliver { from, to } => match &sigs[from] {
                    None => queue.push_back(e), // not signed yet
                    Some(sig) => {
                        // Over the wire, as the daemon sends it.
                        let up: SignatureUpload = decode(&encode(&SignatureUpload {
                            epoch: EPOCH,
                            signature: sig.clone(),
                        }).unwrap()).unwrap();
                        let r = auths[to].accept_signature(up.epoch, up.signature, NOW).unwrap();
                        prop_assert!(matches!(r, Accepted::Stored | Accepted::Pending | Accepted::Duplicate));
                    }
                },
            }
        }
        let body = &auths[0].signed(EPOCH).unwrap().body;
        for a in &auths {
            let doc = a.published(EPOCH).unwrap();
            prop_assert_eq!(&doc.body, body);
            prop_assert_eq!(doc.signatures.len(), 3);
            // Not valid until the epoch starts.
            prop_assert!(a.latest(NOW).is_none());
            prop_assert!(a.latest(NOW + 2).is_some());
        }
    }
}

#[test]
fn bad_signatures_and_late_votes_are_refused_with_reasons() {
    // Relay 0 is known to authorities 0 and 1 only.
    let mut holds = vec![[true; 3]; 8];
    holds[0] = [true, true, false];
    let mut auths = authorities(1, &holds);
    let votes: Vec<_> = auths
        .iter_mut()
        .map(|a| a.make_vote(EPOCH, NOW).unwrap())
        .collect();
    let set = auths[0].authorities().clone();
    let v1 = votes[1].verify(&set, None).unwrap();
    assert_eq!(
        auths[0]
            .accept_vote(votes[1].clone(), v1.clone(), NOW)
            .unwrap(),
        Accepted::Stored
    );
    // A vote for the current epoch is not taken.
    let stale = auths[0]
        .accept_vote(votes[1].clone(), v1, NOW + LEN)
        .unwrap_err();
    assert_eq!(stale.reason, "wrong_epoch");
    let sig = auths[0].compute(EPOCH).unwrap();
    // After computing, a missing vote is late.
    let v2 = votes[2].verify(&set, None).unwrap();
    let late = auths[0].accept_vote(votes[2].clone(), v2, NOW).unwrap_err();
    assert_eq!(late.reason, "late_vote");
    // Authority 1 computed from its own vote only (no majority): nothing to sign.
    assert!(auths[1].compute(EPOCH).is_err());
    // A forged signature and a stranger's are refused.
    let mut forged = sig.clone();
    forged.signature[0] ^= 1;
    let r = auths[1].accept_signature(EPOCH, forged, NOW).unwrap_err();
    assert_eq!(r.reason, "forged_signature");
    let stranger = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(5));
    let foreign = murmur_protocol::directory::sign_document(
        murmur_protocol::directory::DocumentKind::Consensus,
        b"x",
        &stranger,
    );
    let r = auths[1].accept_signature(EPOCH, foreign, NOW).unwrap_err();
    assert_eq!(r.reason, "unknown_signer");
    // Authority 2 holding votes 0 and 2 leaves relay 0 out (one vote of two), unlike
    // authority 0 (votes 0 and 1): their signatures do not combine.
    let v0 = votes[0].verify(&set, None).unwrap();
    auths[2].accept_vote(votes[0].clone(), v0, NOW).unwrap();
    auths[2].compute(EPOCH).unwrap();
    let mismatch = auths[2].accept_signature(EPOCH, sig, NOW).unwrap_err();
    assert_eq!(mismatch.reason, "digest_mismatch");
}

/// One authority with the relays of a small generated network, each tested as `round`.
fn one_authority(seed: u64, policy: AuthorityPolicy) -> (Authority, Vec<SignedDescriptor>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let key = SigningKey::generate(&mut rng);
    let set = AuthoritySet::new(vec![IdentityKey::of(&key)]).unwrap();
    let params = NetworkParams {
        epoch_length_s: LEN,
        ..NetworkParams::nym_like()
    };
    let net = SyntheticNetwork {
        mixes_per_layer: 2,
        gateways: 1,
        exits: 1,
        params,
        epoch: EPOCH,
    };
    let (c, k) = generate(&mut rng, &net);
    let descriptors = signed_descriptors(&c, &k, &[EPOCH, EPOCH + 1], NOW - 1).unwrap();
    (
        Authority::new(key, set, params, policy).unwrap(),
        descriptors,
    )
}

fn voted(a: &mut Authority) -> Vec<(IdentityKey, Measurement)> {
    let vote = a.make_vote(EPOCH, NOW).unwrap();
    let v: Vote = decode(&vote.body).unwrap();
    v.descriptors
        .iter()
        .map(|d| d.signature.signer)
        .zip(v.measurements)
        .collect()
}

#[test]
fn only_relays_that_pass_their_tests_are_voted_for_at_their_measured_weight() {
    let (mut a, descriptors) = one_authority(11, policy());
    for d in &descriptors {
        a.accept_descriptor(d.clone(), NOW).unwrap();
    }
    assert!(
        voted(&mut a).is_empty(),
        "nothing tested yet, nothing voted"
    );
    let (good, dropper, silent) = (
        descriptors[0].signature.signer,
        descriptors[1].signature.signer,
        descriptors[2].signature.signer,
    );
    for _ in 0..8 {
        a.record_probe(&good, PASSED);
        a.record_probe(&dropper, PASSED);
    }
    a.record_probe(&silent, ProbeRound::unreachable());
    let v = voted(&mut a);
    assert_eq!(v.len(), 2);
    // Generated relays claim 1,000 packets/s; what was measured (300) is what counts.
    assert!(
        v.iter()
            .all(|(_, m)| m.weight == 300 && m.performance == 1000)
    );
    // It still completes handshakes but drops every packet: out of the next vote.
    let dropped = ProbeRound {
        returned: 0,
        rate: None,
        ..PASSED
    };
    a.record_probe(&dropper, dropped);
    let v = voted(&mut a);
    assert_eq!(v.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![good]);
    // Back once it passes again and its recent record is half good.
    for _ in 0..7 {
        a.record_probe(&dropper, dropped);
    }
    let mut rounds = 0;
    while !voted(&mut a).iter().any(|(id, _)| *id == dropper) {
        a.record_probe(&dropper, PASSED);
        rounds += 1;
        assert!(rounds <= 8);
    }
    assert_eq!(rounds, 4);
}

#[test]
fn an_authority_that_does_not_test_votes_everyone_at_the_small_unmeasured_weight() {
    let (mut a, descriptors) = one_authority(
        12,
        AuthorityPolicy {
            probing: false,
            ..policy()
        },
    );
    for d in &descriptors {
        a.accept_descriptor(d.clone(), NOW).unwrap();
    }
    let v = voted(&mut a);
    assert_eq!(v.len(), descriptors.len());
    assert!(v.iter().all(|(_, m)| m.weight == 20));
}

#[test]
fn a_full_store_makes_room_by_dropping_relays_that_never_passed_a_test() {
    let (mut a, descriptors) = one_authority(
        13,
        AuthorityPolicy {
            max_descriptors: 4,
            ..policy()
        },
    );
    let tested = descriptors[0].signature.signer;
    a.accept_descriptor(descriptors[0].clone(), NOW).unwrap();
    a.record_probe(&tested, PASSED);
    // A flood fills the rest; each newcomer evicts an untested one, never the tested relay.
    for d in &descriptors[1..] {
        assert_eq!(
            a.accept_descriptor(d.clone(), NOW).unwrap(),
            Accepted::Stored
        );
    }
    assert_eq!(a.descriptor_count(), 4);
    assert_eq!(a.take_evicted().len(), descriptors.len() - 4);
    assert!(a.probe_history(&tested).is_some());
    assert!(voted(&mut a).iter().any(|(id, _)| *id == tested));
    // Full of tested relays: a newcomer is refused, not let in at their expense.
    let mut full = one_authority(
        13,
        AuthorityPolicy {
            max_descriptors: 2,
            ..policy()
        },
    )
    .0;
    for d in &descriptors[..2] {
        full.accept_descriptor(d.clone(), NOW).unwrap();
        full.record_probe(&d.signature.signer, PASSED);
    }
    let refused = full
        .accept_descriptor(descriptors[2].clone(), NOW)
        .unwrap_err();
    assert_eq!((refused.reason, refused.status), ("full", 503));
}

#[test]
fn at_most_the_configured_number_of_relays_per_address_are_voted_for() {
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let key = SigningKey::generate(&mut rng);
    let set = AuthoritySet::new(vec![IdentityKey::of(&key)]).unwrap();
    let params = NetworkParams {
        epoch_length_s: LEN,
        relays_per_address: 2,
        ..NetworkParams::nym_like()
    };
    let mut a = Authority::new(key, set, params, policy()).unwrap();
    // Five relays on one IPv4 address, three in one IPv6 /64 (different hosts in it), and
    // one elsewhere; measured weights 100..
    let addrs: Vec<std::net::SocketAddr> = [
        "198.51.100.7:1",
        "198.51.100.7:2",
        "198.51.100.7:3",
        "198.51.100.7:4",
        "198.51.100.7:5",
        "[2001:db8::1]:1",
        "[2001:db8::2]:1",
        "[2001:db8::3]:1",
        "203.0.113.9:1",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    let mut expected_in = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let relay = SigningKey::generate(&mut rng);
        let d = Descriptor {
            schema: DIRECTORY_SCHEMA,
            identity: IdentityKey::of(&relay),
            family: format!("op-{i}"),
            family_members: Vec::new(),
            addresses: RelayAddresses {
                mix: *addr,
                client: None,
            },
            roles: Roles {
                mix: true,
                ..Roles::default()
            },
            link_key: LinkPublic([i as u8; 32]),
            sphinx_keys: vec![EpochKey {
                epoch: EPOCH,
                key: [1; 32],
                payment_commitment: [2; 32],
            }],
            exit_policy: ExitPolicy::reject_all(),
            price_per_packet: 1,
            bandwidth: u32::MAX,
            chain_address: None,
            published: NOW - 1,
        };
        let signed = SignedDescriptor::sign(&d, &relay).unwrap();
        a.accept_descriptor(signed, NOW).unwrap();
        let rate = 100 + i as u32;
        a.record_probe(
            &d.identity,
            ProbeRound {
                rate: Some(rate),
                ..PASSED
            },
        );
        // The two heaviest of each address are kept.
        if matches!(i, 3 | 4 | 6 | 7 | 8) {
            expected_in.push(d.identity);
        }
    }
    let mut v: Vec<IdentityKey> = voted(&mut a).into_iter().map(|(id, _)| id).collect();
    v.sort();
    expected_in.sort();
    assert_eq!(v, expected_in);
}

#[test]
fn untested_relays_are_evicted_in_arrival_order_and_a_tested_one_never() {
    let (mut a, descriptors) = one_authority(
        15,
        AuthorityPolicy {
            max_descriptors: 3,
            ..policy()
        },
    );
    // The honest newcomer arrives first, then the flood (eviction goes by arrival, not by
    // the `published` time an uploader chooses).
    let honest = descriptors[0].signature.signer;
    a.accept_descriptor(descriptors[0].clone(), NOW).unwrap();
    for d in &descriptors[1..3] {
        a.accept_descriptor(d.clone(), NOW).unwrap();
    }
    // Full; the next upload evicts the first arrival (the newcomer, still untested) ...
    a.accept_descriptor(descriptors[3].clone(), NOW).unwrap();
    assert_eq!(a.take_evicted(), vec![honest]);
    // ... unless it was tested in the meantime, as the prober does at once.
    a.accept_descriptor(descriptors[0].clone(), NOW).unwrap();
    a.take_evicted();
    a.record_probe(&honest, PASSED);
    a.accept_descriptor(descriptors[4].clone(), NOW).unwrap();
    let evicted = a.take_evicted();
    assert_eq!(evicted.len(), 1);
    assert_ne!(evicted[0], honest);
}
