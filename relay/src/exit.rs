//! The exit role: the last Sphinx hop of clients' forward packets.
//!
//! For each data packet the exit first acknowledges it with the SURB-ACK it carries, then
//! reassembles the client's message and acts on its items: open a TCP connection where the
//! exit policy allows (host names are resolved here and every resolved address is checked),
//! write the client's data in order, and stream the destination's answers back through the
//! client's reply blocks. Answers stay in a [`SendBuffer`] until the client acknowledges them
//! and are re-sent if it does not in time. One task per session sends replies ("the pump");
//! one task per stream direction moves bytes to and from TCP.
//!
//! Everything is bounded, in total and per client session, so that one client cannot take
//! what the others need: sessions; streams (`exit.max_streams`, and per session
//! `max_streams_per_session`); bytes held for streams (`max_buffered_bytes`, per session
//! `max_session_buffered_bytes`, per stream the window); reply blocks; messages in
//! reassembly (each fragment names its session). Each per-session bound is at most the
//! global one over [`FULL_SESSIONS`], so that many sessions at their limits still fit. A
//! stream is closed when it moved fewer than `idle_progress_bytes` in `idle_timeout` (a
//! trickle is not progress) and at `stream_lifetime` in any case. Every refusal is counted
//! under `murmur_relay_exit_refused_total{reason}`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use murmur_protocol::directory::{Epoch, ExitPolicy};
use murmur_protocol::envelope::Envelope;
use murmur_protocol::fragment::{
    Assembled, Fragment, OWNER_BYTES, OWNER_MESSAGES, Reassembler, ReassemblyLimits,
};
use murmur_protocol::frame::Frame;
use murmur_protocol::payload::{Content, REPLY_FRAGMENT_DATA_LEN};
use murmur_protocol::stream::{
    ClientItem, ClientMessage, DATA_ITEM_OVERHEAD, EXIT_MESSAGE_OVERHEAD, ExitItem, ExitMessage,
    RecvBuffer, Refusal, SendBuffer, StreamId, Target, join_client_message, session_of_fragment,
};
use murmur_protocol::surb::ReplyBlock;
use murmur_protocol::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ExitSection;
use crate::links::Links;
use crate::metrics::{self as m, drop_packet};

/// Bytes each stream may have in flight in each direction.
pub const STREAM_WINDOW: usize = 512 * 1024;
/// The global bounds hold this many sessions at their per-session limits at once.
pub const FULL_SESSIONS: usize = 16;
/// Reply blocks kept in all (400 bytes each: 26 MB).
const MAX_SURBS_TOTAL: usize = 65_536;
/// Reply blocks kept per session.
const MAX_SURBS: usize = MAX_SURBS_TOTAL / FULL_SESSIONS;
/// How often a stream's lifetime and progress are checked, at most.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Below this many reply blocks the exit asks for more.
const SURBS_LOW: usize = 16;
/// Sessions at once.
const MAX_SESSIONS: usize = 4096;
/// A session with no stream is forgotten after this long.
const SESSION_IDLE: Duration = Duration::from_secs(600);
/// Reply data not acknowledged within this is re-sent, until round trips are measured.
const REPLY_RTO: Duration = Duration::from_secs(3);
/// How many times each new stream ack is sent.
const ACK_REPEATS: u8 = 3;

/// The exit service.
pub struct Exit {
    policy: ExitPolicy,
    config: ExitSection,
    links: Arc<Links>,
    reassembler: Mutex<Reassembler>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    open_streams: Arc<AtomicUsize>,
    /// Stream bytes held across sessions (each session's share is in its state).
    buffered: AtomicUsize,
    /// Reply blocks held across sessions.
    surbs_held: AtomicUsize,
    origin: StdInstant,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The oldest key epoch whose reply blocks are still usable.
    oldest_epoch: std::sync::atomic::AtomicU32,
}

struct Session {
    id: u64,
    state: Mutex<SessionState>,
    wake: Notify,
}

#[derive(Default)]
struct SessionState {
    surbs: VecDeque<ReplyBlock>,
    streams: HashMap<StreamId, StreamState>,
    /// Items to send before any data.
    control: Vec<ExitItem>,
    asked_for_surbs: bool,
    last_active: Option<StdInstant>,
    /// Streams that ended recently and how: a re-sent open for one gets the same answer
    /// instead of a second connection.
    ended: VecDeque<(StreamId, ExitItem)>,
    /// Stream bytes this session holds (the sum of [`StreamState::held`]).
    buffered: usize,
}

/// Ended streams remembered per session.
const ENDED_MEMORY: usize = 256;

