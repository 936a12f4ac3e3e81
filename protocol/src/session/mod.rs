//! The client's side of Murmur, sans-IO: streams to exits carried in Sphinx packets under
//! Loopix cover, with acknowledgements, retransmission and reply blocks.
//!
//! # Driving it
//!
//! The driver (the SOCKS proxy) owns the sockets and the clock. Its calls sort like
//! quinn-proto's `Connection`:
//! - getters: [`ClientSession::stats`], [`ClientSession::state_size`],
//!   [`ClientSession::timer`], [`ClientSession::gateway`], [`ClientSession::payer`];
//! - `handle_*`, input from the network or the clock: [`ClientSession::handle_delivery`]
//!   (what the gateway delivered) and [`ClientSession::handle_timeout`] (at or after
//!   [`ClientSession::poll_timeout`]: retransmissions, expiries, giving up);
//! - mutators, commands from the application: [`ClientSession::open_stream`],
//!   [`ClientSession::write`], [`ClientSession::consumed`], [`ClientSession::close_stream`],
//!   [`ClientSession::abort_stream`], [`ClientSession::set_consensus`], the payer's;
//! - `poll_*`, output: after any of the above, call [`ClientSession::poll_transmit`] until
//!   `None`, then [`ClientSession::poll_event`] until `None`, then sleep until
//!   [`ClientSession::poll_timeout`] (or the next input).
//!
//! What goes on the wire follows the published Loopix rates only: at each λ_P tick the session
//! sends a real packet if it has one, otherwise a cover packet; loop and drop cover run at λ_L
//! and λ_D. A real packet is built when the last one left, from whatever the streams have
//! waiting then, so a message carries fresh acknowledgements.
//!
//! Paced ([`ClientSession::set_paced`]): a driver whose building of packets could delay a
//! tick (a thread that also opens replies and answers the application) runs the schedule in
//! a [`crate::cover::Pacer`] on a thread of its own, and fills the pacer's small stocks with
//! [`ClientSession::build_ahead`]: one real packet, and drop and loop cover for the next few
//! milliseconds of ticks. Ticks then only take built packets, so the moments packets leave
//! are the Poisson schedule however long building takes. The simulator and tests, under
//! virtual time, use the session's own ticks.
//!
//! Built ahead ([`ClientSession::prebuild_reply_blocks`]): a driver with cores to spare
//! builds reply blocks on worker threads. The session gives out [`BlockJob`]s (route, delays
//! and identifier chosen with its state), takes back the [`BuiltBlock`]s, and packets to exits
//! take their blocks from that stock before building any themselves.
//!
//! # Parts
//!
//! - [`arq`]: packets awaiting acknowledgement, retransmission, suspects, and the no-loss rule;
//! - [`compose`]: one message per exit session from what its streams have waiting;
//! - [`streams`]: the application's streams and their windows;
//! - [`exits`]: exit sessions, their idle expiry and cap;
//! - [`reply_blocks`]: the reply blocks handed to exits and the keys kept for them, and the
//!   stock of blocks built ahead;
//! - [`delivery`]: what the gateway delivers (acks, replies, loops);
//! - [`routes`]: paths, packets and cover;
//! - [`payment`]: paying hops and the gateway;
//! - [`timers`]: every deadline, by name.
//!
//! Reliability. Each forward packet carries a SURB-ACK; an unacknowledged packet is re-sent on
//! a fresh route after `1.5 × (the delays it was built with) + slack` (Nym uses the expected
//! round trip; Murmur knows the exact delays it sampled). After `max_attempts` the streams it
//! carried fail with [`StreamFailure::NotAcknowledged`]. The exit's data comes back on reply
//! blocks the client sent ahead; the client acknowledges it cumulatively and the exit re-sends
//! what was lost. No message leaves the ARQ unaccounted: see [`arq`].
//!
//! Payment ([`ClientSession::set_payer`]). With a [`Payer`], every packet the session builds
//! records one packet carried for each of its mixes and its exit, and carries in its payment
//! envelope a ticket for each hop the payer says is due ([`Payer::ticket_for`]). Reply
//! blocks are paid when their reply or acknowledgement arrives (the hops named at build time).
//! The gateway, which sees every frame of the session, is paid in-band: each `Forward` frame
//! sent and each delivery received counts one frame, and a due ticket goes out as a
//! [`crate::control::Control::Payment`] frame right after the frame that made it due. The
//! gateway's own Sphinx hop (the last hop of loops and replies) is covered by those frames, so
//! its slot stays empty.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::{CryptoRng, Rng};

