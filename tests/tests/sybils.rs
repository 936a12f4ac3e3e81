//! The directory against Sybils, on real processes: three `murmur-directory` authorities
//! testing real `murmur-relay` relays, each relay on a loopback address of its own.
//!
//! - Two Sybil mixes claiming `u32::MAX` packets/s: the consensus weighs them by what the
//!   authorities measured, and over 10,000 selected paths their share stays within the share
//!   of their measured weight (bound stated below).
//! - A relay whose handshakes complete but which drops every packet (its mix address is a
//!   proxy in this test that passes the Noise handshake and then discards what it is sent)
//!   is out of the next consensus, and in again once it carries packets.
//! - 15,000 descriptor uploads of relays nobody runs, in three disjoint sets of 5,000 each
//!   sent to a different pair of authorities, into descriptor stores smaller than the flood:
//!   every honest relay, and one that joins after the flood, is in the next consensus.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur_protocol::directory::path::{PathRules, PathSelector};
use murmur_protocol::directory::{Consensus, IdentityKey};
use murmur_tests::{
    AuthorityInfo, RelayProc, fetch_consensus, next_relay_host, runtime, start_authorities,
    start_relay, start_relay_with, wait_until,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const EPOCH_S: u64 = 6;
const LOOPBACK: &str =
    "[mixing]\nworkers = 1\nreplay_capacity = 100000\ndistinct_subnets = false\n";

fn id(r: &RelayProc) -> IdentityKey {
    IdentityKey::from_hex(&r.identity).unwrap()
}

/// Polls the authorities until a consensus satisfies `ok` (or `within` passes).
fn consensus_where(
    authorities: &[AuthorityInfo],
    within: Duration,
    mut ok: impl FnMut(&Consensus) -> bool,
) -> Option<Consensus> {
    let rt = runtime(1);
    wait_until(within, Duration::from_millis(500), || {
        rt.block_on(fetch_consensus(authorities)).filter(&mut ok)
    })
}

fn has_all(c: &Consensus, relays: &[&RelayProc]) -> bool {
    relays.iter().all(|r| c.relay(&id(r)).is_some())
}

/// A minimal honest network: a gateway, three mixes and an exit.
fn honest(dir: &Path, infos: &[AuthorityInfo]) -> Vec<RelayProc> {
    let mut relays = vec![start_relay(
        dir,
        "gateway",
        "[\"gateway\"]",
        infos,
        EPOCH_S,
        LOOPBACK,
    )];
    for i in 0..3 {
        relays.push(start_relay(
            dir,
            &format!("mix-{i}"),
            "[\"mix\"]",
            infos,
            EPOCH_S,
            LOOPBACK,
        ));
    }
    relays.push(start_relay(
        dir,
        "exit",
        "[\"exit\"]",
        infos,
        EPOCH_S,
        LOOPBACK,
    ));
    relays
}

#[test]
fn sybils_claiming_u32_max_get_only_their_measured_share_of_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (infos, _authorities) = start_authorities(dir.path(), 3, EPOCH_S);
    let mut relays = honest(dir.path(), &infos);
    for i in 0..3 {
        relays.push(start_relay(
            dir.path(),
            &format!("mix-extra-{i}"),
            "[\"mix\"]",
            &infos,
            EPOCH_S,
            LOOPBACK,
        ));
    }
    let sybils: Vec<RelayProc> = (0..2)
        .map(|i| {
            start_relay_with(
                dir.path(),
                &format!("sybil-{i}"),
                "[\"mix\"]",
                &infos,
                EPOCH_S,
                "bandwidth = 4294967295\n",
                "",
                LOOPBACK,
            )
        })
        .collect();
    let everyone: Vec<&RelayProc> = relays.iter().chain(&sybils).collect();
    let c = consensus_where(&infos, Duration::from_secs(120), |c| has_all(c, &everyone))
        .unwrap_or_else(|| {
            panic!(
                "no consensus with every relay; authority 0:\n{}",
                std::fs::read_to_string(infos[0].dir.join("authority.log")).unwrap_or_default()
            )
        });

    let sybil_ids: Vec<IdentityKey> = sybils.iter().map(id).collect();
    let honest_min = relays
        .iter()
        .filter_map(|r| c.relay(&id(r)))
        .filter(|r| r.roles.mix)
        .map(|r| r.weight)
        .min()
        .unwrap();
    for s in &sybil_ids {
        let r = c.relay(s).unwrap();
        assert_eq!(
            r.bandwidth,
            u32::MAX,
            "the Sybil's claim is listed as claimed"
        );
        assert!(r.performance >= 500, "{r:?}");
        // Weighted by its claim it would outweigh an honest mix a million times over.
        assert!(
            u64::from(r.weight) < 1000 * u64::from(honest_min.max(1)),
            "a Sybil weighs {} against an honest mix's {honest_min}",
            r.weight
        );
    }

    // The bound: per layer, the Sybils' share of the layer's measured weight; a path avoids
    // them with probability Π (1 − share), so it meets one with probability
    // p = 1 − Π (1 − share). Over 10,000 paths the observed rate must not pass p by more
    // than 4 standard deviations (plus 1% for the weights' rounding).
    let selector = PathSelector::new(
        &c,
        PathRules {
            distinct_subnets: false,
            ..PathRules::default()
        },
    );
    let mut avoid = 1.0;
    for layer in 1..=3 {
        let all: u64 = selector
            .layer(layer)
            .iter()
            .map(|r| u64::from(r.weight.max(1)))
            .sum();
        let bad: u64 = selector
            .layer(layer)
            .iter()
            .filter(|r| sybil_ids.contains(&r.identity))
            .map(|r| u64::from(r.weight.max(1)))
            .sum();
        avoid *= 1.0 - bad as f64 / all as f64;
    }
    let bound = 1.0 - avoid;
    let n = 10_000;
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let through_sybil = (0..n)
        .filter(|_| {
            let path = selector.mix_path(&mut rng, &[]).unwrap();
            path.iter().any(|r| sybil_ids.contains(&r.identity))
        })
        .count();
    let observed = through_sybil as f64 / n as f64;
    let sigma = (bound * (1.0 - bound) / n as f64).sqrt();
    eprintln!(
        "Sybils on {observed:.3} of {n} paths; measured-weight bound {bound:.3} (σ {sigma:.4}); \
         Sybil weights {:?}, smallest honest mix {honest_min}",
        sybil_ids
            .iter()
            .map(|s| c.relay(s).unwrap().weight)
            .collect::<Vec<_>>()
    );
    assert!(
        observed <= bound + 4.0 * sigma + 0.01,
        "Sybils on {observed} of paths, above their measured share {bound}"
    );
}

