//! The gateway role: client sessions over authenticated, encrypted links.
//!
//! A client opens a WebSocket and runs a Noise XK handshake inside it
//! ([`murmur_client_link`]): it proves a static key of its own (fresh per session) and the
//! gateway proves the link key the consensus lists for it. The session's address is
//! [`session_address`] of the client's key, so only that key's owner can open the session,
//! receive its inbox or replace it; a second link with the same key (a reconnect) replaces
//! the live session, a link with another key never touches it. The client's first sealed
//! frame is `Hello { address }`, which must name that address. Then it sends `Forward` frames
//! that the gateway passes to layer-1 mixes unchanged (it cannot read the packets). Packets
//! whose final hop is this gateway and whose destination is a client's address are delivered
//! down that client's link as `Deliver` frames; while the client is away they wait in a
//! bounded inbox for a while, so a brief disconnection loses nothing ([`crate::inbox`]: only
//! an address with a live or recent session has one).
//!
//! A gateway that takes payments ([`Billing`]) keeps a [`Tab`] per client key in a
//! [`TabBook`]: the tab outlives the session for a window (a reconnect resumes it), and a new
//! tab gets grace only if its source address has grace left (others are prepaid). Each
//! `Forward` frame from the client and each `Deliver` frame to it costs the gateway's price;
//! each ticket the client sends in a `Payment` control frame is checked like a hop's ticket,
//! and credits its expected value (at most the arrears limit's worth) only once the ledger
//! has vouched that its pot covers it: a ticket from a pot still being looked up has its
//! credit held until then, and one whose pot turns out unknown or empty is refused. A winning
//! ticket is durable before it credits anything; a ticket issued before this gateway started
//! credits nothing (its nonce may have been forgotten in a restart, so it could be a replay).
//! A client whose arrears pass the tab's limit, or whose tickets are refused
//! [`MAX_REFUSED_TICKETS`](murmur_protocol::tab::MAX_REFUSED_TICKETS) times, is told `Cutoff`
//! and disconnected. A refused ticket is answered with `PaymentRefused`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_protocol::admission::Limits;
use murmur_protocol::control::{Control, refusal};
use murmur_protocol::delivery::GatewayTagKey;
use murmur_protocol::envelope::Envelope;
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{LinkSecret, session_address};
use murmur_protocol::packet::{Address, FinalDelivery, Packet};
use murmur_protocol::tab::{Opened, Tab, TabBook, TabBookConfig, Verdict};
use murmur_protocol::ticket::Ticket;
use murmur_protocol::time::Instant as ProtoInstant;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admit::{Gate, GateLimits};
use crate::config::GatewaySection;
use crate::inbox::{InboxLimits, Inboxes};
use crate::keys::KeyRing;
use crate::links::{FirstHop, Links};
use crate::metrics::{self as m, drop_packet};
use crate::payments::{Accepted, PaymentRefusal, Payments, PotStanding, TicketSignatures};
use murmur_client_link::{ClientLink, LinkFailure};

struct Session {
    generation: u64,
    tx: mpsc::Sender<Frame>,
    /// Checks the client's delivery tags ([`murmur_protocol::delivery`]).
    tags: Arc<GatewayTagKey>,
}

/// What a gateway that takes payments charges with.
pub struct Billing {
    pub payments: Arc<Payments>,
    /// To tell which key epoch a ticket's commitment belongs to.
    pub keys: Arc<KeyRing>,
    /// The clients' tabs' terms.
    pub tabs: TabBookConfig,
}

impl Billing {
    /// Checks a ticket a client paid with.
    fn accept(
        &self,
        ticket: &Ticket,
        signatures: TicketSignatures,
    ) -> Result<Accepted, PaymentRefusal> {
        let epoch = self
            .keys
            .epochs()
            .into_iter()
            .find(|e| {
                self.keys
                    .get(*e)
                    .is_some_and(|k| k.payment_commitment() == ticket.commitment)
            })
            .ok_or(PaymentRefusal::WrongCommitment(0))?;
        self.payments
            .accept_signed(ticket, signatures, epoch, murmur_ledger::unix_now())
    }
}

/// Whether a refusal says the ticket is worth nothing, whoever sent it (forged, from a pot
/// that cannot pay, for someone else, above the face-value cap, too small, malformed), as
/// opposed to a race or a limit an honest client can meet.
fn worthless(r: &PaymentRefusal) -> bool {
    matches!(
        r,
        PaymentRefusal::Forged
            | PaymentRefusal::CoSignatureMissing
            | PaymentRefusal::CoSignatureNotOwner
            | PaymentRefusal::PotUnknown(_)
            | PaymentRefusal::PotInsufficient { .. }
            | PaymentRefusal::WrongRecipient
            | PaymentRefusal::FaceValueTooLarge { .. }
            | PaymentRefusal::TooSmall { .. }
            | PaymentRefusal::Malformed(_)
    )
}

/// The control-message code for a relay's refusal of a ticket.
fn refusal_code(r: &PaymentRefusal) -> u8 {
    match r {
        PaymentRefusal::WrongRecipient => refusal::WRONG_RECIPIENT,
        PaymentRefusal::Expired { .. } | PaymentRefusal::ExpiresTooSoon { .. } => refusal::EXPIRED,
        PaymentRefusal::NotYetValid { .. } => refusal::NOT_YET_VALID,
        PaymentRefusal::TooSmall { .. } => refusal::TOO_SMALL,
        PaymentRefusal::UnknownEpoch(_) | PaymentRefusal::WrongCommitment(_) => {
            refusal::UNKNOWN_COMMITMENT
        }
        PaymentRefusal::NonceReused => refusal::REPLAYED,
        PaymentRefusal::PotUnknown(_) | PaymentRefusal::PotInsufficient { .. } => {
            refusal::POT_CANNOT_COVER
        }
        PaymentRefusal::Forged => refusal::FORGED,
        PaymentRefusal::CoSignatureMissing | PaymentRefusal::CoSignatureNotOwner => {
            refusal::COSIGNATURE
        }
        PaymentRefusal::Malformed(_) => refusal::MALFORMED,
        _ => refusal::OTHER,
    }
}

/// What the session loop should do after a client's frame.
enum ClientFrame {
    /// Nothing to answer.
    Done,
    /// A ticket to check, and the signatures it came with (boxed: the other variants are
    /// small).
    Payment(Box<(Ticket, TicketSignatures)>),
    /// A packet to charge and forward.
    Forward {
        next_hop: Address,
        key_epoch: u32,
        packet: Box<Packet>,
        envelope: Envelope,
    },
}

