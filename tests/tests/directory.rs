//! Three real `murmur-directory` processes on 127.0.0.1 with six-second epochs.
//!
//! - Generated relays upload descriptors (Sphinx keys for this and the next epochs) to every
//!   authority at each epoch start, as relays do. No process runs behind them, so the
//!   authorities do not test relays here (they vote every relay in, unmeasured); the Sybil
//!   tests (`sybils.rs`) run the prober against real relays.
//! - The served consensus carries three valid signatures, lists every relay and verifies.
//! - One authority stopped (SIGTERM, and it exits cleanly): the other two still produce a
//!   valid consensus for a later epoch, with two signatures.
//! - A second stopped (SIGKILL): no new consensus is produced, and the client's store keeps
//!   its last good document until its valid-until, then reports it expired.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use murmur_directory::client::DirectoryClient;
use murmur_directory::unix_now;
use murmur_protocol::Error as ProtocolError;
use murmur_protocol::directory::sign::Freshness;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate, signed_descriptors};
use murmur_protocol::directory::{
    AuthoritySet, ConsensusStore, IdentityKey, NetworkParams, SignedConsensus, VerifiedConsensus,
};
use murmur_tests::{binary, free_ports};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const EPOCH_S: u64 = 6;
const SKEW_S: u64 = 1;
const RELAYS_PER_LAYER: usize = 3;

