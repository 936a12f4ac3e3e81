//! The whole path in one process under a virtual clock, in the style of quinn's test `Pair`:
//! the real [`ClientSession`], the real hop step (`hop::process`, through `testkit::Relay`)
//! at every relay (the gateway, three mix layers and the exit of a synthetic consensus), the
//! real sans-IO exit, and an in-memory
//! internet behind the exit whose targets answer with known bytes, echo, or refuse. Every
//! link loses, duplicates and delays (reorders) packets at random, and some mixes black-hole
//! everything they get, so the client's suspect set has something to find. One seed decides
//! everything.
//!
//! The clock jumps to the earliest of the client's, the exit's and the network's next
//! wake-ups ([`Pair::step`]); nothing waits in real time.
//!
//! The property ([`every_stream_completes_byte_exact_or_is_reset`]): within [`BOUND`] of
//! virtual time every stream either delivers exactly the bytes its target sent, followed by
//! the end of the stream, or ends with a refusal or reset carrying a SOCKS error code. None
//! hangs, none delivers a wrong byte, and on a network without faults every stream completes.
//! Its first finding is kept as `data_that_overtakes_its_open_is_not_lost`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use murmur_protocol::PAYLOAD_SIZE;
use murmur_protocol::envelope::Envelope;
use murmur_protocol::exit::{ExitConfig, ExitEvent, ExitSession, REPLY_DATA_LEN, StreamKey};
use murmur_protocol::frame::Frame;
use murmur_protocol::hop::HopError;
use murmur_protocol::packet::{Address, Packet, SurbId};
use murmur_protocol::session::{ClientSession, Event, SessionConfig};
use murmur_protocol::stream::{Refusal, StreamId, Target};
use murmur_protocol::testkit::{self, Landing};
use murmur_protocol::time::Instant;
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Virtual time within which every stream must have completed or been reset. The session
/// gives up on a packet after `MAX_ATTEMPTS` sends, each after at most 1.5 × its route's
/// delays (each clamped to 1 s) + `ACK_SLACK`; the exit re-sends unacknowledged replies and
/// ends streams that make no progress. Generous against those, so that a failure is a hang,
/// not a slow run.
const BOUND: Duration = Duration::from_secs(120);

/// Sends of one packet before the session resets its streams.
const MAX_ATTEMPTS: u32 = 12;
const ACK_SLACK: Duration = Duration::from_millis(200);

/// What every link does to the packets it carries.
#[derive(Clone, Copy, Debug)]
struct Faults {
    /// Probability that a packet is lost on a link.
    loss: f64,
    /// Probability that a link delivers a packet twice.
    duplicate: f64,
    /// Probability that a packet takes up to `jitter` longer than `latency` (so packets
    /// overtake each other).
    reorder: f64,
    latency: Duration,
    jitter: Duration,
}

impl Faults {
    const NONE: Faults = Faults {
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
        latency: Duration::from_millis(5),
        jitter: Duration::ZERO,
    };
}

/// What crosses a link.
enum Arrival {
    /// A client's frame reaches its gateway, which passes the packet to its first mix.
    Gateway {
        next_hop: Address,
        packet: Packet,
        envelope: Envelope,
    },
    /// A packet reaches a relay, which takes its Sphinx step.
    Relay {
        at: Address,
        packet: Packet,
        envelope: Envelope,
    },
    /// The gateway delivers a packet to the client.
    Client {
        surb_id: SurbId,
        payload: Box<[u8; PAYLOAD_SIZE]>,
    },
}

impl Arrival {
    fn duplicate(&self) -> Arrival {
        match self {
            Arrival::Gateway {
                next_hop,
                packet,
                envelope,
            } => Arrival::Gateway {
                next_hop: *next_hop,
                packet: packet.clone(),
                envelope: envelope.clone(),
            },
            Arrival::Relay {
                at,
                packet,
                envelope,
            } => Arrival::Relay {
                at: *at,
                packet: packet.clone(),
                envelope: envelope.clone(),
            },
            Arrival::Client { surb_id, payload } => Arrival::Client {
                surb_id: *surb_id,
                payload: payload.clone(),
            },
        }
    }
}

