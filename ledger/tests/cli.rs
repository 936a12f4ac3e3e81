//! The built binary: `keygen`, `check-config`, and `run` until SIGTERM. (Naming the binary
//! here also makes `cargo test --workspace` build it for the end-to-end tests.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_murmur-ledger");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn example() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ledger.example.toml");
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn check_config_accepts_the_example_and_refuses_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("ledger.toml");
    std::fs::write(&good, example()).unwrap();
    let out = run(&["check-config", "--config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("config OK: 2 genesis accounts holding 2000000000000"),
        "{}",
        text(&out.stdout)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("notice_perod = \"1h\"\n{}", example())).unwrap();
    let out = run(&["check-config", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("notice_perod"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn keygen_writes_a_private_key_once_and_run_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ledger.toml");
    std::fs::write(&config, format!("listen = \"127.0.0.1:0\"\n{}", example())).unwrap();
    let out = run(&["run", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success(), "started without a key");
    assert!(
        text(&out.stderr).contains("murmur-ledger keygen --out"),
        "{}",
        text(&out.stderr)
    );
    let key = dir.path().join("ledger.key");
    let out = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let identity = text(&out.stdout).trim().to_owned();
    assert_eq!(identity.len(), 64, "{identity}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        !run(&["keygen", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    let out = run(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains(&format!("key OK: this ledger is {identity}")),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn run_serves_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ledger.toml");
    std::fs::write(&config, format!("listen = \"127.0.0.1:0\"\n{}", example())).unwrap();
    let key = dir.path().join("ledger.key");
    let out = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let identity = text(&out.stdout).trim().to_owned();
    let mut child = Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the ledger logs before exiting")
            .unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            assert!(
                line.contains(&format!("identity={identity}")),
                "the ledger logs its identity: {line}"
            );
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let body = std::process::Command::new("curl")
        .args(["-s", &format!("http://{addr}/metrics")])
        .output();
    if let Ok(out) = body {
        assert!(
            text(&out.stdout).contains("murmur_ledger_conserved 1"),
            "{}",
            text(&out.stdout)
        );
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(dir.path().join("state/ledger.redb").exists());
}
