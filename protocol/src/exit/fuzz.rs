//! The `exit` fuzz target (and the exit's proptest): an [`ExitSession`] driven by arbitrary
//! sequences of client messages (whole, cut into fragments that arrive in any order, or
//! raw fragments), destination events (connects, data within the read grants, closes,
//! writes, failures) and time passing, with replies lost at random.
//!
//! The harness plays the driver: it answers [`ExitEvent`]s as a TCP driver would, keeps
//! its own account of what each destination sent and was written, and checks the exit
//! against it (the oracles):
//! - bounded state: sessions, stream bytes (in total and per session), reply blocks and
//!   reassembly stay within the configured bounds;
//! - no stream holds more than its window either way, and no read is granted beyond it;
//! - data is written to the destination in order and intact, and only the destination's
//!   bytes go back, at their offsets, in replies that fit one reply packet;
//! - data the client acknowledged is never sent again, and data sent and not
//!   acknowledged has a retransmission timer;
//! - the exit's stream ack is exactly what was written.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};

use super::{ExitConfig, ExitEvent, ExitSession, Outgoing, StreamKey};
use crate::directory::ExitPolicy;
use crate::fragment::Fragment;
use crate::packet::{Address, PublicKey, RouteHop};
use crate::payload::{Content, REPLY_FRAGMENT_DATA_LEN};
use crate::stream::{
    ClientItem, ClientMessage, ExitItem, ExitMessage, MAX_RECEIVED_RANGES, Refusal, Target,
    split_client_message,
};
use crate::surb::{ReplyBlock, build_reply_block};
use crate::time::Instant;

/// Steps per input.
const MAX_STEPS: usize = 96;
/// Sessions the inputs use (more than `max_sessions`, so the bound is met).
const SESSIONS: u8 = 5;
/// Stream numbers the inputs use (more than `max_streams_per_session`).
const STREAMS: u32 = 4;

/// The destination's byte at `offset` of every stream.
pub fn dest_byte(offset: u64) -> u8 {
    (offset % 241) as u8 ^ 0xa5
}

/// The client's byte at `offset` of `stream`.
pub fn client_byte(stream: u32, offset: u64) -> u8 {
    (offset % 251) as u8 ^ stream as u8
}

/// A reply block (built once: building one costs a few Diffie-Hellmans) at `epoch`.
pub fn reply_block(epoch: u32) -> ReplyBlock {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    let bytes = BLOCK.get_or_init(|| {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let secret = crate::packet::StaticSecret::random_from_rng(&mut rng);
        let hop = RouteHop {
            address: Address([3; 32]),
            sphinx_key: PublicKey::from(&secret),
        };
        let route = vec![hop.clone(), hop];
        let (block, _) =
            build_reply_block(&mut rng, &route, &[Duration::ZERO; 2], Address([4; 32]), 0)
                .expect("a reply block builds");
        block.to_bytes().to_vec()
    });
    let mut bytes = bytes.clone();
    // The epoch is the block's first four bytes (see `ReplyBlock::to_bytes`).
    bytes[..4].copy_from_slice(&epoch.to_be_bytes());
    ReplyBlock::from_bytes(&bytes).expect("a reply block parses")
}

