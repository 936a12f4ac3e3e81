//! The exit's state machine: the last hop of clients' forward packets, without sockets,
//! tasks or clocks (in the shape of quinn-proto's `Connection`).
//!
//! For each data packet the exit first acknowledges it with the SURB-ACK it carries, then
//! reassembles the client's message and acts on its items: open a stream where the exit
//! policy may allow it, pass the client's data on in order, and stream the destination's
//! answers back through the client's reply blocks. Answers stay in a [`SendBuffer`] until
//! the client acknowledges them and are re-sent if it does not in time.
//!
//! # Calls
//!
//! - getters: [`ExitSession::policy`], [`ExitSession::sessions`], [`ExitSession::open_streams`],
//!   [`ExitSession::buffered_bytes`], [`ExitSession::surbs_held`],
//!   [`ExitSession::stream_window`];
//! - `handle_*`, input from the network and the clock: [`ExitSession::handle_packet`],
//!   [`ExitSession::handle_timeout`];
//! - mutators, answers of the driver to [`ExitEvent`]s: [`ExitSession::connected`],
//!   [`ExitSession::connect_failed`], [`ExitSession::written`],
//!   [`ExitSession::received_from_target`], [`ExitSession::target_closed`],
//!   [`ExitSession::stream_failed`]; and [`ExitSession::set_oldest_epoch`];
//! - `poll_*`, output: [`ExitSession::poll_event`] (what to do with destinations),
//!   [`ExitSession::poll_transmit`] (reply packets to send), [`ExitSession::poll_timeout`]
//!   (when to call `handle_timeout`), and [`ExitSession::take_counts`] (refusals and drops
//!   for metrics).
//!
//! After any input, drain `poll_event` and `poll_transmit` until both are `None`, then ask
//! `poll_timeout` again.
//!
//! # Destinations
//!
//! The driver connects ([`ExitEvent::Connect`]; it resolves host names and checks every
//! resolved address against [`ExitSession::policy`]), writes ([`ExitEvent::Write`], then
//! [`ExitSession::written`]), shuts the write half ([`ExitEvent::CloseWrite`]) and reads only
//! when granted: [`ExitEvent::Read`] says how many bytes it may read once, which the exit
//! has room for in the stream's window and the byte budgets, so nothing read is ever
//! dropped. [`ExitEvent::Close`] says a stream is gone, whatever the reason.
//!
//! # Bounds
//!
//! Everything is bounded, in total and per client session, so that one client cannot take
//! what the others need: sessions ([`ExitConfig::max_sessions`]); streams (`max_streams`,
//! per session `max_streams_per_session`); bytes held for streams — replies until
//! acknowledged, client data until written, reads granted — (`max_buffered_bytes`, per
//! session `max_session_buffered_bytes`, per stream its window); reply blocks
//! (`max_surbs`, per session `max_surbs_per_session`); messages in reassembly (each fragment
//! names its session, [`reassembly_limits`]); SURB-ACKs waiting to go ([`MAX_PENDING_ACKS`]).
//! A stream is closed when it moved fewer than `idle_progress_bytes` in `idle_timeout` (a
//! trickle is not progress) and at `stream_lifetime` in any case. Every refusal and drop is
//! counted ([`ExitCounts`]).
//!
//! # The stream window
//!
//! A client announces its window when it opens a stream (`ClientItem::Open::window`: what
//! its receive buffer holds, and the most it will send unacknowledged); the exit grants the
//! least of that and [`ExitConfig::max_stream_window`] and says so in `Opened`. Both
//! directions of the stream use the granted window. Until the answer comes the client keeps
//! to [`crate::stream::DEFAULT_STREAM_WINDOW`], which every exit grants at least.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::directory::{Epoch, ExitPolicy};
use crate::fragment::{
    Assembled, Fragment, OWNER_BYTES, OWNER_MESSAGES, Reassembler, ReassemblyLimits,
};
use crate::payload::{Content, REPLY_FRAGMENT_DATA_LEN};
use crate::stream::{
    ClientItem, ClientMessage, DATA_ITEM_OVERHEAD, DEFAULT_STREAM_WINDOW, EXIT_MESSAGE_OVERHEAD,
    ExitItem, ExitMessage, RecvBuffer, Refusal, SendBuffer, StreamId, Target, join_client_message,
    session_of_fragment,
};
use crate::surb::{Reply, ReplyBlock};
use crate::time::Instant;

#[doc(hidden)]
pub mod fuzz;
#[cfg(test)]
mod tests;

/// The global bounds hold this many sessions at their per-session limits at once.
pub const FULL_SESSIONS: usize = 16;
/// How many times each new stream ack is sent (acks ride on reply packets, which may be
/// lost and are never acknowledged themselves).
pub const ACK_REPEATS: u8 = 3;
/// While the client's data keeps coming, its stream ack waits up to this long after the last
/// one (TCP's delayed ack, at Linux's 40 ms): every ack spends a reply block, which the
/// client pays for with 400 bytes of an upstream packet, so acking each write would cost a
/// quarter of an upload's room (0.74 of the λ_P bound measured at λ_P = 400). The first ack
/// goes at once, and so does one that half the window waits on.
pub const ACK_DELAY: Duration = Duration::from_millis(40);
/// Ended streams remembered per session, so that a re-sent open gets the same answer
/// instead of a second connection.
pub const ENDED_MEMORY: usize = 256;
/// SURB-ACKs waiting for the driver; beyond it one is dropped (and counted): the client
/// re-sends the packet.
pub const MAX_PENDING_ACKS: usize = 4096;
/// The most bytes one [`ExitEvent::Read`] grants.
pub const READ_CHUNK: usize = 16 * 1024;
/// Bytes of an exit message's budget kept for the `SurbsHeld` item.
const SURBS_HELD_ROOM: usize = 3;
/// The most stream bytes one reply carries: a message of one `Data` item (and `SurbsHeld`).
pub const REPLY_DATA_LEN: usize = crate::payload::REPLY_FRAGMENT_DATA_LEN
    - crate::stream::EXIT_MESSAGE_OVERHEAD
    - SURBS_HELD_ROOM
    - crate::stream::DATA_ITEM_OVERHEAD;

