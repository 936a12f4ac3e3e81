//! The `murmur-relay` binary: key generation and config checking. (Also makes cargo build the
//! binary for the end-to-end tests in `tests/`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_murmur-relay");

#[test]
fn keygen_writes_a_key_once_and_check_config_reads_the_example() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim().len(), 64);
    let again = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "must refuse to overwrite an identity"
    );

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/relay.example.toml");
    let out = Command::new(BIN)
        .args(["check-config", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "version = 1\n[relay]\nfamily = \"x\"\nroles = [\"mix\"]\nsurprise = 1\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
}
