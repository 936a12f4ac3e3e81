#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::fuzz::{dest_byte, reply_block, small_config};
use super::*;
use crate::stream::{RecvBuffer, split_client_message};
use proptest::prelude::*;

const SESSION: u64 = 0x5e55;

fn key(stream: StreamId) -> StreamKey {
    StreamKey {
        session: SESSION,
        stream,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Delivers a client message of `SESSION` (cut into fragments as the client does).
fn send(exit: &mut ExitSession, now: Instant, items: Vec<ClientItem>) {
    send_as(exit, now, next_message_id(), items);
}

/// Delivers a client message of `SESSION` under message id `id`.
fn send_as(exit: &mut ExitSession, now: Instant, id: u64, items: Vec<ClientItem>) {
    let encoded = ClientMessage {
        session: SESSION,
        items,
    }
    .encode()
    .unwrap();
    for f in split_client_message(id, &encoded, 1800).unwrap() {
        exit.handle_packet(now, Some(reply_block(1)), f);
    }
}

/// The reassembler takes each message id once.
fn next_message_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `len` bytes of stream 1 at `offset`.
fn send_data(exit: &mut ExitSession, now: Instant, offset: u64, len: usize) {
    let bytes = vec![7; len];
    send(
        exit,
        now,
        vec![ClientItem::Data {
            stream: 1,
            offset,
            bytes,
        }],
    );
}

fn surbs(n: usize) -> ClientItem {
    ClientItem::Surbs((0..n).map(|_| reply_block(1)).collect())
}

fn open(stream: StreamId, window: u32) -> ClientItem {
    ClientItem::Open {
        stream,
        target: Target::Host("example.org".into(), 443),
        window,
    }
}

fn events(exit: &mut ExitSession) -> Vec<ExitEvent> {
    std::iter::from_fn(|| exit.poll_event()).collect()
}

/// Every message the exit sends now (acks dropped), with the session it is for.
fn replies(exit: &mut ExitSession, now: Instant) -> Vec<ExitItem> {
    let mut items = Vec::new();
    while let Some((_, reply)) = exit.poll_reply(now) {
        if let Outgoing::Message { session, message } = reply {
            assert_eq!(session, SESSION);
            items.extend(message.items);
        }
    }
    items
}

fn exit_with(config: ExitConfig) -> ExitSession {
    config.check().unwrap();
    ExitSession::new(config, [1; 32])
}

/// Opens stream 1 with `window` announced and connects it; returns the window granted.
fn connected_stream(exit: &mut ExitSession, now: Instant, window: u32) -> u32 {
    send(exit, now, vec![surbs(40), open(1, window)]);
    assert!(matches!(
        events(exit).as_slice(),
        [ExitEvent::Connect { key: k, .. }] if *k == key(1)
    ));
    exit.connected(now, key(1)).unwrap();
    let items = replies(exit, now);
    let granted = items.iter().find_map(|i| match i {
        ExitItem::Opened { stream: 1, window } => Some(*window),
        _ => None,
    });
    granted.expect("the open is answered")
}

#[test]
fn the_exit_grants_the_announced_window_up_to_its_maximum() {
    let config = ExitConfig::new(ExitPolicy::parse("accept *:443", false).unwrap());
    assert_eq!(config.max_stream_window, 4 << 20);
    let mut exit = exit_with(config);
    assert_eq!(connected_stream(&mut exit, Instant::ZERO, 2 << 20), 2 << 20);
    assert_eq!(exit.stream_window(key(1)), Some(2 << 20));
    assert_eq!(grant_window(64 << 20, 4 << 20), 4 << 20);
    assert_eq!(grant_window(1000, 4 << 20), 1000);
}

/// The old exit kept 512 KiB per stream whatever the client's window: a client with 2 MiB
/// unacknowledged had its stream killed. Granted 2 MiB, the exit takes all of it.
#[test]
fn a_client_may_have_its_whole_granted_window_unwritten() {
    let mut exit = exit_with(ExitConfig::new(
        ExitPolicy::parse("accept *:443", false).unwrap(),
    ));
    let now = Instant::ZERO;
    let window = 2 << 20;
    connected_stream(&mut exit, now, window);
    let chunk = 1500;
    let mut offset = 0u64;
    while offset < u64::from(window) {
        let n = chunk.min((u64::from(window) - offset) as usize);
        send_data(&mut exit, now, offset, n);
        offset += n as u64;
    }
    let written: usize = events(&mut exit)
        .iter()
        .map(|e| match e {
            ExitEvent::Write { bytes, .. } => bytes.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(written, window as usize);
    assert_eq!(
        exit.stream_usage(key(1)).unwrap().queued_to_write,
        window as usize
    );
    assert!(exit.take_counts().refused.is_empty());
    // One byte past the window ends the stream, with a reset and a count.
    send_data(&mut exit, now, offset, 1);
    assert!(events(&mut exit).contains(&ExitEvent::Close { key: key(1) }));
    assert_eq!(exit.take_counts().refused.get("window"), Some(&1));
    assert!(replies(&mut exit, now).contains(&ExitItem::Reset {
        stream: 1,
        reason: Refusal::General
    }));
}

/// Replies re-sent after the RTO until acknowledged; never once acknowledged.
#[test]
fn unacknowledged_replies_are_sent_again_and_acknowledged_ones_never() {
    let mut exit = exit_with(small_config());
    let mut now = Instant::ZERO;
    connected_stream(&mut exit, now, 1 << 20);
    let max = match events(&mut exit).as_slice() {
        [ExitEvent::Read { max, .. }] => *max,
        other => panic!("{other:?}"),
    };
    let bytes: Vec<u8> = (0..max as u64).map(dest_byte).collect();
    exit.received_from_target(now, key(1), &bytes).unwrap();
    let first: Vec<(u64, usize)> = data_items(&replies(&mut exit, now));
    assert_eq!(first.iter().map(|d| d.1).sum::<usize>(), max);
    // Nothing is due before the timeout.
    let due = exit.poll_timeout().unwrap();
    assert!(due > now);
    assert!(data_items(&replies(&mut exit, now)).is_empty());
    // The client acknowledges the first segment only.
    let acked = first[0].0 + first[0].1 as u64;
    send(
        &mut exit,
        now,
        vec![ClientItem::Ack {
            stream: 1,
            offset: acked,
        }],
    );
    let _ = replies(&mut exit, now);
    now = now + exit.config().reply_rto;
    exit.handle_timeout(now);
    let again = data_items(&replies(&mut exit, now));
    assert!(!again.is_empty(), "unacknowledged data is sent again");
    assert!(
        again.iter().all(|(o, _)| *o >= acked),
        "acknowledged data sent again"
    );
    assert_eq!(
        again.iter().map(|d| d.1).sum::<usize>() as u64,
        max as u64 - acked
    );
}

fn data_items(items: &[ExitItem]) -> Vec<(u64, usize)> {
    items
        .iter()
        .filter_map(|i| match i {
            ExitItem::Data { offset, bytes, .. } => Some((*offset, bytes.len())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_resent_open_gets_the_same_answer_and_the_policy_refuses_at_once() {
    let mut exit = exit_with(small_config());
    let now = Instant::ZERO;
    let granted = connected_stream(&mut exit, now, 1 << 16);
    let _ = events(&mut exit);
    send(&mut exit, now, vec![open(1, 1 << 16)]);
    assert!(events(&mut exit).is_empty(), "no second connection");
    assert!(replies(&mut exit, now).contains(&ExitItem::Opened {
        stream: 1,
        window: granted
    }));
    send(
        &mut exit,
        now,
        vec![ClientItem::Open {
            stream: 2,
            target: Target::Host("example.org".into(), 25),
            window: 1 << 16,
        }],
    );
    assert!(events(&mut exit).is_empty());
    let refused = ExitItem::Refused {
        stream: 2,
        reason: Refusal::NotAllowed,
    };
    assert!(replies(&mut exit, now).contains(&refused));
    send(&mut exit, now, vec![open(2, 1 << 16)]);
    assert!(
        replies(&mut exit, now).contains(&refused),
        "the same answer again"
    );
    assert_eq!(exit.take_counts().streams.get("policy"), Some(&1));
}

#[test]
fn streams_and_sessions_are_bounded_and_every_refusal_counted() {
    let config = small_config();
    let mut exit = exit_with(config.clone());
    let now = Instant::ZERO;
    let mut items = vec![surbs(4)];
    items.extend((0..config.max_streams_per_session as u32 + 1).map(|s| open(s, 1 << 16)));
    send(&mut exit, now, items);
    let connects = events(&mut exit)
        .iter()
        .filter(|e| matches!(e, ExitEvent::Connect { .. }))
        .count();
    assert_eq!(connects, config.max_streams_per_session);
    assert_eq!(exit.take_counts().refused.get("session_streams"), Some(&1));
    // More sessions than the bound: the last is refused.
    for session in 100..100 + config.max_sessions as u64 {
        let m = ClientMessage {
            session,
            items: vec![],
        }
        .encode()
        .unwrap();
        for f in split_client_message(next_message_id(), &m, 1800).unwrap() {
            exit.handle_packet(now, Some(reply_block(1)), f);
        }
    }
    assert_eq!(exit.sessions(), config.max_sessions);
    assert_eq!(exit.take_counts().refused.get("sessions"), Some(&1));
    // Idle sessions without streams are forgotten.
    let later = now + config.session_idle;
    exit.handle_timeout(later);
    assert_eq!(exit.sessions(), 1, "only the session with streams stays");
}

#[test]
fn reply_blocks_are_bounded_and_the_exit_says_with_each_message_when_low() {
    let config = small_config();
    let mut exit = exit_with(config.clone());
    let now = Instant::ZERO;
    send(&mut exit, now, vec![surbs(8), surbs(8), surbs(8), surbs(8)]);
    assert_eq!(exit.surbs_held(), config.max_surbs_per_session);
    // Retired epochs' blocks go.
    exit.set_oldest_epoch(2);
    assert_eq!(exit.surbs_held(), 0);

    let mut exit = exit_with(config);
    send(&mut exit, now, vec![surbs(4), open(1, 1 << 16)]);
    exit.connected(now, key(1)).unwrap();
    let items = replies(&mut exit, now);
    assert!(
        items.contains(&ExitItem::SurbsHeld { have: 3 }),
        "{items:?}"
    );
    // Said again with the next message: the reply that said it may be lost.
    send(&mut exit, now, vec![open(2, 1 << 16)]);
    exit.connected(now, key(2)).unwrap();
    let items = replies(&mut exit, now);
    assert!(
        items.contains(&ExitItem::SurbsHeld { have: 2 }),
        "{items:?}"
    );
}

/// A client re-sends a message whose acknowledgement was lost, reply blocks and all. Were
/// they taken again, the exit would hold two copies of each block: the second reply over a
/// block finds its key used up at the client and is lost, and the client's count of the
/// exit's stock is off by the copies.
#[test]
fn reply_blocks_in_a_re_sent_message_are_taken_once() {
    let mut exit = exit_with(small_config());
    let id = next_message_id();
    send_as(&mut exit, Instant::ZERO, id, vec![surbs(4)]);
    assert_eq!(exit.surbs_held(), 4);
    // The re-send comes a few round trips later, on another route.
    send_as(&mut exit, Instant::ZERO + secs(5), id, vec![surbs(4)]);
    assert_eq!(exit.surbs_held(), 4, "the duplicate's blocks are not taken");
    // A new message's blocks are.
    send(&mut exit, Instant::ZERO + secs(6), vec![surbs(4)]);
    assert_eq!(exit.surbs_held(), 8);
}

#[test]
fn a_stream_without_progress_is_reset_and_one_at_its_lifetime_too() {
    let config = small_config();
    let mut exit = exit_with(config.clone());
    let now = Instant::ZERO;
    connected_stream(&mut exit, now, 1 << 16);
    let _ = events(&mut exit);
    let t = exit.poll_timeout().unwrap();
    assert_eq!(t, now + config.idle_timeout);
    exit.handle_timeout(t);
    assert!(events(&mut exit).contains(&ExitEvent::Close { key: key(1) }));
    assert_eq!(exit.take_counts().refused.get("no_progress"), Some(&1));
    assert!(replies(&mut exit, t).contains(&ExitItem::Reset {
        stream: 1,
        reason: Refusal::TtlExpired
    }));
    assert_eq!(exit.open_streams(), 0);
    assert_eq!(exit.buffered_bytes(), 0);
}

/// Reads stop when the session's byte budget is spent, and go on when acks free it.
#[test]
fn reads_wait_for_the_budget_and_resume_when_it_frees() {
    let mut config = small_config();
    config.max_session_buffered_bytes = config.max_stream_window;
    let mut exit = exit_with(config.clone());
    let now = Instant::ZERO;
    let w = config.max_stream_window as u32;
    send(&mut exit, now, vec![surbs(20), open(1, w), open(2, w)]);
    let _ = events(&mut exit);
    exit.connected(now, key(1)).unwrap();
    exit.connected(now, key(2)).unwrap();
    let mut sent = BTreeMap::<StreamKey, u64>::new();
    let mut stalled = false;
    for _ in 0..10_000 {
        let evs = events(&mut exit);
        if evs.is_empty() {
            stalled = true;
            break;
        }
        for e in evs {
            if let ExitEvent::Read { key, max } = e {
                let at = sent.entry(key).or_default();
                let bytes: Vec<u8> = (*at..*at + max as u64).map(dest_byte).collect();
                *at += max as u64;
                exit.received_from_target(now, key, &bytes).unwrap();
            }
        }
    }
    assert!(stalled);
    assert!(exit.session_buffered_bytes(SESSION) <= config.max_session_buffered_bytes);
    assert!(exit.take_counts().refused.contains_key("session_buffer"));
    // Only data sent can be acknowledged.
    assert!(!replies(&mut exit, now).is_empty());
    // The client acknowledges stream 1's data: reads resume.
    send(
        &mut exit,
        now,
        vec![ClientItem::Ack {
            stream: 1,
            offset: sent[&key(1)],
        }],
    );
    assert!(
        events(&mut exit)
            .iter()
            .any(|e| matches!(e, ExitEvent::Read { .. }))
    );
}

/// A client with a 2 MiB window downloads 10 MB through the exit, intact, with replies lost
/// and re-sent, and the stream never holds more than its window.
#[test]
fn a_two_mib_window_downloads_ten_megabytes_intact() {
    let mut exit = exit_with(ExitConfig::new(
        ExitPolicy::parse("accept *:443", false).unwrap(),
    ));
    let mut now = Instant::ZERO;
    let window = 2u32 << 20;
    let total: u64 = 10_000_000;
    assert_eq!(connected_stream(&mut exit, now, window), window);
    // The client's request was sent before; its data ends.
    send(
        &mut exit,
        now,
        vec![ClientItem::Fin {
            stream: 1,
            offset: 0,
        }],
    );
    let mut client = RecvBuffer::new(window as usize);
    let mut got = 0u64;
    let mut dest_at = 0u64;
    let mut closed = false;
    let mut fin_seen = false;
    let mut n = 0u64;
    while !(fin_seen && got == total) {
        for e in events(&mut exit) {
            if let ExitEvent::Read { key: k, max } = e {
                if dest_at == total {
                    exit.target_closed(now, k).unwrap();
                    closed = true;
                } else {
                    let end = (dest_at + max as u64).min(total);
                    let bytes: Vec<u8> = (dest_at..end).map(dest_byte).collect();
                    dest_at = end;
                    exit.received_from_target(now, k, &bytes).unwrap();
                }
            }
        }
        let mut acks = Vec::new();
        while let Some((_, reply)) = exit.poll_reply(now) {
            let Outgoing::Message { message, .. } = reply else {
                continue;
            };
            n += 1;
            if n.is_multiple_of(7) {
                continue; // lost
            }
            for item in message.items {
                match item {
                    ExitItem::Data { offset, bytes, .. } => {
                        let ready = client.insert(offset, &bytes).unwrap();
                        for (i, b) in ready.iter().enumerate() {
                            assert_eq!(*b, dest_byte(got + i as u64));
                        }
                        got += ready.len() as u64;
                    }
                    ExitItem::Fin { offset, .. } => {
                        client.finish_at(offset).unwrap();
                        fin_seen = true;
                    }
                    _ => {}
                }
            }
            let u = exit.stream_usage(key(1)).unwrap();
            assert!(u.unacked_reply_bytes + u.read_granted <= window as usize);
            acks.push(ClientItem::Ack {
                stream: 1,
                offset: got + u64::from(client.is_finished()),
            });
            if acks.len() % 8 == 0 {
                acks.push(surbs(8));
            }
        }
        acks.push(surbs(4));
        send(&mut exit, now, acks);
        now = now + Duration::from_millis(400);
        exit.handle_timeout(now);
        assert!(
            now < Instant::ZERO + secs(3000),
            "the download stalled at {got}"
        );
    }
    assert!(closed);
    assert_eq!(got, total);
    // The client acknowledges the end: the stream is finished and forgotten.
    send(
        &mut exit,
        now,
        vec![ClientItem::Ack {
            stream: 1,
            offset: total + 1,
        }],
    );
    let _ = replies(&mut exit, now);
    assert!(exit.stream_usage(key(1)).is_none());
    assert!(events(&mut exit).contains(&ExitEvent::Close { key: key(1) }));
    assert_eq!(exit.buffered_bytes(), 0);
}

#[test]
fn the_fuzz_bounds_and_the_defaults_check() {
    small_config().check().unwrap();
    ExitConfig::new(ExitPolicy::reject_all()).check().unwrap();
    let mut c = small_config();
    c.max_stream_window = crate::stream::DEFAULT_STREAM_WINDOW - 1;
    assert!(c.check().is_err());
    let l = reassembly_limits();
    assert_eq!(
        l.max_partial_messages_per_owner * FULL_SESSIONS,
        l.max_partial_messages
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Arbitrary sequences of fragments, driver events and timeouts (the fuzz target's
    /// steps and oracles): bounded state, acknowledged data never re-sent, sent data always
    /// on a timer, no stream beyond its window.
    #[test]
    fn the_exit_keeps_its_invariants_under_any_steps(
        data in proptest::collection::vec(any::<u8>(), 0..6000)
    ) {
        fuzz::exit(&data);
    }
}

/// Stream acks of an upload: one per burst, not one per write. Every ack spends a reply
/// block the client paid 400 bytes of upload for, so an exit that acked each of a steady
/// stream of writes (one every 2.5 ms at λ_P = 400) spent a quarter of the upload on them.
/// The first ack goes at once; while writes keep coming the next waits up to ACK_DELAY;
/// the last data is acked within ACK_DELAY of being written; half a window waiting on the
/// ack sends it at once; a message that goes anyway carries the waiting ack.
#[test]
fn an_upload_is_acknowledged_once_per_burst_not_per_write() {
    let mut exit = exit_with(small_config());
    let start = Instant::ZERO;
    let window = 1 << 20;
    connected_stream(&mut exit, start, window);
    let _ = events(&mut exit);
    let acks_in = |items: &[ExitItem]| -> Vec<u64> {
        items
            .iter()
            .filter_map(|i| match i {
                ExitItem::Ack { stream: 1, offset } => Some(*offset),
                _ => None,
            })
            .collect()
    };
    let step = Duration::from_micros(2500);
    let chunk = 1200;
    let mut now = start;
    let mut acks = Vec::new();
    let writes = 64u64;
    for i in 0..writes {
        send_data(&mut exit, now, i * chunk as u64, chunk);
        let _ = events(&mut exit);
        exit.written(now, key(1), chunk).unwrap();
        let got = acks_in(&replies(&mut exit, now));
        if i == 0 {
            assert_eq!(got, vec![chunk as u64], "the first ack goes at once");
        }
        acks.extend(got);
        now = now + step;
    }
    // 64 writes over 160 ms: the first ack at once, then one every 40 ms at most.
    let span = step * (writes as u32);
    let most = 1 + (span.as_millis() / ACK_DELAY.as_millis()) as usize + 1;
    assert!(
        acks.len() <= most,
        "{} acks for {writes} writes: {acks:?}",
        acks.len()
    );
    assert!(acks.windows(2).all(|w| w[0] < w[1]), "{acks:?}");
    // The last data is acked by ACK_DELAY after its write, and the exit's timer says when.
    let total = writes * chunk as u64;
    let due = exit.poll_timeout().unwrap();
    assert!(due <= now - step + ACK_DELAY, "{due:?}");
    exit.handle_timeout(due);
    assert_eq!(acks_in(&replies(&mut exit, due)).last(), Some(&total));
    // Half a window unacknowledged: acked at once, however recent the last ack.
    let now = due + Duration::from_millis(1);
    let half = (window / 2) as usize;
    let mut offset = total;
    while offset < total + half as u64 {
        let n = chunk.min((total + half as u64 - offset) as usize);
        send_data(&mut exit, now, offset, n);
        offset += n as u64;
    }
    let _ = events(&mut exit);
    exit.written(now, key(1), half).unwrap();
    assert_eq!(acks_in(&replies(&mut exit, now)), vec![offset]);
    // A write just after an ack waits; data going down carries it at once.
    let now = now + Duration::from_millis(1);
    send_data(&mut exit, now, offset, chunk);
    let _ = events(&mut exit);
    exit.written(now, key(1), chunk).unwrap();
    assert!(acks_in(&replies(&mut exit, now)).is_empty(), "it waits");
    exit.received_from_target(now, key(1), b"answer").unwrap();
    let items = replies(&mut exit, now);
    assert!(items.iter().any(|i| matches!(i, ExitItem::Data { .. })));
    assert_eq!(acks_in(&items), vec![offset + chunk as u64]);
}