/// The exit's knobs.
#[derive(Clone, Debug)]
pub struct ExitConfig {
    /// Checked at once for every open; the driver checks resolved addresses too.
    pub policy: ExitPolicy,
    /// Client sessions at once.
    pub max_sessions: usize,
    /// Open streams at once.
    pub max_streams: usize,
    /// Open streams of one session.
    pub max_streams_per_session: usize,
    /// Stream bytes held across sessions.
    pub max_buffered_bytes: usize,
    /// Stream bytes held for one session.
    pub max_session_buffered_bytes: usize,
    /// The largest window granted to a stream (at least [`DEFAULT_STREAM_WINDOW`]).
    pub max_stream_window: usize,
    /// Reply blocks held across sessions (about 400 bytes each).
    pub max_surbs: usize,
    /// Reply blocks held per session (its oldest go first when it is at this bound).
    pub max_surbs_per_session: usize,
    /// A stream that moved fewer than `idle_progress_bytes` in this long is closed.
    pub idle_timeout: Duration,
    pub idle_progress_bytes: u64,
    /// Every stream is closed this long after it opened.
    pub stream_lifetime: Duration,
    /// Reply data not acknowledged within this is re-sent, until round trips are measured.
    pub reply_rto: Duration,
    /// A session with no stream is forgotten after this long without a message.
    pub session_idle: Duration,
}

impl ExitConfig {
    /// The relay's defaults with `policy`.
    pub fn new(policy: ExitPolicy) -> Self {
        let max_surbs = 65_536;
        ExitConfig {
            policy,
            max_sessions: 4096,
            max_streams: 1024,
            max_streams_per_session: 64,
            max_buffered_bytes: 256 << 20,
            max_session_buffered_bytes: 16 << 20,
            max_stream_window: 4 << 20,
            max_surbs,
            max_surbs_per_session: max_surbs / FULL_SESSIONS,
            idle_timeout: Duration::from_secs(300),
            idle_progress_bytes: 2048,
            stream_lifetime: Duration::from_secs(3600),
            reply_rto: Duration::from_secs(3),
            session_idle: crate::stream::SESSION_IDLE,
        }
    }

    /// The per-session bounds leave room for [`FULL_SESSIONS`] sessions at their limits
    /// within the global ones, and a session holds at least one stream's window.
    pub fn check(&self) -> Result<(), ExitError> {
        let n = FULL_SESSIONS;
        let bad = |what: String| Err(ExitError::Config(what));
        if self.max_streams_per_session == 0
            || self.max_session_buffered_bytes == 0
            || self.max_surbs_per_session == 0
            || self.max_sessions == 0
        {
            return bad("the per-session bounds and max_sessions must be positive".into());
        }
        if self.max_streams_per_session.saturating_mul(n) > self.max_streams {
            return bad(format!(
                "max_streams_per_session {} is more than max_streams / {n} ({}): {n} \
                 sessions at their limit must fit",
                self.max_streams_per_session,
                self.max_streams / n
            ));
        }
        if self.max_session_buffered_bytes.saturating_mul(n) > self.max_buffered_bytes {
            return bad(format!(
                "max_session_buffered_bytes {} is more than max_buffered_bytes / {n} ({})",
                self.max_session_buffered_bytes,
                self.max_buffered_bytes / n
            ));
        }
        if self.max_surbs_per_session.saturating_mul(n) > self.max_surbs {
            return bad(format!(
                "max_surbs_per_session {} is more than max_surbs / {n}",
                self.max_surbs_per_session
            ));
        }
        if self.max_stream_window < DEFAULT_STREAM_WINDOW {
            return bad(format!(
                "max_stream_window {} is less than the window every client may use before \
                 the exit answers ({DEFAULT_STREAM_WINDOW} bytes)",
                self.max_stream_window
            ));
        }
        if self.max_session_buffered_bytes < self.max_stream_window {
            return bad(format!(
                "max_session_buffered_bytes {} must hold at least one stream window ({} bytes)",
                self.max_session_buffered_bytes, self.max_stream_window
            ));
        }
        if self.idle_timeout.is_zero() || self.stream_lifetime.is_zero() || self.reply_rto.is_zero()
        {
            return bad("idle_timeout, stream_lifetime and reply_rto must be positive".into());
        }
        Ok(())
    }
}

/// What went wrong in a call of the driver's, or in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExitError {
    /// The stream is not (or no longer) open: it ended while the driver worked on it.
    #[error("stream {0:?} is not open")]
    UnknownStream(StreamKey),
    /// The driver read more than it was granted (a bug in the driver).
    #[error("stream {key:?}: {got} bytes read where {granted} were granted")]
    ReadBeyondGrant {
        key: StreamKey,
        granted: usize,
        got: usize,
    },
    /// A bound that cannot hold.
    #[error("exit configuration: {0}")]
    Config(String),
}

/// A stream, named by its client session and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamKey {
    pub session: u64,
    pub stream: StreamId,
}

/// What one stream holds ([`ExitSession::stream_usage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamUsage {
    /// The window granted.
    pub window: usize,
    /// Reply bytes held until the client acknowledges them.
    pub unacked_reply_bytes: usize,
    /// The client has every reply byte below this.
    pub acked_reply_offset: u64,
    /// Some of them were never sent.
    pub unsent_reply_bytes: bool,
    /// Of those sent, the bytes in segments neither acknowledged nor said held by the client
    /// (a `Received` range): what the retransmission timer is for. A client that says it
    /// holds bytes it lacks gets them again only when its stream is reset for making no
    /// progress.
    pub in_flight_reply_bytes: usize,
    /// When the oldest reply segment sent and not acknowledged is re-sent.
    pub retransmit_at: Option<Instant>,
    /// Client bytes held out of order.
    pub out_of_order_client_bytes: usize,
    /// Client bytes handed to the driver and not yet written.
    pub queued_to_write: usize,
    /// Bytes the driver may read now.
    pub read_granted: usize,
}

/// What a reply says, before it is sealed into its reply block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// The SURB-ACK of a packet.
    Ack,
    /// Stream items for the client session of the block (one reply fragment's worth).
    Message { session: u64, message: ExitMessage },
}

