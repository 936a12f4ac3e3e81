//! The `exit` fuzz target: the exit's sans-IO parts, driven by arbitrary sequences of client
//! messages (whole, cut into fragments that arrive in any order, or raw fragments),
//! destination data and time passing.
//!
//! [`Exit`](super::Exit) itself is not driven: opening a stream spawns tokio tasks that
//! connect to the destination, and its replies go out through the relay's links. What is
//! driven is what it runs on: its reassembler with its own bounds and [`super::reassemble`],
//! each stream's [`StreamState`] with its own `client_ack` and `wrote`, and
//! [`super::build_message`], which fills every reply. The items of a whole message are
//! applied as `Exit::on_message` applies them, less the TCP side (a stream opens at once,
//! its writes complete when the target says).
//!
//! Invariants (the fuzzer's oracles): the reassembler stays within its bounds, in total and
//! per session; each stream holds at most its window each way, and data it sent and was not
//! acknowledged for has a retransmission timer; every reply fits one reply
//! packet with room for the `SurbsLow` item the exit may add, re-encodes to itself, and
//! carries only the destination's bytes at their offsets, and the exit's stream ack is what
//! it wrote; what a stream delivered and wrote only grows.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use murmur_protocol::fragment::{Fragment, Reassembler};
use murmur_protocol::payload::{Content, REPLY_FRAGMENT_DATA_LEN};
use murmur_protocol::stream::{
    ClientItem, ClientMessage, ExitItem, ExitMessage, StreamId, Target, session_of_fragment,
    split_client_message,
};
use murmur_protocol::time::Instant;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    STREAM_WINDOW, SessionState, StreamState, build_message, reassemble, reassembly_limits, restore,
};

/// Steps per input.
const MAX_STEPS: usize = 64;
/// Streams a session may have open here.
const MAX_STREAMS: usize = 8;