/// Small bounds, so that inputs reach them.
pub fn small_config() -> ExitConfig {
    let mut c = ExitConfig::new(ExitPolicy::parse("accept *:443", true).expect("a policy"));
    c.max_sessions = 4;
    c.max_streams = 16 * 3;
    c.max_streams_per_session = 3;
    c.max_stream_window = crate::stream::DEFAULT_STREAM_WINDOW * 2;
    c.max_session_buffered_bytes = c.max_stream_window;
    c.max_buffered_bytes = c.max_session_buffered_bytes * 16;
    c.max_surbs = 16 * 24;
    c.max_surbs_per_session = 24;
    c.idle_timeout = Duration::from_secs(20);
    c.idle_progress_bytes = 100;
    c.stream_lifetime = Duration::from_secs(60);
    c.reply_rto = Duration::from_secs(1);
    c.session_idle = Duration::from_secs(30);
    c
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A client message of session `session % SESSIONS` arrives cut into fragments of `cut`
    /// data bytes; the fragments whose bit is set in `keep` arrive, last first if `reverse`.
    Message {
        session: u8,
        /// Up to three items (a fixed shape reads fewer bytes than a list).
        items: (Item, Option<Item>, Option<Item>),
        cut: u16,
        keep: u32,
        reverse: bool,
    },
    /// A fragment with any header and `len` bytes of `fill`.
    Raw {
        session: u8,
        message_id: u8,
        index: u16,
        count: u16,
        len: u16,
        fill: u8,
    },
    /// The destination of the `which`th stream connecting answers.
    Connected {
        which: u8,
    },
    ConnectFailed {
        which: u8,
    },
    /// The destination of the `which`th stream with a read grant sends up to `len` bytes
    /// (what the grant allows), or closes.
    DestData {
        which: u8,
        len: u16,
    },
    DestClose {
        which: u8,
    },
    /// The destination of the `which`th stream with data queued took it, or `part` of it.
    Written {
        which: u8,
        part: u16,
    },
    /// The connection of the `which`th stream granted a read broke.
    Failed {
        which: u8,
    },
    /// Every destination acts at once: connects succeed, each read granted gets `len`
    /// bytes (0: the destination closes), and what was queued is written.
    Drive {
        len: u16,
    },
    /// `ms` pass; up to `replies` replies go out, every third one lost.
    Wait {
        ms: u16,
        replies: u8,
    },
    /// Key epochs before `epoch` retire.
    Epoch {
        epoch: u8,
    },
}

#[derive(Debug, Arbitrary)]
enum Item {
    /// Port 443 (allowed) unless `port` is a multiple of 8.
    Open {
        stream: u8,
        port: u8,
        window: u8,
    },
    Data {
        stream: u8,
        offset: u32,
        len: u16,
    },
    Fin {
        stream: u8,
        offset: u32,
    },
    Ack {
        stream: u8,
        offset: u32,
    },
    Reset {
        stream: u8,
    },
    Surbs {
        n: u8,
        epoch: u8,
    },
    /// Selective acks: true or not (a client may claim data it never got; only its own
    /// stream suffers).
    Received {
        stream: u8,
        ranges: Vec<(u16, u16)>,
    },
}

/// What the driver and the client know, to check the exit against.
#[derive(Default)]
struct Model {
    /// Read grants outstanding.
    grants: BTreeMap<StreamKey, usize>,
    /// Bytes handed over in `Write` events and not yet reported written.
    to_write: BTreeMap<StreamKey, usize>,
    /// Bytes handed over in `Write` events, in all.
    write_offset: BTreeMap<StreamKey, u64>,
    /// Bytes reported written.
    written: BTreeMap<StreamKey, u64>,
    /// Bytes the destination sent.
    dest_sent: BTreeMap<StreamKey, u64>,
    /// Streams asked to connect and not yet answered.
    connecting: BTreeMap<StreamKey, ()>,
}

impl Model {
    fn forget(&mut self, key: StreamKey) {
        self.grants.remove(&key);
        self.to_write.remove(&key);
        self.write_offset.remove(&key);
        self.written.remove(&key);
        self.dest_sent.remove(&key);
        self.connecting.remove(&key);
    }

    /// Takes the exit's events as a driver would, checking each.
    fn events(&mut self, exit: &mut ExitSession) {
        while let Some(e) = exit.poll_event() {
            match e {
                ExitEvent::Connect { key, target } => {
                    assert_eq!(target.port(), 443, "the policy allows only 443");
                    self.connecting.insert(key, ());
                }
                ExitEvent::Write { key, bytes } => {
                    let at = self.write_offset.entry(key).or_default();
                    for (i, b) in bytes.iter().enumerate() {
                        assert_eq!(
                            *b,
                            client_byte(key.stream, *at + i as u64),
                            "written out of order"
                        );
                    }
                    *at += bytes.len() as u64;
                    *self.to_write.entry(key).or_default() += bytes.len();
                }
                ExitEvent::CloseWrite { key } => {
                    assert_eq!(self.to_write.get(&key).copied().unwrap_or(0), 0);
                }
                ExitEvent::Read { key, max } => {
                    assert!(max > 0);
                    assert!(
                        self.grants.insert(key, max).is_none(),
                        "a second read granted before the first was answered"
                    );
                    let u = exit.stream_usage(key).expect("a read for an open stream");
                    assert!(
                        u.unacked_reply_bytes + max <= u.window,
                        "a read beyond the window"
                    );
                }
                ExitEvent::Close { key } => self.forget(key),
            }
        }
    }