struct Relay {
    node: testkit::Relay,
    /// Drops everything it gets (a dead or malicious mix).
    black_hole: bool,
}

/// What the network did, for the assertions and for a failing case's report.
#[derive(Debug, Default)]
struct NetCounts {
    crossings: u64,
    lost: u64,
    duplicated: u64,
    black_holed: u64,
    replays: u64,
    /// Hop errors other than replays: an honest network has none.
    hop_errors: BTreeMap<&'static str, u64>,
    at_exit: u64,
}

/// Where a target is and how it behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Sends `len` known bytes, then closes; takes whatever the client writes.
    Bytes(usize),
    /// Sends back what the client writes, and closes after the client did.
    Echo,
    /// Refuses the connection.
    Refuse,
}

impl Kind {
    fn target(self) -> Target {
        match self {
            Kind::Bytes(len) => Target::Host(format!("bytes-{len}.test"), 80),
            Kind::Echo => Target::Host("echo.test".into(), 7),
            Kind::Refuse => Target::Host("refuse.test".into(), 80),
        }
    }

    fn of(target: &Target) -> Option<Kind> {
        let Target::Host(host, _) = target else {
            return None;
        };
        if host == "echo.test" {
            return Some(Kind::Echo);
        }
        if host == "refuse.test" {
            return Some(Kind::Refuse);
        }
        let len = host.strip_prefix("bytes-")?.strip_suffix(".test")?;
        len.parse().ok().map(Kind::Bytes)
    }
}

/// The known bytes a `Bytes` target sends: position-dependent, so a byte out of place shows.
fn known_bytes(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect()
}

/// One connection of the internet behind the exit.
struct Conn {
    kind: Kind,
    /// What the target will still send.
    to_client: VecDeque<u8>,
    /// The target sends nothing after `to_client`.
    finished: bool,
    /// How much the exit let it read, once.
    grant: Option<usize>,
    closed_sent: bool,
}

/// The targets behind the exit.
#[derive(Default)]
struct Internet {
    conns: HashMap<StreamKey, Conn>,
    /// Everything written to each stream's target, kept after the stream ends.
    written: HashMap<StreamKey, Vec<u8>>,
    connects: u64,
}

/// What the application did with a stream and what it got.
struct AppStream {
    kind: Kind,
    upload: Vec<u8>,
    written: usize,
    closed: bool,
    received: Vec<u8>,
    opened: bool,
    /// The target's data ended (the stream is complete once the application's upload is
    /// written and closed too; a reset may still follow while the upload is in flight).
    eof: bool,
    failure: Option<Failure>,
}

impl AppStream {
    fn resolved(&self) -> bool {
        self.failure.is_some() || (self.eof && self.closed)
    }
}

/// How a stream failed, with its SOCKS5 reply code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Refused(u8),
    Reset(u8),
}

/// The network, the clock and both ends.
struct Pair {
    time: Instant,
    /// The network's randomness (faults), apart from the client's, so that the client's
    /// behaviour does not shift the faults.
    net_rng: ChaCha20Rng,
    client_rng: ChaCha20Rng,
    faults: Faults,
    max_hop_delay: Duration,
    relays: HashMap<Address, Relay>,
    exit_address: Address,
    client_address: Address,
    /// Packets on links, by arrival time (ties in sending order).
    in_flight: BTreeMap<(Instant, u64), Arrival>,
    sent: u64,
    client: ClientSession,
    exit: ExitSession,
    internet: Internet,
    streams: BTreeMap<StreamId, AppStream>,
    counts: NetCounts,
}

/// The shape of one run.
#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    faults: Faults,
    /// Per layer, whether one of its mixes black-holes everything.
    dead_mix_in_layer: [bool; 3],
    streams: Vec<(Kind, usize)>,
}

