//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable test that replays
//! their corpora (`tests/fuzz_corpus.rs`), so both exercise the same code.
//!
//! Each takes arbitrary bytes and must never panic except on a broken invariant, which the
//! asserts here state (they are the fuzzers' oracles).
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rand::SeedableRng;

use crate::directory::sign::Freshness;
use crate::directory::{
    AuthoritySet, ExitPolicy, IdentityKey, SignedConsensus, SignedDescriptor, decode, encode,
};
use crate::envelope::{
    ENVELOPE_LEN, ENVELOPE_SLOTS, Envelope, EnvelopeKey, SLOT_CONTENT_LEN, build_envelope,
    decode_slot_content, encode_slot_content, peel_in_place,
};
use crate::fragment::{Fragment, Reassembler, ReassemblyLimits};
use crate::frame::Frame;
use crate::packet::{HopOutput, OpenedPacket, ReplayTag, StaticSecret, recover_plaintext};
use crate::payload::Content;
use crate::replay::ReplayFilter;
use crate::surb::ReplyBlock;
use crate::time::Instant;

/// The names of the fuzz targets, one per function below.
pub const TARGETS: &[&str] = &[
    "frame",
    "packet",
    "content",
    "reply_block",
    "replay_filter",
    "reassembly",
    "consensus",
    "descriptor",
    "exit_policy",
    "ticket",
    "control",
    "envelope_peel",
];

/// Runs the target called `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "frame" => frame(data),
        "packet" => packet(data),
        "content" => content(data),
        "reply_block" => reply_block(data),
        "replay_filter" => replay_filter(data),
        "reassembly" => reassembly(data),
        "consensus" => consensus(data),
        "descriptor" => descriptor(data),
        "exit_policy" => exit_policy(data),
        "ticket" => ticket(data),
        "control" => control(data),
        "envelope_peel" => envelope_peel(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// A frame that decodes re-encodes to the same bytes (one encoding per frame).
pub fn frame(data: &[u8]) {
    if let Ok(f) = Frame::decode(data) {
        let again = f.encode().expect("a decoded frame encodes");
        assert_eq!(&again[..], data, "frame encoding is not canonical");
    }
}

/// The fixed key the packet target opens packets with.
pub fn packet_key() -> StaticSecret {
    StaticSecret::from([7u8; 32])
}

/// Opening and processing arbitrary packet bytes returns errors, never panics.
pub fn packet(data: &[u8]) {
    let _ = recover_plaintext(data);
    if let Ok(opened) = OpenedPacket::open(data, &packet_key()) {
        let _ = opened.replay_tag();
        if let Ok(HopOutput::Final(d)) = opened.process(Duration::from_secs(10)) {
            let _ = recover_plaintext(&d.payload[..]);
        }
    }
}

/// Packet plaintext decodes or errors; what decodes re-encodes to the same bytes.
pub fn content(data: &[u8]) {
    if let Ok(c @ (Content::Data { .. } | Content::DataWithAck { .. })) = Content::decode(data) {
        let again = c.encode().expect("a decoded content encodes");
        assert_eq!(again, data, "content encoding is not canonical");
    }
}

/// Reply blocks decode or error; a decoded block re-encodes identically and can be used.
pub fn reply_block(data: &[u8]) {
    if let Ok(b) = ReplyBlock::from_bytes(data) {
        assert_eq!(&b.to_bytes()[..], data);
        let _ = b.use_block(b"fuzz");
    }
}

/// Stored replay filters restore or error.
pub fn replay_filter(data: &[u8]) {
    if let Ok(f) = ReplayFilter::from_bytes(data) {
        assert_eq!(f.to_bytes(), data);
    }
}

/// A stream of `[gap_ms:u8][len:u8][fragment bytes]` records fed to a small reassembler:
/// its bounds hold whatever arrives.
pub fn reassembly(data: &[u8]) {
    let limits = ReassemblyLimits {
        max_partial_messages: 8,
        max_buffered_bytes: 512,
        timeout: Duration::from_millis(100),
        remember_completed: 8,
    };
    let mut r = Reassembler::new(limits.clone());
    let mut now = Instant::ZERO;
    let mut rest = data;
    while let [gap, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (record, tail) = tail.split_at(len);
        rest = tail;
        now = now + Duration::from_millis(u64::from(*gap));
        r.expire(now);
        if let Ok(f) = Fragment::decode(record) {
            let _ = r.insert(f, now);
        }
        assert!(r.partial_messages() <= limits.max_partial_messages);
        assert!(r.buffered_bytes() <= limits.max_buffered_bytes);
    }
}

/// The authority keys the consensus target verifies against: the Ed25519 keys of seeds 1–3.
pub fn authority_keys() -> Vec<ed25519_dalek::SigningKey> {
    (1..=3u8)
        .map(|i| ed25519_dalek::SigningKey::from_bytes(&[i; 32]))
        .collect()
}

/// A served consensus decodes and verifies, or errors; what decodes re-encodes identically.
pub fn consensus(data: &[u8]) {
    if let Ok(doc) = decode::<SignedConsensus>(data) {
        assert_eq!(encode(&doc).expect("encodes"), data);
        let set = AuthoritySet::new(authority_keys().iter().map(IdentityKey::of).collect())
            .expect("valid authority keys");
        let at = Freshness {
            now: 1_000,
            expected_epoch: None,
            clock_skew_s: 60,
        };
        let _ = doc.verify(&set, at);
    }
}

/// An uploaded descriptor decodes and verifies, or errors.
pub fn descriptor(data: &[u8]) {
    if let Ok(doc) = decode::<SignedDescriptor>(data) {
        let _ = doc.verify();
    }
}

/// An exit policy either fails to parse or prints to a form that parses to itself.
pub fn exit_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = ExitPolicy::parse(text, false) {
        let again = ExitPolicy::parse(&policy.to_string(), false).expect("printed policy parses");
        assert_eq!(again, policy);
    }
}

