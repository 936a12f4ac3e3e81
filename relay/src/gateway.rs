//! The gateway role: client sessions over authenticated, encrypted links.
//!
//! A client opens a WebSocket and runs a Noise XK handshake inside it
//! ([`crate::client_link`]): it proves a static key of its own (fresh per session) and the
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
//! A gateway that takes payments ([`Billing`]) keeps a [`Tab`] per session: each `Forward`
//! frame from the client and each `Deliver` frame to it costs the gateway's price, each
//! ticket the client sends in a `Payment` control frame is checked like a hop's ticket and
//! credits its expected value, and a client whose arrears pass the tab's limit is told
//! `Cutoff` and disconnected. A refused ticket is answered with `PaymentRefused`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_protocol::admission::Limits;
use murmur_protocol::control::{Control, refusal};
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{LinkSecret, session_address};
use murmur_protocol::packet::{Address, FinalDelivery};
use murmur_protocol::tab::{Tab, TabConfig, Verdict};
use murmur_protocol::ticket::Ticket;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admit::{Gate, GateLimits};
use crate::client_link::{ClientLink, LinkFailure};
use crate::config::GatewaySection;
use crate::inbox::{InboxLimits, Inboxes};
use crate::keys::KeyRing;
use crate::links::Links;
use crate::metrics::{self as m, drop_packet};
use crate::payments::{PaymentRefusal, Payments};

struct Session {
    generation: u64,
    tx: mpsc::Sender<Frame>,
}

/// What a gateway that takes payments charges with.
pub struct Billing {
    pub payments: Arc<Payments>,
    /// To tell which key epoch a ticket's commitment belongs to.
    pub keys: Arc<KeyRing>,
    /// Each session's tab.
    pub tab: TabConfig,
}

impl Billing {
    /// Checks a ticket a client paid with; its expected value, or the refusal code to send.
    fn accept(&self, ticket: &Ticket) -> Result<u64, u8> {
        let epoch = self
            .keys
            .epochs()
            .into_iter()
            .find(|e| {
                self.keys
                    .get(*e)
                    .is_some_and(|k| k.payment_commitment() == ticket.commitment)
            })
            .ok_or(refusal::UNKNOWN_COMMITMENT)?;
        self.payments
            .accept(ticket, epoch, murmur_ledger::unix_now())
            .map(|a| a.expected_value)
            .map_err(|r| refusal_code(&r))
    }
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
        PaymentRefusal::Malformed(_) => refusal::MALFORMED,
        _ => refusal::OTHER,
    }
}

/// What the session loop should do after a client's frame.
enum ClientFrame {
    /// Nothing to answer.
    Done,
    /// A packet was forwarded: charge the tab one frame.
    Forwarded,
    /// A ticket was accepted, worth this much.
    Paid(u64),
    /// A ticket was refused: answer with this code.
    Refused(u8),
}

/// Client sessions and inboxes.
pub struct Gateway {
    config: GatewaySection,
    /// The relay's link key: clients find its public half in the consensus.
    link_key: Arc<LinkSecret>,
    gate: Gate,
    links: Arc<Links>,
    billing: Option<Billing>,
    sessions: Mutex<HashMap<Address, Session>>,
    inboxes: Mutex<Inboxes>,
    next_generation: AtomicU64,
}

impl Gateway {
    pub fn new(
        config: GatewaySection,
        link_key: Arc<LinkSecret>,
        links: Arc<Links>,
        billing: Option<Billing>,
    ) -> Arc<Gateway> {
        let gate = Gate::new("client", gate_limits(&config));
        let inboxes = Mutex::new(Inboxes::new(inbox_limits(&config)));
        Arc::new(Gateway {
            config,
            link_key,
            gate,
            links,
            billing,
            sessions: Mutex::new(HashMap::new()),
            inboxes,
            next_generation: AtomicU64::new(0),
        })
    }

