//! The `murmur-chain` command line against a local Anvil node: an identity's address, deploying
//! the contract with a key file, reading a pot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use alloy::primitives::U256;
use alloy::providers::{Provider, ProviderBuilder};
use murmur_chain::anvil::{self, Anvil};
use murmur_chain::wallet_of;

fn murmur_chain(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_murmur-chain"))
        .args(args)
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_deploy_and_pot() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("id.key");
    let identity = murmur_service::keys::keygen(&key_file).unwrap();
    let key_arg = key_file.to_str().unwrap();
    let key = murmur_service::keys::load(&key_file).unwrap();
    let address = wallet_of(&key).address();

    let (ok, out, err) = murmur_chain(&["address", "--key", key_arg]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("identity {identity}\naddress {address}\n"));

    if anvil::binary().is_none() {
        eprintln!("SKIPPED deploying: no Anvil (chain/contract/build.sh --tools installs it)");
        return;
    }
    let node = Anvil::start().unwrap();
    let url = node.url();
    let provider = ProviderBuilder::new().connect_http(url.parse().unwrap());
    let () = provider
        .raw_request(
            "anvil_setBalance".into(),
            (address, U256::from(10u64).pow(U256::from(18u64))),
        )
        .await
        .unwrap();
    let (ok, out, err) = murmur_chain(&[
        "deploy",
        "--rpc-url",
        &url,
        "--key",
        key_arg,
        "--notice",
        "24h",
    ]);
    assert!(ok, "{err}");
    let contract = out.trim().strip_prefix("contract ").unwrap().to_owned();
    assert!(
        !provider
            .get_code_at(contract.parse().unwrap())
            .await
            .unwrap()
            .is_empty()
    );

    // nobody funded this pot: refused, and said so
    let pot = identity.to_hex();
    let (ok, _, err) = murmur_chain(&["pot", "--rpc-url", &url, "--contract", &contract, &pot]);
    assert!(!ok);
    assert!(
        err.contains("unknown_pot") || err.contains("no pot"),
        "{err}"
    );
}
