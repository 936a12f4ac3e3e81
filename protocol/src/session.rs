//! The client's side of Murmur, sans-IO: streams to exits carried in Sphinx packets under
//! Loopix cover, with acknowledgements, retransmission and reply blocks.
//!
//! The driver (the SOCKS proxy) owns the sockets and the clock. It tells the session what the
//! application did ([`ClientSession::open_stream`], [`ClientSession::write`],
//! [`ClientSession::close_stream`]), hands it what the gateway delivered
//! ([`ClientSession::handle_delivery`]), and at the times [`ClientSession::poll_timeout`] names
//! asks for a frame to send ([`ClientSession::poll_transmit`]) and for events
//! ([`ClientSession::poll_event`]).
//!
//! What goes on the wire follows the published Loopix rates only: at each λ_P tick the session
//! sends a real packet if it has one, otherwise a cover packet; loop and drop cover run at λ_L
//! and λ_D. Real packets are built lazily at the tick, from whatever the streams have waiting,
//! so a message always carries the freshest acknowledgements.
//!
//! Reliability. Each forward packet carries a SURB-ACK; an unacknowledged packet is re-sent on
//! a fresh route after `1.5 × (the delays it was built with) + slack` (Nym uses the expected
//! round trip; Murmur knows the exact delays it sampled). After `max_attempts` the streams it
//! carried fail with a clear error. The exit's data comes back on reply blocks the client sent
//! ahead; the client acknowledges it cumulatively and the exit re-sends what was lost.
//!
//! Payment ([`ClientSession::set_payer`]). With a [`Payer`], every packet the session builds
//! records one packet carried for each of its mixes and its exit, and carries in its payment
//! envelope a ticket for each hop the payer says is due ([`Payer::ticket_for`]). Reply
//! blocks are paid when their reply or acknowledgement arrives (the hops named at build time).
//! The gateway, which sees every frame of the session, is paid in-band: each `Forward` frame
//! sent and each delivery received counts one frame, and a due ticket goes out as a
//! [`Control::Payment`] frame right after the frame that made it due. The gateway's own
//! Sphinx hop (the last hop of loops and replies) is covered by those frames, so its slot
//! stays empty.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::{CryptoRng, Rng, RngExt};

use crate::control::Control;
use crate::cover::{ClientCover, ClientEmission, ClientRates};
use crate::delay::ExpDelay;
use crate::delivery::DeliveryTags;
use crate::directory::path::{ExitTarget, PathRules, PathSelector};
use crate::directory::{Consensus, ConsensusRelay, IdentityKey, UnixTime};
use crate::envelope::SlotTicket;
use crate::fragment::Fragment;
use crate::frame::Frame;
use crate::packet::{Address, RouteHop, SurbId, build_packet_with_envelope};
use crate::payer::{PayeeInfo, Payer};
use crate::payload::{Content, FORWARD_FRAGMENT_DATA_LEN};
use crate::stream::{
    CLIENT_MESSAGE_OVERHEAD, ClientItem, ClientMessage, DATA_ITEM_OVERHEAD, DEFAULT_STREAM_WINDOW,
    ExitItem, ExitMessage, RecvBuffer, Refusal, StreamId, Target,
};
use crate::surb::{REPLY_BLOCK_LEN, ReplyBlock, ReplyKey, build_reply_block_with_id};
use crate::time::Instant;
use crate::{Error, Result};

#[doc(hidden)]
pub mod fuzz;

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
    /// Reply blocks the client tries to keep at each exit session.
    pub surbs_target: usize,
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
}