impl SessionState {
    fn end(&mut self, stream: StreamId, item: ExitItem) {
        if self.ended.len() >= ENDED_MEMORY {
            self.ended.pop_front();
        }
        self.ended.push_back((stream, item.clone()));
        self.control.push(item);
    }
}

struct StreamState {
    /// Client → destination, in order.
    recv: RecvBuffer,
    /// Destination → client, until acknowledged.
    send: SendBuffer,
    /// Bytes handed to the writer task and not yet written.
    queued_to_write: usize,
    /// Offset the destination has been sent up to (the exit's stream ack).
    written: u64,
    /// The exit's stream ack is due (new data written), or due again: acks ride on
    /// unacknowledged reply packets, so each change is sent a few times, RTO apart.
    ack_resends_left: u8,
    ack_sent_at: Option<Instant>,
    /// When the end-of-data item was last sent; the client acknowledges it with an `Ack`
    /// one past the end (a FIN takes a sequence number, as in TCP).
    fin_sent_at: Option<Instant>,
    fin_acked: bool,
    /// The TCP connection is up.
    connected: bool,
    writer: Option<mpsc::UnboundedSender<WriterCmd>>,
    /// Wakes the reader when the send buffer has room again.
    room: Arc<Notify>,
    cancel: CancellationToken,
    /// Bytes written to the destination plus bytes the client acknowledged: the work done.
    progress: u64,
}

impl StreamState {
    /// A stream not connected yet, whose client data goes to `writer`.
    fn new(
        writer: Option<mpsc::UnboundedSender<WriterCmd>>,
        room: Arc<Notify>,
        cancel: CancellationToken,
    ) -> Self {
        StreamState {
            recv: RecvBuffer::new(STREAM_WINDOW),
            send: SendBuffer::new(STREAM_WINDOW, REPLY_RTO),
            queued_to_write: 0,
            written: 0,
            ack_resends_left: 0,
            ack_sent_at: None,
            fin_sent_at: None,
            fin_acked: false,
            connected: false,
            writer,
            room,
            cancel,
            progress: 0,
        }
    }

    /// Bytes this stream holds: replies until acknowledged, client data until written.
    fn held(&self) -> usize {
        self.send.unacked_bytes() + self.recv.pending_bytes() + self.queued_to_write
    }

    /// The client has every reply byte below `offset` (one past the end acknowledges the
    /// end of data); true if that freed room or acknowledged the end.
    fn client_ack(&mut self, offset: u64, now: Instant) -> bool {
        let before = self.held();
        let mut progress = self.send.ack(offset, now);
        let freed = before - self.held().min(before);
        self.progress += freed as u64;
        if self.send.fin_offset().is_some_and(|f| offset > f) && !self.fin_acked {
            self.fin_acked = true;
            progress = true;
        }
        progress
    }

    /// `n` bytes of client data were written to the destination: its stream ack is due.
    fn wrote(&mut self, n: usize) {
        self.queued_to_write -= n.min(self.queued_to_write);
        self.written += n as u64;
        self.progress += n as u64;
        self.ack_resends_left = ACK_REPEATS;
        self.ack_sent_at = None;
    }
}

/// Counts one refusal or closing by a limit.
fn refused(reason: &'static str) {
    metrics::counter!(m::EXIT_REFUSED, "reason" => reason).increment(1);
}

enum WriterCmd {
    Data(Vec<u8>),
    Fin,
}