impl Pair {
    fn new(scenario: &Scenario) -> Pair {
        let (consensus, keys, mut rng) = common::network(scenario.seed, 2.0);
        let consensus = Arc::new(consensus);
        let mut dead: Vec<Address> = Vec::new();
        for (layer, &is_dead) in scenario.dead_mix_in_layer.iter().enumerate() {
            if is_dead {
                let mixes: Vec<Address> = consensus
                    .relays
                    .iter()
                    .filter(|r| r.layer == Some(layer as u8 + 1))
                    .map(|r| r.address())
                    .collect();
                dead.push(mixes[rng.random_range(0..mixes.len())]);
            }
        }
        let relays = consensus
            .relays
            .iter()
            .zip(keys)
            .map(|(r, k)| {
                let relay = Relay {
                    node: testkit::Relay::new(r.address(), k.sphinx, 1 << 16).unwrap(),
                    black_hole: dead.contains(&r.address()),
                };
                (r.address(), relay)
            })
            .collect();
        let gateway = consensus.relays.iter().find(|r| r.roles.gateway).unwrap();
        let exit_relay = consensus.relays.iter().find(|r| r.roles.exit).unwrap();
        let client_address = Address([0xc1; 32]);
        let mut config = SessionConfig::new(client_address);
        config.max_attempts = MAX_ATTEMPTS;
        config.ack_slack = ACK_SLACK;
        config.reply_timeout = Duration::from_secs(1);
        let mut client_rng = ChaCha20Rng::seed_from_u64(rng.random());
        let client = ClientSession::new(
            config,
            consensus.clone(),
            gateway.identity,
            Instant::ZERO,
            &mut client_rng,
        )
        .unwrap();
        let exit = ExitSession::new(
            ExitConfig::new(exit_relay.exit_policy.clone()),
            rng.random(),
        );
        Pair {
            time: Instant::ZERO,
            net_rng: ChaCha20Rng::seed_from_u64(rng.random()),
            client_rng,
            faults: scenario.faults,
            max_hop_delay: Duration::from_millis(consensus.params.max_hop_delay_ms),
            relays,
            exit_address: exit_relay.address(),
            client_address,
            in_flight: BTreeMap::new(),
            sent: 0,
            client,
            exit,
            internet: Internet::default(),
            streams: BTreeMap::new(),
            counts: NetCounts::default(),
        }
    }

    /// Opens a stream to a target of `kind` and queues `upload` for it.
    fn open(&mut self, kind: Kind, upload: Vec<u8>) -> StreamId {
        let id = self
            .client
            .open_stream(kind.target(), None, &mut self.client_rng)
            .unwrap();
        self.streams.insert(
            id,
            AppStream {
                kind,
                upload,
                written: 0,
                closed: false,
                received: Vec::new(),
                opened: false,
                eof: false,
                failure: None,
            },
        );
        id
    }

    /// Puts `arrival` on a link at `at`: lost, duplicated or delayed as the faults say.
    fn send(&mut self, at: Instant, arrival: Arrival) {
        self.counts.crossings += 1;
        let f = self.faults;
        if self.net_rng.random::<f64>() < f.loss {
            self.counts.lost += 1;
            return;
        }
        let copies = if self.net_rng.random::<f64>() < f.duplicate {
            self.counts.duplicated += 1;
            2
        } else {
            1
        };
        let mut arrival = Some(arrival);
        for copy in 0..copies {
            let mut delay = f.latency;
            if self.net_rng.random::<f64>() < f.reorder {
                delay += f.jitter.mul_f64(self.net_rng.random::<f64>());
            }
            let what = match (copy + 1 == copies, &arrival) {
                (true, _) => arrival.take(),
                (false, Some(a)) => Some(a.duplicate()),
                (false, None) => None,
            };
            if let Some(what) = what {
                self.sent += 1;
                self.in_flight.insert((at + delay, self.sent), what);
            }
        }
    }

    /// A packet arrived where it was going.
    fn arrive(&mut self, arrival: Arrival) {
        let now = self.time;
        match arrival {
            Arrival::Gateway {
                next_hop,
                packet,
                envelope,
            } => self.send(
                now,
                Arrival::Relay {
                    at: next_hop,
                    packet,
                    envelope,
                },
            ),
            Arrival::Relay {
                at,
                packet,
                envelope,
            } => self.relay(at, packet, envelope),
            Arrival::Client { surb_id, payload } => {
                self.client
                    .handle_delivery(surb_id, &payload[..], now, &mut self.client_rng)
            }
        }
    }

