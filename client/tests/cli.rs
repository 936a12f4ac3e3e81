//! The `murmur-client` binary's command line. (Also makes cargo build the binary for the
//! end-to-end tests in `tests/`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_murmur-client");

#[test]
fn help_names_the_devnet_and_bad_invocations_fail_clearly() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("-p murmur-devnet"));
    let out = Command::new(BIN).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("murmur-devnet"));
    // The old way to start the local network, with or without its flags, says where it went.
    for args in [&["--devnet"][..], &["--devnet", "--hop-delay", "0ms"]] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cargo run --release -p murmur-devnet"),
            "{err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("client.toml");
    std::fs::write(&bad, "version = 1\nauthorities = []\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no authorities"));
}

#[test]
fn a_listener_beyond_loopback_needs_the_config_to_allow_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("client.toml");
    let authority = "authorities = [ { identity = \"0101010101010101010101010101010101010101010101010101010101010101\", url = \"http://127.0.0.1:9\" } ]\n";
    std::fs::write(&config, format!("version = 1\n{authority}")).unwrap();
    // A flag alone cannot allow it, for either proxy; nothing starts.
    for flag in ["--socks", "--http"] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args([flag, "0.0.0.0:0"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("open proxy that spends your pot"), "{err}");
        assert!(err.contains("allow_non_loopback = true under ["), "{err}");
    }
}
