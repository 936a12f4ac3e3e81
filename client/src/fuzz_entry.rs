//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable test that replays
//! their corpora (`tests/fuzz_corpus.rs`), as in `murmur_protocol::fuzz_entry`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use murmur_protocol::directory::IdentityKey;

use crate::cli::ClientConfig;

/// The names of this crate's fuzz targets.
pub const TARGETS: &[&str] = &["client_config"];

/// Runs the target called `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "client_config" => client_config(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// The client's TOML config parses and checks or errors, never panics; what it accepts
/// names valid authority keys and, with payments, a valid ledger key or a sound chain section.
pub fn client_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ClientConfig::parse(text) {
        assert_eq!(config.version, 1);
        assert!(!config.authorities.is_empty());
        for a in &config.authorities {
            assert!(IdentityKey::from_hex(&a.identity).is_ok());
        }
        if let Some(p) = &config.payments {
            match p.chain_payment() {
                Ok(Some(_)) => {}
                Ok(None) => assert!(p.ledger_identity().is_ok()),
                Err(e) => panic!("a config that parsed has a bad chain section: {e}"),
            }
        }
    }
}