impl Exit {
    pub fn new(
        policy: ExitPolicy,
        config: ExitSection,
        links: Arc<Links>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Exit> {
        Arc::new(Exit {
            policy,
            config,
            links,
            reassembler: Mutex::new(Reassembler::new(reassembly_limits())),
            sessions: Mutex::new(HashMap::new()),
            open_streams: Arc::new(AtomicUsize::new(0)),
            buffered: AtomicUsize::new(0),
            surbs_held: AtomicUsize::new(0),
            origin: StdInstant::now(),
            shutdown,
            tracker,
            oldest_epoch: std::sync::atomic::AtomicU32::new(0),
        })
    }

    fn now(&self) -> Instant {
        Instant::from_elapsed(self.origin.elapsed())
    }

    /// Reply blocks for epochs before `epoch` are discarded (their keys are gone).
    pub fn set_oldest_epoch(&self, epoch: Epoch) {
        self.oldest_epoch.store(epoch, Ordering::Relaxed);
    }

    /// Handles a data packet that ended here.
    pub fn on_packet(self: &Arc<Self>, ack: ReplyBlock, fragment: Fragment) {
        metrics::counter!(m::FINAL_DELIVERED, "to" => "exit").increment(1);
        // Acknowledge receipt first: the client's ARQ waits on it.
        self.send_reply(Content::Ack.encode().and_then(|p| ack.use_block(&p)));
        let now = self.now();
        // Every fragment names its session, which the reassembler charges it to.
        let (session, piece) = match session_of_fragment(fragment) {
            Ok(f) => f,
            Err(e) => return drop_packet(e.label()),
        };
        let assembled = match self.reassembler.lock() {
            Ok(mut r) => reassemble(&mut r, session, piece, now),
            Err(_) => return,
        };
        match assembled {
            Ok(Some(msg)) => self.on_message(msg),
            Ok(None) => {}
            Err(murmur_protocol::Error::ReassemblyFull(what)) => {
                refused(if what == OWNER_MESSAGES || what == OWNER_BYTES {
                    "session_partial_messages"
                } else {
                    "partial_messages"
                });
                drop_packet("reassembly_full");
            }
            Err(e) => drop_packet(e.label()),
        }
    }

    /// Charges (or frees) the change of a stream's held bytes from `before` to `after` to its
    /// session and to the total.
    fn account(&self, st: &mut SessionState, before: usize, after: usize) {
        if after >= before {
            st.buffered += after - before;
            self.buffered.fetch_add(after - before, Ordering::Relaxed);
        } else {
            st.buffered = st.buffered.saturating_sub(before - after);
            self.buffered.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Bytes a session's streams may still take: the least of its own and the total room;
    /// with the reason to count when it is what stops them.
    fn buffer_room(&self, st: &SessionState) -> (usize, &'static str) {
        let session = self
            .config
            .max_session_buffered_bytes
            .saturating_sub(st.buffered);
        let total = self
            .config
            .max_buffered_bytes
            .saturating_sub(self.buffered.load(Ordering::Relaxed));
        if session <= total {
            (session, "session_buffer")
        } else {
            (total, "buffer")
        }
    }

    /// Takes a stream out of its session, freeing what it held.
    fn remove_stream(&self, st: &mut SessionState, stream: StreamId) -> Option<StreamState> {
        let s = st.streams.remove(&stream)?;
        self.account(st, s.held(), 0);
        Some(s)
    }

    /// Adds reply blocks to a session within its bound and the total one (its oldest go
    /// first when it is at its own bound).
    fn add_surbs(&self, st: &mut SessionState, blocks: Vec<ReplyBlock>) {
        for b in blocks {
            if st.surbs.len() >= MAX_SURBS {
                st.surbs.pop_front();
            } else if self.surbs_held.load(Ordering::Relaxed) >= MAX_SURBS_TOTAL {
                refused("surbs");
                continue;
            } else {
                self.surbs_held.fetch_add(1, Ordering::Relaxed);
            }
            st.surbs.push_back(b);
        }
    }

    /// Drops reply blocks from a session's count: `n` of them left it.
    fn surbs_gone(&self, n: usize) {
        if n > 0 {
            self.surbs_held.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// A session is forgotten: what it held goes back to the totals.
    fn forget(&self, st: &mut SessionState) {
        let ids: Vec<StreamId> = st.streams.keys().copied().collect();
        for id in ids {
            if let Some(s) = self.remove_stream(st, id) {
                s.cancel.cancel();
            }
        }
        self.surbs_gone(st.surbs.len());
        st.surbs.clear();
    }

    fn session(self: &Arc<Self>, id: u64) -> Option<Arc<Session>> {
        let mut sessions = self.sessions.lock().ok()?;
        if let Some(s) = sessions.get(&id) {
            return Some(s.clone());
        }
        if sessions.len() >= MAX_SESSIONS {
            let now = StdInstant::now();
            sessions.retain(|_, s| {
                s.state.lock().is_ok_and(|mut st| {
                    let keep = !st.streams.is_empty()
                        || st
                            .last_active
                            .is_some_and(|t| now.duration_since(t) < SESSION_IDLE);
                    if !keep {
                        self.forget(&mut st);
                    }
                    keep
                })
            });
            if sessions.len() >= MAX_SESSIONS {
                drop_packet("exit_session_limit");
                refused("sessions");
                return None;
            }
        }
        let session = Arc::new(Session {
            id,
            state: Mutex::new(SessionState::default()),
            wake: Notify::new(),
        });
        sessions.insert(id, session.clone());
        let exit = self.clone();
        let s = session.clone();
        self.tracker.spawn(async move { exit.pump(s).await });
        Some(session)
    }

    fn on_message(self: &Arc<Self>, msg: ClientMessage) {
        let Some(session) = self.session(msg.session) else {
            return;
        };
        let mut opens = Vec::new();
        let now = self.now();
        if let Ok(mut st) = session.state.lock() {
            st.last_active = Some(StdInstant::now());
            for item in msg.items {
                match item {
                    ClientItem::Surbs(blocks) => {
                        self.add_surbs(&mut st, blocks);
                        st.asked_for_surbs = false;
                    }
                    ClientItem::Open { stream, target, .. } => {
                        // A re-sent open means our answer was lost: say it again.
                        if let Some(s) = st.streams.get(&stream) {
                            if s.writer.is_some() && s.connected {
                                st.control.push(ExitItem::Opened {
                                    stream,
                                    window: STREAM_WINDOW as u32,
                                });
                            }
                            continue;
                        }
                        if let Some((_, answer)) = st.ended.iter().find(|(s, _)| *s == stream) {
                            let answer = answer.clone();
                            st.control.push(answer);
                            continue;
                        }
                        opens.push((stream, target));
                    }
                    ClientItem::Data {
                        stream,
                        offset,
                        bytes,
                    } => self.client_data(&mut st, stream, offset, &bytes),
                    ClientItem::Fin { stream, offset } => {
                        if let Some(s) = st.streams.get_mut(&stream)
                            && s.recv.finish_at(offset).is_ok()
                            && s.recv.is_finished()
                            && let Some(w) = &s.writer
                        {
                            let _ = w.send(WriterCmd::Fin);
                        }
                    }
                    ClientItem::Ack { stream, offset } => {
                        if let Some(s) = st.streams.get_mut(&stream) {
                            let before = s.held();
                            if s.client_ack(offset, now) {
                                s.room.notify_one();
                            }
                            let after = s.held();
                            self.account(&mut st, before, after);
                        }
                    }
                    ClientItem::Reset { stream } => {
                        if let Some(s) = self.remove_stream(&mut st, stream) {
                            s.cancel.cancel();
                        }
                    }
                }
            }
            for (stream, target) in opens {
                self.open(&session, &mut st, stream, target);
            }
        }
        session.wake.notify_one();
    }

    fn client_data(&self, st: &mut SessionState, stream: StreamId, offset: u64, bytes: &[u8]) {
        let (room, limit) = self.buffer_room(st);
        let Some(s) = st.streams.get_mut(&stream) else {
            drop_packet("exit_unknown_stream");
            return;
        };
        if bytes.len() > room {
            // Not taken: the client sends it again once its session's streams drain.
            drop_packet("exit_buffer_full");
            refused(limit);
            return;
        }
        let before = s.held();
        let result = s.recv.insert(offset, bytes);
        let after = s.held();
        self.account(st, before, after);
        let Some(s) = st.streams.get_mut(&stream) else {
            return;
        };
        match result {
            Ok(ready) if !ready.is_empty() => {
                if s.queued_to_write + ready.len() > STREAM_WINDOW {
                    // The client ignored the window: end the stream rather than buffer more.
                    drop_packet("exit_window_exceeded");
                    s.cancel.cancel();
                    return;
                }
                s.queued_to_write += ready.len();
                self.account(st, 0, ready.len());
                let Some(s) = st.streams.get_mut(&stream) else {
                    return;
                };
                if let Some(w) = &s.writer {
                    let _ = w.send(WriterCmd::Data(ready));
                }
                if s.recv.is_finished()
                    && let Some(w) = &s.writer
                {
                    let _ = w.send(WriterCmd::Fin);
                }
            }
            Ok(_) => {}
            Err(e) => drop_packet(e.label()),
        }
    }

    fn open(
        self: &Arc<Self>,
        session: &Arc<Session>,
        st: &mut SessionState,
        stream: StreamId,
        target: Target,
    ) {
        // This session's own bound first: at it, a session leaves the rest for others.
        let limit = if st.streams.len() >= self.config.max_streams_per_session {
            Some("session_streams")
        } else if self.open_streams.load(Ordering::Relaxed) >= self.config.max_streams {
            Some("streams")
        } else {
            None
        };
        if let Some(reason) = limit {
            st.control.push(ExitItem::Refused {
                stream,
                reason: Refusal::General,
            });
            drop_packet("exit_stream_limit");
            refused(reason);
            return;
        }
        // Refuse at once what the policy forbids for every address it could mean.
        let allowed_at_all = match &target {
            Target::Addr(a) => self.policy.allows(a.ip(), a.port()),
            Target::Host(_, port) => self.policy.may_allow_port(*port),
        };
        if !allowed_at_all {
            st.end(
                stream,
                ExitItem::Refused {
                    stream,
                    reason: Refusal::NotAllowed,
                },
            );
            metrics::counter!(m::EXIT_STREAMS, "result" => "policy").increment(1);
            return;
        }
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = self.shutdown.child_token();
        let room = Arc::new(Notify::new());
        st.streams.insert(
            stream,
            StreamState::new(Some(tx), room.clone(), cancel.clone()),
        );
        let exit = self.clone();
        let session = session.clone();
        self.tracker.spawn(async move {
            exit.run_stream(session, stream, target, rx, room, cancel)
                .await;
            exit.open_streams.fetch_sub(1, Ordering::Relaxed);
        });
    }

    async fn connect(&self, target: &Target) -> Result<TcpStream, Refusal> {
        let addrs: Vec<SocketAddr> = match target {
            Target::Addr(a) => vec![*a],
            Target::Host(host, port) => {
                match tokio::time::timeout(
                    self.config.connect_timeout,
                    tokio::net::lookup_host((host.as_str(), *port)),
                )
                .await
                {
                    Ok(Ok(addrs)) => addrs.collect(),
                    Ok(Err(_)) => return Err(Refusal::HostUnreachable),
                    Err(_) => return Err(Refusal::TtlExpired),
                }
            }
        };
        let allowed: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| self.policy.allows(a.ip(), a.port()))
            .collect();
        if allowed.is_empty() {
            return Err(if addrs.is_empty() {
                Refusal::HostUnreachable
            } else {
                Refusal::NotAllowed
            });
        }
        let mut last = Refusal::HostUnreachable;
        for addr in allowed {
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    last = Refusal::ConnectionRefused
                }
                Ok(Err(_)) => last = Refusal::HostUnreachable,
                Err(_) => last = Refusal::TtlExpired,
            }
        }
        Err(last)
    }

    async fn run_stream(
        self: &Arc<Self>,
        session: Arc<Session>,
        stream: StreamId,
        target: Target,
        mut writes: mpsc::UnboundedReceiver<WriterCmd>,
        room: Arc<Notify>,
        cancel: CancellationToken,
    ) {
        let opened = StdInstant::now();
        let connected = tokio::select! {
            _ = cancel.cancelled() => Err(Refusal::General),
            r = self.connect(&target) => r,
        };
        let tcp = match connected {
            Ok(s) => s,
            Err(reason) => {
                metrics::counter!(m::EXIT_STREAMS, "result" => "refused").increment(1);
                if let Ok(mut st) = session.state.lock() {
                    self.remove_stream(&mut st, stream);
                    st.end(stream, ExitItem::Refused { stream, reason });
                }
                session.wake.notify_one();
                return;
            }
        };
        metrics::counter!(m::EXIT_STREAMS, "result" => "opened").increment(1);
        let _ = tcp.set_nodelay(true);
        if let Ok(mut st) = session.state.lock() {
            if let Some(s) = st.streams.get_mut(&stream) {
                s.connected = true;
            }
            st.control.push(ExitItem::Opened {
                stream,
                window: STREAM_WINDOW as u32,
            });
        }
        session.wake.notify_one();
        let (mut rd, mut wr) = tcp.into_split();

        let writer = {
            let session = session.clone();
            let cancel = cancel.clone();
            async move {
                while let Some(cmd) = tokio::select! {
                    _ = cancel.cancelled() => None,
                    c = writes.recv() => c,
                } {
                    match cmd {
                        WriterCmd::Data(bytes) => {
                            if wr.write_all(&bytes).await.is_err() {
                                return Err(Refusal::ConnectionRefused);
                            }
                            if let Ok(mut st) = session.state.lock()
                                && let Some(s) = st.streams.get_mut(&stream)
                            {
                                let before = s.held();
                                s.wrote(bytes.len());
                                let after = s.held();
                                self.account(&mut st, before, after);
                            }
                            session.wake.notify_one();
                        }
                        WriterCmd::Fin => {
                            let _ = wr.shutdown().await;
                            return Ok(());
                        }
                    }
                }
                Ok(())
            }
        };
        let reader = {
            let session = session.clone();
            let cancel = cancel.clone();
            let room = room.clone();
            async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    // Wait for room before reading, so a slow client slows the destination:
                    // in this stream's window, and in its session's and the total budget.
                    let room_now = loop {
                        let space = session.state.lock().ok().and_then(|st| {
                            let (budget, limit) = self.buffer_room(&st);
                            let s = st.streams.get(&stream)?;
                            Some((s.send.space(), budget, limit))
                        });
                        match space {
                            None => return Ok(()),
                            Some((0, _, _)) => tokio::select! {
                                _ = cancel.cancelled() => return Ok(()),
                                _ = room.notified() => {}
                            },
                            Some((_, 0, limit)) => {
                                // Another stream's ack frees the budget; look again soon.
                                refused(limit);
                                tokio::select! {
                                    _ = cancel.cancelled() => return Ok(()),
                                    _ = room.notified() => {}
                                    _ = tokio::time::sleep(BUDGET_RETRY) => {}
                                }
                            }
                            Some((n, budget, _)) => break n.min(budget),
                        }
                    };
                    // Never read more than the buffer has room for: the rest would be lost.
                    let want = room_now.min(buf.len());
                    let n = tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        r = rd.read(&mut buf[..want]) => r,
                    };
                    let Ok(mut st) = session.state.lock() else {
                        return Ok(());
                    };
                    let Some(s) = st.streams.get_mut(&stream) else {
                        return Ok(());
                    };
                    match n {
                        Ok(0) => {
                            s.send.close();
                            drop(st);
                            session.wake.notify_one();
                            return Ok(());
                        }
                        Ok(n) => {
                            // The window only grows while we read (acks free it), so all of
                            // it fits; the budget may be overshot by other streams' reads
                            // at the same moment, by at most one read each.
                            let taken = s.send.push(&buf[..n]);
                            self.account(&mut st, 0, taken);
                            drop(st);
                            session.wake.notify_one();
                        }
                        Err(_) => return Err(Refusal::ConnectionRefused),
                    }
                }
            }
        };
        let idle = self.config.idle_timeout;
        let watch = Watch::new(
            opened,
            self.config.stream_lifetime,
            idle,
            self.config.idle_progress_bytes as u64,
        );
        let watchdog = {
            let session = session.clone();
            let cancel = cancel.clone();
            async move {
                let mut watch = watch;
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(watch.check_every()) => {}
                    }
                    let progress = session
                        .state
                        .lock()
                        .ok()
                        .and_then(|st| st.streams.get(&stream).map(|s| s.progress));
                    let progress = progress?;
                    if let Some(reason) = watch.check(StdInstant::now(), progress) {
                        return Some(reason);
                    }
                }
            }
        };
        let failure = tokio::select! {
            (w, r) = async { tokio::join!(writer, reader) } => w.err().or(r.err()),
            ended = watchdog => {
                if let Some(reason) = ended {
                    refused(reason);
                }
                Some(Refusal::TtlExpired)
            }
        };
        // Both directions ended. Keep the stream until its data is acknowledged, then drop it.
        if let Some(reason) = failure {
            if let Ok(mut st) = session.state.lock()
                && self.remove_stream(&mut st, stream).is_some()
            {
                st.end(stream, ExitItem::Reset { stream, reason });
            }
            session.wake.notify_one();
            return;
        }
        loop {
            let done = session
                .state
                .lock()
                .ok()
                .and_then(|st| {
                    st.streams
                        .get(&stream)
                        .map(|s| s.send.is_done() && s.fin_acked)
                })
                .unwrap_or(true);
            if done {
                break;
            }
            let left = self.config.stream_lifetime.saturating_sub(opened.elapsed());
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = room.notified() => {}
                _ = tokio::time::sleep(idle.min(left)) => break,
            }
        }
        if let Ok(mut st) = session.state.lock()
            && self.remove_stream(&mut st, stream).is_some()
        {
            // Finished cleanly; a late re-sent open is answered with a reset.
            st.ended.push_back((
                stream,
                ExitItem::Reset {
                    stream,
                    reason: Refusal::General,
                },
            ));
            if st.ended.len() > ENDED_MEMORY {
                st.ended.pop_front();
            }
        }
    }

    /// Sends a session's replies whenever there is something to say and a reply block to
    /// say it with; re-sends unacknowledged data when it times out.
    async fn pump(self: Arc<Self>, session: Arc<Session>) {
        loop {
            let next_timeout = self.send_ready(&session);
            let sleep = match next_timeout {
                Some(t) => t.saturating_duration_since(self.now()),
                None => Duration::from_secs(60),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = session.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
            let idle = session.state.lock().map_or(true, |st| {
                st.streams.is_empty()
                    && st.control.is_empty()
                    && st.last_active.is_none_or(|t| t.elapsed() > SESSION_IDLE)
            });
            if idle {
                if let Ok(mut sessions) = self.sessions.lock() {
                    sessions.remove(&session.id);
                }
                if let Ok(mut st) = session.state.lock() {
                    self.forget(&mut st);
                }
                return;
            }
        }
    }

    /// Builds and sends messages while there is something to send and a block to send it
    /// with. Returns the earliest retransmission deadline.
    fn send_ready(&self, session: &Session) -> Option<Instant> {
        let oldest = self.oldest_epoch.load(Ordering::Relaxed);
        loop {
            let now = self.now();
            let Ok(mut st) = session.state.lock() else {
                return None;
            };
            let held = st.surbs.len();
            st.surbs.retain(|b| b.key_epoch() >= oldest);
            self.surbs_gone(held - st.surbs.len());
            if st.surbs.is_empty() {
                // Nothing can be said until the client sends reply blocks; it learns it is
                // short from the `SurbsLow` sent with the last one.
                return next_deadline(&st);
            }
            let msg = build_message(&mut st, now);
            let Some(mut msg) = msg else {
                return next_deadline(&st);
            };
            if st.surbs.len() <= SURBS_LOW && !st.asked_for_surbs {
                st.asked_for_surbs = true;
                msg.items.push(ExitItem::SurbsLow {
                    have: u16::try_from(st.surbs.len().saturating_sub(1)).unwrap_or(u16::MAX),
                });
            }
            let Some(block) = st.surbs.pop_front() else {
                // No way to answer: put the control items back and wait for blocks.
                restore(&mut st, msg);
                drop_packet("exit_no_surb");
                return None;
            };
            self.surbs_gone(1);
            drop(st);
            let reply = msg
                .encode()
                .and_then(|bytes| {
                    Content::Data {
                        fragment: Fragment {
                            message_id: rand::random(),
                            index: 0,
                            count: 1,
                            data: bytes,
                        },
                    }
                    .encode()
                })
                .and_then(|content| block.use_block(&content));
            self.send_reply(reply);
        }
    }

    /// Sends a packet built from a reply block to the block's first hop.
    fn send_reply(&self, reply: murmur_protocol::Result<murmur_protocol::surb::Reply>) {
        match reply {
            Ok(reply) => {
                self.links.send(
                    reply.first_hop,
                    &Frame::Packet {
                        key_epoch: reply.key_epoch,
                        packet: reply.packet,
                        // The exit cannot build an envelope for the reply's hops (it does
                        // not know them); the block tells them not to check it.
                        envelope: Envelope::random(&mut rand::rng()),
                    },
                    None,
                );
            }
            Err(e) => drop_packet(e.label()),
        }
    }
}

