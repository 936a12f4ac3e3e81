//! Drives a [`ClientSession`] on its own thread.
//!
//! Building packets is CPU work (a few hundred microseconds of scalar multiplications per
//! packet and per reply block), so the session lives on a dedicated thread and never blocks
//! the async reactor. Everything talks to it through one bounded command queue; frames go
//! out through a bounded channel to the gateway link, and each stream gets its events on
//! its own channel.
//!
//! The send schedule runs on a second thread, the pacer's ([`Pacer`]): it only hands the
//! packets the session built ahead to the gateway link at their Poisson ticks, so however
//! long a packet takes to build, or the session thread waits for a core, the moments packets
//! leave stay those of the schedule. The session thread fills the pacer's stocks whenever a
//! tick took from them ([`Cmd::Refill`]).
//!
//! The Sphinx builds, packets' and reply blocks', are made on a pool of worker threads
//! ([`crate::builders`]); the session thread only makes their choices (routes, delays,
//! content, tickets).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use murmur_protocol::PAYLOAD_SIZE;
use murmur_protocol::cover::{Pacer, PacerStats, StockFill};
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

/// Reply blocks kept built ahead by the worker pool ([`crate::builders`]): 32 ms of a
/// download at λ_P = 400/s (five blocks a packet), and about 25 kB.
const PREBUILT_REPLY_BLOCKS: usize = 64;

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
    /// A tick took a packet from the pacer's stocks: build what they lack.
    Refill,
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
    /// Of those: dropped while [`DriverStats::to_pay`] was full, so never paid for.
    pub deliveries_dropped_unpaid: AtomicU64,
    /// The identifiers of dropped deliveries, for the session thread to pay for (the gateway
    /// charged them): at most [`MAX_DROPS_TO_PAY`].
    to_pay: Mutex<VecDeque<SurbId>>,
    /// What the worker pool built, and failed to.
    pub builders: Arc<crate::builders::BuilderStats>,
}

/// Dropped deliveries remembered for payment. At the session's fastest (a few thousand
/// deliveries a second) this is about a second of them.
const MAX_DROPS_TO_PAY: usize = 4096;

impl DriverStats {
    /// A delivery was dropped: remember it for payment if there is room.
    fn dropped(&self, surb_id: SurbId) {
        self.deliveries_dropped.fetch_add(1, Ordering::Relaxed);
        let kept = match self.to_pay.lock() {
            Ok(mut q) if q.len() < MAX_DROPS_TO_PAY => {
                q.push_back(surb_id);
                true
            }
            _ => false,
        };
        if !kept {
            self.deliveries_dropped_unpaid
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The dropped deliveries not yet paid for.
    fn take_dropped(&self) -> VecDeque<SurbId> {
        self.to_pay
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }
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

/// Most commands the session thread takes between two rounds of its loop (timers, the
/// gateway's payments, filling the pacer, the streams' events).
const MAX_BATCH: usize = 64;

/// How often the session thread copies its payer's accounts out for the status view (the
/// counters are copied every loop).
const PAYER_REPORT_EVERY: Duration = Duration::from_secs(1);

/// How often it measures its state's size for the status view.
const SIZE_REPORT_EVERY: Duration = Duration::from_millis(250);

/// Whether `every` has passed since `last` (or it never happened); if so, `last` is now.
fn due(last: &mut Option<StdInstant>, every: Duration) -> bool {
    let due = last.is_none_or(|at| at.elapsed() >= every);
    if due {
        *last = Some(StdInstant::now());
    }
    due
}

/// What the session thread reports of itself, for logs and the status view.
#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    pub stats: SessionStats,
    pub size: StateSize,
    /// `None` while the session does not pay.
    pub payer: Option<PayerView>,
    /// The test of the session's recent send gaps, made when the report is asked for.
    pub send_timing: Option<SendTimingReport>,
    /// The pacer's counters (ticks that found nothing built among them).
    pub pacer: Option<PacerStats>,
}

/// A handle to the session thread.
#[derive(Clone)]
pub struct SessionHandle {
    tx: Sender<Cmd>,
    /// Set to end the session. A flag, not a command: a full command queue must not be able
    /// to keep a session (and its thread) alive.
    stop: Arc<AtomicBool>,
    pub stats: Arc<DriverStats>,
    report: Arc<Mutex<SessionReport>>,
    /// The gaps the pacer sent at, and the pacer itself, read for reports.
    timing: Arc<Mutex<SendTiming>>,
    pacer: Option<Arc<Mutex<Pacer<Frame>>>>,
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
            timing: Arc::default(),
            pacer: None,
        }
    }