    /// Relay `at` takes its step on a packet.
    fn relay(&mut self, at: Address, packet: Packet, envelope: Envelope) {
        let now = self.time;
        let Some(relay) = self.relays.get_mut(&at) else {
            *self.counts.hop_errors.entry("unknown_relay").or_default() += 1;
            return;
        };
        if relay.black_hole {
            self.counts.black_holed += 1;
            return;
        }
        let stepped = match relay.node.step(&packet, envelope, self.max_hop_delay) {
            Ok(s) => s,
            Err(HopError::Replay) => {
                self.counts.replays += 1;
                return;
            }
            Err(e) => {
                *self.counts.hop_errors.entry(e.label()).or_default() += 1;
                return;
            }
        };
        match stepped.landing {
            Landing::Forward {
                next_hop,
                delay,
                packet,
                envelope,
            } => self.send(
                now + delay,
                Arrival::Relay {
                    at: next_hop,
                    packet,
                    envelope,
                },
            ),
            Landing::Deliver {
                destination,
                surb_id,
                payload,
            } if destination == self.client_address => {
                self.send(now, Arrival::Client { surb_id, payload })
            }
            Landing::Final(content) if at == self.exit_address => {
                self.counts.at_exit += 1;
                if let Some((ack, fragment)) = content.into_data() {
                    self.exit.handle_packet(now, ack, fragment);
                }
            }
            // Drop cover ends here.
            Landing::Deliver { .. } | Landing::Final(_) => {}
        }
    }

    /// Runs the internet on what the exit asks, and sends what the exit has to send.
    fn drive_exit(&mut self) {
        let now = self.time;
        loop {
            let mut progressed = false;
            while let Some(event) = self.exit.poll_event() {
                progressed = true;
                self.internet_event(event);
            }
            while let Some(reply) = self.exit.poll_transmit(now) {
                progressed = true;
                let envelope = Envelope::random(&mut self.net_rng);
                self.send(
                    now,
                    Arrival::Relay {
                        at: reply.first_hop,
                        packet: reply.packet,
                        envelope,
                    },
                );
            }
            if !progressed {
                return;
            }
        }
    }

    fn internet_event(&mut self, event: ExitEvent) {
        let now = self.time;
        match event {
            ExitEvent::Connect { key, target } => {
                self.internet.connects += 1;
                match Kind::of(&target) {
                    Some(Kind::Refuse) | None => {
                        let _ = self.exit.connect_failed(key, Refusal::ConnectionRefused);
                    }
                    Some(kind) => {
                        let to_client = match kind {
                            Kind::Bytes(len) => known_bytes(len).into(),
                            _ => VecDeque::new(),
                        };
                        let conn = Conn {
                            kind,
                            to_client,
                            finished: matches!(kind, Kind::Bytes(_)),
                            grant: None,
                            closed_sent: false,
                        };
                        self.internet.conns.insert(key, conn);
                        self.exit.connected(now, key).unwrap();
                    }
                }
            }
            ExitEvent::Write { key, bytes } => {
                self.internet
                    .written
                    .entry(key)
                    .or_default()
                    .extend_from_slice(&bytes);
                if let Some(conn) = self.internet.conns.get_mut(&key) {
                    if conn.kind == Kind::Echo {
                        conn.to_client.extend(&bytes);
                    }
                    self.exit.written(now, key, bytes.len()).unwrap();
                }
            }
            ExitEvent::CloseWrite { key } => {
                if let Some(conn) = self.internet.conns.get_mut(&key)
                    && conn.kind == Kind::Echo
                {
                    conn.finished = true;
                }
            }
            ExitEvent::Read { key, max } => {
                if let Some(conn) = self.internet.conns.get_mut(&key) {
                    conn.grant = Some(max);
                }
            }
            ExitEvent::Close { key } => {
                self.internet.conns.remove(&key);
            }
        }
        self.serve_reads();
    }