impl SessionConfig {
    /// Defaults for `address`.
    pub fn new(address: Address) -> Self {
        SessionConfig {
            address,
            ack_slack: Duration::from_millis(1500),
            max_attempts: 8,
            stream_window: 512 * 1024,
            surbs_target: 48,
            path_rules: PathRules::default(),
            loop_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(4),
            delivery_tags: None,
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
    /// The stream broke (`code` as a SOCKS5 reply code, for logs).
    Reset(StreamId, u8),
    /// The stream can take more bytes from the application.
    Writable(StreamId),
}

/// Counters a driver exports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    pub real_sent: u64,
    pub cover_sent: u64,
    pub loops_sent: u64,
    pub loops_returned: u64,
    pub loops_missing: u64,
    pub retransmits: u64,
    pub acks: u64,
    pub replies: u64,
    pub unknown_deliveries: u64,
    pub bad_replies: u64,
    /// Deliveries without this client's tag (junk the gateway let through, or forged by it):
    /// not paid for, not looked at.
    pub foreign_deliveries: u64,
    /// Deliveries of an identifier delivered before: not paid again.
    pub duplicate_deliveries: u64,
    /// Tickets put in packets' envelopes, and sent to the gateway in control frames.
    pub hop_tickets: u64,
    pub gateway_tickets: u64,
    /// Frames the gateway forwarded for or delivered to this session (what it charges for).
    pub gateway_frames: u64,
}

/// An exit session: one per (exit, isolation token).
struct ExitSession {
    exit: IdentityKey,
    id: u64,
    /// Reply blocks the exit is believed to hold. The exit spends blocks in the order it got
    /// them, so a reply on block `k` means every block before `k` is spent too (its reply
    /// may have been lost): counting by sequence keeps lost replies from inflating this.
    surbs_at_exit: usize,
    /// Blocks handed to this exit so far, and the newest one whose reply came back.
    surbs_issued: u64,
    newest_returned: Option<u64>,
    streams: Vec<StreamId>,
    /// When the exit last answered, and when it was last sent reply blocks unasked: an exit
    /// that went quiet while streams are open may have run out of blocks (its request for
    /// more can be lost with the last one), so it gets a few every `reply_timeout`.
    last_heard: Instant,
    last_topup: Instant,
    /// The identifiers of the reply blocks handed to this exit, oldest first, at most
    /// [`max_reply_keys`]: the keys of older ones are forgotten (some may have been answered
    /// already; their keys are gone from `reply_keys` then).
    reply_ids: VecDeque<SurbId>,
}

/// Consecutive lost packets after which a relay is left out of new paths.
const SUSPECT_AFTER: u32 = 2;

#[derive(Debug, PartialEq, Eq)]
enum StreamState {
    Opening,
    Open,
}

struct Stream {
    exit_session: usize,
    target: Target,
    state: StreamState,
    open_sent: bool,
    open_sent_at: Instant,
    /// Application bytes not yet packed into a message.
    outbox: VecDeque<u8>,
    /// Offset of the next byte packed.
    sent: u64,
    /// The exit has written every byte below this.
    exit_acked: u64,
    app_closed: bool,
    fin_sent: bool,
    recv: RecvBuffer,
    /// The last cumulative ack sent for the exit's data.
    acked_sent: u64,
    /// Bytes handed to the application in events but not yet consumed by it; acks cover
    /// only what the application took, so the exit's window bounds what waits here.
    unconsumed: u64,
    eof_reported: bool,
    writable_wanted: bool,
    /// Bytes this stream may have unacknowledged by the exit: what the exit granted, and
    /// until it answers the default every exit grants ([`DEFAULT_STREAM_WINDOW`]).
    window: usize,
}

/// A SOCKS user name and password, used only to keep streams apart.
type Isolation = Option<(Vec<u8>, Vec<u8>)>;

/// A packet waiting for its acknowledgement.
struct Pending {
    exit: IdentityKey,
    /// The mixes of its forward route and of its SURB-ACK's route.
    relays: Vec<IdentityKey>,
    /// The mixes of its SURB-ACK's route alone: paid when the acknowledgement arrives.
    ack_relays: Vec<IdentityKey>,
    fragment: Fragment,
    streams: Vec<StreamId>,
    attempts: u32,
    deadline: Instant,
    key: ReplyKey,
}

/// A packet built and waiting for its send tick.
pub struct Queued {
    frame: Frame,
}

/// The cover schedules and delay distribution the published parameters ask for.
fn schedules<R: Rng + ?Sized>(
    p: &crate::directory::NetworkParams,
    now: Instant,
    rng: &mut R,
) -> Result<(ClientCover<Queued>, ExpDelay)> {
    let cover = ClientCover::new(
        ClientRates {
            lambda_p: p.lambda_p,
            lambda_l: p.lambda_l,
            lambda_d: p.lambda_d,
        },
        now,
        rng,
    )?;
    Ok((cover, ExpDelay::with_mean(p.mean_hop_delay())?))
}

/// The client session.
pub struct ClientSession {
    config: SessionConfig,
    consensus: Arc<Consensus>,
    gateway: ConsensusRelay,
    cover: ClientCover<Queued>,
    delay: ExpDelay,
    exits: Vec<ExitSession>,
    exit_index: HashMap<(IdentityKey, Isolation), usize>,
    streams: BTreeMap<StreamId, Stream>,
    next_stream: StreamId,
    pending: HashMap<SurbId, Pending>,
    /// Timeouts of pending packets (lazily cleaned: an entry whose packet was acked is skipped).
    deadlines: BTreeMap<(Instant, SurbId), ()>,
    retransmit: VecDeque<SurbId>,
    /// Reply blocks handed out: their keys, the exit session, their sequence there, and the
    /// mixes of their routes (paid when the reply arrives).
    reply_keys: HashMap<SurbId, (ReplyKey, usize, u64, Vec<IdentityKey>)>,
    loops: HashMap<SurbId, Instant>,
    events: VecDeque<Event>,
    stats: SessionStats,
    round_robin: usize,
    /// Streams the application abandoned, to reset at their exit: (exit session, stream).
    aborted: VecDeque<(usize, StreamId)>,
    /// Relays on the routes of lost packets, by consecutive losses; an acknowledged packet
    /// clears the relays on its routes. Relays at `SUSPECT_AFTER` are left out of new paths,
    /// so retransmissions route around a dead mix.
    suspects: HashMap<IdentityKey, u32>,
    /// Paying relays, if the session pays.
    payment: Option<Payment>,
    /// The identifiers of the latest deliveries (at most [`RECENT_DELIVERIES`]), so a
    /// delivery repeated by the gateway is not paid twice.
    recent_deliveries: VecDeque<SurbId>,
    recent_set: HashSet<SurbId>,
}

/// Delivered identifiers remembered against repeats.
const RECENT_DELIVERIES: usize = 4096;

/// The most reply keys kept for one exit session: four times the blocks it is kept stocked
/// with (at least 16). An exit spends blocks in the order it got them, so when more are
/// outstanding, the oldest are the ones whose replies were lost or will not come.
fn max_reply_keys(surbs_target: usize) -> usize {
    surbs_target.max(4) * 4
}

/// The payer and what it needs from outside: the wall clock, and the control frames for the
/// gateway it produced.
struct Payment {
    payer: Payer,
    /// Unix time at `anchor` on the session's clock (the driver reports both).
    anchor: Instant,
    unix_at_anchor: UnixTime,
    /// Payments for the gateway, sent before the next packet.
    to_gateway: VecDeque<Frame>,
    /// The latest `now` the session was given: when queued payments are due.
    last_now: Instant,
}

impl Payment {
    fn unix_now(&self, now: Instant) -> UnixTime {
        self.unix_at_anchor
            .saturating_add(now.saturating_duration_since(self.anchor).as_secs())
    }
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
            .ok_or_else(|| Error::Path("the chosen gateway is not in the consensus".into()))?;
        let (cover, delay) = schedules(&consensus.params, now, rng)?;
        Ok(ClientSession {
            config,
            consensus,
            gateway: gw,
            cover,
            delay,
            exits: Vec::new(),
            exit_index: HashMap::new(),
            streams: BTreeMap::new(),
            next_stream: 1,
            pending: HashMap::new(),
            deadlines: BTreeMap::new(),
            retransmit: VecDeque::new(),
            reply_keys: HashMap::new(),
            loops: HashMap::new(),
            events: VecDeque::new(),
            stats: SessionStats::default(),
            round_robin: 0,
            aborted: VecDeque::new(),
            suspects: HashMap::new(),
            payment: None,
            recent_deliveries: VecDeque::new(),
            recent_set: HashSet::new(),
        })
    }

