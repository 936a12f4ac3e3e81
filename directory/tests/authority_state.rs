//! The authority state machine without I/O: three authorities exchange votes, compute and
//! exchange signatures in every order; they always agree byte for byte and count every
//! signature exactly once, whether it arrived before or after they computed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use murmur_directory::SignatureUpload;
use murmur_directory::authority::{Accepted, Authority, AuthorityPolicy};
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate, signed_descriptors};
use murmur_protocol::directory::{
    AuthoritySet, DocumentSignature, IdentityKey, NetworkParams, decode, encode,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const EPOCH: u32 = 1000;
const LEN: u64 = 10;
/// 80% into the epoch before `EPOCH`.
const NOW: u64 = (EPOCH as u64 - 1) * LEN + 8;

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