/// Child processes killed (and reaped) when the test ends, however it ends.
struct Processes(Vec<Option<Child>>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.0.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Authority {
    identity: IdentityKey,
    url: String,
    dir: PathBuf,
}

fn keygen(bin: &Path, dir: &Path) -> IdentityKey {
    IdentityKey::from_hex(&murmur_tests::keygen(bin, &dir.join("authority.key"))).unwrap()
}

fn write_config(a: &Authority, port: u16, all: &[Authority]) -> PathBuf {
    let mut text = format!(
        "version = 1\n\
         listen = \"127.0.0.1:{port}\"\n\
         key_file = \"authority.key\"\n\
         state_dir = \"state\"\n\
         clock_skew = \"{SKEW_S}s\"\n\
         [schedule]\n\
         epoch_length = \"{EPOCH_S}s\"\n\
         vote_lead = \"3s\"\n\
         compute_lead = \"1500ms\"\n\
         [limits]\n\
         peer_timeout = \"1s\"\n\
         uploads_per_minute_per_address = 100000\n\
         [probe]\n\
         enabled = false\n"
    );
    for other in all {
        text += &format!(
            "[[authority]]\nidentity = \"{}\"\nurl = \"{}\"\n",
            other.identity.to_hex(),
            other.url
        );
    }
    let path = a.dir.join("authority.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(bin: &Path, a: &Authority) -> Child {
    let log = std::fs::File::create(a.dir.join("authority.log")).unwrap();
    Command::new(bin)
        .args(["run", "--config"])
        .arg(a.dir.join("authority.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn logs(authorities: &[Authority]) -> String {
    authorities
        .iter()
        .map(|a| {
            let text = std::fs::read_to_string(a.dir.join("authority.log")).unwrap_or_default();
            format!("---- {} ----\n{text}", a.url)
        })
        .collect()
}

/// Polls authority 0 until it serves a consensus that verifies now and satisfies `want`;
/// fails after `within_s` seconds with the authorities' logs.
async fn wait_for_consensus(
    client: &DirectoryClient,
    set: &AuthoritySet,
    authorities: &[Authority],
    within_s: u64,
    what: &str,
    want: impl Fn(&VerifiedConsensus) -> bool,
) -> (SignedConsensus, VerifiedConsensus) {
    let deadline = Instant::now() + Duration::from_secs(within_s);
    loop {
        let at = Freshness {
            now: unix_now(),
            expected_epoch: None,
            clock_skew_s: SKEW_S,
        };
        if let Ok(doc) = client.fetch_consensus(&authorities[0].url).await
            && let Ok(v) = doc.verify(set, at)
            && want(&v)
        {
            return (doc, v);
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {within_s} s\n{}",
            logs(authorities)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn epoch_now() -> u32 {
    u32::try_from(unix_now() / EPOCH_S).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_authorities_sign_survive_one_loss_and_stop_at_two() {
    let started = Instant::now();
    let bin = binary("murmur-directory");
    let root = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let authorities: Vec<Authority> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let dir = root.path().join(format!("authority-{i}"));
            Authority {
                identity: keygen(&bin, &dir),
                url: format!("http://127.0.0.1:{port}"),
                dir,
            }
        })
        .collect();
    for (a, port) in authorities.iter().zip(&ports) {
        write_config(a, *port, &authorities);
    }
    let mut procs = Processes(authorities.iter().map(|a| Some(spawn(&bin, a))).collect());
    let set = AuthoritySet::new(authorities.iter().map(|a| a.identity).collect()).unwrap();
    let urls: Vec<String> = authorities.iter().map(|a| a.url.clone()).collect();
    let client = DirectoryClient::new(Duration::from_secs(1)).unwrap();

    // Wait until every authority answers.
    let deadline = Instant::now() + Duration::from_secs(15);
    for url in &urls {
        while metrics(url).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "{url} did not start\n{}",
                logs(&authorities)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Relays: upload at once, then again at each epoch start with fresh keys.
    let net = SyntheticNetwork {
        mixes_per_layer: RELAYS_PER_LAYER,
        gateways: 1,
        exits: 1,
        params: NetworkParams::nym_like(),
        epoch: epoch_now(),
    };
    let (generated, relay_keys) = generate(&mut ChaCha20Rng::seed_from_u64(7), &net);
    let relay_count = generated.relays.len();
    let uploader = {
        let (client, urls) = (client.clone(), urls.clone());
        tokio::spawn(async move {
            for _ in 0..20 {
                let e = epoch_now();
                let epochs: Vec<u32> = (e..e + 4).collect();
                let docs =
                    signed_descriptors(&generated, &relay_keys, &epochs, unix_now()).unwrap();
                for d in &docs {
                    // Authorities that are down fail; the others must take it.
                    let _ = client.upload_descriptor(&urls, d).await;
                }
                let next = (u64::from(e) + 1) * EPOCH_S * 1000 + 200;
                let now_ms = u64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis(),
                )
                .unwrap();
                tokio::time::sleep(Duration::from_millis(next.saturating_sub(now_ms))).await;
            }
        })
    };

    // 1. All three up: a consensus with every relay and three valid signatures.
    let first = wait_for_consensus(
        &client,
        &set,
        &authorities,
        4 * EPOCH_S,
        &format!("a consensus with {relay_count} relays and 3 signatures"),
        |v| v.consensus.relays.len() == relay_count && v.signers.len() == 3,
    )
    .await;
    let (doc, v) = &first;
    assert_eq!(doc.signatures.len(), 3);
    assert_eq!(v.signers, set.keys().to_vec());
    let layers: Vec<usize> = (1..=3)
        .map(|l| {
            v.consensus
                .relays
                .iter()
                .filter(|r| r.layer == Some(l))
                .count()
        })
        .collect();
    assert_eq!(layers, vec![RELAYS_PER_LAYER; 3], "balanced layers");
    // The other authorities serve the very same document.
    for url in &urls[1..] {
        let other = client
            .fetch_consensus_for(url, v.consensus.epoch)
            .await
            .unwrap();
        assert_eq!(other.body, doc.body, "authorities agree byte for byte");
    }
    let mut store = ConsensusStore::new(set.clone(), SKEW_S);
    client.refresh(&urls, &mut store, unix_now()).await.unwrap();
    println!(
        "[{:>5.1?}] epoch {}: {} relays, 3 signatures",
        started.elapsed(),
        v.consensus.epoch,
        relay_count
    );

    // 2. Stop authority 2 gracefully: the other two go on, with two signatures.
    let mut third = procs.0[2].take().unwrap();
    Command::new("kill")
        .args(["-TERM", &third.id().to_string()])
        .status()
        .unwrap();
    let stopped_at = Instant::now();
    let status = loop {
        if let Some(status) = third.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(10),
            "no exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    let after = epoch_now().max(v.consensus.epoch);
    let second = wait_for_consensus(
        &client,
        &set,
        &authorities,
        3 * EPOCH_S,
        &format!("a consensus after epoch {after} from two authorities"),
        |v| v.consensus.epoch > after,
    )
    .await;
    let (doc, v) = &second;
    assert_eq!(doc.signatures.len(), 2);
    assert!(!v.signers.contains(&authorities[2].identity));
    assert_eq!(v.consensus.relays.len(), relay_count);
    // The client falls over from the dead authority to a live one.
    let dead_first = vec![urls[2].clone(), urls[0].clone()];
    client
        .refresh(&dead_first, &mut store, unix_now())
        .await
        .unwrap();
    assert_eq!(
        store.current(unix_now()).unwrap().consensus.epoch,
        v.consensus.epoch
    );
    println!(
        "[{:>5.1?}] epoch {}: 2 signatures with one authority stopped",
        started.elapsed(),
        v.consensus.epoch
    );

    // 3. Kill authority 1: authority 0 alone cannot produce a consensus. Any round computed
    //    before the kill may still be served; none after.
    procs.0[1].take().map(|mut c| {
        c.kill().unwrap();
        c.wait().unwrap()
    });
    let last_possible = epoch_now() + 1;
    let deadline = Instant::now() + Duration::from_secs((2 + 1) * EPOCH_S + 8);
    let mut kept_after_kill = 0;
    let expired = loop {
        let now = unix_now();
        let _ = client.refresh(&urls, &mut store, now).await;
        let held = store.held().unwrap().consensus.clone();
        assert!(
            held.epoch <= last_possible,
            "a consensus after the kill: {}",
            held.epoch
        );
        match store.current(now) {
            Ok(_) => {
                assert!(now <= held.valid_until + SKEW_S);
                kept_after_kill += 1;
            }
            Err(e) => break (e, held.valid_until, now),
        }
        assert!(
            Instant::now() < deadline,
            "the held consensus never expired\n{}",
            logs(&authorities)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (err, valid_until, now) = expired;
    assert_eq!(err, ProtocolError::Expired { valid_until, now });
    assert!(now > valid_until + SKEW_S);
    assert!(
        kept_after_kill > 0,
        "the store kept its last good document for a while"
    );
    assert!(
        client.fetch_consensus(&urls[0]).await.is_err(),
        "the lone authority serves no valid consensus"
    );
    let text = metrics(&urls[0]).await.unwrap();
    assert!(
        text.contains("murmur_directory_consensus_failed_total{reason=\"not_enough_votes\"}"),
        "{text}"
    );
    println!(
        "[{:>5.1?}] alone: no consensus; the client's document expired at {valid_until} ({err})",
        started.elapsed()
    );
    uploader.abort();
    drop(procs);
    if std::env::var_os("MURMUR_SHOW_LOGS").is_some() {
        println!("{}", logs(&authorities));
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

async fn metrics(url: &str) -> reqwest::Result<String> {
    reqwest::get(format!("{url}/metrics")).await?.text().await
}
