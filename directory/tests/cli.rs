//! The built binary: `keygen` and `check-config`. (Having an integration test that names
//! the binary also makes `cargo test --workspace` build it for the end-to-end tests.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_murmur-directory");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn keygen_prints_the_identity_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("authority.key");
    let key = key.to_str().unwrap();
    let out = run(&["keygen", "--out", key]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout);
    let id = id.trim();
    assert_eq!(id.len(), 64, "{id:?}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    let again = run(&["keygen", "--out", key]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("refusing to overwrite"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn check_config_accepts_the_example_and_refuses_unknown_keys() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("authority.example.toml");
    let out = run(&["check-config", "--config", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("config OK: 3 authorities (a consensus needs 2)"),
        "{}",
        text(&out.stdout)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let example_text = std::fs::read_to_string(&example).unwrap();
    std::fs::write(
        &bad,
        format!("listen_adress = \"127.0.0.1:1\"\n{example_text}"),
    )
    .unwrap();
    let out = run(&["check-config", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("listen_adress"),
        "{}",
        text(&out.stderr)
    );
}