use crate::cover::{ClientCover, ClientEmission, ClientRates, Stock};
use crate::delay::ExpDelay;
use crate::delivery::DeliveryTags;
use crate::directory::path::{PathRules, PathSelector};
use crate::directory::{Consensus, ConsensusRelay, IdentityKey};
use crate::frame::Frame;
use crate::packet::{Address, SurbId};
use crate::stream::{SESSION_IDLE, StreamId};
use crate::time::Instant;

pub mod arq;
pub mod compose;
pub mod delivery;
mod error;
pub mod exits;
#[doc(hidden)]
pub mod fuzz;
pub mod payment;
pub mod reply_blocks;
pub mod routes;
pub mod streams;
pub mod timers;

pub use error::{SessionError, StreamFailure};
pub use exits::Isolation;
pub use timers::Timer;

use arq::{Pending, Stalled};
use exits::{ExitRef, ExitSession};
use payment::Payment;
pub use reply_blocks::{BlockJob, BuiltBlock};
use reply_blocks::{Prebuilt, ReplyKeyEntry};
use routes::Queued;
pub use routes::SealJob;
use streams::Stream;

/// Result with the session's error.
pub type Result<T> = std::result::Result<T, SessionError>;

/// Session knobs.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// This client's address at its gateway (random, secret).
    pub address: Address,
    /// Added to 1.5 × a packet's delays to get its retransmission timeout.
    pub ack_slack: Duration,
    /// Sends of one packet before its streams fail.
    pub max_attempts: u32,
    /// Bytes each stream may have unacknowledged by the exit.
    pub stream_window: usize,
    /// Reply blocks the client keeps at each exit session to begin with, and at least:
    /// enough for a page's replies. A session's stock grows from there while its exit says
    /// it ran dry (a download's round trip holds more blocks than this), up to
    /// `max_surbs_target`, and shrinks back while the exit holds more than it spends.
    pub surbs_target: usize,
    /// The most reply blocks one exit session is kept stocked with.
    pub max_surbs_target: usize,
    /// Path rules (distinct subnets off for a network on one host).
    pub path_rules: PathRules,
    /// A loop not back after this long is counted missing.
    pub loop_timeout: Duration,
    /// An open not answered within this is sent again (the exit's answer rides on an
    /// unacknowledged reply packet, which may be lost).
    pub reply_timeout: Duration,
    /// Keys for this session's SURB identifiers ([`crate::delivery`]): with them the gateway
    /// drops junk addressed to the client, and the client pays only for its own deliveries.
    /// `None`: random identifiers, and only deliveries of outstanding ones are paid.
    pub delivery_tags: Option<DeliveryTags>,
    /// How long a message that cannot be routed (see [`arq`]) waits for a route before its
    /// streams fail with [`StreamFailure::NoPath`].
    pub no_path_timeout: Duration,
    /// An exit session with no streams and nothing in flight is forgotten after this long
    /// without a message either way, with the keys of the reply blocks it holds. At most
    /// [`SESSION_IDLE`], after which the exit forgets it (and those blocks) too.
    pub exit_session_idle: Duration,
    /// Exit sessions at once (one per exit and isolation token).
    pub max_exit_sessions: usize,
    /// Streams at once.
    pub max_streams: usize,
    /// No new stream opens once the tickets this session's payer has signed are worth this
    /// much in expectation (base units; the payer's total, so it carries over to the next
    /// session with the payer). `None`: no cap. Streams already open go on, and so does cover
    /// traffic, which the client pays for while it runs.
    pub max_spend: Option<u64>,
}

/// Exit sessions at once by default: per-domain isolation (as Tor Browser does it) makes one
/// per site, and a browsing session touches a few hundred sites in ten minutes.
pub const DEFAULT_MAX_EXIT_SESSIONS: usize = 1024;
/// Streams at once by default (the proxy accepts 1024 connections by default).
pub const DEFAULT_MAX_STREAMS: usize = 4096;

