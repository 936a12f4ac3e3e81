//! Drives a [`ClientSession`] on its own thread.
//!
//! Building packets is CPU work (a few hundred microseconds of scalar multiplications per
//! packet and per reply block), so the session lives on a dedicated thread and never blocks
//! the async reactor. Everything talks to it through one bounded command queue; frames go
//! out through a bounded channel to the gateway link, and each stream gets its events on
//! its own channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant as StdInstant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use murmur_protocol::PAYLOAD_SIZE;
use murmur_protocol::directory::Consensus;
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::frame::Frame;
use murmur_protocol::packet::SurbId;
use murmur_protocol::payer::{PayeeAccount, PayerStats};
use murmur_protocol::send_timing::{SendTiming, SendTimingReport};
use murmur_protocol::session::{ClientSession, Event, SessionError, SessionStats, StateSize};
use murmur_protocol::stream::{StreamId, Target};
use murmur_protocol::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Commands queued at once; a full queue drops deliveries (counted) and refuses opens.
const COMMAND_QUEUE: usize = 16_384;

/// What the rest of the client asks of the session.
pub enum Cmd {
    Open {
        target: Target,
        isolation: Option<(Vec<u8>, Vec<u8>)>,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<StreamId, SessionError>>,
    },
    Write {
        stream: StreamId,
        bytes: Vec<u8>,
        reply: oneshot::Sender<usize>,
    },
    Consumed {
        stream: StreamId,
        n: usize,
    },
    Close {
        stream: StreamId,
    },
    Abort {
        stream: StreamId,
    },
    Delivery {
        surb_id: SurbId,
        payload: Box<[u8; PAYLOAD_SIZE]>,
    },
    Consensus(Arc<Consensus>),
    /// What the ledger says of the pot: the balance tickets may draw on and the largest
    /// face value it covers.
    Pot {
        balance: u64,
        face_cap: u64,
    },
}

/// Counters the driver keeps besides the session's own.
#[derive(Default)]
pub struct DriverStats {
    pub frames_dropped: AtomicU64,
    /// Attempts to reach the gateway that failed (any reason, the next two included).
    pub gateway_connect_failures: AtomicU64,
    /// Of those: the gateway did not prove the link key the consensus lists for it.
    pub gateway_key_refused: AtomicU64,
    pub deliveries_dropped: AtomicU64,
}

/// What the session's payer has paid and owes, as of the session's last report.
#[derive(Clone, Debug, Default)]
pub struct PayerView {
    pub stats: PayerStats,
    /// The payer's estimate of what the pot can still pay.
    pub pot_usable: u64,
    /// Per relay, sorted by identity.
    pub accounts: Vec<(IdentityKey, PayeeAccount)>,
}

/// How often the session thread copies its payer's accounts out for the status view and
/// tests its send gaps (the counters are copied every loop).
const PAYER_REPORT_EVERY: Duration = Duration::from_secs(1);

/// What the session thread reports of itself, for logs and the status view.
#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    pub stats: SessionStats,
    pub size: StateSize,
    /// `None` while the session does not pay.
    pub payer: Option<PayerView>,
    /// The test of the session's recent send gaps; `None` before the first report.
    pub send_timing: Option<SendTimingReport>,
}

/// A handle to the session thread.
#[derive(Clone)]
pub struct SessionHandle {
    tx: Sender<Cmd>,
    /// Set to end the session. A flag, not a command: a full command queue must not be able
    /// to keep a session (and its thread) alive.
    stop: Arc<AtomicBool>,
    pub stats: Arc<DriverStats>,
    report: Arc<std::sync::Mutex<SessionReport>>,
}

impl SessionHandle {
    /// A handle to no session: every command is refused (for tests of the proxies' accept
    /// loop, whose connections never get as far as a session).
    #[cfg(test)]
    pub(crate) fn detached() -> SessionHandle {
        let (tx, _) = crossbeam_channel::bounded(1);
        SessionHandle {
            tx,
            stop: Arc::new(AtomicBool::new(true)),
            stats: Arc::default(),
            report: Arc::default(),
        }
    }

