//! Replays this crate's fuzz targets' corpora (`fuzz/corpus/<target>/`) and seeds built
//! here on stable (`murmur_protocol::fuzz_entry::replay`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use murmur_client::fuzz_entry::{self, TARGETS};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::fuzz_entry::replay_targets;

const AUTHORITY: &str = "[[authorities]]\nidentity = \"0101010101010101010101010101010101010101010101010101010101010101\"\nurl = \"http://127.0.0.1:7070\"\n";

fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "client_config" => vec![
            format!("version = 1\n{AUTHORITY}").into_bytes(),
            format!(
                "version = 1\nsocks = \"127.0.0.1:1080\"\nclock_skew = \"1m\"\n\
                 distinct_subnets = false\n{AUTHORITY}[payments]\n\
                 ledger = \"http://127.0.0.1:7080\"\nledger_key = \"{}\"\n\
                 key_file = \"pot.key\"\nface_value = 500\npackets_per_ticket = 8\n",
                IdentityKey::of(&SigningKey::from_bytes(&[3; 32]))
            )
            .into_bytes(),
        ],
        other => panic!("no seeds for {other}"),
    }
}

#[test]
fn every_target_replays_its_corpus_and_seeds() {
    replay_targets("murmur_client", TARGETS, seeds, fuzz_entry::run);
}