impl SessionConfig {
    /// Defaults for `address`.
    pub fn new(address: Address) -> Self {
        SessionConfig {
            address,
            ack_slack: Duration::from_millis(1500),
            max_attempts: 8,
            stream_window: 512 * 1024,
            surbs_target: 48,
            max_surbs_target: 1024,
            path_rules: PathRules::default(),
            loop_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(4),
            delivery_tags: None,
            no_path_timeout: Duration::from_secs(30),
            exit_session_idle: SESSION_IDLE,
            max_exit_sessions: DEFAULT_MAX_EXIT_SESSIONS,
            max_streams: DEFAULT_MAX_STREAMS,
            max_spend: None,
        }
    }
}

/// What the session tells the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The exit connected the stream.
    Opened(StreamId),
    /// The stream could not be opened; `code` is the SOCKS5 reply code to give.
    Refused(StreamId, u8),
    /// Bytes for the application, in order.
    Data(StreamId, Vec<u8>),
    /// The destination closed its side; no more data will come.
    Eof(StreamId),
    /// The exit reset the stream (`code` as a SOCKS5 reply code, for logs).
    Reset(StreamId, u8),
    /// The session gave up on the stream ([`StreamFailure::socks_code`] is the SOCKS5 reply
    /// to give while it is opening; after that, close the connection).
    Failed(StreamId, StreamFailure),
    /// The stream can take more bytes from the application.
    Writable(StreamId),
}

impl Event {
    /// The stream the event is about.
    pub fn stream(&self) -> StreamId {
        match self {
            Event::Opened(s)
            | Event::Refused(s, _)
            | Event::Data(s, _)
            | Event::Eof(s)
            | Event::Reset(s, _)
            | Event::Failed(s, _)
            | Event::Writable(s) => *s,
        }
    }

    /// True if the stream is gone after this event.
    pub fn ends_stream(&self) -> bool {
        matches!(
            self,
            Event::Refused(..) | Event::Reset(..) | Event::Failed(..)
        )
    }
}

/// Counters a driver exports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    pub real_sent: u64,
    pub cover_sent: u64,
    pub loops_sent: u64,
    /// Cover packets that could not be built (no route now): each is a tick with nothing
    /// to send, unless another packet stood in.
    pub cover_unbuilt: u64,
    pub loops_returned: u64,
    pub loops_missing: u64,
    pub retransmits: u64,
    pub acks: u64,
    /// Reply blocks handed to exits (each one built: the client's costliest work), and the
    /// replies that came back on them.
    pub reply_blocks_sent: u64,
    /// Of the blocks built: those built ahead on the driver's workers and put in stock
    /// ([`ClientSession::prebuild_reply_blocks`]), and those of the stock thrown away unused
    /// (built for an epoch that ended, or through a relay suspected or delisted since).
    pub reply_blocks_prebuilt: u64,
    pub prebuilt_blocks_discarded: u64,
    pub replies: u64,
    pub unknown_deliveries: u64,
    pub bad_replies: u64,
    /// Deliveries without this client's tag (junk the gateway let through, or forged by it):
    /// not paid for, not looked at.
    pub foreign_deliveries: u64,
    /// Deliveries of an identifier delivered before: not paid again.
    pub duplicate_deliveries: u64,
    /// Deliveries the driver dropped (its queue to the session was full), paid for because
    /// the gateway charged them ([`ClientSession::delivery_dropped`]).
    pub dropped_deliveries_paid: u64,
    /// Tickets put in packets' envelopes, and sent to the gateway in control frames.
    pub hop_tickets: u64,
    pub gateway_tickets: u64,
    /// Frames the gateway forwarded for or delivered to this session (what it charges for).
    pub gateway_frames: u64,
    /// Times a message could not be (re)built and was kept to try again on a later tick.
    pub builds_deferred: u64,
    /// Messages sent without a SURB-ACK (reply blocks, acks and gap reports alone: see
    /// [`compose`]).
    pub unacknowledged_sent: u64,
    /// Streams the session gave up on, by reason ([`StreamFailure`]).
    pub streams_unacknowledged: u64,
    pub streams_no_path: u64,
    pub streams_exit_left: u64,
    pub streams_bug: u64,
    /// Opens refused because every exit session slot, or every stream slot, was taken.
    pub opens_refused_full: u64,
    /// Opens refused because the payer had spent `max_spend`.
    pub opens_refused_spend: u64,
    /// Exit sessions forgotten after `exit_session_idle`, and idle ones dropped at the cap
    /// to make room.
    pub exit_sessions_expired: u64,
    pub exit_sessions_evicted: u64,
    /// Keys of reply blocks forgotten unused (with their exit session, or past the per-session
    /// bound).
    pub reply_keys_expired: u64,
    /// Resets for abandoned streams dropped unsent because too many waited.
    pub resets_dropped: u64,
    /// Internal errors (bugs) met while building packets.
    pub bugs: u64,
}