    /// Queues a command; `false` if the queue is full or the session stopped.
    pub fn send(&self, cmd: Cmd) -> bool {
        match self.tx.try_send(cmd) {
            Ok(()) => true,
            Err(TrySendError::Full(Cmd::Delivery { .. })) => {
                self.stats
                    .deliveries_dropped
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(_) => false,
        }
    }

    /// Ends the session; its thread exits within one loop (at most 100 ms).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The session's counters, as of its last loop.
    pub fn session_stats(&self) -> SessionStats {
        self.report.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// The session's counters, state size and payer, as last reported.
    pub fn report(&self) -> SessionReport {
        self.report.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Starts the session thread. Frames to send go to `frames`. The thread returns the session
/// when it ends, so what it owes relays can pass to the next one.
pub fn spawn(
    session: ClientSession,
    frames: mpsc::Sender<Frame>,
) -> std::io::Result<(SessionHandle, std::thread::JoinHandle<ClientSession>)> {
    let (tx, rx) = crossbeam_channel::bounded(COMMAND_QUEUE);
    let stats = Arc::new(DriverStats::default());
    let report = Arc::new(std::sync::Mutex::new(SessionReport::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let handle = SessionHandle {
        tx,
        stop: stop.clone(),
        stats: stats.clone(),
        report: report.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("murmur-session".into())
        .spawn(move || run(session, rx, frames, stop, stats, report))?;
    Ok((handle, thread))
}

fn run(
    mut session: ClientSession,
    rx: Receiver<Cmd>,
    frames: mpsc::Sender<Frame>,
    stop: Arc<AtomicBool>,
    stats: Arc<DriverStats>,
    report: Arc<std::sync::Mutex<SessionReport>>,
) -> ClientSession {
    // The session's clock starts at zero when the proxy creates it (`Instant::ZERO`).
    let origin = StdInstant::now();
    let now = || Instant::from_elapsed(origin.elapsed());
    let mut rng = rand::rng();
    let mut streams: HashMap<StreamId, mpsc::UnboundedSender<Event>> = HashMap::new();
    let mut payer_reported: Option<StdInstant> = None;
    let mut send_timing = SendTiming::default();
    let mut spend_cap_logged = false;
    while !stop.load(Ordering::Relaxed) {
        let t = now();
        session.handle_timeout(t);
        while let Some(frame) = session.poll_transmit(t, &mut rng) {
            let scheduled = !matches!(frame, Frame::Control(_));
            if frames.try_send(frame).is_err() {
                // The gateway link is down or slow: the packet is lost like any other, and
                // the session's ARQ re-sends real ones. The gap it leaves is the link's, not
                // the schedule's.
                stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                send_timing.restart();
            } else if scheduled {
                // When it is handed over, not `t`: building each packet takes time, and the
                // link's observer sees when packets leave.
                send_timing.sent(now(), session.send_rate());
            }
        }
        while let Some(event) = session.poll_event() {
            let id = event.stream();
            let ends = event.ends_stream();
            if let Event::Failed(_, why) = &event {
                tracing::debug!(reason = why.label(), "stream failed: {why}");
            }
            if let Some(tx) = streams.get(&id)
                && tx.send(event).is_err()
            {
                // The application is gone.
                streams.remove(&id);
                session.abort_stream(id);
                continue;
            }
            if ends {
                streams.remove(&id);
            }
        }
        if let Ok(mut r) = report.lock() {
            r.stats = session.stats();
            r.size = session.state_size();
            if payer_reported.is_none_or(|at| at.elapsed() >= PAYER_REPORT_EVERY) {
                payer_reported = Some(StdInstant::now());
                r.send_timing = Some(send_timing.report());
                r.payer = session.payer().map(|p| {
                    let mut accounts: Vec<_> = p.accounts().map(|(k, a)| (*k, *a)).collect();
                    accounts.sort_by_key(|(k, _)| *k);
                    PayerView {
                        stats: p.stats(),
                        pot_usable: p.pot_usable(),
                        accounts,
                    }
                });
            }
        }
        let wait = session
            .poll_timeout()
            .map_or(Duration::from_millis(100), |d| {
                d.saturating_duration_since(now())
            })
            .min(Duration::from_millis(100));
        let cmd = match rx.recv_timeout(wait) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return session,
        };
        // Take everything queued before polling again.
        let mut next = Some(cmd);
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Open {
                    target,
                    isolation,
                    events,
                    reply,
                } => {
                    let result = session.open_stream(target, isolation, &mut rng);
                    match &result {
                        Ok(id) => {
                            streams.insert(*id, events);
                        }
                        // Said once: every later open meets the same cap (the status says
                        // it too, and counts the refusals).
                        Err(e @ SessionError::SpendLimit { .. }) if !spend_cap_logged => {
                            spend_cap_logged = true;
                            tracing::warn!("{e}");
                        }
                        Err(_) => {}
                    }
                    let _ = reply.send(result);
                }
                Cmd::Write {
                    stream,
                    bytes,
                    reply,
                } => {
                    let _ = reply.send(session.write(stream, &bytes));
                }
                Cmd::Consumed { stream, n } => session.consumed(stream, n),
                Cmd::Close { stream } => session.close_stream(stream),
                Cmd::Abort { stream } => {
                    streams.remove(&stream);
                    session.abort_stream(stream);
                }
                Cmd::Delivery { surb_id, payload } => {
                    session.handle_delivery(surb_id, &payload[..], now(), &mut rng)
                }
                Cmd::Consensus(c) => {
                    if let Err(e) = session.set_consensus(c, now(), &mut rng) {
                        tracing::warn!(error = %e, "new consensus not applied");
                    }
                }
                Cmd::Pot { balance, face_cap } => {
                    session.set_pot(balance, face_cap, now(), murmur_directory::unix_now())
                }
            }
            next = rx.try_recv().ok();
        }
    }
    session
}
