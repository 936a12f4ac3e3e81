//! A ledger a flood of fresh keys cannot stall, in-process on 127.0.0.1:0 over HTTP:
//! 10,000 signed `Warn`s from keys that hold nothing are refused without a write (the redb
//! file does not grow), and while another 10,000 arrive, an honest relay's redemptions each
//! complete within a second; one key sending faster than its rate is refused `rate_limited`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use murmur_ledger::client::LedgerClient;
use murmur_ledger::config::GenesisEntry;
use murmur_ledger::request::{Fund, Redeem, Signed, Warn};
use murmur_ledger::{Config, Refusal, Settlement, unix_now};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::ticket::{Ticket, TicketFields, commitment_of};
use tokio::net::TcpListener;

const REVEAL: [u8; 32] = [7; 32];
const FLOOD: usize = 10_000;
const SENDERS: usize = 16;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// The `i`th fresh key of the flood (never funded, never seen).
fn fresh(i: usize) -> SigningKey {
    let mut bytes = [0xf0; 32];
    bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
    SigningKey::from_bytes(&bytes)
}

fn id(k: &SigningKey) -> IdentityKey {
    IdentityKey::of(k)
}

async fn start(dir: &Path) -> (LedgerClient, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let key_file = dir.join("ledger.key");
    murmur_service::keys::keygen(&key_file).unwrap();
    let identity = IdentityKey::of(&murmur_service::keys::load(&key_file).unwrap());
    let mut c = Config::with_defaults();
    c.key_file = key_file;
    c.state_dir = dir.join("state");
    c.genesis = vec![GenesisEntry {
        account: id(&key(1)).to_hex(),
        amount: 1_000_000,
    }];
    c.validate().unwrap();
    let database = c.database_path();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(murmur_ledger::serve(c, listener, std::future::pending()));
    let client = LedgerClient::new(&url, identity, Duration::from_secs(10)).unwrap();
    (client, database)
}

/// Sends `FLOOD` warnings from fresh keys, `first..first + FLOOD`, from `SENDERS` tasks;
/// how many were refused for each reason.
async fn flood(client: &LedgerClient, first: usize) -> Vec<(Refusal, usize)> {
    let requests: Vec<Signed<Warn>> = (first..first + FLOOD)
        .map(|i| Signed::new(Warn { amount: 1 }, &fresh(i), unix_now()))
        .collect();
    let requests = Arc::new(requests);
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..SENDERS {
        let (client, requests) = (client.clone(), requests.clone());
        tasks.spawn(async move {
            let mut refused = Vec::new();
            for req in requests.iter().skip(s).step_by(SENDERS) {
                match client.warn(req.clone()).await {
                    Ok(pot) => panic!("a fresh key's warning was taken: {pot:?}"),
                    Err(e) => refused.push(e.refusal().unwrap_or_else(|| panic!("{e}"))),
                }
            }
            refused
        });
    }
    let mut counts: Vec<(Refusal, usize)> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        for refusal in r.unwrap() {
            match counts.iter_mut().find(|(k, _)| *k == refusal) {
                Some((_, n)) => *n += 1,
                None => counts.push((refusal, 1)),
            }
        }
    }
    counts
}

fn winning_ticket(nonce: u64) -> Ticket {
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&nonce.to_be_bytes());
    Ticket::sign(
        TicketFields {
            recipient: id(&key(2)),
            face_value: 10,
            win_ratio: u64::MAX,
            nonce: n,
            issued: unix_now(),
            expiry: unix_now() + 3600,
            commitment: commitment_of(&REVEAL),
        },
        &key(1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_keys_cannot_stall_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let (client, database) = start(dir.path()).await;
    let fund = Fund {
        pot: id(&key(1)),
        balance: 100_000,
        escrow: 100_000,
    };
    client
        .fund(Signed::new(fund, &key(1), unix_now()))
        .await
        .unwrap();
    let size = || std::fs::metadata(&database).unwrap().len();

    // Refused before any write: the database file does not change.
    let before = size();
    let started = Instant::now();
    let refused = flood(&client, 0).await;
    let took = started.elapsed();
    let after = size();
    println!(
        "{FLOOD} warnings from fresh keys in {took:?}: refused {refused:?}; ledger.redb \
         {before} -> {after} bytes"
    );
    assert_eq!(refused, vec![(Refusal::UnknownPot, FLOOD)]);
    assert_eq!(after, before, "refused requests wrote to the database");

    // Another flood, and meanwhile an honest relay redeems winners one after another.
    let flooding = {
        let client = client.clone();
        tokio::spawn(async move { flood(&client, FLOOD).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut latencies = Vec::new();
    let mut nonce = 0;
    while !flooding.is_finished() && nonce < 50 {
        nonce += 1;
        let req = Signed::new(
            Redeem {
                ticket: winning_ticket(nonce),
                reveal: REVEAL,
            },
            &key(2),
            unix_now(),
        );
        let t = Instant::now();
        let paid = client.redeem(req).await.unwrap();
        latencies.push(t.elapsed());
        assert_eq!(paid.paid, 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = flooding.await.unwrap();
    let worst = latencies.iter().max().copied().unwrap_or_default();
    println!(
        "during a second flood (refused {refused:?}): {} redemptions, the slowest took {worst:?}",
        latencies.len()
    );
    assert!(
        latencies.len() >= 3,
        "the flood ended before the redemptions ran"
    );
    assert!(worst < Duration::from_secs(1), "{latencies:?}");

    // One key faster than its rate: refused as rate limited, nothing decided.
    let hasty = key(1);
    let mut limited = 0;
    for _ in 0..100 {
        let req = Signed::new(Warn { amount: 0 }, &hasty, unix_now());
        if let Err(e) = client.warn(req).await {
            assert_eq!(e.refusal(), Some(Refusal::RateLimited), "{e}");
            limited += 1;
        }
    }
    println!("one key sending 100 warnings at once: {limited} refused as rate_limited");
    assert!(limited > 0);
}