/// What the session holds, counted and estimated in bytes (for bounds and metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StateSize {
    pub exit_sessions: usize,
    pub streams: usize,
    /// Messages awaiting acknowledgement, and messages waiting for a route.
    pub pending: usize,
    pub stalled: usize,
    pub reply_keys: usize,
    pub loops: usize,
    pub recent_deliveries: usize,
    /// Reply blocks built ahead and waiting for an exit ([`ClientSession::prebuild_reply_blocks`]).
    pub prebuilt_blocks: usize,
    /// An estimate of the bytes behind all of the above (entries' sizes, their buffers and
    /// map overhead; not the allocator's).
    pub bytes: usize,
}

/// The client session.
pub struct ClientSession {
    config: SessionConfig,
    consensus: Arc<Consensus>,
    gateway: ConsensusRelay,
    cover: ClientCover<Queued>,
    delay: ExpDelay,
    /// The latest `now` any call was given (the session's idea of the time for calls that
    /// take none).
    now: Instant,
    exits: BTreeMap<ExitRef, ExitSession>,
    exit_index: HashMap<(IdentityKey, Isolation), ExitRef>,
    next_exit: u64,
    streams: BTreeMap<StreamId, Stream>,
    next_stream: StreamId,
    pending: HashMap<SurbId, Pending>,
    /// Timeouts of pending packets, kept in step with `pending`.
    deadlines: BTreeMap<(Instant, SurbId), ()>,
    /// Smoothed round trip of packets to their acks, and its variation (from packets sent
    /// once: Karn's rule), once measured.
    ack_rtt: crate::stream::RttEstimate,
    retransmit: VecDeque<SurbId>,
    /// Messages that could not be (re)built, oldest first: tried again each tick.
    stalled: VecDeque<Stalled>,
    /// Reply blocks handed out, by SURB identifier.
    reply_keys: HashMap<SurbId, ReplyKeyEntry>,
    /// Loops sent, by identifier: when.
    loops: HashMap<SurbId, Instant>,
    events: VecDeque<Event>,
    stats: SessionStats,
    /// The exit session the last message went to (the next one starts after it).
    round_robin: ExitRef,
    /// Streams the application abandoned, to reset at their exit: (exit session, stream).
    aborted: VecDeque<(ExitRef, StreamId)>,
    /// Relays on the routes of lost packets, by consecutive losses (see [`arq`]).
    suspects: HashMap<IdentityKey, u32>,
    /// Paying relays, if the session pays.
    payment: Option<Payment>,
    /// The identifiers of the latest deliveries (at most [`delivery::RECENT_DELIVERIES`]),
    /// so a delivery repeated by the gateway is not paid twice.
    recent_deliveries: VecDeque<SurbId>,
    recent_set: HashSet<SurbId>,
    /// The send schedule runs in a [`crate::cover::Pacer`] the driver keeps: the session
    /// only builds what it asks for ([`ClientSession::build_ahead`]).
    paced: bool,
    /// Reply blocks built ahead by the driver's workers.
    prebuilt: Prebuilt,
}