    /// Targets send what they have where the exit granted a read.
    fn serve_reads(&mut self) {
        let now = self.time;
        let keys: Vec<StreamKey> = self.internet.conns.keys().copied().collect();
        for key in keys {
            let Some(conn) = self.internet.conns.get_mut(&key) else {
                continue;
            };
            let Some(max) = conn.grant else { continue };
            if !conn.to_client.is_empty() {
                let n = max.min(conn.to_client.len());
                let bytes: Vec<u8> = conn.to_client.drain(..n).collect();
                conn.grant = None;
                self.exit.received_from_target(now, key, &bytes).unwrap();
            } else if conn.finished && !conn.closed_sent {
                conn.grant = None;
                conn.closed_sent = true;
                self.exit.target_closed(now, key).unwrap();
            }
        }
    }

    /// The client sends what its schedule says is due.
    fn drive_client(&mut self) {
        let now = self.time;
        while let Some(frame) = self.client.poll_transmit(now, &mut self.client_rng) {
            match frame {
                Frame::Forward {
                    next_hop,
                    packet,
                    envelope,
                    ..
                } => self.send(
                    now,
                    Arrival::Gateway {
                        next_hop,
                        packet,
                        envelope,
                    },
                ),
                other => panic!("a session without a payer sent {other:?}"),
            }
        }
    }

    /// The application: writes what it still has, reads what arrived.
    fn drive_app(&mut self) {
        while let Some(event) = self.client.poll_event() {
            let (id, failure) = match event {
                Event::Opened(id) => {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.opened = true;
                    }
                    continue;
                }
                Event::Data(id, bytes) => {
                    self.client.consumed(id, bytes.len());
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.received.extend_from_slice(&bytes);
                    }
                    continue;
                }
                Event::Writable(_) => continue,
                Event::Eof(id) => {
                    if let Some(s) = self.streams.get_mut(&id) {
                        assert!(!s.eof && s.failure.is_none(), "stream {id}: a late end");
                        s.eof = true;
                    }
                    continue;
                }
                Event::Refused(id, code) => (id, Failure::Refused(code)),
                Event::Reset(id, code) => (id, Failure::Reset(code)),
                Event::Failed(id, why) => (id, Failure::Reset(why.socks_code())),
            };
            if let Some(s) = self.streams.get_mut(&id) {
                assert_eq!(s.failure, None, "stream {id} failed twice");
                s.failure = Some(failure);
            }
        }
        for (&id, s) in &mut self.streams {
            if s.failure.is_some() {
                continue;
            }
            if s.written < s.upload.len() {
                s.written += self.client.write(id, &s.upload[s.written..]);
            }
            if s.written == s.upload.len() && !s.closed {
                self.client.close_stream(id);
                s.closed = true;
            }
        }
    }

    fn done(&self) -> bool {
        self.streams.values().all(AppStream::resolved)
    }

    /// One turn: the clock jumps to the earliest wake-up, everything due happens.
    fn step(&mut self) {
        let next = [
            self.client.poll_timeout(),
            self.exit.poll_timeout(),
            self.in_flight.keys().next().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min();
        // Some wake-up is always due (the client's send schedule never stops); one that is
        // not after now still moves time on, so a turn cannot repeat for ever.
        let next = next.unwrap_or(self.time + Duration::from_millis(1));
        self.time = self
            .time
            .max(next)
            .max(self.time + Duration::from_micros(1));
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > self.time {
                break;
            }
            let arrival = entry.remove();
            self.arrive(arrival);
        }
        if self.exit.poll_timeout().is_some_and(|t| t <= self.time) {
            self.exit.handle_timeout(self.time);
        }
        if self.client.poll_timeout().is_some_and(|t| t <= self.time) {
            self.client.handle_timeout(self.time);
        }
        self.drive_exit();
        self.drive_app();
        self.drive_client();
    }

    /// Runs until every stream ended or `BOUND` passed.
    fn run(&mut self) {
        let end = Instant::ZERO + BOUND;
        while !self.done() && self.time < end {
            self.step();
        }
    }

    /// Checks every stream's outcome; a description of what went wrong otherwise.
    fn check(&self, faultless: bool) -> Result<(), String> {
        let report = || {
            format!(
                "at {:?}: {:?}; client {:?}",
                self.time,
                self.counts,
                self.client.stats()
            )
        };
        if !self.counts.hop_errors.is_empty() {
            return Err(format!(
                "an honest network's hop refused packets: {}",
                report()
            ));
        }
        for (id, s) in &self.streams {
            let expected = match s.kind {
                Kind::Bytes(len) => known_bytes(len),
                Kind::Echo => s.upload.clone(),
                Kind::Refuse => Vec::new(),
            };
            if !expected.starts_with(&s.received) {
                let first_wrong = s
                    .received
                    .iter()
                    .zip(&expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(expected.len());
                return Err(format!(
                    "stream {id} ({:?}) received {} bytes that are not what the target sent \
                     ({}), the first difference at {first_wrong}",
                    s.kind,
                    s.received.len(),
                    expected.len()
                ));
            }
            match s.failure {
                None if !s.resolved() => {
                    return Err(format!(
                        "stream {id} ({:?}) hangs: {} of {} bytes received, {} of {} written, \
                         end of data {}; {}",
                        s.kind,
                        s.received.len(),
                        expected.len(),
                        s.written,
                        s.upload.len(),
                        s.eof,
                        report()
                    ));
                }
                None => {
                    if s.kind == Kind::Refuse || !s.opened {
                        return Err(format!("stream {id} ({:?}) ended without opening", s.kind));
                    }
                    if s.received.len() != expected.len() {
                        return Err(format!(
                            "stream {id} ({:?}) ended after {} bytes where the target sent {}",
                            s.kind,
                            s.received.len(),
                            expected.len()
                        ));
                    }
                }
                Some(Failure::Refused(code)) | Some(Failure::Reset(code)) => {
                    if code == 0 {
                        return Err(format!("stream {id} ended with no error code"));
                    }
                    if faultless && s.kind != Kind::Refuse {
                        return Err(format!(
                            "stream {id} ({:?}) failed ({:?}) on a network without faults: {}",
                            s.kind,
                            s.failure,
                            report()
                        ));
                    }
                }
            }
            // Whatever reached a target is a prefix of what the application wrote.
            for (key, written) in &self.internet.written {
                if key.stream == *id && !s.upload.starts_with(written) {
                    return Err(format!("stream {id}'s target got bytes it was not sent"));
                }
            }
        }
        Ok(())
    }
}