/// What the driver must do with a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitEvent {
    /// Connect to `target` (resolving host names and checking every resolved address
    /// against the policy); answer with [`ExitSession::connected`] or
    /// [`ExitSession::connect_failed`].
    Connect { key: StreamKey, target: Target },
    /// Write `bytes` to the destination after the writes before; answer with
    /// [`ExitSession::written`] as they are written.
    Write { key: StreamKey, bytes: Vec<u8> },
    /// The client's data ended: shut the destination's write half after the writes before.
    CloseWrite { key: StreamKey },
    /// Read at most `max` bytes from the destination, once; answer with
    /// [`ExitSession::received_from_target`] or [`ExitSession::target_closed`].
    Read { key: StreamKey, max: usize },
    /// The stream is gone: drop its connection.
    Close { key: StreamKey },
}

/// Refusals, drops and stream results since the last [`ExitSession::take_counts`], by
/// label (a small fixed set of names, so the maps stay small).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExitCounts {
    /// Opens refused and streams closed by a limit: `sessions`, `streams`,
    /// `session_streams`, `buffer`, `session_buffer`, `surbs`, `partial_messages`,
    /// `session_partial_messages`, `lifetime`, `no_progress`, `window`.
    pub refused: BTreeMap<&'static str, u64>,
    /// Packets, items and replies dropped, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Streams by result: `opened`, `refused`, `policy`.
    pub streams: BTreeMap<&'static str, u64>,
}

impl ExitCounts {
    fn add(map: &mut BTreeMap<&'static str, u64>, label: &'static str) {
        *map.entry(label).or_default() += 1;
    }
}

/// The exit's state for every client session.
pub struct ExitSession {
    config: ExitConfig,
    reassembler: Reassembler,
    sessions: BTreeMap<u64, Session>,
    /// Sessions that may have something to send, in turn.
    ready: VecDeque<u64>,
    /// SURB-ACKs to send, before anything else.
    acks: VecDeque<ReplyBlock>,
    events: VecDeque<ExitEvent>,
    /// Streams waiting for the byte budget to grant a read.
    parked: VecDeque<StreamKey>,
    open_streams: usize,
    /// Stream bytes held across sessions (each session's share is in its state).
    buffered: usize,
    surbs_held: usize,
    /// The oldest key epoch whose reply blocks are still usable.
    oldest_epoch: Epoch,
    counts: ExitCounts,
    /// Message ids of replies.
    rng: ChaCha20Rng,
}

struct Session {
    surbs: VecDeque<ReplyBlock>,
    streams: BTreeMap<StreamId, Stream>,
    /// Items to send before any data.
    control: VecDeque<ExitItem>,
    last_active: Instant,
    /// Streams that ended recently and how.
    ended: VecDeque<(StreamId, ExitItem)>,
    /// Stream bytes this session holds (the sum of [`Stream::held`]).
    buffered: usize,
    in_ready: bool,
}

impl Session {
    fn new(now: Instant) -> Self {
        Session {
            surbs: VecDeque::new(),
            streams: BTreeMap::new(),
            control: VecDeque::new(),
            last_active: now,
            ended: VecDeque::new(),
            buffered: 0,
            in_ready: false,
        }
    }

    /// Remembers how `stream` ended; `tell` also says it to the client.
    fn remember_end(&mut self, stream: StreamId, item: ExitItem, tell: bool) {
        if self.ended.len() >= ENDED_MEMORY {
            self.ended.pop_front();
        }
        self.ended.push_back((stream, item.clone()));
        if tell {
            self.control.push_back(item);
        }
    }
}

struct Stream {
    /// Client → destination, in order.
    recv: RecvBuffer,
    /// Destination → client, until acknowledged.
    send: SendBuffer,
    window: usize,
    /// Bytes handed to the driver to write and not yet written.
    queued_to_write: usize,
    /// Offset the destination has been sent up to (the exit's stream ack).
    written: u64,
    /// The exit's stream ack is due (new data written), or due again, RTO apart.
    ack_resends_left: u8,
    ack_sent_at: Option<Instant>,
    /// The offset the last ack sent said.
    acked_offset: u64,
    /// When the end-of-data item was last sent; the client acknowledges it with an `Ack`
    /// one past the end (a FIN takes a sequence number, as in TCP).
    fin_sent_at: Option<Instant>,
    fin_acked: bool,
    connected: bool,
    /// Bytes the driver may read now (0: no read outstanding).
    read_granted: usize,
    parked: bool,
    target_closed: bool,
    close_write_sent: bool,
    /// Bytes written to the destination plus bytes the client acknowledged: the work done.
    progress: u64,
    opened: Instant,
    /// Since when, and from what progress, the stream must make `idle_progress_bytes`.
    mark: (Instant, u64),
}

impl Stream {
    fn new(window: usize, rto: Duration, now: Instant) -> Self {
        Stream {
            recv: RecvBuffer::new(window),
            send: SendBuffer::new(window, rto),
            window,
            queued_to_write: 0,
            written: 0,
            ack_resends_left: 0,
            ack_sent_at: None,
            acked_offset: 0,
            fin_sent_at: None,
            fin_acked: false,
            connected: false,
            read_granted: 0,
            parked: false,
            target_closed: false,
            close_write_sent: false,
            progress: 0,
            opened: now,
            mark: (now, 0),
        }
    }

    /// Bytes this stream holds: replies until acknowledged, client data until written,
    /// and what the driver may read.
    fn held(&self) -> usize {
        self.send.unacked_bytes()
            + self.recv.pending_bytes()
            + self.queued_to_write
            + self.read_granted
    }

    /// Work was done: the idle watch starts again once it adds up to `min_progress`.
    fn progressed(&mut self, n: u64, min_progress: u64, now: Instant) {
        self.progress += n;
        if self.progress.saturating_sub(self.mark.1) >= min_progress.max(1) {
            self.mark = (now, self.progress);
        }
    }

    /// Everything both ways is done: the client's data written and ended, the destination's
    /// acknowledged with its end.
    fn is_finished(&self) -> bool {
        self.recv.is_finished()
            && self.queued_to_write == 0
            && self.target_closed
            && self.send.is_done()
            && self.fin_acked
    }