    /// Checks one reply as it would go out.
    fn reply(
        &mut self,
        exit: &ExitSession,
        session: u64,
        msg: &ExitMessage,
        acked: &BTreeMap<StreamKey, u64>,
    ) {
        let encoded = msg.encode().expect("a reply encodes");
        assert!(
            encoded.len() <= REPLY_FRAGMENT_DATA_LEN,
            "a reply of {} bytes does not fit one packet",
            encoded.len()
        );
        assert_eq!(ExitMessage::decode(&encoded).as_ref(), Ok(msg));
        Content::Data {
            fragment: Fragment {
                message_id: 1,
                index: 0,
                count: 1,
                data: encoded,
            },
        }
        .encode()
        .expect("a reply's content fits one packet");
        for item in &msg.items {
            match item {
                ExitItem::Data {
                    stream,
                    offset,
                    bytes,
                } => {
                    let key = StreamKey {
                        session,
                        stream: *stream,
                    };
                    for (i, b) in bytes.iter().enumerate() {
                        assert_eq!(*b, dest_byte(offset + i as u64), "{key:?}: bytes moved");
                    }
                    let end = offset + bytes.len() as u64;
                    assert!(
                        end <= self.dest_sent.get(&key).copied().unwrap_or(0),
                        "data the destination never sent"
                    );
                    let acked = acked.get(&key).copied().unwrap_or(0);
                    assert!(end > acked, "{key:?}: acknowledged data sent again");
                }
                ExitItem::Ack { stream, offset } => {
                    let key = StreamKey {
                        session,
                        stream: *stream,
                    };
                    assert!(exit.stream_usage(key).is_some());
                    assert_eq!(
                        *offset,
                        self.written.get(&key).copied().unwrap_or(0),
                        "{key:?}: an ack of what was not written"
                    );
                }
                ExitItem::Opened { window, .. } => {
                    assert!(*window as usize <= exit.config().max_stream_window);
                }
                _ => {}
            }
        }
    }
}

/// The `which`th key of `map`, if it has any.
fn nth<V>(map: &BTreeMap<StreamKey, V>, which: u8) -> Option<StreamKey> {
    if map.is_empty() {
        return None;
    }
    map.keys().nth(usize::from(which) % map.len()).copied()
}

fn message(session: u64, items: Vec<Item>, model: &Model) -> ClientMessage {
    let items = items
        .into_iter()
        .map(|item| match item {
            Item::Open {
                stream,
                port,
                window,
            } => ClientItem::Open {
                stream: u32::from(stream) % STREAMS,
                target: Target::Host("example.org".into(), if port % 8 == 0 { 80 } else { 443 }),
                window: (u32::from(window) + 1) << 14,
            },
            Item::Data {
                stream,
                offset,
                len,
            } => {
                let stream = u32::from(stream) % STREAMS;
                // Offsets on a 512-byte grid, so pieces often meet and go out in order.
                let offset = u64::from(offset % 4) * 512;
                ClientItem::Data {
                    stream,
                    offset,
                    bytes: (0..u64::from(len % 1500))
                        .map(|i| client_byte(stream, offset + i))
                        .collect(),
                }
            }
            Item::Fin { stream, offset } => ClientItem::Fin {
                stream: u32::from(stream) % STREAMS,
                offset: u64::from(offset % 8192),
            },
            Item::Ack { stream, offset } => {
                let stream = u32::from(stream) % STREAMS;
                let key = StreamKey { session, stream };
                let sent = model.dest_sent.get(&key).copied().unwrap_or(0);
                // Mostly honest acks (of what was sent, or one past it for the end).
                let offset = u64::from(offset) % (sent + 2);
                ClientItem::Ack { stream, offset }
            }
            Item::Reset { stream } => ClientItem::Reset {
                stream: u32::from(stream) % STREAMS,
            },
            Item::Received { stream, ranges } => ClientItem::Received {
                stream: u32::from(stream) % STREAMS,
                ranges: ranges
                    .into_iter()
                    .take(MAX_RECEIVED_RANGES)
                    .map(|(offset, len)| (u64::from(offset), u32::from(len)))
                    .collect(),
            },
            Item::Surbs { n, epoch } => ClientItem::Surbs(
                (0..n % 8)
                    .map(|_| reply_block(u32::from(epoch % 3)))
                    .collect(),
            ),
        })
        .collect();
    ClientMessage { session, items }
}

