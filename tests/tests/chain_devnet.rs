//! `murmur-devnet --settlement chain`: a download through the SOCKS5 proxy, with relays that
//! redeem on a local Anvil node (the real contract) and a client whose pot is there and who
//! co-signs every ticket. Winners are redeemed on the chain within a minute or two (the
//! tickets' face value is low, so many win); none is refused for its co-signature. Prints
//! what the relays' redemptions cost in gas at the devnet's price (1 gwei per gas).
//!
//! Needs Anvil: `chain/contract/build.sh --tools` installs it (npm); the test runs it if the
//! binary is missing, and skips with a message only if it still cannot be had.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use murmur_chain::{ChainConfig, ChainSettlement};
use murmur_ledger::ChainSection;
use murmur_tests::{HttpServer, curl, free_ports, test_bytes};
use sha2::{Digest, Sha256};

/// The face value of the test's tickets, in base units (gwei).
const FACE: u64 = 50;

/// `(rpc url, contract)` from the devnet's `devnet: chain <url> contract <address> (…` line.
fn chain_of(log: &str) -> Option<(String, String)> {
    let line = log.lines().find(|l| l.starts_with("devnet: chain "))?;
    let mut words = line.split_whitespace().skip(2);
    let url = words.next()?.to_owned();
    let contract = words.nth(1)?.to_owned();
    Some((url, contract))
}

/// The value of `name` (summed over its labels matching `label`) in Prometheus text.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_download_on_the_chain_devnet_is_paid_and_its_winners_are_redeemed_on_anvil() {
    if !murmur_chain::anvil::ensure_installed() {
        eprintln!(
            "SKIPPED: no Anvil binary (chain/contract/build.sh --tools could not install it)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let blob = test_bytes(300_000, 21);
    let server = HttpServer::start(vec![("/blob".into(), blob.clone())]);
    let metrics_addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let face = FACE.to_string();
    let mut devnet = murmur_tests::start_devnet(
        dir.path(),
        &[
            "--settlement",
            "chain",
            "--ticket-face-value",
            &face,
            "--packets-per-ticket",
            "1",
            "--relay-metrics",
            &metrics_addr,
        ],
    );
    let (url, contract) = chain_of(&devnet.proc.log_text())
        .unwrap_or_else(|| panic!("no chain line:\n{}", devnet.proc.log_text()));
    eprintln!("chain {url}, contract {contract}");

    for _ in 0..2 {
        let (code, body, err) = curl(devnet.socks, &server.url("/blob"), 120);
        assert_eq!(code, 0, "{err}\n{}", devnet.proc.log_text());
        assert_eq!(Sha256::digest(&body), Sha256::digest(&blob));
    }

    let rt = murmur_tests::runtime(2);
    let chain = rt.block_on(async {
        let section = ChainSection {
            rpc_url: url.clone(),
            contract: contract.clone(),
            confirmations: 1,
            gas_price_wei: None,
            timeout_s: 30,
            retries: 3,
        };
        ChainSettlement::connect(ChainConfig::from_section(&section).unwrap(), &[])
            .await
            .unwrap()
    });
    // Winners are redeemed once their key epoch retires (20-second epochs, one of grace).
    let started = Instant::now();
    let redeemed = loop {
        let r = rt.block_on(chain.redemptions()).unwrap();
        if !r.is_empty() || started.elapsed() > Duration::from_secs(180) {
            break r;
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    let metrics = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://{metrics_addr}/metrics"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !redeemed.is_empty(),
        "no winner redeemed on the chain in {:?}\nrelay metrics:\n{}\n{}",
        started.elapsed(),
        metrics
            .lines()
            .filter(|l| l.contains("ticket") || l.contains("redeem"))
            .collect::<Vec<_>>()
            .join("\n"),
        devnet.proc.log_text()
    );
    let accepted = metric(&metrics, "murmur_relay_tickets_accepted_total", "");
    let missing = metric(
        &metrics,
        "murmur_relay_tickets_refused_total",
        "cosignature_missing",
    );
    let not_owner = metric(
        &metrics,
        "murmur_relay_tickets_refused_total",
        "cosignature_not_owner",
    );
    assert!(accepted > 0.0, "{metrics}");
    assert_eq!(
        missing + not_owner,
        0.0,
        "co-signatures refused:\n{metrics}"
    );

    let n = redeemed.len() as u64;
    let paid: u64 = redeemed.iter().map(|r| r.paid).sum();
    // A batch's transaction pays several winners and reports its gas on each.
    let transactions: std::collections::HashMap<_, u64> = redeemed
        .iter()
        .map(|r| (r.transaction, r.gas_used))
        .collect();
    let gas: u64 = transactions.values().sum();
    let price = redeemed[0].gas_price_wei;
    assert!(redeemed.iter().all(|r| r.paid == FACE), "{redeemed:?}");
    // Fees in base units (gwei) per redemption.
    let fee_units = gas as f64 * price as f64 / 1e9 / n as f64;
    eprintln!(
        "redeemed on the chain after {:?}: {n} winners in {} transactions from {} recipients, \
         {paid} base units paid ({FACE} each); {accepted} tickets accepted, none refused for \
         a co-signature (the client read every relay's chain address from the directory)",
        started.elapsed(),
        transactions.len(),
        redeemed
            .iter()
            .map(|r| r.recipient)
            .collect::<std::collections::HashSet<_>>()
            .len()
    );
    eprintln!(
        "gas: {:.0} per redemption at {price} wei per gas = {fee_units:.0} base units (gwei) \
         of fees per winner: {:.0}x its face value of {FACE}; at the client's default face \
         value of 1,000,000 it would be {:.1}% of each winner",
        gas as f64 / n as f64,
        fee_units / FACE as f64,
        fee_units / 1_000_000.0 * 100.0
    );
    assert!(
        devnet.proc.terminate(Duration::from_secs(20)),
        "devnet did not stop cleanly on SIGTERM:\n{}",
        devnet.proc.log_text()
    );
}
