//! The `session` fuzz target: a [`ClientSession`] driven by arbitrary sequences of
//! application calls, time passing, and what a network and an exit could do to it (carry or
//! lose its packets, acknowledge them, answer with arbitrary items on the reply blocks it
//! sent, deliver again, altered, or junk). The network is real: a synthetic consensus whose
//! relays' Sphinx keys the harness holds, so every packet crosses its hops as on the wire.
//!
//! Invariants checked after every step (the fuzzer's oracles):
//! - every frame the session sends is a `Forward` frame that encodes, to a relay of the
//!   consensus, for the consensus' epoch; every packet it sends reaches its last hop and
//!   carries content that decodes, and a client message that decodes;
//! - the stream bytes the exit receives are the application's, at their offsets; the bytes
//!   the application receives are the exit's, in order, once each;
//! - every counter of [`SessionStats`] only grows;
//! - the session's state stays bounded: packets awaiting acknowledgement, reply keys per
//!   exit session, loops, and the events not yet polled.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{ClientSession, Event, SessionConfig, SessionStats};
use crate::cover::Stock;
use crate::directory::synthetic::{SyntheticNetwork, generate};
use crate::directory::{Consensus, IdentityKey, NetworkParams};
use crate::fragment::Fragment;
use crate::frame::Frame;
use crate::packet::recover_plaintext;
use crate::packet::{Address, HopOutput, OpenedPacket, Packet, StaticSecret, SurbId};
use crate::payload::{Content, REPLY_FRAGMENT_DATA_LEN};
use crate::stream::{
    ClientItem, ClientMessage, EXIT_MESSAGE_OVERHEAD, ExitItem, ExitMessage, Refusal, StreamId,
    Target,
};
use crate::surb::ReplyBlock;
use crate::time::Instant;

/// Steps per input: each may build and carry a few Sphinx packets (about a millisecond each).
const MAX_STEPS: usize = 32;
/// Frames sent per step at most; what else is due stays due for the next step.
const FRAMES_PER_STEP: usize = 2;
/// The harness's own memory of packets, blocks and deliveries (oldest forgotten first).
const KEEP: usize = 32;
/// Reply blocks the session keeps at each exit (small, so topping up is exercised).
const SURBS_TARGET: usize = 4;
/// The stream window (small, so flow control is exercised).
const WINDOW: usize = 4096;

/// The byte at `offset` of every stream the application writes.
fn app_byte(offset: u64) -> u8 {
    (offset % 253) as u8
}

/// The byte at `offset` of every stream the exit answers with.
fn exit_byte(offset: u64) -> u8 {
    (offset % 251) as u8 ^ 0x5a
}

/// A synthetic network and its relays' Sphinx secrets, built once.
pub(super) struct Net {
    pub(super) consensus: Arc<Consensus>,
    secrets: HashMap<Address, StaticSecret>,
    pub(super) gateway: IdentityKey,
    exit: Address,
}

pub(super) fn net() -> &'static Net {
    static NET: OnceLock<Net> = OnceLock::new();
    NET.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(19);
        let params = NetworkParams {
            lambda_p: 20.0,
            lambda_l: 1.0,
            lambda_d: 1.0,
            lambda_m: 0.0,
            mu: 1000.0,
            max_hop_delay_ms: 1000,
            epoch_length_s: 600,
            relays_per_address: 2,
        };
        let (consensus, keys) = generate(
            &mut rng,
            &SyntheticNetwork {
                mixes_per_layer: 2,
                gateways: 1,
                exits: 1,
                params,
                epoch: 9,
            },
        );
        let secrets = consensus
            .relays
            .iter()
            .zip(keys)
            .map(|(r, k)| (r.address(), k.sphinx))
            .collect();
        let role = |exit: bool| {
            consensus
                .relays
                .iter()
                .find(|r| if exit { r.roles.exit } else { r.roles.gateway })
                .expect("the synthetic network has a gateway and an exit")
                .clone()
        };
        let (gateway, exit) = (role(false).identity, role(true).address());
        Net {
            consensus: Arc::new(consensus),
            secrets,
            gateway,
            exit,
        }
    })
}