    /// When the stream must end, and why, if it moves no more.
    fn watch_deadline(&self, config: &ExitConfig) -> (Instant, &'static str) {
        let lifetime = self.opened + config.stream_lifetime;
        let idle = self.mark.0 + config.idle_timeout;
        if lifetime <= idle {
            (lifetime, "lifetime")
        } else {
            (idle, "no_progress")
        }
    }

    /// When the stream ack is next due: at once for the first data written, then at most
    /// [`ACK_DELAY`] after the last while more keeps coming (or at once if half the window
    /// waits on it), and RTO apart for the repeats of an ack already said.
    fn ack_due_at(&self) -> Option<Instant> {
        if self.ack_resends_left == 0 {
            return None;
        }
        let Some(sent) = self.ack_sent_at else {
            return Some(Instant::ZERO);
        };
        let unacked = self.written.saturating_sub(self.acked_offset);
        if unacked == 0 {
            return Some(sent + self.send.rto());
        }
        if unacked >= (self.window / 2) as u64 {
            return Some(sent);
        }
        Some(sent + ACK_DELAY.min(self.send.rto()))
    }

    /// The stream ack for stream `id`, sent at `now`.
    fn ack(&mut self, id: StreamId, now: Instant) -> ExitItem {
        self.ack_resends_left = self.ack_resends_left.saturating_sub(1);
        self.ack_sent_at = Some(now);
        self.acked_offset = self.written;
        ExitItem::Ack {
            stream: id,
            offset: self.written,
        }
    }