    /// Pays relays with `payer` from now on. `unix_now` is the wall-clock time (Unix seconds)
    /// at `now`: tickets carry issue and expiry times.
    pub fn set_payer(&mut self, payer: Payer, now: Instant, unix_now: UnixTime) {
        self.payment = Some(Payment {
            payer,
            anchor: now,
            unix_at_anchor: unix_now,
            to_gateway: VecDeque::new(),
            last_now: now,
        });
    }

    /// What the ledger says of the pot now (see [`Payer::set_pot`]), and the wall clock at
    /// `now`.
    pub fn set_pot(&mut self, balance: u64, face_cap: u64, now: Instant, unix_now: UnixTime) {
        if let Some(p) = &mut self.payment {
            p.payer.set_pot(balance, face_cap);
            p.anchor = now;
            p.unix_at_anchor = unix_now;
        }
    }

    /// The payer, if the session pays.
    pub fn payer(&self) -> Option<&Payer> {
        self.payment.as_ref().map(|p| &p.payer)
    }

    /// Ends paying and hands back the payer, with what it still owes each relay, for the
    /// client's next session. Payments for this session's gateway not yet sent are dropped
    /// with it (its gateway is being left).
    pub fn take_payer(&mut self) -> Option<Payer> {
        self.payment.take().map(|p| p.payer)
    }

    /// Counters so far.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The gateway this session goes through.
    pub fn gateway(&self) -> &ConsensusRelay {
        &self.gateway
    }

    /// Puts a newer consensus in force (paths, keys, rates). Keeps the gateway if it is
    /// still listed; returns an error if it is not (the driver should move to another).
    pub fn set_consensus<R: Rng + ?Sized>(
        &mut self,
        consensus: Arc<Consensus>,
        now: Instant,
        rng: &mut R,
    ) -> Result<()> {
        let gw = consensus
            .relay(&self.gateway.identity)
            .filter(|r| r.roles.gateway)
            .cloned()
            .ok_or_else(|| Error::Path("the gateway left the consensus".into()))?;
        if consensus.params != self.consensus.params {
            (self.cover, self.delay) = schedules(&consensus.params, now, rng)?;
        }
        self.gateway = gw;
        if let Some(p) = &mut self.payment {
            p.payer.prune_to_consensus(&consensus);
        }
        self.consensus = consensus;
        Ok(())
    }

    /// Opens a stream to `target`. Streams with different `isolation` tokens never share
    /// an exit session. Fails at once if no exit's policy allows the target.
    pub fn open_stream<R: Rng + ?Sized>(
        &mut self,
        target: Target,
        isolation: Isolation,
        rng: &mut R,
    ) -> Result<StreamId> {
        let selector = PathSelector::new(&self.consensus, self.config.path_rules);
        let exit_target = match &target {
            Target::Addr(a) => ExitTarget::Ip(a.ip(), a.port()),
            Target::Host(_, port) => ExitTarget::HostPort(*port),
        };
        let exit = selector
            .choose_exit(rng, exit_target, &[&self.gateway])?
            .identity;
        let key = (exit, isolation);
        let index = match self.exit_index.get(&key) {
            Some(&i) => i,
            None => {
                self.exits.push(ExitSession {
                    exit,
                    id: rng.random(),
                    surbs_at_exit: 0,
                    surbs_issued: 0,
                    newest_returned: None,
                    streams: Vec::new(),
                    last_heard: Instant::ZERO,
                    last_topup: Instant::ZERO,
                    reply_ids: VecDeque::new(),
                });
                self.exit_index.insert(key, self.exits.len() - 1);
                self.exits.len() - 1
            }
        };
        let id = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(1).max(1);
        self.exits[index].streams.push(id);
        self.streams.insert(
            id,
            Stream {
                exit_session: index,
                target,
                state: StreamState::Opening,
                open_sent: false,
                open_sent_at: Instant::ZERO,
                outbox: VecDeque::new(),
                sent: 0,
                exit_acked: 0,
                app_closed: false,
                fin_sent: false,
                recv: RecvBuffer::new(self.config.stream_window),
                acked_sent: 0,
                unconsumed: 0,
                eof_reported: false,
                writable_wanted: false,
                window: self.config.stream_window.min(DEFAULT_STREAM_WINDOW),
            },
        );
        Ok(id)
    }

