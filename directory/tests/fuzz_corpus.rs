//! Replays this crate's fuzz targets' corpora (`fuzz/corpus/<target>/`) and seeds built
//! here on stable (`murmur_protocol::fuzz_entry::replay`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use murmur_directory::SignatureUpload;
use murmur_directory::fuzz_entry::{self, TARGETS};
use murmur_protocol::directory::{DocumentKind, encode, sign_document};
use murmur_protocol::fuzz_entry::{authority_keys, replay_targets};
use murmur_service::uncomment_example;

const EXAMPLE: &str = include_str!("../authority.example.toml");

fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        // Signatures of the authorities and of a stranger, for the epochs around the
        // target's clock (epoch 10).
        "signature_upload" => {
            let mut keys = authority_keys();
            keys.push(ed25519_dalek::SigningKey::from_bytes(&[9; 32]));
            let mut out = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                for epoch in [10, 11, 12] {
                    let body = format!("consensus {epoch}");
                    let signature = sign_document(DocumentKind::Consensus, body.as_bytes(), key);
                    let upload = SignatureUpload { epoch, signature };
                    if i == 0 || epoch == 11 {
                        out.push(encode(&upload).unwrap());
                    }
                }
            }
            out
        }
        "directory_config" => {
            let identity = |k: &ed25519_dalek::SigningKey| {
                murmur_protocol::directory::IdentityKey::of(k).to_hex()
            };
            let authorities: String = authority_keys()
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    format!(
                        "[[authority]]\nidentity = \"{}\"\nurl = \"http://127.0.0.1:707{i}\"\n",
                        identity(k)
                    )
                })
                .collect();
            vec![
                EXAMPLE.as_bytes().to_vec(),
                uncomment_example(EXAMPLE).into_bytes(),
                format!("version = 1\nlisten = \"127.0.0.1:7070\"\n{authorities}").into_bytes(),
            ]
        }
        other => panic!("no seeds for {other}"),
    }
}

#[test]
fn every_target_replays_its_corpus_and_seeds() {
    replay_targets("murmur_directory", TARGETS, seeds, fuzz_entry::run);
}