/// Ask the session's streams for room again this often while the byte budget is spent.
const BUDGET_RETRY: Duration = Duration::from_millis(50);

/// Takes a fragment of `session`'s (without its session id) into the reassembler, charged
/// to the session; the client message, once it is whole.
fn reassemble(
    r: &mut Reassembler,
    session: u64,
    piece: Fragment,
    now: Instant,
) -> murmur_protocol::Result<Option<ClientMessage>> {
    r.expire(now);
    match r.insert_owned(session, piece, now)? {
        Assembled::Complete { message, .. } => {
            ClientMessage::decode(&join_client_message(session, &message)).map(Some)
        }
        _ => Ok(None),
    }
}

/// The reassembler's bounds: one session may hold a [`FULL_SESSIONS`]th of them.
fn reassembly_limits() -> ReassemblyLimits {
    let global = ReassemblyLimits::default();
    ReassemblyLimits {
        max_partial_messages_per_owner: global.max_partial_messages / FULL_SESSIONS,
        max_buffered_bytes_per_owner: global.max_buffered_bytes / FULL_SESSIONS,
        ..global
    }
}

/// When a stream must end: at its lifetime, or when it moved fewer than `min_progress` bytes
/// within `idle` (so a destination trickling a byte now and then does not hold it).
struct Watch {
    opened: StdInstant,
    lifetime: Duration,
    idle: Duration,
    min_progress: u64,
    /// Since when, and from what progress, the stream must make `min_progress`.
    mark: (StdInstant, u64),
}