    /// When something next falls due to send: a retransmission, an ack or a repeated FIN.
    fn send_deadline(&self) -> Option<Instant> {
        [
            self.send.poll_timeout(),
            self.ack_due_at(),
            self.fin_sent_at
                .filter(|_| !self.fin_acked)
                .map(|t| t + self.send.rto()),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The reassembler's bounds: one session may hold a [`FULL_SESSIONS`]th of them.
pub fn reassembly_limits() -> ReassemblyLimits {
    let global = ReassemblyLimits::default();
    ReassemblyLimits {
        max_partial_messages_per_owner: global.max_partial_messages / FULL_SESSIONS,
        max_buffered_bytes_per_owner: global.max_buffered_bytes / FULL_SESSIONS,
        ..global
    }
}

impl ExitSession {
    /// An exit with no sessions; `seed` draws reply message ids.
    pub fn new(config: ExitConfig, seed: [u8; 32]) -> Self {
        ExitSession {
            config,
            reassembler: Reassembler::new(reassembly_limits()),
            sessions: BTreeMap::new(),
            ready: VecDeque::new(),
            acks: VecDeque::new(),
            events: VecDeque::new(),
            parked: VecDeque::new(),
            open_streams: 0,
            buffered: 0,
            surbs_held: 0,
            oldest_epoch: 0,
            counts: ExitCounts::default(),
            rng: ChaCha20Rng::from_seed(seed),
        }
    }

    // ---- getters

    /// The exit policy the driver checks resolved addresses against.
    pub fn policy(&self) -> &ExitPolicy {
        &self.config.policy
    }

    pub fn config(&self) -> &ExitConfig {
        &self.config
    }

    /// Client sessions held.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Streams open (connecting or connected).
    pub fn open_streams(&self) -> usize {
        self.open_streams
    }

    /// Stream bytes held across sessions.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Stream bytes held for `session`.
    pub fn session_buffered_bytes(&self, session: u64) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.buffered)
    }

    /// Reply blocks held across sessions.
    pub fn surbs_held(&self) -> usize {
        self.surbs_held
    }

    /// Reply blocks held for `session` (0 for a session the exit does not know).
    pub fn session_surbs_held(&self, session: u64) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.surbs.len())
    }

    /// The window granted to a stream, if it is open.
    pub fn stream_window(&self, key: StreamKey) -> Option<usize> {
        self.stream(key).map(|s| s.window)
    }

    /// What a stream holds now, if it is open.
    pub fn stream_usage(&self, key: StreamKey) -> Option<StreamUsage> {
        self.stream(key).map(|s| StreamUsage {
            window: s.window,
            unacked_reply_bytes: s.send.unacked_bytes(),
            acked_reply_offset: s.send.acked(),
            unsent_reply_bytes: s.send.has_new(),
            in_flight_reply_bytes: s.send.in_flight_bytes(),
            retransmit_at: s.send.poll_timeout(),
            out_of_order_client_bytes: s.recv.pending_bytes(),
            queued_to_write: s.queued_to_write,
            read_granted: s.read_granted,
        })
    }

    /// Messages and bytes in reassembly.
    pub fn reassembly_usage(&self) -> (usize, usize) {
        (
            self.reassembler.partial_messages(),
            self.reassembler.buffered_bytes(),
        )
    }

    /// Messages and bytes in reassembly for one session.
    pub fn session_reassembly_usage(&self, session: u64) -> (usize, usize) {
        self.reassembler.owner_usage(session)
    }

    fn stream(&self, key: StreamKey) -> Option<&Stream> {
        self.sessions.get(&key.session)?.streams.get(&key.stream)
    }

    // ---- input from the network and the clock

    /// A data packet ended here: `ack` is its SURB-ACK (a client's message of reply blocks
    /// and acks alone comes without one), `fragment` a piece of a client message. The ack
    /// goes out first (the client's ARQ waits on it).
    pub fn handle_packet(&mut self, now: Instant, ack: Option<ReplyBlock>, fragment: Fragment) {
        if let Some(ack) = ack {
            if self.acks.len() >= MAX_PENDING_ACKS {
                self.drop_count("exit_ack_queue_full");
            } else {
                self.acks.push_back(ack);
            }
        }
        // Every fragment names its session, which the reassembler charges it to.
        let (session, piece) = match session_of_fragment(fragment) {
            Ok(f) => f,
            Err(e) => return self.drop_count(e.label()),
        };
        self.reassembler.expire(now);
        let message = match self.reassembler.insert_owned(session, piece, now) {
            Ok(Assembled::Complete { message, .. }) => {
                ClientMessage::decode(&join_client_message(session, &message))
            }
            Ok(_) => return,
            Err(crate::Error::ReassemblyFull(what)) => {
                self.refuse(if what == OWNER_MESSAGES || what == OWNER_BYTES {
                    "session_partial_messages"
                } else {
                    "partial_messages"
                });
                return self.drop_count("reassembly_full");
            }
            Err(e) => return self.drop_count(e.label()),
        };
        match message {
            Ok(message) => self.handle_message(now, message),
            Err(e) => self.drop_count(e.label()),
        }
    }

    /// Time passed: retransmissions fall due, streams that outlived their limits end,
    /// idle sessions and stale reassembly are forgotten.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.reassembler.expire(now);
        let mut ending = Vec::new();
        let mut idle = Vec::new();
        let mut due = Vec::new();
        for (&id, s) in &self.sessions {
            for (&stream, st) in &s.streams {
                let (at, why) = st.watch_deadline(&self.config);
                if at <= now {
                    ending.push((
                        StreamKey {
                            session: id,
                            stream,
                        },
                        why,
                    ));
                }
            }
            if s.streams.is_empty()
                && now.saturating_duration_since(s.last_active) >= self.config.session_idle
            {
                idle.push(id);
            } else if !s.surbs.is_empty()
                && s.streams
                    .values()
                    .filter_map(Stream::send_deadline)
                    .any(|t| t <= now)
            {
                due.push(id);
            }
        }
        for (key, why) in ending {
            let finishing = self
                .stream(key)
                .is_some_and(|s| s.recv.is_finished() && s.queued_to_write == 0 && s.target_closed);
            if finishing {
                // Only the client's last acknowledgements were missing: end quietly.
                self.end_stream(key, None);
            } else {
                self.refuse(why);
                self.end_stream(
                    key,
                    Some(ExitItem::Reset {
                        stream: key.stream,
                        reason: Refusal::TtlExpired,
                    }),
                );
            }
        }
        for id in idle {
            self.forget_session(id);
        }
        for id in due {
            self.mark_ready(id);
        }
    }

    /// Reply blocks for epochs before `epoch` are discarded (their keys are gone).
    pub fn set_oldest_epoch(&mut self, epoch: Epoch) {
        self.oldest_epoch = epoch;
        let mut gone = 0;
        for s in self.sessions.values_mut() {
            let before = s.surbs.len();
            s.surbs.retain(|b| b.key_epoch() >= epoch);
            gone += before - s.surbs.len();
        }
        self.surbs_held -= gone.min(self.surbs_held);
    }

    // ---- answers of the driver

    /// The destination of `key` accepted the connection.
    pub fn connected(&mut self, now: Instant, key: StreamKey) -> Result<(), ExitError> {
        let window = {
            let s = self.stream_mut(key)?;
            s.connected = true;
            s.window
        };
        ExitCounts::add(&mut self.counts.streams, "opened");
        self.control(
            key.session,
            ExitItem::Opened {
                stream: key.stream,
                window: window_on_wire(window),
            },
        );
        self.grant_read(now, key);
        Ok(())
    }

    /// The destination of `key` could not be reached.
    pub fn connect_failed(&mut self, key: StreamKey, reason: Refusal) -> Result<(), ExitError> {
        self.stream_mut(key)?;
        ExitCounts::add(&mut self.counts.streams, "refused");
        self.end_stream(
            key,
            Some(ExitItem::Refused {
                stream: key.stream,
                reason,
            }),
        );
        Ok(())
    }

    /// The connection of `key` broke (a read or write failed).
    pub fn stream_failed(&mut self, key: StreamKey, reason: Refusal) -> Result<(), ExitError> {
        self.stream_mut(key)?;
        self.end_stream(
            key,
            Some(ExitItem::Reset {
                stream: key.stream,
                reason,
            }),
        );
        Ok(())
    }

    /// `n` bytes of the client's data were written to the destination: its ack is due.
    pub fn written(&mut self, now: Instant, key: StreamKey, n: usize) -> Result<(), ExitError> {
        let min_progress = self.config.idle_progress_bytes;
        self.with_stream(key, |s| {
            let n = n.min(s.queued_to_write);
            s.queued_to_write -= n;
            s.written += n as u64;
            s.progressed(n as u64, min_progress, now);
            s.ack_resends_left = ACK_REPEATS;
        })?;
        self.after_change(now, key);
        Ok(())
    }

    /// The destination of `key` sent `bytes` (at most what the last [`ExitEvent::Read`]
    /// granted).
    pub fn received_from_target(
        &mut self,
        now: Instant,
        key: StreamKey,
        bytes: &[u8],
    ) -> Result<(), ExitError> {
        let granted = self.stream_mut(key)?.read_granted;
        if bytes.len() > granted {
            // Taking it would break the window; losing it would corrupt the stream.
            self.stream_failed(key, Refusal::General)?;
            return Err(ExitError::ReadBeyondGrant {
                key,
                granted,
                got: bytes.len(),
            });
        }
        self.with_stream(key, |s| {
            s.read_granted = 0;
            // The grant was within the window's space, which only grows until this push.
            s.send.push(bytes);
        })?;
        self.grant_read(now, key);
        self.mark_ready(key.session);
        Ok(())
    }

    /// The destination of `key` closed its side: the data to the client ends here.
    pub fn target_closed(&mut self, now: Instant, key: StreamKey) -> Result<(), ExitError> {
        self.with_stream(key, |s| {
            s.read_granted = 0;
            s.target_closed = true;
            s.send.close();
        })?;
        self.after_change(now, key);
        Ok(())
    }

    // ---- output

    /// What the driver must do next with a destination.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ExitEvent> {
        self.events.pop_front()
    }

    /// The next reply packet to send: SURB-ACKs first, then the sessions' messages in turn.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Reply> {
        while let Some((block, reply)) = self.poll_reply(now) {
            let content = match reply {
                Outgoing::Ack => Content::Ack.encode(),
                Outgoing::Message { message: msg, .. } => {
                    let message_id = self.rng.random();
                    msg.encode().and_then(|data| {
                        Content::Data {
                            fragment: Fragment {
                                message_id,
                                index: 0,
                                count: 1,
                                data,
                            },
                        }
                        .encode()
                    })
                }
            };
            match content.and_then(|c| block.use_block(&c)) {
                Ok(reply) => return Some(reply),
                // Data stays in the send buffers and is re-sent at its timeout.
                Err(e) => self.drop_count(e.label()),
            }
        }
        None
    }

    /// [`Self::poll_transmit`] before sealing: the block to use and what to say with it.
    #[must_use]
    pub fn poll_reply(&mut self, now: Instant) -> Option<(ReplyBlock, Outgoing)> {
        while let Some(ack) = self.acks.pop_front() {
            if ack.key_epoch() >= self.oldest_epoch {
                return Some((ack, Outgoing::Ack));
            }
            self.drop_count("exit_stale_surb");
        }
        while let Some(id) = self.ready.pop_front() {
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            s.in_ready = false;
            let oldest = self.oldest_epoch;
            let before = s.surbs.len();
            s.surbs.retain(|b| b.key_epoch() >= oldest);
            self.surbs_held -= (before - s.surbs.len()).min(self.surbs_held);
            if s.surbs.is_empty() {
                // Nothing can be said until the client sends reply blocks; it learnt it is
                // short from the `SurbsHeld` sent with the last ones.
                continue;
            }
            let Some(mut msg) = build_message(s, now) else {
                continue;
            };
            // With every message: the client's count drifts with every lost reply (it cannot
            // tell a lost reply from one not yet sent), and from how many blocks wait here it
            // learns whether its stock covers the round trip.
            msg.items.push(ExitItem::SurbsHeld {
                have: u16::try_from(s.surbs.len().saturating_sub(1)).unwrap_or(u16::MAX),
            });
            // Newest first: the client keeps the keys of its newest blocks only (a bounded
            // number per session), so an old block may no longer open at the client (the pair
            // harness found a stream hung on replies the client could not read).
            let Some(block) = s.surbs.pop_back() else {
                continue;
            };
            self.surbs_held -= 1.min(self.surbs_held);
            // It may have more to say.
            self.mark_ready(id);
            return Some((
                block,
                Outgoing::Message {
                    session: id,
                    message: msg,
                },
            ));
        }
        None
    }

    /// When [`Self::handle_timeout`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.reassembler.poll_timeout();
        let mut earliest = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for s in self.sessions.values() {
            if s.streams.is_empty() {
                earliest(s.last_active + self.config.session_idle);
            }
            for st in s.streams.values() {
                earliest(st.watch_deadline(&self.config).0);
                // Without reply blocks nothing can be sent: new blocks wake the session.
                if !s.surbs.is_empty()
                    && let Some(t) = st.send_deadline()
                {
                    earliest(t);
                }
            }
        }
        next
    }

    /// Refusals, drops and stream results since the last call.
    #[must_use]
    pub fn take_counts(&mut self) -> ExitCounts {
        std::mem::take(&mut self.counts)
    }

    // ---- the client's items

    fn handle_message(&mut self, now: Instant, msg: ClientMessage) {
        let id = msg.session;
        if !self.sessions.contains_key(&id) {
            if self.sessions.len() >= self.config.max_sessions {
                self.drop_count("exit_session_limit");
                self.refuse("sessions");
                return;
            }
            self.sessions.insert(id, Session::new(now));
        }
        if let Some(s) = self.sessions.get_mut(&id) {
            s.last_active = now;
        }
        for item in msg.items {
            match item {
                ClientItem::Surbs(blocks) => self.add_surbs(id, blocks),
                ClientItem::Open {
                    stream,
                    target,
                    window,
                } => self.open(
                    now,
                    StreamKey {
                        session: id,
                        stream,
                    },
                    target,
                    window,
                ),
                ClientItem::Data {
                    stream,
                    offset,
                    bytes,
                } => self.client_data(
                    now,
                    StreamKey {
                        session: id,
                        stream,
                    },
                    offset,
                    &bytes,
                ),
                ClientItem::Fin { stream, offset } => {
                    let key = StreamKey {
                        session: id,
                        stream,
                    };
                    let finished = self.with_stream(key, |s| s.recv.finish_at(offset).is_ok());
                    match finished {
                        Ok(true) => self.after_change(now, key),
                        Ok(false) => self.drop_count("exit_fin_moved"),
                        Err(_) => self.drop_count("exit_unknown_stream"),
                    }
                }
                ClientItem::Ack { stream, offset } => {
                    let key = StreamKey {
                        session: id,
                        stream,
                    };
                    let min_progress = self.config.idle_progress_bytes;
                    let acked = self.with_stream(key, |s| {
                        let before = s.send.unacked_bytes();
                        s.send.ack(offset, now);
                        let freed = before - s.send.unacked_bytes().min(before);
                        s.progressed(freed as u64, min_progress, now);
                        if s.send.fin_offset().is_some_and(|f| offset > f) {
                            s.fin_acked = true;
                        }
                    });
                    if acked.is_ok() {
                        self.after_change(now, key);
                    }
                }
                ClientItem::Reset { stream } => {
                    let key = StreamKey {
                        session: id,
                        stream,
                    };
                    if self.stream(key).is_some() {
                        self.end_stream(key, None);
                    }
                }
                ClientItem::Received { stream, ranges } => {
                    let key = StreamKey {
                        session: id,
                        stream,
                    };
                    // Lost segments it reveals are due at once.
                    if self
                        .with_stream(key, |s| s.send.received(&ranges, now))
                        .is_ok()
                    {
                        self.after_change(now, key);
                    }
                }
            }
        }
        self.mark_ready(id);
    }

    fn open(&mut self, now: Instant, key: StreamKey, target: Target, window: u32) {
        let Some(s) = self.sessions.get_mut(&key.session) else {
            return;
        };
        // A re-sent open means our answer was lost: say it again.
        if let Some(st) = s.streams.get(&key.stream) {
            if st.connected {
                let window = window_on_wire(st.window);
                s.control.push_back(ExitItem::Opened {
                    stream: key.stream,
                    window,
                });
            }
            return;
        }
        if let Some((_, answer)) = s.ended.iter().find(|(id, _)| *id == key.stream) {
            let answer = answer.clone();
            s.control.push_back(answer);
            return;
        }
        // This session's own bound first: at it, a session leaves the rest for others.
        let limit = if s.streams.len() >= self.config.max_streams_per_session {
            Some("session_streams")
        } else if self.open_streams >= self.config.max_streams {
            Some("streams")
        } else {
            None
        };
        if let Some(reason) = limit {
            s.control.push_back(ExitItem::Refused {
                stream: key.stream,
                reason: Refusal::General,
            });
            self.drop_count("exit_stream_limit");
            self.refuse(reason);
            return;
        }
        // Refuse at once what the policy forbids for every address it could mean.
        let allowed_at_all = match &target {
            Target::Addr(a) => self.config.policy.allows(a.ip(), a.port()),
            Target::Host(_, port) => self.config.policy.may_allow_port(*port),
        };
        if !allowed_at_all {
            s.remember_end(
                key.stream,
                ExitItem::Refused {
                    stream: key.stream,
                    reason: Refusal::NotAllowed,
                },
                true,
            );
            ExitCounts::add(&mut self.counts.streams, "policy");
            return;
        }
        let window = grant_window(window, self.config.max_stream_window);
        s.streams
            .insert(key.stream, Stream::new(window, self.config.reply_rto, now));
        self.open_streams += 1;
        self.events.push_back(ExitEvent::Connect { key, target });
    }

    fn client_data(&mut self, now: Instant, key: StreamKey, offset: u64, bytes: &[u8]) {
        let (room, limit) = self.buffer_room(key.session);
        let Some(s) = self.stream(key) else {
            return self.drop_count("exit_unknown_stream");
        };
        if bytes.len() > room {
            // The packet was acknowledged already, so dropping the data would lose it for
            // good: end the stream with a clear error instead.
            self.drop_count("exit_buffer_full");
            self.refuse(limit);
            return self.end_stream(
                key,
                Some(ExitItem::Reset {
                    stream: key.stream,
                    reason: Refusal::General,
                }),
            );
        }
        let window = s.window;
        let result = self.with_stream(key, |s| {
            let ready = s.recv.insert(offset, bytes)?;
            if s.queued_to_write + ready.len() > window {
                return Err(crate::Error::ReassemblyFull("stream window"));
            }
            s.queued_to_write += ready.len();
            Ok(ready)
        });
        match result {
            Ok(Ok(ready)) => {
                if !ready.is_empty() {
                    self.events
                        .push_back(ExitEvent::Write { key, bytes: ready });
                }
                self.after_change(now, key);
            }
            Ok(Err(e)) => {
                // The client sent past the window it was granted: end the stream rather
                // than buffer more (or drop what it will not send again).
                self.drop_count(e.label());
                self.refuse("window");
                self.end_stream(
                    key,
                    Some(ExitItem::Reset {
                        stream: key.stream,
                        reason: Refusal::General,
                    }),
                );
            }
            Err(_) => {}
        }
    }

    /// Adds reply blocks to a session within its bound and the total one.
    fn add_surbs(&mut self, id: u64, blocks: Vec<ReplyBlock>) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        for b in blocks {
            if b.key_epoch() < self.oldest_epoch {
                ExitCounts::add(&mut self.counts.dropped, "exit_stale_surb");
                continue;
            }
            if s.surbs.len() >= self.config.max_surbs_per_session {
                s.surbs.pop_front();
            } else if self.surbs_held >= self.config.max_surbs {
                ExitCounts::add(&mut self.counts.refused, "surbs");
                continue;
            } else {
                self.surbs_held += 1;
            }
            s.surbs.push_back(b);
        }
    }

    // ---- streams

    fn stream_mut(&mut self, key: StreamKey) -> Result<&mut Stream, ExitError> {
        self.sessions
            .get_mut(&key.session)
            .and_then(|s| s.streams.get_mut(&key.stream))
            .ok_or(ExitError::UnknownStream(key))
    }

    /// Runs `f` on a stream and charges the change of what it holds to its session and
    /// the total: the one place the byte budgets are kept.
    fn with_stream<R>(
        &mut self,
        key: StreamKey,
        f: impl FnOnce(&mut Stream) -> R,
    ) -> Result<R, ExitError> {
        let session = self
            .sessions
            .get_mut(&key.session)
            .ok_or(ExitError::UnknownStream(key))?;
        let s = session
            .streams
            .get_mut(&key.stream)
            .ok_or(ExitError::UnknownStream(key))?;
        let before = s.held();
        let r = f(s);
        let after = s.held();
        if after >= before {
            session.buffered += after - before;
            self.buffered += after - before;
        } else {
            session.buffered -= (before - after).min(session.buffered);
            self.buffered -= (before - after).min(self.buffered);
            self.unpark();
        }
        Ok(r)
    }

    /// Bytes a session's streams may still take: the least of its own and the total room;
    /// with the reason to count when it is what stops them.
    fn buffer_room(&self, session: u64) -> (usize, &'static str) {
        let held = self.sessions.get(&session).map_or(0, |s| s.buffered);
        let own = self.config.max_session_buffered_bytes.saturating_sub(held);
        let total = self.config.max_buffered_bytes.saturating_sub(self.buffered);
        if own <= total {
            (own, "session_buffer")
        } else {
            (total, "buffer")
        }
    }

    /// After data moved on a stream: the client's end may be due for the destination, the
    /// destination may be read again, the stream may be finished.
    fn after_change(&mut self, now: Instant, key: StreamKey) {
        let Some(s) = self.stream(key) else {
            return;
        };
        if s.is_finished() {
            // Finished cleanly; a late re-sent open is answered with a reset.
            return self.end_stream(key, None);
        }
        if s.recv.is_finished() && s.queued_to_write == 0 && !s.close_write_sent {
            if let Ok(s) = self.stream_mut(key) {
                s.close_write_sent = true;
            }
            self.events.push_back(ExitEvent::CloseWrite { key });
        }
        self.grant_read(now, key);
        self.mark_ready(key.session);
    }

    /// Lets the driver read from the destination what the stream and the budgets have
    /// room for; parks the stream when only the budget stops it.
    fn grant_read(&mut self, _now: Instant, key: StreamKey) {
        let (budget, limit) = self.buffer_room(key.session);
        let Ok(s) = self.stream_mut(key) else {
            return;
        };
        if !s.connected || s.target_closed || s.read_granted > 0 || s.parked {
            return;
        }
        let space = s.send.space();
        if space == 0 {
            // The client's acks open the window again.
            return;
        }
        if budget == 0 {
            s.parked = true;
            self.parked.push_back(key);
            self.refuse(limit);
            return;
        }
        let max = space.min(budget).min(READ_CHUNK);
        if self.with_stream(key, |s| s.read_granted = max).is_ok() {
            self.events.push_back(ExitEvent::Read { key, max });
        }
    }

    /// Bytes were freed somewhere: parked streams may read again.
    fn unpark(&mut self) {
        for _ in 0..self.parked.len() {
            let Some(key) = self.parked.pop_front() else {
                break;
            };
            let (budget, _) = self.buffer_room(key.session);
            if budget == 0 {
                self.parked.push_front(key);
                break;
            }
            let Ok(s) = self.stream_mut(key) else {
                continue;
            };
            s.parked = false;
            let max = s.send.space().min(budget).min(READ_CHUNK);
            if s.connected && !s.target_closed && s.read_granted == 0 && max > 0 {
                // Taking a grant only adds to what is held, so this does not come back here.
                if self.with_stream(key, |s| s.read_granted = max).is_ok() {
                    self.events.push_back(ExitEvent::Read { key, max });
                }
            }
        }
    }

    /// Forgets a stream, freeing what it held; `answer` (a reset or refusal) goes to the
    /// client and is remembered for a re-sent open.
    fn end_stream(&mut self, key: StreamKey, answer: Option<ExitItem>) {
        if self.with_stream(key, |s| s.read_granted = 0).is_err() {
            return;
        }
        // A read granted but not yet polled is void: ending streams frees budget, which can
        // grant a read to a stream that ends a moment later in the same call (a fuzz finding,
        // `fuzz/corpus/exit/read-granted-to-a-stream-ending-in-the-same-timeout`).
        self.events
            .retain(|e| !matches!(e, ExitEvent::Read { key: k, .. } if *k == key));
        let Some(session) = self.sessions.get_mut(&key.session) else {
            return;
        };
        let Some(s) = session.streams.remove(&key.stream) else {
            return;
        };
        let held = s.held();
        session.buffered -= held.min(session.buffered);
        self.buffered -= held.min(self.buffered);
        self.open_streams -= 1.min(self.open_streams);
        let tell = answer.is_some();
        let item = answer.unwrap_or(ExitItem::Reset {
            stream: key.stream,
            reason: Refusal::General,
        });
        session.remember_end(key.stream, item, tell);
        self.parked.retain(|k| *k != key);
        self.events.push_back(ExitEvent::Close { key });
        self.mark_ready(key.session);
        self.unpark();
    }

    /// A session is forgotten: what it held goes back to the totals.
    fn forget_session(&mut self, id: u64) {
        let streams: Vec<StreamId> = self
            .sessions
            .get(&id)
            .map(|s| s.streams.keys().copied().collect())
            .unwrap_or_default();
        for stream in streams {
            self.end_stream(
                StreamKey {
                    session: id,
                    stream,
                },
                None,
            );
        }
        if let Some(s) = self.sessions.remove(&id) {
            self.surbs_held -= s.surbs.len().min(self.surbs_held);
        }
    }

    fn control(&mut self, session: u64, item: ExitItem) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.control.push_back(item);
        }
        self.mark_ready(session);
    }

    fn mark_ready(&mut self, id: u64) {
        if let Some(s) = self.sessions.get_mut(&id)
            && !s.in_ready
        {
            s.in_ready = true;
            self.ready.push_back(id);
        }
    }

    fn refuse(&mut self, reason: &'static str) {
        ExitCounts::add(&mut self.counts.refused, reason);
    }

    fn drop_count(&mut self, reason: &'static str) {
        ExitCounts::add(&mut self.counts.dropped, reason);
    }
}