/// One step.
#[derive(Debug, Arbitrary)]
enum Op {
    /// The application opens a stream (to a name or an address; with credentials, which
    /// pick another exit session).
    Open {
        port: u16,
        name: bool,
        isolation: Option<u8>,
    },
    /// The application writes `len` bytes.
    Write {
        stream: u8,
        len: u16,
    },
    /// The application takes `len` bytes of what it was given.
    Consumed {
        stream: u8,
        len: u16,
    },
    Close {
        stream: u8,
    },
    Abort {
        stream: u8,
    },
    /// `ms` milliseconds pass; the session sends what is due.
    Wait {
        ms: u16,
    },
    /// Time jumps to the session's next timeout; it sends what is due.
    Timeout,
    /// The network carries the oldest packet not yet carried to its last hop, or loses it.
    Carry {
        lose: bool,
    },
    /// The exit acknowledges a packet it received, on the packet's SURB-ACK.
    Ack {
        which: u8,
    },
    /// The exit answers on one of the reply blocks it holds.
    Answer {
        block: u8,
        items: Vec<Item>,
    },
    /// The gateway delivers an earlier delivery again, altered if `flip` says where.
    Redeliver {
        which: u8,
        flip: Option<(u16, u8)>,
    },
    /// The gateway delivers junk.
    Junk {
        surb_id: [u8; 16],
        fill: u8,
    },
    /// The driver hands the schedule to a pacer: from now on the session sends only what
    /// `BuildAhead` asks for.
    Pace,
    /// The driver asks for a packet for a pacer's stock (0 real, 1 drop, 2 loop); what is
    /// built goes out at once.
    BuildAhead {
        stock: u8,
    },
    /// The driver's queue is full when the next delivery comes: the session hears only that
    /// it was dropped.
    DropNext,
    /// The driver keeps `n % 17` reply blocks built ahead.
    Prebuild {
        n: u8,
    },
    /// The driver takes the jobs the session wants built.
    PollJobs,
    /// A worker finishes one job (in any order), or it is lost.
    FinishJob {
        which: u8,
        lose: bool,
    },
}

/// An exit item; `stream` picks one of the streams opened so far (or, past their number, an
/// unknown one).
#[derive(Debug, Arbitrary)]
enum Item {
    Opened { stream: u8 },
    Refused { stream: u8, reason: u8 },
    Data { stream: u8, offset: u16, len: u16 },
    Fin { stream: u8, offset: u16 },
    Ack { stream: u8, offset: u32 },
    Reset { stream: u8, reason: u8 },
    SurbsHeld { have: u16 },
}

fn refusal(code: u8) -> Refusal {
    match code % 6 {
        0 => Refusal::General,
        1 => Refusal::NotAllowed,
        2 => Refusal::NetworkUnreachable,
        3 => Refusal::HostUnreachable,
        4 => Refusal::ConnectionRefused,
        _ => Refusal::TtlExpired,
    }
}

/// What the harness knows as application, network and exit.
struct Harness {
    session: ClientSession,
    rng: StdRng,
    now: Instant,
    client: Address,
    /// Streams the application opened, in order.
    opened: Vec<StreamId>,
    /// Streams the application was told are open.
    announced: HashSet<StreamId>,
    /// Bytes the application wrote, and received, per stream.
    written: HashMap<StreamId, u64>,
    received: HashMap<StreamId, u64>,
    /// Frames sent and not yet carried.
    in_flight: VecDeque<(Address, Packet)>,
    /// SURB-ACKs of packets the exit received; reply blocks the exit was given.
    acks: VecDeque<ReplyBlock>,
    blocks: VecDeque<ReplyBlock>,
    /// Deliveries made to the session.
    delivered: VecDeque<(SurbId, Vec<u8>)>,
    stats: SessionStats,
    paced: bool,
    /// The next delivery is dropped by the driver ([`Op::DropNext`]).
    drop_next: bool,
    /// Deliveries the driver dropped.
    dropped: u64,
    /// Reply blocks the driver was asked to build and has not handed back.
    jobs: Vec<super::BlockJob>,
}