    /// Takes up to the stream's free window of `bytes`; returns how many were taken. When
    /// fewer than all, an [`Event::Writable`] follows once there is room.
    pub fn write(&mut self, stream: StreamId, bytes: &[u8]) -> usize {
        let Some(s) = self.streams.get_mut(&stream) else {
            return 0;
        };
        if s.app_closed {
            return 0;
        }
        let window = s.window;
        let in_flight = (s.sent - s.exit_acked) as usize + s.outbox.len();
        let n = bytes.len().min(window.saturating_sub(in_flight));
        s.outbox.extend(&bytes[..n]);
        if n < bytes.len() {
            s.writable_wanted = true;
        }
        n
    }

    /// The application took `n` bytes of the stream's data; they may now be acknowledged.
    pub fn consumed(&mut self, stream: StreamId, n: usize) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.unconsumed = s.unconsumed.saturating_sub(n as u64);
        }
    }

    /// The application closed its sending side.
    pub fn close_stream(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.app_closed = true;
        }
    }

    /// The application went away: reset the stream at the exit.
    pub fn abort_stream(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.remove(&stream) {
            let exit = &mut self.exits[s.exit_session];
            exit.streams.retain(|&x| x != stream);
            // Tell the exit on the next message to it (a reset for an unknown stream is harmless).
            self.aborted.push_back((s.exit_session, stream));
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::poll_transmit`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ack = self.deadlines.keys().next().map(|(t, _)| *t);
        let payment = self
            .payment
            .as_ref()
            .filter(|p| !p.to_gateway.is_empty())
            .map(|p| p.last_now);
        [self.cover.poll_timeout(), ack, payment]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next frame to send at `now`, if one is due. Call until `None`.
    pub fn poll_transmit<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) -> Option<Frame> {
        self.expire(now);
        if let Some(p) = &mut self.payment {
            p.last_now = now;
            if let Some(frame) = p.to_gateway.pop_front() {
                return Some(frame);
            }
        }
        if self.cover.queued() == 0 {
            match self.next_real(now, rng) {
                Ok(Some(q)) => self.cover.push_real(q),
                Ok(None) => {}
                Err(_) => {} // no path right now: the tick goes out as cover
            }
        }
        loop {
            let emission = self.cover.poll_transmit(now, rng)?;
            let frame = match emission {
                ClientEmission::Real(q) => {
                    self.stats.real_sent += 1;
                    Some(q.frame)
                }
                ClientEmission::SendCover | ClientEmission::Drop => {
                    self.stats.cover_sent += 1;
                    self.drop_cover(now, rng).ok()
                }
                ClientEmission::Loop => {
                    self.stats.loops_sent += 1;
                    self.loop_cover(now, rng).ok()
                }
            };
            if frame.is_some() {
                // The gateway forwards it: one frame on its tab.
                self.gateway_frame(now, rng);
                return frame;
            }
        }
    }

    /// Records one frame the gateway handles for this session and queues its payment if one
    /// is due.
    fn gateway_frame<R: CryptoRng + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        self.stats.gateway_frames += 1;
        let Some(p) = &mut self.payment else {
            return;
        };
        p.last_now = now;
        let gateway = &self.gateway;
        p.payer.carried(gateway.identity, 1);
        let Some(commitment) = gateway.payment_commitment(self.consensus.epoch) else {
            return;
        };
        let unix_now = p.unix_now(now);
        if let Some(ticket) =
            p.payer
                .gateway_payment(&PayeeInfo::of(gateway, commitment), unix_now, rng)
        {
            self.stats.gateway_tickets += 1;
            p.to_gateway
                .push_back(Frame::Control(Control::Payment { ticket }.encode()));
        }
    }

    /// Records that each of `relays` carried one packet (a reply or acknowledgement that
    /// came back over them).
    fn carried(&mut self, relays: &[IdentityKey]) {
        if let Some(p) = &mut self.payment {
            for r in relays {
                p.payer.carried(*r, 1);
            }
        }
    }

    /// The envelope slots for a packet over `route` whose hops are `payees`: every hop but
    /// the gateway carried one packet, and gets a ticket if one is due.
    fn pay_hops<R: CryptoRng + ?Sized>(
        &mut self,
        payees: &[IdentityKey],
        now: Instant,
        rng: &mut R,
    ) -> Vec<Option<SlotTicket>> {
        let Some(p) = &mut self.payment else {
            return vec![None; payees.len()];
        };
        let epoch = self.consensus.epoch;
        let unix_now = p.unix_now(now);
        let mut slots = Vec::with_capacity(payees.len());
        for id in payees {
            let relay = self.consensus.relay(id);
            let commitment = relay.and_then(|r| r.payment_commitment(epoch));
            let (Some(relay), Some(commitment)) = (relay, commitment) else {
                slots.push(None);
                continue;
            };
            if relay.identity == self.gateway.identity {
                slots.push(None);
                continue;
            }
            p.payer.carried(relay.identity, 1);
            let ticket = p
                .payer
                .ticket_for(&PayeeInfo::of(relay, commitment), unix_now, rng)
                .and_then(|t| SlotTicket::from_ticket(&t).ok());
            self.stats.hop_tickets += u64::from(ticket.is_some());
            slots.push(ticket);
        }
        slots
    }

    /// Takes a delivery from the gateway.
    ///
    /// Takes `rng` because a delivery may make a payment to the gateway due.
    pub fn handle_delivery<R: CryptoRng + ?Sized>(
        &mut self,
        surb_id: SurbId,
        payload: &[u8],
        now: Instant,
        rng: &mut R,
    ) {
        // Paid for only if it is this client's own (its tag verifies, or without tags it is
        // outstanding) and not a repeat: junk addressed to the client costs it nothing.
        let own = match &self.config.delivery_tags {
            Some(tags) => tags.is_mine(&surb_id),
            None => {
                self.pending.contains_key(&surb_id)
                    || self.reply_keys.contains_key(&surb_id)
                    || self.loops.contains_key(&surb_id)
            }
        };
        if !own {
            self.stats.foreign_deliveries += 1;
            return;
        }
        if !self.recent_set.insert(surb_id) {
            self.stats.duplicate_deliveries += 1;
            return;
        }
        self.recent_deliveries.push_back(surb_id);
        if self.recent_deliveries.len() > RECENT_DELIVERIES
            && let Some(old) = self.recent_deliveries.pop_front()
        {
            self.recent_set.remove(&old);
        }
        self.gateway_frame(now, rng);
        if let Some(p) = self.pending.remove(&surb_id) {
            match p.key.open(payload).and_then(|b| Content::decode(&b)) {
                Ok(Content::Ack) => {
                    self.stats.acks += 1;
                    for r in &p.relays {
                        self.suspects.remove(r);
                    }
                    self.carried(&p.ack_relays);
                }
                _ => {
                    self.stats.bad_replies += 1;
                    // Not a valid ack: keep waiting for the real one.
                    self.pending.insert(surb_id, p);
                }
            }
            return;
        }
        if let Some((key, exit, seq, relays)) = self.reply_keys.remove(&surb_id) {
            self.stats.replies += 1;
            self.carried(&relays);
            if let Some(e) = self.exits.get_mut(exit) {
                if e.newest_returned.is_none_or(|n| seq > n) {
                    e.newest_returned = Some(seq);
                    e.surbs_at_exit = usize::try_from(e.surbs_issued - seq - 1).unwrap_or(0);
                }
                e.last_heard = now;
            }
            let message = key
                .open(payload)
                .and_then(|b| Content::decode(&b))
                .and_then(|c| match c {
                    Content::Data { fragment } if fragment.count == 1 => {
                        ExitMessage::decode(&fragment.data)
                    }
                    _ => Err(Error::ContentKind(0)),
                });
            match message {
                Ok(m) => self.exit_message(exit, m),
                Err(_) => self.stats.bad_replies += 1,
            }
            return;
        }
        if self.loops.remove(&surb_id).is_some() {
            self.stats.loops_returned += 1;
            return;
        }
        self.stats.unknown_deliveries += 1;
    }

    fn exit_message(&mut self, exit: usize, message: ExitMessage) {
        for item in message.items {
            match item {
                ExitItem::Opened { stream, window } => {
                    let own = self.config.stream_window;
                    if let Some(s) = self.stream_of(exit, stream)
                        && s.state == StreamState::Opening
                    {
                        s.window = own.min(usize::try_from(window).unwrap_or(usize::MAX));
                        s.state = StreamState::Open;
                        self.events.push_back(Event::Opened(stream));
                    }
                }
                ExitItem::Refused { stream, reason } => {
                    if self.stream_of(exit, stream).is_some() {
                        self.end_stream(stream);
                        self.events
                            .push_back(Event::Refused(stream, reason.socks_code()));
                    }
                }
                ExitItem::Reset { stream, reason } => {
                    if self.stream_of(exit, stream).is_some() {
                        self.end_stream(stream);
                        self.events
                            .push_back(Event::Reset(stream, reason.socks_code()));
                    }
                }
                ExitItem::Data {
                    stream,
                    offset,
                    bytes,
                } => {
                    let Some(s) = self.stream_of(exit, stream) else {
                        continue;
                    };
                    if let Ok(ready) = s.recv.insert(offset, &bytes)
                        && !ready.is_empty()
                    {
                        s.unconsumed += ready.len() as u64;
                        self.events.push_back(Event::Data(stream, ready));
                    }
                    self.maybe_eof(stream);
                }
                ExitItem::Fin { stream, offset } => {
                    if let Some(s) = self.stream_of(exit, stream) {
                        let _ = s.recv.finish_at(offset);
                    }
                    self.maybe_eof(stream);
                }
                ExitItem::Ack { stream, offset } => {
                    if let Some(s) = self.stream_of(exit, stream) {
                        let window = s.window;
                        s.exit_acked = s.exit_acked.max(offset.min(s.sent));
                        let in_flight = (s.sent - s.exit_acked) as usize + s.outbox.len();
                        if s.writable_wanted && in_flight < window {
                            s.writable_wanted = false;
                            self.events.push_back(Event::Writable(stream));
                        }
                    }
                }
                ExitItem::SurbsLow { have } => {
                    if let Some(e) = self.exits.get_mut(exit) {
                        e.surbs_at_exit = usize::from(have);
                    }
                }
            }
        }
    }

    fn stream_of(&mut self, exit: usize, stream: StreamId) -> Option<&mut Stream> {
        self.streams
            .get_mut(&stream)
            .filter(|s| s.exit_session == exit)
    }

    fn maybe_eof(&mut self, stream: StreamId) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.recv.is_finished() && !s.eof_reported {
            s.eof_reported = true;
            self.events.push_back(Event::Eof(stream));
        }
    }

    fn end_stream(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.remove(&stream)
            && let Some(e) = self.exits.get_mut(s.exit_session)
        {
            e.streams.retain(|&x| x != stream);
        }
    }

    /// Moves timed-out packets to the retransmit queue, fails their streams after the last
    /// attempt, and counts loops that never came back.
    fn expire(&mut self, now: Instant) {
        while let Some((&(t, id), _)) = self.deadlines.iter().next() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, id));
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            if p.deadline != t {
                continue;
            }
            if p.attempts >= self.config.max_attempts {
                if let Some(p) = self.pending.remove(&id) {
                    for s in p.streams {
                        if self.streams.contains_key(&s) {
                            self.end_stream(s);
                            self.events
                                .push_back(Event::Reset(s, Refusal::TtlExpired.socks_code()));
                        }
                    }
                }
                continue;
            }
            for r in &p.relays {
                *self.suspects.entry(*r).or_insert(0) += 1;
            }
            self.retransmit.push_back(id);
        }
        let timeout = self.config.loop_timeout;
        let before = self.loops.len();
        self.loops
            .retain(|_, sent| now.saturating_duration_since(*sent) < timeout);
        self.stats.loops_missing += (before - self.loops.len()) as u64;
    }

    fn selector(&self) -> PathSelector<'_> {
        PathSelector::new(&self.consensus, self.config.path_rules)
    }

    /// A fresh `[L1, L2, L3]` avoiding the gateway, `also` and suspected relays; the hops
    /// and who they are.
    fn mix_route<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        also: Option<&ConsensusRelay>,
    ) -> Result<(Vec<RouteHop>, Vec<IdentityKey>)> {
        let suspects: Vec<IdentityKey> = self
            .suspects
            .iter()
            .filter(|(_, n)| **n >= SUSPECT_AFTER)
            .map(|(k, _)| *k)
            .collect();
        let selector = self.selector().excluding(&suspects);
        let mut avoid = vec![&self.gateway];
        avoid.extend(also);
        let epoch = self.consensus.epoch;
        let path = selector.mix_path(rng, &avoid)?;
        let hops = path
            .iter()
            .map(|r| r.route_hop(epoch))
            .collect::<Result<_>>()?;
        Ok((hops, path.iter().map(|r| r.identity).collect()))
    }

    /// Builds a packet over `route` (whose hops are `payees`), paying its hops, and wraps it
    /// for the gateway.
    #[allow(clippy::too_many_arguments)]
    fn seal<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        now: Instant,
        route: &[RouteHop],
        payees: &[IdentityKey],
        delays: &[Duration],
        destination: Address,
        surb_id: SurbId,
        content: &Content,
    ) -> Result<Frame> {
        let slots = self.pay_hops(payees, now, rng);
        let (packet, envelope) = build_packet_with_envelope(
            rng,
            route,
            delays,
            destination,
            surb_id,
            &content.encode()?,
            &slots,
        )?;
        Ok(Frame::Forward {
            next_hop: route[0].address,
            key_epoch: self.consensus.epoch,
            packet,
            envelope,
        })
    }

    /// A reply block back to this client over a fresh route; returns the block, its key and
    /// the sum of its delays.
    fn reply_block<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        avoid: Option<&ConsensusRelay>,
    ) -> Result<(ReplyBlock, ReplyKey, Duration, Vec<IdentityKey>)> {
        let (mut route, relays) = self.mix_route(rng, avoid)?;
        route.push(self.gateway.route_hop(self.consensus.epoch)?);
        let delays = self.delay.sample_n(rng, route.len());
        let total = delays[..delays.len() - 1].iter().sum();
        let id = self.mint_surb_id(rng);
        let (block, key) = build_reply_block_with_id(
            rng,
            &route,
            &delays,
            self.config.address,
            self.consensus.epoch,
            id,
        )?;
        Ok((block, key, total, relays))
    }

    /// Sends `fragment` to `exit` with a fresh SURB-ACK on fresh routes.
    fn send_fragment<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
        exit: IdentityKey,
        fragment: Fragment,
        streams: Vec<StreamId>,
        attempts: u32,
    ) -> Result<Queued> {
        let exit_relay = self
            .consensus
            .relay(&exit)
            .cloned()
            .ok_or_else(|| Error::Path("the exit left the consensus".into()))?;
        let (ack, key, ack_delay, ack_relays) = self.reply_block(rng, Some(&exit_relay))?;
        let (mut route, mut payees) = self.mix_route(rng, Some(&exit_relay))?;
        let mut relays = ack_relays.clone();
        relays.extend(payees.iter().copied());
        route.push(exit_relay.route_hop(self.consensus.epoch)?);
        payees.push(exit_relay.identity);
        let delays = self.delay.sample_n(rng, route.len());
        let forward_delay: Duration = delays[..delays.len() - 1].iter().sum();
        let frame = self.seal(
            rng,
            now,
            &route,
            &payees,
            &delays,
            exit_relay.address(),
            [0; 16],
            &Content::DataWithAck {
                ack,
                fragment: fragment.clone(),
            },
        )?;
        let rto = (forward_delay + ack_delay).mul_f64(1.5) + self.config.ack_slack;
        let deadline = now + rto;
        let id = key.surb_id();
        self.deadlines.insert((deadline, id), ());
        self.pending.insert(
            id,
            Pending {
                exit,
                relays,
                ack_relays,
                fragment,
                streams,
                attempts: attempts + 1,
                deadline,
                key,
            },
        );
        Ok(Queued { frame })
    }

    /// The next real packet: a retransmission first, then a new message for some exit.
    fn next_real<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) -> Result<Option<Queued>> {
        while let Some(id) = self.retransmit.pop_front() {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            self.stats.retransmits += 1;
            return self
                .send_fragment(now, rng, p.exit, p.fragment, p.streams, p.attempts)
                .map(Some);
        }
        let n = self.exits.len();
        for k in 0..n {
            let exit = (self.round_robin + k) % n;
            if let Some((message, streams)) = self.compose(exit, now, rng)? {
                self.round_robin = (exit + 1) % n.max(1);
                let fragment = Fragment {
                    message_id: rng.random(),
                    index: 0,
                    count: 1,
                    data: message.encode()?,
                };
                let exit_id = self.exits[exit].exit;
                return self
                    .send_fragment(now, rng, exit_id, fragment, streams, 0)
                    .map(Some);
            }
        }
        Ok(None)
    }

    /// One message for exit session `exit`, filling one packet, or `None` if nothing waits.
    fn compose<R: CryptoRng + ?Sized>(
        &mut self,
        exit: usize,
        now: Instant,
        rng: &mut R,
    ) -> Result<Option<(ClientMessage, Vec<StreamId>)>> {
        let budget = FORWARD_FRAGMENT_DATA_LEN - CLIENT_MESSAGE_OVERHEAD;
        let mut used = 0;
        let mut items = Vec::new();
        let mut carried = Vec::new();
        let session_id = self.exits[exit].id;
        // Resets of aborted streams.
        let mut keep = VecDeque::new();
        while let Some((e, stream)) = self.aborted.pop_front() {
            if e == exit && used + 5 <= budget {
                items.push(ClientItem::Reset { stream });
                used += 5;
            } else {
                keep.push_back((e, stream));
            }
        }
        self.aborted = keep;
        let stream_ids = self.exits[exit].streams.clone();
        let mut wants_surbs = false;
        let reply_timeout = self.config.reply_timeout;
        for &id in &stream_ids {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let unanswered = s.state == StreamState::Opening
                && s.open_sent
                && now.saturating_duration_since(s.open_sent_at) >= reply_timeout;
            if !s.open_sent || unanswered {
                let item = ClientItem::Open {
                    stream: id,
                    target: s.target.clone(),
                    window: u32::try_from(self.config.stream_window).unwrap_or(u32::MAX),
                };
                if used + item.encoded_len() > budget {
                    break;
                }
                used += item.encoded_len();
                items.push(item);
                s.open_sent = true;
                s.open_sent_at = now;
                carried.push(id);
                wants_surbs = true;
                if unanswered {
                    // Its reply blocks may have been spent on the lost answer.
                    self.exits[s.exit_session].surbs_at_exit = 0;
                }
            }
            let consumed = s.recv.delivered() - s.unconsumed;
            let ack = consumed + u64::from(s.recv.is_finished() && s.unconsumed == 0);
            if ack > s.acked_sent && used + 13 <= budget {
                items.push(ClientItem::Ack {
                    stream: id,
                    offset: ack,
                });
                used += 13;
                s.acked_sent = ack;
            }
            if s.state == StreamState::Open || !s.outbox.is_empty() {
                wants_surbs = true;
            }
        }
        // Reply blocks: keep the exit stocked while it has streams, and top up an exit that
        // went quiet with streams still open.
        let active = stream_ids
            .iter()
            .any(|id| self.streams.get(id).is_some_and(|s| !s.eof_reported));
        let session = &self.exits[exit];
        let quiet = active
            && now.saturating_duration_since(session.last_heard) >= reply_timeout
            && now.saturating_duration_since(session.last_topup) >= reply_timeout;
        let stocked = if quiet { 0 } else { session.surbs_at_exit };
        let target = if stream_ids.is_empty() {
            0
        } else {
            self.config.surbs_target
        };
        let mut blocks = Vec::new();
        if (wants_surbs || quiet) && stocked < target {
            // Up to four fit one packet (4 × 400 bytes); each buys one reply packet.
            let want = (target - stocked).min(4);
            let exit_relay = self.consensus.relay(&self.exits[exit].exit).cloned();
            for _ in 0..want {
                if used + 2 + (blocks.len() + 1) * REPLY_BLOCK_LEN > budget {
                    break;
                }
                let (block, key, _, relays) = self.reply_block(rng, exit_relay.as_ref())?;
                let seq = self.exits[exit].surbs_issued + blocks.len() as u64;
                let id = key.surb_id();
                self.reply_keys.insert(id, (key, exit, seq, relays));
                blocks.push(block);
                // An exit that stays silent while its streams are open is topped up every
                // `reply_timeout`: without a bound its keys would pile up for ever.
                let ids = &mut self.exits[exit].reply_ids;
                ids.push_back(id);
                while ids.len() > max_reply_keys(self.config.surbs_target) {
                    if let Some(old) = ids.pop_front() {
                        self.reply_keys.remove(&old);
                    }
                }
            }
            if !blocks.is_empty() {
                used += 2 + blocks.len() * REPLY_BLOCK_LEN;
                self.exits[exit].surbs_at_exit += blocks.len();
                self.exits[exit].surbs_issued += blocks.len() as u64;
                self.exits[exit].last_topup = now;
            }
        }
        // Data, then ends of data.
        for &id in &stream_ids {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            if !s.open_sent {
                continue;
            }
            let window_left = s.window.saturating_sub((s.sent - s.exit_acked) as usize);
            let room = budget.saturating_sub(used + DATA_ITEM_OVERHEAD);
            let take = s.outbox.len().min(room).min(window_left);
            if take > 0 {
                let bytes: Vec<u8> = s.outbox.drain(..take).collect();
                items.push(ClientItem::Data {
                    stream: id,
                    offset: s.sent,
                    bytes,
                });
                used += DATA_ITEM_OVERHEAD + take;
                s.sent += take as u64;
                carried.push(id);
            }
            if s.app_closed && s.outbox.is_empty() && !s.fin_sent && used + 13 <= budget {
                items.push(ClientItem::Fin {
                    stream: id,
                    offset: s.sent,
                });
                used += 13;
                s.fin_sent = true;
                carried.push(id);
            }
        }
        if !blocks.is_empty() {
            items.push(ClientItem::Surbs(blocks));
        }
        // Streams finished both ways (our end sent, theirs received and acknowledged).
        let finished: Vec<StreamId> = stream_ids
            .iter()
            .copied()
            .filter(|id| {
                self.streams.get(id).is_some_and(|s| {
                    s.fin_sent
                        && s.eof_reported
                        && s.exit_acked == s.sent
                        && s.unconsumed == 0
                        && s.acked_sent > s.recv.delivered()
                })
            })
            .collect();
        for id in finished {
            self.end_stream(id);
        }
        if items.is_empty() {
            return Ok(None);
        }
        carried.sort_unstable();
        carried.dedup();
        Ok(Some((
            ClientMessage {
                session: session_id,
                items,
            },
            carried,
        )))
    }

    /// Drop cover: a full-route packet to a random exit, which discards it.
    fn drop_cover<R: CryptoRng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> Result<Frame> {
        let selector = self.selector();
        let target = selector.choose_exit(rng, ExitTarget::HostPort(443), &[&self.gateway]);
        let last = match target {
            Ok(r) => r.clone(),
            Err(_) => self.gateway.clone(),
        };
        let (mut route, mut payees) = self.mix_route(rng, Some(&last))?;
        route.push(last.route_hop(self.consensus.epoch)?);
        payees.push(last.identity);
        let delays = self.delay.sample_n(rng, route.len());
        self.seal(
            rng,
            now,
            &route,
            &payees,
            &delays,
            last.address(),
            [0; 16],
            &Content::Cover,
        )
    }

    /// A fresh SURB identifier: tagged ([`crate::delivery`]) if the session has tag keys.
    fn mint_surb_id<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> SurbId {
        match &self.config.delivery_tags {
            Some(tags) => tags.mint(rng),
            None => loop {
                let id: SurbId = rng.random();
                if id != [0; crate::SURB_ID_LEN] {
                    return id;
                }
            },
        }
    }

    /// Loop cover: a packet through the mixes back to this client via its gateway.
    fn loop_cover<R: CryptoRng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> Result<Frame> {
        let (mut route, mut payees) = self.mix_route(rng, None)?;
        route.push(self.gateway.route_hop(self.consensus.epoch)?);
        payees.push(self.gateway.identity);
        let delays = self.delay.sample_n(rng, route.len());
        let id = self.mint_surb_id(rng);
        let frame = self.seal(
            rng,
            now,
            &route,
            &payees,
            &delays,
            self.config.address,
            id,
            &Content::Cover,
        )?;
        self.loops.insert(id, now);
        Ok(frame)
    }
}