/// A ticket that decodes re-encodes to the same bytes; checking it never panics.
pub fn ticket(data: &[u8]) {
    if let Ok(t) = crate::ticket::Ticket::decode(data) {
        assert_eq!(&t.encode()[..], data, "ticket encoding is not canonical");
        let _ = t.check_for_recipient(&t.recipient, t.issued, 1);
        let _ = t.check_win(&[0; 32]);
    }
}

/// A control message that decodes re-encodes to the same bytes (one encoding per message).
pub fn control(data: &[u8]) {
    if let Ok(c) = crate::control::Control::decode(data) {
        assert_eq!(c.encode(), data, "control encoding is not canonical");
    }
}

/// `[replay tag (32)][bytes]`. Slot content that decodes re-encodes to the same bytes and
/// survives a built envelope of every route length; envelope bytes peel without the MAC
/// always, with it to the same next envelope or to an envelope error, and in place alike.
pub fn envelope_peel(data: &[u8]) {
    let Some((tag, rest)) = data.split_first_chunk::<32>() else {
        return;
    };
    let key = EnvelopeKey::from_replay_tag(&ReplayTag(*tag));
    if let Some(content) = rest.first_chunk::<SLOT_CONTENT_LEN>()
        && let Ok(slot) = decode_slot_content(content)
    {
        assert_eq!(
            &encode_slot_content(slot.as_ref()),
            content,
            "slot content encoding is not canonical"
        );
        let mut rng = rand::rngs::StdRng::from_seed(*tag);
        for hops in 1..=ENVELOPE_SLOTS {
            let keys: Vec<EnvelopeKey> = (0..hops)
                .map(|i| {
                    let mut t = *tag;
                    t[0] ^= i as u8;
                    EnvelopeKey::from_replay_tag(&ReplayTag(t))
                })
                .collect();
            let slots = vec![slot; hops];
            let mut envelope = build_envelope(&mut rng, &keys, &slots).expect("valid shape");
            for k in &keys {
                let peeled = envelope.peel(k, true).expect("a built envelope peels");
                assert_eq!(peeled.ticket, slot);
                envelope = peeled.next;
            }
        }
    }
    if let Ok(envelope) = Envelope::from_slice(rest) {
        let loose = envelope
            .peel(&key, false)
            .expect("unauthenticated peeling never fails");
        assert_eq!(loose.ticket, None);
        let strict = envelope.peel(&key, true);
        match &strict {
            Ok(p) => assert_eq!(p.next, loose.next),
            Err(e) => assert!(
                matches!(
                    e,
                    crate::Error::EnvelopeMac
                        | crate::Error::EnvelopeFlag(_)
                        | crate::Error::EnvelopePadding
                ),
                "{e:?}"
            ),
        }
        let mut bytes: [u8; ENVELOPE_LEN] = *envelope.as_bytes();
        let in_place = peel_in_place(&mut bytes, &key, true);
        assert_eq!(&bytes, loose.next.as_bytes());
        assert_eq!(in_place, strict.map(|p| p.ticket));
    }
}