impl Watch {
    fn new(opened: StdInstant, lifetime: Duration, idle: Duration, min_progress: u64) -> Watch {
        Watch {
            opened,
            lifetime,
            idle,
            min_progress,
            mark: (opened, 0),
        }
    }

    /// How long to wait between checks.
    fn check_every(&self) -> Duration {
        (self.idle.min(self.lifetime) / 4).clamp(Duration::from_millis(10), WATCH_EVERY)
    }

    /// Why the stream ends at `now` with `progress` bytes moved so far, if it does.
    fn check(&mut self, now: StdInstant, progress: u64) -> Option<&'static str> {
        if now.duration_since(self.opened) >= self.lifetime {
            return Some("lifetime");
        }
        if progress.saturating_sub(self.mark.1) >= self.min_progress.max(1) {
            self.mark = (now, progress);
            return None;
        }
        (now.duration_since(self.mark.0) >= self.idle).then_some("no_progress")
    }
}

/// When something next falls due: a data retransmission, a repeated ack or FIN.
fn next_deadline(st: &SessionState) -> Option<Instant> {
    st.streams
        .values()
        .flat_map(|s| {
            [
                s.send.poll_timeout(),
                s.ack_sent_at
                    .filter(|_| s.ack_resends_left > 0)
                    .map(|t| t + s.send.rto()),
                s.fin_sent_at
                    .filter(|_| !s.fin_acked)
                    .map(|t| t + s.send.rto()),
            ]
        })
        .flatten()
        .min()
}