/// Tickets whose credit a session holds until the ledger vouches for their pot.
const MAX_HELD_TICKETS: usize = 16;
/// How long a client about to be cut off waits for the lookups its held tickets need.
const HELD_WAIT: Duration = Duration::from_secs(2);
/// Tab room kept for the client's own frames when deliveries are held back for payment:
/// half the default grace. What the client sends while its tickets for the deliveries
/// before are on their way back must fit in it, or its frames are refused: with a quarter
/// (16), the throughput benchmark at λ_P = 800 on the 2-core machine had 31-70 frames
/// refused and its upload at 0.12, 0.34 and 1.02 of its bound in three runs (each refused
/// packet waits out its retransmission timeout); with 32, 1-12 refused and 0.98-1.01.
const CLIENT_FRAMES_IN_FLIGHT: u64 = 32;
/// The longest deliveries are held back for a client's payment (an honest client's ticket
/// is back within a round trip to its gateway).
const DELIVERY_HOLD: Duration = Duration::from_millis(500);
/// How often a gateway that has no consensus yet looks whether one is in force.
const CONSENSUS_POLL: Duration = Duration::from_millis(20);
/// How long a client's packet built by the consensus after ours waits for us to fetch it
/// (the directory follower fetches at once when asked, else within its tick of at most 10 s).
const AHEAD_WAIT: Duration = Duration::from_secs(10);
/// How often waiting packets are looked at again.
const AHEAD_RETRY: Duration = Duration::from_millis(50);
/// Packets one client may have waiting so (1.3 s at 800 packets/s), and all clients.
const AHEAD_PER_CLIENT: usize = 1024;
const AHEAD_TOTAL: usize = 4096;

/// A client's packet for a first hop of the consensus after ours ([`FirstHop::Ahead`]).
struct AheadPacket {
    next_hop: Address,
    key_epoch: u32,
    packet: Box<Packet>,
    envelope: Envelope,
    since: Instant,
}

/// A ticket accepted from a pot still being looked up: its credit waits.
struct Held {
    ticket: Ticket,
    signatures: TicketSignatures,
    /// `None`: refused as `pot_not_yet_known` (the pot used its allowance); checked again
    /// once the pot is known.
    accepted: Option<Accepted>,
}

/// Client sessions and inboxes.
pub struct Gateway {
    config: GatewaySection,
    /// The relay's link key: clients find its public half in the consensus.
    link_key: Arc<LinkSecret>,
    gate: Gate,
    links: Arc<Links>,
    billing: Option<Billing>,
    /// Every client's tab, by key (with `billing`).
    tabs: Option<Mutex<TabBook>>,
    /// The origin of the tabs' clock, and this gateway's start (Unix seconds): tickets
    /// issued before it credit nothing.
    origin: Instant,
    started_unix: u64,
    sessions: Mutex<HashMap<Address, Session>>,
    inboxes: Mutex<Inboxes>,
    next_generation: AtomicU64,
    /// Packets all sessions hold waiting for the consensus their clients built them by.
    ahead_total: AtomicUsize,
}

impl Gateway {
    pub fn new(
        config: GatewaySection,
        link_key: Arc<LinkSecret>,
        links: Arc<Links>,
        billing: Option<Billing>,
    ) -> Arc<Gateway> {
        let gate = Gate::new("client", gate_limits(&config));
        // The book's terms were validated with the configuration; a tab that could not serve
        // one frame is a configuration error caught there (`TabConfig::validate`).
        let tabs = billing
            .as_ref()
            .and_then(|b| TabBook::new(b.tabs).ok())
            .map(Mutex::new);
        let inboxes = Mutex::new(Inboxes::new(inbox_limits(&config)));
        Arc::new(Gateway {
            config,
            link_key,
            gate,
            links,
            billing,
            tabs,
            origin: Instant::now(),
            started_unix: murmur_ledger::unix_now(),
            sessions: Mutex::new(HashMap::new()),
            inboxes,
            next_generation: AtomicU64::new(0),
            ahead_total: AtomicUsize::new(0),
        })
    }

