//! The `murmur-devnet` binary's command line. (Also makes cargo build the binary for the
//! end-to-end tests in `tests/`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_murmur-devnet");

#[test]
fn help_lists_the_network_options_and_bad_values_fail_before_anything_starts() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--socks",
        "--hop-delay",
        "--send-rate",
        "--relay-loop-rate",
        "--ticket-face-value",
        "--packets-per-ticket",
        "--max-price-per-hop",
        "--min-performance",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = Command::new(BIN)
        .args(["--hop-delay", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hop-delay"));
    // Refused before any daemon starts: no state directory is announced.
    let out = Command::new(BIN)
        .args(["--min-performance", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min_performance must lie in [0, 1]"), "{err}");
    assert!(!err.contains("state in"), "{err}");
}
