//! Replays this crate's fuzz targets' corpora (`fuzz/corpus/<target>/`) and seeds built
//! here on stable (`murmur_protocol::fuzz_entry::replay`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use murmur_protocol::fuzz_entry::{pseudo_random_inputs, replay_targets};
use murmur_relay::fuzz_entry::{self, TARGETS};
use murmur_service::uncomment_example;

const EXAMPLE: &str = include_str!("../relay.example.toml");

fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "relay_config" => {
            let uncommented = uncomment_example(EXAMPLE);
            vec![
                EXAMPLE.as_bytes().to_vec(),
                uncommented.clone().into_bytes(),
                format!("{uncommented}\0exit.max_streams=8\nmixing.mean_delay=\"1s\"").into_bytes(),
            ]
        }
        // Structure-aware: any bytes are steps.
        "exit" => pseudo_random_inputs(6),
        other => panic!("no seeds for {other}"),
    }
}

#[test]
fn every_target_replays_its_corpus_and_seeds() {
    replay_targets("murmur_relay", TARGETS, seeds, fuzz_entry::run);
}