/// The bytes the application uploads on stream `i` of a run.
fn upload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (k * 7 + i * 13) as u8 ^ 0x5a).collect()
}

fn run(scenario: &Scenario) -> Pair {
    let mut pair = Pair::new(scenario);
    for (i, &(kind, len)) in scenario.streams.iter().enumerate() {
        pair.open(kind, upload(i, len));
    }
    pair.run();
    pair
}

fn is_faultless(s: &Scenario) -> bool {
    s.faults.loss == 0.0 && s.dead_mix_in_layer == [false; 3]
}

#[test]
fn streams_complete_on_a_network_without_faults() {
    let scenario = Scenario {
        seed: 1,
        faults: Faults::NONE,
        dead_mix_in_layer: [false; 3],
        streams: vec![
            (Kind::Bytes(30_000), 100),
            (Kind::Echo, 9_000),
            (Kind::Refuse, 10),
        ],
    };
    let pair = run(&scenario);
    pair.check(true).unwrap();
    let refused = pair
        .streams
        .values()
        .find(|s| s.kind == Kind::Refuse)
        .unwrap();
    assert_eq!(
        refused.failure,
        Some(Failure::Refused(Refusal::ConnectionRefused.socks_code()))
    );
    println!(
        "{:?} {:?} at {:?}",
        pair.counts,
        pair.client.stats(),
        pair.time
    );
}