impl Harness {
    fn stream(&self, pick: u8) -> StreamId {
        match self.opened.get(usize::from(pick)) {
            Some(&id) => id,
            None => u32::from(pick) << 8,
        }
    }

    /// The session sends what is due at `now`, a few frames at most.
    fn transmit(&mut self) {
        for _ in 0..FRAMES_PER_STEP {
            self.session.handle_timeout(self.now);
            let Some(frame) = self.session.poll_transmit(self.now, &mut self.rng) else {
                return;
            };
            assert!(
                !self.paced,
                "a paced session sent {frame:?} at its own tick"
            );
            self.sent(frame);
        }
    }

    /// A frame the session sent goes into the network.
    fn sent(&mut self, frame: Frame) {
        let net = net();
        frame
            .encode()
            .expect("every frame the session sends encodes");
        let Frame::Forward {
            next_hop,
            key_epoch,
            packet,
            ..
        } = frame
        else {
            panic!("an unpaid session sent {frame:?}");
        };
        assert_eq!(key_epoch, net.consensus.epoch);
        assert!(
            net.secrets.contains_key(&next_hop),
            "a frame for a relay outside the consensus"
        );
        if self.in_flight.len() >= KEEP {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back((next_hop, packet));
    }

    /// Carries a packet from `at` to its last hop; returns its final delivery.
    fn carry(mut at: Address, mut packet: Packet) -> (Address, crate::packet::FinalDelivery) {
        let net = net();
        loop {
            let secret = net
                .secrets
                .get(&at)
                .expect("routes stay inside the network");
            let opened =
                OpenedPacket::open(packet.as_bytes(), secret).expect("an honest hop opens");
            match opened
                .process(Duration::MAX)
                .expect("an honest hop processes")
            {
                HopOutput::Forward {
                    next_hop,
                    packet: p,
                    ..
                } => {
                    at = next_hop;
                    packet = p;
                }
                HopOutput::Final(d) => return (at, d),
            }
        }
    }

    /// The network carries a packet to its last hop: the exit acts on a client packet, the
    /// gateway delivers what is addressed to the client.
    fn carry_next(&mut self, lose: bool) {
        let Some((first, packet)) = self.in_flight.pop_front() else {
            return;
        };
        if lose {
            return;
        }
        let (at, delivery) = Self::carry(first, packet);
        if delivery.destination == self.client {
            self.deliver(delivery.surb_id, delivery.payload.to_vec());
        } else if at == net().exit && delivery.destination == net().exit {
            let plaintext =
                recover_plaintext(&delivery.payload[..]).expect("a forward payload opens");
            match Content::decode(&plaintext).expect("the session's content decodes") {
                Content::DataWithAck { ack, fragment } => {
                    self.exit_receives(fragment, true);
                    push_bounded(&mut self.acks, ack);
                }
                Content::Data { fragment } => self.exit_receives(fragment, false),
                Content::Cover => {}
                other => panic!("the session sent {other:?} to its exit"),
            }
        }
    }

    /// A message reached the exit, `acknowledged` if it came with a SURB-ACK.
    fn exit_receives(&mut self, fragment: Fragment, acknowledged: bool) {
        assert_eq!(fragment.count, 1, "the session sends one-fragment messages");
        let message = ClientMessage::decode(&fragment.data).expect("the session's message decodes");
        // Without a SURB-ACK it is never re-sent: it may say only what is said again.
        if !acknowledged {
            assert!(
                message
                    .items
                    .iter()
                    .any(|i| matches!(i, ClientItem::Surbs(_))),
                "a message without a SURB-ACK carries no reply blocks: {:?}",
                message.items
            );
            for item in &message.items {
                assert!(
                    matches!(
                        item,
                        ClientItem::Surbs(_) | ClientItem::Ack { .. } | ClientItem::Received { .. }
                    ),
                    "a message without a SURB-ACK carries {item:?}"
                );
            }
        }
        for item in message.items {
            match item {
                ClientItem::Data {
                    offset,
                    bytes,
                    stream,
                } => {
                    for (i, b) in bytes.iter().enumerate() {
                        assert_eq!(
                            *b,
                            app_byte(offset + i as u64),
                            "stream {stream} carries bytes the application did not write there"
                        );
                    }
                    let written = self.written.get(&stream).copied().unwrap_or(0);
                    assert!(
                        offset + bytes.len() as u64 <= written,
                        "data past what was written"
                    );
                }
                ClientItem::Fin { stream, offset } => {
                    let written = self.written.get(&stream).copied().unwrap_or(0);
                    assert_eq!(
                        offset, written,
                        "stream {stream} ends where it was not closed"
                    );
                }
                ClientItem::Surbs(blocks) => {
                    for b in blocks {
                        push_bounded(&mut self.blocks, b);
                    }
                }
                ClientItem::Received { stream, ranges } => {
                    assert!(
                        !ranges.is_empty(),
                        "stream {stream}: an empty received item"
                    );
                    for pair in ranges.windows(2) {
                        assert!(
                            pair[0].0 + u64::from(pair[0].1) < pair[1].0,
                            "stream {stream}: received ranges out of order or touching: {ranges:?}"
                        );
                    }
                    assert!(ranges.iter().all(|r| r.1 > 0), "an empty range: {ranges:?}");
                }
                ClientItem::Open { .. } | ClientItem::Ack { .. } | ClientItem::Reset { .. } => {}
            }
        }
    }

    /// The exit sends `plaintext` on `block`; the network carries it to the client.
    fn reply(&mut self, block: ReplyBlock, plaintext: &[u8]) {
        let reply = block.use_block(plaintext).expect("a reply fits its block");
        let (_, delivery) = Self::carry(reply.first_hop, reply.packet);
        assert_eq!(
            delivery.destination, self.client,
            "a reply for someone else"
        );
        self.deliver(delivery.surb_id, delivery.payload.to_vec());
    }

    fn deliver(&mut self, surb_id: SurbId, payload: Vec<u8>) {
        if std::mem::take(&mut self.drop_next) {
            self.dropped += 1;
            self.session
                .delivery_dropped(surb_id, self.now, &mut self.rng);
        } else {
            self.session
                .handle_delivery(surb_id, &payload, self.now, &mut self.rng);
        }
        if self.delivered.len() >= KEEP {
            self.delivered.pop_front();
        }
        self.delivered.push_back((surb_id, payload));
    }

    fn answer(&mut self, block: u8, items: Vec<Item>) {
        if self.blocks.is_empty() {
            return;
        }
        let at = usize::from(block) % self.blocks.len();
        let Some(block) = self.blocks.remove(at) else {
            return;
        };
        let budget = REPLY_FRAGMENT_DATA_LEN - EXIT_MESSAGE_OVERHEAD;
        let mut message = ExitMessage { items: Vec::new() };
        for item in items {
            let item = match item {
                Item::Opened { stream } => ExitItem::Opened {
                    stream: self.stream(stream),
                    window: WINDOW as u32,
                },
                Item::Refused { stream, reason } => ExitItem::Refused {
                    stream: self.stream(stream),
                    reason: refusal(reason),
                },
                Item::Data {
                    stream,
                    offset,
                    len,
                } => {
                    let offset = u64::from(offset);
                    let len = u64::from(len % 1024);
                    ExitItem::Data {
                        stream: self.stream(stream),
                        offset,
                        bytes: (offset..offset + len).map(exit_byte).collect(),
                    }
                }
                Item::Fin { stream, offset } => ExitItem::Fin {
                    stream: self.stream(stream),
                    offset: u64::from(offset),
                },
                Item::Ack { stream, offset } => ExitItem::Ack {
                    stream: self.stream(stream),
                    offset: u64::from(offset),
                },
                Item::Reset { stream, reason } => ExitItem::Reset {
                    stream: self.stream(stream),
                    reason: refusal(reason),
                },
                Item::SurbsHeld { have } => ExitItem::SurbsHeld { have },
            };
            if message.encoded_len() + item.encoded_len() > budget + EXIT_MESSAGE_OVERHEAD {
                break;
            }
            message.items.push(item);
        }
        let content = Content::Data {
            fragment: Fragment {
                message_id: 1,
                index: 0,
                count: 1,
                data: message.encode().expect("an exit message encodes"),
            },
        };
        let plaintext = content.encode().expect("an exit message fits one reply");
        self.reply(block, &plaintext);
    }

    /// Drains the session's events, checking what the application is given.
    fn events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match &event {
                Event::Opened(stream) => {
                    assert!(
                        self.announced.insert(*stream),
                        "stream {stream} opened twice"
                    );
                }
                // A proxy answers its application at `Opened`: nothing may come first.
                Event::Data(stream, _) | Event::Eof(stream) => assert!(
                    self.announced.contains(stream),
                    "stream {stream} gave the application data or its end before Opened"
                ),
                _ => {}
            }
            if let Event::Data(stream, bytes) = event {
                assert!(!bytes.is_empty(), "an empty data event");
                let at = self.received.entry(stream).or_default();
                for (i, b) in bytes.iter().enumerate() {
                    assert_eq!(
                        *b,
                        exit_byte(*at + i as u64),
                        "stream {stream} gave the application bytes out of order"
                    );
                }
                *at += bytes.len() as u64;
            }
        }
    }

    fn check(&mut self) {
        let (before, after) = (counters(&self.stats), counters(&self.session.stats()));
        for ((name, was), (_, is)) in before.iter().zip(&after) {
            assert!(is >= was, "counter {name} went back from {was} to {is}");
        }
        self.stats = self.session.stats();
        let s = &self.session;
        // A packet awaits its acknowledgement from when it is built; it is counted sent when
        // its tick comes.
        assert!(s.pending.len() <= self.stats.real_sent as usize + s.cover.queued());
        assert!(s.loops.len() as u64 <= self.stats.loops_sent);
        assert!(s.streams.len() <= self.opened.len());
        assert!(s.events.is_empty());
        assert!(s.recent_deliveries.len() <= super::delivery::RECENT_DELIVERIES);
        assert!(s.exits.len() <= s.config.max_exit_sessions);
        assert_eq!(s.stats.bugs, 0, "the session met a bug");
        // The stock of blocks built ahead stays within what the driver asked for, and the
        // session counts exactly the jobs the driver holds.
        assert!(s.prebuilt.ready.len() <= s.prebuilt.target);
        assert_eq!(s.prebuilt.building, self.jobs.len());
        // A dropped delivery is paid at most once, and only if it was the client's own.
        assert!(
            s.stats.dropped_deliveries_paid <= self.dropped,
            "{} dropped deliveries paid of {} dropped",
            s.stats.dropped_deliveries_paid,
            self.dropped
        );
        for index in s.exits.keys() {
            let keys = s.reply_keys.values().filter(|k| k.exit == *index).count();
            assert!(
                keys <= super::reply_blocks::max_reply_keys(SURBS_TARGET),
                "exit session {index:?} holds {keys} reply keys ({} blocks issued in all)",
                s.stats.reply_blocks_sent
            );
        }
    }
}