/// `[steps…]`, read by `arbitrary` (see [`Op`]).
pub fn exit(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let config = small_config();
    config.check().expect("the fuzz bounds hold");
    let mut exit = ExitSession::new(config.clone(), [9; 32]);
    let mut model = Model::default();
    let mut now = Instant::ZERO;
    let ack_block = || reply_block(1);
    for _ in 0..MAX_STEPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = u.arbitrary::<Op>() else {
            break;
        };
        match op {
            Op::Message {
                session,
                items,
                cut,
                keep,
                reverse,
            } => {
                let session = u64::from(session % SESSIONS);
                let (first, second, third) = items;
                let items = [Some(first), second, third].into_iter().flatten().collect();
                let msg = message(session, items, &model);
                let Ok(encoded) = msg.encode() else {
                    continue;
                };
                let cut = usize::from(cut % 2048).max(16);
                let Ok(mut fragments) = split_client_message(u64::from(keep), &encoded, cut) else {
                    continue;
                };
                if reverse {
                    fragments.reverse();
                }
                for (i, f) in fragments.into_iter().enumerate() {
                    if i < 32 && keep & (1 << i) == 0 {
                        continue;
                    }
                    // A client's message of blocks and acks alone comes without a SURB-ACK.
                    let ack = (cut % 3 != 0).then(ack_block);
                    exit.handle_packet(now, ack, f);
                }
            }
            Op::Raw {
                session,
                message_id,
                index,
                count,
                len,
                fill,
            } => {
                let mut data = u64::from(session % SESSIONS).to_be_bytes().to_vec();
                data.resize(8 + usize::from(len % 4096), fill);
                let fragment = Fragment {
                    message_id: u64::from(message_id),
                    index,
                    count,
                    data,
                };
                exit.handle_packet(now, (fill % 2 == 0).then(ack_block), fragment);
            }
            Op::Connected { which } => {
                if let Some(key) = nth(&model.connecting, which) {
                    model.connecting.remove(&key);
                    exit.connected(now, key).expect("connecting");
                }
            }
            Op::ConnectFailed { which } => {
                if let Some(key) = nth(&model.connecting, which) {
                    model.connecting.remove(&key);
                    exit.connect_failed(key, Refusal::ConnectionRefused)
                        .expect("connecting");
                }
            }
            Op::DestData { which, len } => {
                if let Some(key) = nth(&model.grants, which) {
                    let max = model.grants.remove(&key).unwrap_or(0);
                    let at = model.dest_sent.get(&key).copied().unwrap_or(0);
                    let n = usize::from(len).min(max) as u64;
                    let bytes: Vec<u8> = (at..at + n).map(dest_byte).collect();
                    exit.received_from_target(now, key, &bytes)
                        .expect("within the grant");
                    *model.dest_sent.entry(key).or_default() += n;
                }
            }
            Op::DestClose { which } => {
                if let Some(key) = nth(&model.grants, which) {
                    model.grants.remove(&key);
                    exit.target_closed(now, key).expect("open");
                }
            }
            Op::Written { which, part } => {
                let queued: BTreeMap<StreamKey, usize> = model
                    .to_write
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| (*k, *n))
                    .collect();
                if let Some(key) = nth(&queued, which) {
                    let queued = queued[&key];
                    let n = if part == 0 {
                        queued
                    } else {
                        usize::from(part).min(queued)
                    };
                    *model.to_write.entry(key).or_default() -= n;
                    *model.written.entry(key).or_default() += n as u64;
                    exit.written(now, key, n).expect("open");
                }
            }
            Op::Drive { len } => {
                for key in std::mem::take(&mut model.connecting).into_keys() {
                    exit.connected(now, key).expect("connecting");
                }
                for (key, max) in std::mem::take(&mut model.grants) {
                    if len == 0 {
                        exit.target_closed(now, key).expect("open");
                        continue;
                    }
                    let at = model.dest_sent.get(&key).copied().unwrap_or(0);
                    let n = usize::from(len).min(max) as u64;
                    let bytes: Vec<u8> = (at..at + n).map(dest_byte).collect();
                    exit.received_from_target(now, key, &bytes)
                        .expect("within the grant");
                    *model.dest_sent.entry(key).or_default() += n;
                }
                for (key, n) in std::mem::take(&mut model.to_write) {
                    if n > 0 {
                        *model.written.entry(key).or_default() += n as u64;
                        exit.written(now, key, n).expect("open");
                    }
                }
            }
            Op::Failed { which } => {
                if let Some(key) = nth(&model.grants, which) {
                    exit.stream_failed(key, Refusal::ConnectionRefused)
                        .expect("open");
                }
            }
            Op::Wait { ms, replies } => {
                now = now + Duration::from_millis(u64::from(ms) / 8);
                if exit.poll_timeout().is_some_and(|t| t <= now) {
                    exit.handle_timeout(now);
                }
                model.events(&mut exit);
                for _ in 0..replies % 16 {
                    // What the client acknowledged before this reply was built.
                    let acked = acked_offsets(&exit);
                    let Some((block, reply)) = exit.poll_reply(now) else {
                        break;
                    };
                    if let Outgoing::Message { session, message } = &reply {
                        model.reply(&exit, *session, message, &acked);
                    }
                    assert!(block.key_epoch() >= exit.oldest_epoch, "a stale block used");
                }
            }
            Op::Epoch { epoch } => exit.set_oldest_epoch(u32::from(epoch % 3)),
        }
        model.events(&mut exit);
        check_bounds(&exit, &config, &model);
    }
}

