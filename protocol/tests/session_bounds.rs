//! The client session's state stays bounded: exit sessions (one per exit and isolation
//! token) are capped and forgotten when idle, and the keys of reply blocks never used go
//! with them. The network here is silent (it carries nothing back), the worst case for
//! state: nothing is ever acknowledged or answered.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use murmur_protocol::directory::{Consensus, IdentityKey};
use murmur_protocol::packet::Address;
use murmur_protocol::session::{
    ClientSession, Event, SessionConfig, SessionError, StateSize, StreamFailure,
};
use murmur_protocol::stream::{SESSION_IDLE, Target};
use murmur_protocol::time::Instant;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn network(seed: u64) -> (Arc<Consensus>, IdentityKey) {
    let (consensus, _, _) = common::network(seed, 1.0);
    let gateway = consensus
        .relays
        .iter()
        .find(|r| r.roles.gateway)
        .unwrap()
        .identity;
    (Arc::new(consensus), gateway)
}

/// A session whose packets are each sent once (`max_attempts = 1`): on a silent network a
/// stream fails one round-trip timeout after its open went out, and its exit session turns
/// idle, holding the keys of the reply blocks sent with the open.
fn session(max_exit_sessions: usize, rng: &mut ChaCha20Rng) -> ClientSession {
    let (consensus, gateway) = network(40);
    let mut config = SessionConfig::new(Address([0xc1; 32]));
    config.max_attempts = 1;
    config.max_exit_sessions = max_exit_sessions;
    ClientSession::new(config, consensus, gateway, Instant::ZERO, rng).unwrap()
}

fn token(i: u32) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((format!("site-{i}.example").into_bytes(), b"x".to_vec()))
}

fn target() -> Target {
    Target::Host("example.com".into(), 443)
}

/// Lets `session` act at `now`, dropping what it sends; returns the streams that failed.
/// Once it has acted, its next deadline is a real one, in the future.
fn step(session: &mut ClientSession, now: Instant, rng: &mut ChaCha20Rng) -> Vec<StreamFailure> {
    session.handle_timeout(now);
    while session.poll_transmit(now, rng).is_some() {}
    let next = session.poll_timeout();
    assert!(next.is_some_and(|t| t > now), "{next:?} at {now:?}");
    let mut failed = Vec::new();
    while let Some(event) = session.poll_event() {
        if let Event::Failed(_, why) = event {
            failed.push(why);
        }
    }
    failed
}

/// Per-domain isolation, as Tor Browser uses SOCKS credentials: 10,000 sites, one token
/// each, opened at 100 a second on a silent network. Every open carries reply blocks that are
/// never used. The exit sessions never exceed the cap (1024, the default), idle ones make room
/// for new ones, no open is refused, every stream fails with a stream error, and once
/// `SESSION_IDLE` (the exit's own limit) has passed nothing is left: no exit session, no
/// reply key, no stream, no packet.
///
/// Bounds asserted: at most 1024 exit sessions and 1024 × 4 reply keys (one open's blocks
/// per session) at any time, an estimated at most 4 MiB of session state, and after the
/// idle time, no entry and under 1 KiB.
#[test]
fn ten_thousand_isolation_tokens_and_unused_reply_blocks_stay_bounded() {
    const TOKENS: u32 = 10_000;
    const CAP: usize = murmur_protocol::session::DEFAULT_MAX_EXIT_SESSIONS;
    let mut rng = ChaCha20Rng::seed_from_u64(41);
    let mut session = session(CAP, &mut rng);
    let mut now = Instant::ZERO;
    let mut peak = StateSize::default();
    let mut failed = 0;
    for i in 0..TOKENS {
        now = now + Duration::from_millis(10);
        session.open_stream(target(), token(i), &mut rng).unwrap();
        failed += step(&mut session, now, &mut rng).len();
        let size = session.state_size();
        assert!(size.exit_sessions <= CAP, "{size:?}");
        assert!(size.reply_keys <= CAP * 4, "{size:?}");
        peak.exit_sessions = peak.exit_sessions.max(size.exit_sessions);
        peak.reply_keys = peak.reply_keys.max(size.reply_keys);
        peak.streams = peak.streams.max(size.streams);
        peak.pending = peak.pending.max(size.pending);
        peak.bytes = peak.bytes.max(size.bytes);
    }
    // The last opens' round trips.
    for _ in 0..1000 {
        now = now + Duration::from_millis(10);
        failed += step(&mut session, now, &mut rng).len();
    }
    let stats = session.stats();
    eprintln!("peak {peak:?}");
    eprintln!("stats {stats:?}");
    assert!(peak.bytes <= 4 << 20, "{peak:?}");
    assert_eq!(failed, TOKENS as usize, "{stats:?}");
    assert_eq!(stats.streams_unacknowledged, u64::from(TOKENS));
    assert_eq!(stats.opens_refused_full, 0, "{stats:?}");
    assert!(stats.exit_sessions_evicted > 0, "{stats:?}");

    // The driver goes quiet (no sends) past the idle time: the timers alone clear the rest.
    let idle_from = now;
    now = now + SESSION_IDLE + Duration::from_secs(1);
    let deadline = session.poll_timeout();
    assert!(
        deadline.is_some_and(|d| d > idle_from && d <= now),
        "{deadline:?}"
    );
    session.handle_timeout(now);
    let left = session.state_size();
    eprintln!(
        "after {}s idle {left:?}",
        now.saturating_duration_since(idle_from).as_secs()
    );
    assert_eq!(
        (
            left.exit_sessions,
            left.reply_keys,
            left.streams,
            left.pending,
            left.stalled
        ),
        (0, 0, 0, 0, 0),
        "{left:?}"
    );
    assert!(left.bytes < 1024, "{left:?}");
    let stats = session.stats();
    assert_eq!(
        stats.exit_sessions_expired + stats.exit_sessions_evicted,
        u64::from(TOKENS)
    );
    assert!(stats.reply_keys_expired >= u64::from(TOKENS), "{stats:?}");
}

/// At the cap with every exit session busy, a new token's stream is refused with a clear
/// error; a token that has a session still gets streams; once a session is idle, it makes
/// room.
#[test]
fn at_the_cap_busy_exit_sessions_refuse_new_tokens_and_idle_ones_make_room() {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let mut session = session(4, &mut rng);
    for i in 0..4 {
        session.open_stream(target(), token(i), &mut rng).unwrap();
    }
    assert_eq!(
        session.open_stream(target(), token(4), &mut rng),
        Err(SessionError::TooManyExitSessions { cap: 4 })
    );
    assert_eq!(session.stats().opens_refused_full, 1);
    session.open_stream(target(), token(0), &mut rng).unwrap();
    assert_eq!(session.state_size().exit_sessions, 4);

    // The streams' opens go out and fail unanswered: their sessions are idle.
    let mut now = Instant::ZERO;
    let mut failed = 0;
    while failed < 5 {
        now = now + Duration::from_millis(10);
        failed += step(&mut session, now, &mut rng).len();
        assert!(now < Instant::ZERO + Duration::from_secs(30), "{failed}");
    }
    session.open_stream(target(), token(4), &mut rng).unwrap();
    let size = session.state_size();
    assert_eq!(size.exit_sessions, 4, "{size:?}");
    assert_eq!(session.stats().exit_sessions_evicted, 1);
}