fn push_bounded(queue: &mut VecDeque<ReplyBlock>, block: ReplyBlock) {
    if queue.len() >= KEEP {
        queue.pop_front();
    }
    queue.push_back(block);
}

fn counters(s: &SessionStats) -> [(&'static str, u64); 29] {
    [
        ("real_sent", s.real_sent),
        ("cover_sent", s.cover_sent),
        ("loops_sent", s.loops_sent),
        ("loops_returned", s.loops_returned),
        ("loops_missing", s.loops_missing),
        ("retransmits", s.retransmits),
        ("acks", s.acks),
        ("replies", s.replies),
        ("unknown_deliveries", s.unknown_deliveries),
        ("bad_replies", s.bad_replies),
        ("foreign_deliveries", s.foreign_deliveries),
        ("duplicate_deliveries", s.duplicate_deliveries),
        ("reply_blocks_prebuilt", s.reply_blocks_prebuilt),
        ("prebuilt_blocks_discarded", s.prebuilt_blocks_discarded),
        ("dropped_deliveries_paid", s.dropped_deliveries_paid),
        ("hop_tickets", s.hop_tickets),
        ("gateway_tickets", s.gateway_tickets),
        ("gateway_frames", s.gateway_frames),
        ("builds_deferred", s.builds_deferred),
        ("streams_unacknowledged", s.streams_unacknowledged),
        ("streams_no_path", s.streams_no_path),
        ("streams_exit_left", s.streams_exit_left),
        ("streams_bug", s.streams_bug),
        ("opens_refused_full", s.opens_refused_full),
        ("exit_sessions_expired", s.exit_sessions_expired),
        ("exit_sessions_evicted", s.exit_sessions_evicted),
        ("reply_keys_expired", s.reply_keys_expired),
        ("resets_dropped", s.resets_dropped),
        ("bugs", s.bugs),
    ]
}

/// `[seed: u64][steps…]`, the steps read by `arbitrary` (see [`Op`]).
pub fn session(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(seed) = u.arbitrary::<u64>() else {
        return;
    };
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_STEPS {
        match u.arbitrary::<Op>() {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    drive(seed, ops);
}

/// Runs `ops` on a fresh session whose randomness is seeded with `seed`.
fn drive(seed: u64, ops: Vec<Op>) {
    let net = net();
    let client = Address([0xc1; 32]);
    let mut config = SessionConfig::new(client);
    config.surbs_target = SURBS_TARGET;
    config.stream_window = WINDOW;
    config.max_attempts = 3;
    config.path_rules.distinct_subnets = false;
    let mut rng = StdRng::seed_from_u64(seed);
    let session = ClientSession::new(
        config,
        net.consensus.clone(),
        net.gateway,
        Instant::ZERO,
        &mut rng,
    )
    .expect("a session through the synthetic gateway");
    let mut h = Harness {
        session,
        rng,
        now: Instant::ZERO,
        client,
        opened: Vec::new(),
        announced: HashSet::new(),
        written: HashMap::new(),
        received: HashMap::new(),
        in_flight: VecDeque::new(),
        acks: VecDeque::new(),
        blocks: VecDeque::new(),
        delivered: VecDeque::new(),
        stats: SessionStats::default(),
        paced: false,
        drop_next: false,
        dropped: 0,
        jobs: Vec::new(),
    };
    for op in ops {
        match op {
            Op::Open {
                port,
                name,
                isolation,
            } => {
                let target = if name {
                    Target::Host("example.org".into(), port)
                } else {
                    Target::Addr(std::net::SocketAddr::from(([192, 0, 2, 1], port)))
                };
                let isolation = isolation.map(|i| (vec![i], Vec::new()));
                if let Ok(id) = h.session.open_stream(target, isolation, &mut h.rng) {
                    h.opened.push(id);
                }
            }
            Op::Write { stream, len } => {
                let id = h.stream(stream);
                let at = h.written.get(&id).copied().unwrap_or(0);
                let bytes: Vec<u8> = (at..at + u64::from(len % 8192)).map(app_byte).collect();
                let taken = h.session.write(id, &bytes);
                assert!(taken <= bytes.len());
                if taken > 0 {
                    *h.written.entry(id).or_default() += taken as u64;
                }
            }
            Op::Consumed { stream, len } => h.session.consumed(h.stream(stream), usize::from(len)),
            Op::Close { stream } => h.session.close_stream(h.stream(stream)),
            Op::Abort { stream } => h.session.abort_stream(h.stream(stream)),
            Op::Wait { ms } => {
                h.now = h.now + Duration::from_millis(u64::from(ms));
                h.transmit();
            }
            Op::DropNext => h.drop_next = true,
            Op::Prebuild { n } => h.session.prebuild_reply_blocks(usize::from(n % 17)),
            Op::PollJobs => {
                while let Some(job) = h.session.poll_block_job(&mut h.rng) {
                    h.jobs.push(job);
                }
            }
            Op::FinishJob { which, lose } => {
                if !h.jobs.is_empty() {
                    let job = h.jobs.swap_remove(usize::from(which) % h.jobs.len());
                    if lose {
                        h.session.block_job_lost();
                    } else {
                        let built = job.build(&mut h.rng);
                        h.session.handle_built_block(built);
                    }
                }
            }
            Op::Pace => {
                h.session.set_paced();
                h.paced = true;
                assert_eq!(h.session.timer(super::Timer::Send), None);
            }
            Op::BuildAhead { stock } => {
                let stock = match stock % 3 {
                    0 => Stock::Real,
                    1 => Stock::Drop,
                    _ => Stock::Loop,
                };
                h.session.handle_timeout(h.now);
                if let Some(frame) = h.session.build_ahead(stock, h.now, &mut h.rng) {
                    h.sent(frame);
                }
            }
            Op::Timeout => {
                if let Some(t) = h.session.poll_timeout() {
                    h.now = h.now.max(t);
                }
                h.transmit();
            }
            Op::Carry { lose } => h.carry_next(lose),
            Op::Ack { which } => {
                if !h.acks.is_empty() {
                    let at = usize::from(which) % h.acks.len();
                    if let Some(ack) = h.acks.remove(at) {
                        let plaintext = Content::Ack.encode().expect("an ack encodes");
                        h.reply(ack, &plaintext);
                    }
                }
            }
            Op::Answer { block, items } => h.answer(block, items),
            Op::Redeliver { which, flip } => {
                if !h.delivered.is_empty() {
                    let at = usize::from(which) % h.delivered.len();
                    let (id, mut payload) = h.delivered[at].clone();
                    if let Some((position, xor)) = flip {
                        let len = payload.len();
                        payload[usize::from(position) % len] ^= xor.max(1);
                    }
                    h.deliver(id, payload);
                }
            }
            Op::Junk { surb_id, fill } => {
                let payload = vec![fill; crate::PAYLOAD_SIZE];
                h.deliver(surb_id, payload);
            }
        }
        h.events();
        h.check();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exit that never answers: each open is re-sent with fresh reply blocks every
    /// `reply_timeout` until its stream fails, and the keys for blocks that were never used
    /// stay. The keys kept for one exit session stay bounded all the same, stream after
    /// stream (this target's first finding: `fuzz/corpus/session/`).
    #[test]
    fn a_silent_exit_does_not_pile_up_reply_keys() {
        let mut ops = Vec::new();
        for port in 0..8 {
            ops.push(Op::Open {
                port,
                name: true,
                isolation: None,
            });
            ops.extend((0..4).map(|_| Op::Wait { ms: 20_000 }));
        }
        // `drive` checks the bound after every step.
        drive(1, ops);
    }

    /// Replies cross the mixnet on independent paths: the exit's first bytes may arrive
    /// before its `Opened`. The application hears `Opened` first all the same (`events`
    /// checks it), and once.
    #[test]
    fn data_overtaking_opened_still_follows_it() {
        let mut ops = vec![Op::Open {
            port: 80,
            name: true,
            isolation: None,
        }];
        // Sends and carries until the open (and its reply blocks) reached the exit.
        for _ in 0..40 {
            ops.extend([Op::Timeout, Op::Carry { lose: false }]);
        }
        ops.push(Op::Answer {
            block: 0,
            items: vec![Item::Data {
                stream: 0,
                offset: 0,
                len: 10,
            }],
        });
        ops.push(Op::Answer {
            block: 0,
            items: vec![Item::Opened { stream: 0 }],
        });
        drive(1, ops);
    }
}