impl ClientSession {
    /// A session through `gateway` (which must be in `consensus`).
    pub fn new<R: Rng + ?Sized>(
        config: SessionConfig,
        consensus: Arc<Consensus>,
        gateway: IdentityKey,
        now: Instant,
        rng: &mut R,
    ) -> Result<Self> {
        let gw = consensus
            .relay(&gateway)
            .filter(|r| r.roles.gateway)
            .cloned()
            .ok_or(SessionError::GatewayNotListed)?;
        let (cover, delay) = routes::schedules(&consensus.params, now, rng)?;
        Ok(ClientSession {
            config,
            consensus,
            gateway: gw,
            cover,
            delay,
            now,
            exits: BTreeMap::new(),
            exit_index: HashMap::new(),
            next_exit: 0,
            streams: BTreeMap::new(),
            next_stream: 1,
            pending: HashMap::new(),
            deadlines: BTreeMap::new(),
            ack_rtt: crate::stream::RttEstimate::default(),
            retransmit: VecDeque::new(),
            stalled: VecDeque::new(),
            reply_keys: HashMap::new(),
            loops: HashMap::new(),
            events: VecDeque::new(),
            stats: SessionStats::default(),
            round_robin: ExitRef::default(),
            aborted: VecDeque::new(),
            suspects: HashMap::new(),
            payment: None,
            recent_deliveries: VecDeque::new(),
            recent_set: HashSet::new(),
            paced: false,
            prebuilt: Prebuilt::default(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The cover rates of the consensus in force.
    pub fn send_rates(&self) -> ClientRates {
        let p = &self.consensus.params;
        ClientRates {
            lambda_p: p.lambda_p,
            lambda_l: p.lambda_l,
            lambda_d: p.lambda_d,
        }
    }

    /// Hands the send schedule to a [`crate::cover::Pacer`] the driver runs on a thread of its own, so
    /// that building packets never delays a tick. From then on the session sends nothing at
    /// its own ticks ([`Timer::Send`] stays unset, [`Self::poll_transmit`] gives only the
    /// gateway's payments); the driver keeps the pacer's stocks filled with
    /// [`Self::build_ahead`] and follows [`Self::send_rates`].
    pub fn set_paced(&mut self) {
        self.paced = true;
    }

    /// Builds one packet for a [`crate::cover::Pacer`]'s `stock`: a real packet if a message waits (else
    /// `None`), or a drop or loop cover packet (`None` if no route can be built now).
    /// Counted as sent: it will leave at the pacer's next tick for it.
    pub fn build_ahead<R: CryptoRng + ?Sized>(
        &mut self,
        stock: Stock,
        now: Instant,
        rng: &mut R,
    ) -> Option<Frame> {
        let job = self.build_ahead_job(stock, now, rng)?;
        self.build_job(job, rng)
    }

    /// [`Self::build_ahead`] but for the Sphinx build: every choice is made and paid for,
    /// and the driver builds the packet ([`SealJob::build`]), on another core if it likes.
    /// A job that fails to build is a bug; the driver counts it.
    pub fn build_ahead_job<R: CryptoRng + ?Sized>(
        &mut self,
        stock: Stock,
        now: Instant,
        rng: &mut R,
    ) -> Option<SealJob> {
        self.observe(now);
        let job = match stock {
            Stock::Real => {
                let q = self.next_real(now, rng)?;
                self.stats.real_sent += 1;
                q.job
            }
            Stock::Drop => {
                let Ok(job) = self.drop_cover(now, rng) else {
                    self.stats.cover_unbuilt += 1;
                    return None;
                };
                self.stats.cover_sent += 1;
                job
            }
            Stock::Loop => {
                let Ok(job) = self.loop_cover(now, rng) else {
                    self.stats.cover_unbuilt += 1;
                    return None;
                };
                self.stats.loops_sent += 1;
                job
            }
        };
        self.gateway_frame(now, rng);
        Some(job)
    }

    /// Builds `job` here; a failure is counted as a bug.
    fn build_job<R: CryptoRng + ?Sized>(&mut self, job: SealJob, rng: &mut R) -> Option<Frame> {
        let frame = job.build(rng).ok();
        self.stats.bugs += u64::from(frame.is_none());
        frame
    }

    /// The gateway this session goes through.
    pub fn gateway(&self) -> &ConsensusRelay {
        &self.gateway
    }

    /// Puts a newer consensus in force (paths, keys, rates). Keeps the gateway if it is
    /// still listed; returns an error if it is not (the driver should move to another).
    /// Streams whose exit is no longer listed fail with [`StreamFailure::ExitLeftConsensus`]:
    /// no packet can reach it.
    pub fn set_consensus<R: Rng + ?Sized>(
        &mut self,
        consensus: Arc<Consensus>,
        now: Instant,
        rng: &mut R,
    ) -> Result<()> {
        self.observe(now);
        let gw = consensus
            .relay(&self.gateway.identity)
            .filter(|r| r.roles.gateway)
            .cloned()
            .ok_or(SessionError::GatewayNotListed)?;
        if consensus.params != self.consensus.params {
            (self.cover, self.delay) = routes::schedules(&consensus.params, now, rng)?;
        }
        self.gateway = gw;
        if let Some(p) = &mut self.payment {
            p.payer.prune_to_consensus(&consensus);
        }
        if consensus.epoch != self.consensus.epoch {
            self.drop_prebuilt_blocks();
        }
        self.consensus = consensus;
        self.drop_departed_exits();
        Ok(())
    }

    /// The next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] or [`Self::poll_transmit`] next has something to do:
    /// the earliest of the [`Timer`]s. Never in the past unless that deadline is overdue.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::ALL.iter().filter_map(|&t| self.timer(t)).min()
    }

    /// Acts on every deadline at or before `now`: packets not acknowledged in time are
    /// queued to be re-sent (or their streams fail), messages that found no route for too
    /// long fail their streams, loops not back are counted missing, and idle exit sessions
    /// are forgotten.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.observe(now);
        self.expire_unacknowledged(now);
        self.give_up_unroutable(now);
        self.expire_loops(now);
        self.expire_exit_sessions(now);
    }

    /// The next frame to send at `now`, if one is due. Call until `None`. Paced, only the
    /// gateway's payments (each right after the packet that made it due was built).
    #[must_use]
    pub fn poll_transmit<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) -> Option<Frame> {
        self.observe(now);
        if let Some(frame) = self.queued_gateway_payment() {
            return Some(frame);
        }
        if self.paced {
            return None;
        }
        if self.cover.queued() == 0
            && let Some(q) = self.next_real(now, rng)
        {
            self.cover.push_real(q);
        }
        loop {
            let emission = self.cover.poll_transmit(now, rng)?;
            let job = match emission {
                ClientEmission::Real(q) => {
                    self.stats.real_sent += 1;
                    Some(q.job)
                }
                ClientEmission::SendCover | ClientEmission::Drop => {
                    self.stats.cover_sent += 1;
                    let job = self.drop_cover(now, rng).ok();
                    self.stats.cover_unbuilt += u64::from(job.is_none());
                    job
                }
                ClientEmission::Loop => {
                    self.stats.loops_sent += 1;
                    let job = self.loop_cover(now, rng).ok();
                    self.stats.cover_unbuilt += u64::from(job.is_none());
                    job
                }
            };
            let frame = job.and_then(|job| self.build_job(job, rng));
            if frame.is_some() {
                // The gateway forwards it: one frame on its tab.
                self.gateway_frame(now, rng);
                return frame;
            }
        }
    }

    /// What the session holds now, counted, with an estimate of its bytes.
    pub fn state_size(&self) -> StateSize {
        use std::mem::size_of;
        // A hash map entry costs about its key and value and a control byte, at a load of
        // 7/8; a B-tree entry about its key and value.
        let map = |entry: usize| entry * 8 / 7 + 1;
        let exits: usize = self
            .exits
            .values()
            .map(|e| {
                size_of::<ExitSession>()
                    + map(size_of::<(IdentityKey, Isolation, ExitRef)>())
                    + 2 * e.isolation_len()
                    + e.reply_ids.len() * size_of::<SurbId>()
                    + e.unacknowledged_blocks.len() * size_of::<(Instant, usize)>()
                    + e.streams.len() * size_of::<StreamId>()
            })
            .sum();
        let streams: usize = self
            .streams
            .values()
            .map(|s| size_of::<Stream>() + s.buffered_bytes())
            .sum();
        let pending: usize = self
            .pending
            .values()
            .map(|p| map(size_of::<Pending>()) + p.heap_bytes())
            .sum::<usize>()
            + self.deadlines.len() * size_of::<(Instant, SurbId)>();
        let stalled: usize = self
            .stalled
            .iter()
            .map(|s| size_of::<Stalled>() + s.out.heap_bytes())
            .sum();
        let reply_keys: usize = self
            .reply_keys
            .values()
            .map(|k| map(size_of::<(SurbId, ReplyKeyEntry)>()) + k.heap_bytes())
            .sum();
        let loops = self.loops.len() * map(size_of::<(SurbId, Instant)>());
        let recent = self.recent_deliveries.len() * (size_of::<SurbId>() + map(16));
        let prebuilt = self.prebuilt.heap_bytes();
        StateSize {
            exit_sessions: self.exits.len(),
            streams: self.streams.len(),
            pending: self.pending.len(),
            stalled: self.stalled.len(),
            reply_keys: self.reply_keys.len(),
            loops: self.loops.len(),
            recent_deliveries: self.recent_deliveries.len(),
            prebuilt_blocks: self.prebuilt.ready.len(),
            bytes: exits + streams + pending + stalled + reply_keys + loops + recent + prebuilt,
        }
    }

    /// Moves the session's clock to `now` (never back).
    fn observe(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn selector(&self) -> PathSelector<'_> {
        PathSelector::new(&self.consensus, self.config.path_rules)
    }
}