/// The window the exit grants for a client's announced one: at most its own maximum; a
/// client announcing less than it can hold gets what it asked.
pub fn grant_window(announced: u32, max: usize) -> usize {
    usize::try_from(announced).unwrap_or(usize::MAX).min(max)
}

fn window_on_wire(window: usize) -> u32 {
    u32::try_from(window).unwrap_or(u32::MAX)
}

/// Fills one reply message: control items, stream acks, then data; `None` if nothing is due.
fn build_message(s: &mut Session, now: Instant) -> Option<ExitMessage> {
    let budget = REPLY_FRAGMENT_DATA_LEN - EXIT_MESSAGE_OVERHEAD - SURBS_HELD_ROOM;
    let mut items = Vec::new();
    let mut used = 0;
    while let Some(item) = s.control.front() {
        if used + item.encoded_len() > budget {
            break;
        }
        used += item.encoded_len();
        if let Some(item) = s.control.pop_front() {
            items.push(item);
        }
    }
    const OFFSET_ITEM: usize = 1 + 4 + 8;
    for (&id, st) in s.streams.iter_mut() {
        let ack_due = st.ack_due_at().is_some_and(|t| now >= t);
        if ack_due && used + OFFSET_ITEM <= budget {
            items.push(st.ack(id, now));
            used += OFFSET_ITEM;
        }
    }
    for (&id, st) in s.streams.iter_mut() {
        while used + DATA_ITEM_OVERHEAD < budget {
            let Some((offset, bytes)) = st
                .send
                .poll_segment(now, budget - used - DATA_ITEM_OVERHEAD)
            else {
                break;
            };
            used += DATA_ITEM_OVERHEAD + bytes.len();
            items.push(ExitItem::Data {
                stream: id,
                offset,
                bytes,
            });
        }
        let fin_due = !st.fin_acked
            && !st.send.has_new()
            && st
                .fin_sent_at
                .is_none_or(|t| now.saturating_duration_since(t) >= st.send.rto());
        if let Some(fin) = st
            .send
            .fin_offset()
            .filter(|_| fin_due && used + OFFSET_ITEM <= budget)
        {
            items.push(ExitItem::Fin {
                stream: id,
                offset: fin,
            });
            used += OFFSET_ITEM;
            st.fin_sent_at = Some(now);
        }
    }
    // A message that goes anyway carries the acks still waiting out their delay: they cost
    // no reply block there.
    if !items.is_empty() {
        for (&id, st) in s.streams.iter_mut() {
            if st.ack_resends_left > 0
                && st.written > st.acked_offset
                && used + OFFSET_ITEM <= budget
            {
                items.push(st.ack(id, now));
                used += OFFSET_ITEM;
            }
        }
    }
    (!items.is_empty()).then_some(ExitMessage { items })
}