    /// Hands a final-hop packet to the client it is addressed to.
    pub fn deliver(&self, delivery: FinalDelivery) {
        let frame = Frame::Deliver {
            surb_id: delivery.surb_id,
            payload: delivery.payload,
        };
        let to = delivery.destination;
        let session = self
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&to).map(|s| (s.tx.clone(), s.tags.clone())));
        if let Some((tx, tags)) = session {
            // Junk addressed to the client (no tag of its) is neither delivered nor charged.
            if let Frame::Deliver { surb_id, .. } = &frame
                && !tags.admits(surb_id)
            {
                drop_packet("delivery_tag_invalid");
                return;
            }
            match tx.try_send(frame) {
                Ok(()) => {
                    metrics::counter!(m::FINAL_DELIVERED, "to" => "client").increment(1);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    drop_packet("client_queue_full");
                }
                // The session just ended: keep it for the client's return.
                Err(mpsc::error::TrySendError::Closed(frame)) => self.keep(to, frame),
            }
        } else {
            self.keep(to, frame);
        }
    }

    /// Keeps a frame for a client that is away, if its address had a session lately.
    fn keep(&self, to: Address, frame: Frame) {
        let kept = match self.inboxes.lock() {
            Ok(mut inboxes) => inboxes.keep(to, frame, Instant::now()),
            Err(_) => return,
        };
        match kept {
            Ok(()) => metrics::counter!(m::FINAL_DELIVERED, "to" => "inbox").increment(1),
            Err(why) => drop_packet(why.label()),
        }
    }

    /// Drops the inboxes of sessions that ended more than `inbox_ttl` ago.
    pub fn sweep(&self) {
        let dropped = self
            .inboxes
            .lock()
            .map_or(0, |mut i| i.sweep(Instant::now()));
        metrics::counter!(m::PACKETS_DROPPED, "reason" => "inbox_expired")
            .increment(dropped as u64);
    }

    /// Accepts client links until shutdown.
    ///
    /// A connection takes a handshake slot at accept (refused and closed if its address or the
    /// listener has too many handshakes going), then has `handshake_timeout` to finish the
    /// WebSocket upgrade, the Noise handshake and its hello; only then does it take a client
    /// slot. Idle and half-open sockets therefore never hold more than the handshake pool, for
    /// longer than the deadline, and never the slots of clients that proved their keys.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let sweeper = {
            let gw = self.clone();
            let shutdown = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => gw.sweep(),
                    }
                }
            }
        };
        tracker.spawn(sweeper);
        if !self.wait_for_consensus(&shutdown).await {
            return;
        }
        loop {
            let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "client accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Refused: dropping the stream closes it.
            let Some(pending) = self.gate.admit(peer) else {
                continue;
            };
            let gw = self.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let handshake = gw.gate.handshake(peer, pending, gw.handshake(stream));
                let (link, address, established) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = handshake => match r {
                        Some(((link, address), slot)) => (link, address, slot),
                        None => return,
                    },
                };
                if let Err(reason) = gw.clone().session(link, address, peer, shutdown).await {
                    tracing::debug!(reason, "client session ended");
                }
                gw.gate.closed(established);
            });
        }
    }

    /// Waits until a consensus is in force (false if shut down first). Until then the gateway
    /// knows no layer-1 mix, and every packet a client sent would be dropped
    /// (`first_hop_not_layer1`): a client that has the consensus before its gateway does (both
    /// fetch it when the directory publishes) waits in the listen backlog instead, its
    /// handshake unanswered, and retries if its handshake timeout passes first.
    async fn wait_for_consensus(&self, shutdown: &CancellationToken) -> bool {
        let ready = || {
            self.links
                .routes()
                .read()
                .map(|r| r.has_consensus())
                .unwrap_or(false)
        };
        if !ready() {
            tracing::info!("gateway: taking clients once a consensus is in force");
        }
        let mut tick = tokio::time::interval(CONSENSUS_POLL);
        while !ready() {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tick.tick() => {}
            }
        }
        true
    }

    /// WebSocket upgrade, Noise handshake and hello: the link and the session address, which is
    /// derived from the client's proven key. A hello naming any other address is refused, so an
    /// inbox is only ever handed to the key that owns it. The error is the refusal's reason.
    async fn handshake(&self, stream: TcpStream) -> Result<(ClientLink, Address), &'static str> {
        let mut link = ClientLink::accept(stream, &self.link_key)
            .await
            .map_err(LinkFailure::label)?;
        let address = session_address(&link.remote());
        match link.recv().await {
            Ok(Frame::Control(c)) => match Control::decode(&c) {
                Ok(Control::Hello { address: claimed }) if claimed == address => {
                    Ok((link, address))
                }
                Ok(Control::Hello { .. }) => Err("hello_address_mismatch"),
                _ => Err("hello_missing"),
            },
            Ok(_) => Err("hello_missing"),
            Err(e) => Err(e.label()),
        }
    }

    /// Serves one client whose key owns `address` until it leaves, falls silent for
    /// `client_idle_timeout`, is cut off, or another link with the same key replaces it.
    async fn session(
        self: Arc<Self>,
        mut link: ClientLink,
        address: Address,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), &'static str> {
        if let Some(book) = &self.tabs {
            let opened =
                book.lock()
                    .map_err(|_| "tab book poisoned")?
                    .open(address, peer.ip(), self.now());
            match opened {
                Ok(how) => {
                    let label = match how {
                        Opened::Resumed => "resumed",
                        Opened::Graced => "graced",
                        Opened::Prepaid => "prepaid",
                    };
                    metrics::counter!(m::TABS_OPENED, "how" => label).increment(1);
                }
                Err(_) => {
                    crate::admit::refuse("client", "tabs_full");
                    return Err("every tab is in use");
                }
            }
        }
        let result = self
            .clone()
            .serve_session(&mut link, address, shutdown)
            .await;
        if let Some(book) = &self.tabs
            && let Ok(mut book) = book.lock()
        {
            book.close(&address, self.now());
        }
        link.close().await;
        result
    }

    /// Charges one delivery already written to the client; if that would cut the client off
    /// while tickets of its wait for their pot's lookup, waits for the ledger's answer (at
    /// most [`HELD_WAIT`]) and decides on the balance then.
    async fn charge_or_wait(&self, address: &Address, held: &mut VecDeque<Held>) -> Verdict {
        let verdict = self.charge(address, 1);
        if verdict != Verdict::Cutoff || held.is_empty() {
            return verdict;
        }
        let deadline = tokio::time::Instant::now() + HELD_WAIT;
        while !held.is_empty() && tokio::time::Instant::now() < deadline {
            if self.settle_held(address, held).await == Verdict::Cutoff && held.is_empty() {
                break;
            }
            if self.with_tab(address, |t| t.verdict()) != Verdict::Cutoff {
                return Verdict::Serve;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.with_tab(address, |t| t.verdict())
    }

    /// Charges one of the client's own frames before it is forwarded
    /// ([`Tab::charge_or_refuse`]): refused, not charged, where it would take the arrears
    /// past the limit, and the client cut off once the frames refused since its last
    /// payment pass the limit's worth. A frame that would be refused while tickets of the
    /// client wait for their pot's lookup first waits for the ledger's answer (at most
    /// [`HELD_WAIT`]).
    async fn charge_own_frame(&self, address: &Address, held: &mut VecDeque<Held>) -> Verdict {
        let deadline = tokio::time::Instant::now() + HELD_WAIT;
        while !self.has_room(address, 1)
            && !held.is_empty()
            && tokio::time::Instant::now() < deadline
        {
            // A held ticket's pot turned out unknown or short: the session ends.
            if self.settle_held(address, held).await == Verdict::Cutoff {
                return Verdict::Cutoff;
            }
            if self.has_room(address, 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.with_tab(address, |t| t.charge_or_refuse(1))
    }

    /// The running totals of the tab of the client whose session address is `address`
    /// (`None` without payments or without such a tab): frames served and refused, payments.
    pub fn tab_stats(&self, address: &Address) -> Option<murmur_protocol::tab::TabStats> {
        let book = self.tabs.as_ref()?.lock().ok()?;
        book.tab(address).map(Tab::stats)
    }

    /// The tabs' clock.
    fn now(&self) -> ProtoInstant {
        ProtoInstant::from_elapsed(self.origin.elapsed())
    }

    /// Whether `address`'s tab has room for one more delivery and for the client's own
    /// frames already on their way (always, without tabs): a delivery that took the last of
    /// the room would leave the client's next packet to cut it off.
    fn can_serve(&self, address: &Address) -> bool {
        self.has_room(address, 1 + CLIENT_FRAMES_IN_FLIGHT)
    }

    /// Whether `address`'s tab can be charged `frames` within its terms (always, without
    /// tabs; never for an address without a tab).
    fn has_room(&self, address: &Address, frames: u64) -> bool {
        match &self.tabs {
            Some(book) => book.lock().is_ok_and(|b| b.can_serve(address, frames)),
            None => true,
        }
    }

    /// Charges `frames` to `address`'s tab, if the gateway keeps tabs.
    fn charge(&self, address: &Address, frames: u64) -> Verdict {
        match &self.tabs {
            Some(book) => book
                .lock()
                .map_or(Verdict::Cutoff, |mut b| b.charge(address, frames)),
            None => Verdict::Serve,
        }
    }

    /// Applies `f` to `address`'s tab: its verdict after (`Serve` without tabs).
    fn with_tab(&self, address: &Address, f: impl FnOnce(&mut Tab) -> Verdict) -> Verdict {
        match &self.tabs {
            Some(book) => book
                .lock()
                .ok()
                .and_then(|mut b| b.tab_mut(address).map(f))
                .unwrap_or(Verdict::Cutoff),
            None => Verdict::Serve,
        }
    }

    /// A `Payment` from the client: checked like a hop's ticket, then credited if its pot is
    /// vouched for, held if its pot is being looked up (accepted within the pot's allowance,
    /// or to be checked again once the ledger answers), refused otherwise. The verdict and,
    /// for a refusal, the code to answer with.
    async fn payment(
        &self,
        address: &Address,
        ticket: Ticket,
        signatures: TicketSignatures,
        held: &mut VecDeque<Held>,
    ) -> (Verdict, Option<u8>) {
        let Some(billing) = &self.billing else {
            return (Verdict::Serve, None);
        };
        let paid = Held {
            ticket,
            signatures,
            accepted: None,
        };
        match billing.accept(&ticket, signatures) {
            Ok(accepted) if accepted.pot_verified => {
                (self.credit(address, &ticket, accepted).await, None)
            }
            Ok(accepted) => (
                self.hold(
                    address,
                    Held {
                        accepted: Some(accepted),
                        ..paid
                    },
                    held,
                ),
                None,
            ),
            // Its pot is being looked up and used its allowance: check it again after.
            Err(PaymentRefusal::PotNotYetKnown) => (self.hold(address, paid, held), None),
            // Refusals an honest client meets too (a key epoch changing under it, a clock off
            // by a little, the relay's own capacity) are answered, not held against it; only
            // tickets that cannot be worth anything count towards a cut-off.
            Err(r) if !worthless(&r) => (Verdict::Serve, Some(refusal_code(&r))),
            Err(r) => (
                self.with_tab(address, Tab::refused_ticket),
                Some(refusal_code(&r)),
            ),
        }
    }

    /// Credits an accepted ticket whose pot the ledger vouched for, once a winner is durable.
    async fn credit(&self, address: &Address, ticket: &Ticket, accepted: Accepted) -> Verdict {
        let Some(billing) = &self.billing else {
            return Verdict::Serve;
        };
        if accepted.winner {
            // A winner is stored before it credits anything (a gateway killed right after
            // still redeems it).
            let payments = billing.payments.clone();
            let stored = tokio::task::spawn_blocking(move || payments.flush()).await;
            if !matches!(stored, Ok(Ok(_))) {
                tracing::error!("cannot store a client's winning ticket; no credit given");
                return Verdict::Serve;
            }
        }
        if ticket.issued < self.started_unix {
            // Its nonce may be one this gateway forgot in a restart: no credit for it.
            metrics::counter!(m::CREDIT_HELD, "result" => "issued_before_start").increment(1);
            return Verdict::Serve;
        }
        // A client paying its way back from a cut-off is not cut off again for the arrears
        // it is paying down: its frames are refused until it is within the limit.
        self.with_tab(address, |t| {
            t.credit(accepted.expected_value);
            Verdict::Serve
        })
    }

    /// Holds a ticket until its pot is known ([`MAX_HELD_TICKETS`] at most: beyond, it counts
    /// as refused).
    fn hold(&self, address: &Address, paid: Held, held: &mut VecDeque<Held>) -> Verdict {
        if held.len() >= MAX_HELD_TICKETS {
            metrics::counter!(m::CREDIT_HELD, "result" => "held_full").increment(1);
            return self.with_tab(address, Tab::refused_ticket);
        }
        held.push_back(paid);
        Verdict::Serve
    }

    /// Credits the held tickets whose pots the ledger now vouches for (checking again those
    /// not accepted yet) and ends the session if one's pot is unknown or cannot cover it. The
    /// verdict.
    async fn settle_held(&self, address: &Address, held: &mut VecDeque<Held>) -> Verdict {
        let Some(billing) = &self.billing else {
            return Verdict::Serve;
        };
        let mut verdict = Verdict::Serve;
        for _ in 0..held.len() {
            let Some(h) = held.pop_front() else { break };
            let t = &h.ticket;
            match billing.payments.pot_standing(&t.pot, t.face_value) {
                PotStanding::Pending => held.push_back(h),
                PotStanding::Covers => {
                    let accepted = match h.accepted {
                        Some(a) => Ok(a),
                        None => billing.accept(t, h.signatures),
                    };
                    match accepted {
                        Ok(a) => {
                            metrics::counter!(m::CREDIT_HELD, "result" => "credited").increment(1);
                            verdict = self.credit(address, t, a).await;
                        }
                        Err(r) => {
                            metrics::counter!(m::CREDIT_HELD, "result" => "refused").increment(1);
                            tracing::info!(reason = r.label(), "a held ticket was refused");
                            verdict = self.with_tab(address, Tab::refused_ticket);
                        }
                    }
                }
                PotStanding::Refused => {
                    metrics::counter!(m::CREDIT_HELD, "result" => "refused").increment(1);
                    tracing::info!(pot = %t.pot, "a client paid from a pot that does not cover its ticket");
                    // Paying from an unknown or empty pot ends the session.
                    verdict = Verdict::Cutoff;
                }
            }
            if verdict == Verdict::Cutoff {
                break;
            }
        }
        verdict
    }

    /// The session after its tab is open.
    async fn serve_session(
        self: Arc<Self>,
        link: &mut ClientLink,
        address: Address,
        shutdown: CancellationToken,
    ) -> Result<(), &'static str> {
        let (tx, mut rx) = mpsc::channel::<Frame>(self.config.client_queue);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // Queue what waited in the inbox, then make the session visible to deliveries.
        let waiting = self
            .inboxes
            .lock()
            .map(|mut i| i.session_started(address, generation))
            .unwrap_or_default();
        // However the session ends, its address keeps an inbox for `inbox_ttl`.
        let _away = Away {
            gateway: &self,
            address,
            generation,
        };
        let welcome = Frame::Control(
            Control::Welcome {
                queued: u32::try_from(waiting.len()).unwrap_or(u32::MAX),
            }
            .encode(),
        );
        send_frame(link, &welcome).await?;
        let mut held: VecDeque<Held> = VecDeque::new();
        let tags = Arc::new(GatewayTagKey::for_client(&link.remote()));
        for frame in waiting {
            // What waited in the inbox was not checked against the client's tags yet.
            if let Frame::Deliver { surb_id, .. } = &frame
                && !tags.admits(surb_id)
            {
                drop_packet("delivery_tag_invalid");
                continue;
            }
            send_frame(link, &frame).await?;
            if self.charge(&address, 1) == Verdict::Cutoff {
                return cut_off(link).await;
            }
        }
        // A reconnect with the same key replaces the old session: dropping its sender ends it.
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(
                address,
                Session {
                    generation,
                    tx,
                    tags,
                },
            );
            metrics::gauge!(m::CLIENT_SESSIONS).set(sessions.len() as f64);
        }
        let idle = self.config.client_idle_timeout;
        let quiet = tokio::time::sleep(idle);
        tokio::pin!(quiet);
        // Since when deliveries have been held back for payment.
        let mut held_back_since: Option<tokio::time::Instant> = None;
        let mut ahead: VecDeque<AheadPacket> = VecDeque::new();
        let mut ahead_retry = tokio::time::Instant::now();
        let result = loop {
            // A deadline, not a fresh sleep per turn: a client sending faster than the retry
            // period would otherwise never let it come.
            if ahead.is_empty() {
                ahead_retry = tokio::time::Instant::now() + AHEAD_RETRY;
            }
            let room = self.can_serve(&address);
            if room {
                held_back_since = None;
            } else if held_back_since.is_none() {
                held_back_since = Some(tokio::time::Instant::now());
            }
            // Held back at most `DELIVERY_HOLD`: a client that does not know its debt (one
            // restarted, whose old process left it on the tab) is then served and charged
            // as before, and cut off if it does not pay.
            let hold_until = held_back_since.map(|t| t + DELIVERY_HOLD);
            let deliver = room || hold_until.is_some_and(|t| t <= tokio::time::Instant::now());
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                () = tokio::time::sleep_until(hold_until.unwrap_or_else(tokio::time::Instant::now)),
                    if !deliver && hold_until.is_some() => {}
                () = &mut quiet => {
                    crate::admit::refuse("client", "idle_timeout");
                    break Err("client idle");
                }
                // Held back while the tab has no room: a burst of replies waits (bounded by
                // `client_queue`) for the client's next ticket rather than cutting it off
                // 64 frames in, before that ticket could come back.
                out = rx.recv(), if deliver => match out {
                    Some(frame) => {
                        if let Err(e) = send_frame(link, &frame).await {
                            break Err(e);
                        }
                        if self.charge_or_wait(&address, &mut held).await == Verdict::Cutoff {
                            break cut_off(link).await;
                        }
                    }
                    None => break Ok(()),
                },
                () = tokio::time::sleep_until(ahead_retry), if !ahead.is_empty() => {
                    self.retry_ahead(&mut ahead, Instant::now());
                    ahead_retry = tokio::time::Instant::now() + AHEAD_RETRY;
                }
                // Payments waiting for their pot's lookup may be what frees the tab.
                () = tokio::time::sleep(Duration::from_millis(20)),
                    if !held.is_empty() && !self.can_serve(&address) =>
                {
                    if self.settle_held(&address, &mut held).await == Verdict::Cutoff {
                        break cut_off(link).await;
                    }
                }
                msg = link.recv() => {
                    quiet.as_mut().reset(tokio::time::Instant::now() + idle);
                    if !held.is_empty() && self.settle_held(&address, &mut held).await == Verdict::Cutoff {
                        break cut_off(link).await;
                    }
                    match msg {
                        Ok(frame) => match self.on_client_frame(frame) {
                            ClientFrame::Done => {}
                            ClientFrame::Forward { next_hop, key_epoch, packet, envelope } => {
                                // Charged before it is served: a prepaid tab without credit
                                // refuses it.
                                match self.charge_own_frame(&address, &mut held).await {
                                    Verdict::Serve => {
                                        self.forward(next_hop, key_epoch, packet, envelope, &mut ahead)
                                    }
                                    Verdict::Unpaid => drop_packet("client_unpaid"),
                                    Verdict::Cutoff => break cut_off(link).await,
                                }
                            }
                            ClientFrame::Payment(paid) => {
                                let (ticket, signatures) = *paid;
                                let (verdict, refused) =
                                    self.payment(&address, ticket, signatures, &mut held).await;
                                if let Some(reason) = refused {
                                    let answer =
                                        Frame::Control(Control::PaymentRefused { reason }.encode());
                                    if let Err(e) = send_frame(link, &answer).await {
                                        break Err(e);
                                    }
                                }
                                if verdict == Verdict::Cutoff {
                                    break cut_off(link).await;
                                }
                            }
                        },
                        Err(LinkFailure::Closed) => break Ok(()),
                        Err(e) => {
                            drop_packet(e.label());
                            break Err("client link failed");
                        }
                    }
                }
            }
        };
        // Paid for: what still waits for a consensus goes out if ours now allows it, and is
        // dropped (counted) otherwise.
        self.retry_ahead(&mut ahead, Instant::now() + AHEAD_WAIT);
        // Frames still queued for the client go back to its inbox.
        rx.close();
        while let Ok(frame) = rx.try_recv() {
            self.keep(address, frame);
        }
        if let Ok(mut sessions) = self.sessions.lock() {
            if sessions
                .get(&address)
                .is_some_and(|s| s.generation == generation)
            {
                sessions.remove(&address);
            }
            metrics::gauge!(m::CLIENT_SESSIONS).set(sessions.len() as f64);
        }
        result
    }

    fn on_client_frame(&self, frame: Frame) -> ClientFrame {
        match frame {
            Frame::Forward {
                next_hop,
                key_epoch,
                packet,
                envelope,
            } => {
                metrics::counter!(m::PACKETS_IN, "from" => "client").increment(1);
                ClientFrame::Forward {
                    next_hop,
                    key_epoch,
                    packet: Box::new(packet),
                    envelope,
                }
            }
            Frame::Control(bytes) => match (Control::decode(&bytes), &self.billing) {
                (Ok(Control::Payment { ticket }), Some(_)) => {
                    ClientFrame::Payment(Box::new((ticket, TicketSignatures::Ed25519)))
                }
                (
                    Ok(Control::CosignedPayment {
                        ticket,
                        cosignature,
                    }),
                    Some(_),
                ) => ClientFrame::Payment(Box::new((
                    ticket,
                    TicketSignatures::WithCoSignature(cosignature),
                ))),
                // A gateway that charges nothing has nothing to take.
                (Ok(Control::Payment { .. } | Control::CosignedPayment { .. }), None) => {
                    ClientFrame::Done
                }
                (Ok(_), _) => {
                    drop_packet("unexpected_control");
                    ClientFrame::Done
                }
                (Err(e), _) => {
                    drop_packet(e.label());
                    ClientFrame::Done
                }
            },
            _ => {
                drop_packet("unexpected_frame");
                ClientFrame::Done
            }
        }
    }

    /// Passes a client's packet to the layer-1 mix it names (after it was charged), judged by
    /// the consensus the client built it with ([`Routes::first_hop`]); one built by a
    /// consensus we have not fetched yet waits for it in `ahead`.
    ///
    /// [`Routes::first_hop`]: crate::links::Routes::first_hop
    fn forward(
        &self,
        next_hop: Address,
        key_epoch: u32,
        packet: Box<Packet>,
        envelope: Envelope,
        ahead: &mut VecDeque<AheadPacket>,
    ) {
        match self.first_hop(&next_hop, key_epoch) {
            FirstHop::Allowed => self.send_first_hop(next_hop, key_epoch, *packet, envelope),
            // Charged all the same: it cost the gateway a frame.
            FirstHop::Refused => drop_packet("first_hop_not_layer1"),
            FirstHop::Ahead => {
                let reserved = ahead.len() < AHEAD_PER_CLIENT
                    && self
                        .ahead_total
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            (n < AHEAD_TOTAL).then_some(n + 1)
                        })
                        .is_ok();
                if !reserved {
                    drop_packet("first_hop_ahead_full");
                    return;
                }
                ahead.push_back(AheadPacket {
                    next_hop,
                    key_epoch,
                    packet,
                    envelope,
                    since: Instant::now(),
                });
                self.links.want_consensus();
            }
        }
    }

    /// Sends what waits in `ahead` that our consensus now allows, drops what it refuses or
    /// what waited [`AHEAD_WAIT`] by `now`, and keeps the rest (asking for the consensus
    /// again).
    fn retry_ahead(&self, ahead: &mut VecDeque<AheadPacket>, now: Instant) {
        let before = ahead.len();
        for p in std::mem::take(ahead) {
            match self.first_hop(&p.next_hop, p.key_epoch) {
                FirstHop::Allowed => {
                    metrics::counter!(m::FIRST_HOP_WAITED).increment(1);
                    self.send_first_hop(p.next_hop, p.key_epoch, *p.packet, p.envelope);
                }
                FirstHop::Refused => drop_packet("first_hop_not_layer1"),
                FirstHop::Ahead if now.saturating_duration_since(p.since) >= AHEAD_WAIT => {
                    drop_packet("first_hop_ahead_expired")
                }
                FirstHop::Ahead => ahead.push_back(p),
            }
        }
        self.ahead_total
            .fetch_sub(before - ahead.len(), Ordering::Relaxed);
        if !ahead.is_empty() {
            self.links.want_consensus();
        }
    }

    fn first_hop(&self, next_hop: &Address, key_epoch: u32) -> FirstHop {
        self.links
            .routes()
            .read()
            .map(|r| r.first_hop(next_hop, key_epoch))
            .unwrap_or(FirstHop::Refused)
    }

    fn send_first_hop(
        &self,
        next_hop: Address,
        key_epoch: u32,
        packet: Packet,
        envelope: Envelope,
    ) {
        self.links.send(
            next_hop,
            &Frame::Packet {
                key_epoch,
                packet,
                envelope,
            },
            Some(Instant::now()),
        );
    }
}

