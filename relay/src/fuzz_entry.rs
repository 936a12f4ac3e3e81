//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable test that replays
//! their corpora (`tests/fuzz_corpus.rs`), as in `murmur_protocol::fuzz_entry`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use crate::config::Config;

pub use murmur_protocol::exit::fuzz::exit;

/// The names of this crate's fuzz targets.
pub const TARGETS: &[&str] = &["relay_config", "exit"];

/// Runs the target called `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "relay_config" => relay_config(data),
        "exit" => exit(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// `[TOML][\0 overrides, one KEY=VALUE a line]`: a relay's config parses and checks, with
/// and without the `-o` overrides, or errors; never panics. A config that parses yields
/// its exit policy, own addresses and ledger identity or errors.
pub fn relay_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (text, overrides) = text.split_once('\0').unwrap_or((text, ""));
    let base = PathBuf::from("/nonexistent");
    if let Ok(config) = Config::parse(text, base.clone()) {
        let _ = config.exit_policy();
        let _ = config.own_addresses();
        let _ = config.payments.ledger_identity();
        let _ = config.grace_epochs();
    }
    let overrides: Vec<String> = overrides.lines().map(str::to_string).collect();
    let _ = Config::parse_with_overrides(text, base, &overrides);
}