/// A TCP proxy in front of a relay's mix port: it always passes the Noise XK handshake (the
/// dialer's 48 + 64 bytes and the relay's 48), and after it passes or discards what the
/// dialer sends as `drop` says. Its target is set once the relay has its port.
struct DroppingProxy {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    drop: Arc<AtomicBool>,
}

/// Dialer bytes of the XK handshake (`-> e, es` and `-> s, se`).
const HANDSHAKE_FROM_DIALER: usize = 48 + 64;

impl DroppingProxy {
    fn start(host: Ipv4Addr) -> DroppingProxy {
        let listener = TcpListener::bind((host, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let drop = Arc::new(AtomicBool::new(false));
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (flag, to) = (drop.clone(), target.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming().flatten() {
                let Some(to) = *to.lock().unwrap() else {
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(to) else {
                    continue;
                };
                let (mut in_read, mut out_write) =
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                let (mut out_read, mut in_write) = (outbound, inbound);
                let flag = flag.clone();
                std::thread::spawn(move || {
                    let mut passed = 0usize;
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = in_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let handshake = HANDSHAKE_FROM_DIALER.saturating_sub(passed).min(n);
                        let forward = if flag.load(Ordering::Relaxed) {
                            handshake
                        } else {
                            n
                        };
                        passed += n;
                        if out_write.write_all(&buf[..forward]).is_err() {
                            break;
                        }
                    }
                    let _ = out_write.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut out_read, &mut in_write);
                    let _ = in_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        DroppingProxy { addr, target, drop }
    }
}

#[test]
fn a_relay_that_drops_every_packet_is_voted_out_and_back_in_once_it_carries_them() {
    let dir = tempfile::tempdir().unwrap();
    let (infos, _authorities) = start_authorities(dir.path(), 3, EPOCH_S);
    let relays = honest(dir.path(), &infos);
    // The world (the authorities' probers, other relays) reaches the relay under test only
    // through the proxy, which its descriptor advertises.
    let proxy = DroppingProxy::start(next_relay_host());
    let victim = start_relay_with(
        dir.path(),
        "dropper",
        "[\"mix\"]",
        &infos,
        EPOCH_S,
        "",
        &format!("advertise_mix = \"{}\"\n", proxy.addr),
        LOOPBACK,
    );
    *proxy.target.lock().unwrap() = Some(victim.mix);
    let everyone: Vec<&RelayProc> = relays.iter().chain([&victim]).collect();
    let first = consensus_where(&infos, Duration::from_secs(120), |c| has_all(c, &everyone))
        .expect("the relay under test is voted in while it carries packets");
    let listed = first.relay(&id(&victim)).unwrap();
    assert_eq!(listed.addresses.mix, proxy.addr);
    assert!(listed.performance >= 500);

    // It keeps completing handshakes, and drops everything after them.
    proxy.drop.store(true, Ordering::Relaxed);
    let out = consensus_where(&infos, Duration::from_secs(8 * EPOCH_S), |c| {
        c.epoch > first.epoch
            && c.relay(&id(&victim)).is_none()
            && has_all(c, &relays.iter().collect::<Vec<_>>())
    })
    .expect("a relay that drops every packet is out of a later consensus");
    let prober_says = murmur_tests::scrape(
        infos_metrics(&infos[0]),
        "murmur_directory_probes_total",
        "result=\"lost\"",
    )
    .unwrap_or(0.0);
    assert!(prober_says >= 1.0, "the prober counted no lost round");

    // It carries packets again: in again once its recent record is good.
    proxy.drop.store(false, Ordering::Relaxed);
    let back = consensus_where(&infos, Duration::from_secs(8 * EPOCH_S), |c| {
        c.epoch > out.epoch && c.relay(&id(&victim)).is_some()
    })
    .expect("the relay is voted in again once it passes the tests");
    eprintln!(
        "in at epoch {}, out at {}, back at {}",
        first.epoch, out.epoch, back.epoch
    );
}

/// The address of an authority's HTTP API (where `/metrics` is).
fn infos_metrics(a: &AuthorityInfo) -> SocketAddr {
    a.url.trim_start_matches("http://").parse().unwrap()
}

/// A descriptor of a mix nobody runs, at a loopback address of its own where nothing
/// listens (so a test of it is refused at once, as an unreachable host's would time out).
fn sybil_descriptor(
    n: u32,
    epoch: u32,
    rng: &mut ChaCha20Rng,
) -> murmur_protocol::directory::SignedDescriptor {
    use murmur_protocol::directory::{
        DIRECTORY_SCHEMA, Descriptor, EpochKey, ExitPolicy, RelayAddresses, Roles, SignedDescriptor,
    };
    use rand::RngExt;
    let key = ed25519_dalek::SigningKey::generate(rng);
    let ip = Ipv4Addr::new(
        127,
        100 + (n / 62_500) as u8,
        (n / 250 % 250) as u8,
        (n % 250 + 1) as u8,
    );
    let d = Descriptor {
        schema: DIRECTORY_SCHEMA,
        identity: IdentityKey::of(&key),
        family: format!("sybil-{n}"),
        family_members: Vec::new(),
        addresses: RelayAddresses {
            mix: SocketAddr::from((ip, 9)),
            client: None,
        },
        roles: Roles {
            mix: true,
            ..Roles::default()
        },
        link_key: murmur_protocol::link::LinkPublic(rng.random()),
        sphinx_keys: [epoch, epoch + 1]
            .iter()
            .map(|&epoch| EpochKey {
                epoch,
                key: rng.random(),
                payment_commitment: rng.random(),
            })
            .collect(),
        exit_policy: ExitPolicy::reject_all(),
        price_per_packet: 1,
        bandwidth: u32::MAX,
        chain_address: None,
        published: murmur_directory::unix_now(),
    };
    SignedDescriptor::sign(&d, &key).unwrap()
}

#[test]
fn fifteen_thousand_sybil_uploads_leave_every_honest_relay_in_the_consensus() {
    let dir = tempfile::tempdir().unwrap();
    // Stores smaller than the flood: it must evict its own, never a tested relay.
    let (infos, _authorities) = murmur_tests::start_authorities_limited(
        dir.path(),
        3,
        EPOCH_S,
        murmur_tests::TEST_NETWORK,
        "max_descriptors = 4000\n",
    );
    let relays = honest(dir.path(), &infos);
    let everyone: Vec<&RelayProc> = relays.iter().collect();
    let before = consensus_where(&infos, Duration::from_secs(120), |c| has_all(c, &everyone))
        .expect("the honest network has a consensus");

    // Three disjoint sets of 5,000, set i to authorities i and i + 1.
    let epoch = before.epoch;
    let mut rng = ChaCha20Rng::seed_from_u64(15);
    let sets: Vec<Vec<_>> = (0..3u32)
        .map(|s| {
            (0..5_000u32)
                .map(|n| sybil_descriptor(s * 5_000 + n, epoch, &mut rng))
                .collect()
        })
        .collect();
    let rt = runtime(2);
    let started = std::time::Instant::now();
    let accepted: usize = rt.block_on(async {
        let client =
            murmur_directory::client::DirectoryClient::new(Duration::from_secs(10)).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        let mut accepted = 0;
        for (s, set) in sets.iter().enumerate() {
            let urls = vec![infos[s].url.clone(), infos[(s + 1) % 3].url.clone()];
            for d in set {
                while tasks.len() >= 32 {
                    if let Some(Ok(n)) = tasks.join_next().await {
                        accepted += n;
                    }
                }
                let (client, urls, d) = (client.clone(), urls.clone(), d.clone());
                tasks.spawn(async move {
                    client
                        .upload_descriptor(&urls, &d)
                        .await
                        .iter()
                        .filter(|r| r.is_ok())
                        .count()
                });
            }
        }
        while let Some(joined) = tasks.join_next().await {
            accepted += joined.unwrap_or(0);
        }
        accepted
    });
    eprintln!(
        "{accepted} of 30,000 Sybil uploads accepted in {:?}",
        started.elapsed()
    );
    assert!(accepted >= 25_000, "the flood did not land ({accepted})");

    // A relay that joins after the flood, while every store is full of Sybils.
    let late = start_relay(
        dir.path(),
        "mix-late",
        "[\"mix\"]",
        &infos,
        EPOCH_S,
        LOOPBACK,
    );
    let mut all: Vec<&RelayProc> = relays.iter().collect();
    all.push(&late);
    let after = consensus_where(&infos, Duration::from_secs(10 * EPOCH_S), |c| {
        c.epoch > epoch + 1 && has_all(c, &all)
    })
    .unwrap_or_else(|| {
        panic!(
            "no consensus with every honest relay after the flood; authority 0:\n{}",
            std::fs::read_to_string(infos[0].dir.join("authority.log")).unwrap_or_default()
        )
    });
    assert_eq!(
        after.relays.len(),
        all.len(),
        "no Sybil is in the consensus: none passed a test"
    );
    let held = murmur_tests::scrape(
        infos_metrics(&infos[0]),
        "murmur_directory_descriptors_held",
        "",
    )
    .unwrap();
    assert!(held <= 4000.0, "the store stayed within its bound ({held})");
}