#[test]
fn streams_survive_loss_duplication_reordering_and_a_dead_mix() {
    let scenario = Scenario {
        seed: 2,
        faults: Faults {
            loss: 0.05,
            duplicate: 0.05,
            reorder: 0.3,
            latency: Duration::from_millis(5),
            jitter: Duration::from_millis(40),
        },
        dead_mix_in_layer: [false, true, false],
        streams: vec![(Kind::Bytes(20_000), 500), (Kind::Echo, 6_000)],
    };
    let pair = run(&scenario);
    pair.check(false).unwrap();
    let stats = pair.client.stats();
    assert!(stats.retransmits > 0, "{stats:?}");
    assert!(
        pair.counts.replays > 0 && pair.counts.black_holed > 0,
        "{:?}",
        pair.counts
    );
    println!("{:?} {stats:?} at {:?}", pair.counts, pair.time);
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let kind = prop_oneof![
        4 => (0usize..40_000).prop_map(Kind::Bytes),
        3 => Just(Kind::Echo),
        1 => Just(Kind::Refuse),
    ];
    (
        any::<u64>(),
        0.0..0.08f64,
        0.0..0.1f64,
        0.0..0.5f64,
        1u64..20,
        0u64..60,
        any::<[bool; 3]>(),
        proptest::collection::vec((kind, 0usize..12_000), 1..=4),
    )
        .prop_map(
            |(seed, loss, duplicate, reorder, latency, jitter, dead, streams)| Scenario {
                seed,
                faults: Faults {
                    loss,
                    duplicate,
                    reorder,
                    latency: Duration::from_millis(latency),
                    jitter: Duration::from_millis(jitter),
                },
                dead_mix_in_layer: dead,
                streams,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Every stream completes byte-exact or is reset with an error within `BOUND`, whatever
    /// the seed, the faults (loss up to 8% per link, duplication up to 10%, up to half the
    /// packets delayed by up to 60 ms more), the dead mixes (at most one per layer, so a path
    /// always exists) and the streams (1 to 4; downloads up to 40 kB, uploads up to 12 kB).
    #[test]
    fn every_stream_completes_byte_exact_or_is_reset(s in scenario()) {
        let pair = run(&s);
        if let Err(e) = pair.check(is_faultless(&s)) {
            return Err(TestCaseError::fail(format!("{s:?}: {e}")));
        }
    }
}

/// The property's first finding: the exit drops the data (and end) of a stream whose open it
/// has not seen yet ("exit_unknown_stream") after it acknowledged their packet, so the client
/// never re-sent them and the stream hung. The open and later data travel in different packets
/// on different routes, so a lost or overtaken open was enough. Now the session sends a
/// stream's data with its open or after the exit answered it, never in a later message
/// before. The case: dead mixes in layers 1 and 3, 1.7% loss, reordering; two echo streams
/// hung with their data held out of order at the exit.
#[test]
fn data_that_overtakes_its_open_is_not_lost() {
    let scenario = Scenario {
        seed: 15952389134550412071,
        faults: Faults {
            loss: 0.01737640978534169,
            duplicate: 0.08187562850150316,
            reorder: 0.4973177080770074,
            latency: Duration::from_millis(2),
            jitter: Duration::from_millis(34),
        },
        dead_mix_in_layer: [true, false, true],
        streams: vec![
            (Kind::Refuse, 2902),
            (Kind::Echo, 9868),
            (Kind::Echo, 11570),
        ],
    };
    run(&scenario).check(false).unwrap();
}

/// The client keeps the exit stocked with reply blocks, not flooded: the exit spends its
/// newest blocks first, so which block comes back says nothing of the older ones, and an
/// estimate that read it as "every older block is spent" handed the exit four blocks with
/// every message. Then the exit held far more than the client keeps keys for, the client
/// built (and paid to carry) blocks it threw away, and a client that left found the exit
/// still spending them.
#[test]
fn a_download_hands_the_exit_only_the_reply_blocks_it_needs() {
    let scenario = Scenario {
        seed: 3,
        faults: Faults::NONE,
        dead_mix_in_layer: [false; 3],
        streams: vec![(Kind::Bytes(100_000), 100); 8],
    };
    let pair = run(&scenario);
    pair.check(true).unwrap();
    let stats = pair.client.stats();
    let held = pair.exit.surbs_held() as u64;
    println!("{stats:?}, {held} blocks held at the exit");
    // What the exit holds once the downloads are done: at most one stock (48) and one
    // message's blocks (5). The rest of what was handed out was spent: on the replies that
    // arrived, and on the last replies and acks still on their way when the harness stops
    // (24-36 with seeds 1-7), which is why the count handed out is bounded more loosely.
    // Seeds 1-7 leave 17-42 blocks at the exit and hand out 48-66 more than the replies; the
    // flood this test was written for left the exit more than the client keeps keys for.
    let stock = SessionConfig::new(Address([0; 32])).surbs_target as u64;
    let message = murmur_protocol::session::reply_blocks::BLOCKS_PER_UNACKNOWLEDGED as u64;
    assert!(
        held <= stock + message,
        "{held} reply blocks left at the exit"
    );
    assert!(
        stats.reply_blocks_sent <= stats.replies + 2 * stock,
        "{} reply blocks handed out for {} replies",
        stats.reply_blocks_sent,
        stats.replies
    );
    assert_eq!(stats.reply_keys_expired, 0, "reply keys forgotten unused");
}

/// A bulk download over a network losing `loss` of the packets on every link: the seconds of
/// virtual time it took, and the replies it used.
fn bulk_download(seed: u64, loss: f64, len: usize) -> (f64, u64) {
    let scenario = Scenario {
        seed,
        faults: Faults {
            loss,
            ..Faults::NONE
        },
        dead_mix_in_layer: [false; 3],
        streams: vec![(Kind::Bytes(len), 100)],
    };
    let pair = run(&scenario);
    pair.check(loss == 0.0).unwrap();
    let secs = pair
        .time
        .saturating_duration_since(Instant::ZERO)
        .as_secs_f64();
    let stats = pair.client.stats();
    println!(
        "{len} bytes at loss {loss}: {:.3} MB/s; {:?} {stats:?}",
        len as f64 / secs / 1e6,
        pair.counts
    );
    (secs, stats.replies)
}

/// The download rate the client's sends allow: each of its λ_P packets a second carries four
/// reply blocks, each brings one reply's data back.
fn reply_block_bound() -> f64 {
    common::params(0.0).lambda_p * 4.0 * REPLY_DATA_LEN as f64
}

/// A download keeps the exit stocked with as many blocks as the round trip needs (not a fixed
/// 48, which at this network's round trip capped it at about 0.8 MB/s) and carries four
/// blocks in every packet with its ack (the key epoch is said once per list, where each
/// block saying it left room for three): it runs within a quarter of the bound.
#[test]
fn a_bulk_download_runs_near_the_reply_block_bound() {
    let len = 1_000_000;
    let (secs, _) = bulk_download(5, 0.0, len);
    let rate = len as f64 / secs;
    assert!(
        rate >= 0.75 * reply_block_bound(),
        "{rate:.0} B/s against a bound of {:.0}",
        reply_block_bound()
    );
}

/// One lost reply leaves a hole the client cannot deliver past. With cumulative acks alone,
/// the exit re-sent every reply after the hole at its timeout (about twice the replies the
/// data needs), and a round-trip sample taken from the ack that filled the hole lengthened the
/// timeout with every loss: at 1% loss per link the download ran at a third of the lossless
/// rate. The client now says what it holds past the hole (`ClientItem::Received`): the exit
/// re-sends the missing reply as soon as later ones arrived, and nothing else.
#[test]
fn a_lost_reply_is_sent_again_alone_and_soon() {
    let len = 1_000_000;
    let (secs, replies) = bulk_download(6, 0.01, len);
    let needed = len.div_ceil(REPLY_DATA_LEN) as u64;
    assert!(
        replies <= needed + needed / 4,
        "{replies} replies for data that needs {needed}"
    );
    let rate = len as f64 / secs;
    assert!(
        rate >= 0.5 * reply_block_bound(),
        "{rate:.0} B/s against a bound of {:.0}",
        reply_block_bound()
    );
}