/// Marks a session's address as away (keeping its inbox for a while) when the session ends.
struct Away<'a> {
    gateway: &'a Gateway,
    address: Address,
    generation: u64,
}

impl Drop for Away<'_> {
    fn drop(&mut self) {
        if let Ok(mut inboxes) = self.gateway.inboxes.lock() {
            inboxes.session_ended(self.address, self.generation, Instant::now());
        }
    }
}

/// The inboxes' bounds, from the configuration.
fn inbox_limits(config: &GatewaySection) -> InboxLimits {
    InboxLimits {
        frames_per_address: config.inbox_packets,
        bytes_per_address: config.inbox_bytes,
        total_bytes: config.inbox_total_bytes,
        recent_sessions: config.max_clients,
        ttl: config.inbox_ttl,
    }
}

/// The client listener's limits, from the configuration.
fn gate_limits(config: &GatewaySection) -> GateLimits {
    GateLimits {
        handshake: Limits {
            total: config.max_handshakes,
            per_address: config.max_handshakes_per_address,
        },
        established: Limits {
            total: config.max_clients,
            per_address: config.max_clients_per_address,
        },
        handshake_timeout: config.handshake_timeout,
    }
}

/// Tells a client in arrears it is cut off, and ends its session.
async fn cut_off(link: &mut ClientLink) -> Result<(), &'static str> {
    metrics::counter!(m::CLIENTS_CUT_OFF).increment(1);
    let _ = send_frame(link, &Frame::Control(Control::Cutoff.encode())).await;
    Err("client in arrears: cut off")
}

