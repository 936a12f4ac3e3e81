//! The gateway role: client sessions over WebSocket.
//!
//! A client opens a WebSocket, sends `Hello { address }` in a control frame, then sends
//! `Forward` frames that the gateway passes to layer-1 mixes unchanged (it cannot read them).
//! Packets whose final hop is this gateway and whose destination is a client's address are
//! delivered down that client's WebSocket as `Deliver` frames; while the client is away they
//! wait in a bounded inbox for a while, so a brief disconnection loses nothing.
//!
//! A gateway that takes payments ([`Billing`]) keeps a [`Tab`] per session: each `Forward`
//! frame from the client and each `Deliver` frame to it costs the gateway's price, each
//! ticket the client sends in a `Payment` control frame is checked like a hop's ticket and
//! credits its expected value, and a client whose arrears pass the tab's limit is told
//! `Cutoff` and disconnected. A refused ticket is answered with `PaymentRefused`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use murmur_protocol::control::{Control, refusal};
use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::packet::{Address, FinalDelivery};
use murmur_protocol::tab::{Tab, TabConfig, Verdict};
use murmur_protocol::ticket::Ticket;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::GatewaySection;
use crate::keys::KeyRing;
use crate::links::Links;
use crate::metrics::{self as m, drop_packet};
use crate::payments::{PaymentRefusal, Payments};

/// How long a client has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

struct Session {
    generation: u64,
    tx: mpsc::Sender<Frame>,
}

struct Inbox {
    frames: VecDeque<Frame>,
    expires: Instant,
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
    links: Arc<Links>,
    billing: Option<Billing>,
    sessions: Mutex<HashMap<Address, Session>>,
    inboxes: Mutex<HashMap<Address, Inbox>>,
    next_generation: AtomicU64,
}