/// Control items go back to the front of the queue; data stays in the send buffers and is
/// re-sent by the retransmission timer.
fn restore(st: &mut SessionState, msg: ExitMessage) {
    let mut control: Vec<ExitItem> = msg
        .items
        .into_iter()
        .filter(|i| !matches!(i, ExitItem::Data { .. } | ExitItem::SurbsLow { .. }))
        .collect();
    control.append(&mut st.control);
    st.control = control;
    st.asked_for_surbs = false;
}

/// Fills one reply message: control items, stream acks, then data; `None` if nothing is due.
fn build_message(st: &mut SessionState, now: Instant) -> Option<ExitMessage> {
    let budget = REPLY_FRAGMENT_DATA_LEN - EXIT_MESSAGE_OVERHEAD - 3; // room for SurbsLow
    let mut items = Vec::new();
    let mut used = 0;
    while let Some(item) = st.control.first() {
        if used + item.encoded_len() > budget {
            break;
        }
        used += item.encoded_len();
        items.push(st.control.remove(0));
    }
    let mut ids: Vec<StreamId> = st.streams.keys().copied().collect();
    ids.sort_unstable();
    for id in &ids {
        let Some(s) = st.streams.get_mut(id) else {
            continue;
        };
        let ack_due = s.ack_resends_left > 0
            && s.ack_sent_at
                .is_none_or(|t| now.saturating_duration_since(t) >= s.send.rto());
        if ack_due && used + 13 <= budget {
            items.push(ExitItem::Ack {
                stream: *id,
                offset: s.written,
            });
            used += 13;
            s.ack_resends_left -= 1;
            s.ack_sent_at = Some(now);
        }
    }
    for id in &ids {
        let Some(s) = st.streams.get_mut(id) else {
            continue;
        };
        while used + DATA_ITEM_OVERHEAD < budget {
            let Some((offset, bytes)) =
                s.send.poll_segment(now, budget - used - DATA_ITEM_OVERHEAD)
            else {
                break;
            };
            used += DATA_ITEM_OVERHEAD + bytes.len();
            items.push(ExitItem::Data {
                stream: *id,
                offset,
                bytes,
            });
        }
        let fin_due = !s.fin_acked
            && !s.send.has_new()
            && s.fin_sent_at
                .is_none_or(|t| now.saturating_duration_since(t) >= s.send.rto());
        if let Some(fin) = s
            .send
            .fin_offset()
            .filter(|_| fin_due && used + 13 <= budget)
        {
            items.push(ExitItem::Fin {
                stream: *id,
                offset: fin,
            });
            used += 13;
            s.fin_sent_at = Some(now);
        }
    }
    (!items.is_empty()).then_some(ExitMessage { items })
}