/// The destination's byte at `offset` of every stream.
fn dest_byte(offset: u64) -> u8 {
    (offset % 241) as u8 ^ 0xa5
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A client message of session `session % 4` arrives cut into fragments of `cut` data
    /// bytes; the fragments whose bit is set in `keep` arrive, last first if `reverse`.
    Message {
        session: u8,
        items: Vec<Item>,
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
    /// The destination of a stream of session 0 sends `len` bytes, or closes.
    DestData {
        stream: u8,
        len: u16,
    },
    DestClose {
        stream: u8,
    },
    /// The destination took what was queued for it.
    Written {
        stream: u8,
    },
    /// `ms` pass; the exit fills up to `replies` replies for session 0.
    Wait {
        ms: u16,
        replies: u8,
    },
}

#[derive(Debug, Arbitrary)]
enum Item {
    Open { stream: u8 },
    Data { stream: u8, offset: u16, len: u16 },
    Fin { stream: u8, offset: u16 },
    Ack { stream: u8, offset: u32 },
    Reset { stream: u8 },
}

/// What the harness tracks beside the exit's own state.
#[derive(Default)]
struct Seen {
    /// Per stream: bytes the destination sent, delivered in order, written.
    sent: HashMap<StreamId, u64>,
    delivered: HashMap<StreamId, u64>,
    written: HashMap<StreamId, u64>,
}

/// Applies a whole client message's items to session 0's state, as `Exit::on_message` does.
fn apply(st: &mut SessionState, seen: &mut Seen, msg: ClientMessage, now: Instant) {
    for item in msg.items {
        match item {
            ClientItem::Open { stream, .. } => {
                if st.streams.contains_key(&stream) {
                    st.control.push(ExitItem::Opened {
                        stream,
                        window: STREAM_WINDOW as u32,
                    });
                } else if st.streams.len() < MAX_STREAMS {
                    let mut s =
                        StreamState::new(None, Arc::new(Notify::new()), CancellationToken::new());
                    s.connected = true;
                    st.streams.insert(stream, s);
                    st.control.push(ExitItem::Opened {
                        stream,
                        window: STREAM_WINDOW as u32,
                    });
                }
            }
            ClientItem::Data {
                stream,
                offset,
                bytes,
            } => {
                if let Some(s) = st.streams.get_mut(&stream)
                    && let Ok(ready) = s.recv.insert(offset, &bytes)
                    && s.queued_to_write + ready.len() <= STREAM_WINDOW
                {
                    s.queued_to_write += ready.len();
                }
            }
            ClientItem::Fin { stream, offset } => {
                if let Some(s) = st.streams.get_mut(&stream) {
                    let _ = s.recv.finish_at(offset);
                }
            }
            ClientItem::Ack { stream, offset } => {
                if let Some(s) = st.streams.get_mut(&stream) {
                    s.client_ack(offset, now);
                }
            }
            ClientItem::Reset { stream } => {
                // A later open of the same number is a new stream.
                st.streams.remove(&stream);
                seen.sent.remove(&stream);
                seen.delivered.remove(&stream);
                seen.written.remove(&stream);
            }
            ClientItem::Surbs(_) => st.asked_for_surbs = false,
        }
    }
}

fn message(session: u64, items: Vec<Item>) -> ClientMessage {
    let items = items
        .into_iter()
        .map(|item| match item {
            Item::Open { stream } => ClientItem::Open {
                stream: u32::from(stream),
                target: Target::Host("example.org".into(), 443),
                window: STREAM_WINDOW as u32,
            },
            Item::Data {
                stream,
                offset,
                len,
            } => ClientItem::Data {
                stream: u32::from(stream),
                offset: u64::from(offset),
                bytes: vec![stream; usize::from(len % 2048)],
            },
            Item::Fin { stream, offset } => ClientItem::Fin {
                stream: u32::from(stream),
                offset: u64::from(offset),
            },
            Item::Ack { stream, offset } => ClientItem::Ack {
                stream: u32::from(stream),
                offset: u64::from(offset),
            },
            Item::Reset { stream } => ClientItem::Reset {
                stream: u32::from(stream),
            },
        })
        .collect();
    ClientMessage { session, items }
}

/// Checks one reply as the exit would send it.
fn check_reply(msg: &mut ExitMessage, st: &SessionState, seen: &Seen) {
    // `send_ready` may add this after the message is built.
    msg.items.push(ExitItem::SurbsLow { have: u16::MAX });
    let encoded = msg.encode().expect("a reply encodes");
    assert!(
        encoded.len() <= REPLY_FRAGMENT_DATA_LEN,
        "a reply of {} bytes does not fit one packet",
        encoded.len()
    );
    assert_eq!(ExitMessage::decode(&encoded).as_ref(), Ok(&*msg));
    let content = Content::Data {
        fragment: Fragment {
            message_id: 1,
            index: 0,
            count: 1,
            data: encoded,
        },
    };
    content.encode().expect("a reply's content fits one packet");
    for item in &msg.items {
        match item {
            ExitItem::Data {
                stream,
                offset,
                bytes,
            } => {
                for (i, b) in bytes.iter().enumerate() {
                    assert_eq!(
                        *b,
                        dest_byte(offset + i as u64),
                        "stream {stream}: bytes moved"
                    );
                }
                let sent = seen.sent.get(stream).copied().unwrap_or(0);
                assert!(
                    offset + bytes.len() as u64 <= sent,
                    "data the destination never sent"
                );
            }
            ExitItem::Ack { stream, offset } => {
                let written = st.streams.get(stream).map(|s| s.written);
                assert_eq!(
                    Some(*offset),
                    written,
                    "stream {stream}: an ack of what was not written"
                );
            }
            _ => {}
        }
    }
}

/// `[steps…]`, read by `arbitrary` (see [`Op`]).
pub fn exit(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let limits = reassembly_limits();
    let mut reassembler = Reassembler::new(limits.clone());
    let mut st = SessionState::default();
    let mut seen = Seen::default();
    let mut now = Instant::ZERO;
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
                let session = u64::from(session % 4);
                let Ok(encoded) = message(session, items).encode() else {
                    continue;
                };
                let cut = usize::from(cut % 2048).max(16);
                let Ok(mut fragments) = split_client_message(u64::from(keep), &encoded, cut) else {
                    continue;
                };
                if reverse {
                    fragments.reverse();
                }
                let mut done = None;
                for (i, f) in fragments.into_iter().enumerate() {
                    if i < 32 && keep & (1 << i) == 0 {
                        continue;
                    }
                    let (named, piece) = session_of_fragment(f).expect("fragments name it");
                    assert_eq!(named, session);
                    if let Ok(Some(m)) = reassemble(&mut reassembler, session, piece, now) {
                        done = Some(m);
                    }
                }
                if let Some(m) = done {
                    assert_eq!(
                        m.encode().expect("encodes"),
                        encoded,
                        "reassembled differently"
                    );
                    if session == 0 {
                        apply(&mut st, &mut seen, m, now);
                    }
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
                let mut data = u64::from(session % 4).to_be_bytes().to_vec();
                data.resize(8 + usize::from(len % 4096), fill);
                let fragment = Fragment {
                    message_id: u64::from(message_id),
                    index,
                    count,
                    data,
                };
                let mut bytes = Vec::new();
                fragment.encode_into(&mut bytes);
                if let Ok(f) = Fragment::decode(&bytes)
                    && let Ok((session, piece)) = session_of_fragment(f)
                    && let Ok(Some(m)) = reassemble(&mut reassembler, session, piece, now)
                    && session == 0
                {
                    apply(&mut st, &mut seen, m, now);
                }
            }
            Op::DestData { stream, len } => {
                let id = u32::from(stream);
                if let Some(s) = st.streams.get_mut(&id) {
                    let at = seen.sent.get(&id).copied().unwrap_or(0);
                    let bytes: Vec<u8> = (at..at + u64::from(len)).map(dest_byte).collect();
                    let taken = s.send.push(&bytes);
                    *seen.sent.entry(id).or_default() += taken as u64;
                }
            }
            Op::DestClose { stream } => {
                if let Some(s) = st.streams.get_mut(&u32::from(stream)) {
                    s.send.close();
                }
            }
            Op::Written { stream } => {
                if let Some(s) = st.streams.get_mut(&u32::from(stream)) {
                    let n = s.queued_to_write;
                    s.wrote(n);
                }
            }
            Op::Wait { ms, replies } => {
                now = now + Duration::from_millis(u64::from(ms));
                for i in 0..replies % 8 {
                    let Some(mut msg) = build_message(&mut st, now) else {
                        break;
                    };
                    let lost = i % 3 == 2;
                    check_reply(&mut msg, &st, &seen);
                    if lost {
                        // No reply block for it: control items go back.
                        restore(&mut st, msg);
                    }
                }
            }
        }
        // The reassembler's bounds, in total and per session.
        assert!(reassembler.partial_messages() <= limits.max_partial_messages);
        assert!(reassembler.buffered_bytes() <= limits.max_buffered_bytes);
        for session in 0..4 {
            let (messages, bytes) = reassembler.owner_usage(session);
            assert!(messages <= limits.max_partial_messages_per_owner);
            assert!(bytes <= limits.max_buffered_bytes_per_owner);
        }
        for (id, s) in &st.streams {
            assert!(s.send.unacked_bytes() <= STREAM_WINDOW);
            assert!(s.recv.pending_bytes() <= STREAM_WINDOW);
            assert!(s.queued_to_write <= STREAM_WINDOW);
            let delivered = seen.delivered.entry(*id).or_default();
            assert!(
                s.recv.delivered() >= *delivered,
                "stream {id} delivered less"
            );
            *delivered = s.recv.delivered();
            let written = seen.written.entry(*id).or_default();
            assert!(s.written >= *written, "stream {id} wrote less");
            *written = s.written;
            // Data never sent waits for a reply block (the pump is woken when it comes);
            // data sent and not acknowledged must have a retransmission timer.
            if s.send.unacked_bytes() > 0 && !s.send.has_new() {
                assert!(super::next_deadline(&st).is_some(), "sent data, no timer");
            }
        }
    }
}