async fn send_frame(link: &mut ClientLink, frame: &Frame) -> Result<(), &'static str> {
    link.send(frame).await.map_err(LinkFailure::label)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use murmur_protocol::PAYLOAD_SIZE;
    use murmur_protocol::link::{LinkPublic, LinkSecret};
    use tokio::io::AsyncReadExt;

    use super::*;
    use murmur_client_link::{ClientLink, LinkFailure};

    /// A gateway relay on loopback (no directory, no payments) with `gateway` config lines, and
    /// a consensus in force (any: the tests' packets are not routed).
    async fn gateway(extra: &str) -> (Arc<crate::Node>, CancellationToken, tempfile::TempDir) {
        let (node, stop, dir) = gateway_without_consensus(extra).await;
        node.apply_consensus(Arc::new(crate::payments::tests::any_consensus()));
        (node, stop, dir)
    }

    async fn gateway_without_consensus(
        extra: &str,
    ) -> (Arc<crate::Node>, CancellationToken, tempfile::TempDir) {
        let dir = tempfile::TempDir::new().unwrap();
        let text = format!(
            "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"gateway\"]\nstate_dir = \"{}\"\n\
             [listen]\nmix = \"127.0.0.1:0\"\nclient = \"127.0.0.1:0\"\n[gateway]\n{extra}\n",
            dir.path().join("state").display()
        );
        let config = crate::Config::parse(&text, dir.path().to_path_buf()).unwrap();
        let stop = CancellationToken::new();
        let identity = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let node = crate::Node::start(config, identity, stop.clone())
            .await
            .unwrap();
        (node, stop, dir)
    }

    async fn open(node: &crate::Node, key: &LinkSecret) -> Result<ClientLink, LinkFailure> {
        let stream = TcpStream::connect(node.client_addr().unwrap())
            .await
            .unwrap();
        ClientLink::open(stream, &node.link_public(), key).await
    }

    /// A gateway with no consensus knows no layer-1 mix, so every packet a client sent would be
    /// dropped: it leaves clients unanswered in its backlog until a consensus is in force,
    /// then takes them. (It used to take them at once.)
    #[tokio::test]
    async fn a_gateway_takes_clients_only_once_a_consensus_is_in_force() {
        let (node, stop, _dir) = gateway_without_consensus("").await;
        let key = LinkSecret::generate(&mut rand::rng());
        let early = tokio::time::timeout(Duration::from_millis(500), open(&node, &key)).await;
        assert!(
            early.is_err(),
            "the gateway answered a handshake without a consensus"
        );
        node.apply_consensus(Arc::new(crate::payments::tests::any_consensus()));
        let link = tokio::time::timeout(Duration::from_secs(5), open(&node, &key))
            .await
            .expect("no answer once a consensus is in force");
        assert!(link.is_ok(), "{:?}", link.err());
        stop.cancel();
    }

    /// A relay's link listener on loopback that hands over the frames it is sent.
    async fn fake_mix(
        link_key: LinkSecret,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Frame>) {
        use tokio::io::AsyncReadExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut t = murmur_directory::link_io::accept_handshake(&mut s, &link_key)
                .await
                .unwrap();
            let mut sealed = vec![0u8; murmur_protocol::link::SEALED_FRAME_LEN];
            while s.read_exact(&mut sealed).await.is_ok() {
                let opened = t.open_frame(&sealed).unwrap();
                if tx.send(Frame::decode(&opened[..]).unwrap()).is_err() {
                    return;
                }
            }
        });
        (addr, rx)
    }

    /// Clients and relays each fetch a new consensus on their own schedule. A client that has
    /// the next one first builds packets for its layer-1 mixes, which the gateway's consensus
    /// may not list as layer 1: those packets wait for the gateway to fetch it (they were
    /// dropped as `first_hop_not_layer1`, 588 of them at the throughput benchmark's start in
    /// a third of its runs), and a client still on the consensus before keeps its first hops.
    /// A packet for a relay that is layer 1 in no consensus the client could hold is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_hop_of_the_next_consensus_waits_for_it_and_one_of_the_last_still_goes() {
        use murmur_protocol::directory::NetworkParams;
        use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
        use rand::SeedableRng;
        const EPOCH: u32 = 7;
        let network = |seed: u64, epoch: u32| {
            generate(
                &mut rand_chacha::ChaCha20Rng::seed_from_u64(seed),
                &SyntheticNetwork {
                    mixes_per_layer: 1,
                    gateways: 0,
                    exits: 0,
                    params: NetworkParams::nym_like(),
                    epoch,
                },
            )
        };
        let layer = |c: &murmur_protocol::directory::Consensus, l: u8| {
            c.relays.iter().position(|r| r.layer == Some(l)).unwrap()
        };
        // The next consensus swaps the mixes of layers 1 and 2.
        let (mut now, keys) = network(21, EPOCH);
        let (a, b) = (layer(&now, 1), layer(&now, 2));
        let (a_addr, mut at_a) = fake_mix(keys[a].link.clone()).await;
        let (b_addr, mut at_b) = fake_mix(keys[b].link.clone()).await;
        now.relays[a].addresses.mix = a_addr;
        now.relays[b].addresses.mix = b_addr;
        let mut next = now.clone();
        next.epoch = EPOCH + 1;
        next.relays[a].layer = Some(2);
        next.relays[b].layer = Some(1);
        let (a_hop, b_hop) = (now.relays[a].address(), now.relays[b].address());

        let (node, stop, _dir) = gateway_without_consensus("").await;
        node.apply_consensus(Arc::new(now.clone()));
        let mut link = open(&node, &LinkSecret::generate(&mut rand::rng()))
            .await
            .unwrap();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let mut forward = |next_hop: Address, key_epoch: u32, mark: u8| {
            let mut bytes = [mark; murmur_protocol::PACKET_SIZE];
            bytes[31] &= 0x7f;
            Frame::Forward {
                next_hop,
                key_epoch,
                packet: Packet::from_slice(&bytes).unwrap(),
                envelope: Envelope::random(&mut rng),
            }
        };
        let mark = |f: &Frame| match f {
            Frame::Packet { packet, .. } => packet.as_bytes()[0],
            other => panic!("not a packet: {other:?}"),
        };
        let next_frame = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<Frame>| {
            let frame = rx.try_recv();
            frame.ok().map(|f| mark(&f))
        };
        // Refused: our layer-2 mix as a first hop by our consensus, or by one two ahead.
        link.send(&forward(b_hop, EPOCH, 1)).await.unwrap();
        link.send(&forward(b_hop, EPOCH + 2, 2)).await.unwrap();
        // Waits: built by the next consensus, where b is layer 1.
        link.send(&forward(b_hop, EPOCH + 1, 3)).await.unwrap();
        link.send(&forward(a_hop, EPOCH, 4)).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), at_a.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(mark(&first), 4, "our own layer 1 is served at once");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            next_frame(&mut at_b),
            None,
            "passed to a relay our consensus does not list as layer 1"
        );

        node.apply_consensus(Arc::new(next));
        // The client goes on sending meanwhile, by the consensus before: a client still on it
        // keeps its layer 1 for one change.
        let mut meanwhile = 0;
        let waited = loop {
            link.send(&forward(a_hop, EPOCH, 5)).await.unwrap();
            meanwhile += 1;
            if let Ok(frame) = at_b.try_recv() {
                break frame;
            }
            assert!(
                meanwhile < 500,
                "the packet that waited for the consensus never went out"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(mark(&waited), 3);
        assert!(matches!(waited, Frame::Packet { key_epoch, .. } if key_epoch == EPOCH + 1));
        // A packet built by the new consensus may not name the old layer 1.
        link.send(&forward(a_hop, EPOCH + 1, 6)).await.unwrap();
        link.send(&forward(b_hop, EPOCH + 1, 7)).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(5), at_b.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(mark(&again), 7);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut at_a_meanwhile = Vec::new();
        while let Some(m) = next_frame(&mut at_a) {
            at_a_meanwhile.push(m);
        }
        assert_eq!(
            at_a_meanwhile,
            vec![5; meanwhile],
            "by the consensus before: all kept; by the new one: refused (6)"
        );
        assert_eq!(next_frame(&mut at_b), None, "packet 1 or 2 went out");
        stop.cancel();
        node.join().await;
    }

    /// A client cannot make the gateway hold more than [`AHEAD_PER_CLIENT`] packets by
    /// claiming a consensus that never comes: the rest are dropped, counted; nor can all
    /// clients together hold more than [`AHEAD_TOTAL`], or any packet wait past [`AHEAD_WAIT`].
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn packets_waiting_for_a_consensus_are_bounded() {
        let (node, stop, _dir) = gateway("").await;
        let epoch = crate::payments::tests::any_consensus().epoch;
        let full_before =
            crate::metrics::test_counter(m::PACKETS_DROPPED, "reason=\"first_hop_ahead_full\"");
        let mut link = open(&node, &LinkSecret::generate(&mut rand::rng()))
            .await
            .unwrap();
        let mut rng = rand::rng();
        let extra = 100;
        for _ in 0..AHEAD_PER_CLIENT + extra {
            let frame = Frame::Forward {
                next_hop: Address([7; 32]),
                key_epoch: epoch + 1,
                packet: Packet::from_slice(&[0; murmur_protocol::PACKET_SIZE]).unwrap(),
                envelope: Envelope::random(&mut rng),
            };
            link.send(&frame).await.unwrap();
        }
        let gw = node.gateway().unwrap().clone();
        let waiting_becomes = |n: usize| {
            let gw = gw.clone();
            async move {
                for _ in 0..100 {
                    if gw.ahead_total.load(Ordering::Relaxed) == n {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                false
            }
        };
        let full = || {
            crate::metrics::test_counter(m::PACKETS_DROPPED, "reason=\"first_hop_ahead_full\"")
                - full_before
        };
        // The last frames are still being read when the count of waiting ones reaches its bound.
        for _ in 0..100 {
            if full() >= extra as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(full(), extra as f64);
        assert!(
            waiting_becomes(AHEAD_PER_CLIENT).await,
            "{} waiting",
            gw.ahead_total.load(Ordering::Relaxed)
        );
        // The session's end lets them go (dropped: no consensus ever allowed them).
        drop(link);
        let released = waiting_becomes(0).await;
        assert!(
            released,
            "{} still counted",
            gw.ahead_total.load(Ordering::Relaxed)
        );
        waiting_packets_are_bounded_in_all_and_in_time(&gw);
        stop.cancel();
        node.join().await;
    }

    /// Many clients together hold at most [`AHEAD_TOTAL`] waiting packets, and a packet waits
    /// at most [`AHEAD_WAIT`]: then it is dropped, counted, and its place freed. (Run by the
    /// test above, which shares its drop counters.)
    fn waiting_packets_are_bounded_in_all_and_in_time(gw: &Gateway) {
        let epoch = crate::payments::tests::any_consensus().epoch;
        let mut rng = rand::rng();
        let mut ahead_packet = |ahead: &mut VecDeque<AheadPacket>| {
            gw.forward(
                Address([7; 32]),
                epoch + 1,
                Box::new(Packet::from_slice(&[0; murmur_protocol::PACKET_SIZE]).unwrap()),
                Envelope::random(&mut rng),
                ahead,
            )
        };
        let dropped = |reason: &str| {
            crate::metrics::test_counter(m::PACKETS_DROPPED, &format!("reason=\"{reason}\""))
        };
        let (full_before, expired_before) = (
            dropped("first_hop_ahead_full"),
            dropped("first_hop_ahead_expired"),
        );
        let clients = AHEAD_TOTAL / AHEAD_PER_CLIENT + 1;
        let mut sessions: Vec<VecDeque<AheadPacket>> =
            (0..clients).map(|_| VecDeque::new()).collect();
        for ahead in &mut sessions {
            for _ in 0..AHEAD_PER_CLIENT {
                ahead_packet(ahead);
            }
        }
        let held: usize = sessions.iter().map(VecDeque::len).sum();
        assert_eq!(held, AHEAD_TOTAL);
        assert_eq!(gw.ahead_total.load(Ordering::Relaxed), AHEAD_TOTAL);
        assert_eq!(
            dropped("first_hop_ahead_full") - full_before,
            (clients * AHEAD_PER_CLIENT - AHEAD_TOTAL) as f64
        );

        let since = sessions[0].front().unwrap().since;
        gw.retry_ahead(
            &mut sessions[0],
            since + AHEAD_WAIT - Duration::from_millis(1),
        );
        assert_eq!(
            sessions[0].len(),
            AHEAD_PER_CLIENT,
            "dropped before its time"
        );
        let last = sessions[0].back().unwrap().since;
        gw.retry_ahead(&mut sessions[0], last + AHEAD_WAIT);
        assert!(sessions[0].is_empty());
        assert_eq!(
            dropped("first_hop_ahead_expired") - expired_before,
            AHEAD_PER_CLIENT as f64
        );
        assert_eq!(
            gw.ahead_total.load(Ordering::Relaxed),
            AHEAD_TOTAL - AHEAD_PER_CLIENT,
            "the expired packets' places are freed"
        );
        let fifth = sessions.len() - 1;
        ahead_packet(&mut sessions[fifth]);
        assert_eq!(sessions[fifth].len(), 1, "a freed place is taken again");
        for ahead in &mut sessions {
            gw.retry_ahead(ahead, Instant::now() + AHEAD_WAIT);
        }
        assert_eq!(gw.ahead_total.load(Ordering::Relaxed), 0);
    }

    /// Dials with `key` and says hello for `claimed`; what the gateway answers.
    async fn claim(
        addr: SocketAddr,
        gateway: &LinkPublic,
        key: &LinkSecret,
        claimed: Address,
    ) -> Result<Frame, LinkFailure> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut link = ClientLink::dial(stream, gateway, key).await?;
        link.send(&Frame::Control(
            Control::Hello { address: claimed }.encode(),
        ))
        .await?;
        link.recv().await
    }

    /// A delivery to the client whose link key is `to`, tagged for it (SURB id `id`...).
    fn delivery(to: &LinkSecret, id: u8) -> FinalDelivery {
        FinalDelivery {
            destination: session_address(&to.public()),
            surb_id: GatewayTagKey::for_client(&to.public()).tagged([id; 6]),
            payload: Box::new([id; PAYLOAD_SIZE]),
        }
    }

    /// The next Deliver frame's SURB id (other frames skipped), within 5 s.
    async fn next_delivery(link: &mut ClientLink) -> Result<u8, LinkFailure> {
        next_delivery_within(link, Duration::from_secs(5)).await
    }

    async fn next_delivery_within(
        link: &mut ClientLink,
        within: Duration,
    ) -> Result<u8, LinkFailure> {
        let wait = async {
            loop {
                if let Frame::Deliver { surb_id, .. } = link.recv().await? {
                    return Ok(surb_id[0]);
                }
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .unwrap_or(Err(LinkFailure::Closed))
    }

    /// A session's address is its key's: another key claiming it is refused and gets nothing,
    /// the victim keeps its deliveries, its inbox and its session; the same key reconnecting
    /// replaces the session.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_belongs_to_the_key_that_owns_its_address() {
        let (node, stop, _dir) = gateway("").await;
        let gw = node.gateway().unwrap().clone();
        let (addr, gateway_key) = (node.client_addr().unwrap(), node.link_public());
        let victim = LinkSecret::generate(&mut rand::rng());
        let victim_address = session_address(&victim.public());

        // Nothing is kept for an address no session had; once the victim's session ended,
        // what comes waits in its inbox for its return.
        gw.deliver(delivery(&victim, 9));
        let first = open(&node, &victim).await.unwrap();
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        gw.deliver(delivery(&victim, 1));
        let mut link = open(&node, &victim).await.unwrap();
        assert_eq!(next_delivery(&mut link).await, Ok(1));

        // Junk addressed to the victim without its tag is dropped, not delivered.
        for i in 0..1000u32 {
            let mut junk = delivery(&victim, 9);
            junk.surb_id[..4].copy_from_slice(&i.to_be_bytes());
            junk.surb_id[15] ^= 0x5a;
            gw.deliver(junk);
        }
        gw.deliver(delivery(&victim, 6));
        assert_eq!(next_delivery(&mut link).await, Ok(6), "junk was delivered");

        // Another key naming the victim's address: closed without a welcome or a delivery.
        let attacker = LinkSecret::generate(&mut rand::rng());
        gw.deliver(delivery(&victim, 2));
        for _ in 0..3 {
            let r = claim(addr, &gateway_key, &attacker, victim_address).await;
            assert_eq!(r, Err(LinkFailure::Closed), "the claim was answered");
        }
        gw.deliver(delivery(&victim, 3));
        assert_eq!(next_delivery(&mut link).await, Ok(2));
        assert_eq!(next_delivery(&mut link).await, Ok(3));

        // With its own key the attacker gets its own session, never the victim's deliveries.
        let mut own = open(&node, &attacker).await.unwrap();
        gw.deliver(delivery(&victim, 4));
        assert_eq!(next_delivery(&mut link).await, Ok(4));
        assert!(
            next_delivery_within(&mut own, Duration::from_millis(500))
                .await
                .is_err(),
            "the attacker got a delivery"
        );

        // The victim reconnecting with its key takes its session over; the old link ends.
        let mut again = open(&node, &victim).await.unwrap();
        gw.deliver(delivery(&victim, 5));
        assert_eq!(next_delivery(&mut again).await, Ok(5));
        assert_eq!(next_delivery(&mut link).await, Err(LinkFailure::Closed));
        stop.cancel();
        node.join().await;
    }

    /// Idle sockets are closed at the handshake deadline, silent sessions at the idle timeout,
    /// and one address holds at most `max_clients_per_address` sessions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshakes_and_sessions_are_bounded() {
        let (node, stop, _dir) = gateway(
            "handshake_timeout = \"300ms\"\nclient_idle_timeout = \"600ms\"\n\
             max_clients_per_address = 2\n",
        )
        .await;
        let addr = node.client_addr().unwrap();
        // A socket that never speaks: closed at the deadline.
        let t = tokio::time::Instant::now();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );

        // Two sessions from 127.0.0.1, and a third refused after its handshake.
        let keys: Vec<LinkSecret> = (0..3)
            .map(|_| LinkSecret::generate(&mut rand::rng()))
            .collect();
        let mut a = open(&node, &keys[0]).await.unwrap();
        let _b = open(&node, &keys[1]).await.unwrap();
        assert!(
            open(&node, &keys[2]).await.is_err(),
            "a third session from one address"
        );

        // A session that sends nothing is closed at the idle timeout.
        let t = tokio::time::Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(3), a.recv()).await;
        assert_eq!(end.unwrap(), Err(LinkFailure::Closed));
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        stop.cancel();
        node.join().await;
    }
}
