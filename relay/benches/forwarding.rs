//! `cargo bench -p murmur-relay --bench forwarding`: how many packets per second one relay
//! forwards on loopback with zero delay, against the raw single-hop Sphinx rate of the same
//! machine on all cores, measured in the same run.
//!
//! - Relay: an in-process [`Node`] (role mix, replay state on disk as in production, a
//!   Prometheus recorder installed) with a consensus that lists itself and a sink, a TCP
//!   listener of this benchmark; both have real link keys, and every link is Noise XK as
//!   between relays. A client thread (proving the sink's link key, a key of the consensus) sends
//!   pre-built two-hop packets [relay, sink] as sealed relay-link frames, keeping at most
//!   `WINDOW` packets in flight so the relay is saturated without its input queue overflowing;
//!   the rate is packets arriving at the sink per second. The relay opens every frame it reads
//!   and seals every frame it writes while it is timed. The client and the sink stand for other
//!   relays, whose work is not this relay's: the client seals its frames before the round (as
//!   the packets are built before it), and the sink counts the sealed messages as they arrive
//!   and opens every one of them after the round, checking each is a frame.
//! - Raw: one thread per core, each opening and processing (`OpenedPacket::open` +
//!   `process`) pre-built packets in a loop, nothing else.
//!
//! - Payments: the relay takes payments at an in-process ledger where the bench's pot is
//!   funded. Each round sends one batch of packets whose envelopes carry no ticket and one
//!   whose envelopes each carry a ticket for the relay (the worst case: a client pays each
//!   relay one ticket per 64 packets by default), so the cost of verifying tickets is the
//!   difference between the two rates.
//!
//! Rounds alternate (raw, relay, raw, relay, ...) so that load from elsewhere on a shared
//! machine touches both; the medians and their ratio are printed. So is the CPU time each
//! packet cost, by thread, with what the client and sink (which stand for other relays) do
//! during the round (writing and reading sealed frames; not sealing and opening them) counted
//! against the relay. When other work competes for the cores the scheduler gives the relay's
//! six threads a larger share than the raw test's two, and the throughput ratio reads high;
//! the CPU ratio (raw CPU per packet ÷ relay CPU per packet) does not depend on that, and is
//! what the throughput ratio comes to on an idle machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use murmur_ledger::Settlement;
use murmur_ledger::client::LedgerClient;
use murmur_ledger::request::{Fund, Signed};
use murmur_protocol::directory::{
    Consensus, ConsensusRelay, DIRECTORY_SCHEMA, EpochKey, ExitPolicy, IdentityKey, NetworkParams,
    RelayAddresses, Roles,
};
use murmur_protocol::envelope::{Envelope, SlotTicket};
use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::link::{LinkPublic, LinkSecret, SEALED_FRAME_LEN, Transport};
use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, Packet, PublicKey, RouteHop, StaticSecret,
    build_packet_with_envelope,
};
use murmur_protocol::ticket::{Terms, Ticket, TicketFields};
use murmur_relay::{Config, Node};
use murmur_tests::link::{Link, accept_on};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 3;
/// Packets per relay round (each packet is good once: the relay refuses replays).
const RELAY_PACKETS: usize = 40_000;
/// Packets in flight between the client and the sink.
const WINDOW: u64 = 4096;
/// Frames per write.
const CHUNK: u64 = 128;
const RAW_PACKETS: usize = 512;
const RAW_TIME: Duration = Duration::from_secs(3);
const EPOCH: u32 = 1_000;

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = loadavg();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let prometheus = murmur_relay::metrics::builder()
        .unwrap()
        .install_recorder()
        .unwrap();

    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let pot = SigningKey::generate(&mut rng);
    let (ledger_url, ledger_key) = rt.block_on(start_ledger(dir.path(), &pot));
    let identity = SigningKey::generate(&mut rng);
    let sink_identity = SigningKey::generate(&mut rng);
    let sink_secret = StaticSecret::random_from_rng(&mut rng);
    let config = Config::parse(
        &format!(
            "version = 1\n[relay]\nfamily = \"bench\"\nroles = [\"mix\"]\nstate_dir = \"{}\"\n\
             [listen]\nmix = \"127.0.0.1:0\"\n[mixing]\nreplay_capacity = 1000000\n\
             [payments]\nledger = \"{ledger_url}\"\nledger_key = \"{ledger_key}\"\n\
             max_tickets_per_epoch = 1000000\n",
            dir.path().join("state").display()
        ),
        dir.path().to_path_buf(),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let node = rt
        .block_on(Node::start(config, identity.clone(), shutdown.clone()))
        .unwrap();
    node.rotate_keys(EPOCH).unwrap();
    let relay_key = node.keys().get(EPOCH).unwrap().public;

    let sink_link = Arc::new(LinkSecret::generate(&mut rng));
    let sink = Sink::start(sink_link.clone());
    let relay_link = node.link_public();
    node.apply_consensus(Arc::new(consensus(
        (&identity, node.mix_addr(), relay_key, relay_link),
        (
            &sink_identity,
            sink.addr,
            PublicKey::from(&sink_secret),
            sink_link.public(),
        ),
    )));
    // The client stands for other relays: it proves the sink's key, one of the consensus.
    let client = (&*sink_link, &relay_link);
    let route = [
        RouteHop {
            address: node.address(),
            sphinx_key: relay_key,
        },
        RouteHop {
            address: Address(sink_identity.verifying_key().to_bytes()),
            sphinx_key: PublicKey::from(&sink_secret),
        },
    ];

    let t = Instant::now();
    let raw_secret = StaticSecret::random_from_rng(&mut rng);
    let raw_route = [
        RouteHop {
            address: Address([1; 32]),
            sphinx_key: PublicKey::from(&raw_secret),
        },
        route[1].clone(),
    ];
    let raw_packets: Vec<Packet> = build_many(&raw_route, RAW_PACKETS, cores, 1, None)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let raw_packets = Arc::new(raw_packets);
    let commitment = node.keys().get(EPOCH).unwrap().payment_commitment();
    let paid = Some((&pot, IdentityKey::of(&identity), commitment));
    let frames_of = |packets: Vec<(Packet, Envelope)>| {
        let mut frames = Vec::with_capacity(RELAY_PACKETS * FRAME_LEN);
        for (packet, envelope) in packets {
            let frame = Frame::Packet {
                key_epoch: EPOCH,
                packet,
                envelope,
            };
            frames.extend_from_slice(&frame.encode().unwrap()[..]);
        }
        frames
    };
    let ticket_rounds: Vec<Vec<u8>> = (0..ROUNDS)
        .map(|r| {
            frames_of(build_many(
                &route,
                RELAY_PACKETS,
                cores,
                500 + r as u64,
                paid,
            ))
        })
        .collect();
    let rounds: Vec<Vec<u8>> = (0..ROUNDS)
        .map(|r| {
            frames_of(build_many(
                &route,
                RELAY_PACKETS,
                cores,
                100 + r as u64,
                None,
            ))
        })
        .collect();
    println!(
        "built {} packets in {:.1} s; {cores} cores",
        RAW_PACKETS + 2 * ROUNDS * RELAY_PACKETS,
        t.elapsed().as_secs_f64()
    );

    let mut raw_rates = Vec::new();
    let mut relay_rates = Vec::new();
    let mut ticket_rates = Vec::new();
    let mut raw_cpu = (0.0, 0u64);
    let mut relay_cpu: BTreeMap<String, f64> = BTreeMap::new();
    for (r, frames) in rounds.iter().enumerate() {
        let before = process_cpu();
        let (raw, n) = raw_rate(&raw_packets, &raw_secret, cores);
        raw_cpu.0 += process_cpu() - before;
        raw_cpu.1 += n;
        let round = seal_round(node.mix_addr(), client, frames);
        let between = thread_cpu();
        let (relay, lost) = relay_rate(round, &sink);
        let after = thread_cpu();
        for (name, t) in &after {
            *relay_cpu.entry(thread_kind(name)).or_default() +=
                t - between.get(name).copied().unwrap_or(0.0);
        }
        let opened = sink.open_all();
        let round = seal_round(node.mix_addr(), client, &ticket_rounds[r]);
        let (paid, paid_lost) = relay_rate(round, &sink);
        let paid_opened = sink.open_all();
        println!(
            "round {}: raw Sphinx {raw:.0} packets/s on {cores} threads; relay {relay:.0} \
             packets/s ({lost} lost); ratio {:.3}; relay with a ticket in every packet \
             {paid:.0} packets/s ({paid_lost} lost); the sink opened {opened} + {paid_opened} \
             sealed frames",
            r + 1,
            relay / raw
        );
        raw_rates.push(raw);
        relay_rates.push(relay);
        ticket_rates.push(paid);
    }
    let paid_rate = median(&mut ticket_rates);
    let (raw, relay) = (median(&mut raw_rates), median(&mut relay_rates));
    println!(
        "median: relay forwards {relay:.0} packets/s with zero delay; raw single-hop Sphinx \
         {raw:.0} packets/s on {cores} cores; ratio {:.3}",
        relay / raw
    );
    println!(
        "payments: relay forwards {paid_rate:.0} packets/s when every packet carries a \
         ticket, {relay:.0} without tickets ({:.1}% fewer)",
        (1.0 - paid_rate / relay) * 100.0
    );
    let per_packet = |secs: f64, n: f64| format!("{:.1} µs", secs / n * 1e6);
    let relayed = (ROUNDS * RELAY_PACKETS) as f64;
    let relay_total: f64 = relay_cpu.values().sum();
    println!(
        "CPU per packet: raw {}; relay {} in all (CPU ratio {:.3}): {}",
        per_packet(raw_cpu.0, raw_cpu.1 as f64),
        per_packet(relay_total, relayed),
        (raw_cpu.0 / raw_cpu.1 as f64) / (relay_total / relayed),
        relay_cpu
            .iter()
            .filter(|(_, t)| **t > 0.0)
            .map(|(k, t)| format!("{k} {}", per_packet(*t, relayed)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("load average: {} before, {} after", load_before, loadavg());
    let drops: Vec<String> = prometheus
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("murmur_relay_packets_dropped_total")
                || l.starts_with("murmur_relay_tickets_")
        })
        .map(str::to_string)
        .collect();
    println!("relay drops: {drops:?}");
    shutdown.cancel();
    rt.block_on(node.join());
}

/// A ledger on loopback whose genesis credits `pot`'s account, with `pot` funded from it;
/// its URL and identity.
async fn start_ledger(dir: &std::path::Path, pot: &SigningKey) -> (String, IdentityKey) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut config = murmur_ledger::Config::with_defaults();
    config.key_file = dir.join("ledger.key");
    let ledger_key = murmur_directory::keys::keygen(&config.key_file).unwrap();
    config.listen = listener.local_addr().unwrap();
    config.state_dir = dir.join("ledger");
    config.genesis = vec![murmur_ledger::config::GenesisEntry {
        account: IdentityKey::of(pot).to_hex(),
        amount: 1 << 50,
    }];
    tokio::spawn(murmur_ledger::serve(
        config,
        listener,
        std::future::pending(),
    ));
    let client = LedgerClient::new(&url, ledger_key, Duration::from_secs(10)).unwrap();
    let fund = Fund {
        pot: IdentityKey::of(pot),
        balance: 1 << 48,
        escrow: 2 * FACE_VALUE,
    };
    let mut funded = false;
    for _ in 0..50 {
        let signed = Signed::new(fund, pot, murmur_ledger::unix_now());
        if client.fund(signed).await.is_ok() {
            funded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(funded, "the bench's ledger did not fund the pot");
    (url, ledger_key)
}

/// What the bench's tickets pay when they win; each is worth 64 base units on average, as a
/// client's ticket for 64 packets at price 1 is.
const FACE_VALUE: u64 = 1_000_000;

/// A consensus for `EPOCH` listing the relay and the sink (identity, link address, Sphinx key,
/// link key), without relay loop cover.
fn consensus(
    relay: (&SigningKey, SocketAddr, PublicKey, LinkPublic),
    sink: (&SigningKey, SocketAddr, PublicKey, LinkPublic),
) -> Consensus {
    let mut relays: Vec<ConsensusRelay> = [(relay, 1u8), (sink, 2u8)]
        .into_iter()
        .map(|((identity, addr, key, link_key), layer)| ConsensusRelay {
            identity: IdentityKey::of(identity),
            family: format!("bench-{layer}"),
            addresses: RelayAddresses {
                mix: addr,
                client: None,
            },
            roles: Roles {
                mix: true,
                ..Roles::default()
            },
            layer: Some(layer),
            link_key,
            sphinx_keys: vec![EpochKey {
                epoch: EPOCH,
                key: key.to_bytes(),
                payment_commitment: [0; 32],
            }],
            exit_policy: ExitPolicy::reject_all(),
            price_per_packet: 1,
            bandwidth: 1000,
            chain_address: None,
            family_members: Vec::new(),
            weight: 1000,
            performance: 1000,
        })
        .collect();
    relays.sort_by_key(|r| r.identity);
    let params = NetworkParams {
        lambda_m: 0.0,
        ..NetworkParams::nym_like()
    };
    let start = u64::from(EPOCH) * params.epoch_length_s;
    Consensus {
        schema: DIRECTORY_SCHEMA,
        epoch: EPOCH,
        valid_after: start,
        fresh_until: start + params.epoch_length_s,
        valid_until: start + 2 * params.epoch_length_s,
        params,
        relays,
    }
}

/// `n` zero-delay packets over `route`, built on `threads` threads.
/// `n` packets over `route` on `threads` threads. With `paid` (the pot's key, and the
/// relay's identity and commitment), each carries in the first hop's slot a ticket worth 64
/// base units, as a client's ticket for 64 packets at price 1 is.
fn build_many(
    route: &[RouteHop],
    n: usize,
    threads: usize,
    seed: u64,
    paid: Option<(&SigningKey, IdentityKey, [u8; 32])>,
) -> Vec<(Packet, Envelope)> {
    let destination = route[route.len() - 1].address;
    let per = n.div_ceil(threads);
    let terms = Terms::for_expected_value(64, FACE_VALUE).unwrap();
    let now = murmur_ledger::unix_now();
    let ticket = move |rng: &mut ChaCha20Rng| {
        let (pot, recipient, commitment) = paid?;
        let fields = TicketFields {
            recipient,
            face_value: terms.face_value,
            win_ratio: terms.win_ratio,
            nonce: rng.random(),
            issued: now,
            expiry: now + 3600,
            commitment,
        };
        SlotTicket::from_ticket(&Ticket::sign(fields, pot)).ok()
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                std::thread::Builder::new()
                    .name(format!("build-{t}"))
                    .spawn_scoped(s, move || {
                        let mut rng = ChaCha20Rng::seed_from_u64(seed * 1000 + t as u64);
                        let count = per.min(n.saturating_sub(t * per));
                        (0..count)
                            .map(|_| {
                                let slots = [ticket(&mut rng), None];
                                build_packet_with_envelope(
                                    &mut rng,
                                    route,
                                    &[Duration::ZERO, Duration::ZERO],
                                    destination,
                                    [0; 16],
                                    b"forwarding benchmark",
                                    &slots,
                                )
                                .unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                    .unwrap()
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// Single-hop processing on `threads` threads for `RAW_TIME`; packets per second and count.
fn raw_rate(packets: &Arc<Vec<Packet>>, secret: &StaticSecret, threads: usize) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (packets, secret, stop, done) =
                (packets.clone(), secret.clone(), stop.clone(), done.clone());
            std::thread::Builder::new()
                .name(format!("raw-{t}"))
                .spawn(move || {
                    let mut i = t;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let p = &packets[i % packets.len()];
                        let opened = OpenedPacket::open(p.as_bytes(), &secret).unwrap();
                        match opened.process(Duration::MAX).unwrap() {
                            HopOutput::Forward { packet, .. } => {
                                std::hint::black_box(packet);
                            }
                            HopOutput::Final(_) => unreachable!(),
                        }
                        i += 1;
                        n += 1;
                    }
                    done.fetch_add(n, Ordering::Relaxed);
                })
                .unwrap()
        })
        .collect();
    std::thread::sleep(RAW_TIME);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    (n as f64 / start.elapsed().as_secs_f64(), n)
}

/// A link to the relay and a round's frames sealed for it, in order, before the round.
struct Round {
    link: Link,
    sealed: Vec<u8>,
}

/// Opens a link to the relay proving `client.0` (and expecting `client.1`) and seals `frames`
/// for it: the client's work, done before the round as the packets were built before it.
fn seal_round(relay: SocketAddr, client: (&LinkSecret, &LinkPublic), frames: &[u8]) -> Round {
    let mut link = Link::connect(relay, client.0, client.1);
    let mut sealed = Vec::new();
    link.seal_into(frames, &mut sealed).unwrap();
    Round { link, sealed }
}

/// Sends a round's frames to the relay, at most `WINDOW` ahead of what reached the sink;
/// returns the sink's packets per second and how many never arrived.
fn relay_rate(round: Round, sink: &Sink) -> (f64, u64) {
    let Round { mut link, sealed } = round;
    let n = (sealed.len() / SEALED_FRAME_LEN) as u64;
    let base = sink.received.load(Ordering::Relaxed);
    let arrived = || sink.received.load(Ordering::Relaxed) - base;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut last_progress = (0, Instant::now());
    while arrived() < n {
        // Large writes and few wake-ups: the client stands for other relays, so it should
        // take as little of the machine as it can.
        let room = (WINDOW + arrived())
            .saturating_sub(sent)
            .min(n - sent)
            .min(CHUNK);
        if room == CHUNK || (room > 0 && sent + room == n) {
            let from = sent as usize * SEALED_FRAME_LEN;
            link.stream
                .write_all(&sealed[from..from + room as usize * SEALED_FRAME_LEN])
                .unwrap();
            sent += room;
        } else {
            std::thread::sleep(Duration::from_micros(500));
        }
        // Packets the relay dropped never arrive: stop once nothing moves for a while.
        let a = arrived();
        if a != last_progress.0 {
            last_progress = (a, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let a = arrived();
    (a as f64 / start.elapsed().as_secs_f64(), n - a)
}

/// Counts the sealed frames the relay forwards to it, over links where it proves `key`, and
/// opens them when asked.
struct Sink {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    links: Arc<Mutex<Vec<Arc<Mutex<SinkLink>>>>>,
}

/// One link into the sink: its transport and what it brought that is not opened yet.
struct SinkLink {
    transport: Transport,
    unopened: Vec<u8>,
}

impl Sink {
    fn start(key: Arc<LinkSecret>) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sink = Sink {
            addr: listener.local_addr().unwrap(),
            received: Arc::default(),
            links: Arc::default(),
        };
        let (received, links) = (sink.received.clone(), sink.links.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (received, links, key) = (received.clone(), links.clone(), key.clone());
                std::thread::Builder::new()
                    .name("sink".into())
                    .spawn(move || {
                        let Ok(transport) = accept_on(&mut stream, &key) else {
                            return;
                        };
                        let link = Arc::new(Mutex::new(SinkLink {
                            transport,
                            unopened: Vec::new(),
                        }));
                        links.lock().unwrap().push(link.clone());
                        let mut buf = vec![0u8; 64 * SEALED_FRAME_LEN];
                        let mut total = 0;
                        loop {
                            let n = match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            link.lock().unwrap().unopened.extend_from_slice(&buf[..n]);
                            // Every message on a link is one sealed frame.
                            let whole = total / SEALED_FRAME_LEN;
                            total += n;
                            received.fetch_add(
                                (total / SEALED_FRAME_LEN - whole) as u64,
                                Ordering::Relaxed,
                            );
                        }
                    })
                    .unwrap();
            }
        });
        sink
    }

    /// Opens every whole sealed frame received so far (panicking at one that does not open to
    /// a frame); how many.
    fn open_all(&self) -> u64 {
        let mut frame = vec![0u8; FRAME_LEN];
        let mut opened = 0;
        for link in self.links.lock().unwrap().iter() {
            let mut link = link.lock().unwrap();
            let SinkLink {
                transport,
                unopened,
            } = &mut *link;
            let whole = unopened.len() / SEALED_FRAME_LEN * SEALED_FRAME_LEN;
            for sealed in unopened[..whole].chunks_exact(SEALED_FRAME_LEN) {
                transport.open(sealed, &mut frame).unwrap();
                Frame::decode(&frame).unwrap();
                opened += 1;
            }
            unopened.drain(..whole);
        }
        opened
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// CPU seconds (user + system) of a `/proc/.../stat` line, and its "pid (comm" head.
fn cpu_of(stat: &str) -> Option<(&str, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    // utime and stime are the 12th and 13th fields after the command name, in 10 ms ticks.
    let ticks: f64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|x| x.parse::<f64>().unwrap_or(0.0))
        .sum();
    Some((head, ticks / 100.0))
}

/// CPU seconds used so far by this process, finished threads included.
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    cpu_of(&stat).map_or(0.0, |(_, t)| t)
}

/// CPU seconds used so far by each running thread of this process, by "id (name".
fn thread_cpu() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let Some((head, secs)) = cpu_of(&stat) else {
            continue;
        };
        out.insert(head.to_string(), secs);
    }
    out
}

/// What a thread is, from its name: `sphinx-0` and `sphinx-1` are both "Sphinx workers".
fn thread_kind(name: &str) -> String {
    let comm = name.split_once('(').map_or(name, |(_, n)| n);
    match comm {
        c if c.starts_with("sphinx-") => "Sphinx workers",
        c if c.starts_with("tokio-") => "async runtime (links, router)",
        "replay-flusher" => "replay flusher (fsync)",
        "sink" => "sink (bench)",
        c if c.starts_with("raw-") || c.starts_with("build-") => "other",
        _ => "client (bench)",
    }
    .to_string()
}

/// The 1-minute load average (other work on a shared machine skews the rates).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}