/// Every open stream's acknowledged offset.
fn acked_offsets(exit: &ExitSession) -> BTreeMap<StreamKey, u64> {
    let mut acked = BTreeMap::new();
    for session in 0..u64::from(SESSIONS) {
        for stream in 0..STREAMS {
            let key = StreamKey { session, stream };
            if let Some(u) = exit.stream_usage(key) {
                acked.insert(key, u.acked_reply_offset);
            }
        }
    }
    acked
}

fn check_bounds(exit: &ExitSession, config: &ExitConfig, model: &Model) {
    assert!(exit.sessions() <= config.max_sessions);
    assert!(exit.open_streams() <= config.max_streams);
    assert!(exit.buffered_bytes() <= config.max_buffered_bytes);
    assert!(exit.surbs_held() <= config.max_surbs);
    let limits = super::reassembly_limits();
    let (messages, bytes) = exit.reassembly_usage();
    assert!(messages <= limits.max_partial_messages);
    assert!(bytes <= limits.max_buffered_bytes);
    let mut total = 0;
    for session in 0..u64::from(SESSIONS) {
        let (messages, bytes) = exit.session_reassembly_usage(session);
        assert!(messages <= limits.max_partial_messages_per_owner);
        assert!(bytes <= limits.max_buffered_bytes_per_owner);
        let held = exit.session_buffered_bytes(session);
        assert!(
            held <= config.max_session_buffered_bytes,
            "session {session} holds {held}"
        );
        total += held;
        for stream in 0..STREAMS {
            let key = StreamKey { session, stream };
            let Some(u) = exit.stream_usage(key) else {
                continue;
            };
            assert!(u.window <= config.max_stream_window);
            assert!(u.unacked_reply_bytes + u.read_granted <= u.window);
            assert!(u.out_of_order_client_bytes <= u.window);
            assert!(u.queued_to_write <= u.window);
            assert_eq!(
                u.queued_to_write,
                model.to_write.get(&key).copied().unwrap_or(0),
                "{key:?}: the exit and the driver disagree on what is queued"
            );
            // Sent data the client has not said it holds is re-sent at a timer. Data it
            // says it holds (a `Received` range, true or not) waits for its ack; a stream
            // whose client lied makes no progress and ends at its watch's deadline, so
            // the exit always has a timer while a stream lives (this target's 2026-12-04
            // finding: a client saying it held every byte left the stream with no
            // retransmission timer, which is right).
            if u.in_flight_reply_bytes > 0 {
                assert!(u.retransmit_at.is_some(), "{key:?}: sent data, no timer");
            }
            assert!(
                exit.poll_timeout().is_some(),
                "{key:?}: a stream with no timer"
            );
        }
    }
    assert_eq!(
        total,
        exit.buffered_bytes(),
        "the sessions' shares add up to the total"
    );
}
