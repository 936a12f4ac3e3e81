//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable test that replays
//! their corpora (`tests/fuzz_corpus.rs`), as in `murmur_protocol::fuzz_entry`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use crate::config::Config;
use crate::request::{Fund, Operation, Redeem, Signed, Warn, Withdraw};

/// The names of this crate's fuzz targets.
pub const TARGETS: &[&str] = &["ledger_request", "ledger_config"];

/// Runs the target called `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "ledger_request" => ledger_request(data),
        "ledger_config" => ledger_config(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// `[operation][JSON body]`: the body of `POST /v1/{fund,warn,withdraw,redeem}` (the
/// operation `operation % 4`) parses as that signed request or errors; one that parses
/// serialises to JSON that parses to the same request, whose signature verifies exactly
/// when the first's did.
pub fn ledger_request(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => signed::<Fund>(body),
        1 => signed::<Warn>(body),
        2 => signed::<Withdraw>(body),
        _ => signed::<Redeem>(body),
    }
}

fn signed<T: Operation>(body: &[u8]) {
    let Ok(request) = serde_json::from_slice::<Signed<T>>(body) else {
        return;
    };
    let verified = request.verify().is_ok();
    let json = serde_json::to_vec(&request).expect("a parsed request serialises");
    let again: Signed<T> = serde_json::from_slice(&json).expect("its own JSON parses");
    assert_eq!(again, request, "a request changed through its JSON");
    assert_eq!(again.message(), request.message());
    assert_eq!(again.verify().is_ok(), verified);
    if verified {
        // The signature covers every field: another nonce does not verify.
        let mut other = request;
        other.nonce[0] ^= 1;
        assert!(other.verify().is_err(), "a changed request still verifies");
    }
}

/// The ledger's TOML config parses or errors, and validates or errors, never panics.
pub fn ledger_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, Path::new("fuzz.toml"))
        && config.validate().is_ok()
    {
        assert!(config.genesis().is_ok());
        let _ = config.params();
    }
}
