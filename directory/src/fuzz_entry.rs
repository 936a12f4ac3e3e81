//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable test that replays
//! their corpora (`tests/fuzz_corpus.rs`), as in `murmur_protocol::fuzz_entry`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use murmur_protocol::directory::{NetworkParams, decode, encode};
use murmur_protocol::fuzz_entry::{authority_keys, authority_set};

use crate::SignatureUpload;
use crate::authority::{Accepted, Authority, AuthorityPolicy};
use crate::config::Config;

/// The names of this crate's fuzz targets.
pub const TARGETS: &[&str] = &["signature_upload", "directory_config"];

/// Runs the target called `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "signature_upload" => signature_upload(data),
        "directory_config" => directory_config(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// The epoch length of the authority the uploads go to, and the time they arrive.
const EPOCH_LENGTH_S: u64 = 600;
const NOW: u64 = 10 * EPOCH_LENGTH_S;

/// `POST /v1/signature`'s body: an upload decodes, re-encodes identically, and goes to an
/// authority (the first of `murmur_protocol::fuzz_entry::authority_keys`) that has computed
/// nothing yet, which refuses it or holds it, and holds it again when it comes again.
pub fn signature_upload(data: &[u8]) {
    let Ok(upload) = decode::<SignatureUpload>(data) else {
        return;
    };
    assert_eq!(encode(&upload).expect("encodes"), data);
    let params = NetworkParams {
        epoch_length_s: EPOCH_LENGTH_S,
        ..NetworkParams::nym_like()
    };
    let policy = AuthorityPolicy {
        max_price_per_packet: 1_000,
        descriptor_lifetime_s: 3_600,
        allow_private_addresses: true,
        clock_skew_s: 30,
        max_descriptors: 16,
        probing: false,
        probe_rules: crate::probes::ProbeRules {
            history: 8,
            min_performance: 500,
            unmeasured_weight: 20,
        },
        probe_packets: 8,
    };
    let key = authority_keys().remove(0);
    let set = authority_set();
    let mut authority = Authority::new(key, set.clone(), params, policy).expect("an authority");
    let first = authority.accept_signature(upload.epoch, upload.signature.clone(), NOW);
    if let Ok(accepted) = &first {
        assert_eq!(
            *accepted,
            Accepted::Pending,
            "nothing was computed to count it for"
        );
        assert!(set.contains(&upload.signature.signer));
        assert!(
            upload
                .signature
                .verify_digest(&upload.signature.digest)
                .is_ok()
        );
    }
    let again = authority.accept_signature(upload.epoch, upload.signature, NOW);
    assert_eq!(
        first.is_ok(),
        again.is_ok(),
        "the same upload decided differently"
    );
    assert!(authority.signed(upload.epoch).is_none());
}

/// An authority's TOML config parses or errors, and validates or errors, never panics.
pub fn directory_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, Path::new("fuzz.toml")) {
        if config.validate().is_ok() {
            assert!(config.params().validate().is_ok());
            assert!(config.authority_set().is_ok());
        }
        let _ = config.limits.http();
    }
}