#[doc(hidden)]
pub mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream must move `min_progress` bytes in every `idle`: a trickle below it ends at the
    /// idle timeout, one above it at the lifetime.
    #[test]
    fn a_trickle_is_not_progress_and_the_lifetime_ends_every_stream() {
        let t0 = StdInstant::now();
        let s = Duration::from_secs(1);
        let mut w = Watch::new(t0, 100 * s, 10 * s, 100);
        let mut progress = 0;
        let mut ended = None;
        for i in 1..=30u32 {
            progress += 5; // 5 bytes a second
            if let Some(why) = w.check(t0 + s * i, progress) {
                ended = Some((i, why));
                break;
            }
        }
        assert_eq!(ended, Some((10, "no_progress")));

        let mut w = Watch::new(t0, 20 * s, 10 * s, 100);
        let mut ended = None;
        for i in 1..=30u32 {
            if let Some(why) = w.check(t0 + s * i, u64::from(i) * 50) {
                ended = Some((i, why));
                break;
            }
        }
        assert_eq!(ended, Some((20, "lifetime")));
        assert!(w.check_every() <= WATCH_EVERY);
    }

    #[test]
    fn a_session_holds_a_sixteenth_of_the_reassembler() {
        let l = reassembly_limits();
        assert_eq!(
            l.max_partial_messages_per_owner * FULL_SESSIONS,
            l.max_partial_messages
        );
        assert_eq!(
            l.max_buffered_bytes_per_owner * FULL_SESSIONS,
            l.max_buffered_bytes
        );
        assert_eq!(MAX_SURBS * FULL_SESSIONS, MAX_SURBS_TOTAL);
    }
}