    /// Queues a command; `false` if the queue is full or the session stopped.
    pub fn send(&self, cmd: Cmd) -> bool {
        match self.tx.try_send(cmd) {
            Ok(()) => true,
            Err(TrySendError::Full(Cmd::Delivery { surb_id, .. })) => {
                self.stats.dropped(surb_id);
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

    /// The session's counters, state size and payer, as last reported, with the test of
    /// the recent send gaps made now.
    pub fn report(&self) -> SessionReport {
        let mut report = self.report.lock().map(|s| s.clone()).unwrap_or_default();
        // A copy, so the pacer's next send does not wait for the test (a sort of 4,096 gaps).
        let timing = self.timing.lock().map(|t| t.clone()).ok();
        report.send_timing = timing.map(|t| t.report());
        report.pacer = self
            .pacer
            .as_ref()
            .and_then(|p| p.lock().ok().map(|p| p.stats()));
        report
    }
}

/// Starts the session thread and its pacer. Frames to send go to `frames`. The session
/// thread returns the session when it ends (and the pacer ends with it), so what it owes
/// relays can pass to the next one.
pub fn spawn(
    mut session: ClientSession,
    frames: mpsc::Sender<Frame>,
) -> std::io::Result<(SessionHandle, std::thread::JoinHandle<ClientSession>)> {
    // The session's clock starts at zero when the proxy creates it (`Instant::ZERO`); both
    // threads read the same clock.
    let origin = StdInstant::now();
    let pacer = Pacer::new(
        session.send_rates(),
        Instant::from_elapsed(origin.elapsed()),
        &mut rand::rng(),
    )
    .map_err(|e| std::io::Error::other(format!("the send schedule: {e}")))?;
    session.set_paced();
    let pacer = Arc::new(Mutex::new(pacer));
    let stats = Arc::new(DriverStats::default());
    let builders = crate::builders::Builders::spawn(
        PREBUILT_REPLY_BLOCKS,
        pacer.clone(),
        stats.builders.clone(),
    )?;
    session.prebuild_reply_blocks(PREBUILT_REPLY_BLOCKS);
    let (tx, rx) = crossbeam_channel::bounded(COMMAND_QUEUE);
    let report = Arc::new(Mutex::new(SessionReport::default()));
    let timing = Arc::new(Mutex::new(SendTiming::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let handle = SessionHandle {
        tx: tx.clone(),
        stop: stop.clone(),
        stats: stats.clone(),
        report: report.clone(),
        timing: timing.clone(),
        pacer: Some(pacer.clone()),
    };
    let pacing = Pacing {
        pacer: pacer.clone(),
        timing,
        frames: frames.clone(),
        wake: tx,
        stop: stop.clone(),
        stats: stats.clone(),
        origin,
    };
    std::thread::Builder::new()
        .name("murmur-pacer".into())
        .spawn(move || pacing.run())?;
    let session_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("murmur-session".into())
        .spawn(move || {
            let stop = session_stop;
            let threads = SessionThread {
                pacer,
                builders,
                frames,
                stats,
                report,
                origin,
            };
            let session = threads.run(session, rx, &stop);
            // The pacer ends with the session.
            stop.store(true, Ordering::Relaxed);
            session
        });
    if thread.is_err() {
        // No session to fill the stocks: the pacer has nothing to do.
        stop.store(true, Ordering::Relaxed);
    }
    Ok((handle, thread?))
}

/// The longest the pacer sleeps between looks at the stop flag.
const PACER_NAP: Duration = Duration::from_millis(50);

/// The pacer's thread: it sends what the schedule's ticks take from the stocks, and does
/// nothing else, so nothing the session does can delay a tick.
struct Pacing {
    pacer: Arc<Mutex<Pacer<Frame>>>,
    timing: Arc<Mutex<SendTiming>>,
    frames: mpsc::Sender<Frame>,
    /// Tells the session thread the stocks need filling.
    wake: Sender<Cmd>,
    stop: Arc<AtomicBool>,
    stats: Arc<DriverStats>,
    origin: StdInstant,
}

/// The pacer's real-time priority where the system grants one (`SCHED_FIFO`, 1–99): low, above
/// every ordinary thread and below the kernel's own.
const PACER_RT_PRIORITY: u8 = 10;

/// Puts the calling thread (the pacer's) first in line for a core: `SCHED_FIFO` at
/// [`PACER_RT_PRIORITY`]. A tick's work is a channel send, so the thread holds a core for
/// microseconds and sleeps until the next tick; but while the machine is busy (building
/// packets, a browser, a local network on two cores) an ordinary thread wakes a millisecond
/// or more late, which at λ_P = 400/s is a third of the mean gap and bends the send
/// schedule away from Poisson where an observer can measure it. Needs `CAP_SYS_NICE` or an
/// `RLIMIT_RTPRIO` that allows it (`ulimit -r`; rtkit's budget for audio): without, the
/// pacer runs as an ordinary thread and says so. The kernel's real-time throttling keeps a
/// share of every core for other threads whatever happens.
fn prioritise_pacer() -> std::result::Result<(), String> {
    #[cfg(unix)]
    {
        use thread_priority::unix::{
            RealtimeThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id,
        };
        use thread_priority::{ThreadPriority, ThreadPriorityValue};
        let value = ThreadPriorityValue::try_from(PACER_RT_PRIORITY).map_err(|e| e.to_string())?;
        set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Crossplatform(value),
            ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
        )
        .map_err(|e| format!("{e:?}"))
    }
    #[cfg(not(unix))]
    {
        Err("real-time scheduling is set only on Unix".to_owned())
    }
}

impl Pacing {
    fn run(self) {
        match prioritise_pacer() {
            Ok(()) => tracing::debug!("the pacer runs at real-time priority"),
            Err(e) => tracing::info!(
                error = %e,
                "the pacer runs at ordinary priority (no real-time scheduling allowed): its send \
                 times may lag the schedule while the machine is busy"
            ),
        }
        let now = || Instant::from_elapsed(self.origin.elapsed());
        let mut rng = rand::rng();
        let mut due = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let t = now();
            let (next, rate) = {
                let Ok(mut pacer) = self.pacer.lock() else {
                    return;
                };
                while let Some(frame) = pacer.poll_transmit(t, &mut rng) {
                    due.push(frame);
                }
                (pacer.poll_timeout(), pacer.rate_per_s())
            };
            let sent = !due.is_empty();
            for frame in due.drain(..) {
                let handed = self.frames.try_send(frame).is_ok();
                // When it is handed over, not the tick: the link's observer sees when
                // packets leave.
                let at = now();
                let Ok(mut timing) = self.timing.lock() else {
                    return;
                };
                if handed {
                    timing.sent(at, rate);
                } else {
                    // The gateway link is down or slow: the packet is lost like any other,
                    // and the session's ARQ re-sends real ones. The gap it leaves is the
                    // link's, not the schedule's.
                    self.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                    timing.restart();
                }
            }
            if sent {
                // A full queue means the session has work queued and will look anyway.
                let _ = self.wake.try_send(Cmd::Refill);
            }
            let nap = next.map_or(PACER_NAP, |n| {
                n.saturating_duration_since(now()).min(PACER_NAP)
            });
            if !nap.is_zero() {
                std::thread::sleep(nap);
            }
        }
    }
}

/// Makes what the pacer's stocks lack, most urgent first, until they are full or nothing
/// more can be made now (one [`StockFill`] round): the session makes each packet's choices
/// and the worker pool builds it.
fn fill_stocks<R: rand::CryptoRng + ?Sized>(
    session: &mut ClientSession,
    pacer: &Mutex<Pacer<Frame>>,
    builders: &crate::builders::Builders,
    now: impl Fn() -> Instant,
    rng: &mut R,
) {
    let Some(mut fill) = pacer.lock().ok().map(|p| StockFill::new(&p)) else {
        return;
    };
    loop {
        // A statement of its own, so the lock is released before building: the pacer's
        // ticks do not wait for it (and `push` takes it again).
        let wants = pacer.lock().ok().map(|p| p.wants());
        let Some(stock) = wants.and_then(|w| fill.next(w)) else {
            return;
        };
        match session.build_ahead_job(stock, now(), rng) {
            Some(job) => builders.seal(stock, job, rng),
            // No message waits: the cover stocks may still want filling.
            None if fill.nothing_built(stock) => {}
            // No route for cover now: try at the next wake-up.
            None => return,
        }
    }
}

/// What the session thread shares with the rest of the client.
struct SessionThread {
    pacer: Arc<Mutex<Pacer<Frame>>>,
    builders: crate::builders::Builders,
    frames: mpsc::Sender<Frame>,
    stats: Arc<DriverStats>,
    report: Arc<Mutex<SessionReport>>,
    origin: StdInstant,
}

impl SessionThread {
    /// Hands the gateway's payments to its link. Paced, the session transmits nothing
    /// else itself; they are unscheduled, so not in the send timing.
    fn send_payments<R: rand::CryptoRng + ?Sized>(
        &self,
        session: &mut ClientSession,
        now: Instant,
        rng: &mut R,
    ) {
        while let Some(frame) = session.poll_transmit(now, rng) {
            if self.frames.try_send(frame).is_err() {
                self.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn run(
        self,
        mut session: ClientSession,
        rx: Receiver<Cmd>,
        stop: &AtomicBool,
    ) -> ClientSession {
        let origin = self.origin;
        let now = || Instant::from_elapsed(origin.elapsed());
        let mut rng = rand::rng();
        let mut streams: HashMap<StreamId, mpsc::UnboundedSender<Event>> = HashMap::new();
        let mut payer_reported: Option<StdInstant> = None;
        let mut size_reported: Option<StdInstant> = None;
        let mut spend_cap_logged = false;
        let mut rates = session.send_rates();
        while !stop.load(Ordering::Relaxed) {
            let t = now();
            session.handle_timeout(t);
            for surb_id in self.stats.take_dropped() {
                session.delivery_dropped(surb_id, t, &mut rng);
            }
            self.send_payments(&mut session, t, &mut rng);
            self.builders.exchange(&mut session, &mut rng);
            fill_stocks(&mut session, &self.pacer, &self.builders, now, &mut rng);
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
            if let Ok(mut r) = self.report.lock() {
                r.stats = session.stats();
                // Walks every map the session keeps: not at every wake-up (thousands a
                // second in a download).
                if due(&mut size_reported, SIZE_REPORT_EVERY) {
                    r.size = session.state_size();
                }
                if due(&mut payer_reported, PAYER_REPORT_EVERY) {
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
            // Take what is queued before polling again.
            let mut next = Some(cmd);
            let mut batched = 0;
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
                            // Said once: every later open meets the same cap (the status
                            // says it too, and counts the refusals).
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
                        let new = session.send_rates();
                        if new != rates {
                            rates = new;
                            let set = self
                                .pacer
                                .lock()
                                .map(|mut p| p.set_rates(rates, now(), &mut rng));
                            if let Ok(Err(e)) = set {
                                tracing::warn!(error = %e, "new send rates not applied");
                            }
                        }
                    }
                    Cmd::Pot { balance, face_cap } => {
                        session.set_pot(balance, face_cap, now(), murmur_directory::unix_now())
                    }
                    Cmd::Refill => {}
                }
                // The gateway charges for each reply it delivers: the payments a burst of
                // deliveries owes go now, not after the batch, or the gateway's tab runs
                // ahead of them and it cuts the client off.
                self.send_payments(&mut session, now(), &mut rng);
                // A long batch (a burst of deliveries) must not leave the ticks without
                // cover: fill as soon as the drop stock runs dry.
                if self.pacer.lock().is_ok_and(|p| p.wants().none_left) {
                    fill_stocks(&mut session, &self.pacer, &self.builders, now, &mut rng);
                }
                // Nor hold back the streams' events and the real packets the loop above
                // builds for long.
                batched += 1;
                if batched >= MAX_BATCH {
                    break;
                }
                next = rx.try_recv().ok();
            }
        }
        session
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delivery the full queue refuses is remembered for payment (the gateway charged it),
    /// up to the bound; past it, the drop is counted as unpaid, never lost silently.
    #[test]
    fn dropped_deliveries_are_kept_for_payment_up_to_the_bound() {
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let handle = SessionHandle {
            tx,
            ..SessionHandle::detached()
        };
        let delivery = |i: u32| Cmd::Delivery {
            surb_id: {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_le_bytes());
                id
            },
            payload: Box::new([0; PAYLOAD_SIZE]),
        };
        assert!(handle.send(delivery(0)), "the queue takes one");
        let extra = 10;
        for i in 1..=(MAX_DROPS_TO_PAY as u32 + extra) {
            assert!(!handle.send(delivery(i)));
        }
        let stats = &handle.stats;
        let dropped = MAX_DROPS_TO_PAY as u64 + u64::from(extra);
        assert_eq!(stats.deliveries_dropped.load(Ordering::Relaxed), dropped);
        assert_eq!(
            stats.deliveries_dropped_unpaid.load(Ordering::Relaxed),
            u64::from(extra)
        );
        let to_pay = stats.take_dropped();
        assert_eq!(to_pay.len(), MAX_DROPS_TO_PAY);
        assert_eq!(to_pay.front().map(|id| id[0]), Some(1));
        assert!(stats.take_dropped().is_empty(), "each is paid once");
    }
}