    /// Hands a final-hop packet to the client it is addressed to.
    pub fn deliver(&self, delivery: FinalDelivery) {
        let frame = Frame::Deliver {
            surb_id: delivery.surb_id,
            payload: delivery.payload,
        };
        let to = delivery.destination;
        let tx = self
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&to).map(|s| s.tx.clone()));
        if let Some(tx) = tx {
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
                if let Err(reason) = gw.clone().session(link, address, shutdown).await {
                    tracing::debug!(reason, "client session ended");
                }
                gw.gate.closed(established);
            });
        }
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
        send_frame(&mut link, &welcome).await?;
        // A client's tab lasts as long as its session: a client that reconnects starts with
        // the initial credit again (bounded by `max_clients` sessions at once).
        let mut tab = match &self.billing {
            Some(b) => Some(Tab::new(b.tab).map_err(|_| "invalid tab configuration")?),
            None => None,
        };
        for frame in waiting {
            send_frame(&mut link, &frame).await?;
            if charge(&mut tab, 1) == Verdict::Cutoff {
                return cut_off(&mut link).await;
            }
        }
        // A reconnect with the same key replaces the old session: dropping its sender ends it.
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(address, Session { generation, tx });
            metrics::gauge!(m::CLIENT_SESSIONS).set(sessions.len() as f64);
        }
        let idle = self.config.client_idle_timeout;
        let quiet = tokio::time::sleep(idle);
        tokio::pin!(quiet);
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                () = &mut quiet => {
                    crate::admit::refuse("client", "idle_timeout");
                    break Err("client idle");
                }
                out = rx.recv() => match out {
                    Some(frame) => {
                        if let Err(e) = send_frame(&mut link, &frame).await {
                            break Err(e);
                        }
                        if charge(&mut tab, 1) == Verdict::Cutoff {
                            break cut_off(&mut link).await;
                        }
                    }
                    None => break Ok(()),
                },
                msg = link.recv() => {
                    quiet.as_mut().reset(tokio::time::Instant::now() + idle);
                    match msg {
                        Ok(frame) => match self.on_client_frame(frame) {
                            ClientFrame::Done => {}
                            ClientFrame::Forwarded => {
                                if charge(&mut tab, 1) == Verdict::Cutoff {
                                    break cut_off(&mut link).await;
                                }
                            }
                            ClientFrame::Paid(value) => {
                                if let Some(tab) = &mut tab {
                                    tab.credit(value);
                                }
                            }
                            ClientFrame::Refused(reason) => {
                                let answer =
                                    Frame::Control(Control::PaymentRefused { reason }.encode());
                                if let Err(e) = send_frame(&mut link, &answer).await {
                                    break Err(e);
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
        link.close().await;
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
                let allowed = self
                    .links
                    .routes()
                    .read()
                    .map(|r| r.layer1.contains(&next_hop))
                    .unwrap_or(false);
                if !allowed {
                    drop_packet("first_hop_not_layer1");
                    // It still cost the gateway a frame.
                    return ClientFrame::Forwarded;
                }
                self.links.send(
                    next_hop,
                    &Frame::Packet {
                        key_epoch,
                        packet,
                        envelope,
                    },
                    Some(Instant::now()),
                );
                ClientFrame::Forwarded
            }
            Frame::Control(bytes) => match (Control::decode(&bytes), &self.billing) {
                (Ok(Control::Payment { ticket }), Some(billing)) => match billing.accept(&ticket) {
                    Ok(value) => ClientFrame::Paid(value),
                    Err(code) => ClientFrame::Refused(code),
                },
                // A gateway that charges nothing has nothing to take.
                (Ok(Control::Payment { .. }), None) => ClientFrame::Done,
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

/// Charges `frames` to the session's tab, if the gateway keeps one.
fn charge(tab: &mut Option<Tab>, frames: u64) -> Verdict {
    match tab {
        Some(tab) => tab.charge(frames),
        None => Verdict::Serve,
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
    use crate::client_link::{ClientLink, LinkFailure};

    /// A gateway relay on loopback (no directory, no payments) with `gateway` config lines.
    async fn gateway(extra: &str) -> (Arc<crate::Node>, CancellationToken, tempfile::TempDir) {
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

    fn delivery(to: Address, id: u8) -> FinalDelivery {
        FinalDelivery {
            destination: to,
            surb_id: [id; 16],
            payload: Box::new([id; PAYLOAD_SIZE]),
        }
    }

    /// The next Deliver frame's SURB id (other frames skipped), within a second.
    async fn next_delivery(link: &mut ClientLink) -> Result<u8, LinkFailure> {
        let wait = async {
            loop {
                if let Frame::Deliver { surb_id, .. } = link.recv().await? {
                    return Ok(surb_id[0]);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(1), wait)
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
        gw.deliver(delivery(victim_address, 9));
        let first = open(&node, &victim).await.unwrap();
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        gw.deliver(delivery(victim_address, 1));
        let mut link = open(&node, &victim).await.unwrap();
        assert_eq!(next_delivery(&mut link).await, Ok(1));

        // Another key naming the victim's address: closed without a welcome or a delivery.
        let attacker = LinkSecret::generate(&mut rand::rng());
        gw.deliver(delivery(victim_address, 2));
        for _ in 0..3 {
            let r = claim(addr, &gateway_key, &attacker, victim_address).await;
            assert_eq!(r, Err(LinkFailure::Closed), "the claim was answered");
        }
        gw.deliver(delivery(victim_address, 3));
        assert_eq!(next_delivery(&mut link).await, Ok(2));
        assert_eq!(next_delivery(&mut link).await, Ok(3));

        // With its own key the attacker gets its own session, never the victim's deliveries.
        let mut own = open(&node, &attacker).await.unwrap();
        gw.deliver(delivery(victim_address, 4));
        assert_eq!(next_delivery(&mut link).await, Ok(4));
        assert!(
            next_delivery(&mut own).await.is_err(),
            "the attacker got a delivery"
        );

        // The victim reconnecting with its key takes its session over; the old link ends.
        let mut again = open(&node, &victim).await.unwrap();
        gw.deliver(delivery(victim_address, 5));
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
