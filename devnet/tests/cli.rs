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

#[test]
fn a_rate_the_directory_would_refuse_fails_at_start_not_at_every_vote() {
    let out = Command::new(BIN)
        .args(["--send-rate", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lambda_p must lie in"), "{err}");
    assert!(!err.contains("state in"), "{err}");
}

#[test]
fn a_zero_hop_delay_is_the_shortest_the_directory_accepts() {
    use murmur_devnet::DevnetOptions;
    use murmur_protocol::directory::bounds;
    let zero = DevnetOptions {
        mean_hop_delay: std::time::Duration::ZERO,
        ..DevnetOptions::default()
    };
    assert_eq!(zero.mu(), bounds::MU.1);
    let default = DevnetOptions::default();
    assert!((default.mu() - 1000.0 / 15.0).abs() < 1e-9);
}