impl Gateway {
    pub fn new(
        config: GatewaySection,
        links: Arc<Links>,
        billing: Option<Billing>,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            config,
            links,
            billing,
            sessions: Mutex::new(HashMap::new()),
            inboxes: Mutex::new(HashMap::new()),
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

    fn keep(&self, to: Address, frame: Frame) {
        let Ok(mut inboxes) = self.inboxes.lock() else {
            return;
        };
        let now = Instant::now();
        if !inboxes.contains_key(&to) {
            if inboxes.len() >= self.config.max_clients {
                inboxes.retain(|_, i| i.expires > now);
            }
            if inboxes.len() >= self.config.max_clients {
                drop_packet("inbox_limit");
                return;
            }
        }
        let inbox = inboxes.entry(to).or_insert_with(|| Inbox {
            frames: VecDeque::new(),
            expires: now + self.config.inbox_ttl,
        });
        if inbox.frames.len() >= self.config.inbox_packets {
            drop_packet("inbox_full");
            return;
        }
        inbox.frames.push_back(frame);
        metrics::counter!(m::FINAL_DELIVERED, "to" => "inbox").increment(1);
    }

    /// Drops expired inboxes.
    pub fn sweep(&self) {
        let now = Instant::now();
        if let Ok(mut inboxes) = self.inboxes.lock() {
            let before: usize = inboxes.values().map(|i| i.frames.len()).sum();
            inboxes.retain(|_, i| i.expires > now);
            let after: usize = inboxes.values().map(|i| i.frames.len()).sum();
            for _ in after..before {
                drop_packet("inbox_expired");
            }
        }
    }

    /// Accepts client WebSockets until shutdown.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let slots = Arc::new(Semaphore::new(self.config.max_clients));
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
            let (stream, _peer): (TcpStream, SocketAddr) = tokio::select! {
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
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                drop_packet("client_limit");
                continue;
            };
            let gw = self.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                if let Err(reason) = gw.session(stream, shutdown).await {
                    tracing::debug!(reason, "client session ended");
                }
            });
        }
    }

    async fn session(
        self: Arc<Self>,
        stream: TcpStream,
        shutdown: CancellationToken,
    ) -> Result<(), &'static str> {
        let _ = stream.set_nodelay(true);
        let config = WebSocketConfig::default()
            .max_message_size(Some(FRAME_LEN))
            .max_frame_size(Some(FRAME_LEN));
        let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config))
            .await
            .map_err(|_| "websocket handshake failed")?;
        let hello = tokio::time::timeout(HELLO_TIMEOUT, ws.next())
            .await
            .map_err(|_| "no hello")?;
        let address = match hello {
            Some(Ok(Message::Binary(bytes))) => match Frame::decode(&bytes) {
                Ok(Frame::Control(c)) => match Control::decode(&c) {
                    Ok(Control::Hello { address }) => address,
                    _ => return Err("first control message was not hello"),
                },
                _ => return Err("first frame was not a control frame"),
            },
            _ => return Err("no hello"),
        };
        let (tx, mut rx) = mpsc::channel::<Frame>(self.config.client_queue);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // Queue what waited in the inbox, then make the session visible to deliveries.
        let waiting = self
            .inboxes
            .lock()
            .ok()
            .and_then(|mut i| i.remove(&address))
            .map(|i| i.frames)
            .unwrap_or_default();
        let welcome = Frame::Control(
            Control::Welcome {
                queued: u32::try_from(waiting.len()).unwrap_or(u32::MAX),
            }
            .encode(),
        );
        send_frame(&mut ws, &welcome).await?;
        // A client's tab lasts as long as its session: a client that reconnects starts with
        // the initial credit again (bounded by `max_clients` sessions at once).
        let mut tab = match &self.billing {
            Some(b) => Some(Tab::new(b.tab).map_err(|_| "invalid tab configuration")?),
            None => None,
        };
        for frame in waiting {
            send_frame(&mut ws, &frame).await?;
            if charge(&mut tab, 1) == Verdict::Cutoff {
                return cut_off(&mut ws).await;
            }
        }
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(address, Session { generation, tx });
            metrics::gauge!(m::CLIENT_SESSIONS).set(sessions.len() as f64);
        }
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                out = rx.recv() => match out {
                    Some(frame) => {
                        if let Err(e) = send_frame(&mut ws, &frame).await {
                            break Err(e);
                        }
                        if charge(&mut tab, 1) == Verdict::Cutoff {
                            break cut_off(&mut ws).await;
                        }
                    }
                    None => break Ok(()),
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(bytes))) => match self.on_client_frame(&bytes) {
                        ClientFrame::Done => {}
                        ClientFrame::Forwarded => {
                            if charge(&mut tab, 1) == Verdict::Cutoff {
                                break cut_off(&mut ws).await;
                            }
                        }
                        ClientFrame::Paid(value) => {
                            if let Some(tab) = &mut tab {
                                tab.credit(value);
                            }
                        }
                        ClientFrame::Refused(reason) => {
                            let answer = Frame::Control(Control::PaymentRefused { reason }.encode());
                            if let Err(e) = send_frame(&mut ws, &answer).await {
                                break Err(e);
                            }
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break Ok(()),
                    Some(Ok(_)) => {
                        drop_packet("client_text_message");
                        break Err("client sent a non-binary message");
                    }
                    Some(Err(_)) => break Err("websocket error"),
                },
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
        let _ = ws.close(None).await;
        result
    }

    fn on_client_frame(&self, bytes: &[u8]) -> ClientFrame {
        match Frame::decode(bytes) {
            Ok(Frame::Forward {
                next_hop,
                key_epoch,
                packet,
                envelope,
            }) => {
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
            Ok(Frame::Control(bytes)) => match (Control::decode(&bytes), &self.billing) {
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
            Ok(_) => {
                drop_packet("unexpected_frame");
                ClientFrame::Done
            }
            Err(e) => {
                drop_packet(e.label());
                ClientFrame::Done
            }
        }
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
async fn cut_off<S>(ws: &mut S) -> Result<(), &'static str>
where
    S: futures_util::Sink<Message> + Unpin,
{
    metrics::counter!(m::CLIENTS_CUT_OFF).increment(1);
    let _ = send_frame(ws, &Frame::Control(Control::Cutoff.encode())).await;
    Err("client in arrears: cut off")
}

async fn send_frame<S>(ws: &mut S, frame: &Frame) -> Result<(), &'static str>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let bytes = frame.encode().map_err(|_| "frame encode")?;
    ws.send(Message::Binary(bytes.to_vec().into()))
        .await
        .map_err(|_| "websocket send failed")
}
